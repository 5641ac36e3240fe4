//! Decorrelation of scalar aggregate subqueries over sharded tables into joins with grouped
//! derived tables, as Citus and DuckDB do.
//!
//! `WHERE l_quantity < (SELECT 0.2 * avg(l_quantity) FROM lineitem WHERE l_partkey = p_partkey)`
//! (TPC-H Q17) asks one aggregate per outer row, grouped by the correlation: it is the join
//! `FROM ..., (SELECT l_partkey AS __pgr_key0, 0.2 * avg(l_quantity) AS __pgr_value FROM
//! lineitem GROUP BY l_partkey) AS __pgr_sq0 WHERE p_partkey = __pgr_sq0.__pgr_key0 AND
//! l_quantity < __pgr_sq0.__pgr_value`. The derived table is then an ordinary grouped query
//! over a sharded table: each shard aggregates partially and the router merges the groups (a
//! stage, see `intermediate`), and the outer statement reads the groups as any table.
//!
//! The rewrite is exact only where an outer row without a group would be filtered anyway: the
//! subquery is one side of a comparison that is a conjunct of WHERE, and its value is built
//! from `sum`/`avg`/`min`/`max` (NULL over no rows) with literals and arithmetic (NULL in,
//! NULL out), so that "no inner rows" gives a NULL comparison, as the inner join's missing row
//! does. The correlation must be equalities between the subquery's own expressions and the
//! outer statement's; any other use of outer names keeps the subquery as written (and refused).
//!
//! Elsewhere (in the select list, with `count`, inside an OR) the groups are LEFT JOINed and an
//! outer row without one gets what the aggregates give over no rows (`count` 0, the others
//! NULL), so the rewrite is exact there too (see `left_joins`).
//!
//! When the correlated outer columns all belong to one reference table, the outer WHERE's
//! conditions on that table go into the derived table as `key IN (SELECT column FROM table
//! WHERE ...)` (a semi-join reduction): the shards then aggregate only the groups the join can
//! use (Q17 aggregates the parts of one brand and container, not all 20,000).

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, GroupByExpr, Join, JoinConstraint, JoinOperator, Query, Select,
    SelectItem, SetExpr, TableFactor, UnaryOperator, Visit, VisitMut, Visitor, VisitorMut,
    visit_expressions_mut,
};

use super::{
    PlanError, conjuncts, contains_aggregate, default_column_name, is_aggregate_call, last_name,
    normalize, parse_query, table_use,
};
use crate::topology::Topology;

/// Rewrites the correlated scalar aggregate subqueries over sharded tables in the conjuncts of
/// `select`'s WHERE as joins with grouped derived tables; returns whether it rewrote any.
pub(super) fn scalar_conjuncts(
    topology: &Topology,
    select: &mut Select,
) -> Result<bool, PlanError> {
    let Some(selection) = &select.selection else {
        return Ok(false);
    };
    let outer_defined = defined_names(select);
    let all: Vec<Expr> = conjuncts(selection).into_iter().cloned().collect();
    let mut kept = Vec::with_capacity(all.len());
    let mut derived = Vec::new();
    for (index, conjunct) in all.iter().enumerate() {
        let Some((subquery, rebuild)) = compared_subquery(conjunct) else {
            kept.push(conjunct.clone());
            continue;
        };
        if table_use(topology, subquery).sharded.is_empty() {
            kept.push(conjunct.clone());
            continue;
        }
        let name = format!("__pgr_sq{}", derived.len());
        let others: Vec<&Expr> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, c)| c)
            .collect();
        let Some(grouped) = grouped(
            topology,
            select,
            &outer_defined,
            subquery,
            &others,
            &name,
            false,
        )?
        else {
            kept.push(conjunct.clone());
            continue;
        };
        kept.push(rebuild(column(&name, "__pgr_value")));
        for (i, outer) in grouped.links.into_iter().enumerate() {
            kept.push(Expr::BinaryOp {
                left: Box::new(outer),
                op: BinaryOperator::Eq,
                right: Box::new(column(&name, &format!("__pgr_key{i}"))),
            });
        }
        derived.push(grouped.table);
    }
    if derived.is_empty() {
        return Ok(false);
    }
    select.from.extend(derived);
    select.selection = kept.into_iter().reduce(|left, right| Expr::BinaryOp {
        left: Box::new(left),
        op: BinaryOperator::And,
        right: Box::new(right),
    });
    Ok(true)
}

/// Rewrites the correlated scalar aggregate subqueries over sharded tables anywhere in
/// `select`'s WHERE (and, when the statement does not aggregate itself, in its select list) as
/// LEFT JOINs with grouped derived tables: each outer row meets at most one group, and one
/// without a group gets the value the aggregates give over no rows (`count` 0, the others
/// NULL): `CASE WHEN __pgr_sqN.__pgr_rows IS NULL THEN <that> ELSE __pgr_sqN.__pgr_value END`.
/// Returns whether it rewrote any.
pub(super) fn left_joins(topology: &Topology, select: &mut Select) -> Result<bool, PlanError> {
    let outer_defined = defined_names(select);
    let conjuncts_now: Vec<Expr> = select
        .selection
        .as_ref()
        .map(|selection| conjuncts(selection).into_iter().cloned().collect())
        .unwrap_or_default();
    let mut finder = ScalarSubqueries {
        topology,
        select: select.clone(),
        outer_defined,
        conjuncts: conjuncts_now,
        joins: Vec::new(),
        error: None,
        depth: 0,
    };
    if let Some(selection) = &mut select.selection {
        let _ = selection.visit(&mut finder);
    }
    let aggregating = !matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
        || select.having.is_some()
        || select.projection.iter().any(|item| match item {
            SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => {
                contains_aggregate(expr)
            }
            _ => false,
        });
    if !aggregating {
        for item in &mut select.projection {
            // The column keeps the name PostgreSQL gives a subquery (its own column's).
            if let SelectItem::UnnamedExpr(expr) = item
                && let Some(subquery) = as_subquery(expr)
                && let SetExpr::Select(inner) = subquery.body.as_ref()
                && let [
                    SelectItem::UnnamedExpr(value) | SelectItem::ExprWithAlias { expr: value, .. },
                ] = inner.projection.as_slice()
            {
                let name = match &inner.projection[0] {
                    SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
                    _ => default_column_name(value),
                };
                *item = SelectItem::ExprWithAlias {
                    expr: expr.clone(),
                    alias: sqlparser::ast::Ident::with_quote('"', name),
                };
            }
            if let SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } = item {
                let _ = expr.visit(&mut finder);
            }
        }
    }
    if let Some(error) = finder.error {
        return Err(error);
    }
    if finder.joins.is_empty() {
        return Ok(false);
    }
    // One FROM item, so that the joins' conditions may read every relation: `a, b` is
    // `a CROSS JOIN b` (the same rows while the items' own joins are inner or left).
    let flat = select.from.iter().all(|table| {
        table.joins.iter().all(|join| {
            matches!(
                join.join_operator,
                JoinOperator::Join(_)
                    | JoinOperator::Inner(_)
                    | JoinOperator::Left(_)
                    | JoinOperator::LeftOuter(_)
                    | JoinOperator::CrossJoin(_)
            )
        })
    });
    if !flat || select.from.is_empty() {
        return Ok(false);
    }
    let mut items = std::mem::take(&mut select.from).into_iter();
    let mut from = items.next().expect("a FROM item");
    for item in items {
        from.joins.push(Join {
            relation: item.relation,
            global: false,
            join_operator: JoinOperator::CrossJoin(JoinConstraint::None),
        });
        from.joins.extend(item.joins);
    }
    from.joins.extend(finder.joins);
    select.from = vec![from];
    Ok(true)
}

/// Replaces correlated scalar aggregate subqueries with their LEFT JOINed groups' values.
struct ScalarSubqueries<'t> {
    topology: &'t Topology,
    /// The statement as it was (its FROM and WHERE for the groups' restriction).
    select: Select,
    outer_defined: HashSet<String>,
    conjuncts: Vec<Expr>,
    /// The LEFT JOINs to add.
    joins: Vec<Join>,
    error: Option<PlanError>,
    /// Depth inside subqueries left as they are (their own subqueries are theirs).
    depth: usize,
}

impl VisitorMut for ScalarSubqueries<'_> {
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
        let Expr::Subquery(subquery) = expr else {
            return ControlFlow::Continue(());
        };
        if table_use(self.topology, subquery.as_ref())
            .sharded
            .is_empty()
        {
            return ControlFlow::Continue(());
        }
        let name = format!("__pgr_lj{}", self.joins.len());
        let others: Vec<&Expr> = self.conjuncts.iter().collect();
        let grouped = match grouped(
            self.topology,
            &self.select,
            &self.outer_defined,
            subquery,
            &others,
            &name,
            true,
        ) {
            Ok(Some(grouped)) => grouped,
            Ok(None) => return ControlFlow::Continue(()),
            Err(error) => {
                self.error = Some(error);
                return ControlFlow::Break(());
            }
        };
        let SetExpr::Select(inner) = subquery.body.as_ref() else {
            return ControlFlow::Continue(());
        };
        let value = match &inner.projection[0] {
            SelectItem::UnnamedExpr(value) | SelectItem::ExprWithAlias { expr: value, .. } => value,
            _ => return ControlFlow::Continue(()),
        };
        let Some(empty) = empty_value(value) else {
            return ControlFlow::Continue(());
        };
        let on = grouped
            .links
            .iter()
            .enumerate()
            .map(|(i, outer)| Expr::BinaryOp {
                left: Box::new(outer.clone()),
                op: BinaryOperator::Eq,
                right: Box::new(column(&name, &format!("__pgr_key{i}"))),
            })
            .reduce(|left, right| Expr::BinaryOp {
                left: Box::new(left),
                op: BinaryOperator::And,
                right: Box::new(right),
            })
            .expect("a correlation");
        self.joins.push(Join {
            relation: grouped.table.relation,
            global: false,
            join_operator: JoinOperator::LeftOuter(JoinConstraint::On(on)),
        });
        *expr = Expr::Nested(Box::new(Expr::Case {
            case_token: sqlparser::ast::helpers::attached_token::AttachedToken::empty(),
            end_token: sqlparser::ast::helpers::attached_token::AttachedToken::empty(),
            operand: None,
            conditions: vec![sqlparser::ast::CaseWhen {
                condition: Expr::IsNull(Box::new(column(&name, "__pgr_rows"))),
                result: empty,
            }],
            else_result: Some(Box::new(column(&name, "__pgr_value"))),
        }));
        ControlFlow::Continue(())
    }
}

/// The value of an aggregate expression over no rows: its `count` calls 0, its other
/// aggregates NULL; `None` if it reads a column outside its aggregates or has a subquery.
fn empty_value(expr: &Expr) -> Option<Expr> {
    if !contains_aggregate(expr) || !all_defined_names(expr).is_empty() {
        return None;
    }
    let mut empty = expr.clone();
    let mut nested_query = false;
    let _ = visit_expressions_mut(&mut empty, |e| {
        match e {
            Expr::Subquery(_) | Expr::Exists { .. } => nested_query = true,
            Expr::Function(function) if is_aggregate_call(function) => {
                let zero = last_name(&function.name) == "count";
                *e = Expr::value(if zero {
                    sqlparser::ast::Value::Number("0".into(), false)
                } else {
                    sqlparser::ast::Value::Null
                });
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    let outside = qualifiers_of(&empty)?;
    (!nested_query && outside.is_empty()).then_some(empty)
}

/// `relation.column`.
fn column(relation: &str, name: &str) -> Expr {
    Expr::CompoundIdentifier(vec![
        sqlparser::ast::Ident::new(relation),
        sqlparser::ast::Ident::new(name),
    ])
}

/// A rebuilt conjunct with the subquery replaced by an expression.
type Rebuild = Box<dyn Fn(Expr) -> Expr>;

/// The subquery of a conjunct `expr op (subquery)` or `(subquery) op expr` (op a comparison),
/// and how to rebuild the conjunct around a replacement.
fn compared_subquery(conjunct: &Expr) -> Option<(&Query, Rebuild)> {
    let Expr::BinaryOp { left, op, right } = conjunct else {
        return None;
    };
    if !matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    ) {
        return None;
    }
    let op = op.clone();
    if let Some(subquery) = as_subquery(right) {
        let left = left.clone();
        return Some((
            subquery,
            Box::new(move |value| Expr::BinaryOp {
                left: left.clone(),
                op: op.clone(),
                right: Box::new(value),
            }),
        ));
    }
    let subquery = as_subquery(left)?;
    let right = right.clone();
    Some((
        subquery,
        Box::new(move |value| Expr::BinaryOp {
            left: Box::new(value),
            op: op.clone(),
            right: right.clone(),
        }),
    ))
}

fn as_subquery(expr: &Expr) -> Option<&Query> {
    match expr {
        Expr::Subquery(query) => Some(query),
        Expr::Nested(inner) => as_subquery(inner),
        _ => None,
    }
}

/// A grouped derived table standing for a correlated subquery.
struct Grouped {
    /// `(SELECT keys..., value FROM ... GROUP BY keys) AS name`, a FROM item.
    table: sqlparser::ast::TableWithJoins,
    /// The outer expression each key `__pgr_keyN` equals.
    links: Vec<Expr>,
}

/// The grouped form of `subquery`, if it is a correlated scalar aggregate whose correlation is
/// equalities with `select`'s relations; `None` when it is not (the caller keeps it).
fn grouped(
    topology: &Topology,
    select: &Select,
    outer_defined: &HashSet<String>,
    subquery: &Query,
    outer_conjuncts: &[&Expr],
    name: &str,
    left: bool,
) -> Result<Option<Grouped>, PlanError> {
    if subquery.with.is_some()
        || subquery.limit_clause.is_some()
        || subquery.fetch.is_some()
        || !subquery.locks.is_empty()
    {
        return Ok(None);
    }
    let SetExpr::Select(inner) = subquery.body.as_ref() else {
        return Ok(None);
    };
    let ungrouped =
        matches!(&inner.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    if !ungrouped || inner.having.is_some() || inner.distinct.is_some() || inner.from.is_empty() {
        return Ok(None);
    }
    let value = match inner.projection.as_slice() {
        [SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. }] => expr,
        _ => return Ok(None),
    };
    // An inner join drops the outer rows without a group: right only where the value is NULL
    // then. A left join keeps them, and the caller writes the value over no rows itself.
    let usable = if left {
        empty_value(value).is_some()
    } else {
        null_without_rows(value)
    };
    if !usable {
        return Ok(None);
    }
    let Some(selection) = &inner.selection else {
        return Ok(None);
    };
    let inner_defined = all_defined_names(subquery);
    let mut keys = Vec::new();
    let mut links = Vec::new();
    let mut local = Vec::new();
    for conjunct in conjuncts(selection) {
        match side(conjunct, &inner_defined, outer_defined) {
            Some(Side::Inner) => local.push(conjunct.clone()),
            Some(Side::Both) => {
                let Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } = conjunct
                else {
                    return Ok(None);
                };
                let sides = (
                    side(left, &inner_defined, outer_defined),
                    side(right, &inner_defined, outer_defined),
                );
                let (key, outer) = match sides {
                    (Some(Side::Inner), Some(Side::Outer)) => (left, right),
                    (Some(Side::Outer), Some(Side::Inner)) => (right, left),
                    _ => return Ok(None),
                };
                keys.push(key.as_ref().clone());
                links.push(outer.as_ref().clone());
            }
            Some(Side::Outer) | None => return Ok(None),
        }
    }
    // The value and the FROM may not read the outer statement either.
    if keys.is_empty()
        || side(value, &inner_defined, outer_defined) != Some(Side::Inner)
        || inner
            .from
            .iter()
            .any(|table| references_outside(table, &inner_defined))
    {
        return Ok(None);
    }
    if let Some(reduction) = semi_join_reduction(topology, select, &keys, &links, outer_conjuncts) {
        local.push(reduction);
    }
    let items: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| format!("{key} AS __pgr_key{i}"))
        .chain(std::iter::once(format!("{value} AS __pgr_value")))
        .chain(left.then(|| "count(*) AS __pgr_rows".to_string()))
        .collect();
    let from: Vec<String> = inner.from.iter().map(ToString::to_string).collect();
    let mut sql = format!("SELECT {} FROM {}", items.join(", "), from.join(", "));
    if let Some(filter) = local.into_iter().reduce(|left, right| Expr::BinaryOp {
        left: Box::new(left),
        op: BinaryOperator::And,
        right: Box::new(right),
    }) {
        sql.push_str(&format!(" WHERE {filter}"));
    }
    let groups: Vec<String> = keys.iter().map(ToString::to_string).collect();
    sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    let wrapper = parse_query(&format!("SELECT * FROM ({sql}) AS {name}"))?;
    let SetExpr::Select(mut wrapper) = *wrapper.body else {
        return Ok(None);
    };
    Ok(Some(Grouped {
        table: wrapper.from.remove(0),
        links,
    }))
}

/// Is `expr` NULL when its aggregates run over no rows: `sum`/`avg`/`min`/`max` calls combined
/// with literals by arithmetic and casts (with at least one aggregate)?
fn null_without_rows(expr: &Expr) -> bool {
    fn walk(expr: &Expr, aggregates: &mut usize) -> bool {
        match expr {
            Expr::Function(function) if is_aggregate_call(function) => {
                let name = last_name(&function.name);
                *aggregates += 1;
                matches!(name.as_str(), "sum" | "avg" | "min" | "max")
            }
            Expr::Value(_) => true,
            Expr::Nested(inner) => walk(inner, aggregates),
            Expr::Cast { expr, .. } => walk(expr, aggregates),
            Expr::UnaryOp {
                op: UnaryOperator::Minus | UnaryOperator::Plus,
                expr,
            } => walk(expr, aggregates),
            Expr::BinaryOp {
                left,
                op:
                    BinaryOperator::Plus
                    | BinaryOperator::Minus
                    | BinaryOperator::Multiply
                    | BinaryOperator::Divide
                    | BinaryOperator::Modulo,
                right,
            } => walk(left, aggregates) && walk(right, aggregates),
            _ => false,
        }
    }
    let mut aggregates = 0;
    walk(expr, &mut aggregates) && aggregates > 0
}

/// `(key...) IN (SELECT outer column... FROM r WHERE <outer conditions on r>)` when the outer
/// side of the correlation is columns of one reference table `r` that the outer WHERE
/// restricts: the derived table then groups only rows the join can use.
fn semi_join_reduction(
    topology: &Topology,
    select: &Select,
    keys: &[Expr],
    links: &[Expr],
    outer_conjuncts: &[&Expr],
) -> Option<Expr> {
    let mut qualifiers = HashSet::new();
    for link in links {
        let Expr::CompoundIdentifier(parts) = link else {
            return None;
        };
        if parts.len() != 2 {
            return None;
        }
        qualifiers.insert(normalize(&parts[0]));
    }
    if qualifiers.len() != 1 {
        return None;
    }
    let qualifier = qualifiers.into_iter().next()?;
    let factor = select
        .from
        .iter()
        .flat_map(|table| {
            std::iter::once(&table.relation).chain(table.joins.iter().map(|join| &join.relation))
        })
        .find(|factor| match factor {
            TableFactor::Table { name, alias, .. } => {
                alias
                    .as_ref()
                    .map_or_else(|| last_name(name), |a| normalize(&a.name))
                    == *qualifier
            }
            _ => false,
        })?;
    let TableFactor::Table { name, .. } = factor else {
        return None;
    };
    if !topology.is_reference(&last_name(name)) {
        return None;
    }
    let only_r: HashSet<String> = std::iter::once(qualifier.clone()).collect();
    let conditions: Vec<String> = outer_conjuncts
        .iter()
        .filter(|conjunct| {
            table_use(topology, **conjunct).sharded.is_empty()
                && qualifiers_outside(**conjunct).is_some_and(|q| !q.is_empty() && q == only_r)
        })
        .map(ToString::to_string)
        .collect();
    if conditions.is_empty() {
        return None;
    }
    let tuple = |exprs: &[Expr]| {
        let items: Vec<String> = exprs.iter().map(ToString::to_string).collect();
        if items.len() == 1 {
            items[0].clone()
        } else {
            format!("({})", items.join(", "))
        }
    };
    let outer_columns: Vec<String> = links.iter().map(ToString::to_string).collect();
    let sql = format!(
        "SELECT 1 WHERE {} IN (SELECT {} FROM {factor} WHERE {})",
        tuple(keys),
        outer_columns.join(", "),
        conditions.join(" AND ")
    );
    let query = parse_query(&sql).ok()?;
    let SetExpr::Select(select) = *query.body else {
        return None;
    };
    select.selection
}

/// Which relations an expression reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Inner,
    Outer,
    Both,
}

/// The side of `expr`'s column references: the subquery's relations (`inner`, every name it
/// defines at any depth), the outer statement's (`outer`); `None` for a bare name, or a name
/// of neither (a scope further out).
fn side(expr: &Expr, inner: &HashSet<String>, outer: &HashSet<String>) -> Option<Side> {
    let qualifiers = qualifiers_of(expr)?;
    let (mut reads_inner, mut reads_outer) = (false, false);
    for qualifier in qualifiers {
        if inner.contains(&qualifier) {
            reads_inner = true;
        } else if outer.contains(&qualifier) {
            reads_outer = true;
        } else {
            return None;
        }
    }
    Some(match (reads_inner, reads_outer) {
        (_, false) => Side::Inner,
        (false, true) => Side::Outer,
        (true, true) => Side::Both,
    })
}

/// The qualifiers of `node`'s column references; `None` if it has a bare name (one the binder
/// could not place).
fn qualifiers_of(node: &impl Visit) -> Option<HashSet<String>> {
    struct Names {
        qualifiers: HashSet<String>,
        bare: bool,
    }
    impl Visitor for Names {
        type Break = ();
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
    let mut names = Names {
        qualifiers: HashSet::new(),
        bare: false,
    };
    let _ = node.visit(&mut names);
    (!names.bare).then_some(names.qualifiers)
}

/// The qualifiers `node` reads that no FROM inside it defines.
fn qualifiers_outside(node: &impl Visit) -> Option<HashSet<String>> {
    let defined = all_defined_names(node);
    let qualifiers = qualifiers_of(node)?;
    Some(
        qualifiers
            .into_iter()
            .filter(|q| !defined.contains(q))
            .collect(),
    )
}

/// Does a FROM item read names it does not define (a LATERAL reference to the outer query)?
fn references_outside(table: &sqlparser::ast::TableWithJoins, defined: &HashSet<String>) -> bool {
    match qualifiers_of(table) {
        Some(qualifiers) => qualifiers.iter().any(|q| !defined.contains(q)),
        None => false,
    }
}

/// Names (tables and aliases) the FROM items of `select` define.
fn defined_names(select: &Select) -> HashSet<String> {
    let mut defined = HashSet::new();
    for table in &select.from {
        for factor in
            std::iter::once(&table.relation).chain(table.joins.iter().map(|join| &join.relation))
        {
            add_factor_names(factor, &mut defined);
        }
    }
    defined
}

/// Names every FROM item in `node`, at any depth, defines.
fn all_defined_names(node: &impl Visit) -> HashSet<String> {
    struct Factors(HashSet<String>);
    impl Visitor for Factors {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            add_factor_names(factor, &mut self.0);
            ControlFlow::Continue(())
        }
    }
    let mut factors = Factors(HashSet::new());
    let _ = node.visit(&mut factors);
    factors.0
}

fn add_factor_names(factor: &TableFactor, defined: &mut HashSet<String>) {
    match factor {
        TableFactor::Table { name, alias, .. } => match alias {
            Some(alias) => {
                defined.insert(normalize(&alias.name));
            }
            None => {
                defined.insert(last_name(name));
            }
        },
        TableFactor::Derived {
            alias: Some(alias), ..
        }
        | TableFactor::Function {
            alias: Some(alias), ..
        }
        | TableFactor::UNNEST {
            alias: Some(alias), ..
        }
        | TableFactor::NestedJoin {
            alias: Some(alias), ..
        } => {
            defined.insert(normalize(&alias.name));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use crate::plan::parse_query;
    use crate::plan::tests::topology;

    fn rewritten(sql: &str) -> Option<String> {
        let mut query = parse_query(sql).unwrap();
        let sqlparser::ast::SetExpr::Select(select) = query.body.as_mut() else {
            unreachable!()
        };
        super::scalar_conjuncts(&topology(), select)
            .unwrap()
            .then(|| query.to_string())
    }

    #[test]
    fn a_correlated_aggregate_becomes_a_grouped_join() {
        assert_eq!(
            rewritten(
                "SELECT sum(o.total) FROM orders o, countries k WHERE k.code = o.note AND k.name = 'x' \
                 AND o.qty < (SELECT 0.2 * avg(orders.qty) FROM orders WHERE orders.note = k.code AND orders.total > 1)"
            )
            .unwrap(),
            "SELECT sum(o.total) FROM orders o, countries k, \
             (SELECT orders.note AS __pgr_key0, 0.2 * avg(orders.qty) AS __pgr_value FROM orders \
             WHERE orders.total > 1 AND orders.note IN (SELECT k.code FROM countries k WHERE k.name = 'x') \
             GROUP BY orders.note) AS __pgr_sq0 \
             WHERE k.code = o.note AND k.name = 'x' AND o.qty < __pgr_sq0.__pgr_value AND k.code = __pgr_sq0.__pgr_key0"
        );
    }

    fn left_joined(sql: &str) -> Option<String> {
        let mut query = parse_query(sql).unwrap();
        let sqlparser::ast::SetExpr::Select(select) = query.body.as_mut() else {
            unreachable!()
        };
        super::left_joins(&topology(), select)
            .unwrap()
            .then(|| query.to_string())
    }

    #[test]
    fn other_correlated_aggregates_become_left_joins() {
        assert_eq!(
            left_joined(
                "SELECT k.code, (SELECT count(*) FROM orders o WHERE o.note = k.code) FROM countries k, customers c \
                 WHERE c.region = k.code AND 0 = (SELECT sum(o.qty) FROM orders o WHERE o.note = c.name)"
            )
            .unwrap(),
            "SELECT k.code, (CASE WHEN __pgr_lj1.__pgr_rows IS NULL THEN 0 ELSE __pgr_lj1.__pgr_value END) AS \"count\" \
             FROM countries k CROSS JOIN customers c \
             LEFT OUTER JOIN (SELECT o.note AS __pgr_key0, sum(o.qty) AS __pgr_value, count(*) AS __pgr_rows FROM orders o GROUP BY o.note) AS __pgr_lj0 ON c.name = __pgr_lj0.__pgr_key0 \
             LEFT OUTER JOIN (SELECT o.note AS __pgr_key0, count(*) AS __pgr_value, count(*) AS __pgr_rows FROM orders o GROUP BY o.note) AS __pgr_lj1 ON k.code = __pgr_lj1.__pgr_key0 \
             WHERE c.region = k.code AND 0 = (CASE WHEN __pgr_lj0.__pgr_rows IS NULL THEN NULL ELSE __pgr_lj0.__pgr_value END)"
        );
    }

    #[test]
    fn what_an_inner_join_would_not_answer_stays() {
        // count(*) is 0, not NULL, over no rows: the outer row would be lost.
        assert!(
            rewritten(
                "SELECT 1 FROM countries k WHERE 0 = (SELECT count(*) FROM orders WHERE orders.note = k.code)"
            )
            .is_none()
        );
        // Not an equality correlation.
        assert!(
            rewritten(
                "SELECT 1 FROM countries k WHERE 1 < (SELECT sum(orders.qty) FROM orders WHERE orders.note > k.code)"
            )
            .is_none()
        );
        // Uncorrelated: run first as it is (see `bound`).
        assert!(
            rewritten("SELECT 1 FROM countries k WHERE 1 < (SELECT sum(orders.qty) FROM orders)")
                .is_none()
        );
    }
}
