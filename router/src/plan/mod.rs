//! The planner: SQL text to a [`Plan`] (single shard, scatter-gather, broadcast, split insert,
//! transaction control, session setting) or a clear "unsupported" error. Pure: it never touches
//! a socket; it sees only the SQL and the [`Topology`].

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Distinct, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    Ident, Insert, JoinConstraint, JoinOperator, LimitClause, ObjectName, ObjectNamePart, Offset,
    OrderByKind, Query, Select, SelectItem, SetExpr, Statement, TableFactor, TableObject,
    UnaryOperator, Value, visit_expressions_mut, visit_relations,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::topology::{KeyType, Topology};

mod aggregate;
mod anti;
pub mod bind;
mod bound;
pub mod cache;
mod colocated;
mod copy;
mod decorrelate;
mod decorrelate_scalar;
mod finalize;
mod from;
mod insert;
mod intermediate;
mod keys;
mod lookup;
mod pinned;
mod scatter;
mod select;
mod set_operation;
mod statement;
mod variance;
mod write;
mod write_scope;
use crate::protocol::values;
use crate::vindex::KeyValue;
use aggregate::*;
pub use bound::{BoundSubqueries, BoundSubquery, ParamSource, SubqueryKind};
pub use copy::*;
pub use finalize::Finalize;
use from::*;
pub use insert::*;
pub use intermediate::{MultiStage, Stage};
pub use keys::*;
pub use lookup::*;
use scatter::*;
use select::*;
pub use statement::*;
pub use write::*;
pub use write_scope::{KeyScope, WriteScope, write_scopes};

/// Why a statement cannot be planned.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The SQL does not parse.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The SQL parses but the router cannot run it over shards.
    #[error("pg-router does not support {0}")]
    Unsupported(String),
    /// A shard key value has no shard.
    #[error("{0}")]
    NoShard(String),
    /// A column reference PostgreSQL would refuse, found by the binder before any shard is
    /// asked: unknown (42703) or ambiguous (42702).
    #[error("{}", .0.message)]
    Column(ColumnError),
}

/// A column reference the binder cannot resolve, with PostgreSQL's code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnError {
    /// SQLSTATE: 42703 (undefined column) or 42702 (ambiguous column).
    pub code: &'static str,
    /// PostgreSQL's message (`column "x" does not exist`).
    pub message: String,
    /// Where the reference starts in the parsed text: line and column, 1-based (0: unknown).
    pub line: u64,
    /// Column (characters) in that line.
    pub column: u64,
    /// The 1-based character offset into the client's query text (ErrorResponse field P),
    /// once known.
    pub position: Option<usize>,
}

impl ColumnError {
    /// Fills `position` from the line and column in `sql`, the text that was parsed.
    fn locate(&mut self, sql: &str) {
        if self.position.is_some() || self.line == 0 || self.column == 0 {
            return;
        }
        let mut offset = 0;
        for (number, line) in sql.split('\n').enumerate() {
            if number as u64 + 1 == self.line {
                self.position = Some(offset + self.column as usize);
                return;
            }
            offset += line.chars().count() + 1;
        }
    }
}

impl PlanError {
    /// SQLSTATE for the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PlanError::Syntax(_) => "42601",
            PlanError::Unsupported(_) => "0A000",
            PlanError::NoShard(_) => "22023",
            PlanError::Column(error) => error.code,
        }
    }

    /// The 1-based character offset of the error in the client's text, if it has one.
    pub fn position(&self) -> Option<usize> {
        match self {
            PlanError::Column(error) => error.position,
            _ => None,
        }
    }

    /// The error with its position found in `sql`, the text that was parsed.
    pub(crate) fn located(mut self, sql: &str) -> Self {
        if let PlanError::Column(error) = &mut self {
            error.locate(sql);
        }
        self
    }
}

/// A shard-key value in a statement: a literal, or a `$n` parameter (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyExpr {
    /// A literal key.
    Literal(KeyValue),
    /// A bind parameter; its value is hashed at Bind time.
    Param(usize),
}

/// Where a single-shard statement runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A known shard.
    Shard(usize),
    /// The shard of the key in parameter `param` (1-based) of table group `group`.
    Param {
        /// Parameter number.
        param: usize,
        /// Table group index.
        group: usize,
    },
    /// Any shard (reference-table reads, table-less queries).
    Any,
    /// The shard found through a lookup vindex: the key is read from `lookup_table` (on shard
    /// 0) by a secondary column's value.
    Lookup {
        /// Lookup table (`value`, `key` columns).
        lookup_table: String,
        /// The looked-up value.
        value: LookupValue,
        /// Table group of the sharded table.
        group: usize,
    },
}

/// A column of the shard results, counted from the front or from the back (hidden columns
/// appended after a `*` projection are only known from the back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnRef {
    /// Index from the first column.
    Front(usize),
    /// Index from the end: 1 is the last column.
    Back(usize),
}

impl ColumnRef {
    /// The absolute index in a row of `width` columns.
    pub fn resolve(self, width: usize) -> usize {
        match self {
            ColumnRef::Front(i) => i,
            ColumnRef::Back(i) => width.saturating_sub(i),
        }
    }
}

/// One ORDER BY key of the merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    /// Column.
    pub column: ColumnRef,
    /// DESC?
    pub descending: bool,
    /// NULLS FIRST?
    pub nulls_first: bool,
}

/// How an output column of an aggregate query is merged across shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnMerge {
    /// A GROUP BY key (the same on every shard's row of the group).
    Group,
    /// count(...): sum of the shard counts.
    Count,
    /// sum(...): sum of the shard sums.
    Sum,
    /// min(...).
    Min,
    /// max(...).
    Max,
    /// avg(...): the column holds the shard sum; `count` holds the shard count.
    Avg {
        /// Column with the count.
        count: usize,
    },
    /// A hidden helper column (avg counts).
    Helper,
    /// count(DISTINCT x): the shards group by `x` as well and send its values; the merger
    /// counts the distinct ones (NULLs aside).
    CountDistinct,
}

/// A comparison in HAVING, over merged columns.
#[derive(Clone, Debug, PartialEq)]
pub enum Having {
    /// Both.
    And(Box<Having>, Box<Having>),
    /// Either.
    Or(Box<Having>, Box<Having>),
    /// Negation.
    Not(Box<Having>),
    /// `left op right`.
    Compare(Operand, BinaryOperator, Operand),
}

/// A HAVING operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// A merged column.
    Column(usize),
    /// A constant.
    Literal(values::Value),
}

/// Grouping and aggregation done by the merger.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregation {
    /// How each column of the shard result merges.
    pub columns: Vec<ColumnMerge>,
    /// HAVING over the merged groups.
    pub having: Option<Having>,
    /// No GROUP BY: one row even when no shard sends one (count 0, other aggregates NULL).
    pub global: bool,
}

/// What the merger does with the shards' results of a scatter-gather query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSpec {
    /// Trailing helper columns to strip before sending rows.
    pub hidden: usize,
    /// ORDER BY of the merged result.
    pub order: Vec<SortKey>,
    /// GROUP BY / aggregates.
    pub aggregation: Option<Aggregation>,
    /// SELECT DISTINCT.
    pub distinct: bool,
    /// `NOT EXISTS` answered by each shard (see `plan/anti.rs`): only the first shard's rows
    /// whose key, the `hidden` trailing columns, every other shard sent too are kept.
    pub intersect: bool,
    /// With `intersect`: the statement that checks the first shard's keys on another shard
    /// (`$1...`: one text array per key column), so that the shards after the first only probe
    /// those keys instead of running the whole statement in parallel with it.
    pub anti_check: Option<String>,
    /// LIMIT.
    pub limit: Option<u64>,
    /// OFFSET.
    pub offset: u64,
    /// `LIMIT $n`: the executor reads `limit` from this parameter (1-based) before merging.
    pub limit_param: Option<usize>,
    /// `OFFSET $n`: likewise for `offset`.
    pub offset_param: Option<usize>,
    /// The client's parameters (0-based) the shards' statement uses as `$1...`, when it does
    /// not use them all as numbered.
    pub shard_params: Option<Vec<usize>>,
    /// Expressions over the merged aggregates, HAVING, ORDER BY and LIMIT left to a final
    /// statement on one shard over the merged groups (see `planner/finalize.rs`); the merger
    /// then only merges the groups.
    pub finalize: Option<Finalize>,
}

/// Transaction control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransactionControl {
    /// BEGIN / START TRANSACTION (the text is replayed on each shard that joins).
    Begin,
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT.
    Rollback,
}

/// A savepoint command (sent to every shard of the transaction; replayed on shards that join
/// later, so ROLLBACK TO undoes their work too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavepointOp {
    /// SAVEPOINT name.
    Create(String),
    /// RELEASE SAVEPOINT name.
    Release(String),
    /// ROLLBACK TO SAVEPOINT name.
    RollbackTo(String),
}

/// A multi-row INSERT into a sharded table, to split by shard at execution.
#[derive(Clone, Debug, PartialEq)]
pub struct InsertSplit {
    /// Table group of the table.
    pub group: usize,
    /// The shard key of each VALUES row.
    pub keys: Vec<KeyExpr>,
    /// The statement (its VALUES rows are subset per shard).
    pub template: Box<Insert>,
    /// Lookup vindexes to maintain: (column position in the VALUES rows, lookup table).
    pub lookups: Vec<(usize, String)>,
    /// Position of the shard key in the VALUES rows.
    pub key_position: usize,
}

/// The plan for one statement.
// One plan per statement (cached per prepared statement): size does not matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Transaction control, handled by the session.
    Transaction(TransactionControl),
    /// SET / RESET / DISCARD: remembered by the session and replayed on pooled backends.
    Setting,
    /// Runs on one shard as written.
    Single(Target),
    /// Runs on several shards (all if `shards` is `None`) and merges.
    Scatter {
        /// Shard subset, if the WHERE clause restricts the key to a list.
        shards: Option<Vec<usize>>,
        /// How to merge.
        merge: MergeSpec,
        /// A write (UPDATE/DELETE): runs in a (two-phase) transaction.
        write: bool,
    },
    /// Same statement on every shard (DDL, reference-table writes); one result returned.
    Broadcast,
    /// Multi-row INSERT split by shard.
    Insert(InsertSplit),
    /// DEALLOCATE: answered by the router.
    Deallocate,
    /// Savepoints.
    Savepoint(SavepointOp),
    /// COPY ... FROM STDIN: rows are routed line by line.
    CopyIn(CopyDestination, crate::protocol::copy_data::CopyFormat),
    /// COPY ... TO STDOUT: the shards' rows, one shard after the other.
    CopyOut(CopyOut),
    /// WHERE subqueries over sharded tables run first, their answers bound as parameters.
    BoundSubqueries(Box<BoundSubqueries>),
    /// COPY (query) TO STDOUT written by the router.
    CopyQuery(Box<CopyQuery>),
    /// EXPLAIN of a scatter-gather statement.
    Explain(Box<ExplainScatter>),
    /// INSERT ... VALUES without the shard key: keys drawn from its sequence first.
    DrawKeys(Box<DrawKeys>),
    /// INSERT ... SELECT: the rows are read first, then copied in by key.
    InsertSelect(Box<InsertSelect>),
    /// WITH queries / FROM subqueries over sharded tables first, then the outer statement over
    /// their results on the first shard.
    MultiStage(Box<MultiStage>),
}

/// What the merger does, in words (EXPLAIN).
fn kind_of(merge: &MergeSpec, write: bool) -> String {
    if write {
        return "write (two-phase commit)".into();
    }
    let mut parts = Vec::new();
    if merge.aggregation.is_some() {
        parts.push("GROUP BY / aggregates");
    }
    if !merge.order.is_empty() {
        parts.push("ORDER BY (streaming merge)");
    }
    if merge.distinct {
        parts.push("DISTINCT");
    }
    if merge.intersect {
        parts.push("NOT EXISTS on every shard");
    }
    if merge.limit.is_some() || merge.limit_param.is_some() {
        parts.push("LIMIT");
    }
    if merge.offset > 0 || merge.offset_param.is_some() {
        parts.push("OFFSET");
    }
    if parts.is_empty() {
        "scatter-gather, rows concatenated".into()
    } else {
        format!("scatter-gather, merged: {}", parts.join(", "))
    }
}

/// EXPLAIN of a scatter-gather statement: the router's plan, then one shard's.
#[derive(Clone, Debug, PartialEq)]
pub struct ExplainScatter {
    /// EXPLAIN of the statement the shards run.
    pub sql: String,
    /// The shards it runs on (`None`: every one); the first one's plan is shown.
    pub shards: Option<Vec<usize>>,
    /// The router's part, one line each.
    pub summary: Vec<String>,
}

/// An INSERT whose shard keys the router draws from the key column's sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct DrawKeys {
    /// The INSERT with the key column, its values `$first_param...`.
    pub inner: Planned,
    /// The table (unquoted name).
    pub table: String,
    /// Its shard key column.
    pub key: String,
    /// The parameter number of the first row's key.
    pub first_param: usize,
    /// Rows (keys to draw).
    pub count: usize,
}

/// An INSERT ... SELECT run by the router.
#[derive(Clone, Debug, PartialEq)]
pub struct InsertSelect {
    /// The SELECT.
    pub source: Planned,
    /// The client's parameters (0-based) it uses, as `$1...` in this order.
    pub source_params: Vec<usize>,
    /// `COPY table [(columns)] FROM STDIN`, text format.
    pub copy_sql: String,
    /// Where each row goes.
    pub destination: CopyDestination,
    /// COPY's text format, as the router writes the rows.
    pub format: crate::protocol::copy_data::CopyFormat,
}

impl Plan {
    /// A short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Plan::Transaction(_) => "transaction",
            Plan::Setting => "setting",
            Plan::Single(_) => "single_shard",
            Plan::Scatter { .. } => "scatter_gather",
            Plan::Broadcast => "broadcast",
            Plan::Insert(_) => "split_insert",
            Plan::Deallocate => "deallocate",
            Plan::Savepoint(_) => "savepoint",
            Plan::CopyIn(..) => "copy_in",
            Plan::CopyOut(_) => "copy_out",
            Plan::MultiStage(_) => "multi_stage",
            Plan::InsertSelect(_) => "insert_select",
            Plan::DrawKeys(_) => "draw_keys",
            Plan::Explain(_) => "explain",
            Plan::CopyQuery(_) => "copy_out",
            Plan::BoundSubqueries(_) => "bound_subqueries",
        }
    }
}

/// A statement and its plan. `sql` is what the shards run (rewritten for scatter-gather).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// SQL sent to the shards.
    pub sql: String,
    /// The plan.
    pub plan: Plan,
    /// Does the statement return rows (for Describe-less clients)?
    pub returns_rows: bool,
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::Unsupported(what.into()))
}

/// Quotes an identifier for SQL the router generates.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL the router generates. A value with a backslash is written
/// as an escape string (`E'...'`), which reads the same whatever `standard_conforming_strings`
/// a session set.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::RouterConfig;

    pub(super) fn topology() -> Topology {
        let config = RouterConfig::from_toml(
            r#"
            reference_tables = ["countries"]
            [[shards]]
            name = "a"
            port = 1
            [[shards]]
            name = "b"
            port = 2
            [[table_groups]]
            name = "customers"
            [[sharded_tables]]
            name = "customers"
            table_group = "customers"
            shard_key = "id"
            [[sharded_tables]]
            name = "orders"
            table_group = "customers"
            shard_key = "customer_id"
            "#,
        )
        .unwrap();
        Topology::from_config(&config).unwrap()
    }

    pub(super) fn plan(sql: &str) -> Result<Planned, PlanError> {
        plan_sql(&topology(), sql).map(|mut p| p.remove(0))
    }

    #[test]
    fn key_literal_is_single_shard() {
        let planned = plan("SELECT * FROM orders WHERE customer_id = 42 AND total > 3").unwrap();
        let expected = shard_of(&topology(), 0, &KeyValue::Int(42)).unwrap();
        assert_eq!(planned.plan, Plan::Single(Target::Shard(expected)));
    }

    #[test]
    fn key_parameter_is_routed_at_bind() {
        let planned = plan("SELECT * FROM orders o WHERE o.customer_id = $2").unwrap();
        assert_eq!(
            planned.plan,
            Plan::Single(Target::Param { param: 2, group: 0 })
        );
    }

    #[test]
    fn no_key_is_scatter_with_rewritten_limit() {
        let planned = plan("SELECT id FROM customers ORDER BY id DESC LIMIT 5 OFFSET 2").unwrap();
        let Plan::Scatter { merge, .. } = &planned.plan else {
            panic!("{planned:?}")
        };
        assert_eq!(merge.limit, Some(5));
        assert_eq!(merge.offset, 2);
        assert!(merge.order[0].descending);
        assert!(planned.sql.contains("LIMIT 7"), "{}", planned.sql);
    }

    #[test]
    fn avg_becomes_sum_and_count() {
        let planned = plan("SELECT region, avg(total) FROM orders GROUP BY region").unwrap();
        assert!(
            planned.sql.contains("sum(total) AS \"avg\""),
            "{}",
            planned.sql
        );
        assert!(planned.sql.contains("count(total)"), "{}", planned.sql);
    }

    #[test]
    fn colocated_join_is_pushed_down() {
        let planned =
            plan("SELECT c.id, o.total FROM customers c JOIN orders o ON o.customer_id = c.id")
                .unwrap();
        assert!(matches!(planned.plan, Plan::Scatter { .. }));
        // Off the shard keys: the joined table goes to every shard first.
        let planned = plan("SELECT * FROM customers c JOIN orders o ON o.total = c.id").unwrap();
        let Plan::MultiStage(multi) = &planned.plan else {
            panic!("{planned:?}");
        };
        assert_eq!(multi.stages[0].planned.sql, "SELECT * FROM orders");
        assert!(multi.distributed.is_some());
        // A RIGHT join would repeat the pulled table's unmatched rows on every shard.
        let error =
            plan("SELECT * FROM customers c RIGHT JOIN orders o ON o.total = c.id").unwrap_err();
        assert_eq!(error.sqlstate(), "0A000");
    }

    #[test]
    fn multi_row_insert_is_split() {
        let planned = plan("INSERT INTO orders (customer_id, total) VALUES (1, 10), (2, 20), (3, $1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1)").unwrap();
        let Plan::Insert(split) = &planned.plan else {
            panic!("{planned:?}")
        };
        let (sql, params) = render_insert_part(&split.template, &[2]);
        assert_eq!(
            sql,
            "INSERT INTO orders (customer_id, total) VALUES (3, $1)"
        );
        assert_eq!(params, vec![0]);
    }

    #[test]
    fn reference_writes_broadcast_and_ddl_broadcasts() {
        assert_eq!(
            plan("UPDATE countries SET name = 'x'").unwrap().plan,
            Plan::Broadcast
        );
        assert_eq!(
            plan("CREATE TABLE t (id int)").unwrap().plan,
            Plan::Broadcast
        );
    }

    #[test]
    fn count_distinct_groups_by_its_argument_on_the_shards() {
        let planned = plan("SELECT count(DISTINCT total), count(*) FROM orders").unwrap();
        let Plan::Scatter { merge, .. } = &planned.plan else {
            panic!("{:?}", planned.plan)
        };
        assert!(
            planned.sql.ends_with("GROUP BY total"),
            "shards group by the counted values: {}",
            planned.sql
        );
        let aggregation = merge.aggregation.as_ref().unwrap();
        assert_eq!(
            aggregation.columns,
            [ColumnMerge::CountDistinct, ColumnMerge::Count]
        );
        assert!(aggregation.global, "one row even over no rows");
        let grouped = plan("SELECT note, count(DISTINCT qty) FROM orders GROUP BY note").unwrap();
        assert!(
            grouped.sql.ends_with("GROUP BY note, qty"),
            "{}",
            grouped.sql
        );
    }

    #[test]
    fn count_distinct_of_the_shard_key_is_counted_on_each_shard() {
        let planned =
            plan("SELECT o.note, count(DISTINCT o.customer_id) FROM orders o GROUP BY o.note")
                .unwrap();
        let Plan::Scatter { merge, .. } = &planned.plan else {
            panic!("{:?}", planned.plan)
        };
        assert!(
            planned.sql.contains("count(DISTINCT o.customer_id)")
                && planned.sql.ends_with("GROUP BY o.note"),
            "each key lives on one shard: the shards' distinct counts add up: {}",
            planned.sql
        );
        let aggregation = merge.aggregation.as_ref().unwrap();
        assert_eq!(
            aggregation.columns,
            [ColumnMerge::Group, ColumnMerge::Count]
        );
        // Beside a count(DISTINCT) of another column the shards group by that column, which
        // splits the keys of a group: the values go to the router.
        let planned =
            plan("SELECT count(DISTINCT o.customer_id), count(DISTINCT o.qty) FROM orders o")
                .unwrap();
        assert!(
            planned.sql.ends_with("GROUP BY o.customer_id, o.qty")
                || planned.sql.ends_with("GROUP BY o.qty, o.customer_id"),
            "{}",
            planned.sql
        );
    }

    #[test]
    fn parameter_limits_are_read_at_execution() {
        let planned = plan("SELECT id FROM customers ORDER BY id LIMIT $1 OFFSET $2").unwrap();
        let Plan::Scatter { merge, .. } = &planned.plan else {
            panic!("{planned:?}");
        };
        assert_eq!((merge.limit_param, merge.offset_param), (Some(1), Some(2)));
        assert!(
            planned.sql.ends_with("LIMIT ($1::BIGINT + $2::BIGINT)"),
            "{}",
            planned.sql
        );
        let planned = plan(
            "SELECT region, count(*) FROM customers WHERE score > $2 GROUP BY region \
             FETCH FIRST $1 ROWS ONLY",
        )
        .unwrap();
        let Plan::Scatter { merge, .. } = &planned.plan else {
            panic!("{planned:?}");
        };
        assert_eq!(merge.limit_param, Some(1));
        // The shards group without the limit and get only the parameter they use.
        assert!(
            planned.sql.ends_with("WHERE score > $1 GROUP BY region"),
            "{}",
            planned.sql
        );
        assert_eq!(merge.shard_params, Some(vec![1]));
    }

    #[test]
    fn unsupported_sql_is_a_clear_error() {
        let error = plan(
            "SELECT *, rank() OVER (ORDER BY o.total) FROM orders o JOIN customers c ON c.id = o.customer_id",
        )
        .unwrap_err();
        assert_eq!(error.sqlstate(), "0A000");
        assert_eq!(plan("SELEC 1").unwrap_err().sqlstate(), "42601");
    }
}
