//! Decorrelation of `[NOT] EXISTS` subqueries over sharded tables that the shards cannot answer
//! on their own (correlated off the shard key, or under a FROM of reference tables only).
//!
//! `WHERE EXISTS (SELECT ... FROM t WHERE t.a = outer.b AND <t only>)` keeps the rows whose
//! `outer.b` is one of the `t.a` of `t`'s matching rows: it is `outer.b IN (SELECT DISTINCT
//! t.a FROM t WHERE <t only>)`, an uncorrelated subquery the router runs first (see `bound`).
//! `NOT EXISTS`
//! keeps the others, a NULL `outer.b` included: `(outer.b IS NULL OR outer.b NOT IN (SELECT
//! t.a ... AND t.a IS NOT NULL))`. Only conjuncts of the WHERE clause are rewritten (where a
//! NULL and a false answer filter alike), and only with one equality as the correlation.
//!
//! When `outer.b` is a column of a reference table in the FROM, the other WHERE conjuncts that
//! read only that table restrict the list on the shards: `t.a IN (SELECT outer.b FROM outer
//! WHERE <those conjuncts>)`. A row those conjuncts drop is dropped anyway, and for a row they
//! keep, its `b` is in the restricted list exactly when it is in the whole one. Q22 (customers
//! of some countries with an above-average balance and no order) then moves the keys of the
//! few candidate customers that have orders instead of every customer key in `orders`.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, Query, Select, SelectItem, SetExpr, TableFactor, Visit, Visitor,
};

use super::{conjuncts, insert_defined_names, normalize, table_use};
use crate::topology::Topology;

/// Rewrites the correlated `[NOT] EXISTS` conjuncts over sharded tables of `select`'s WHERE as
/// uncorrelated `IN` subqueries; returns whether it rewrote any.
pub(super) fn exists_conjuncts(topology: &Topology, select: &mut Select) -> bool {
    let Some(selection) = &select.selection else {
        return false;
    };
    let mut changed = false;
    let is_sharded_exists = |conjunct: &Expr| {
        matches!(conjunct, Expr::Exists { subquery, .. }
            if !table_use(topology, subquery.as_ref()).sharded.is_empty())
    };
    let others: Vec<&Expr> = conjuncts(selection)
        .into_iter()
        .filter(|conjunct| !is_sharded_exists(conjunct))
        .collect();
    let rewritten: Vec<Expr> = conjuncts(selection)
        .into_iter()
        .map(|conjunct| match conjunct {
            Expr::Exists { subquery, negated } if is_sharded_exists(conjunct) => {
                let restriction =
                    |outer: &Expr| outer_restriction(topology, select, &others, outer);
                match as_in(subquery, *negated, restriction) {
                    Some(expr) => {
                        changed = true;
                        expr
                    }
                    None => conjunct.clone(),
                }
            }
            other => other.clone(),
        })
        .collect();
    if changed {
        select.selection = rewritten.into_iter().reduce(|left, right| Expr::BinaryOp {
            left: Box::new(left),
            op: BinaryOperator::And,
            right: Box::new(right),
        });
    }
    changed
}

/// `SELECT outer FROM <outer's reference table> WHERE <conjuncts on it only>`: the values of
/// `outer` (a column `q.c` of the outer FROM) that the outer WHERE can keep; `None` when `q` is
/// not a reference table of `select`'s FROM or no conjunct reads it alone.
fn outer_restriction(
    topology: &Topology,
    select: &Select,
    others: &[&Expr],
    outer: &Expr,
) -> Option<Query> {
    let Expr::CompoundIdentifier(parts) = outer else {
        return None;
    };
    let qualifier = normalize(parts.get(parts.len().checked_sub(2)?)?);
    let factor = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
        .find(|factor| match factor {
            TableFactor::Table { name, alias, .. } => match alias {
                Some(alias) => normalize(&alias.name) == qualifier,
                None => super::last_name(name) == qualifier,
            },
            _ => false,
        })?;
    let TableFactor::Table {
        name, args: None, ..
    } = factor
    else {
        return None;
    };
    if !topology.is_reference(&super::last_name(name)) {
        return None;
    }
    let usable: Vec<Expr> = others
        .iter()
        .filter(|conjunct| reads_only(topology, conjunct, &qualifier))
        .map(|conjunct| (*conjunct).clone())
        .collect();
    let selection = usable.into_iter().reduce(|left, right| Expr::BinaryOp {
        left: Box::new(left),
        op: BinaryOperator::And,
        right: Box::new(right),
    })?;
    let sql = format!("SELECT {outer} FROM {factor} WHERE {selection}");
    super::parse_query(&sql).ok()
}

/// Whether `conjunct` reads only the relation named `qualifier` (and, in its own subqueries,
/// reference tables), so that the shards can evaluate it on their copy of that table.
fn reads_only(topology: &Topology, conjunct: &Expr, qualifier: &str) -> bool {
    struct Names {
        qualifiers: HashSet<String>,
        defined: HashSet<String>,
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
                    self.qualifiers.insert(normalize(&parts[parts.len() - 2]));
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let usage = table_use(topology, conjunct);
    if !usage.sharded.is_empty() || usage.other > 0 {
        return false;
    }
    let mut names = Names {
        qualifiers: HashSet::new(),
        defined: HashSet::new(),
        bare: false,
    };
    let _ = conjunct.visit(&mut names);
    !names.bare
        && names.qualifiers.contains(qualifier)
        && names
            .qualifiers
            .iter()
            .all(|q| q == qualifier || names.defined.contains(q))
}

/// The `IN` form of `[NOT] EXISTS (subquery)`, if its correlation is one equality;
/// `restriction` gives, for the outer side of that equality, the outer query's candidate values.
fn as_in(
    subquery: &Query,
    negated: bool,
    restriction: impl Fn(&Expr) -> Option<Query>,
) -> Option<Expr> {
    if subquery.with.is_some() || subquery.limit_clause.is_some() || subquery.fetch.is_some() {
        return None;
    }
    let SetExpr::Select(select) = subquery.body.as_ref() else {
        return None;
    };
    if select.having.is_some()
        || select.distinct.is_some()
        || !matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty())
    {
        return None;
    }
    let defined = defined_names(select);
    let mut link: Option<(Expr, Expr)> = None;
    let mut local = Vec::new();
    for conjunct in conjuncts(select.selection.as_ref()?) {
        match names_of(conjunct, &defined)? {
            Side::Inner => local.push(conjunct.clone()),
            Side::Outer => return None,
            Side::Both => {
                let Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } = conjunct
                else {
                    return None;
                };
                let (inner, outer) = match (names_of(left, &defined)?, names_of(right, &defined)?) {
                    (Side::Inner, Side::Outer) => (left, right),
                    (Side::Outer, Side::Inner) => (right, left),
                    _ => return None,
                };
                if link.is_some() {
                    return None;
                }
                link = Some((inner.as_ref().clone(), outer.as_ref().clone()));
            }
        }
    }
    let (inner, outer) = link?;
    if negated {
        local.push(Expr::IsNotNull(Box::new(inner.clone())));
    }
    if let Some(candidates) = restriction(&outer) {
        local.push(Expr::In {
            expr: Box::new(inner.clone()),
            target: InTarget::Subquery(Box::new(candidates)),
            negated: false,
            global: false,
        });
    }
    let mut select = select.clone();
    select.projection = vec![SelectItem::UnnamedExpr(inner)];
    // Each value once: the list goes from the shards to the router and back as a parameter
    // (Q22's NOT EXISTS over orders: 10,000 customer keys instead of 150,000 order rows).
    select.distinct = Some(sqlparser::ast::Distinct::Distinct);
    select.selection = local.into_iter().reduce(|left, right| Expr::BinaryOp {
        left: Box::new(left),
        op: BinaryOperator::And,
        right: Box::new(right),
    });
    let mut query = subquery.clone();
    query.body = Box::new(SetExpr::Select(select));
    query.order_by = None;
    let in_list = Expr::In {
        expr: Box::new(outer.clone()),
        target: InTarget::Subquery(Box::new(query)),
        negated,
        global: false,
    };
    Some(if negated {
        Expr::Nested(Box::new(Expr::BinaryOp {
            left: Box::new(Expr::IsNull(Box::new(outer))),
            op: BinaryOperator::Or,
            right: Box::new(in_list),
        }))
    } else {
        in_list
    })
}

/// Which relations an expression reads: the subquery's own, the outer query's, or both.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Inner,
    Outer,
    Both,
}

/// The side of `expr`'s column references; `None` when it has a bare name or a subquery (the
/// binder qualified every name it could place).
fn names_of(expr: &Expr, defined: &HashSet<String>) -> Option<Side> {
    struct Names<'d> {
        defined: &'d HashSet<String>,
        inner: bool,
        outer: bool,
        unclear: bool,
    }
    impl Visitor for Names<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
            self.unclear = true;
            ControlFlow::Break(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Identifier(_) => self.unclear = true,
                Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                    if self.defined.contains(&normalize(&parts[parts.len() - 2])) {
                        self.inner = true;
                    } else {
                        self.outer = true;
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut names = Names {
        defined,
        inner: false,
        outer: false,
        unclear: false,
    };
    let _ = expr.visit(&mut names);
    match (names.unclear, names.inner, names.outer) {
        (true, _, _) => None,
        (false, _, false) => Some(Side::Inner),
        (false, false, true) => Some(Side::Outer),
        (false, true, true) => Some(Side::Both),
    }
}

/// Names (tables and aliases) a SELECT's FROM defines.
fn defined_names(select: &Select) -> HashSet<String> {
    let mut defined = HashSet::new();
    for table in &select.from {
        let mut factors = vec![&table.relation];
        factors.extend(table.joins.iter().map(|j| &j.relation));
        for factor in factors {
            match factor {
                TableFactor::Table { name, alias, .. } => {
                    defined.insert(super::last_name(name));
                    if let Some(alias) = alias {
                        defined.insert(normalize(&alias.name));
                    }
                }
                TableFactor::Derived {
                    alias: Some(alias), ..
                } => {
                    defined.insert(normalize(&alias.name));
                }
                _ => {}
            }
        }
    }
    defined
}

#[cfg(test)]
mod tests {
    use crate::plan::parse_query;
    use crate::plan::tests::topology;

    fn rewritten(sql: &str) -> String {
        let mut query = parse_query(sql).unwrap();
        let sqlparser::ast::SetExpr::Select(select) = query.body.as_mut() else {
            unreachable!()
        };
        assert!(super::exists_conjuncts(&topology(), select));
        query.to_string()
    }

    #[test]
    fn exists_becomes_in_and_not_exists_keeps_nulls() {
        assert_eq!(
            rewritten(
                "SELECT 1 FROM countries k WHERE k.code <> 'x' AND NOT EXISTS (SELECT * FROM orders o WHERE o.note = k.code AND o.qty > 1)"
            ),
            "SELECT 1 FROM countries k WHERE k.code <> 'x' AND (k.code IS NULL OR k.code NOT IN (SELECT DISTINCT o.note FROM orders o WHERE o.qty > 1 AND o.note IS NOT NULL AND o.note IN (SELECT k.code FROM countries k WHERE k.code <> 'x')))"
        );
        assert_eq!(
            rewritten(
                "SELECT 1 FROM countries k WHERE EXISTS (SELECT 1 FROM orders o WHERE k.code = o.note)"
            ),
            "SELECT 1 FROM countries k WHERE k.code IN (SELECT DISTINCT o.note FROM orders o)"
        );
    }

    #[test]
    fn conjuncts_on_the_outer_reference_table_restrict_the_list() {
        // The conjuncts reading `k` alone (a subquery over reference tables included) travel
        // to the shards; the one reading another table stays outside.
        assert_eq!(
            rewritten(
                "SELECT 1 FROM countries k, countries j WHERE k.code <> 'x' \
                 AND k.code > (SELECT min(c.code) FROM countries c) AND j.code = k.code \
                 AND NOT EXISTS (SELECT * FROM orders o WHERE o.note = k.code)"
            ),
            "SELECT 1 FROM countries k, countries j WHERE k.code <> 'x' \
             AND k.code > (SELECT min(c.code) FROM countries c) AND j.code = k.code \
             AND (k.code IS NULL OR k.code NOT IN (SELECT DISTINCT o.note FROM orders o \
             WHERE o.note IS NOT NULL AND o.note IN (SELECT k.code FROM countries k \
             WHERE k.code <> 'x' AND k.code > (SELECT min(c.code) FROM countries c))))"
        );
        // A conjunct with a subquery over a sharded table cannot run inside the shards' list.
        assert_eq!(
            rewritten(
                "SELECT 1 FROM countries k WHERE k.code > (SELECT max(o.note) FROM orders o) \
                 AND EXISTS (SELECT 1 FROM orders o WHERE k.code = o.note)"
            ),
            "SELECT 1 FROM countries k WHERE k.code > (SELECT max(o.note) FROM orders o) \
             AND k.code IN (SELECT DISTINCT o.note FROM orders o)"
        );
    }
}
