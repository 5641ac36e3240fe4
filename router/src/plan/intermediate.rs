//! Multi-stage queries: WITH queries and FROM subqueries over sharded tables, read by an outer
//! statement that reads no sharded table itself (Citus calls this recursive planning).
//!
//! `WITH totals AS (SELECT customer_id, sum(total) AS s FROM orders GROUP BY customer_id)
//! SELECT count(*) FROM totals WHERE s > 50`: each such WITH query or FROM subquery is planned
//! on its own (single shard, or scatter-gather with its merge) and runs first; its rows become
//! one text array per column, and the outer statement runs on the first shard with the result
//! in its place: `WITH totals AS (SELECT * FROM unnest($1, $2) AS totals(customer_id, s))
//! SELECT count(*) FROM totals WHERE s > 50`. The outer statement may read reference tables
//! and tables the router does not shard (they live on the first shard), and WITH queries that
//! read no sharded table stay in it as written. Each result is held in the router's memory.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Cte, DuplicateTreatment, Expr, FunctionArguments, Query, SetExpr, TableFactor, VisitMut,
    VisitorMut, visit_expressions, visit_relations,
};

use super::{
    Plan, PlanError, Planned, Renumber, is_aggregate_call, is_aggregate_name, last_name, normalize,
    parse_query, plan_query, table_use, unsupported,
};
use crate::topology::Topology;

/// A statement whose WITH queries or FROM subqueries over sharded tables run first.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiStage {
    /// The results computed first, in order.
    pub stages: Vec<Stage>,
    /// WITH queries that read no sharded table, as written (`name AS (...)`), defined after the
    /// stages' results.
    pub kept: Vec<String>,
    /// The outer statement without its WITH; the client's parameters it uses are `$1...`.
    pub outer: String,
    /// The client's parameters (0-based) of `kept` and `outer`, as `$1...` in this order; the
    /// stages' arrays follow.
    pub outer_params: Vec<usize>,
    /// When the outer statement reads sharded tables too: its plan (one shard or a
    /// scatter-gather), the stages' results going to every shard it runs on as array
    /// literals in a WITH in front of its statement.
    pub distributed: Option<Box<Planned>>,
}

/// One result computed before the outer statement.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// The name the outer statement reads it by (a WITH query's, or `__pgr_derived_N`).
    pub name: String,
    /// Column names given with the WITH query's name (`totals(id, s)`), if any.
    pub columns: Vec<String>,
    /// Its plan.
    pub planned: Planned,
    /// The client's parameters (0-based) it uses, as `$1...` in this order.
    pub params: Vec<usize>,
}

/// Plans `query` in stages if it has WITH queries or FROM subqueries over sharded tables;
/// `None` if it has none (the caller's own refusals apply).
pub(super) fn plan(topology: &Topology, mut query: Query) -> Result<Option<Planned>, PlanError> {
    if !query.locks.is_empty() {
        return Ok(None);
    }
    let mut stages = Vec::new();
    let mut kept: Vec<Cte> = Vec::new();
    let mut cte_names: Vec<String> = Vec::new();
    if let Some(with) = &query.with {
        if with.recursive {
            return Ok(None);
        }
        cte_names = with
            .cte_tables
            .iter()
            .map(|cte| normalize(&cte.alias.name))
            .collect();
    }
    if let Some(with) = query.with.take() {
        for cte in with.cte_tables {
            if table_use(topology, cte.query.as_ref()).sharded.is_empty() {
                kept.push(cte);
                continue;
            }
            let columns = cte
                .alias
                .columns
                .iter()
                .map(|c| normalize(&c.name))
                .collect();
            stages.push(stage(
                topology,
                normalize(&cte.alias.name),
                columns,
                *cte.query,
                &cte_names,
            )?);
        }
    }
    let mut selects = Vec::new();
    top_level_selects(query.body.as_mut(), &mut selects);
    for select in selects {
        for table in &mut select.from {
            let factors = std::iter::once(&mut table.relation)
                .chain(table.joins.iter_mut().map(|join| &mut join.relation));
            for factor in factors {
                let TableFactor::Derived {
                    lateral, subquery, ..
                } = factor
                else {
                    continue;
                };
                if table_use(topology, subquery.as_ref()).sharded.is_empty() {
                    continue;
                }
                if *lateral {
                    return unsupported("a LATERAL subquery over sharded tables");
                }
                let name = format!("__pgr_derived_{}", stages.len());
                let reference = parse_query(&format!("SELECT * FROM {name}"))?;
                let body = std::mem::replace(subquery.as_mut(), reference);
                stages.push(stage(topology, name, Vec::new(), body, &cte_names)?);
            }
        }
    }
    if stages.is_empty() {
        return Ok(None);
    }
    let mut outer_params = Vec::new();
    let mut renumber = Renumber::new(1, &mut outer_params);
    renumber.apply(&mut kept);
    renumber.apply(&mut query);
    let outer = query.to_string();
    // An outer statement that reads sharded tables too is planned as any statement, with the
    // stages' results as tables every shard has: they go to each shard with it.
    let distributed = if table_use(topology, &query).sharded.is_empty() {
        None
    } else {
        let mut with_results = topology.clone();
        with_results
            .reference_tables
            .extend(stages.iter().map(|stage| stage.name.clone()));
        let planned = plan_query(&with_results, query, outer.clone())?;
        match &planned.plan {
            Plan::Single(_) | Plan::Scatter { write: false, .. } => Some(Box::new(planned)),
            _ => {
                return unsupported(
                    "a statement that reads sharded tables besides the results of its WITH \
                     queries or FROM subqueries over sharded tables, other than one that runs \
                     on one shard or as a scatter-gather",
                );
            }
        }
    };
    Ok(Some(Planned {
        sql: outer.clone(),
        plan: Plan::MultiStage(Box::new(MultiStage {
            stages,
            kept: kept.iter().map(ToString::to_string).collect(),
            outer,
            outer_params,
            distributed,
        })),
        returns_rows: true,
    }))
}

/// The SELECTs of a statement's own level: the body, or every branch of its set operation.
fn top_level_selects<'a>(body: &'a mut SetExpr, out: &mut Vec<&'a mut sqlparser::ast::Select>) {
    match body {
        SetExpr::Select(select) => out.push(select.as_mut()),
        SetExpr::SetOperation { left, right, .. } => {
            top_level_selects(left.as_mut(), out);
            top_level_selects(right.as_mut(), out);
        }
        SetExpr::Query(query) => top_level_selects(query.body.as_mut(), out),
        _ => {}
    }
}

/// A set operation over sharded tables that does not merge (INTERSECT, EXCEPT, a mix of UNION
/// and UNION ALL, ...): each branch that reads sharded tables runs first as a stage, `SELECT
/// * FROM (branch) AS __pgr_set_N`, and the set operation runs over their results on one shard.
pub(super) fn plan_set_operation(
    topology: &Topology,
    mut query: Query,
) -> Result<Option<Planned>, PlanError> {
    if !matches!(query.body.as_ref(), SetExpr::SetOperation { .. }) {
        return Ok(None);
    }
    let mut branches = 0;
    wrap_branches(topology, query.body.as_mut(), &mut branches)?;
    plan(topology, query)
}

fn wrap_branches(
    topology: &Topology,
    body: &mut SetExpr,
    next: &mut usize,
) -> Result<(), PlanError> {
    match body {
        SetExpr::SetOperation { left, right, .. } => {
            wrap_branches(topology, left.as_mut(), next)?;
            wrap_branches(topology, right.as_mut(), next)
        }
        SetExpr::Select(_) | SetExpr::Query(_) => {
            let branch = body.to_string();
            if table_use(topology, &*body).sharded.is_empty() {
                return Ok(());
            }
            let wrapped = parse_query(&format!("SELECT * FROM ({branch}) AS __pgr_set_{next}"))?;
            *next += 1;
            *body = *wrapped.body;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A SELECT over one sharded table that the merger cannot finish (window functions, DISTINCT
/// ON, aggregates such as `string_agg` or `stddev`), as a statement over the table's matching
/// rows: `FROM t AS a WHERE w` becomes `FROM (SELECT * FROM t AS a WHERE w) AS a`, whose rows
/// run first as a stage. `None` when the statement is not of that form.
pub(super) fn pull_up(topology: &Topology, mut query: Query) -> Result<Option<Planned>, PlanError> {
    if query.with.is_some() || !query.locks.is_empty() {
        return Ok(None);
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    if !needs_rows(select, query.order_by.as_ref()) {
        return Ok(None);
    }
    let single_table = matches!(
        select.from.as_slice(),
        [table] if table.joins.is_empty() && matches!(table.relation, TableFactor::Table { .. })
    );
    if !single_table {
        if table_use(topology, &select.from).sharded.is_empty() || !pull_up_columns(&mut query)? {
            return Ok(None);
        }
        return plan(topology, query);
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let [table] = select.from.as_mut_slice() else {
        return Ok(None);
    };
    let TableFactor::Table { name, alias, .. } = &table.relation else {
        return Ok(None);
    };
    if !topology.tables.contains_key(&last_name(name)) {
        return Ok(None);
    }
    let alias_name = match alias {
        Some(alias) if !alias.columns.is_empty() => return Ok(None),
        Some(alias) => alias.name.clone(),
        None => name
            .0
            .last()
            .and_then(|part| part.as_ident())
            .cloned()
            .unwrap_or_else(|| sqlparser::ast::Ident::new(last_name(name))),
    };
    let mut rows = format!("SELECT * FROM {}", table.relation);
    if let Some(selection) = select.selection.take() {
        rows.push_str(&format!(" WHERE {selection}"));
    }
    let reference = parse_query(&format!("SELECT * FROM ({rows}) AS {alias_name}"))?;
    let SetExpr::Select(mut pulled) = *reference.body else {
        return Ok(None);
    };
    table.relation = pulled.from.remove(0).relation;
    plan(topology, query)
}

/// The joined rows of a SELECT whose FROM is not one table (a co-located join), pulled as the
/// columns the rest of the statement reads: `FROM a JOIN b ON ... WHERE w` becomes `FROM
/// (SELECT a.x AS __c0, b.y AS __c1 FROM a JOIN b ON ... WHERE w) AS __pgr_rows`, and `a.x`
/// elsewhere `__pgr_rows.__c0`. `false` when the statement cannot be rewritten that way (a `*`).
fn pull_up_columns(query: &mut Query) -> Result<bool, PlanError> {
    use sqlparser::ast::{Ident, SelectItem};
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(false);
    };
    let mut outputs = Vec::new();
    for item in &mut select.projection {
        match item {
            SelectItem::UnnamedExpr(expr) => {
                let alias = Ident::with_quote('"', super::default_column_name(expr));
                outputs.push(alias.value.clone());
                *item = SelectItem::ExprWithAlias {
                    expr: expr.clone(),
                    alias,
                };
            }
            SelectItem::ExprWithAlias { alias, .. } => outputs.push(alias.value.clone()),
            _ => return Ok(false),
        }
    }
    let mut columns = Columns {
        refs: Vec::new(),
        outputs: Vec::new(),
        depth: 0,
    };
    let _ = select.projection.visit(&mut columns);
    let _ = select.having.visit(&mut columns);
    let _ = select.group_by.visit(&mut columns);
    let _ = select.distinct.visit(&mut columns);
    let _ = select.named_window.visit(&mut columns);
    // ORDER BY may name output columns: those stay as written.
    columns.outputs = outputs;
    let _ = query.order_by.visit(&mut columns);
    if columns.refs.is_empty() {
        columns.refs.push("1".into());
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(false);
    };
    let items: Vec<String> = columns
        .refs
        .iter()
        .enumerate()
        .map(|(i, column)| format!("{column} AS __c{i}"))
        .collect();
    let from: Vec<String> = select.from.iter().map(ToString::to_string).collect();
    let mut rows = format!("SELECT {} FROM {}", items.join(", "), from.join(", "));
    if let Some(selection) = select.selection.take() {
        rows.push_str(&format!(" WHERE {selection}"));
    }
    let reference = parse_query(&format!("SELECT * FROM ({rows}) AS __pgr_rows"))?;
    let SetExpr::Select(pulled) = *reference.body else {
        return Ok(false);
    };
    select.from = pulled.from;
    Ok(true)
}

/// Collects the column references of a statement's own level (not in subqueries) and replaces
/// them with `__pgr_rows.__cN`; bare names in `outputs` (ORDER BY of an output column) stay.
struct Columns {
    refs: Vec<String>,
    outputs: Vec<String>,
    depth: usize,
}

impl VisitorMut for Columns {
    type Break = ();

    fn pre_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        let is_column = match expr {
            Expr::Identifier(ident) => !self.outputs.contains(&ident.value),
            Expr::CompoundIdentifier(_) => true,
            _ => false,
        };
        if is_column {
            let text = expr.to_string();
            let index = match self.refs.iter().position(|r| *r == text) {
                Some(index) => index,
                None => {
                    self.refs.push(text);
                    self.refs.len() - 1
                }
            };
            *expr = Expr::CompoundIdentifier(vec![
                sqlparser::ast::Ident::new("__pgr_rows"),
                sqlparser::ast::Ident::new(format!("__c{index}")),
            ]);
        }
        ControlFlow::Continue(())
    }
}

/// A join of sharded tables that is not co-located: the first table's rows stay where they
/// are, every other sharded table is read first (`(SELECT * FROM t) AS alias`, a stage) and
/// goes to each shard with the statement, as Citus's broadcast joins do. Only inner, cross and
/// left joins (each of the first table's rows is on one shard, so none is repeated); the whole
/// table is read, up to the intermediate-result cap.
pub(super) fn broadcast_join(
    topology: &Topology,
    mut query: Query,
) -> Result<Option<Planned>, PlanError> {
    use sqlparser::ast::JoinOperator;
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let [table] = select.from.as_mut_slice() else {
        return Ok(None);
    };
    let preserving = table.joins.iter().all(|join| {
        matches!(
            join.join_operator,
            JoinOperator::Join(_)
                | JoinOperator::Inner(_)
                | JoinOperator::Left(_)
                | JoinOperator::LeftOuter(_)
                | JoinOperator::CrossJoin(_)
        )
    });
    if !preserving || table_use(topology, &table.relation).sharded.is_empty() {
        return Ok(None);
    }
    let mut wrapped = false;
    for join in &mut table.joins {
        let TableFactor::Table { name, alias, .. } = &join.relation else {
            continue;
        };
        if !topology.tables.contains_key(&last_name(name)) {
            continue;
        }
        let alias = match alias {
            Some(alias) if !alias.columns.is_empty() => return Ok(None),
            Some(alias) => alias.name.to_string(),
            None => super::quote_ident(&last_name(name)),
        };
        let rows = parse_query(&format!("SELECT * FROM (SELECT * FROM {name}) AS {alias}"))?;
        let SetExpr::Select(mut rows) = *rows.body else {
            return Ok(None);
        };
        join.relation = rows.from.remove(0).relation;
        wrapped = true;
    }
    if !wrapped {
        return Ok(None);
    }
    plan(topology, query)
}

/// Does the statement use what only its whole rows can answer: a window function, DISTINCT
/// ON, GROUP BY ROLLUP / CUBE / GROUPING SETS, an aggregate the merger cannot combine (`string_agg`, `stddev`, `sum(DISTINCT x)`,
/// `percentile_cont(...) WITHIN GROUP`, ...)? Other refusals stay refusals: pulling a table's
/// rows would not answer them.
fn needs_rows(select: &sqlparser::ast::Select, order_by: Option<&sqlparser::ast::OrderBy>) -> bool {
    if matches!(select.distinct, Some(sqlparser::ast::Distinct::On(_)))
        || super::grouping_sets(select)
    {
        return true;
    }
    let mut found = false;
    let mut check = |expr: &Expr| {
        if let Expr::Function(function) = expr {
            let name = last_name(&function.name);
            let distinct = matches!(
                &function.args,
                FunctionArguments::List(list)
                    if list.duplicate_treatment == Some(DuplicateTreatment::Distinct)
            );
            found |= function.over.is_some()
                || (is_aggregate_call(function)
                    && (is_aggregate_name(&name).is_none()
                        || !function.within_group.is_empty()
                        || (distinct && name != "count")));
        }
        ControlFlow::<()>::Continue(())
    };
    let _ = visit_expressions(&select.projection, &mut check);
    let _ = visit_expressions(&select.having, &mut check);
    if let Some(order_by) = order_by {
        let _ = visit_expressions(order_by, &mut check);
    }
    found
}

/// Plans one WITH query or FROM subquery as a statement of its own.
pub(super) fn stage(
    topology: &Topology,
    name: String,
    columns: Vec<String>,
    mut body: Query,
    cte_names: &[String],
) -> Result<Stage, PlanError> {
    if !matches!(
        body.body.as_ref(),
        SetExpr::Select(_) | SetExpr::SetOperation { .. }
    ) {
        return unsupported("a data-modifying WITH query over sharded tables");
    }
    let mut reads_cte = false;
    let _ = visit_relations(&body, |relation| {
        reads_cte |= relation.0.len() == 1 && cte_names.contains(&last_name(relation));
        ControlFlow::<()>::Continue(())
    });
    if reads_cte {
        return unsupported(
            "a WITH query or subquery over sharded tables that reads another WITH query",
        );
    }
    let mut params = Vec::new();
    Renumber::new(1, &mut params).apply(&mut body);
    let text = body.to_string();
    let planned = plan_query(topology, body, text)?;
    match &planned.plan {
        Plan::Single(_)
        | Plan::Scatter { write: false, .. }
        | Plan::MultiStage(_)
        | Plan::BoundSubqueries(_) => {}
        _ => return unsupported("this WITH query or subquery over sharded tables"),
    }
    Ok(Stage {
        name,
        columns,
        planned,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan;
    use super::*;

    fn staged(sql: &str) -> MultiStage {
        match plan(sql).unwrap().plan {
            Plan::MultiStage(multi) => *multi,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn with_queries_over_sharded_tables_run_first() {
        let multi = staged(
            "WITH totals AS (SELECT customer_id, sum(total) AS s FROM orders WHERE qty > $2 \
             GROUP BY customer_id), names(code) AS (SELECT code FROM countries) \
             SELECT count(*) FROM totals, names WHERE s > $1",
        );
        assert_eq!(multi.stages.len(), 1);
        let stage = &multi.stages[0];
        assert_eq!(stage.name, "totals");
        assert!(matches!(stage.planned.plan, Plan::Scatter { .. }));
        assert_eq!(stage.params, vec![1]);
        assert_eq!(
            multi.kept,
            vec!["names (code) AS (SELECT code FROM countries)"]
        );
        assert_eq!(
            multi.outer,
            "SELECT count(*) FROM totals, names WHERE s > $1"
        );
        assert_eq!(multi.outer_params, vec![0]);
    }

    #[test]
    fn a_stage_pinned_to_one_shard_and_unsharded_tables_in_the_outer_statement() {
        let multi = staged(
            "WITH o AS (SELECT * FROM orders WHERE customer_id = 1) \
             SELECT * FROM o JOIN audit_log l ON true",
        );
        assert!(matches!(multi.stages[0].planned.plan, Plan::Single(_)));
        assert_eq!(multi.outer, "SELECT * FROM o JOIN audit_log l ON true");
    }

    #[test]
    fn from_subqueries_over_sharded_tables_become_stages() {
        let multi = staged(
            "SELECT count(*) FROM (SELECT DISTINCT region FROM customers) AS r JOIN countries k ON k.code = r.region",
        );
        assert_eq!(multi.stages[0].name, "__pgr_derived_0");
        assert_eq!(
            multi.outer,
            "SELECT count(*) FROM (SELECT * FROM __pgr_derived_0) AS r JOIN countries k ON k.code = r.region"
        );
    }

    #[test]
    fn what_only_whole_rows_answer_pulls_the_matching_rows_first() {
        let multi = staged(
            "SELECT id, rank() OVER (ORDER BY score) FROM customers c WHERE c.score > $1 LIMIT $2",
        );
        assert_eq!(
            multi.stages[0].planned.sql,
            "SELECT * FROM customers c WHERE c.score > $1"
        );
        assert_eq!(multi.stages[0].params, vec![0]);
        assert_eq!(
            multi.outer,
            "SELECT id, rank() OVER (ORDER BY score) FROM (SELECT * FROM __pgr_derived_0) AS c LIMIT $1"
        );
        assert_eq!(multi.outer_params, vec![1]);
        // Pinned to one shard by its key, it runs there whole as before.
        let planned = plan("SELECT string_agg(note, ',') FROM orders WHERE customer_id = 7");
        assert!(matches!(planned.unwrap().plan, Plan::Single(_)));
        // An error that whole rows would not fix is not worth reading the table for.
        assert!(plan("SELECT region, name || count(*) FROM customers GROUP BY region").is_err());
    }

    #[test]
    fn an_outer_statement_over_sharded_tables_gets_the_results_on_every_shard() {
        let multi = staged(
            "WITH top AS (SELECT customer_id FROM orders GROUP BY customer_id \
             ORDER BY sum(total) DESC LIMIT 3) \
             SELECT c.name FROM customers c JOIN top ON top.customer_id = c.id ORDER BY c.name",
        );
        let outer = multi.distributed.expect("distributed outer");
        let Plan::Scatter { merge, .. } = &outer.plan else {
            panic!("{outer:?}");
        };
        assert_eq!(merge.order.len(), 1);
        assert!(outer.sql.contains("JOIN top ON"), "{}", outer.sql);
    }

    #[test]
    fn what_stays_refused() {
        for (sql, reason) in [
            (
                "WITH a AS (SELECT 1 AS x), t AS (SELECT * FROM orders JOIN a ON a.x = orders.qty) SELECT * FROM t",
                "reads another WITH query",
            ),
            (
                "SELECT * FROM countries k, LATERAL (SELECT * FROM orders WHERE note = k.code) o",
                "LATERAL",
            ),
        ] {
            match plan(sql) {
                Err(PlanError::Unsupported(message)) => {
                    assert!(message.contains(reason), "{sql}: {message}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }
}
