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

mod bound;
pub mod cache;
mod colocated;
mod finalize;
mod intermediate;
mod pinned;
mod set_operation;
use crate::protocol::values;
use crate::vindex::KeyValue;
pub use bound::{BoundSubqueries, BoundSubquery, ParamSource, SubqueryKind};
pub use finalize::Finalize;
pub use intermediate::{MultiStage, Stage};

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
}

impl PlanError {
    /// SQLSTATE for the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PlanError::Syntax(_) => "42601",
            PlanError::Unsupported(_) => "0A000",
            PlanError::NoShard(_) => "22023",
        }
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

/// A value to look up in a lookup vindex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupValue {
    /// A literal, as text.
    Literal(String),
    /// A bind parameter (1-based).
    Param(usize),
}

/// SQL that reads the shard key for a lookup value (`$1`).
pub fn lookup_query(lookup_table: &str) -> String {
    format!(
        "SELECT {} FROM {} WHERE {} = $1 LIMIT 1",
        quote_ident("key"),
        quote_ident(lookup_table),
        quote_ident("value")
    )
}

fn lookup_value(expr: &Expr) -> Option<LookupValue> {
    match expr {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => lookup_value(inner),
        Expr::Value(value) => match &value.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(LookupValue::Param),
            Value::Number(n, _) => Some(LookupValue::Literal(n.clone())),
            Value::SingleQuotedString(s) => Some(LookupValue::Literal(s.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// A lookup-vindex restriction in WHERE: `lookup_column = value` for a sharded table whose
/// name or alias is in `aliases`.
fn lookup_restriction(
    topology: &Topology,
    selection: &Expr,
    table: &str,
    aliases: &[String],
    group: usize,
) -> Option<Target> {
    let sharded = topology.tables.get(table)?;
    if sharded.lookups.is_empty() {
        return None;
    }
    let column_of = |expr: &Expr| -> Option<String> {
        match expr {
            Expr::Identifier(ident) => Some(normalize(ident)),
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let qualifier = normalize(&parts[parts.len() - 2]);
                aliases
                    .contains(&qualifier)
                    .then(|| normalize(&parts[parts.len() - 1]))
            }
            _ => None,
        }
    };
    for conjunct in conjuncts(selection) {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = conjunct
        {
            for (column, value) in [(left, right), (right, left)] {
                if let Some(name) = column_of(column)
                    && let Some(lookup_table) = sharded.lookups.get(&name)
                    && let Some(value) = lookup_value(value)
                {
                    return Some(Target::Lookup {
                        lookup_table: lookup_table.clone(),
                        value,
                        group,
                    });
                }
            }
        }
    }
    None
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

/// COPY (query) TO STDOUT of a query the router runs (merged, in stages, ...): its rows are
/// written out in COPY's text or CSV format by the router.
fn copy_query(
    query: Planned,
    options: &[sqlparser::ast::CopyOption],
    legacy_options: &[sqlparser::ast::CopyLegacyOption],
    header: bool,
) -> Result<Planned, PlanError> {
    use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
    let mut copy = CopyQuery {
        query,
        csv: false,
        header,
        delimiter: None,
        null: None,
    };
    let refused =
        |what: String| unsupported(format!("COPY (query) TO STDOUT with {what} across shards"));
    for option in options {
        match option {
            CopyOption::Format(format) if format.value.eq_ignore_ascii_case("csv") => {
                copy.csv = true
            }
            CopyOption::Format(format) if format.value.eq_ignore_ascii_case("text") => {}
            CopyOption::Header(_) => {}
            CopyOption::Delimiter(c) => copy.delimiter = Some(*c),
            CopyOption::Null(null) => copy.null = Some(null.clone()),
            other => return refused(other.to_string()),
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Csv(csv) => {
                copy.csv = true;
                if let Some(other) = csv
                    .iter()
                    .find(|c| !matches!(c, CopyLegacyCsvOption::Header))
                {
                    return refused(other.to_string());
                }
            }
            CopyLegacyOption::Delimiter(c) => copy.delimiter = Some(*c),
            CopyLegacyOption::Null(null) => copy.null = Some(null.clone()),
            other => return refused(other.to_string()),
        }
    }
    if copy.header && !copy.csv {
        return Err(PlanError::Syntax(
            "COPY HEADER in text format is not supported by the router; use CSV".into(),
        ));
    }
    Ok(Planned {
        sql: copy.query.sql.clone(),
        plan: Plan::CopyQuery(Box::new(copy)),
        returns_rows: false,
    })
}

/// A COPY (query) TO STDOUT the router writes itself.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyQuery {
    /// The query.
    pub query: Planned,
    /// CSV (else text).
    pub csv: bool,
    /// A header line with the column names (CSV).
    pub header: bool,
    /// Field delimiter (tab for text, comma for CSV).
    pub delimiter: Option<char>,
    /// The NULL marker (`\N` for text, empty for CSV).
    pub null: Option<String>,
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

/// A COPY TO STDOUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOut {
    /// The shards it reads: every one (`None`), or one.
    pub shard: Option<Target>,
    /// CSV with HEADER: the header line is kept from the first shard only.
    pub header: bool,
}

/// Where the rows of a COPY FROM STDIN go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyDestination {
    /// Each row to the shard of its key (field `key_position` of the text format).
    ByKey {
        /// Field of the shard key; `None` (no column list): looked up in the catalog.
        key_position: Option<usize>,
        /// The table.
        table: String,
        /// Its shard-key column.
        key_column: String,
        /// Table group.
        group: usize,
    },
    /// Every row to every shard (reference table).
    Everywhere,
    /// Every row to the first shard (a table the router does not shard).
    FirstShard,
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

/// The format of a COPY FROM STDIN from its options (PostgreSQL's and the legacy syntax).
fn copy_format(
    options: &[sqlparser::ast::CopyOption],
    legacy_options: &[sqlparser::ast::CopyLegacyOption],
) -> Result<crate::protocol::copy_data::CopyFormat, PlanError> {
    use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
    #[derive(Default)]
    struct Chosen {
        format: Option<String>,
        delimiter: Option<char>,
        null: Option<String>,
        header: bool,
        quote: Option<char>,
        escape: Option<char>,
    }
    let mut chosen = Chosen::default();
    for option in options {
        match option {
            CopyOption::Format(name) => chosen.format = Some(name.value.to_ascii_lowercase()),
            CopyOption::Delimiter(c) => chosen.delimiter = Some(*c),
            CopyOption::Null(null) => chosen.null = Some(null.clone()),
            CopyOption::Header(header) => chosen.header = *header,
            CopyOption::Quote(c) => chosen.quote = Some(*c),
            CopyOption::Escape(c) => chosen.escape = Some(*c),
            CopyOption::Freeze(_)
            | CopyOption::ForceQuote(_)
            | CopyOption::ForceNotNull(_)
            | CopyOption::ForceNull(_) => {}
            CopyOption::Encoding(encoding) => {
                let name = encoding.to_ascii_uppercase().replace(['-', '_'], "");
                if name != "UTF8" && name != "UNICODE" {
                    return unsupported("COPY FROM STDIN in an encoding other than UTF8");
                }
            }
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Binary => chosen.format = Some("binary".into()),
            CopyLegacyOption::Delimiter(c) => chosen.delimiter = Some(*c),
            CopyLegacyOption::Null(null) => chosen.null = Some(null.clone()),
            CopyLegacyOption::Csv(csv) => {
                chosen.format = Some("csv".into());
                for option in csv {
                    match option {
                        CopyLegacyCsvOption::Header => chosen.header = true,
                        CopyLegacyCsvOption::Quote(c) => chosen.quote = Some(*c),
                        CopyLegacyCsvOption::Escape(c) => chosen.escape = Some(*c),
                        CopyLegacyCsvOption::ForceQuote(_)
                        | CopyLegacyCsvOption::ForceNotNull(_) => {}
                    }
                }
            }
            other => return unsupported(format!("the COPY option {other}")),
        }
    }
    let byte = |c: Option<char>, default: u8, what: &str| -> Result<u8, PlanError> {
        match c {
            None => Ok(default),
            Some(c) if c.is_ascii() => Ok(c as u8),
            Some(_) => unsupported(format!("a COPY {what} that is not a single-byte character")),
        }
    };
    use crate::protocol::copy_data::CopyFormat;
    match chosen.format.as_deref().unwrap_or("text") {
        "text" => Ok(CopyFormat::Text {
            delimiter: byte(chosen.delimiter, b'\t', "delimiter")?,
            null: chosen.null.unwrap_or_else(|| "\\N".into()).into_bytes(),
            header: chosen.header,
        }),
        "csv" => {
            let quote = byte(chosen.quote, b'"', "quote")?;
            Ok(CopyFormat::Csv {
                delimiter: byte(chosen.delimiter, b',', "delimiter")?,
                quote,
                escape: byte(chosen.escape, quote, "escape")?,
                null: chosen.null.unwrap_or_default().into_bytes(),
                header: chosen.header,
            })
        }
        "binary" => Ok(CopyFormat::Binary),
        other => unsupported(format!("the COPY format {other}")),
    }
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

/// Splits and plans a query string (one or more statements).
pub fn plan_sql(topology: &Topology, sql: &str) -> Result<Vec<Planned>, PlanError> {
    // The planner is synchronous: the topology's aggregates hold for this call on this thread.
    let previous = USER_AGGREGATES.with(|user| user.replace(topology.aggregates.clone()));
    let planned = plan_sql_inner(topology, sql);
    USER_AGGREGATES.with(|user| user.replace(previous));
    planned
}

fn plan_sql_inner(topology: &Topology, sql: &str) -> Result<Vec<Planned>, PlanError> {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => statements,
        // sqlparser wants `FREEZE true` where PostgreSQL (and pgbench) also write `FREEZE on`;
        // only the parse sees the rewrite, the shards get the client's text.
        Err(error) if first_keyword(sql) == "COPY" => {
            let rewritten = sql
                .replace("freeze on", "freeze true")
                .replace("FREEZE ON", "FREEZE TRUE")
                .replace("freeze off", "freeze false")
                .replace("FREEZE OFF", "FREEZE FALSE");
            let statements = Parser::parse_sql(&PostgreSqlDialect {}, &rewritten)
                .map_err(|_| PlanError::Syntax(error.to_string()))?;
            if statements.len() != 1 {
                return Err(PlanError::Syntax(error.to_string()));
            }
            statements
        }
        // Maintenance commands sqlparser does not know run on every shard as written.
        Err(_)
            if matches!(
                first_keyword(sql).as_str(),
                "VACUUM" | "ANALYZE" | "REINDEX" | "CLUSTER" | "CHECKPOINT"
            ) && !sql.trim().trim_end_matches(';').contains(';') =>
        {
            return Ok(vec![Planned {
                sql: sql.trim().trim_end_matches(';').to_string(),
                plan: Plan::Broadcast,
                returns_rows: false,
            }]);
        }
        Err(error) => return Err(PlanError::Syntax(error.to_string())),
    };
    let single = statements.len() == 1;
    statements
        .into_iter()
        .map(|statement| {
            // One statement goes to the shard as the client wrote it; several are re-rendered.
            let text = if single {
                sql.trim().trim_end_matches(';').to_string()
            } else {
                statement.to_string()
            };
            plan_statement(topology, statement, text)
        })
        .collect()
}

fn last_name(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => normalize(ident),
        _ => String::new(),
    }
}

fn normalize(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// Tables a statement references, by kind.
#[derive(Default, Debug)]
struct TableUse {
    sharded: Vec<String>,
    reference: usize,
    other: usize,
}

fn table_use(topology: &Topology, node: &impl sqlparser::ast::Visit) -> TableUse {
    let mut usage = TableUse::default();
    let _ = visit_relations(node, |name| {
        let table = last_name(name);
        let schema = if name.0.len() > 1 {
            match &name.0[0] {
                ObjectNamePart::Identifier(ident) => normalize(ident),
                _ => String::new(),
            }
        } else {
            String::new()
        };
        let catalog = schema == "pg_catalog" || schema == "information_schema";
        if !catalog && topology.tables.contains_key(&table) {
            usage.sharded.push(table);
        } else if !catalog && topology.is_reference(&table) {
            usage.reference += 1;
        } else {
            usage.other += 1;
        }
        ControlFlow::<()>::Continue(())
    });
    usage
}

fn first_keyword(sql: &str) -> String {
    sql.trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Plans one parsed statement; `text` is its SQL.
pub fn plan_statement(
    topology: &Topology,
    statement: Statement,
    text: String,
) -> Result<Planned, PlanError> {
    let plain = |plan: Plan, returns_rows: bool| Planned {
        sql: text.clone(),
        plan,
        returns_rows,
    };
    match statement {
        Statement::StartTransaction { .. } => {
            Ok(plain(Plan::Transaction(TransactionControl::Begin), false))
        }
        Statement::Commit { chain: false, .. } => {
            Ok(plain(Plan::Transaction(TransactionControl::Commit), false))
        }
        Statement::Rollback {
            chain: false,
            savepoint: None,
        } => Ok(plain(
            Plan::Transaction(TransactionControl::Rollback),
            false,
        )),
        Statement::Rollback {
            chain: false,
            savepoint: Some(name),
        } => Ok(plain(
            Plan::Savepoint(SavepointOp::RollbackTo(normalize(&name))),
            false,
        )),
        Statement::Commit { .. } | Statement::Rollback { .. } => {
            unsupported("COMMIT AND CHAIN / ROLLBACK AND CHAIN")
        }
        Statement::Savepoint { name } => Ok(plain(
            Plan::Savepoint(SavepointOp::Create(normalize(&name))),
            false,
        )),
        Statement::ReleaseSavepoint { name } => Ok(plain(
            Plan::Savepoint(SavepointOp::Release(normalize(&name))),
            false,
        )),
        Statement::Set(_) | Statement::Discard { .. } => Ok(plain(Plan::Setting, false)),
        Statement::ShowVariable { .. } => Ok(plain(Plan::Single(Target::Any), true)),
        Statement::Copy {
            source:
                sqlparser::ast::CopySource::Table {
                    table_name,
                    columns,
                },
            to: false,
            target: sqlparser::ast::CopyTarget::Stdin,
            options,
            legacy_options,
            ..
        } => {
            let format = copy_format(&options, &legacy_options)?;
            let table = last_name(&table_name);
            let destination = if topology.is_reference(&table) {
                CopyDestination::Everywhere
            } else if let Some(sharded) = topology.tables.get(&table) {
                // Without a column list the key's position comes from the catalog at COPY start.
                let key_position = if columns.is_empty() {
                    None
                } else {
                    match columns
                        .iter()
                        .position(|c| normalize(c) == sharded.shard_key)
                    {
                        Some(position) => Some(position),
                        None => {
                            return unsupported(format!(
                                "COPY into sharded table {table} without its shard key column {} in the column list",
                                sharded.shard_key
                            ));
                        }
                    }
                };
                if !sharded.lookups.is_empty() {
                    return unsupported("COPY into a table with a lookup vindex");
                }
                CopyDestination::ByKey {
                    key_position,
                    table: table.clone(),
                    key_column: sharded.shard_key.clone(),
                    group: sharded.group,
                }
            } else {
                CopyDestination::FirstShard
            };
            Ok(plain(Plan::CopyIn(destination, format), false))
        }
        Statement::Copy {
            source,
            to: true,
            target: sqlparser::ast::CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } => {
            let binary = options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyOption::Format(f) if f.value.eq_ignore_ascii_case("binary"))
            }) || legacy_options
                .iter()
                .any(|o| matches!(o, sqlparser::ast::CopyLegacyOption::Binary));
            let header = options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyOption::Header(true))
            }) || legacy_options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyLegacyOption::Csv(csv) if csv.iter().any(|c| matches!(c, sqlparser::ast::CopyLegacyCsvOption::Header)))
            });
            let shard = match source {
                sqlparser::ast::CopySource::Table { table_name, .. } => {
                    let table = last_name(&table_name);
                    if topology.is_reference(&table) {
                        Some(Target::Any)
                    } else if topology.tables.contains_key(&table) {
                        None
                    } else {
                        Some(Target::Shard(0))
                    }
                }
                sqlparser::ast::CopySource::Query(query) => {
                    let inner = plan_sql(topology, &query.to_string())?;
                    match inner.into_iter().next() {
                        Some(Planned {
                            plan: Plan::Single(target @ (Target::Shard(_) | Target::Any)),
                            ..
                        }) => Some(target),
                        Some(Planned {
                            plan:
                                Plan::Scatter {
                                    shards: None,
                                    merge,
                                    write: false,
                                },
                            ..
                        }) if merge == MergeSpec::default() => None,
                        // Anything else the router runs itself and writes out as COPY.
                        Some(planned) if planned.returns_rows && !binary => {
                            return copy_query(planned, &options, &legacy_options, header);
                        }
                        _ => {
                            return unsupported(
                                "COPY (query) TO STDOUT of this query across shards (binary \
                                 format, or a statement without rows)",
                            );
                        }
                    }
                }
            };
            if binary && shard.is_none() {
                return unsupported(
                    "COPY TO STDOUT in binary format across shards (use text or csv)",
                );
            }
            Ok(plain(Plan::CopyOut(CopyOut { shard, header }), false))
        }
        Statement::Copy { .. } => unsupported("COPY other than FROM STDIN or TO STDOUT"),
        // Client statements live in the router's session, backend ones per pooled connection:
        // DEALLOCATE has nothing to free on the shards.
        Statement::Deallocate { .. } => Ok(plain(Plan::Deallocate, false)),
        Statement::Prepare { .. } | Statement::Execute { .. } => {
            unsupported("SQL-level PREPARE/EXECUTE (use the extended query protocol)")
        }
        Statement::Query(query) => plan_query(topology, *query, text),
        Statement::Insert(insert) => plan_insert(topology, insert, text),
        Statement::Update(update) => {
            let usage = table_use(topology, &update);
            let returns_rows = update.returning.is_some();
            let planned = plan_write(
                topology,
                usage,
                &update.table,
                update.selection.as_ref(),
                text,
                returns_rows,
            );
            bound_write_fallback(topology, planned, Statement::Update(update))
        }
        Statement::Delete(delete) => {
            let usage = table_use(topology, &delete);
            let returns_rows = delete.returning.is_some();
            let tables = match &delete.from {
                sqlparser::ast::FromTable::WithFromKeyword(t)
                | sqlparser::ast::FromTable::WithoutKeyword(t) => t.clone(),
            };
            let planned = match tables.first() {
                Some(table) => plan_write(
                    topology,
                    usage,
                    table,
                    delete.selection.as_ref(),
                    text,
                    returns_rows,
                ),
                None => unsupported("DELETE without a table"),
            };
            bound_write_fallback(topology, planned, Statement::Delete(delete))
        }
        Statement::Explain {
            describe_alias,
            analyze,
            verbose,
            query_plan,
            estimate,
            statement,
            format,
            options,
        } => {
            let inner_text = statement.to_string();
            let inner = plan_statement(topology, *statement, inner_text)?;
            let (shards, merge, write) = match inner.plan {
                Plan::Single(target) => return Ok(plain(Plan::Single(target), true)),
                Plan::Scatter {
                    shards,
                    merge,
                    write,
                } => (shards, merge, write),
                _ => return unsupported("EXPLAIN of this multi-shard statement"),
            };
            let options_text: Vec<String> = options
                .iter()
                .flatten()
                .map(|o| o.to_string().to_ascii_lowercase())
                .collect();
            let analyzing = analyze
                || options_text.iter().any(|o| {
                    o.starts_with("analyze")
                        && !(o.ends_with("false") || o.ends_with("off") || o.ends_with(" 0"))
                });
            if analyzing && write {
                return unsupported(
                    "EXPLAIN ANALYZE of a multi-shard write (it would write outside the \
                     router's two-phase commit)",
                );
            }
            if format.is_some() || options_text.iter().any(|o| o.starts_with("format")) {
                return unsupported(
                    "EXPLAIN of a multi-shard statement in a format other than text",
                );
            }
            let shard_statement = Parser::parse_sql(&PostgreSqlDialect {}, &inner.sql)
                .map_err(|e| PlanError::Syntax(e.to_string()))?
                .pop()
                .ok_or_else(|| PlanError::Syntax("empty statement".into()))?;
            let explain = Statement::Explain {
                describe_alias,
                analyze,
                verbose,
                query_plan,
                estimate,
                statement: Box::new(shard_statement),
                format,
                options,
            };
            let mut summary = vec![match &shards {
                Some(list) => format!(
                    "pg-router: {} on {} shards",
                    kind_of(&merge, write),
                    list.len()
                ),
                None => format!("pg-router: {} on every shard", kind_of(&merge, write)),
            }];
            summary.push(format!("  Statement on each shard: {}", inner.sql));
            if let Some(finalize) = &merge.finalize {
                summary.push(format!(
                    "  Then over the merged groups, on one shard: {}",
                    finalize.sql
                ));
            }
            Ok(plain(
                Plan::Explain(Box::new(ExplainScatter {
                    sql: explain.to_string(),
                    shards,
                    summary,
                })),
                true,
            ))
        }
        _ => {
            let keyword = first_keyword(&text);
            match keyword.as_str() {
                "CREATE" | "ALTER" | "DROP" | "TRUNCATE" | "GRANT" | "REVOKE" | "COMMENT" => {
                    Ok(plain(Plan::Broadcast, false))
                }
                "VACUUM" | "ANALYZE" => Ok(plain(Plan::Broadcast, false)),
                "RESET" => Ok(plain(Plan::Setting, false)),
                _ => unsupported(format!("the {keyword} statement")),
            }
        }
    }
}

fn plan_write(
    topology: &Topology,
    usage: TableUse,
    table: &sqlparser::ast::TableWithJoins,
    selection: Option<&Expr>,
    text: String,
    returns_rows: bool,
) -> Result<Planned, PlanError> {
    let planned = |plan| {
        Ok(Planned {
            sql: text.clone(),
            plan,
            returns_rows,
        })
    };
    let TableFactor::Table { name, .. } = &table.relation else {
        return unsupported("UPDATE/DELETE of a derived table");
    };
    let target = last_name(name);
    if topology.is_reference(&target) {
        if !usage.sharded.is_empty() {
            return unsupported("writing a reference table from a sharded table");
        }
        return planned(Plan::Broadcast);
    }
    let Some(sharded) = topology.tables.get(&target) else {
        if !usage.sharded.is_empty() {
            return unsupported("writing an unsharded table from a sharded table");
        }
        return planned(Plan::Single(Target::Shard(0)));
    };
    let group = sharded.group;
    if usage.sharded.len() > 1 {
        // Only through WHERE subqueries co-located with the written table.
        let mut outer = HashMap::new();
        let alias = match &table.relation {
            TableFactor::Table {
                alias: Some(alias), ..
            } => normalize(&alias.name),
            _ => target.clone(),
        };
        outer.insert(alias, sharded.shard_key.clone());
        let pushed = selection.and_then(|selection| {
            colocated::pushed_down_tables(topology, [selection], &outer, group)
        });
        if !table.joins.is_empty() || pushed != Some(usage.sharded.len() - 1) {
            return unsupported("UPDATE/DELETE joining several sharded tables");
        }
    }
    let mut keys = Vec::new();
    if let Some(selection) = selection {
        let mut columns = HashMap::new();
        columns.insert(target.clone(), sharded.shard_key.clone());
        if let TableFactor::Table {
            alias: Some(alias), ..
        } = &table.relation
        {
            columns.insert(normalize(&alias.name), sharded.shard_key.clone());
        }
        keys = key_restriction(selection, &columns, topology.groups[group].key_type);
        if keys.is_empty() {
            let aliases: Vec<String> = columns.keys().cloned().collect();
            if let Some(lookup) = lookup_restriction(topology, selection, &target, &aliases, group)
            {
                return planned(Plan::Single(lookup));
            }
        }
    }
    route_keys(
        topology,
        group,
        keys,
        |target| planned(Plan::Single(target)),
        |shards| {
            planned(Plan::Scatter {
                shards,
                merge: MergeSpec::default(),
                write: true,
            })
        },
    )
}

fn route_keys<T>(
    topology: &Topology,
    group: usize,
    keys: Vec<KeyExpr>,
    single: impl FnOnce(Target) -> Result<T, PlanError>,
    scatter: impl FnOnce(Option<Vec<usize>>) -> Result<T, PlanError>,
) -> Result<T, PlanError> {
    match keys.as_slice() {
        [] => scatter(None),
        [KeyExpr::Param(param)] => single(Target::Param {
            param: *param,
            group,
        }),
        _ => {
            let mut shards = Vec::new();
            for key in &keys {
                match key {
                    KeyExpr::Literal(value) => {
                        let shard = shard_of(topology, group, value)?;
                        if !shards.contains(&shard) {
                            shards.push(shard);
                        }
                    }
                    KeyExpr::Param(_) => return scatter(None),
                }
            }
            if shards.len() == 1 {
                single(Target::Shard(shards[0]))
            } else {
                shards.sort();
                scatter(Some(shards))
            }
        }
    }
}

/// The shard of `value` in table group `group`.
pub fn shard_of(topology: &Topology, group: usize, value: &KeyValue) -> Result<usize, PlanError> {
    topology.groups[group]
        .vindex
        .shard_for(value)
        .map_err(|e| PlanError::NoShard(e.to_string()))
}

/// A literal or parameter as a key of type `key_type`.
fn key_expr(expr: &Expr, key_type: KeyType) -> Option<KeyExpr> {
    match expr {
        Expr::Nested(inner) => key_expr(inner, key_type),
        Expr::Cast { expr, .. } => key_expr(expr, key_type),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match key_expr(expr, key_type)? {
            KeyExpr::Literal(KeyValue::Int(v)) => Some(KeyExpr::Literal(KeyValue::Int(-v))),
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(KeyExpr::Param),
            Value::Number(n, _) if key_type == KeyType::Bigint => {
                n.parse().ok().map(|v| KeyExpr::Literal(KeyValue::Int(v)))
            }
            Value::SingleQuotedString(s) => match key_type {
                KeyType::Bigint => s
                    .trim()
                    .parse()
                    .ok()
                    .map(|v| KeyExpr::Literal(KeyValue::Int(v))),
                KeyType::Text => Some(KeyExpr::Literal(KeyValue::Text(s.clone()))),
            },
            _ => None,
        },
        _ => None,
    }
}

/// Is `expr` a reference to a shard-key column? `columns` maps table names and aliases to
/// their shard key.
fn is_key_column(expr: &Expr, columns: &HashMap<String, String>) -> bool {
    match expr {
        Expr::Nested(inner) => is_key_column(inner, columns),
        Expr::Identifier(ident) => {
            let name = normalize(ident);
            columns.values().any(|key| *key == name)
        }
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let table = normalize(&parts[parts.len() - 2]);
            let column = normalize(&parts[parts.len() - 1]);
            columns.get(&table).is_some_and(|key| *key == column)
        }
        _ => false,
    }
}

fn conjuncts(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut out = conjuncts(left);
            out.extend(conjuncts(right));
            out
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// Shard-key values the WHERE clause restricts the rows to (empty: no restriction).
fn key_restriction(
    selection: &Expr,
    columns: &HashMap<String, String>,
    key_type: KeyType,
) -> Vec<KeyExpr> {
    for conjunct in conjuncts(selection) {
        match conjunct {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                if is_key_column(left, columns)
                    && let Some(key) = key_expr(right, key_type)
                {
                    return vec![key];
                }
                if is_key_column(right, columns)
                    && let Some(key) = key_expr(left, key_type)
                {
                    return vec![key];
                }
            }
            Expr::In {
                expr,
                target: sqlparser::ast::InTarget::List(list),
                negated: false,
                ..
            } if is_key_column(expr, columns) => {
                let keys: Option<Vec<KeyExpr>> =
                    list.iter().map(|e| key_expr(e, key_type)).collect();
                if let Some(keys) = keys
                    && !keys.is_empty()
                {
                    return keys;
                }
            }
            _ => {}
        }
    }
    Vec::new()
}

/// An INSERT ... VALUES into a sharded table without its shard key: the router draws the keys
/// from the key column's sequence (serial or identity) on the first shard, one per row, and
/// routes the rows by them, as if the client had written them (`$n` after the client's own
/// parameters). The key column goes in with `OVERRIDING SYSTEM VALUE` (an identity column
/// `GENERATED ALWAYS` takes the drawn value).
fn plan_insert_drawing_keys(
    topology: &Topology,
    mut insert: Insert,
    table: &str,
    key: &str,
) -> Result<Planned, PlanError> {
    let refused = || {
        unsupported(format!(
            "INSERT into sharded table {table} without its shard key column {key} (other than \
             VALUES rows, whose keys the router draws from the column's sequence)"
        ))
    };
    if insert.columns.is_empty() {
        return unsupported(format!(
            "INSERT into sharded table {table} without a column list (name the columns, with \
             the shard key {key})"
        ));
    }
    let Some(source) = insert.source.as_mut() else {
        return refused();
    };
    let mut highest = 0;
    let _ = visit_expressions_mut(source.as_mut(), |expr| {
        if let Some(n) = placeholder_number(expr) {
            highest = highest.max(n);
        }
        ControlFlow::<()>::Continue(())
    });
    let SetExpr::Values(values) = source.body.as_mut() else {
        return refused();
    };
    let count = values.rows.len();
    for (i, row) in values.rows.iter_mut().enumerate() {
        row.content.push(Expr::value(Value::Placeholder(format!(
            "${}",
            highest + 1 + i
        ))));
    }
    insert
        .columns
        .push(ObjectName::from(vec![Ident::with_quote('"', key)]));
    insert.overriding = Some(sqlparser::ast::InsertOverriding::System);
    let text = Statement::Insert(insert.clone()).to_string();
    let inner = plan_insert(topology, insert, text)?;
    Ok(Planned {
        sql: inner.sql.clone(),
        returns_rows: inner.returns_rows,
        plan: Plan::DrawKeys(Box::new(DrawKeys {
            inner,
            table: table.to_string(),
            key: key.to_string(),
            first_param: highest + 1,
            count,
        })),
    })
}

/// INSERT ... SELECT whose rows the router moves: the SELECT (planned on its own) runs first,
/// then its rows go in as a COPY FROM STDIN, each to its shard (every shard for a reference
/// table, the first for an unsharded one), in one transaction, two-phase across shards.
fn plan_insert_select(
    topology: &Topology,
    mut insert: Insert,
    text: String,
) -> Result<Planned, PlanError> {
    if insert.on.is_some() {
        return unsupported("INSERT ... SELECT ... ON CONFLICT across shards");
    }
    if insert.returning.is_some() {
        return unsupported("INSERT ... SELECT ... RETURNING across shards");
    }
    let Some(mut source) = insert.source.take() else {
        return unsupported("INSERT without a source");
    };
    let mut source_params = Vec::new();
    Renumber::new(1, &mut source_params).apply(source.as_mut());
    let source_text = source.to_string();
    let source = plan_query(topology, *source, source_text)?;
    match &source.plan {
        Plan::Single(_) | Plan::Scatter { write: false, .. } | Plan::MultiStage(_) => {}
        _ => return unsupported("this INSERT ... SELECT source across shards"),
    }
    let TableObject::TableName(name) = &insert.table else {
        return unsupported("INSERT into a table function");
    };
    let columns: Vec<String> = insert
        .columns
        .iter()
        .map(|c| quote_ident(&last_name(c)))
        .collect();
    let mut copy_sql = format!("COPY {name}");
    if !columns.is_empty() {
        copy_sql.push_str(&format!(" ({})", columns.join(", ")));
    }
    copy_sql.push_str(" FROM STDIN");
    let copy = plan_sql(topology, &copy_sql)?.pop();
    let Some(Planned {
        plan: Plan::CopyIn(destination, format),
        ..
    }) = copy
    else {
        return unsupported("INSERT ... SELECT into this table across shards");
    };
    Ok(Planned {
        sql: text,
        plan: Plan::InsertSelect(Box::new(InsertSelect {
            source,
            source_params,
            copy_sql,
            destination,
            format,
        })),
        returns_rows: false,
    })
}

fn plan_insert(topology: &Topology, insert: Insert, text: String) -> Result<Planned, PlanError> {
    let TableObject::TableName(name) = &insert.table else {
        return unsupported("INSERT into a table function");
    };
    let table = last_name(name);
    let returns_rows = insert.returning.is_some();
    let planned = |plan| {
        Ok(Planned {
            sql: text.clone(),
            plan,
            returns_rows,
        })
    };
    let source_usage = insert
        .source
        .as_ref()
        .map(|s| table_use(topology, s.as_ref()));
    let from_query = insert
        .source
        .as_ref()
        .is_some_and(|source| !matches!(source.body.as_ref(), SetExpr::Values(_)));
    // INSERT ... SELECT reading sharded tables, or into a sharded table: the router reads the
    // rows and copies them in, each to its shard.
    if from_query
        && (source_usage.as_ref().is_some_and(|u| !u.sharded.is_empty())
            || topology.tables.contains_key(&table))
    {
        return plan_insert_select(topology, insert, text);
    }
    if source_usage.is_some_and(|u| !u.sharded.is_empty()) {
        return unsupported("INSERT ... VALUES with a subquery over a sharded table");
    }
    if topology.is_reference(&table) {
        return planned(Plan::Broadcast);
    }
    let Some(sharded) = topology.tables.get(&table) else {
        return planned(Plan::Single(Target::Shard(0)));
    };
    let group = sharded.group;
    let key_type = topology.groups[group].key_type;
    let Some(position) = insert
        .columns
        .iter()
        .position(|c| last_name(c) == sharded.shard_key)
    else {
        return plan_insert_drawing_keys(topology, insert, &table, &sharded.shard_key);
    };
    let Some(source) = &insert.source else {
        return unsupported("INSERT without VALUES into a sharded table");
    };
    let SetExpr::Values(values) = source.body.as_ref() else {
        return unsupported("INSERT ... SELECT into a sharded table");
    };
    let mut keys = Vec::with_capacity(values.rows.len());
    for row in &values.rows {
        let Some(expr) = row.get(position) else {
            return unsupported("a VALUES row shorter than the column list");
        };
        match key_expr(expr, key_type) {
            Some(key) => keys.push(key),
            None => {
                return unsupported(format!(
                    "a shard key value that is not a literal or a parameter ({expr})"
                ));
            }
        }
    }
    let mut lookups = Vec::new();
    for (column, lookup_table) in &sharded.lookups {
        match insert.columns.iter().position(|c| last_name(c) == *column) {
            Some(position) => lookups.push((position, lookup_table.clone())),
            None => {
                return unsupported(format!(
                    "INSERT into {table} without its lookup vindex column {column}"
                ));
            }
        }
    }
    lookups.sort();
    if !lookups.is_empty() && insert.on.is_some() {
        return unsupported("ON CONFLICT on a table with a lookup vindex");
    }
    if let [KeyExpr::Param(param)] = keys.as_slice()
        && lookups.is_empty()
    {
        return planned(Plan::Single(Target::Param {
            param: *param,
            group,
        }));
    }
    if lookups.is_empty() && keys.iter().all(|k| matches!(k, KeyExpr::Literal(_))) {
        let mut shards = Vec::new();
        for key in &keys {
            if let KeyExpr::Literal(value) = key {
                let shard = shard_of(topology, group, value)?;
                if !shards.contains(&shard) {
                    shards.push(shard);
                }
            }
        }
        if shards.len() == 1 {
            return planned(Plan::Single(Target::Shard(shards[0])));
        }
    }
    planned(Plan::Insert(InsertSplit {
        group,
        keys,
        template: Box::new(insert),
        lookups,
        key_position: position,
    }))
}

/// The per-shard statements of a split INSERT: `rows_by_shard` gives each shard's row indexes.
/// Parameters are renumbered per statement; the result gives, per shard, the SQL and the
/// (0-based) indexes of the original parameters it uses, in their new order.
pub fn render_insert_part(template: &Insert, rows: &[usize]) -> (String, Vec<usize>) {
    let mut insert = template.clone();
    let mut used: Vec<usize> = Vec::new();
    if let Some(source) = insert.source.as_mut()
        && let SetExpr::Values(values) = source.body.as_mut()
    {
        let kept: Vec<_> = rows.iter().map(|i| values.rows[*i].clone()).collect();
        values.rows = kept;
        Renumber::new(1, &mut used).apply(&mut values.rows);
    }
    (Statement::Insert(insert).to_string(), used)
}

/// The INSERT that records the rows of a split insert in a lookup table: `(value, key)` from
/// the given VALUES positions; parameters renumbered as in [`render_insert_part`].
pub fn render_lookup_insert(
    split: &InsertSplit,
    value_position: usize,
    lookup_table: &str,
) -> (String, Vec<usize>) {
    let mut insert = (*split.template).clone();
    insert.table =
        TableObject::TableName(ObjectName::from(vec![Ident::with_quote('"', lookup_table)]));
    insert.columns = vec![
        ObjectName::from(vec![Ident::with_quote('"', "value")]),
        ObjectName::from(vec![Ident::with_quote('"', "key")]),
    ];
    insert.returning = None;
    insert.on = None;
    if let Some(source) = insert.source.as_mut()
        && let SetExpr::Values(values) = source.body.as_mut()
    {
        for row in values.rows.iter_mut() {
            let value = row.get(value_position).cloned();
            let key = row.get(split.key_position).cloned();
            if let (Some(value), Some(key)) = (value, key) {
                row.content = vec![value, key];
            }
        }
    }
    let rows: Vec<usize> = (0..split.keys.len()).collect();
    render_insert_part(&insert, &rows)
}

/// An aggregate the merger can combine across shards, as the merge it needs: `bool_and` and
/// `every` are the least of the shards' booleans (false < true), `bool_or` the greatest,
/// `any_value` any of them.
fn is_aggregate_name(name: &str) -> Option<&'static str> {
    match name {
        "count" => Some("count"),
        "sum" => Some("sum"),
        "min" | "bool_and" | "every" | "any_value" => Some("min"),
        "max" | "bool_or" => Some("max"),
        "avg" => Some("avg"),
        _ => None,
    }
}

/// PostgreSQL's built-in aggregates (`pg_aggregate`), so that those the merger cannot combine
/// are refused by name instead of being taken for plain functions (one row per shard).
const BUILTIN_AGGREGATES: &[&str] = &[
    "any_value",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "dense_rank",
    "every",
    "json_agg",
    "json_agg_strict",
    "json_arrayagg",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "json_objectagg",
    "jsonb_agg",
    "jsonb_agg_strict",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "max",
    "min",
    "mode",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "rank",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "xmlagg",
];

thread_local! {
    /// The topology's user-defined aggregates, for the planning under way on this thread.
    static USER_AGGREGATES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Is `function` a call of an aggregate, PostgreSQL's own or one the shards define (not a
/// window function)?
fn is_aggregate_call(function: &sqlparser::ast::Function) -> bool {
    if function.over.is_some() {
        return false;
    }
    let name = last_name(&function.name);
    BUILTIN_AGGREGATES.contains(&name.as_str())
        || USER_AGGREGATES.with(|user| user.borrow().contains(&name))
}

/// Does `expr` call an aggregate or a window function (of its own query level, not inside a
/// subquery)?
fn contains_aggregate(expr: &Expr) -> bool {
    struct Finder {
        depth: usize,
        found: bool,
    }
    impl sqlparser::ast::Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if self.depth == 0
                && let Expr::Function(f) = expr
                && (is_aggregate_call(f) || f.over.is_some())
            {
                self.found = true;
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder {
        depth: 0,
        found: false,
    };
    let _ = sqlparser::ast::Visit::visit(expr, &mut finder);
    finder.found
}

/// Does `expr` call a window function?
fn contains_window(expr: &Expr) -> bool {
    let mut found = false;
    let mut copy = expr.clone();
    let _ = visit_expressions_mut(&mut copy, |e| {
        if let Expr::Function(f) = e
            && f.over.is_some()
        {
            found = true;
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// An aggregate call at the top of an expression: (name, distinct?).
fn top_aggregate(expr: &Expr) -> Option<(&'static str, bool)> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let name = is_aggregate_name(&last_name(&function.name))?;
    if function.over.is_some() || function.filter.is_some() {
        return None;
    }
    let distinct = matches!(
        &function.args,
        FunctionArguments::List(list) if list.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct)
    );
    Some((name, distinct))
}

/// The one plain argument of a function call (`x` of `count(DISTINCT x)`).
fn sole_argument(expr: &Expr) -> Option<Expr> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let FunctionArguments::List(list) = &function.args else {
        return None;
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(argument))] if list.clauses.is_empty() => {
            Some(argument.clone())
        }
        _ => None,
    }
}

fn with_function_name(expr: &Expr, name: &str) -> Expr {
    let mut expr = expr.clone();
    if let Expr::Function(function) = &mut expr {
        function.name = ObjectName::from(vec![Ident::new(name)]);
    }
    expr
}

fn count_of(expr: &Expr) -> Expr {
    let mut expr = with_function_name(expr, "count");
    if let Expr::Function(function) = &mut expr
        && let FunctionArguments::List(list) = &mut function.args
        && list.args.is_empty()
    {
        list.args
            .push(FunctionArg::Unnamed(FunctionArgExpr::Wildcard));
    }
    expr
}

fn literal_u64(expr: &Expr) -> Option<u64> {
    match expr {
        Expr::Value(value) => match &value.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

fn literal_value(expr: &Expr) -> Option<values::Value> {
    match expr {
        Expr::Nested(inner) => literal_value(inner),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match literal_value(expr)? {
            values::Value::Int(v) => Some(values::Value::Int(-v)),
            values::Value::Numeric(mut d) => {
                d.mantissa = -d.mantissa;
                Some(values::Value::Numeric(d))
            }
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            Value::Number(n, _) => n
                .parse::<i64>()
                .ok()
                .map(values::Value::Int)
                .or_else(|| values::Decimal::parse(n).map(values::Value::Numeric)),
            Value::SingleQuotedString(s) => Some(values::Value::Bytes(s.clone().into_bytes())),
            Value::Boolean(b) => Some(values::Value::Bool(*b)),
            _ => None,
        },
        _ => None,
    }
}

/// Builder of the rewritten projection of a scatter-gather aggregate query.
struct AggregateRewrite {
    projection: Vec<SelectItem>,
    merges: Vec<ColumnMerge>,
    hidden: usize,
    /// Expression text -> column, for ORDER BY / HAVING resolution.
    by_text: HashMap<String, usize>,
}

impl AggregateRewrite {
    fn push_hidden(&mut self, expr: Expr, merge: ColumnMerge) -> usize {
        let index = self.projection.len();
        self.by_text.insert(expr.to_string(), index);
        self.projection.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("__pgr_{index}")),
        });
        self.merges.push(merge);
        self.hidden += 1;
        index
    }

    /// The column of a HAVING / ORDER BY expression, adding a hidden one if needed.
    fn column_for(&mut self, expr: &Expr, groups: &[String]) -> Result<usize, PlanError> {
        if let Some(index) = self.by_text.get(&expr.to_string()) {
            return Ok(*index);
        }
        match top_aggregate(expr) {
            Some((_, true)) => unsupported("DISTINCT aggregates across shards"),
            Some(("avg", _)) => unsupported("avg() in HAVING/ORDER BY unless it is also selected"),
            Some((name, _)) => {
                let merge = match name {
                    "count" => ColumnMerge::Count,
                    "sum" => ColumnMerge::Sum,
                    "min" => ColumnMerge::Min,
                    _ => ColumnMerge::Max,
                };
                Ok(self.push_hidden(expr.clone(), merge))
            }
            None if groups.contains(&expr.to_string()) => {
                Ok(self.push_hidden(expr.clone(), ColumnMerge::Group))
            }
            None => unsupported(format!(
                "the expression {expr} over aggregates across shards"
            )),
        }
    }
}

fn having_of(
    expr: &Expr,
    rewrite: &mut AggregateRewrite,
    groups: &[String],
) -> Result<Having, PlanError> {
    match expr {
        Expr::Nested(inner) => having_of(inner, rewrite, groups),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Having::Not(Box::new(having_of(expr, rewrite, groups)?))),
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::And => Ok(Having::And(
                Box::new(having_of(left, rewrite, groups)?),
                Box::new(having_of(right, rewrite, groups)?),
            )),
            BinaryOperator::Or => Ok(Having::Or(
                Box::new(having_of(left, rewrite, groups)?),
                Box::new(having_of(right, rewrite, groups)?),
            )),
            BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq => {
                let operand =
                    |e: &Expr, rewrite: &mut AggregateRewrite| -> Result<Operand, PlanError> {
                        match literal_value(e) {
                            Some(value) => Ok(Operand::Literal(value)),
                            None => Ok(Operand::Column(rewrite.column_for(e, groups)?)),
                        }
                    };
                let l = operand(left, rewrite)?;
                let r = operand(right, rewrite)?;
                Ok(Having::Compare(l, op.clone(), r))
            }
            _ => unsupported(format!("the HAVING operator {op} across shards")),
        },
        _ => unsupported(format!("the HAVING condition {expr} across shards")),
    }
}

struct FromAnalysis {
    /// Sharded table name or alias -> shard key.
    key_columns: HashMap<String, String>,
    /// Table group of the sharded tables.
    group: usize,
}

/// Checks that all sharded tables of the FROM clause are one table group, joined on their
/// shard keys (co-located), and returns their names/aliases.
fn analyze_from(topology: &Topology, select: &Select) -> Result<FromAnalysis, PlanError> {
    analyze_from_with(topology, select, false)
}

/// [`analyze_from`]; with `derived_checked`, subqueries in FROM may read sharded tables (the
/// caller checks them on their own).
fn analyze_from_with(
    topology: &Topology,
    select: &Select,
    derived_checked: bool,
) -> Result<FromAnalysis, PlanError> {
    let mut aliases: Vec<(String, String, usize)> = Vec::new(); // (alias, key, group)
    let mut join_conditions: Vec<&Expr> = Vec::new();
    let visit_factor = |factor: &TableFactor,
                        aliases: &mut Vec<(String, String, usize)>|
     -> Result<(), PlanError> {
        match factor {
            TableFactor::Table { name, alias, .. } => {
                let table = last_name(name);
                if let Some(sharded) = topology.tables.get(&table) {
                    let alias = alias.as_ref().map(|a| normalize(&a.name)).unwrap_or(table);
                    aliases.push((alias, sharded.shard_key.clone(), sharded.group));
                }
                Ok(())
            }
            TableFactor::Derived { subquery, .. } => {
                if derived_checked || table_use(topology, subquery.as_ref()).sharded.is_empty() {
                    Ok(())
                } else {
                    unsupported("a subquery over a sharded table in FROM of a multi-shard query")
                }
            }
            _ => Ok(()),
        }
    };
    for table in &select.from {
        visit_factor(&table.relation, &mut aliases)?;
        for join in &table.joins {
            visit_factor(&join.relation, &mut aliases)?;
            let constraint = match &join.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c) => Some(c),
                _ => None,
            };
            if let Some(JoinConstraint::On(expr)) = constraint {
                join_conditions.push(expr);
            }
        }
    }
    let Some((_, _, group)) = aliases.first().cloned() else {
        return unsupported("a query without sharded tables in FROM");
    };
    if aliases.iter().any(|(_, _, g)| *g != group) {
        return unsupported("a join of sharded tables from different table groups");
    }
    if aliases.len() > 1 {
        // Union-find over aliases connected by key = key equalities.
        let mut parent: Vec<usize> = (0..aliases.len()).collect();
        fn find(parent: &mut Vec<usize>, i: usize) -> usize {
            if parent[i] != i {
                let root = find(parent, parent[i]);
                parent[i] = root;
            }
            parent[i]
        }
        let alias_of = |expr: &Expr| -> Option<usize> {
            if let Expr::CompoundIdentifier(parts) = expr
                && parts.len() >= 2
            {
                let table = normalize(&parts[parts.len() - 2]);
                let column = normalize(&parts[parts.len() - 1]);
                return aliases
                    .iter()
                    .position(|(a, k, _)| *a == table && *k == column);
            }
            None
        };
        let mut all: Vec<&Expr> = Vec::new();
        for condition in &join_conditions {
            all.extend(conjuncts(condition));
        }
        if let Some(selection) = &select.selection {
            all.extend(conjuncts(selection));
        }
        for expr in all {
            if let Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } = expr
                && let (Some(a), Some(b)) = (alias_of(left), alias_of(right))
            {
                let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                parent[ra] = rb;
            }
        }
        let root = find(&mut parent, 0);
        for i in 1..aliases.len() {
            if find(&mut parent, i) != root {
                return unsupported(
                    "a join of sharded tables that is not on their shard keys (co-located joins need a.key = b.key)",
                );
            }
        }
    }
    Ok(FromAnalysis {
        key_columns: aliases.into_iter().map(|(a, k, _)| (a, k)).collect(),
        group,
    })
}

fn plan_query(topology: &Topology, query: Query, text: String) -> Result<Planned, PlanError> {
    let usage = table_use(topology, &query);
    let single = |target| {
        Ok(Planned {
            sql: text.clone(),
            plan: Plan::Single(target),
            returns_rows: true,
        })
    };
    if query.locks.is_empty() && usage.sharded.is_empty() {
        return if usage.other > 0 {
            single(Target::Shard(0))
        } else {
            single(Target::Any)
        };
    }
    if usage.sharded.is_empty() {
        return single(if usage.other > 0 {
            Target::Shard(0)
        } else {
            Target::Any
        });
    }
    // WITH, UNION, subqueries: the whole statement runs on one shard when every sharded table
    // in it is restricted to keys of that shard (a Citus "router query").
    if !pinned::is_flat(topology, &query, &usage)
        && let Some(target) = pinned::one_shard(topology, &query)
    {
        return single(target);
    }
    // WITH queries and FROM subqueries over sharded tables, read by a statement that reads no
    // sharded table itself: they run first.
    if let Some(planned) = intermediate::plan(topology, query.clone())? {
        return Ok(planned);
    }
    if usage.other > 0 {
        return unsupported("a query joining sharded tables with tables the router does not know");
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        // Unions that merge stream from the shards; other set operations run in stages.
        return match set_operation::plan_union(topology, query.clone()) {
            Err(PlanError::Unsupported(reason)) => {
                intermediate::plan_set_operation(topology, query)?
                    .ok_or(PlanError::Unsupported(reason))
            }
            planned => planned,
        };
    };
    if query.with.is_some() {
        return unsupported("WITH over sharded tables");
    }
    let from = match analyze_from(topology, select) {
        Ok(from) => from,
        // Sharded tables joined off their shard keys: all but the first go to every shard.
        Err(PlanError::Unsupported(reason)) => {
            return intermediate::broadcast_join(topology, query)?
                .ok_or(PlanError::Unsupported(reason));
        }
        Err(error) => return Err(error),
    };
    // Sharded tables must all be in the top-level FROM, or in subqueries (WHERE, select list)
    // co-located with it (pushed down whole).
    let top_level = from.key_columns.len();
    if usage.sharded.len() != top_level {
        let pushed = colocated::pushed_down_tables(
            topology,
            select.selection.iter().chain(projection_exprs(select)),
            &from.key_columns,
            from.group,
        );
        if pushed != Some(usage.sharded.len() - top_level) {
            // Uncorrelated ones run first, their answers bound as parameters.
            if let Some(planned) = bound::plan(topology, query.clone())? {
                return Ok(planned);
            }
            return unsupported("a subquery over a sharded table");
        }
    }
    let key_type = topology.groups[from.group].key_type;
    let keys = select
        .selection
        .as_ref()
        .map(|s| key_restriction(s, &from.key_columns, key_type))
        .unwrap_or_default();
    if keys.is_empty()
        && usage.sharded.len() == 1
        && let Some(selection) = &select.selection
    {
        let aliases: Vec<String> = from.key_columns.keys().cloned().collect();
        if let Some(lookup) =
            lookup_restriction(topology, selection, &usage.sharded[0], &aliases, from.group)
        {
            return single(lookup);
        }
    }
    let shards = match route_keys(
        topology,
        from.group,
        keys,
        |target| Ok(Err(target)),
        |shards| Ok(Ok(shards)),
    )? {
        Err(target) => return single(target),
        Ok(shards) => shards,
    };
    let original = query.clone();
    let planned = if !is_aggregate_query(&query) {
        plan_scatter_select(query, shards)
    } else {
        let mut query = query;
        group_by_positions(&mut query);
        // Aggregates the merger finishes itself, or else with a final statement over the merged
        // groups (expressions over aggregates, HAVING and ORDER BY beyond plain comparisons).
        match plan_scatter_select(query.clone(), shards.clone()) {
            Err(PlanError::Unsupported(_)) => finalize::plan(query, shards),
            planned => planned,
        }
    };
    // What neither merges (window functions, DISTINCT ON, aggregates such as string_agg or
    // stddev) runs over the table's matching rows, pulled from the shards first.
    match planned {
        Err(PlanError::Unsupported(reason)) => {
            intermediate::pull_up(topology, original)?.ok_or(PlanError::Unsupported(reason))
        }
        planned => planned,
    }
}

/// Parses SQL the planner writes itself (a rewritten statement, a final statement) as a query.
fn parse_query(sql: &str) -> Result<Query, PlanError> {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| PlanError::Syntax(e.to_string()))?
        .pop()
    {
        Some(Statement::Query(query)) => Ok(*query),
        _ => unsupported("a subquery"),
    }
}

/// The number `n` of a bind parameter `$n` (n >= 1).
fn placeholder_number(expr: &Expr) -> Option<usize> {
    let Expr::Value(value) = expr else {
        return None;
    };
    let Value::Placeholder(p) = &value.value else {
        return None;
    };
    p.strip_prefix('$')?.parse().ok().filter(|n| *n >= 1)
}

/// Renumbers the `$k` of a statement's parts from `first` on, in order of first use, and
/// records which client parameter (0-based) each new number stands for: a statement sent with
/// parameters it does not use would fail on the shard (their types cannot be determined).
struct Renumber<'a> {
    /// The first new number.
    first: usize,
    /// Old number -> new number.
    new: HashMap<usize, usize>,
    /// The client parameter (0-based) of each new number, in order.
    used: &'a mut Vec<usize>,
}

impl<'a> Renumber<'a> {
    /// Numbers from `first` on, recording into `used`.
    fn new(first: usize, used: &'a mut Vec<usize>) -> Self {
        Self {
            first,
            new: HashMap::new(),
            used,
        }
    }

    fn apply<V: sqlparser::ast::VisitMut>(&mut self, node: &mut V) {
        let _ = visit_expressions_mut(node, |expr| {
            if let Some(n) = placeholder_number(expr) {
                let next = self.first + self.new.len();
                let new = *self.new.entry(n).or_insert_with(|| {
                    self.used.push(n - 1);
                    next
                });
                *expr = Expr::value(Value::Placeholder(format!("${new}")));
            }
            ControlFlow::<()>::Continue(())
        });
    }
}

/// The sharded table a DDL statement creates or alters (`CREATE TABLE`, `ALTER TABLE`), as
/// written (schema-qualified if it was): its new sequences get per-shard ranges.
pub fn sharded_table_of_ddl(topology: &Topology, sql: &str) -> Option<String> {
    let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?.pop()?;
    let name = match &statement {
        Statement::CreateTable(create) => &create.name,
        Statement::AlterTable(alter) => &alter.name,
        _ => return None,
    };
    topology
        .tables
        .contains_key(&last_name(name))
        .then(|| name.to_string())
}

/// An UPDATE/DELETE refused for its WHERE subqueries over sharded tables: with uncorrelated
/// ones run first and bound as parameters, if that plans.
fn bound_write_fallback(
    topology: &Topology,
    planned: Result<Planned, PlanError>,
    statement: Statement,
) -> Result<Planned, PlanError> {
    match planned {
        Err(PlanError::Unsupported(reason)) => {
            bound::plan_write(topology, statement)?.ok_or(PlanError::Unsupported(reason))
        }
        planned => planned,
    }
}

/// `GROUP BY 1, 2` names select-list items: the merger and the final statement need the
/// expressions themselves.
fn group_by_positions(query: &mut Query) {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return;
    };
    let projection = select.projection.clone();
    if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
        for expr in exprs {
            if let Some(n) = literal_u64(expr)
                && n >= 1
                && let Some(
                    SelectItem::UnnamedExpr(item) | SelectItem::ExprWithAlias { expr: item, .. },
                ) = projection.get(n as usize - 1)
            {
                *expr = item.clone();
            }
        }
    }
}

/// The expressions of a select list (not its `*`s).
fn projection_exprs(select: &Select) -> impl Iterator<Item = &Expr> {
    select.projection.iter().filter_map(|item| match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    })
}

/// A plain GROUP BY's expressions (ROLLUP, CUBE, GROUPING SETS and GROUP BY ALL are refused).
fn plain_group_by(select: &Select) -> Result<Vec<Expr>, PlanError> {
    if grouping_sets(select) {
        return unsupported("GROUP BY ROLLUP/CUBE/GROUPING SETS across shards");
    }
    match &select.group_by {
        GroupByExpr::Expressions(exprs, _) => Ok(exprs.clone()),
        GroupByExpr::All(_) => unsupported("GROUP BY ALL"),
    }
}

/// GROUP BY ROLLUP / CUBE / GROUPING SETS (or `WITH ROLLUP`-style modifiers)?
fn grouping_sets(select: &Select) -> bool {
    match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            !modifiers.is_empty()
                || exprs
                    .iter()
                    .any(|e| matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
        }
        GroupByExpr::All(_) => false,
    }
}

/// A SELECT with GROUP BY or aggregates.
fn is_aggregate_query(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let grouped =
        !matches!(&select.group_by, GroupByExpr::Expressions(exprs, _) if exprs.is_empty());
    grouped || select.having.is_some() || projection_exprs(select).any(contains_aggregate)
}

/// LIMIT and OFFSET of a multi-shard query, as numbers (the merger applies them).
/// LIMIT and OFFSET (or FETCH FIRST) of a multi-shard query: numbers, or bind parameters the
/// executor reads before merging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Paging {
    limit: Option<u64>,
    offset: u64,
    /// `LIMIT $n` / `FETCH FIRST $n ROWS ONLY`: parameter number (1-based).
    limit_param: Option<usize>,
    /// `OFFSET $n`.
    offset_param: Option<usize>,
}

impl Paging {
    /// Fills the merge's paging.
    fn apply(&self, merge: &mut MergeSpec) {
        merge.limit = self.limit;
        merge.offset = self.offset;
        merge.limit_param = self.limit_param;
        merge.offset_param = self.offset_param;
    }
}

fn paging(query: &Query) -> Result<Paging, PlanError> {
    let mut paging = Paging::default();
    let bound = |expr: &Expr, what: &str| -> Result<(Option<u64>, Option<usize>), PlanError> {
        if let Some(n) = literal_u64(expr) {
            return Ok((Some(n), None));
        }
        if let Some(n) = placeholder_number(expr) {
            return Ok((None, Some(n)));
        }
        unsupported(format!(
            "{what} that is not a number or a parameter in a multi-shard query"
        ))
    };
    match &query.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return unsupported("LIMIT BY");
            }
            if let Some(expr) = limit
                && !matches!(expr, Expr::Value(v) if v.value == Value::Null)
            {
                (paging.limit, paging.limit_param) = bound(expr, "a LIMIT")?;
            }
            if let Some(Offset { value, .. }) = offset {
                let (number, param) = bound(value, "an OFFSET")?;
                paging.offset = number.unwrap_or(0);
                paging.offset_param = param;
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => return unsupported("LIMIT offset, count"),
    }
    if let Some(fetch) = &query.fetch {
        if fetch.with_ties || fetch.percent {
            return unsupported("FETCH FIRST ... WITH TIES or PERCENT in a multi-shard query");
        }
        (paging.limit, paging.limit_param) = match &fetch.quantity {
            None => (Some(1), None),
            Some(expr) => bound(expr, "a FETCH FIRST count")?,
        };
    }
    Ok(paging)
}

/// What each shard is asked for: the first `limit + offset` rows (the merger skips the offset).
fn shard_limit(paging: &Paging) -> Option<LimitClause> {
    let number = |n: u64| Expr::value(Value::Number(n.to_string(), false));
    let param = |n: usize| Expr::Cast {
        kind: sqlparser::ast::CastKind::DoubleColon,
        expr: Box::new(Expr::value(Value::Placeholder(format!("${n}")))),
        data_type: sqlparser::ast::DataType::BigInt(None),
        format: None,
    };
    if let (Some(limit), None) = (paging.limit, paging.offset_param) {
        return limit_clause(number(limit + paging.offset));
    }
    let limit = match (paging.limit, paging.limit_param) {
        (Some(n), _) => number(n),
        (None, Some(p)) => param(p),
        (None, None) => return None,
    };
    let offset = match (paging.offset, paging.offset_param) {
        (_, Some(p)) => param(p),
        (0, None) => return limit_clause(limit),
        (n, None) => number(n),
    };
    limit_clause(Expr::Nested(Box::new(Expr::BinaryOp {
        left: Box::new(limit),
        op: BinaryOperator::Plus,
        right: Box::new(offset),
    })))
}

fn limit_clause(limit: Expr) -> Option<LimitClause> {
    Some(LimitClause::LimitOffset {
        limit: Some(limit),
        offset: None,
        limit_by: Vec::new(),
    })
}

fn plan_scatter_select(mut query: Query, shards: Option<Vec<usize>>) -> Result<Planned, PlanError> {
    let paging = paging(&query)?;
    query.fetch = None;
    let order_exprs = match &query.order_by {
        None => Vec::new(),
        Some(order) => match &order.kind {
            OrderByKind::Expressions(exprs) => exprs.clone(),
            OrderByKind::All(_) => return unsupported("ORDER BY ALL"),
        },
    };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return unsupported("a set operation");
    };
    let groups = plain_group_by(select)?;
    let has_aggregates =
        projection_exprs(select).any(contains_aggregate) || select.having.is_some();
    let distinct = match &select.distinct {
        None | Some(Distinct::All) => false,
        Some(Distinct::Distinct) => true,
        Some(Distinct::On(_)) => return unsupported("DISTINCT ON across shards"),
    };
    let mut merge = MergeSpec {
        distinct,
        ..MergeSpec::default()
    };
    paging.apply(&mut merge);
    let wildcard = select.projection.iter().any(|item| {
        matches!(
            item,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    });

    if has_aggregates || !groups.is_empty() {
        if wildcard {
            return unsupported("* with GROUP BY or aggregates across shards");
        }
        let group_texts: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let mut rewrite = AggregateRewrite {
            projection: Vec::new(),
            merges: Vec::new(),
            hidden: 0,
            by_text: HashMap::new(),
        };
        let mut avg_columns = Vec::new();
        // Arguments of count(DISTINCT ...): the shards group by them too.
        let mut distinct_groups: Vec<Expr> = Vec::new();
        let mut aliases: HashMap<String, usize> = HashMap::new();
        for item in &select.projection {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.clone())),
                _ => return unsupported("this projection across shards"),
            };
            let index = rewrite.projection.len();
            if let Some(alias) = &alias {
                aliases.insert(normalize(alias), index);
            }
            rewrite.by_text.insert(expr.to_string(), index);
            let (shard_expr, merge_kind) = match top_aggregate(expr) {
                Some(("count", true)) => {
                    let argument = sole_argument(expr).ok_or_else(|| {
                        PlanError::Unsupported(
                            "count(DISTINCT ...) of several expressions across shards".into(),
                        )
                    })?;
                    distinct_groups.push(argument.clone());
                    (argument, ColumnMerge::CountDistinct)
                }
                Some((_, true)) => {
                    return unsupported(
                        "DISTINCT aggregates other than count(DISTINCT ...) across shards",
                    );
                }
                Some(("count", _)) => (expr.clone(), ColumnMerge::Count),
                Some(("sum", _)) => (expr.clone(), ColumnMerge::Sum),
                Some(("min", _)) => (expr.clone(), ColumnMerge::Min),
                Some(("max", _)) => (expr.clone(), ColumnMerge::Max),
                Some(_) => {
                    avg_columns.push((index, count_of(expr)));
                    (
                        with_function_name(expr, "sum"),
                        ColumnMerge::Avg { count: 0 },
                    )
                }
                None if group_texts.contains(&expr.to_string()) => {
                    (expr.clone(), ColumnMerge::Group)
                }
                None if contains_aggregate(expr) => {
                    return unsupported(format!(
                        "the expression {expr} over aggregates across shards"
                    ));
                }
                None => {
                    return unsupported(format!("{expr} is neither grouped nor aggregated"));
                }
            };
            // Keep the client's column name: `sum(x)` for `avg(x)` would rename the column.
            let alias = alias.unwrap_or_else(|| Ident::with_quote('"', default_column_name(expr)));
            rewrite.projection.push(SelectItem::ExprWithAlias {
                expr: shard_expr,
                alias,
            });
            rewrite.merges.push(merge_kind);
        }
        for (index, count_expr) in avg_columns {
            let count = rewrite.push_hidden(count_expr, ColumnMerge::Helper);
            rewrite.merges[index] = ColumnMerge::Avg { count };
        }
        for group in &groups {
            if !rewrite.by_text.contains_key(&group.to_string()) {
                rewrite.push_hidden(group.clone(), ColumnMerge::Group);
            }
        }
        let having = match select.having.take() {
            Some(expr) => Some(having_of(&expr, &mut rewrite, &group_texts)?),
            None => None,
        };
        let mut order = Vec::new();
        for item in &order_exprs {
            let column = match literal_u64(&item.expr) {
                Some(n) if n >= 1 && (n as usize) <= select.projection.len() => n as usize - 1,
                _ => match &item.expr {
                    Expr::Identifier(ident) if aliases.contains_key(&normalize(ident)) => {
                        aliases[&normalize(ident)]
                    }
                    expr => rewrite.column_for(expr, &group_texts)?,
                },
            };
            order.push(sort_key(ColumnRef::Front(column), item));
        }
        merge.hidden = rewrite.hidden;
        merge.order = order;
        merge.aggregation = Some(Aggregation {
            columns: rewrite.merges,
            having,
            global: groups.is_empty(),
        });
        if !distinct_groups.is_empty() {
            // Sub-groups by the counted values: every other aggregate still merges exactly
            // (counts and sums add up, extremes compare), and each value reaches the merger.
            let mut by = groups.clone();
            for expr in distinct_groups {
                if !by.contains(&expr) {
                    by.push(expr);
                }
            }
            select.group_by = GroupByExpr::Expressions(by, Vec::new());
        }
        select.projection = rewrite.projection;
        query.order_by = None;
        query.limit_clause = None;
    } else {
        // Plain rows: shards sort and limit (to limit + offset); the merger merges sorted
        // streams and applies OFFSET/LIMIT.
        let visible = select.projection.len();
        let mut hidden_exprs: Vec<Expr> = Vec::new();
        let mut order = Vec::new();
        for item in &order_exprs {
            let position = match literal_u64(&item.expr) {
                Some(n) if !wildcard && n >= 1 && (n as usize) <= visible => Some(n as usize - 1),
                _ => select.projection.iter().position(|p| match p {
                    SelectItem::UnnamedExpr(e) => !wildcard && *e == item.expr,
                    SelectItem::ExprWithAlias { expr, alias } => {
                        !wildcard
                            && (*expr == item.expr
                                || matches!(&item.expr, Expr::Identifier(i) if normalize(i) == normalize(alias)))
                    }
                    _ => false,
                }),
            };
            let column = match position {
                Some(i) => ColumnRef::Front(i),
                None => {
                    hidden_exprs.push(item.expr.clone());
                    ColumnRef::Back(0) // fixed below
                }
            };
            order.push((column, item.clone()));
        }
        let hidden = hidden_exprs.len();
        let mut next_hidden = 0;
        merge.order = order
            .into_iter()
            .map(|(column, item)| {
                let column = match column {
                    ColumnRef::Back(_) => {
                        next_hidden += 1;
                        ColumnRef::Back(hidden - next_hidden + 1)
                    }
                    front => front,
                };
                sort_key(column, &item)
            })
            .collect();
        merge.hidden = hidden;
        if distinct && hidden > 0 {
            return unsupported("SELECT DISTINCT ordered by a column that is not selected");
        }
        for (i, expr) in hidden_exprs.into_iter().enumerate() {
            select.projection.push(SelectItem::ExprWithAlias {
                expr,
                alias: Ident::new(format!("__pgr_order_{i}")),
            });
        }
        // Rewrite ORDER BY to positions of the (possibly hidden) columns only if we added
        // hidden columns: shards still sort by the original expressions.
        query.limit_clause = shard_limit(&paging);
    }
    if merge.limit_param.is_some() || merge.offset_param.is_some() {
        // The merger reads LIMIT/OFFSET parameters; the shards get only those they use (an
        // aggregate's shard statement has no LIMIT, and an unused parameter without a type
        // fails on the shard).
        let mut used = Vec::new();
        Renumber::new(1, &mut used).apply(&mut query);
        merge.shard_params = Some(used);
    }
    Ok(Planned {
        sql: query.to_string(),
        plan: Plan::Scatter {
            shards,
            merge,
            write: false,
        },
        returns_rows: true,
    })
}

fn sort_key(column: ColumnRef, item: &sqlparser::ast::OrderByExpr) -> SortKey {
    let descending = matches!(item.options.sort, Some(sqlparser::ast::OrderBySort::Desc));
    SortKey {
        column,
        descending,
        nulls_first: item.options.nulls_first.unwrap_or(descending),
    }
}

/// The column name PostgreSQL gives an unaliased expression (its `FigureColname`): a column's
/// or function's name, a cast's operand's name or else its type's, `case`, `array`, ... and
/// `?column?` for the rest.
fn default_column_name(expr: &Expr) -> String {
    figure_column_name(expr)
        .map(|(name, _)| name)
        .unwrap_or_else(|| "?column?".to_string())
}

/// A name and its strength (2: a column or function; 1: a type or keyword, which a cast's
/// operand of strength 2 overrides).
fn figure_column_name(expr: &Expr) -> Option<(String, u8)> {
    match expr {
        Expr::Function(function) => Some((last_name(&function.name), 2)),
        Expr::Identifier(ident) => Some((normalize(ident), 2)),
        Expr::CompoundIdentifier(parts) => parts.last().map(|p| (normalize(p), 2)),
        Expr::Nested(inner) | Expr::Collate { expr: inner, .. } => figure_column_name(inner),
        Expr::Cast {
            expr, data_type, ..
        } => match figure_column_name(expr) {
            Some((name, 2)) => Some((name, 2)),
            _ => Some((type_column_name(data_type), 1)),
        },
        Expr::Case { .. } => Some(("case".into(), 1)),
        Expr::Array(_) => Some(("array".into(), 2)),
        Expr::Tuple(_) => Some(("row".into(), 2)),
        Expr::Exists { .. } => Some(("exists".into(), 2)),
        Expr::Ceil { .. } => Some(("ceil".into(), 2)),
        Expr::Floor { .. } => Some(("floor".into(), 2)),
        Expr::Extract { .. } => Some(("extract".into(), 2)),
        Expr::Substring { .. } => Some(("substring".into(), 2)),
        Expr::Position { .. } => Some(("position".into(), 2)),
        Expr::Overlay { .. } => Some(("overlay".into(), 2)),
        _ => None,
    }
}

/// The name PostgreSQL shows for a cast's type: its internal name (`int4` for `integer`).
fn type_column_name(data_type: &sqlparser::ast::DataType) -> String {
    let text = data_type.to_string().to_ascii_lowercase();
    let base = text.split('(').next().unwrap_or("").trim();
    let name = match base {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "real" | "float4" => "float4",
        "float" | "double precision" | "float8" => "float8",
        "decimal" | "numeric" | "dec" => "numeric",
        "boolean" | "bool" => "bool",
        "character varying" | "varchar" => "varchar",
        "character" | "char" | "bpchar" => "bpchar",
        "timestamp with time zone" | "timestamptz" => "timestamptz",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "time with time zone" | "timetz" => "timetz",
        "time" | "time without time zone" => "time",
        other => other.rsplit('.').next().unwrap_or(other),
    };
    name.trim_matches('"').to_string()
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
