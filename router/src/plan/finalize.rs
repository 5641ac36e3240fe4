//! Aggregate queries finished by PostgreSQL: expressions over aggregates across shards.
//!
//! `SELECT region, coalesce(sum(total), 0)::int, round(avg(score), 2) FROM ... GROUP BY region
//! HAVING sum(total) / count(*) > 10 ORDER BY 2 DESC LIMIT 5` splits in two. The shards compute
//! the groups and the plain aggregates inside the expressions (`sum(total)`, `avg(score)` as a
//! sum and a count, `count(*)`); the merger combines them per group as for any scatter-gather
//! aggregate. The rest of the statement (the select list's expressions, HAVING, ORDER BY,
//! LIMIT/OFFSET, DISTINCT) then runs on one shard over the merged groups, passed as one array
//! per column: `SELECT coalesce(__pgr.c1, 0)::int AS "coalesce", ... FROM
//! unnest($1, $2, ...) AS __pgr(c0, c1, ...) WHERE ... ORDER BY ... LIMIT 5`. Every
//! function, cast, operator and rounding rule is PostgreSQL's own, so the answer is the one a
//! single PostgreSQL gives. The cost is one more round trip, for these statements only.
//! (`unnest` with several arrays is a FROM-clause form of PostgreSQL's grammar that exists only
//! unqualified: `pg_catalog.unnest` takes one array.)

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Distinct, Expr, Fetch, FunctionArguments, GroupByExpr, Ident, LimitClause, OrderBy,
    OrderByKind, Query, SelectItem, SetExpr, Value, VisitMut, VisitorMut, visit_expressions_mut,
};

use super::variance::{self, Variance, variance_of};
use super::{
    Aggregation, ColumnMerge, MergeSpec, Plan, PlanError, Planned, Renumber, contains_aggregate,
    contains_window, count_of, default_column_name, distinct_per_shard, is_aggregate_call,
    is_aggregate_name, last_name, parse_query, plain_group_by, projection_exprs, sole_argument,
    unsupported, with_function_name,
};

/// The statement that finishes an aggregate query over the merged groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finalize {
    /// SQL over `unnest($1, ..., $n) AS __pgr(c0, ..., c{n-1})`, one array parameter
    /// per merged column (`columns` of them); the client's parameters it uses follow.
    pub sql: String,
    /// Merged columns, passed as arrays `$1..$columns`.
    pub columns: usize,
    /// The client's parameters (0-based) the statement uses, as `$columns+1...` in this order.
    pub client_params: Vec<usize>,
    /// The client's parameters (0-based) the shards' statement uses, as `$1...` in this order.
    pub shard_params: Vec<usize>,
}

/// The alias of the merged-groups relation in the final statement.
const RELATION: &str = "__pgr";

/// Plans an aggregate SELECT whose expressions over aggregates (or over GROUP BY keys) the
/// merger cannot evaluate itself.
pub(super) fn plan(mut query: Query, shards: Option<Vec<usize>>) -> Result<Planned, PlanError> {
    if query.with.is_some() || !query.locks.is_empty() {
        return unsupported("WITH or FOR UPDATE in an aggregate query across shards");
    }
    let order_by = query.order_by.take();
    let limit_clause = query.limit_clause.take();
    let fetch = query.fetch.take();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return unsupported("a set operation");
    };
    let groups = plain_group_by(select)?;
    if projection_exprs(select).any(contains_window) {
        return unsupported("window functions across shards");
    }
    let mut columns = Columns::default();
    for group in &groups {
        columns.group(group);
    }

    // The select list, named as PostgreSQL names the client's columns.
    let mut items = Vec::with_capacity(select.projection.len());
    let mut output_names = Vec::with_capacity(select.projection.len());
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(expr) => (expr, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.clone())),
            _ => return unsupported("* with GROUP BY or aggregates across shards"),
        };
        let alias = alias.unwrap_or_else(|| Ident::with_quote('"', default_column_name(expr)));
        output_names.push(alias.value.clone());
        items.push(SelectItem::ExprWithAlias {
            expr: columns.substitute(expr)?,
            alias,
        });
    }
    let having = select
        .having
        .take()
        .map(|having| columns.substitute(&having))
        .transpose()?;
    let distinct = match select.distinct.take() {
        Some(Distinct::On(exprs)) => Some(Distinct::On(
            exprs
                .iter()
                .map(|e| columns.substitute(e))
                .collect::<Result<_, _>>()?,
        )),
        other => other,
    };
    let mut order_by = order_by;
    if let Some(order) = order_by.as_mut() {
        let OrderByKind::Expressions(exprs) = &mut order.kind else {
            return unsupported("ORDER BY ALL");
        };
        for item in exprs {
            // An output column's name or position stays as written: PostgreSQL resolves it
            // against the final select list, as it would in the client's statement.
            let output = match &item.expr {
                Expr::Identifier(ident) => output_names.contains(&ident.value),
                Expr::Value(value) => matches!(value.value, Value::Number(..)),
                _ => false,
            };
            if !output {
                item.expr = columns.substitute(&item.expr)?;
            }
        }
    }

    // The shards: groups and plain aggregates, grouped also by count(DISTINCT x)'s x.
    let width = columns.shard.len();
    select.projection = std::mem::take(&mut columns.shard);
    if !columns.distinct_arguments.is_empty() {
        let mut by = groups.clone();
        for argument in &columns.distinct_arguments {
            if !by.contains(argument) {
                by.push(argument.clone());
            }
        }
        select.group_by = GroupByExpr::Expressions(by, Vec::new());
    }

    // The final statement over the merged groups.
    let relation_columns: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
    let arrays: Vec<String> = (1..=width).map(|i| format!("${i}")).collect();
    let skeleton = format!(
        "SELECT 1 FROM unnest({}) AS {RELATION}({})",
        arrays.join(", "),
        relation_columns.join(", ")
    );
    let mut final_query = parse_query(&skeleton)?;
    let mut client_params = Vec::new();
    let mut moved = Moved {
        items,
        having,
        distinct,
        order_by,
        limit_clause,
        fetch,
    };
    renumber_client_params(&mut moved, width, &mut client_params);
    final_query.order_by = moved.order_by;
    final_query.limit_clause = moved.limit_clause;
    final_query.fetch = moved.fetch;
    let SetExpr::Select(final_select) = final_query.body.as_mut() else {
        return unsupported("the final statement of an aggregate query");
    };
    final_select.projection = moved.items;
    final_select.selection = moved.having;
    final_select.distinct = moved.distinct;

    let mut shard_params = Vec::new();
    Renumber::new(1, &mut shard_params).apply(&mut query);

    Ok(Planned {
        sql: query.to_string(),
        plan: Plan::Scatter {
            shards,
            merge: MergeSpec {
                aggregation: Some(Aggregation {
                    columns: columns.merges,
                    having: None,
                    global: groups.is_empty(),
                }),
                finalize: Some(Finalize {
                    sql: final_query.to_string(),
                    columns: width,
                    client_params,
                    shard_params,
                }),
                ..MergeSpec::default()
            },
            write: false,
        },
        returns_rows: true,
    })
}

/// The parts of the client's statement that move to the final statement.
struct Moved {
    items: Vec<SelectItem>,
    having: Option<Expr>,
    distinct: Option<Distinct>,
    order_by: Option<OrderBy>,
    limit_clause: Option<LimitClause>,
    fetch: Option<Fetch>,
}

/// The client's `$k` in the moved parts become `$width+1...`, in order of first use.
fn renumber_client_params(moved: &mut Moved, width: usize, used: &mut Vec<usize>) {
    let mut renumber = Renumber::new(width + 1, used);
    renumber.apply(&mut moved.items);
    renumber.apply(&mut moved.having);
    renumber.apply(&mut moved.distinct);
    renumber.apply(&mut moved.order_by);
    renumber.apply(&mut moved.limit_clause);
    renumber.apply(&mut moved.fetch);
}

/// The shard columns of a finalized aggregate query and how each merges.
#[derive(Default)]
struct Columns {
    shard: Vec<SelectItem>,
    merges: Vec<ColumnMerge>,
    /// Expression text -> column.
    by_text: HashMap<String, usize>,
    /// Group expression texts.
    groups: Vec<String>,
    /// Arguments of count(DISTINCT ...).
    distinct_arguments: Vec<Expr>,
}

impl Columns {
    fn push(&mut self, key: String, expr: Expr, merge: ColumnMerge) -> usize {
        let index = self.shard.len();
        self.shard.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("{RELATION}_{index}")),
        });
        self.merges.push(merge);
        self.by_text.insert(key, index);
        index
    }

    fn group(&mut self, expr: &Expr) -> usize {
        let text = expr.to_string();
        self.groups.push(text.clone());
        if let Some(index) = self.by_text.get(&text) {
            return *index;
        }
        self.push(text, expr.clone(), ColumnMerge::Group)
    }

    /// The column of an aggregate call, added on first use.
    fn aggregate(&mut self, expr: &Expr, name: &str, distinct: bool) -> Result<usize, PlanError> {
        let key = format!("{distinct}:{expr}");
        if let Some(index) = self.by_text.get(&key) {
            return Ok(*index);
        }
        Ok(match (name, distinct) {
            ("count", true)
                if sole_argument(expr).is_some_and(|argument| distinct_per_shard(&argument)) =>
            {
                self.push(key, expr.clone(), ColumnMerge::Count)
            }
            ("count", true) => {
                let argument = sole_argument(expr).ok_or_else(|| {
                    PlanError::Unsupported(
                        "count(DISTINCT ...) of several expressions across shards".into(),
                    )
                })?;
                self.distinct_arguments.push(argument.clone());
                self.push(key, argument, ColumnMerge::CountDistinct)
            }
            (_, true) => {
                return unsupported(
                    "DISTINCT aggregates other than count(DISTINCT ...) across shards",
                );
            }
            ("avg", _) => {
                let sum = self.push(
                    key,
                    with_function_name(expr, "sum"),
                    ColumnMerge::Avg { count: 0 },
                );
                let count = self.shard.len();
                self.shard.push(SelectItem::ExprWithAlias {
                    expr: count_of(expr),
                    alias: Ident::new(format!("{RELATION}_{count}")),
                });
                self.merges.push(ColumnMerge::Helper);
                self.merges[sum] = ColumnMerge::Avg { count };
                sum
            }
            ("count", _) => self.push(key, expr.clone(), ColumnMerge::Count),
            ("sum", _) => self.push(key, expr.clone(), ColumnMerge::Sum),
            ("min", _) => self.push(key, expr.clone(), ColumnMerge::Min),
            _ => self.push(key, expr.clone(), ColumnMerge::Max),
        })
    }

    /// The final expression of a variance or standard deviation call, its partial sums added
    /// on first use (shared with the same argument's other variances and its count).
    fn variance(&mut self, expr: &Expr, variance: Variance) -> Result<Expr, PlanError> {
        let partials = variance::partials(expr)?;
        let n = self.aggregate(&partials.count, "count", false)?;
        let sum = self.aggregate(&partials.sum, "sum", false)?;
        let squares = self.aggregate(&partials.squares, "sum", false)?;
        let witness = self.aggregate(&partials.witness, "min", false)?;
        variance::final_expr(
            variance,
            &column_ref(n),
            &column_ref(sum),
            &column_ref(squares),
            &column_ref(witness),
        )
    }

    /// `expr` over the merged columns: GROUP BY keys and aggregate calls become `__pgr.cN`.
    fn substitute(&mut self, expr: &Expr) -> Result<Expr, PlanError> {
        let mut expr = expr.clone();
        let mut visitor = Substitute {
            columns: self,
            error: None,
        };
        let _ = expr.visit(&mut visitor);
        if let Some(error) = visitor.error {
            return Err(error);
        }
        // What is left may not read the table's columns any more.
        let mut stray = None;
        let _ = visit_expressions_mut(&mut expr, |e| {
            match e {
                Expr::Identifier(ident) => stray = Some(ident.to_string()),
                Expr::CompoundIdentifier(parts)
                    if !(parts.len() == 2 && parts[0].value == RELATION) =>
                {
                    stray = Some(e.to_string());
                }
                _ => {}
            }
            ControlFlow::<()>::Continue(())
        });
        match stray {
            Some(column) => unsupported(format!(
                "{column} must appear in GROUP BY or be used in an aggregate function"
            )),
            None => Ok(expr),
        }
    }
}

fn column_ref(index: usize) -> Expr {
    Expr::CompoundIdentifier(vec![Ident::new(RELATION), Ident::new(format!("c{index}"))])
}

struct Substitute<'a> {
    columns: &'a mut Columns,
    error: Option<PlanError>,
}

impl VisitorMut for Substitute<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, _query: &mut Query) -> ControlFlow<()> {
        self.error = Some(PlanError::Unsupported(
            "a subquery in an aggregate query across shards".into(),
        ));
        ControlFlow::Break(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let text = expr.to_string();
        if self.columns.groups.contains(&text) {
            *expr = column_ref(self.columns.by_text[&text]);
            return ControlFlow::Continue(());
        }
        let Expr::Function(function) = expr else {
            return ControlFlow::Continue(());
        };
        if function.over.is_some() {
            self.error = Some(PlanError::Unsupported(
                "window functions across shards".into(),
            ));
            return ControlFlow::Break(());
        }
        let variance = variance_of(&last_name(&function.name));
        let Some(name) =
            is_aggregate_name(&last_name(&function.name)).or(variance.map(|_| "variance"))
        else {
            if is_aggregate_call(function) {
                self.error = Some(PlanError::Unsupported(format!(
                    "the aggregate {}() across shards (the router merges count, sum, min, max, \
                     avg, bool_and, bool_or, every, any_value, stddev and variance, and \
                     count(DISTINCT ...))",
                    last_name(&function.name)
                )));
                return ControlFlow::Break(());
            }
            return ControlFlow::Continue(());
        };
        if !function.within_group.is_empty() {
            self.error = Some(PlanError::Unsupported(format!(
                "{name}() WITHIN GROUP across shards"
            )));
            return ControlFlow::Break(());
        }
        let distinct = matches!(
            &function.args,
            FunctionArguments::List(list)
                if list.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct)
        );
        if let Some(filter) = &function.filter
            && contains_aggregate(filter)
        {
            self.error = Some(PlanError::Syntax(
                "aggregate functions are not allowed in FILTER".into(),
            ));
            return ControlFlow::Break(());
        }
        let substituted = match variance {
            Some(_) if distinct => {
                unsupported("DISTINCT aggregates other than count(DISTINCT ...) across shards")
            }
            Some(variance) => self.columns.variance(expr, variance),
            None => self.columns.aggregate(expr, name, distinct).map(column_ref),
        };
        match substituted {
            Ok(substituted) => {
                *expr = substituted;
                ControlFlow::Continue(())
            }
            Err(error) => {
                self.error = Some(error);
                ControlFlow::Break(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan;
    use super::*;

    fn finalized(sql: &str) -> (String, MergeSpec, Finalize) {
        let planned = plan(sql).unwrap();
        let Plan::Scatter { merge, .. } = planned.plan else {
            panic!("not a scatter: {:?}", planned.plan);
        };
        let finalize = merge.finalize.clone().expect("finalized");
        (planned.sql, merge, finalize)
    }

    #[test]
    fn expressions_over_aggregates_run_over_the_merged_groups() {
        let (shard_sql, merge, finalize) = finalized(
            "SELECT region, coalesce(sum(score), 0)::int AS total, round(avg(score), 2) \
             FROM customers GROUP BY region HAVING sum(score) / count(*) > 10 ORDER BY 2 DESC LIMIT 3",
        );
        assert_eq!(
            shard_sql,
            "SELECT region AS __pgr_0, sum(score) AS __pgr_1, sum(score) AS __pgr_2, \
             count(score) AS __pgr_3, count(*) AS __pgr_4 FROM customers GROUP BY region"
        );
        let aggregation = merge.aggregation.unwrap();
        assert_eq!(
            aggregation.columns,
            vec![
                ColumnMerge::Group,
                ColumnMerge::Sum,
                ColumnMerge::Avg { count: 3 },
                ColumnMerge::Helper,
                ColumnMerge::Count
            ]
        );
        assert!(!aggregation.global);
        assert_eq!(finalize.columns, 5);
        assert_eq!(
            finalize.sql,
            "SELECT __pgr.c0 AS \"region\", coalesce(__pgr.c1, 0)::INT AS total, \
             round(__pgr.c2, 2) AS \"round\" FROM UNNEST($1, $2, $3, $4, $5) \
             AS __pgr (c0, c1, c2, c3, c4) WHERE __pgr.c1 / __pgr.c4 > 10 ORDER BY 2 DESC LIMIT 3"
        );
    }

    #[test]
    fn client_parameters_move_to_the_final_statement_renumbered() {
        let (shard_sql, _, finalize) = finalized(
            "SELECT count(*) + $2 FROM orders WHERE qty > $1 HAVING max(total) > $3 LIMIT $2",
        );
        assert_eq!(
            shard_sql,
            "SELECT count(*) AS __pgr_0, max(total) AS __pgr_1 FROM orders WHERE qty > $1"
        );
        assert!(finalize.sql.contains("__pgr.c0 + $3"), "{}", finalize.sql);
        assert!(finalize.sql.contains("__pgr.c1 > $4"), "{}", finalize.sql);
        assert!(finalize.sql.ends_with("LIMIT $3"), "{}", finalize.sql);
        assert_eq!(finalize.client_params, vec![1, 2]);
        assert_eq!(finalize.shard_params, vec![0]);
        let (shard_sql, _, finalize) =
            finalized("SELECT sum(qty) * 2 FROM orders WHERE note = $2 HAVING count(*) > $1");
        assert!(shard_sql.ends_with("WHERE note = $1"), "{shard_sql}");
        assert_eq!(finalize.shard_params, vec![1]);
        assert_eq!(finalize.client_params, vec![0]);
    }

    #[test]
    fn group_keys_inside_expressions_and_count_distinct() {
        let (shard_sql, merge, finalize) = finalized(
            "SELECT upper(region), count(DISTINCT qty)::int FROM customers GROUP BY region \
             ORDER BY upper(region)",
        );
        assert_eq!(
            shard_sql,
            "SELECT region AS __pgr_0, qty AS __pgr_1 FROM customers GROUP BY region, qty"
        );
        assert_eq!(
            merge.aggregation.unwrap().columns,
            vec![ColumnMerge::Group, ColumnMerge::CountDistinct]
        );
        assert!(
            finalize
                .sql
                .contains("upper(__pgr.c0) AS \"upper\", __pgr.c1::INT AS \"count\""),
            "{}",
            finalize.sql
        );
        assert!(finalize.sql.ends_with("ORDER BY upper(__pgr.c0)"));
    }

    #[test]
    fn what_it_still_refuses() {
        for (sql, reason) in [
            (
                "SELECT region, name || count(*) FROM customers GROUP BY region",
                "name must appear in GROUP BY",
            ),
            (
                "SELECT sum(score) + (SELECT 1) FROM customers",
                "a subquery in an aggregate query",
            ),
            (
                "SELECT sum(DISTINCT o.qty) * 2 FROM customers c JOIN orders o ON o.customer_id = c.id",
                "DISTINCT aggregates other than count",
            ),
            (
                "SELECT rank() OVER (ORDER BY sum(o.qty)) FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.region",
                "window functions",
            ),
            (
                "SELECT c.id, rank() OVER (ORDER BY o.qty) FROM customers c JOIN orders o ON o.customer_id = c.id",
                "window functions",
            ),
            (
                "SELECT c.region, string_agg(o.note, ',') FROM customers c JOIN orders o ON o.customer_id = c.id GROUP BY c.region",
                "the aggregate string_agg()",
            ),
            (
                "SELECT array_agg(o.id) FROM customers c JOIN orders o ON o.customer_id = c.id",
                "the aggregate array_agg()",
            ),
            (
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY o.qty) FROM customers c JOIN orders o ON o.customer_id = c.id",
                "the aggregate percentile_cont()",
            ),
        ] {
            // What the final statement cannot do (the planner may still pull the rows).
            match super::plan(parse_query(sql).unwrap(), None) {
                Err(PlanError::Unsupported(message)) => {
                    assert!(message.contains(reason), "{sql}: {message}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }
}
