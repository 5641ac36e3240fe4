//! Uncorrelated subqueries over sharded tables in WHERE, run first and bound as parameters.
//!
//! `SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)`: the subquery is planned
//! on its own (any plan: one shard, scatter-gather with its merge, stages) and runs first; its
//! answer becomes a parameter of the statement, which is then planned as if the client had
//! written `total > $1`. An `IN (subquery)` becomes `= ANY($1)` over an array of the
//! subquery's values (`NOT IN`: `<> ALL($1)`, with the same NULL rules), and `EXISTS
//! (subquery)` a boolean. A parameter that stands for the shard key routes the statement as a
//! client's parameter would: `WHERE customer_id = (SELECT max(id) FROM customers)` runs on one
//! shard. Correlated subqueries (reading the statement's own rows) are not run this way.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, Query, SetExpr, Statement, TableFactor, UnaryOperator, Value,
    Visit, VisitMut, Visitor, VisitorMut,
};

use super::intermediate::{Stage, stage};
use super::{
    Plan, PlanError, Planned, Renumber, insert_defined_names, normalize, plan_query,
    plan_statement, table_use,
};
use crate::topology::Topology;

/// A statement whose WHERE subqueries over sharded tables run first.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundSubqueries {
    /// The subqueries, in the order of their parameters' first use.
    pub subqueries: Vec<BoundSubquery>,
    /// The statement with the subqueries as parameters, planned.
    pub outer: Planned,
    /// What each of the statement's parameters `$1...` is.
    pub outer_params: Vec<ParamSource>,
}

/// One subquery run first.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundSubquery {
    /// The subquery as a statement of its own.
    pub stage: Stage,
    /// How its answer becomes a value.
    pub kind: SubqueryKind,
}

/// How a subquery's answer becomes a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubqueryKind {
    /// `(SELECT ...)`: its one value (NULL without rows; an error with more than one).
    Scalar,
    /// `IN (SELECT ...)`: an array of its values.
    List,
    /// `EXISTS (SELECT ...)`: whether it has a row.
    Exists,
}

/// Where a parameter of the statement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamSource {
    /// The client's parameter (0-based).
    Client(usize),
    /// A subquery's answer (index in `subqueries`).
    Subquery(usize),
}

/// Placeholder numbers from here on stand for subqueries until the parameters are renumbered.
const MARK: usize = 1_000_000;

/// Plans `query` with its uncorrelated WHERE subqueries over sharded tables bound as
/// parameters; `None` if it has none.
pub(super) fn plan(topology: &Topology, mut query: Query) -> Result<Option<Planned>, PlanError> {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let Some(selection) = select.selection.as_mut() else {
        return Ok(None);
    };
    let found = bind(topology, selection)?;
    finish(topology, found, query, plan_query)
}

/// Plans a SELECT whose FROM subqueries read sharded tables only through their own WHERE
/// subqueries (Q22: customers with a NOT EXISTS over orders, grouped outside) with those WHERE
/// subqueries, correlated `[NOT] EXISTS` decorrelated first, bound as parameters of the whole
/// statement: the subqueries run first and the statement then runs on one shard in one go,
/// where a FROM subquery run as a stage would take one more round trip to the shards and ship
/// its rows back to them. `None` when the statement is not of that form.
pub(super) fn plan_nested(
    topology: &Topology,
    mut query: Query,
) -> Result<Option<Planned>, PlanError> {
    if query.with.is_some() || !query.locks.is_empty() {
        return Ok(None);
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let mut binder = Binder {
        topology,
        found: Vec::new(),
        error: None,
    };
    let mut hoisted = false;
    for table in &mut select.from {
        let factors = std::iter::once(&mut table.relation)
            .chain(table.joins.iter_mut().map(|join| &mut join.relation));
        for factor in factors {
            let TableFactor::Derived {
                lateral: false,
                subquery,
                ..
            } = factor
            else {
                continue;
            };
            if table_use(topology, subquery.as_ref()).sharded.is_empty() {
                continue;
            }
            // A NOT EXISTS the shards answer at once is cheaper as a stage (Q22).
            if subquery.with.is_some()
                || !subquery.locks.is_empty()
                || super::anti::plan(topology, subquery).is_some()
            {
                return Ok(None);
            }
            let SetExpr::Select(inner) = subquery.body.as_mut() else {
                return Ok(None);
            };
            if !table_use(topology, &inner.from).sharded.is_empty() {
                return Ok(None);
            }
            super::decorrelate::exists_conjuncts(topology, inner);
            let Some(selection) = inner.selection.as_mut() else {
                return Ok(None);
            };
            let _ = selection.visit(&mut binder);
            hoisted = true;
        }
    }
    if !hoisted {
        return Ok(None);
    }
    if let Some(selection) = select.selection.as_mut() {
        let _ = selection.visit(&mut binder);
    }
    // A correlated subquery left, or sharded tables read elsewhere (select list, a JOIN's ON):
    // the stages plan it, or refuse it, as before.
    if binder.error.is_some() || !table_use(topology, &query).sharded.is_empty() {
        return Ok(None);
    }
    finish(topology, binder.found, query, plan_query)
}

/// The same for an UPDATE or DELETE.
pub(super) fn plan_write(
    topology: &Topology,
    mut statement: Statement,
) -> Result<Option<Planned>, PlanError> {
    let selection = match &mut statement {
        Statement::Update(update) => update.selection.as_mut(),
        Statement::Delete(delete) => delete.selection.as_mut(),
        _ => None,
    };
    let Some(selection) = selection else {
        return Ok(None);
    };
    let found = bind(topology, selection)?;
    finish(topology, found, statement, plan_statement)
}

/// Plans the subqueries found and the statement (`node`, its subqueries replaced) with its
/// parameters renumbered.
fn finish<T: VisitMut + std::fmt::Display>(
    topology: &Topology,
    found: Vec<(Query, SubqueryKind)>,
    mut node: T,
    plan: fn(&Topology, T, String) -> Result<Planned, PlanError>,
) -> Result<Option<Planned>, PlanError> {
    if found.is_empty() {
        return Ok(None);
    }
    let subqueries = stages(topology, found)?;
    let mut used = Vec::new();
    Renumber::new(1, &mut used).apply(&mut node);
    let text = node.to_string();
    let outer = plan(topology, node, text)?;
    Ok(Some(bound(subqueries, outer, used)))
}

/// Replaces the uncorrelated subqueries over sharded tables in `selection` with parameters.
fn bind(
    topology: &Topology,
    selection: &mut Expr,
) -> Result<Vec<(Query, SubqueryKind)>, PlanError> {
    let mut binder = Binder {
        topology,
        found: Vec::new(),
        error: None,
    };
    let _ = selection.visit(&mut binder);
    match binder.error {
        Some(error) => Err(error),
        None => Ok(binder.found),
    }
}

fn bound(subqueries: Vec<BoundSubquery>, outer: Planned, used: Vec<usize>) -> Planned {
    let outer_params = used
        .into_iter()
        .map(|n| {
            if n >= MARK {
                ParamSource::Subquery(n - MARK)
            } else {
                ParamSource::Client(n)
            }
        })
        .collect();
    Planned {
        sql: outer.sql.clone(),
        returns_rows: outer.returns_rows,
        plan: Plan::BoundSubqueries(Box::new(BoundSubqueries {
            subqueries,
            outer,
            outer_params,
        })),
    }
}

fn stages(
    topology: &Topology,
    found: Vec<(Query, SubqueryKind)>,
) -> Result<Vec<BoundSubquery>, PlanError> {
    let mut subqueries = Vec::with_capacity(found.len());
    for (index, (subquery, kind)) in found.into_iter().enumerate() {
        subqueries.push(BoundSubquery {
            stage: stage(
                topology,
                format!("subquery {}", index + 1),
                Vec::new(),
                subquery,
                &[],
            )?,
            kind,
        });
    }
    Ok(subqueries)
}

struct Binder<'a> {
    topology: &'a Topology,
    found: Vec<(Query, SubqueryKind)>,
    error: Option<PlanError>,
}

impl Binder<'_> {
    /// A marker parameter for a subquery (if it reads sharded tables and is uncorrelated).
    fn bind(&mut self, subquery: &Query, kind: SubqueryKind) -> Option<Expr> {
        if table_use(self.topology, subquery).sharded.is_empty() {
            return None;
        }
        if correlated(subquery) {
            self.error = Some(PlanError::Unsupported(
                "a correlated subquery over sharded tables other than IN / EXISTS on the shard \
                 key of a co-located table, [NOT] EXISTS correlated by one equality, or an \
                 aggregate correlated by equalities"
                    .into(),
            ));
            return None;
        }
        let mut subquery = subquery.clone();
        if kind == SubqueryKind::Exists && subquery.limit_clause.is_none() {
            subquery.limit_clause =
                super::limit_clause(Expr::value(Value::Number("1".into(), false)));
        }
        let number = MARK + self.found.len() + 1;
        self.found.push((subquery, kind));
        Some(Expr::value(Value::Placeholder(format!("${number}"))))
    }
}

impl VisitorMut for Binder<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let replacement = match expr {
            Expr::Subquery(subquery) => self.bind(subquery, SubqueryKind::Scalar),
            Expr::In {
                expr: left,
                target: InTarget::Subquery(subquery),
                negated,
                ..
            } => self.bind(subquery, SubqueryKind::List).map(|list| {
                if *negated {
                    Expr::AllOp {
                        left: left.clone(),
                        compare_op: BinaryOperator::NotEq,
                        right: Box::new(list),
                    }
                } else {
                    Expr::AnyOp {
                        left: left.clone(),
                        compare_op: BinaryOperator::Eq,
                        right: Box::new(list),
                        is_some: false,
                    }
                }
            }),
            Expr::Exists { subquery, negated } => {
                let negated = *negated;
                self.bind(subquery, SubqueryKind::Exists).map(|exists| {
                    if negated {
                        Expr::UnaryOp {
                            op: UnaryOperator::Not,
                            expr: Box::new(exists),
                        }
                    } else {
                        exists
                    }
                })
            }
            _ => None,
        };
        if self.error.is_some() {
            return ControlFlow::Break(());
        }
        if let Some(replacement) = replacement {
            *expr = replacement;
        }
        ControlFlow::Continue(())
    }
}

/// Does `subquery` name a table (alias) it does not define itself (`o.id` of the statement)?
fn correlated(subquery: &Query) -> bool {
    struct Names {
        defined: HashSet<String>,
        qualifiers: Vec<String>,
    }
    impl Visitor for Names {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            insert_defined_names(factor, &mut self.defined);
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::CompoundIdentifier(parts) = expr
                && parts.len() >= 2
            {
                self.qualifiers.push(normalize(&parts[parts.len() - 2]));
            }
            ControlFlow::Continue(())
        }
    }
    let mut names = Names {
        defined: HashSet::new(),
        qualifiers: Vec::new(),
    };
    let _ = subquery.visit(&mut names);
    if let Some(with) = &subquery.with {
        for cte in &with.cte_tables {
            names.defined.insert(normalize(&cte.alias.name));
        }
    }
    names.qualifiers.iter().any(|q| !names.defined.contains(q))
}

#[cfg(test)]
mod tests {
    use super::super::Target;
    use super::super::tests::plan;
    use super::*;

    fn bound(sql: &str) -> BoundSubqueries {
        match plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).plan {
            Plan::BoundSubqueries(bound) => *bound,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn uncorrelated_subqueries_become_parameters() {
        let b = bound(
            "SELECT * FROM orders WHERE qty > $1 AND total > (SELECT avg(total) FROM orders) \
             AND note NOT IN (SELECT name FROM customers WHERE score > $2)",
        );
        assert_eq!(b.subqueries.len(), 2);
        assert_eq!(b.subqueries[0].kind, SubqueryKind::Scalar);
        assert_eq!(b.subqueries[1].kind, SubqueryKind::List);
        assert_eq!(b.subqueries[1].stage.params, vec![1]);
        assert_eq!(
            b.outer.sql,
            "SELECT * FROM orders WHERE qty > $1 AND total > $2 AND note <> ALL($3)"
        );
        assert_eq!(
            b.outer_params,
            vec![
                ParamSource::Client(0),
                ParamSource::Subquery(0),
                ParamSource::Subquery(1)
            ]
        );
        assert!(matches!(b.outer.plan, Plan::Scatter { .. }));
    }

    #[test]
    fn a_subquery_for_the_shard_key_routes_to_one_shard() {
        let b = bound(
            "SELECT * FROM orders WHERE customer_id = (SELECT max(id) FROM customers) \
             AND NOT EXISTS (SELECT 1 FROM customers WHERE score > 1000)",
        );
        assert_eq!(
            b.outer.plan,
            Plan::Single(Target::Param { param: 1, group: 0 })
        );
        assert_eq!(b.subqueries[1].kind, SubqueryKind::Exists);
        assert!(b.subqueries[1].stage.planned.sql.ends_with("LIMIT 1"));
    }

    #[test]
    fn writes_too() {
        let b = bound("DELETE FROM orders WHERE total > (SELECT max(score) FROM customers)");
        assert_eq!(b.outer.sql, "DELETE FROM orders WHERE total > $1");
        assert!(matches!(b.outer.plan, Plan::Scatter { write: true, .. }));
        let b = bound(
            "UPDATE orders SET qty = $1 WHERE customer_id IN (SELECT id FROM customers ORDER BY score LIMIT 2)",
        );
        assert_eq!(
            b.outer.sql,
            "UPDATE orders SET qty = $1 WHERE customer_id = ANY($2)"
        );
        assert_eq!(
            b.outer_params,
            vec![ParamSource::Client(0), ParamSource::Subquery(0)]
        );
    }

    #[test]
    fn from_subqueries_over_sharded_tables_in_where_only_run_whole_after_them() {
        // The EXISTS inside the FROM subquery becomes a list run first, and the whole
        // statement (FROM subquery included) then runs once on any shard.
        let b = bound(
            "SELECT k.region, count(*) FROM (SELECT c.code AS region FROM countries c \
             WHERE c.code <> $1 AND EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code)) \
             AS k WHERE k.region > (SELECT min(o.note) FROM orders o) GROUP BY k.region",
        );
        assert_eq!(b.subqueries.len(), 2);
        assert_eq!(b.subqueries[0].kind, SubqueryKind::List);
        assert_eq!(b.subqueries[0].stage.params, vec![0]);
        assert_eq!(b.subqueries[1].kind, SubqueryKind::Scalar);
        assert_eq!(b.outer.plan, Plan::Single(Target::Any));
        assert_eq!(
            b.outer.sql,
            "SELECT k.region, count(*) FROM (SELECT c.code AS region FROM countries c \
             WHERE c.code <> $1 AND c.code = ANY($2)) AS k \
             WHERE k.region > $3 GROUP BY k.region"
        );
        assert_eq!(
            b.outer_params,
            vec![
                ParamSource::Client(0),
                ParamSource::Subquery(0),
                ParamSource::Subquery(1)
            ]
        );
        // A FROM subquery that reads a sharded table in its own FROM still runs as a stage,
        // and so does a NOT EXISTS the shards answer at once (Q22, `anti.rs`).
        for sql in [
            "SELECT count(*) FROM (SELECT DISTINCT o.note FROM orders o \
             WHERE o.qty > (SELECT min(c.score) FROM customers c)) AS k",
            "SELECT k.region, count(*) FROM (SELECT c.code AS region FROM countries c \
             WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code)) AS k \
             GROUP BY k.region",
        ] {
            let planned = plan(sql).unwrap();
            assert!(matches!(planned.plan, Plan::MultiStage(_)), "{planned:?}");
        }
    }

    #[test]
    fn correlated_subqueries_are_refused() {
        let error = plan(
            "SELECT * FROM orders o WHERE o.total > (SELECT count(*) FROM orders x WHERE x.qty < o.qty)",
        )
        .unwrap_err();
        assert_eq!(error.sqlstate(), "0A000");
    }
}
