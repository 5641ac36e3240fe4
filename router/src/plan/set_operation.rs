//! UNION and UNION ALL across shards.
//!
//! A union of SELECTs in which every row comes from exactly one shard can run whole on every
//! shard: the union of the shards' answers is the answer (for UNION, once the router removes
//! the duplicates between shards). That holds for a SELECT that reads sharded tables through
//! inner, co-located joins, without aggregates, DISTINCT, window functions, LIMIT or subqueries
//! over sharded tables: each of its rows contains a row of a sharded table, which lives on one
//! shard. ORDER BY (output positions or names), LIMIT and OFFSET of the union are merged as for
//! any scatter-gather query. INTERSECT and EXCEPT do not split this way and stay unsupported.

use sqlparser::ast::{
    Expr, GroupByExpr, JoinOperator, OrderByKind, Query, Select, SelectItem, SetExpr, SetOperator,
    SetQuantifier,
};

use super::{
    ColumnRef, MergeSpec, Plan, PlanError, Planned, analyze_from, contains_aggregate, literal_u64,
    normalize, paging, shard_limit, sort_key, table_use, unsupported,
};
use crate::topology::Topology;

/// Plans a UNION [ALL] over sharded tables as a scatter-gather of the whole statement.
pub(super) fn plan_union(topology: &Topology, mut query: Query) -> Result<Planned, PlanError> {
    let refused = || unsupported("UNION/INTERSECT/EXCEPT over sharded tables");
    if query.with.is_some() || !query.locks.is_empty() {
        return refused();
    }
    let mut branches = Vec::new();
    let mut quantifiers = Vec::new();
    if !collect(query.body.as_ref(), &mut branches, &mut quantifiers) {
        return refused();
    }
    let all = quantifiers.iter().all(|q| *q == SetQuantifier::All);
    let distinct = quantifiers
        .iter()
        .all(|q| matches!(q, SetQuantifier::Distinct | SetQuantifier::None));
    if !all && !distinct {
        return unsupported("UNION mixed with UNION ALL across shards");
    }
    for select in &branches {
        if !splits_by_shard(topology, select) {
            return refused();
        }
    }
    // The union's columns are named after the first branch.
    let first = branches[0];
    let names: Option<Vec<Option<String>>> = first
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(Expr::Identifier(ident)) => Some(Some(normalize(ident))),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => {
                Some(parts.last().map(normalize))
            }
            SelectItem::ExprWithAlias { alias, .. } => Some(Some(normalize(alias))),
            SelectItem::UnnamedExpr(_) => Some(None),
            _ => None,
        })
        .collect();
    let paging = paging(&query)?;
    query.fetch = None;
    let mut order = Vec::new();
    if let Some(order_by) = &query.order_by {
        let OrderByKind::Expressions(items) = &order_by.kind else {
            return unsupported("ORDER BY ALL");
        };
        for item in items {
            let width = names.as_ref().map(Vec::len);
            let column = match (literal_u64(&item.expr), &item.expr, &names) {
                (Some(n), _, _) if n >= 1 && width.is_some_and(|w| n as usize <= w) => {
                    n as usize - 1
                }
                (None, Expr::Identifier(ident), Some(names)) => names
                    .iter()
                    .position(|name| name.as_deref() == Some(normalize(ident).as_str()))
                    .ok_or_else(|| {
                        PlanError::Unsupported(format!(
                            "ORDER BY {ident} of a UNION across shards (name an output column)"
                        ))
                    })?,
                _ => {
                    return unsupported(
                        "ORDER BY of a UNION across shards other than by output column",
                    );
                }
            };
            order.push(sort_key(ColumnRef::Front(column), item));
        }
    }
    // Every shard sorts its part (the merge keeps the order) and stops at LIMIT + OFFSET.
    query.limit_clause = shard_limit(&paging);
    Ok(Planned {
        sql: query.to_string(),
        plan: Plan::Scatter {
            shards: None,
            merge: {
                let mut merge = MergeSpec {
                    order,
                    distinct,
                    ..MergeSpec::default()
                };
                paging.apply(&mut merge);
                merge
            },
            write: false,
        },
        returns_rows: true,
    })
}

/// The SELECTs of a tree of UNIONs, and the quantifier of each UNION; `false` for anything else.
fn collect<'q>(
    body: &'q SetExpr,
    branches: &mut Vec<&'q Select>,
    quantifiers: &mut Vec<SetQuantifier>,
) -> bool {
    match body {
        SetExpr::Select(select) => {
            branches.push(select);
            true
        }
        SetExpr::SetOperation {
            op: SetOperator::Union,
            set_quantifier,
            left,
            right,
        } if matches!(
            set_quantifier,
            SetQuantifier::All | SetQuantifier::Distinct | SetQuantifier::None
        ) =>
        {
            quantifiers.push(*set_quantifier);
            collect(left, branches, quantifiers) && collect(right, branches, quantifiers)
        }
        _ => false,
    }
}

/// Does every row of `select` come from exactly one shard (see the module documentation)?
fn splits_by_shard(topology: &Topology, select: &Select) -> bool {
    let plain = select.distinct.is_none()
        && select.having.is_none()
        && select.into.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        && select.projection.iter().all(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                !contains_aggregate(e)
            }
            _ => true,
        });
    let inner = select.from.iter().all(|table| {
        table.joins.iter().all(|join| {
            matches!(
                join.join_operator,
                JoinOperator::Join(_) | JoinOperator::Inner(_) | JoinOperator::CrossJoin(_)
            )
        })
    });
    if !plain || !inner || analyze_from(topology, select).is_err() {
        return false;
    }
    // Every sharded table in the FROM itself: none in subqueries, none the router does not know.
    let usage = table_use(topology, select);
    usage.other == 0
        && usage.sharded.len()
            == super::pinned::sharded_in_from(topology, select, &Default::default())
}

#[cfg(test)]
mod tests {
    use crate::plan::tests::plan;
    use crate::plan::{Plan, PlanError};

    use super::plan_union;
    use crate::plan::parse_query;

    #[test]
    fn unions_of_rows_from_one_shard_each_scatter_and_merge() {
        let planned = plan(
            "SELECT id, name FROM customers UNION SELECT customer_id, note FROM orders \
             ORDER BY name DESC, 1 LIMIT 5 OFFSET 2",
        )
        .unwrap();
        let Plan::Scatter { shards, merge, .. } = &planned.plan else {
            panic!("{:?}", planned.plan)
        };
        assert_eq!(*shards, None);
        assert!(merge.distinct);
        assert_eq!((merge.limit, merge.offset), (Some(5), 2));
        assert_eq!(merge.order.len(), 2);
        assert!(planned.sql.ends_with("LIMIT 7"), "{}", planned.sql);
        let all = plan("SELECT id FROM customers UNION ALL SELECT id FROM orders").unwrap();
        let Plan::Scatter { merge, .. } = &all.plan else {
            panic!()
        };
        assert!(!merge.distinct);
    }

    #[test]
    fn set_operations_whose_rows_do_not_split_by_shard_run_in_stages() {
        for sql in [
            "SELECT count(*) FROM customers UNION ALL SELECT count(*) FROM orders",
            "SELECT id FROM customers UNION SELECT 1",
            "SELECT DISTINCT id FROM customers UNION ALL SELECT id FROM orders",
            "SELECT id FROM customers UNION ALL SELECT id FROM orders UNION SELECT id FROM orders",
            "SELECT c.id FROM countries k LEFT JOIN customers c ON c.name = k.name UNION ALL SELECT id FROM orders",
            "SELECT id FROM customers INTERSECT SELECT id FROM orders",
            "SELECT id, row_number() OVER () FROM customers UNION ALL SELECT id, 1 FROM orders",
        ] {
            assert!(
                plan_union(&super::super::tests::topology(), parse_query(sql).unwrap()).is_err(),
                "{sql} merges"
            );
            let planned = plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(matches!(planned.plan, Plan::MultiStage(_)), "{sql}");
        }
        let error = plan(
            "SELECT id FROM customers UNION ALL SELECT id FROM orders LIMIT 1 OFFSET 1 ORDER BY id",
        )
        .unwrap_err();
        assert!(matches!(error, PlanError::Syntax(_)), "{error}");
    }
}
