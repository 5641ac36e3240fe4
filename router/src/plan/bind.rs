//! The binder: every bare column reference of a SELECT resolved, as PostgreSQL resolves it,
//! against the relations in scope (tables with their catalog columns, aliases, derived tables,
//! WITH queries, `USING`/`NATURAL` join columns, outer queries for correlated subqueries), and
//! rewritten as `relation.column`. Co-location, routing and rewriting then see one spelling:
//! `FROM a, b WHERE a_key = b_key` plans as `a.a_key = b.b_key` does.
//!
//! A name that no relation in scope has, when all their columns are known, is PostgreSQL's
//! 42703 (`column "x" does not exist`), and one that two relations of the innermost scope
//! having it share is 42702 (`column reference "x" is ambiguous`): the binder answers them
//! itself, with the position in the client's text, before any shard is asked. A name in
//! scope of a table function or a table the catalog does not list stays as written, for
//! PostgreSQL to answer.

use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, GroupByExpr, Ident, JoinConstraint, JoinOperator, OrderByKind, Query, Select, SelectItem,
    SetExpr, TableFactor, TableWithJoins, VisitMut, VisitorMut,
};

use super::{PlanError, last_name, normalize};

/// Column lists of the tables the shards hold, by table name (from the first shard's catalog).
pub type Catalog = HashMap<String, Vec<String>>;

/// Names PostgreSQL reads as functions without parentheses when no column has them.
const KEYWORD_FUNCTIONS: &[&str] = &[
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_user",
    "current_role",
    "session_user",
    "user",
    "current_catalog",
    "current_schema",
    "system_user",
];

/// One relation of a FROM clause: the name references qualify with and its columns (`None`:
/// not known, for example a table function).
#[derive(Clone, Debug)]
struct Relation {
    qualifier: String,
    columns: Option<Vec<String>>,
}

/// The relations of one query level, and the columns merged by `USING`/`NATURAL` joins (a bare
/// reference to one of those is neither ambiguous nor qualified).
#[derive(Clone, Debug, Default)]
struct Scope {
    relations: Vec<Relation>,
    merged: Vec<String>,
}

/// What a bare name is in one scope.
enum Found {
    /// Exactly one relation has it.
    One(String),
    /// A `USING`/`NATURAL` column: left as written.
    Merged,
    /// More than one relation has it.
    Ambiguous,
    /// No relation has it, and all columns are known.
    Missing,
    /// No known relation has it, but some relation's columns are unknown.
    Unknown,
}

impl Relation {
    /// Are its columns known exactly? A derived table's unnamed expression is `?column?` here
    /// where PostgreSQL may name it (`btrim` for `trim(x)`): such a relation could have a
    /// column the binder does not see.
    fn exact(&self) -> bool {
        self.columns
            .as_ref()
            .is_some_and(|columns| columns.iter().all(|c| c != "?column?"))
    }
}

impl Scope {
    fn find(&self, column: &str) -> Found {
        if self.merged.iter().any(|m| m == column) {
            return Found::Merged;
        }
        let owners: Vec<&Relation> = self
            .relations
            .iter()
            .filter(|r| {
                r.columns
                    .as_ref()
                    .is_some_and(|columns| columns.iter().any(|c| c == column))
            })
            .collect();
        match owners.as_slice() {
            [one] => Found::One(one.qualifier.clone()),
            [_, _, ..] if owners.iter().all(|r| r.exact() && !r.qualifier.is_empty()) => {
                Found::Ambiguous
            }
            [] if self.relations.iter().all(Relation::exact) => Found::Missing,
            _ => Found::Unknown,
        }
    }

    fn has_qualifier(&self, qualifier: &str) -> bool {
        self.relations.iter().any(|r| r.qualifier == qualifier)
    }
}

/// Binds `query` against `catalog`: qualifies its bare column references in place. Returns
/// whether it rewrote any.
pub fn bind_query(catalog: &Catalog, query: &mut Query) -> Result<bool, PlanError> {
    if catalog.is_empty() {
        return Ok(false);
    }
    let mut binder = Binder {
        catalog,
        ctes: Vec::new(),
        rewrites: 0,
    };
    binder.query(query, &[])?;
    Ok(binder.rewrites > 0)
}

struct Binder<'c> {
    catalog: &'c Catalog,
    /// WITH queries in scope, innermost last: name -> output columns.
    ctes: Vec<(String, Option<Vec<String>>)>,
    /// References qualified so far.
    rewrites: usize,
}

impl Binder<'_> {
    fn query(&mut self, query: &mut Query, outer: &[Scope]) -> Result<(), PlanError> {
        let ctes_before = self.ctes.len();
        if let Some(with) = &mut query.with {
            for cte in &mut with.cte_tables {
                // A non-recursive WITH query sees the ones before it; a recursive one is left
                // unbound (it reads itself).
                if !with.recursive {
                    self.query(&mut cte.query, outer)?;
                }
                let columns = if cte.alias.columns.is_empty() {
                    output_columns(&cte.query, self)
                } else {
                    Some(
                        cte.alias
                            .columns
                            .iter()
                            .map(|c| normalize(&c.name))
                            .collect(),
                    )
                };
                let columns = if with.recursive { None } else { columns };
                self.ctes.push((normalize(&cte.alias.name), columns));
            }
        }
        let (outputs, all_outputs) = match query.body.as_ref() {
            SetExpr::Select(select) => (
                select_outputs(select),
                select_columns(select, self).unwrap_or_default(),
            ),
            _ => (Vec::new(), Vec::new()),
        };
        let scope = self.set_expr(&mut query.body, outer)?;
        // ORDER BY of a plain SELECT: an output column name first, then FROM (that of a set
        // operation names its output columns only).
        if let Some(order_by) = &mut query.order_by
            && let OrderByKind::Expressions(items) = &mut order_by.kind
            && let Some(scope) = scope
        {
            let mut chain = outer.to_vec();
            chain.push(scope);
            for item in items {
                if let Expr::Identifier(ident) = &item.expr {
                    let name = normalize(ident);
                    if outputs.contains(&name) {
                        continue;
                    }
                    // An output column's name that FROM cannot place (`SELECT a.id FROM a, b
                    // ORDER BY id`): PostgreSQL takes the output column.
                    if all_outputs.contains(&name) {
                        let mut bound = item.expr.clone();
                        if self.expr(&mut bound, &chain).is_ok() {
                            item.expr = bound;
                        }
                        continue;
                    }
                }
                self.expr(&mut item.expr, &chain)?;
            }
        }
        self.ctes.truncate(ctes_before);
        Ok(())
    }

    /// Binds a query body; returns the scope of a plain SELECT (for its ORDER BY).
    fn set_expr(
        &mut self,
        body: &mut SetExpr,
        outer: &[Scope],
    ) -> Result<Option<Scope>, PlanError> {
        match body {
            SetExpr::Select(select) => self.select(select, outer).map(Some),
            SetExpr::Query(query) => self.query(query, outer).map(|_| None),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left, outer)?;
                self.set_expr(right, outer)?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn select(&mut self, select: &mut Select, outer: &[Scope]) -> Result<Scope, PlanError> {
        let mut scope = Scope::default();
        for table in &mut select.from {
            self.table_with_joins(table, outer, &mut scope)?;
        }
        let mut chain = outer.to_vec();
        chain.push(scope.clone());
        for item in &mut select.projection {
            match item {
                SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => {
                    self.expr(expr, &chain)?
                }
                _ => {}
            }
        }
        if let Some(selection) = &mut select.selection {
            self.expr(selection, &chain)?;
        }
        let outputs = select_columns(select, self).unwrap_or_default();
        if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
            // GROUP BY: an input column first, then an output column name.
            for expr in exprs {
                if let Expr::Identifier(ident) = expr
                    && outputs.contains(&normalize(ident))
                    && chain
                        .iter()
                        .all(|scope| matches!(scope.find(&normalize(ident)), Found::Missing))
                {
                    continue;
                }
                self.expr(expr, &chain)?;
            }
        }
        if let Some(having) = &mut select.having {
            self.expr(having, &chain)?;
        }
        Ok(scope)
    }

    fn table_with_joins(
        &mut self,
        table: &mut TableWithJoins,
        outer: &[Scope],
        scope: &mut Scope,
    ) -> Result<(), PlanError> {
        self.factor(&mut table.relation, outer, scope)?;
        for join in &mut table.joins {
            let before = scope.relations.len();
            self.factor(&mut join.relation, outer, scope)?;
            let constraint = match &mut join.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::Semi(c)
                | JoinOperator::LeftSemi(c)
                | JoinOperator::RightSemi(c)
                | JoinOperator::Anti(c)
                | JoinOperator::LeftAnti(c)
                | JoinOperator::RightAnti(c) => Some(c),
                _ => None,
            };
            match constraint {
                Some(JoinConstraint::On(expr)) => {
                    let mut chain = outer.to_vec();
                    chain.push(scope.clone());
                    self.expr(expr, &chain)?;
                }
                Some(JoinConstraint::Using(names)) => {
                    scope.merged.extend(names.iter().map(last_name));
                }
                Some(JoinConstraint::Natural) => {
                    let left: Vec<String> = scope.relations[..before]
                        .iter()
                        .flat_map(|r| r.columns.clone().unwrap_or_default())
                        .collect();
                    for relation in &scope.relations[before..] {
                        for column in relation.columns.iter().flatten() {
                            if left.contains(column) {
                                scope.merged.push(column.clone());
                            }
                        }
                    }
                    if scope.relations.iter().any(|r| r.columns.is_none()) {
                        // Common columns unknown: nothing can be qualified safely.
                        for relation in &mut scope.relations {
                            relation.columns = None;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn factor(
        &mut self,
        factor: &mut TableFactor,
        outer: &[Scope],
        scope: &mut Scope,
    ) -> Result<(), PlanError> {
        match factor {
            TableFactor::Table { name, alias, .. } => {
                let table = last_name(name);
                let columns = if name.0.len() == 1
                    && let Some((_, columns)) = self.ctes.iter().rev().find(|(n, _)| *n == table)
                {
                    columns.clone()
                } else {
                    self.catalog.get(&table).cloned()
                };
                let columns = match alias {
                    Some(alias) if !alias.columns.is_empty() => columns.map(|mut columns| {
                        for (i, renamed) in alias.columns.iter().enumerate() {
                            if i < columns.len() {
                                columns[i] = normalize(&renamed.name);
                            }
                        }
                        columns
                    }),
                    _ => columns,
                };
                let qualifier = alias.as_ref().map(|a| normalize(&a.name)).unwrap_or(table);
                scope.relations.push(Relation { qualifier, columns });
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                // A derived table sees the outer queries (and, LATERAL, the FROM items before it).
                let mut chain = outer.to_vec();
                if *lateral {
                    chain.push(scope.clone());
                }
                self.query(subquery, &chain)?;
                let columns = match alias {
                    Some(alias) if !alias.columns.is_empty() => {
                        let mut columns = output_columns(subquery, self);
                        if let Some(columns) = &mut columns {
                            for (i, renamed) in alias.columns.iter().enumerate() {
                                if i < columns.len() {
                                    columns[i] = normalize(&renamed.name);
                                }
                            }
                        }
                        columns
                    }
                    _ => output_columns(subquery, self),
                };
                match alias {
                    Some(alias) => scope.relations.push(Relation {
                        qualifier: normalize(&alias.name),
                        columns,
                    }),
                    // An unnamed derived table: its columns cannot be qualified.
                    None => scope.relations.push(Relation {
                        qualifier: String::new(),
                        columns: None,
                    }),
                }
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let mut inner = Scope::default();
                self.table_with_joins(table_with_joins, outer, &mut inner)?;
                match alias {
                    Some(alias) => scope.relations.push(Relation {
                        qualifier: normalize(&alias.name),
                        columns: None,
                    }),
                    None => {
                        scope.relations.extend(inner.relations);
                        scope.merged.extend(inner.merged);
                    }
                }
            }
            _ => {
                // Table functions and the like: columns unknown.
                scope.relations.push(Relation {
                    qualifier: String::new(),
                    columns: None,
                });
            }
        }
        Ok(())
    }

    /// Binds the bare names of `expr` against `chain` (outer scopes first, innermost last).
    /// Subqueries in it are bound with `chain` as their outer scopes.
    fn expr(&mut self, expr: &mut Expr, chain: &[Scope]) -> Result<(), PlanError> {
        let mut visitor = ExprBinder {
            binder: self,
            chain,
            nested: 0,
        };
        match expr.visit(&mut visitor) {
            ControlFlow::Break(error) => Err(error),
            ControlFlow::Continue(()) => Ok(()),
        }
    }
}

struct ExprBinder<'b, 'c, 's> {
    binder: &'b mut Binder<'c>,
    chain: &'s [Scope],
    /// Depth inside subqueries already bound (their names are skipped).
    nested: usize,
}

impl VisitorMut for ExprBinder<'_, '_, '_> {
    type Break = PlanError;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<PlanError> {
        if self.nested == 0
            && let Err(error) = self.binder.query(query, self.chain)
        {
            return ControlFlow::Break(error);
        }
        self.nested += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &mut Query) -> ControlFlow<PlanError> {
        self.nested -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<PlanError> {
        if self.nested > 0 {
            return ControlFlow::Continue(());
        }
        if let Expr::CompoundIdentifier(parts) = expr {
            return match qualified_error(parts, self.chain) {
                Some(error) => ControlFlow::Break(error),
                None => ControlFlow::Continue(()),
            };
        }
        let Expr::Identifier(ident) = expr else {
            return ControlFlow::Continue(());
        };
        if ident.quote_style.is_none()
            && KEYWORD_FUNCTIONS.contains(&ident.value.to_lowercase().as_str())
        {
            return ControlFlow::Continue(());
        }
        let column = normalize(ident);
        // Innermost scope first; a name found nowhere known stops at the first unknown scope.
        for (depth, scope) in self.chain.iter().enumerate().rev() {
            match scope.find(&column) {
                Found::One(qualifier) => {
                    if qualifier.is_empty() {
                        return ControlFlow::Continue(());
                    }
                    // An outer relation shadowed by an inner one of the same name: as written.
                    if self.chain[depth + 1..]
                        .iter()
                        .any(|inner| inner.has_qualifier(&qualifier))
                    {
                        return ControlFlow::Continue(());
                    }
                    let mut qualifier_ident = Ident::new(qualifier);
                    if qualifier_ident.value.chars().any(|c| c.is_uppercase())
                        || !qualifier_ident
                            .value
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        qualifier_ident.quote_style = Some('"');
                    }
                    *expr = Expr::CompoundIdentifier(vec![qualifier_ident, ident.clone()]);
                    self.binder.rewrites += 1;
                    return ControlFlow::Continue(());
                }
                // Relations whose columns are not all known: as written, for PostgreSQL.
                Found::Merged | Found::Unknown => {
                    return ControlFlow::Continue(());
                }
                Found::Ambiguous => {
                    return ControlFlow::Break(column_error(
                        "42702",
                        format!("column reference \"{column}\" is ambiguous"),
                        ident,
                    ));
                }
                Found::Missing => {}
            }
        }
        // Found in no scope, every column known: PostgreSQL's 42703, unless the name is a
        // system column or a relation's (a whole-row reference).
        if SYSTEM_COLUMNS.contains(&column.as_str())
            || self.chain.iter().any(|scope| scope.has_qualifier(&column))
        {
            return ControlFlow::Continue(());
        }
        ControlFlow::Break(column_error(
            "42703",
            format!("column \"{column}\" does not exist"),
            ident,
        ))
    }
}

/// System columns every table has (not in the catalog's column lists).
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// An error at `ident`'s place in the text.
fn column_error(code: &'static str, message: String, ident: &Ident) -> PlanError {
    PlanError::Column(super::ColumnError {
        code,
        message,
        line: ident.span.start.line,
        column: ident.span.start.column,
        position: None,
    })
}

/// PostgreSQL's 42703 for `relation.column` when the innermost relation of that name has all
/// its columns known and not this one.
fn qualified_error(parts: &[Ident], chain: &[Scope]) -> Option<PlanError> {
    let [qualifier, name] = parts else {
        return None;
    };
    let (qualifier, column) = (normalize(qualifier), normalize(name));
    let scope = chain
        .iter()
        .rev()
        .find(|scope| scope.has_qualifier(&qualifier))?;
    let mut relations = scope.relations.iter().filter(|r| r.qualifier == qualifier);
    let (Some(relation), None) = (relations.next(), relations.next()) else {
        return None;
    };
    if !relation.exact()
        || SYSTEM_COLUMNS.contains(&column.as_str())
        || relation.columns.iter().flatten().any(|c| *c == column)
    {
        return None;
    }
    Some(column_error(
        "42703",
        format!("column {qualifier}.{column} does not exist"),
        &parts[0],
    ))
}

/// The aliases of a SELECT list (what a bare ORDER BY name means before any input column; a
/// plain column's own name is bound as the column, the same expression as the select list's).
fn select_outputs(select: &Select) -> Vec<String> {
    select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(normalize(alias)),
            _ => None,
        })
        .collect()
}

/// The output columns of a query, when all are known (no `*` over unknown relations).
fn output_columns(query: &Query, binder: &Binder) -> Option<Vec<String>> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        if let SetExpr::SetOperation { left, .. } = query.body.as_ref()
            && let SetExpr::Select(select) = left.as_ref()
        {
            return select_columns(select, binder);
        }
        return None;
    };
    select_columns(select, binder)
}

fn select_columns(select: &Select, binder: &Binder) -> Option<Vec<String>> {
    let mut columns = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::ExprWithAlias { alias, .. } => columns.push(normalize(alias)),
            SelectItem::UnnamedExpr(expr) => columns.push(super::default_column_name(expr)),
            SelectItem::Wildcard(_) => {
                for table in &select.from {
                    let mut factors = vec![&table.relation];
                    factors.extend(table.joins.iter().map(|j| &j.relation));
                    for factor in factors {
                        let TableFactor::Table { name, .. } = factor else {
                            return None;
                        };
                        let table = last_name(name);
                        let known = binder
                            .ctes
                            .iter()
                            .rev()
                            .find(|(n, _)| *n == table)
                            .map(|(_, c)| c.clone())
                            .unwrap_or_else(|| binder.catalog.get(&table).cloned())?;
                        columns.extend(known);
                    }
                }
            }
            _ => return None,
        }
    }
    Some(columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_query;

    fn catalog() -> Catalog {
        let mut catalog = Catalog::new();
        catalog.insert(
            "orders".into(),
            vec!["o_orderkey".into(), "o_custkey".into()],
        );
        catalog.insert(
            "lineitem".into(),
            vec!["l_orderkey".into(), "l_partkey".into()],
        );
        catalog.insert("part".into(), vec!["p_partkey".into(), "p_name".into()]);
        catalog.insert("a".into(), vec!["id".into(), "x".into()]);
        catalog.insert("b".into(), vec!["id".into(), "y".into()]);
        catalog
    }

    fn bound(sql: &str) -> Result<String, PlanError> {
        let mut query = parse_query(sql).unwrap();
        bind_query(&catalog(), &mut query)?;
        Ok(query.to_string())
    }

    #[test]
    fn bare_names_get_their_relation() {
        assert_eq!(
            bound("SELECT o_custkey, count(*) FROM orders, lineitem WHERE l_orderkey = o_orderkey GROUP BY o_custkey").unwrap(),
            "SELECT orders.o_custkey, count(*) FROM orders, lineitem WHERE lineitem.l_orderkey = orders.o_orderkey GROUP BY orders.o_custkey"
        );
        assert_eq!(
            bound("SELECT 1 FROM orders o JOIN lineitem l ON l_orderkey = o_orderkey").unwrap(),
            "SELECT 1 FROM orders o JOIN lineitem l ON l.l_orderkey = o.o_orderkey"
        );
    }

    #[test]
    fn correlated_names_reach_the_outer_query() {
        assert_eq!(
            bound("SELECT 1 FROM lineitem, part WHERE l_partkey = p_partkey AND 1 < (SELECT count(*) FROM lineitem WHERE l_partkey = p_partkey)").unwrap(),
            "SELECT 1 FROM lineitem, part WHERE lineitem.l_partkey = part.p_partkey AND 1 < (SELECT count(*) FROM lineitem WHERE lineitem.l_partkey = part.p_partkey)"
        );
    }

    #[test]
    fn output_names_derived_tables_and_using() {
        assert_eq!(
            bound("SELECT o_custkey AS c, count(*) AS n FROM orders GROUP BY c ORDER BY n DESC, c")
                .unwrap(),
            "SELECT orders.o_custkey AS c, count(*) AS n FROM orders GROUP BY c ORDER BY n DESC, c"
        );
        assert_eq!(
            bound("SELECT k, n FROM (SELECT o_custkey, count(*) FROM orders GROUP BY o_custkey) AS t (k, n) ORDER BY k").unwrap(),
            "SELECT t.k, t.n FROM (SELECT orders.o_custkey, count(*) FROM orders GROUP BY orders.o_custkey) AS t (k, n) ORDER BY t.k"
        );
        assert_eq!(
            bound("SELECT id, x, y FROM a JOIN b USING (id)").unwrap(),
            "SELECT id, a.x, b.y FROM a JOIN b USING(id)"
        );
        assert!(bound("SELECT x FROM a, generate_series(1, 3) AS g").is_ok());
    }

    #[test]
    fn unknown_and_ambiguous_names_are_postgresqls_errors() {
        let error = |sql: &str| match bound(sql) {
            Err(PlanError::Column(error)) => (error.code, error.message, error.column),
            other => panic!("{sql}: {other:?}"),
        };
        assert_eq!(
            error("SELECT nope, x FROM a"),
            ("42703", "column \"nope\" does not exist".into(), 8)
        );
        assert_eq!(
            error("SELECT x, y FROM a, b WHERE Id > 1"),
            ("42702", "column reference \"id\" is ambiguous".into(), 29)
        );
        assert_eq!(
            error("SELECT 1 FROM a WHERE EXISTS (SELECT 1 FROM b WHERE b.y = a.zz)"),
            ("42703", "column a.zz does not exist".into(), 59)
        );
        // What PostgreSQL accepts: system columns, whole rows, output names, unknown columns.
        for sql in [
            "SELECT ctid, a FROM a",
            "SELECT a.id FROM a, b ORDER BY id",
            "SELECT x AS g, count(*) FROM a GROUP BY g",
            "SELECT v FROM a, generate_series(1, 3) AS v",
            "SELECT k FROM (SELECT trim(x) FROM a) AS t(k)",
            "SELECT btrim FROM (SELECT trim(x) FROM a) AS t",
            "SELECT current_date, x FROM a",
            "SELECT id FROM a JOIN b USING (id)",
        ] {
            assert!(bound(sql).is_ok(), "{sql}: {:?}", bound(sql));
        }
    }
}
