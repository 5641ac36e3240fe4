//! PostgresDatabase's SQL on a real PostgreSQL 18: create-time fields, owner and connection
//! limit, schemas, extensions (version updates), privileges on the database, schemas, their
//! objects and default privileges, revoke on removal, drift repair, PUBLIC's access, hostile
//! names, and deleting with sessions connected.

use std::time::Duration;

use api::postgres_database::{
    DatabaseGrant, ExtensionSpec, PostgresDatabaseSpec, SchemaGrant, SchemaSpec,
};
use instance::declarative::database_sql::{apply_database, drop_database};
use instance::declarative::error::DeclarativeError;
use instance::declarative::sql::Connector;
use testbed::{Postgres, PostgresOptions};

const SUPERUSER_PASSWORD: &str = "super-secret";

fn server() -> Postgres {
    Postgres::start_with(PostgresOptions {
        auth_method: "scram-sha-256".into(),
        superuser_password: Some(SUPERUSER_PASSWORD.into()),
        ..PostgresOptions::default()
    })
    .expect("PostgreSQL 18 starts")
}

fn connector(server: &Postgres) -> Connector {
    let mut config: tokio_postgres::Config = server.connection_string("postgres").parse().unwrap();
    config.password(SUPERUSER_PASSWORD);
    Connector::new(config)
}

fn spec(name: &str, owner: &str) -> PostgresDatabaseSpec {
    serde_json::from_value(serde_json::json!({
        "cluster": {"name": "db"}, "name": name, "owner": owner
    }))
    .unwrap()
}

async fn client_for(server: &Postgres, database: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = server.connection_string(database).parse().unwrap();
    config.password(SUPERUSER_PASSWORD);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Connects as `user` (password `pw`) to `database`; the SQLSTATE when refused.
async fn connect_as(
    server: &Postgres,
    user: &str,
    database: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(server.port())
        .user(user)
        .password("pw")
        .dbname(database)
        .connect_timeout(Duration::from_secs(5));
    match config.connect(tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Err(error) => Err(error
            .as_db_error()
            .map(|db| db.code().code().to_string())
            .unwrap_or_else(|| error.to_string())),
    }
}

async fn one_string(client: &tokio_postgres::Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn create_time_fields_owner_limit_and_create_only_changes() {
    let server = server();
    let connector = connector(&server);
    let postgres = server.client().await.unwrap();
    postgres
        .batch_execute("CREATE ROLE owner1; CREATE ROLE owner2")
        .await
        .unwrap();
    let mut wanted = spec("shop", "owner1");
    wanted.encoding = Some("SQL_ASCII".into());
    wanted.locale = Some("C".into());
    wanted.connection_limit = 4;
    let applied = apply_database(&connector, &wanted).await.unwrap();
    assert!(applied.created);
    assert_eq!(
        one_string(
            &postgres,
            "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datconnlimit FROM pg_database WHERE datname = 'shop'"
        )
        .await,
        "owner1 SQL_ASCII C 4"
    );
    assert!(
        apply_database(&connector, &wanted)
            .await
            .unwrap()
            .statements
            .is_empty()
    );

    wanted.owner = "owner2".into();
    wanted.connection_limit = -1;
    apply_database(&connector, &wanted).await.unwrap();
    assert_eq!(
        one_string(
            &postgres,
            "SELECT pg_get_userbyid(datdba) || ' ' || datconnlimit FROM pg_database WHERE datname = 'shop'"
        )
        .await,
        "owner2 -1"
    );

    wanted.encoding = Some("UTF8".into());
    match apply_database(&connector, &wanted).await {
        Err(error @ DeclarativeError::Immutable(_)) => {
            assert_eq!(error.reason(), "CreateOnlyFieldChanged");
            assert!(
                error.to_string().contains("created with SQL_ASCII"),
                "{error}"
            );
        }
        other => panic!("expected a create-only refusal, got {other:?}"),
    }
    wanted.encoding = Some("SQL_ASCII".into());
    wanted.locale = Some("POSIX".into());
    assert!(matches!(
        apply_database(&connector, &wanted).await,
        Err(DeclarativeError::Immutable(_))
    ));

    // A template is copied.
    postgres
        .batch_execute("CREATE DATABASE tmpl")
        .await
        .unwrap();
    client_for(&server, "tmpl")
        .await
        .batch_execute("CREATE TABLE seeded (x int)")
        .await
        .unwrap();
    let mut copied = spec("copied", "owner1");
    copied.template = Some("tmpl".into());
    apply_database(&connector, &copied).await.unwrap();
    let copy = client_for(&server, "copied").await;
    assert_eq!(
        one_string(
            &copy,
            "SELECT count(*)::text FROM pg_tables WHERE tablename = 'seeded'"
        )
        .await,
        "1"
    );
}

#[tokio::test]
async fn schemas_extensions_and_versions() {
    let server = server();
    let connector = connector(&server);
    let postgres = server.client().await.unwrap();
    postgres
        .batch_execute("CREATE ROLE owner; CREATE ROLE analyst")
        .await
        .unwrap();
    let mut wanted = spec("shop", "owner");
    wanted.schemas = vec![
        SchemaSpec {
            name: "sales".into(),
            owner: None,
            privileges: vec![],
        },
        SchemaSpec {
            name: "reports".into(),
            owner: Some("analyst".into()),
            privileges: vec![],
        },
    ];
    wanted.extensions = vec![ExtensionSpec {
        name: "hstore".into(),
        version: Some("1.7".into()),
        schema: Some("sales".into()),
    }];
    apply_database(&connector, &wanted).await.unwrap();
    let shop = client_for(&server, "shop").await;
    let schemas = "SELECT string_agg(nspname || ':' || pg_get_userbyid(nspowner), ',' ORDER BY nspname) FROM pg_namespace WHERE nspname IN ('sales', 'reports')";
    let extension = "SELECT extversion || '@' || extnamespace::regnamespace FROM pg_extension WHERE extname = 'hstore'";
    assert_eq!(
        one_string(&shop, schemas).await,
        "reports:analyst,sales:owner"
    );
    assert_eq!(one_string(&shop, extension).await, "1.7@sales");

    // A version change updates; a schema change moves; a dropped schema comes back.
    wanted.extensions[0].version = Some("1.8".into());
    wanted.extensions[0].schema = Some("reports".into());
    wanted.schemas[1].owner = Some("owner".into());
    let applied = apply_database(&connector, &wanted).await.unwrap();
    assert!(
        applied
            .statements
            .contains(&"ALTER EXTENSION \"hstore\" UPDATE TO '1.8'".to_string()),
        "{:?}",
        applied.statements
    );
    assert_eq!(one_string(&shop, extension).await, "1.8@reports");
    assert_eq!(
        one_string(&shop, schemas).await,
        "reports:owner,sales:owner"
    );
    shop.batch_execute("DROP SCHEMA sales").await.unwrap();
    apply_database(&connector, &wanted).await.unwrap();
    assert_eq!(
        one_string(&shop, schemas).await,
        "reports:owner,sales:owner"
    );

    // PostgreSQL's refusal, verbatim.
    wanted.extensions.push(ExtensionSpec {
        name: "no_such_extension".into(),
        version: None,
        schema: None,
    });
    match apply_database(&connector, &wanted).await {
        Err(DeclarativeError::Sql {
            sqlstate, message, ..
        }) => {
            assert_eq!(sqlstate, "0A000");
            assert!(
                message.starts_with("extension \"no_such_extension\" is not available"),
                "{message}"
            );
        }
        other => panic!("expected an SQL error, got {other:?}"),
    }
}

#[tokio::test]
async fn privileges_are_granted_revoked_on_removal_and_repaired_after_drift() {
    let server = server();
    let connector = connector(&server);
    let postgres = server.client().await.unwrap();
    postgres
        .batch_execute(
            "CREATE ROLE owner LOGIN PASSWORD 'pw'; CREATE ROLE reader LOGIN PASSWORD 'pw';
             CREATE ROLE writer LOGIN PASSWORD 'pw'; CREATE ROLE stranger LOGIN PASSWORD 'pw'",
        )
        .await
        .unwrap();
    let mut wanted = spec("shop", "owner");
    wanted.revoke_public = true;
    wanted.privileges = vec![
        DatabaseGrant {
            role: "reader".into(),
            privileges: vec!["CONNECT".into()],
        },
        DatabaseGrant {
            role: "writer".into(),
            privileges: vec!["CONNECT".into(), "TEMPORARY".into()],
        },
    ];
    wanted.schemas = vec![SchemaSpec {
        name: "sales".into(),
        owner: None,
        privileges: vec![
            SchemaGrant {
                role: "reader".into(),
                schema: vec!["USAGE".into()],
                tables: vec!["SELECT".into()],
                sequences: vec!["SELECT".into()],
                functions: vec!["EXECUTE".into()],
            },
            SchemaGrant {
                role: "writer".into(),
                schema: vec!["USAGE".into()],
                tables: vec!["SELECT".into(), "INSERT".into()],
                sequences: vec!["ALL".into()],
                functions: vec![],
            },
        ],
    }];
    apply_database(&connector, &wanted).await.unwrap();
    // Objects the owner creates before and after the grants.
    let owner = connect_as(&server, "owner", "shop").await.unwrap();
    owner
        .batch_execute(
            "CREATE TABLE sales.orders (id serial, total int);
             CREATE FUNCTION sales.double(x int) RETURNS int LANGUAGE sql AS 'SELECT x * 2';
             REVOKE EXECUTE ON FUNCTION sales.double(int) FROM PUBLIC",
        )
        .await
        .unwrap();
    apply_database(&connector, &wanted).await.unwrap();
    owner
        .batch_execute("CREATE TABLE sales.later (id int)")
        .await
        .unwrap();

    // Database: PUBLIC no longer connects; the granted roles do.
    assert_eq!(
        connect_as(&server, "stranger", "shop").await.err(),
        Some("42501".into())
    );
    let reader = connect_as(&server, "reader", "shop").await.unwrap();
    let writer = connect_as(&server, "writer", "shop").await.unwrap();
    // Tables (existing and later ones, through default privileges), sequences, functions.
    reader
        .batch_execute("SELECT * FROM sales.orders; SELECT * FROM sales.later")
        .await
        .unwrap();
    reader
        .batch_execute("SELECT sales.double(2)")
        .await
        .unwrap();
    let denied = reader
        .batch_execute("INSERT INTO sales.orders (total) VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(denied.code().unwrap().code(), "42501");
    writer
        .batch_execute(
            "INSERT INTO sales.orders (total) VALUES (1); INSERT INTO sales.later VALUES (1)",
        )
        .await
        .unwrap();
    let shop = client_for(&server, "shop").await;
    assert_eq!(
        one_string(
            &shop,
            "SELECT has_function_privilege('writer', 'sales.double(int)', 'EXECUTE')::text
                    || has_sequence_privilege('reader', 'sales.orders_id_seq', 'SELECT')::text
                    || has_sequence_privilege('reader', 'sales.orders_id_seq', 'UPDATE')::text
                    || has_sequence_privilege('writer', 'sales.orders_id_seq', 'UPDATE')::text"
        )
        .await,
        "falsetruefalsetrue",
        "functions and sequences get exactly their grants"
    );
    // CREATE on schema public granted to PUBLIC by hand goes again.
    shop.batch_execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    apply_database(&connector, &wanted).await.unwrap();
    assert_eq!(
        one_string(
            &shop,
            "SELECT has_schema_privilege('stranger', 'public', 'CREATE')::text"
        )
        .await,
        "false"
    );
    // Drift: a revoke by hand and a grant by hand, both undone.
    shop.batch_execute(
        "REVOKE SELECT ON sales.orders FROM reader; GRANT DELETE ON sales.orders TO stranger",
    )
    .await
    .unwrap();
    apply_database(&connector, &wanted).await.unwrap();
    reader
        .batch_execute("SELECT * FROM sales.orders")
        .await
        .unwrap();
    let stranger_delete = "SELECT has_table_privilege('stranger', 'sales.orders', 'DELETE')::text";
    assert_eq!(one_string(&shop, stranger_delete).await, "false");

    // Removal: reader loses its table privileges (existing and default) and CONNECT.
    wanted.schemas[0]
        .privileges
        .retain(|grant| grant.role != "reader");
    wanted.privileges.retain(|grant| grant.role != "reader");
    apply_database(&connector, &wanted).await.unwrap();
    assert_eq!(
        one_string(
            &shop,
            "SELECT has_table_privilege('reader', 'sales.orders', 'SELECT')::text"
        )
        .await,
        "false"
    );
    owner
        .batch_execute("CREATE TABLE sales.latest (id int)")
        .await
        .unwrap();
    assert_eq!(
        one_string(
            &shop,
            "SELECT has_table_privilege('reader', 'sales.latest', 'SELECT')::text"
        )
        .await,
        "false"
    );
    assert_eq!(
        one_string(
            &shop,
            "SELECT has_table_privilege('writer', 'sales.latest', 'INSERT')::text"
        )
        .await,
        "true"
    );
    assert_eq!(
        connect_as(&server, "reader", "shop").await.err(),
        Some("42501".into())
    );
    assert!(
        apply_database(&connector, &wanted)
            .await
            .unwrap()
            .statements
            .is_empty(),
        "converged"
    );
}

#[tokio::test]
async fn hostile_database_schema_and_role_names_neither_break_nor_inject() {
    let server = server();
    let connector = connector(&server);
    let postgres = server.client().await.unwrap();
    postgres
        .batch_execute("CREATE DATABASE victim")
        .await
        .unwrap();
    let long = "ä".repeat(31) + "z"; // 63 bytes
    let names = [
        "it's",
        "quo\"te",
        "x\"; DROP DATABASE victim; --",
        "y'; DROP DATABASE victim; --",
        "back\\slash",
        long.as_str(),
    ];
    for (index, name) in names.iter().enumerate() {
        let role = format!("r{index}{}", name.chars().take(20).collect::<String>());
        postgres
            .execute(
                &format!("CREATE ROLE {}", instance::quote::identifier(&role)),
                &[],
            )
            .await
            .unwrap();
        let mut wanted = spec(name, &role);
        wanted.schemas = vec![SchemaSpec {
            name: name.to_string(),
            owner: None,
            privileges: vec![SchemaGrant {
                role: role.clone(),
                schema: vec!["USAGE".into()],
                tables: vec!["SELECT".into()],
                sequences: vec![],
                functions: vec![],
            }],
        }];
        wanted.privileges = vec![DatabaseGrant {
            role: role.clone(),
            privileges: vec!["CONNECT".into()],
        }];
        apply_database(&connector, &wanted)
            .await
            .unwrap_or_else(|error| panic!("{name:?}: {error}"));
        assert!(
            apply_database(&connector, &wanted)
                .await
                .unwrap()
                .statements
                .is_empty(),
            "{name:?} converged"
        );
        let exists: i64 = postgres
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(exists, 1, "database {name:?} under its exact name");
        drop_database(&connector, name, false).await.unwrap();
    }
    // 64 bytes would be cut to 63 by PostgreSQL (and never match the spec): refused instead.
    let too_long = "ä".repeat(32);
    match apply_database(&connector, &spec(&too_long, "postgres")).await {
        Err(error @ DeclarativeError::Invalid(_)) => {
            assert!(error.to_string().contains("64 bytes"), "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let victim: i64 = postgres
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(victim, 1, "the injection attempts had no effect");
}

#[tokio::test]
async fn deleting_refuses_while_sessions_are_connected_unless_forced() {
    let server = server();
    let connector = connector(&server);
    let postgres = server.client().await.unwrap();
    postgres.batch_execute("CREATE ROLE owner").await.unwrap();
    apply_database(&connector, &spec("busy", "owner"))
        .await
        .unwrap();
    let session = client_for(&server, "busy").await;
    match drop_database(&connector, "busy", false).await {
        Err(error @ DeclarativeError::DeleteRefused(_)) => {
            assert!(
                error
                    .to_string()
                    .contains("1 session(s) are connected to database busy"),
                "{error}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        drop_database(&connector, "busy", true).await.unwrap(),
        ["DROP DATABASE \"busy\" WITH (FORCE)"]
    );
    assert!(
        session.batch_execute("SELECT 1").await.is_err(),
        "the session was terminated"
    );
    assert!(
        drop_database(&connector, "busy", false)
            .await
            .unwrap()
            .is_empty()
    );
}
