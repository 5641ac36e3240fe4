//! INSERT: rows split by shard, keys drawn from sequences, INSERT ... SELECT.

use super::*;

/// An INSERT ... VALUES into a sharded table without its shard key: the router draws the keys
/// from the key column's sequence (serial or identity) on the first shard, one per row, and
/// routes the rows by them, as if the client had written them (`$n` after the client's own
/// parameters). The key column goes in with `OVERRIDING SYSTEM VALUE` (an identity column
/// `GENERATED ALWAYS` takes the drawn value).
pub(super) fn plan_insert_drawing_keys(
    topology: &Topology,
    mut insert: Insert,
    table: &str,
    key: &str,
) -> Result<Planned, PlanError> {
    let refused = || {
        unsupported(format!(
            "INSERT into sharded table {table} without its shard key column {key} (other than \
             VALUES rows, whose keys the router draws from the column's sequence)"
        ))
    };
    if insert.columns.is_empty() {
        return unsupported(format!(
            "INSERT into sharded table {table} without a column list (name the columns, with \
             the shard key {key})"
        ));
    }
    let Some(source) = insert.source.as_mut() else {
        return refused();
    };
    let mut highest = 0;
    let _ = visit_expressions_mut(source.as_mut(), |expr| {
        if let Some(n) = placeholder_number(expr) {
            highest = highest.max(n);
        }
        ControlFlow::<()>::Continue(())
    });
    let SetExpr::Values(values) = source.body.as_mut() else {
        return refused();
    };
    let count = values.rows.len();
    for (i, row) in values.rows.iter_mut().enumerate() {
        row.content.push(Expr::value(Value::Placeholder(format!(
            "${}",
            highest + 1 + i
        ))));
    }
    insert
        .columns
        .push(ObjectName::from(vec![Ident::with_quote('"', key)]));
    insert.overriding = Some(sqlparser::ast::InsertOverriding::System);
    let text = Statement::Insert(insert.clone()).to_string();
    let inner = plan_insert(topology, insert, text)?;
    Ok(Planned {
        sql: inner.sql.clone(),
        returns_rows: inner.returns_rows,
        plan: Plan::DrawKeys(Box::new(DrawKeys {
            inner,
            table: table.to_string(),
            key: key.to_string(),
            first_param: highest + 1,
            count,
        })),
    })
}

/// INSERT ... SELECT whose rows the router moves: the SELECT (planned on its own) runs first,
/// then its rows go in as a COPY FROM STDIN, each to its shard (every shard for a reference
/// table, the first for an unsharded one), in one transaction, two-phase across shards.
pub(super) fn plan_insert_select(
    topology: &Topology,
    mut insert: Insert,
    text: String,
) -> Result<Planned, PlanError> {
    if insert.on.is_some() {
        return unsupported("INSERT ... SELECT ... ON CONFLICT across shards");
    }
    if insert.returning.is_some() {
        return unsupported("INSERT ... SELECT ... RETURNING across shards");
    }
    let Some(mut source) = insert.source.take() else {
        return unsupported("INSERT without a source");
    };
    let mut source_params = Vec::new();
    Renumber::new(1, &mut source_params).apply(source.as_mut());
    let source_text = source.to_string();
    let source = plan_query(topology, *source, source_text)?;
    match &source.plan {
        Plan::Single(_) | Plan::Scatter { write: false, .. } | Plan::MultiStage(_) => {}
        _ => return unsupported("this INSERT ... SELECT source across shards"),
    }
    let TableObject::TableName(name) = &insert.table else {
        return unsupported("INSERT into a table function");
    };
    let columns: Vec<String> = insert
        .columns
        .iter()
        .map(|c| quote_ident(&last_name(c)))
        .collect();
    let mut copy_sql = format!("COPY {name}");
    if !columns.is_empty() {
        copy_sql.push_str(&format!(" ({})", columns.join(", ")));
    }
    copy_sql.push_str(" FROM STDIN");
    let copy = plan_sql(topology, &copy_sql)?.pop();
    let Some(Planned {
        plan: Plan::CopyIn(destination, format),
        ..
    }) = copy
    else {
        return unsupported("INSERT ... SELECT into this table across shards");
    };
    Ok(Planned {
        sql: text,
        plan: Plan::InsertSelect(Box::new(InsertSelect {
            source,
            source_params,
            copy_sql,
            destination,
            format,
        })),
        returns_rows: false,
    })
}

pub(super) fn plan_insert(
    topology: &Topology,
    insert: Insert,
    text: String,
) -> Result<Planned, PlanError> {
    let TableObject::TableName(name) = &insert.table else {
        return unsupported("INSERT into a table function");
    };
    let table = last_name(name);
    let returns_rows = insert.returning.is_some();
    let planned = |plan| {
        Ok(Planned {
            sql: text.clone(),
            plan,
            returns_rows,
        })
    };
    let source_usage = insert
        .source
        .as_ref()
        .map(|s| table_use(topology, s.as_ref()));
    let from_query = insert
        .source
        .as_ref()
        .is_some_and(|source| !matches!(source.body.as_ref(), SetExpr::Values(_)));
    // INSERT ... SELECT reading sharded tables, or into a sharded table: the router reads the
    // rows and copies them in, each to its shard.
    if from_query
        && (source_usage.as_ref().is_some_and(|u| !u.sharded.is_empty())
            || topology.tables.contains_key(&table))
    {
        return plan_insert_select(topology, insert, text);
    }
    if source_usage.is_some_and(|u| !u.sharded.is_empty()) {
        return unsupported("INSERT ... VALUES with a subquery over a sharded table");
    }
    if topology.is_reference(&table) {
        return planned(Plan::Broadcast);
    }
    let Some(sharded) = topology.tables.get(&table) else {
        return planned(Plan::Single(Target::Shard(0)));
    };
    let group = sharded.group;
    let key_type = topology.groups[group].key_type;
    let Some(position) = insert
        .columns
        .iter()
        .position(|c| last_name(c) == sharded.shard_key)
    else {
        return plan_insert_drawing_keys(topology, insert, &table, &sharded.shard_key);
    };
    let Some(source) = &insert.source else {
        return unsupported("INSERT without VALUES into a sharded table");
    };
    let SetExpr::Values(values) = source.body.as_ref() else {
        return unsupported("INSERT ... SELECT into a sharded table");
    };
    let mut keys = Vec::with_capacity(values.rows.len());
    for row in &values.rows {
        let Some(expr) = row.get(position) else {
            return unsupported("a VALUES row shorter than the column list");
        };
        match key_expr(expr, key_type) {
            Some(key) => keys.push(key),
            None => {
                return unsupported(format!(
                    "a shard key value that is not a literal or a parameter ({expr})"
                ));
            }
        }
    }
    let mut lookups = Vec::new();
    for (column, lookup_table) in &sharded.lookups {
        match insert.columns.iter().position(|c| last_name(c) == *column) {
            Some(position) => lookups.push((position, lookup_table.clone())),
            None => {
                return unsupported(format!(
                    "INSERT into {table} without its lookup vindex column {column}"
                ));
            }
        }
    }
    lookups.sort();
    if !lookups.is_empty() && insert.on.is_some() {
        return unsupported("ON CONFLICT on a table with a lookup vindex");
    }
    if let [KeyExpr::Param(param)] = keys.as_slice()
        && lookups.is_empty()
    {
        return planned(Plan::Single(Target::Param {
            param: *param,
            group,
        }));
    }
    if lookups.is_empty() && keys.iter().all(|k| matches!(k, KeyExpr::Literal(_))) {
        let mut shards = Vec::new();
        for key in &keys {
            if let KeyExpr::Literal(value) = key {
                let shard = shard_of(topology, group, value)?;
                if !shards.contains(&shard) {
                    shards.push(shard);
                }
            }
        }
        if shards.len() == 1 {
            return planned(Plan::Single(Target::Shard(shards[0])));
        }
    }
    planned(Plan::Insert(InsertSplit {
        group,
        keys,
        template: Box::new(insert),
        lookups,
        key_position: position,
    }))
}

/// The per-shard statements of a split INSERT: `rows_by_shard` gives each shard's row indexes.
/// Parameters are renumbered per statement; the result gives, per shard, the SQL and the
/// (0-based) indexes of the original parameters it uses, in their new order.
pub fn render_insert_part(template: &Insert, rows: &[usize]) -> (String, Vec<usize>) {
    let mut insert = template.clone();
    let mut used: Vec<usize> = Vec::new();
    if let Some(source) = insert.source.as_mut()
        && let SetExpr::Values(values) = source.body.as_mut()
    {
        let kept: Vec<_> = rows.iter().map(|i| values.rows[*i].clone()).collect();
        values.rows = kept;
        Renumber::new(1, &mut used).apply(&mut values.rows);
    }
    (Statement::Insert(insert).to_string(), used)
}

/// The INSERT that records the rows of a split insert in a lookup table: `(value, key)` from
/// the given VALUES positions; parameters renumbered as in [`render_insert_part`].
pub fn render_lookup_insert(
    split: &InsertSplit,
    value_position: usize,
    lookup_table: &str,
) -> (String, Vec<usize>) {
    let mut insert = (*split.template).clone();
    insert.table =
        TableObject::TableName(ObjectName::from(vec![Ident::with_quote('"', lookup_table)]));
    insert.columns = vec![
        ObjectName::from(vec![Ident::with_quote('"', "value")]),
        ObjectName::from(vec![Ident::with_quote('"', "key")]),
    ];
    insert.returning = None;
    insert.on = None;
    if let Some(source) = insert.source.as_mut()
        && let SetExpr::Values(values) = source.body.as_mut()
    {
        for row in values.rows.iter_mut() {
            let value = row.get(value_position).cloned();
            let key = row.get(split.key_position).cloned();
            if let (Some(value), Some(key)) = (value, key) {
                row.content = vec![value, key];
            }
        }
    }
    let rows: Vec<usize> = (0..split.keys.len()).collect();
    render_insert_part(&insert, &rows)
}
