//! Which rows of which table groups a statement writes or locks: what a split's cut-over must
//! hold while a range is paused. Pure, and only asked while some range is paused, so the normal
//! path never parses a statement twice.

use super::*;

/// The keys of one table group a statement writes (or locks with `FOR UPDATE`/`FOR SHARE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyScope {
    /// Only rows with these shard keys (literals, or `$n` parameters).
    Keys(Vec<KeyExpr>),
    /// Any row of the group (no usable key restriction: scatter writes, COPY, INSERT ...
    /// SELECT, keys drawn from a sequence, MERGE).
    All,
}

/// What a statement writes in one table group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteScope {
    /// Index into [`Topology::groups`].
    pub group: usize,
    /// Which of its rows.
    pub keys: KeyScope,
}

/// The table groups and keys `sql` writes or locks; empty for reads, for writes of reference
/// and unsharded tables, and for statements that do not parse (the planner reports those).
pub fn write_scopes(topology: &Topology, sql: &str) -> Vec<WriteScope> {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        // COPY with options sqlparser does not know: by its first words.
        return copy_scope_by_text(topology, sql).into_iter().collect();
    };
    statements
        .iter()
        .flat_map(|statement| statement_scopes(topology, statement))
        .collect()
}

fn statement_scopes(topology: &Topology, statement: &Statement) -> Vec<WriteScope> {
    match statement {
        Statement::Insert(insert) => insert_scope(topology, insert).into_iter().collect(),
        Statement::Update(update) => {
            written_table_scope(topology, &update.table, update.selection.as_ref())
                .into_iter()
                .collect()
        }
        Statement::Delete(delete) => {
            let tables = match &delete.from {
                sqlparser::ast::FromTable::WithFromKeyword(t)
                | sqlparser::ast::FromTable::WithoutKeyword(t) => t,
            };
            tables
                .first()
                .and_then(|table| written_table_scope(topology, table, delete.selection.as_ref()))
                .into_iter()
                .collect()
        }
        Statement::Merge(merge) => match &merge.table {
            TableFactor::Table { name, .. } => {
                all_of(topology, &last_name(name)).into_iter().collect()
            }
            _ => Vec::new(),
        },
        Statement::Copy {
            source: sqlparser::ast::CopySource::Table { table_name, .. },
            to: false,
            ..
        } => all_of(topology, &last_name(table_name))
            .into_iter()
            .collect(),
        Statement::Query(query) => query_scopes(topology, query),
        Statement::Explain {
            analyze: true,
            statement,
            ..
        } => statement_scopes(topology, statement),
        _ => Vec::new(),
    }
}

fn all_of(topology: &Topology, table: &str) -> Option<WriteScope> {
    topology.tables.get(table).map(|sharded| WriteScope {
        group: sharded.group,
        keys: KeyScope::All,
    })
}

fn copy_scope_by_text(topology: &Topology, sql: &str) -> Option<WriteScope> {
    let mut words = sql.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("COPY") {
        return None;
    }
    let table = words.next()?.split('(').next()?.rsplit('.').next()?;
    let rest = sql.to_ascii_uppercase();
    if !rest.contains(" FROM ") {
        return None;
    }
    all_of(topology, &table.trim_matches('"').to_lowercase())
}

fn insert_scope(topology: &Topology, insert: &Insert) -> Option<WriteScope> {
    let TableObject::TableName(name) = &insert.table else {
        return None;
    };
    let sharded = topology.tables.get(&last_name(name))?;
    let group = sharded.group;
    let all = Some(WriteScope {
        group,
        keys: KeyScope::All,
    });
    let Some(position) = insert
        .columns
        .iter()
        .position(|c| last_name(c) == sharded.shard_key)
    else {
        return all;
    };
    let Some(SetExpr::Values(values)) = insert.source.as_ref().map(|s| s.body.as_ref()) else {
        return all;
    };
    let key_type = topology.groups[group].key_type;
    let keys: Option<Vec<KeyExpr>> = values
        .rows
        .iter()
        .map(|row| row.get(position).and_then(|e| key_expr(e, key_type)))
        .collect();
    Some(WriteScope {
        group,
        keys: keys.map_or(KeyScope::All, KeyScope::Keys),
    })
}

/// The scope of an UPDATE/DELETE of `table` restricted by `selection`.
fn written_table_scope(
    topology: &Topology,
    table: &sqlparser::ast::TableWithJoins,
    selection: Option<&Expr>,
) -> Option<WriteScope> {
    let TableFactor::Table { name, alias, .. } = &table.relation else {
        return None;
    };
    table_scope(topology, name, alias.as_ref(), selection)
}

/// The scope of the rows of table `name` (alias `alias`) that `selection` restricts.
fn table_scope(
    topology: &Topology,
    name: &ObjectName,
    alias: Option<&sqlparser::ast::TableAlias>,
    selection: Option<&Expr>,
) -> Option<WriteScope> {
    let target = last_name(name);
    let sharded = topology.tables.get(&target)?;
    let mut columns = HashMap::new();
    columns.insert(target, sharded.shard_key.clone());
    if let Some(alias) = alias {
        columns.insert(normalize(&alias.name), sharded.shard_key.clone());
    }
    let keys = selection
        .map(|s| key_restriction(s, &columns, topology.groups[sharded.group].key_type))
        .unwrap_or_default();
    Some(WriteScope {
        group: sharded.group,
        keys: if keys.is_empty() {
            KeyScope::All
        } else {
            KeyScope::Keys(keys)
        },
    })
}

/// A query writes when it locks rows (`FOR UPDATE`/`FOR SHARE`: the rows of its FROM tables, as
/// far as its WHERE restricts them) or holds a data-modifying CTE (any row of every sharded
/// table it names).
fn query_scopes(topology: &Topology, query: &Query) -> Vec<WriteScope> {
    let modifying_cte = query.with.as_ref().is_some_and(|with| {
        with.cte_tables.iter().any(|cte| {
            matches!(
                cte.query.body.as_ref(),
                SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
            )
        })
    });
    if modifying_cte {
        let mut scopes: Vec<WriteScope> = Vec::new();
        for table in table_use(topology, query).sharded {
            if let Some(scope) = all_of(topology, &table)
                && !scopes.contains(&scope)
            {
                scopes.push(scope);
            }
        }
        return scopes;
    }
    if query.locks.is_empty() {
        return Vec::new();
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return table_use(topology, query)
            .sharded
            .iter()
            .filter_map(|t| all_of(topology, t))
            .collect();
    };
    let mut scopes = Vec::new();
    for from in &select.from {
        let relations =
            std::iter::once(&from.relation).chain(from.joins.iter().map(|j| &j.relation));
        for relation in relations {
            let TableFactor::Table { name, alias, .. } = relation else {
                continue;
            };
            scopes.extend(table_scope(
                topology,
                name,
                alias.as_ref(),
                select.selection.as_ref(),
            ));
        }
    }
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::topology;

    fn scopes(sql: &str) -> Vec<KeyScope> {
        write_scopes(&topology(), sql)
            .into_iter()
            .map(|s| s.keys)
            .collect()
    }

    fn key(k: i64) -> KeyScope {
        KeyScope::Keys(vec![KeyExpr::Literal(KeyValue::Int(k))])
    }

    #[test]
    fn writes_name_their_keys() {
        assert_eq!(
            scopes("INSERT INTO orders (customer_id, total) VALUES (7, 1), ($1, 2)"),
            vec![KeyScope::Keys(vec![
                KeyExpr::Literal(KeyValue::Int(7)),
                KeyExpr::Param(1)
            ])]
        );
        assert_eq!(
            scopes("UPDATE orders SET total = 1 WHERE customer_id = 7"),
            vec![key(7)]
        );
        assert_eq!(
            scopes("DELETE FROM orders o WHERE o.customer_id = 7"),
            vec![key(7)]
        );
        assert_eq!(
            scopes("SELECT * FROM orders WHERE customer_id = 7 FOR UPDATE"),
            vec![key(7)]
        );
    }

    #[test]
    fn unrestricted_writes_take_the_whole_group() {
        assert_eq!(scopes("UPDATE orders SET total = 1"), vec![KeyScope::All]);
        assert_eq!(
            scopes("INSERT INTO orders (customer_id) SELECT customer_id FROM orders"),
            vec![KeyScope::All]
        );
        assert_eq!(
            scopes("COPY orders FROM STDIN WITH (FORMAT csv)"),
            vec![KeyScope::All]
        );
        assert_eq!(
            scopes("WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d"),
            vec![KeyScope::All]
        );
    }

    #[test]
    fn reads_and_other_tables_are_not_writes() {
        assert!(scopes("SELECT * FROM orders WHERE customer_id = 7").is_empty());
        assert!(scopes("INSERT INTO countries VALUES ('fr')").is_empty());
        assert!(scopes("UPDATE unsharded SET x = 1").is_empty());
        assert!(scopes("BEGIN").is_empty());
    }
}
