//! The FROM clause: which tables a statement reads and whether their rows are co-located.

use super::*;

pub(super) fn last_name(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => normalize(ident),
        _ => String::new(),
    }
}

/// Adds the names `factor` makes visible to the query it sits in (its table's name and alias,
/// a derived table's, function's or unnest's alias): a qualifier outside these is correlation.
pub(super) fn insert_defined_names(
    factor: &TableFactor,
    defined: &mut std::collections::HashSet<String>,
) {
    match factor {
        TableFactor::Table { name, alias, .. } => {
            defined.insert(last_name(name));
            if let Some(alias) = alias {
                defined.insert(normalize(&alias.name));
            }
        }
        TableFactor::Derived {
            alias: Some(alias), ..
        }
        | TableFactor::Function {
            alias: Some(alias), ..
        }
        | TableFactor::UNNEST {
            alias: Some(alias), ..
        } => {
            defined.insert(normalize(&alias.name));
        }
        _ => {}
    }
}

pub(super) fn normalize(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// Tables a statement references, by kind.
#[derive(Default, Debug)]
pub(super) struct TableUse {
    pub(super) sharded: Vec<String>,
    pub(super) reference: usize,
    pub(super) other: usize,
}

pub(super) fn table_use(topology: &Topology, node: &impl sqlparser::ast::Visit) -> TableUse {
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

pub(super) struct FromAnalysis {
    /// Sharded table name or alias -> shard key.
    pub(super) key_columns: HashMap<String, String>,
    /// Table group of the sharded tables.
    pub(super) group: usize,
}

/// Checks that all sharded tables of the FROM clause are one table group, joined on their
/// shard keys (co-located), and returns their names/aliases.
pub(super) fn analyze_from(
    topology: &Topology,
    select: &Select,
) -> Result<FromAnalysis, PlanError> {
    analyze_from_with(topology, select, false)
}

/// [`analyze_from`]; with `derived_checked`, subqueries in FROM may read sharded tables (the
/// caller checks them on their own).
pub(super) fn analyze_from_with(
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
