//! UPDATE and DELETE (and DDL naming a sharded table): which shards a write goes to.

use super::*;

pub(super) fn plan_write(
    topology: &Topology,
    usage: TableUse,
    table: &sqlparser::ast::TableWithJoins,
    selection: Option<&Expr>,
    text: String,
    returns_rows: bool,
) -> Result<Planned, PlanError> {
    let planned = |plan| {
        Ok(Planned {
            sql: text.clone(),
            plan,
            returns_rows,
        })
    };
    let TableFactor::Table { name, .. } = &table.relation else {
        return unsupported("UPDATE/DELETE of a derived table");
    };
    let target = last_name(name);
    if topology.is_reference(&target) {
        if !usage.sharded.is_empty() {
            return unsupported("writing a reference table from a sharded table");
        }
        return planned(Plan::Broadcast);
    }
    let Some(sharded) = topology.tables.get(&target) else {
        if !usage.sharded.is_empty() {
            return unsupported("writing an unsharded table from a sharded table");
        }
        return planned(Plan::Single(Target::Shard(0)));
    };
    let group = sharded.group;
    if usage.sharded.len() > 1 {
        // Only through WHERE subqueries co-located with the written table.
        let mut outer = HashMap::new();
        let alias = match &table.relation {
            TableFactor::Table {
                alias: Some(alias), ..
            } => normalize(&alias.name),
            _ => target.clone(),
        };
        outer.insert(alias, sharded.shard_key.clone());
        let pushed = selection.and_then(|selection| {
            colocated::pushed_down_tables(topology, [selection], &outer, group)
        });
        if !table.joins.is_empty() || pushed != Some(usage.sharded.len() - 1) {
            return unsupported("UPDATE/DELETE joining several sharded tables");
        }
    }
    let mut keys = Vec::new();
    if let Some(selection) = selection {
        let mut columns = HashMap::new();
        columns.insert(target.clone(), sharded.shard_key.clone());
        if let TableFactor::Table {
            alias: Some(alias), ..
        } = &table.relation
        {
            columns.insert(normalize(&alias.name), sharded.shard_key.clone());
        }
        keys = key_restriction(selection, &columns, topology.groups[group].key_type);
        if keys.is_empty() {
            let aliases: Vec<String> = columns.keys().cloned().collect();
            if let Some(lookup) = lookup_restriction(topology, selection, &target, &aliases, group)
            {
                return planned(Plan::Single(lookup));
            }
        }
    }
    route_keys(
        topology,
        group,
        keys,
        |target| planned(Plan::Single(target)),
        |shards| {
            planned(Plan::Scatter {
                shards,
                merge: MergeSpec::default(),
                write: true,
            })
        },
    )
}

/// The sharded table a DDL statement creates or alters (`CREATE TABLE`, `ALTER TABLE`), as
/// written (schema-qualified if it was): its new sequences get per-shard ranges.
pub fn sharded_table_of_ddl(topology: &Topology, sql: &str) -> Option<String> {
    let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?.pop()?;
    let name = match &statement {
        Statement::CreateTable(create) => &create.name,
        Statement::AlterTable(alter) => &alter.name,
        _ => return None,
    };
    topology
        .tables
        .contains_key(&last_name(name))
        .then(|| name.to_string())
}

/// An UPDATE/DELETE refused for its WHERE subqueries over sharded tables: with uncorrelated
/// ones run first and bound as parameters, if that plans.
pub(super) fn bound_write_fallback(
    topology: &Topology,
    planned: Result<Planned, PlanError>,
    statement: Statement,
) -> Result<Planned, PlanError> {
    match planned {
        Err(PlanError::Unsupported(reason)) => {
            bound::plan_write(topology, statement)?.ok_or(PlanError::Unsupported(reason))
        }
        planned => planned,
    }
}
