// A small JDBC workload through pg-router: prepared statements (server-side after 5 uses),
// batches, a cross-shard transaction, and an unsupported statement that must not break the
// connection. Prints "jdbc ok" on success.
import java.sql.*;

public class JdbcWorkload {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url, "postgres", "")) {
            c.setAutoCommit(true);
            try (PreparedStatement insert = c.prepareStatement("INSERT INTO customers (id, name, score) VALUES (?, ?, ?)")) {
                for (int i = 5000; i < 5020; i++) {
                    insert.setLong(1, i);
                    insert.setString(2, "jdbc " + i);
                    insert.setInt(3, i % 7);
                    insert.addBatch();
                }
                insert.executeBatch();
            }
            try (PreparedStatement select = c.prepareStatement("SELECT name, score FROM customers WHERE id = ?")) {
                for (int round = 0; round < 8; round++) {
                    for (int i = 5000; i < 5020; i++) {
                        select.setLong(1, i);
                        try (ResultSet rs = select.executeQuery()) {
                            if (!rs.next() || !rs.getString(1).equals("jdbc " + i) || rs.getInt(2) != i % 7) {
                                throw new AssertionError("wrong row for " + i);
                            }
                        }
                    }
                }
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE customers SET score = score + 100 WHERE id = 5001");
                s.executeUpdate("UPDATE customers SET score = score + 100 WHERE id = 5002");
            }
            c.commit();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT count(*), sum(score) FROM customers WHERE id >= 5000 AND id < 5020")) {
                rs.next();
                if (rs.getLong(1) != 20) throw new AssertionError("count " + rs.getLong(1));
                long expected = 200;
                for (int i = 5000; i < 5020; i++) expected += i % 7;
                if (rs.getLong(2) != expected) throw new AssertionError("sum " + rs.getLong(2) + " != " + expected);
            }
            try (Statement s = c.createStatement()) {
                s.executeQuery("SELECT * FROM customers c WHERE c.score > (SELECT count(*) FROM customers x WHERE x.region <> c.region)");
                throw new AssertionError("unsupported SQL succeeded");
            } catch (SQLException e) {
                if (!"0A000".equals(e.getSQLState())) throw e;
            }
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT 1")) {
                rs.next();
                if (rs.getInt(1) != 1) throw new AssertionError("connection unusable");
            }
        }
        System.out.println("jdbc ok");
    }
}
