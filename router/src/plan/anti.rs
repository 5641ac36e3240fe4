//! `NOT EXISTS` over a sharded table below a FROM of reference tables, answered by every shard at
//! once.
//!
//! `SELECT ... FROM customer c WHERE <c only> AND NOT EXISTS (SELECT * FROM orders o WHERE
//! o.o_custkey = c.c_custkey)`: every shard holds all of `customer` and its own part of
//! `orders`, so it can run the statement as written and keep the customers without an order *on
//! that shard*. A customer has no order at all exactly when every shard keeps it. The first
//! shard runs the statement with the outer columns the subqueries read (`c.c_custkey`) appended
//! as hidden key columns; the keys it kept go to each other shard in turn as arrays, with a
//! statement that runs only the subqueries over them (`anti_check`), and the router keeps the
//! first shard's rows whose key passed everywhere: the rows sharing a key share the subquery's
//! answer on each shard, so a shard keeps either all of them or none. (For results in binary
//! format, every shard runs the whole statement at once and the router keeps the first shard's
//! rows whose key every other shard sent too.)
//!
//! TPC-H Q22 (customers of some countries with an above-average balance and no order) then costs
//! one pass over `customer` and a few index probes per shard, where the list form (`c_custkey
//! NOT IN (keys with orders)`, see `decorrelate.rs`) costs one pass to find the keys and another
//! to read the customers, and running the whole statement on every shard repeats the pass over
//! `customer` once per shard (on two cores shared with other work, that is twice the time).
//!
//! Only a plain SELECT (no aggregates, GROUP BY, DISTINCT, window functions, ORDER BY or
//! LIMIT, which would need the kept rows first) whose sharded tables are each the one sharded
//! table of a `NOT EXISTS` conjunct of its WHERE; nothing that may answer differently on each
//! shard (`random()`, `now()`, ...) in the WHERE.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, GroupByExpr, Ident, Query, SelectItem, SetExpr, TableFactor, Value, Visit, VisitMut,
    Visitor, VisitorMut,
};

use super::{
    MergeSpec, Plan, Planned, conjuncts, contains_aggregate, insert_defined_names, last_name,
    normalize, projection_exprs, table_use,
};
use crate::topology::Topology;

/// Functions whose answer may differ from one shard to another (or one call to the next): a
/// WHERE that calls one would keep different rows on each shard.
const VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "nextval",
    "currval",
    "lastval",
    "now",
    "clock_timestamp",
    "timeofday",
    "statement_timestamp",
    "transaction_timestamp",
    "current_timestamp",
    "current_time",
    "localtime",
    "localtimestamp",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "txid_current",
    "pg_current_xact_id",
    "pg_backend_pid",
];

/// Prefix of the hidden key columns' names.
const KEY_ALIAS: &str = "__pgr_anti_";

/// The keys' relation in the check statement.
const KEYS_ALIAS: &str = "__pgr_keys";

/// The plan described in the module documentation, or `None` when `query` is not of that form.
pub(super) fn plan(topology: &Topology, query: &Query) -> Option<Planned> {
    if query.with.is_some()
        || !query.locks.is_empty()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return None;
    }
    let mut query = query.clone();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return None;
    };
    let from = table_use(topology, &select.from);
    let plain = select.distinct.is_none()
        && select.having.is_none()
        && select.named_window.is_empty()
        && select.qualify.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    if !plain || !from.sharded.is_empty() || from.other > 0 {
        return None;
    }
    let projection_use = table_use(topology, &select.projection);
    if !projection_use.sharded.is_empty()
        || projection_exprs(select).any(|e| contains_aggregate(e) || has_window(e))
    {
        return None;
    }
    let mut keys: Vec<Expr> = Vec::new();
    let mut subqueries: Vec<Query> = Vec::new();
    let mut anti = 0;
    for conjunct in conjuncts(select.selection.as_ref()?) {
        let usage = table_use(topology, conjunct);
        if usage.other > 0 || calls_volatile(conjunct) {
            return None;
        }
        if usage.sharded.is_empty() {
            continue;
        }
        let Expr::Exists {
            subquery,
            negated: true,
        } = conjunct
        else {
            return None;
        };
        for key in outer_columns(topology, subquery)? {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        subqueries.push(subquery.as_ref().clone());
        anti += 1;
    }
    // Uncorrelated, the subquery is better run once first (see `bound.rs`).
    if anti == 0 || keys.is_empty() {
        return None;
    }
    let hidden = keys.len();
    let check = check_sql(&keys, subqueries);
    for (i, key) in keys.into_iter().enumerate() {
        select.projection.push(SelectItem::ExprWithAlias {
            expr: key,
            alias: Ident::new(format!("{KEY_ALIAS}{i}")),
        });
    }
    Some(Planned {
        sql: query.to_string(),
        plan: Plan::Scatter {
            shards: None,
            merge: MergeSpec {
                hidden,
                intersect: true,
                anti_check: check,
                ..MergeSpec::default()
            },
            write: false,
        },
        returns_rows: true,
    })
}

/// The statement that tells which of the first shard's keys pass the `NOT EXISTS` subqueries
/// on another shard: `SELECT k.__k0, ... FROM unnest($1, ...) AS __pgr_keys(__k0, ...) WHERE
/// NOT EXISTS (<subquery, the outer columns replaced by the keys>) AND ...`, one array
/// parameter per key column. `None` when a subquery has the client's parameters (their
/// numbers would clash with the arrays').
fn check_sql(keys: &[Expr], subqueries: Vec<Query>) -> Option<String> {
    struct Replace<'k> {
        keys: &'k [Expr],
        placeholder: bool,
    }
    impl VisitorMut for Replace<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            if let Some(i) = self.keys.iter().position(|key| key == expr) {
                *expr = Expr::CompoundIdentifier(vec![
                    Ident::new(KEYS_ALIAS),
                    Ident::new(format!("__k{i}")),
                ]);
            } else if let Expr::Value(value) = expr {
                self.placeholder |= matches!(value.value, Value::Placeholder(_));
            }
            ControlFlow::Continue(())
        }
    }
    let mut conditions = Vec::with_capacity(subqueries.len());
    for mut subquery in subqueries {
        let mut replace = Replace {
            keys,
            placeholder: false,
        };
        let _ = VisitMut::visit(&mut subquery, &mut replace);
        if replace.placeholder {
            return None;
        }
        conditions.push(format!("NOT EXISTS ({subquery})"));
    }
    let columns: Vec<String> = (0..keys.len()).map(|i| format!("__k{i}")).collect();
    let arrays: Vec<String> = (1..=keys.len()).map(|i| format!("${i}")).collect();
    let selected: Vec<String> = columns
        .iter()
        .map(|column| format!("{KEYS_ALIAS}.{column}"))
        .collect();
    Some(format!(
        "SELECT {} FROM unnest({}) AS {KEYS_ALIAS}({}) WHERE {}",
        selected.join(", "),
        arrays.join(", "),
        columns.join(", "),
        conditions.join(" AND ")
    ))
}

/// The outer statement's columns a `NOT EXISTS` subquery reads, if each shard can answer it
/// over its own rows: one sharded table in its own FROM (none in deeper subqueries), no
/// aggregate, grouping or limit, every column name qualified (as the binder leaves them).
fn outer_columns(topology: &Topology, subquery: &Query) -> Option<Vec<Expr>> {
    if subquery.with.is_some() || subquery.limit_clause.is_some() || subquery.fetch.is_some() {
        return None;
    }
    let SetExpr::Select(select) = subquery.body.as_ref() else {
        return None;
    };
    let plain = select.distinct.is_none()
        && select.having.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    let usage = table_use(topology, subquery);
    if !plain
        || usage.other > 0
        || usage.sharded.len() != 1
        || table_use(topology, &select.from).sharded.len() != 1
        || projection_exprs(select).any(|e| contains_aggregate(e) || has_window(e))
        || calls_volatile(subquery)
    {
        return None;
    }
    struct Names {
        defined: HashSet<String>,
        references: Vec<Expr>,
        bare: bool,
    }
    impl Visitor for Names {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            insert_defined_names(factor, &mut self.defined);
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Identifier(_) => self.bare = true,
                Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                    self.references.push(expr.clone())
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut names = Names {
        defined: HashSet::new(),
        references: Vec::new(),
        bare: false,
    };
    let _ = subquery.visit(&mut names);
    if names.bare {
        return None;
    }
    let outer = names
        .references
        .into_iter()
        .filter(|expr| {
            let Expr::CompoundIdentifier(parts) = expr else {
                return false;
            };
            !names.defined.contains(&normalize(&parts[parts.len() - 2]))
        })
        .collect();
    Some(outer)
}

/// Whether `node` calls a function of [`VOLATILE`].
fn calls_volatile(node: &impl Visit) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(node, |expr| {
        if let Expr::Function(function) = expr {
            found |= VOLATILE.contains(&last_name(&function.name).as_str());
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// Whether `expr` has a window function (`... OVER (...)`).
fn has_window(expr: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(expr, |expr| {
        if let Expr::Function(function) = expr {
            found |= function.over.is_some();
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::super::tests::plan;
    use super::*;

    #[test]
    fn not_exists_under_reference_tables_runs_on_every_shard_and_intersects() {
        let planned = plan(
            "SELECT c.code, c.name FROM countries c WHERE c.code <> $1 \
             AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code AND o.qty > c.size)",
        )
        .unwrap();
        let Plan::Scatter { shards, merge, .. } = &planned.plan else {
            panic!("{planned:?}");
        };
        assert_eq!(*shards, None);
        assert!(merge.intersect);
        assert_eq!(merge.hidden, 2);
        assert_eq!(
            merge.anti_check.as_deref(),
            Some(
                "SELECT __pgr_keys.__k0, __pgr_keys.__k1 FROM unnest($1, $2) \
                 AS __pgr_keys(__k0, __k1) WHERE NOT EXISTS (SELECT 1 FROM orders o \
                 WHERE o.note = __pgr_keys.__k0 AND o.qty > __pgr_keys.__k1)"
            )
        );
        assert!(
            planned.sql.starts_with(
                "SELECT c.code, c.name, c.code AS __pgr_anti_0, c.size AS __pgr_anti_1 FROM"
            ),
            "{}",
            planned.sql
        );
    }

    #[test]
    fn what_the_intersection_cannot_answer_keeps_its_plan() {
        for sql in [
            // EXISTS holds when one shard has a row: not an intersection.
            "SELECT c.code FROM countries c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code)",
            // Grouped or ordered: the kept rows are needed first.
            "SELECT count(*) FROM countries c WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code)",
            "SELECT c.code FROM countries c WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code) ORDER BY c.code",
            // A different answer on each shard.
            "SELECT c.code FROM countries c WHERE random() < 0.5 AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.note = c.code)",
            // The subquery aggregates (EXISTS of an aggregate always holds).
            "SELECT c.code FROM countries c WHERE NOT EXISTS (SELECT count(*) FROM orders o WHERE o.note = c.code)",
        ] {
            let planned = plan(sql);
            let intersect = matches!(
                &planned,
                Ok(Planned { plan: Plan::Scatter { merge, .. }, .. }) if merge.intersect
            );
            assert!(!intersect, "{sql}: {planned:?}");
        }
    }
}
