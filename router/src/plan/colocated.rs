//! Subqueries co-located with their statement, pushed down whole.
//!
//! `SELECT ... FROM orders o WHERE o.customer_id IN (SELECT c.id FROM customers c WHERE ...)` and
//! `... WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND ...)` relate a row
//! of the statement to rows of the subquery with the same shard key, of the same table group:
//! those rows live on the same shard. Each shard then answers the subquery for its own rows
//! completely, and the statement runs on every shard with its subqueries as written (Citus
//! pushes these down the same way). A scalar subquery correlated the same way (`(SELECT
//! count(*) FROM orders o WHERE o.customer_id = c.id)`, in WHERE or in the select list) too. `NOT EXISTS` too; `NOT IN` is not pushed down (a NULL key on
//! another shard would change its answer).

use std::collections::HashMap;

use sqlparser::ast::{BinaryOperator, Expr, InTarget, Query, SelectItem, SetExpr};

use super::{analyze_from, conjuncts, normalize, table_use};
use crate::topology::Topology;

/// The number of sharded-table references in the co-located subqueries of `exprs` (a WHERE
/// clause, select-list items), or `None` if a subquery over sharded tables is not co-located
/// with the statement's sharded tables (`outer`: alias -> shard key, all of table group
/// `group`).
pub(super) fn pushed_down_tables<'e>(
    topology: &Topology,
    exprs: impl IntoIterator<Item = &'e Expr>,
    outer: &HashMap<String, String>,
    group: usize,
) -> Option<usize> {
    let mut found = 0;
    let mut ok = true;
    for expr in exprs {
        walk(expr, &mut |expr| {
            let (subquery, link) = match expr {
                Expr::In {
                    expr,
                    target: InTarget::Subquery(subquery),
                    negated: false,
                    ..
                } => (subquery.as_ref(), Link::In(expr.as_ref())),
                Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => {
                    (subquery.as_ref(), Link::Correlated)
                }
                Expr::In {
                    target: InTarget::Subquery(subquery),
                    ..
                } => {
                    ok &= table_use(topology, subquery.as_ref()).sharded.is_empty();
                    return false;
                }
                _ => return true,
            };
            let sharded = table_use(topology, subquery).sharded.len();
            if sharded > 0 {
                if colocated(topology, subquery, &link, outer, group) {
                    found += sharded;
                } else {
                    ok = false;
                }
            }
            false
        });
    }
    ok.then_some(found)
}

/// How a subquery relates to its statement's row.
enum Link<'a> {
    /// `expr IN (subquery)`.
    In(&'a Expr),
    /// `[NOT] EXISTS (subquery)` or a scalar `(subquery)`: correlated in its WHERE on the
    /// shard key.
    Correlated,
}

fn colocated(
    topology: &Topology,
    subquery: &Query,
    link: &Link,
    outer: &HashMap<String, String>,
    group: usize,
) -> bool {
    if subquery.with.is_some() {
        return false;
    }
    let SetExpr::Select(select) = subquery.body.as_ref() else {
        return false;
    };
    let Ok(from) = analyze_from(topology, select) else {
        return false;
    };
    if from.group != group
        || from.key_columns.is_empty()
        || table_use(topology, subquery).sharded.len() != from.key_columns.len()
    {
        return false;
    }
    let inner = &from.key_columns;
    match link {
        Link::In(left) => {
            let [SelectItem::UnnamedExpr(item) | SelectItem::ExprWithAlias { expr: item, .. }] =
                select.projection.as_slice()
            else {
                return false;
            };
            subquery.limit_clause.is_none()
                && subquery.fetch.is_none()
                && is_key(item, inner, true)
                && is_key(left, outer, true)
        }
        Link::Correlated => select.selection.as_ref().is_some_and(|selection| {
            conjuncts(selection)
                .into_iter()
                .any(|conjunct| match conjunct {
                    Expr::BinaryOp {
                        left,
                        op: BinaryOperator::Eq,
                        right,
                    } => {
                        let outer_only: HashMap<String, String> = outer
                            .iter()
                            .filter(|(alias, _)| !inner.contains_key(*alias))
                            .map(|(a, k)| (a.clone(), k.clone()))
                            .collect();
                        (is_key(left, inner, true) && is_key(right, &outer_only, false))
                            || (is_key(right, inner, true) && is_key(left, &outer_only, false))
                    }
                    _ => false,
                })
        }),
    }
}

/// Is `expr` the shard key of one of `tables` (alias -> key)? Unqualified only if `bare` and
/// there is one table.
fn is_key(expr: &Expr, tables: &HashMap<String, String>, bare: bool) -> bool {
    match expr {
        Expr::Nested(inner) => is_key(inner, tables, bare),
        Expr::Identifier(ident) => {
            bare && tables.len() == 1 && tables.values().any(|key| *key == normalize(ident))
        }
        Expr::CompoundIdentifier(parts) if parts.len() == 2 => tables
            .get(&normalize(&parts[0]))
            .is_some_and(|key| *key == normalize(&parts[1])),
        _ => false,
    }
}

/// Visits `expr` and its operands; `visit` returns whether to look inside the node.
fn walk(expr: &Expr, visit: &mut impl FnMut(&Expr) -> bool) {
    if !visit(expr) {
        return;
    }
    match expr {
        Expr::BinaryOp { left, right, .. } => {
            walk(left, visit);
            walk(right, visit);
        }
        Expr::UnaryOp { expr, .. }
        | Expr::Nested(expr)
        | Expr::IsNull(expr)
        | Expr::IsNotNull(expr)
        | Expr::IsTrue(expr)
        | Expr::IsFalse(expr)
        | Expr::IsNotTrue(expr)
        | Expr::IsNotFalse(expr)
        | Expr::Cast { expr, .. } => walk(expr, visit),
        Expr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            if let Some(operand) = operand {
                walk(operand, visit);
            }
            for when in conditions {
                walk(&when.condition, visit);
                walk(&when.result, visit);
            }
            if let Some(else_result) = else_result {
                walk(else_result, visit);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan;
    use super::super::{Plan, PlanError};

    #[test]
    fn subqueries_on_the_shard_key_of_the_same_group_run_on_every_shard() {
        for sql in [
            "SELECT * FROM orders o WHERE o.customer_id IN (SELECT c.id FROM customers c WHERE c.region = 'fr')",
            "SELECT count(*) FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE score > 3) AND qty > 1",
            "SELECT o.id FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND c.score > 45) ORDER BY o.id LIMIT 3",
            "SELECT c.id FROM customers c WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id)",
            "SELECT c.id, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) AS n FROM customers c ORDER BY n DESC LIMIT 3",
            "SELECT o.id FROM orders o WHERE o.total > (SELECT avg(x.total) FROM orders x WHERE x.customer_id = o.customer_id)",
        ] {
            let planned = plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(matches!(planned.plan, Plan::Scatter { .. }), "{sql}");
        }
        // A write, restricted by a co-located subquery.
        let planned = plan(
            "UPDATE orders SET qty = qty + 1 WHERE customer_id IN (SELECT id FROM customers WHERE region = 'de')",
        )
        .unwrap();
        assert!(matches!(planned.plan, Plan::Scatter { write: true, .. }));
    }

    #[test]
    fn subqueries_that_are_not_co_located_run_first_or_are_refused() {
        // Uncorrelated: run first, bound as parameters.
        for sql in [
            "SELECT * FROM orders o WHERE o.id IN (SELECT c.id FROM customers c)",
            "SELECT * FROM orders o WHERE o.customer_id NOT IN (SELECT c.id FROM customers c)",
            "SELECT * FROM orders o WHERE o.customer_id IN (SELECT c.id FROM customers c ORDER BY c.score LIMIT 3)",
            "SELECT * FROM orders o WHERE o.qty > (SELECT avg(score) FROM customers)",
        ] {
            let planned = plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(matches!(planned.plan, Plan::BoundSubqueries(_)), "{sql}");
        }
        // Correlated on something else than the shard key.
        for sql in [
            "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.qty)",
            "DELETE FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.qty)",
        ] {
            match plan(sql) {
                Err(PlanError::Unsupported(_)) => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
    }
}
