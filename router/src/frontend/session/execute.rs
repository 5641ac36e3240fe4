//! Running one planned statement: the plan's parts on their shards, outcome and rows.

use super::*;

/// Decodes a shard-key parameter.
pub fn key_from_param(
    params: &Params,
    param: usize,
    key_type: KeyType,
) -> Result<KeyValue, RouterError> {
    let index = param
        .checked_sub(1)
        .ok_or_else(|| RouterError::session("08P01", "parameter $0"))?;
    let value = params.values.get(index).ok_or_else(|| {
        RouterError::session(
            "08P01",
            format!("the shard key parameter ${param} was not bound"),
        )
    })?;
    let Some(bytes) = value else {
        return Err(RouterError::session(
            "22004",
            format!("the shard key parameter ${param} is NULL; it must have a value"),
        ));
    };
    let bad = || RouterError::session("22P02", format!("invalid shard key in parameter ${param}"));
    match (params.format_of(index), key_type) {
        (1, KeyType::Bigint) => match bytes.len() {
            2 => Ok(KeyValue::Int(
                i16::from_be_bytes([bytes[0], bytes[1]]) as i64
            )),
            4 => Ok(KeyValue::Int(
                i32::from_be_bytes(bytes[..4].try_into().unwrap()) as i64,
            )),
            8 => Ok(KeyValue::Int(i64::from_be_bytes(
                bytes[..8].try_into().unwrap(),
            ))),
            _ => Err(bad()),
        },
        (_, KeyType::Bigint) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .map(KeyValue::Int)
            .ok_or_else(bad),
        (_, KeyType::Text) => std::str::from_utf8(bytes)
            .map(|t| KeyValue::Text(t.to_string()))
            .map_err(|_| bad()),
    }
}

pub(super) async fn rows_outcome(
    mut cursor: ShardCursor,
    sql: &str,
    failed: Arc<AtomicBool>,
) -> Result<Outcome, RouterError> {
    match cursor.columns.take() {
        Some(columns) => {
            let rows = futures::stream::unfold(Some(cursor), |state| async move {
                let mut cursor = state?;
                match cursor.next_row().await {
                    Ok(Some(row)) => Some((Ok(row), Some(cursor))),
                    Ok(None) => None,
                    Err(error) => Some((Err(error), None)),
                }
            })
            .boxed();
            Ok(Outcome::Rows {
                columns,
                rows: watch_failures(rows, failed),
                command: command_for(sql),
            })
        }
        None => match cursor.tag.take() {
            Some(tag) if tag.is_empty() => Ok(Outcome::Empty),
            Some(tag) => Ok(Outcome::Command(tag)),
            None => Ok(Outcome::Empty),
        },
    }
}

/// The merge with `LIMIT $n` / `OFFSET $n` read from the parameters (NULL: no limit, offset 0).
pub(super) fn resolve_paging(merge: &MergeSpec, params: &Params) -> Result<MergeSpec, RouterError> {
    let mut merge = merge.clone();
    let read = |param: usize, what: &str, code: &'static str| -> Result<Option<u64>, RouterError> {
        let index = param - 1;
        let Some(Some(bytes)) = params.values.get(index) else {
            return Ok(None);
        };
        let value = if params.format_of(index) == 1 {
            match bytes.len() {
                8 => Some(i64::from_be_bytes(bytes[..].try_into().expect("8 bytes"))),
                4 => Some(i32::from_be_bytes(bytes[..].try_into().expect("4 bytes")) as i64),
                2 => Some(i16::from_be_bytes(bytes[..].try_into().expect("2 bytes")) as i64),
                _ => None,
            }
        } else {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
        };
        match value {
            Some(n) if n < 0 => Err(RouterError::session(
                code,
                format!("{what} must not be negative"),
            )),
            Some(n) => Ok(Some(n as u64)),
            None => Err(RouterError::session(
                "22P02",
                format!("invalid input syntax for type bigint in {what}"),
            )),
        }
    };
    if let Some(param) = merge.limit_param {
        merge.limit = read(param, "LIMIT", "2201W")?;
    }
    if let Some(param) = merge.offset_param {
        merge.offset = read(param, "OFFSET", "2201X")?.unwrap_or(0);
    }
    Ok(merge)
}

pub(super) fn watch_failures(rows: RowStream, failed: Arc<AtomicBool>) -> RowStream {
    rows.inspect(move |row| {
        if row.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
    })
    .boxed()
}

/// Marks statement parts that maintain lookup tables (not part of the client's result).
pub(super) const BOOKKEEPING: &str = "/* pg-router lookup */ ";

/// Bits of a bigint sequence value below the shard's range: shard `n`'s sequences of a sharded
/// table start at `n << 48` + 1 (as Citus does per node), so ids drawn on different shards
/// never collide.
pub(super) const SEQUENCE_RANGE_BITS: u32 = 48;

/// Moves the new (never used) bigint sequences owned by `table` (serial and identity columns)
/// to `shard`'s range.
pub(super) fn spread_sequences_sql(table: &str, shard: usize) -> String {
    let start = ((shard as u64) << SEQUENCE_RANGE_BITS) + 1;
    format!(
        "{BOOKKEEPING}SELECT pg_catalog.setval(d.objid::regclass, {start}, false) \
         FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
         WHERE d.classid = 'pg_catalog.pg_class'::regclass \
         AND d.refobjid = pg_catalog.to_regclass({}) AND d.deptype IN ('a', 'i') \
         AND s.seqtypid = 'pg_catalog.int8'::regtype \
         AND pg_catalog.pg_sequence_last_value(d.objid) IS NULL",
        plan::quote_literal(table)
    )
}

/// Splits a multi-row INSERT into per-shard statements (plus lookup-table inserts).
pub fn split_insert(
    topology: &Topology,
    split: &InsertSplit,
    params: &Params,
) -> Result<Vec<(usize, String, Params)>, RouterError> {
    let key_type = topology.groups[split.group].key_type;
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, key) in split.keys.iter().enumerate() {
        let value = match key {
            KeyExpr::Literal(value) => value.clone(),
            KeyExpr::Param(param) => key_from_param(params, *param, key_type)?,
        };
        let shard = plan::shard_of(topology, split.group, &value)?;
        by_shard.entry(shard).or_default().push(row);
    }
    let mut parts: Vec<(usize, String, Params)> = by_shard
        .into_iter()
        .map(|(shard, rows)| {
            let (sql, used) = plan::render_insert_part(&split.template, &rows);
            (shard, sql, params.subset(&used))
        })
        .collect();
    for (position, lookup_table) in &split.lookups {
        let (sql, used) = plan::render_lookup_insert(split, *position, lookup_table);
        parts.push((0, format!("{BOOKKEEPING}{sql}"), params.subset(&used)));
    }
    Ok(parts)
}

impl Session {
    /// Runs one planned statement.
    #[tracing::instrument(
        level = "debug",
        name = "routed_query",
        skip_all,
        fields(
            otel.kind = "server",
            db.system.name = "postgresql",
            db.query.text = crate::telemetry::query_text(&planned.sql),
            pg_router.plan = planned.plan.kind(),
            pg_router.shards = tracing::field::Empty,
            db.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    )]
    pub async fn execute(
        &mut self,
        planned: &Planned,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        let started = Instant::now();
        if !tracing::Span::current().is_disabled() {
            let runtime = match &self.transaction {
                Some(transaction) => transaction.runtime.clone(),
                None => self.state.runtime(),
            };
            let shards =
                crate::telemetry::shards_touched(&planned.plan, runtime.topology.shards.len());
            tracing::Span::current().record("pg_router.shards", shards);
        }
        if self.stream_failed.swap(false, Ordering::Relaxed)
            && let Some(transaction) = self.transaction.as_mut()
        {
            transaction.failed = true;
        }
        let result = self
            .execute_in_cut_over(planned, params, result_formats, cache)
            .await;
        let metrics = &self.state.metrics;
        metrics.observe_query(planned.plan.kind(), started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            let code = error.to_server_error().code;
            metrics.observe_error(&code);
            crate::telemetry::record_error(&code);
            if let Some(transaction) = self.transaction.as_mut() {
                transaction.failed = true;
            }
        }
        result
    }

    pub(super) async fn execute_plan(
        &mut self,
        planned: &Planned,
        params: &Params,
        result_formats: &[i16],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        if let Some(transaction) = &self.transaction
            && transaction.failed
            && !matches!(
                planned.plan,
                Plan::Transaction(TransactionControl::Commit | TransactionControl::Rollback)
                    | Plan::Savepoint(SavepointOp::RollbackTo(_))
            )
        {
            return Err(RouterError::session(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        let runtime = match &self.transaction {
            Some(transaction) => transaction.runtime.clone(),
            None => self.state.runtime(),
        };
        match &planned.plan {
            Plan::Transaction(TransactionControl::Begin) => {
                if self.transaction.is_none() {
                    self.transaction = Some(Transaction {
                        runtime,
                        begin_sql: planned.sql.clone(),
                        savepoints: Vec::new(),
                        participants: BTreeMap::new(),
                        failed: false,
                    });
                }
                Ok(Outcome::Begin)
            }
            Plan::Transaction(TransactionControl::Commit) => match self.transaction.take() {
                None => Ok(Outcome::End("COMMIT".into())),
                Some(transaction) if transaction.failed => {
                    rollback(transaction.participants).await;
                    Ok(Outcome::End("ROLLBACK".into()))
                }
                Some(transaction) => {
                    let participants: Vec<_> = transaction.participants.into_iter().collect();
                    twophase::commit(participants, &self.state.gxids, &self.state.metrics).await?;
                    Ok(Outcome::End("COMMIT".into()))
                }
            },
            Plan::Transaction(TransactionControl::Rollback) => {
                if let Some(transaction) = self.transaction.take() {
                    rollback(transaction.participants).await;
                }
                Ok(Outcome::End("ROLLBACK".into()))
            }
            Plan::Setting => self.apply_setting(&runtime, &planned.sql).await,
            Plan::Savepoint(op) => self.savepoint(op, &planned.sql).await,
            Plan::CopyIn(destination, format) => {
                self.start_copy(&runtime, destination, format, &planned.sql)
                    .await
            }
            Plan::CopyOut(copy) => {
                let shards: Vec<usize> = match &copy.shard {
                    Some(target) => vec![self.resolve_target(&runtime, target, params)?],
                    None => (0..runtime.topology.shards.len()).collect(),
                };
                let mut handles = std::collections::VecDeque::with_capacity(shards.len());
                for shard in shards {
                    handles.push_back(self.handle_for(&runtime, shard).await?);
                }
                let mut first = handles.pop_front().expect("at least one shard");
                // The first shard starts now: a bad statement fails before any data is sent.
                let (format, formats) = match first.start_copy_out(&planned.sql).await {
                    Ok(started) => started,
                    Err(error) => {
                        if error.is_connection_lost() {
                            first.discard();
                        }
                        return Err(error.into());
                    }
                };
                Ok(Outcome::CopyOut {
                    format,
                    formats,
                    data: copy_out_stream(first, handles, planned.sql.clone(), copy.header),
                })
            }
            Plan::Deallocate => Ok(Outcome::Command(
                if planned.sql.to_ascii_uppercase().contains("ALL") {
                    "DEALLOCATE ALL"
                } else {
                    "DEALLOCATE"
                }
                .into(),
            )),
            Plan::Single(target) => {
                let shard = match target {
                    Target::Lookup {
                        lookup_table,
                        value,
                        group,
                    } => {
                        self.lookup_shard(&runtime, lookup_table, value, *group, params)
                            .await?
                    }
                    other => self.resolve_target(&runtime, other, params)?,
                };
                let handle = self.handle_for(&runtime, shard).await?;
                let cursor = ShardCursor::open(
                    cancel.as_ref(),
                    handle,
                    &planned.sql,
                    params,
                    result_formats,
                    cache,
                )
                .await?;
                let mut cursor = cursor;
                self.notices.append(&mut cursor.notices);
                cursor.stream_notices_to(self.stream_notices.clone());
                rows_outcome(cursor, &planned.sql, self.stream_failed.clone()).await
            }
            Plan::Scatter {
                shards,
                merge,
                write,
            } => {
                let shards: Vec<usize> = shards
                    .clone()
                    .unwrap_or_else(|| (0..runtime.topology.shards.len()).collect());
                if *write {
                    let parts = shards
                        .iter()
                        .map(|s| (*s, planned.sql.clone(), params.clone()))
                        .collect();
                    return self
                        .run_parts(&runtime, parts, true, false, result_formats)
                        .await;
                }
                // NOT EXISTS answered per shard: the first shard's keys are checked on the others
                // (rows go back in text; other formats take the parallel intersection below).
                if let Some(check) = &merge.anti_check
                    && result_formats.iter().all(|format| *format == 0)
                {
                    return self
                        .anti_join(
                            &runtime,
                            planned,
                            merge.hidden,
                            check,
                            params,
                            &shards,
                            cache,
                        )
                        .await;
                }
                let mut handles = Vec::with_capacity(shards.len());
                for shard in &shards {
                    handles.push(self.handle_for(&runtime, *shard).await?);
                }
                // Merged groups go to a final statement as text arrays: the shards answer in
                // text, the final statement in the client's formats.
                let shard_formats = match merge.finalize {
                    Some(_) => &[][..],
                    None => result_formats,
                };
                let shard_params = match (&merge.finalize, &merge.shard_params) {
                    (Some(finalize), _) => &params.subset(&finalize.shard_params),
                    (None, Some(used)) => &params.subset(used),
                    (None, None) => params,
                };
                let opens = handles.into_iter().map(|handle| {
                    ShardCursor::open(
                        cancel.as_ref(),
                        handle,
                        &planned.sql,
                        shard_params,
                        shard_formats,
                        cache,
                    )
                });
                let mut cursors = futures::future::try_join_all(opens).await?;
                for cursor in &mut cursors {
                    self.notices.append(&mut cursor.notices);
                    cursor.stream_notices_to(self.stream_notices.clone());
                }
                let columns = cursors
                    .iter_mut()
                    .find_map(|c| c.columns.clone())
                    .unwrap_or_default();
                let output = merge::output_columns(&columns, merge);
                let rows = merge::merge(cursors, columns, resolve_paging(merge, params)?);
                if let Some(finalize) = &merge.finalize {
                    return self
                        .finalize(
                            &runtime,
                            shards[0],
                            finalize,
                            &output,
                            rows,
                            params,
                            result_formats,
                        )
                        .await;
                }
                Ok(Outcome::Rows {
                    columns: output,
                    rows: watch_failures(rows, self.stream_failed.clone()),
                    command: "SELECT".into(),
                })
            }
            Plan::InsertSelect(insert) => self.insert_select(&runtime, insert, params).await,
            Plan::CopyQuery(copy) => {
                let outcome = Box::pin(self.execute_plan(&copy.query, params, &[], cache)).await?;
                let Outcome::Rows { columns, rows, .. } = outcome else {
                    return Err(RouterError::session(
                        "0A000",
                        "COPY (query) TO STDOUT of a statement without rows",
                    ));
                };
                Ok(Outcome::CopyOut {
                    format: 0,
                    formats: vec![0; columns.len()],
                    data: copy_query_stream(copy, &columns, rows),
                })
            }
            Plan::Explain(explain) => {
                let shard = explain
                    .shards
                    .as_ref()
                    .and_then(|s| s.first().copied())
                    .unwrap_or(0);
                let handle = self.handle_for(&runtime, shard).await?;
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, &explain.sql, params, &[], false)
                        .await?;
                let plan = cursor.collect().await?;
                let name = &runtime.topology.shards[shard].name;
                let mut lines = explain.summary.clone();
                lines.push(format!("  Plan on shard {name}:"));
                for row in &plan {
                    if let Some(Some(line)) = split_fields(&row.data).first() {
                        lines.push(format!("    {}", String::from_utf8_lossy(line)));
                    }
                }
                let format = result_formats.first().copied().unwrap_or(0);
                let column = Column {
                    name: "QUERY PLAN".into(),
                    table_oid: 0,
                    column_id: 0,
                    type_oid: crate::protocol::values::oid::TEXT,
                    type_size: -1,
                    type_modifier: -1,
                    format,
                };
                let rows: Vec<Result<Row, RouterError>> = lines
                    .into_iter()
                    .map(|line| Ok(merge::build_row(&[Some(line.as_bytes())])))
                    .collect();
                Ok(Outcome::Rows {
                    columns: vec![column],
                    rows: futures::stream::iter(rows).boxed(),
                    command: "EXPLAIN".into(),
                })
            }
            Plan::DrawKeys(draw) => {
                self.draw_keys(&runtime, draw, params, result_formats, cache)
                    .await
            }
            Plan::BoundSubqueries(bound) => {
                self.bound_subqueries(&runtime, bound, params, result_formats, cache)
                    .await
            }
            Plan::MultiStage(multi) => {
                self.multi_stage(&runtime, multi, params, result_formats)
                    .await
            }
            Plan::Broadcast => {
                let mut parts: Vec<_> = (0..runtime.topology.shards.len())
                    .map(|s| (s, planned.sql.clone(), params.clone()))
                    .collect();
                let table = plan::sharded_table_of_ddl(&runtime.topology, &planned.sql);
                if let Some(table) = &table {
                    for shard in 1..runtime.topology.shards.len() {
                        parts.push((shard, spread_sequences_sql(table, shard), Params::default()));
                    }
                }
                let atomic = !non_transactional(&planned.sql);
                let outcome = self
                    .run_parts(&runtime, parts, atomic, true, result_formats)
                    .await?;
                if let Some(table) = &table {
                    self.warn_narrow_sequences(&runtime, table).await;
                }
                // New aggregates, tables or columns: the planner reads them from the catalog.
                self.state.refresh_aggregates().await;
                Ok(outcome)
            }
            Plan::Insert(split) => {
                let parts = split_insert(&runtime.topology, split, params)?;
                self.run_parts(&runtime, parts, true, false, result_formats)
                    .await
            }
        }
    }

    /// Runs an aggregate query's final statement on `shard` over the merged groups (`rows`,
    /// text format, described by `columns`), one text array parameter per column.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn finalize(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        finalize: &plan::Finalize,
        columns: &[Column],
        rows: RowStream,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let arrays = collect_arrays(columns.len(), rows).await?;
        let mut types = Vec::with_capacity(columns.len() + finalize.client_params.len());
        for column in columns {
            types.push(self.array_type(runtime, shard, column.type_oid).await?);
        }
        let mut values: Vec<Option<bytes::Bytes>> = arrays.into_iter().map(Some).collect();
        let mut formats = vec![0; values.len()];
        let client = params.subset(&finalize.client_params);
        types.extend(client.types);
        values.extend(client.values);
        formats.extend(client.formats);
        let params = Params {
            types,
            values,
            formats,
        };
        self.rows_on_shard(runtime, shard, &finalize.sql, &params, result_formats)
            .await
    }

    /// Runs a statement the router wrote (a final or outer statement) on `shard`, its rows
    /// going to the client.
    pub(super) async fn rows_on_shard(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        sql: &str,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let handle = self.handle_for(runtime, shard).await?;
        let cancel = self.cancel.clone();
        let mut cursor =
            ShardCursor::open(cancel.as_ref(), handle, sql, params, result_formats, true).await?;
        self.notices.append(&mut cursor.notices);
        cursor.stream_notices_to(self.stream_notices.clone());
        rows_outcome(cursor, "SELECT", self.stream_failed.clone()).await
    }

    /// Runs statement parts on several shards: inside the client's transaction, or (if `atomic`
    /// and several shards) in an implicit two-phase transaction, or one by one.
    pub(super) async fn run_parts(
        &mut self,
        runtime: &Runtime,
        parts: Vec<(usize, String, Params)>,
        atomic: bool,
        broadcast: bool,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let mut distinct: Vec<usize> = parts.iter().map(|p| p.0).collect();
        distinct.sort();
        distinct.dedup();
        let implicit =
            self.transaction.is_none() && atomic && (distinct.len() > 1 || parts.len() > 1);
        if implicit {
            self.transaction = Some(Transaction {
                runtime: Arc::new(Runtime {
                    topology: runtime.topology.clone(),
                    pools: runtime.pools.clone(),
                    version: runtime.version,
                    plan_cache: Default::default(),
                }),
                begin_sql: "BEGIN".into(),
                savepoints: Vec::new(),
                participants: BTreeMap::new(),
                failed: false,
            });
        }
        let result = self
            .run_parts_inner(runtime, &parts, broadcast, result_formats)
            .await;
        if implicit {
            let transaction = self.transaction.take().expect("implicit transaction");
            match &result {
                Ok(_) => {
                    let participants: Vec<_> = transaction.participants.into_iter().collect();
                    twophase::commit(participants, &self.state.gxids, &self.state.metrics).await?;
                }
                Err(_) => rollback(transaction.participants).await,
            }
        }
        result
    }

    pub(super) async fn run_parts_inner(
        &mut self,
        runtime: &Runtime,
        parts: &[(usize, String, Params)],
        broadcast: bool,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        let mut columns: Option<Vec<Column>> = None;
        let mut rows: Vec<Row> = Vec::new();
        let mut first_tag: Option<String> = None;
        let mut total: u64 = 0;
        for (i, (shard, sql, params)) in parts.iter().enumerate() {
            let bookkeeping = sql.starts_with(BOOKKEEPING);
            let handle = self.handle_for(runtime, *shard).await?;
            if bookkeeping {
                let mut cursor =
                    ShardCursor::open(cancel.as_ref(), handle, sql, params, &[], false).await?;
                cursor.collect().await?;
                continue;
            }
            let mut cursor =
                ShardCursor::open(cancel.as_ref(), handle, sql, params, result_formats, false)
                    .await?;
            let part_rows = cursor.collect().await?;
            if i == 0 || !broadcast {
                self.notices.append(&mut cursor.notices);
            }
            if i == 0 || !broadcast {
                if columns.is_none() {
                    columns = cursor.columns.take();
                }
                rows.extend(part_rows);
            }
            let tag = cursor.tag.take().unwrap_or_default();
            total += tag_rows(&tag).unwrap_or(0);
            if first_tag.is_none() {
                first_tag = Some(tag);
            }
        }
        let first_tag = first_tag.unwrap_or_default();
        let command = tag_command(&first_tag);
        if let Some(columns) = columns {
            let command = if command == "INSERT" {
                "INSERT 0".into()
            } else {
                command
            };
            return Ok(Outcome::Rows {
                columns,
                rows: futures::stream::iter(rows.into_iter().map(Ok)).boxed(),
                command,
            });
        }
        if broadcast || tag_rows(&first_tag).is_none() {
            return Ok(Outcome::Command(first_tag));
        }
        Ok(Outcome::Command(match command.as_str() {
            "INSERT" => format!("INSERT 0 {total}"),
            other => format!("{other} {total}"),
        }))
    }
    pub(super) fn resolve_target(
        &self,
        runtime: &Runtime,
        target: &Target,
        params: &Params,
    ) -> Result<usize, RouterError> {
        match target {
            Target::Shard(shard) => Ok(*shard),
            Target::Param { param, group } => {
                let key_type = runtime.topology.groups[*group].key_type;
                let key = key_from_param(params, *param, key_type)?;
                Ok(plan::shard_of(&runtime.topology, *group, &key)?)
            }
            Target::Lookup { .. } => Err(RouterError::session(
                "XX000",
                "a lookup target needs a lookup",
            )),
            Target::Any => {
                if let Some(transaction) = &self.transaction
                    && let Some(shard) = transaction.participants.keys().next()
                {
                    return Ok(*shard);
                }
                let n = runtime.topology.shards.len();
                Ok(self.state.round_robin.fetch_add(1, Ordering::Relaxed) % n)
            }
        }
    }

    /// Reads a shard key from a lookup table (on shard 0) and returns its shard. A value that is
    /// not in the lookup table has no row anywhere: any shard answers (with no rows).
    pub(super) async fn lookup_shard(
        &mut self,
        runtime: &Runtime,
        lookup_table: &str,
        value: &LookupValue,
        group: usize,
        params: &Params,
    ) -> Result<usize, RouterError> {
        let cancel = self.cancel.clone();
        let lookup_params = match value {
            LookupValue::Literal(text) => Params {
                types: vec![0],
                values: vec![Some(bytes::Bytes::from(text.clone().into_bytes()))],
                formats: vec![0],
            },
            LookupValue::Param(n) => params.subset(&[n - 1]),
        };
        let handle = self.handle_for(runtime, 0).await?;
        let sql = plan::lookup_query(lookup_table);
        let mut cursor =
            ShardCursor::open(cancel.as_ref(), handle, &sql, &lookup_params, &[], true).await?;
        let rows = cursor.collect().await?;
        let Some(row) = rows.first() else {
            return Ok(0);
        };
        let key_text = crate::protocol::values::split_text_row(&row.data)
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| {
                RouterError::session("22004", format!("NULL key in lookup table {lookup_table}"))
            })?;
        let key = match runtime.topology.groups[group].key_type {
            KeyType::Bigint => KeyValue::Int(key_text.trim().parse().map_err(|_| {
                RouterError::session(
                    "22P02",
                    format!("lookup table {lookup_table} holds a non-integer key"),
                )
            })?),
            KeyType::Text => KeyValue::Text(key_text),
        };
        Ok(plan::shard_of(&runtime.topology, group, &key)?)
    }

    /// A NOTICE for integer (not bigint) sequences of a sharded table: each shard draws the
    /// same values from its own.
    pub(super) async fn warn_narrow_sequences(&mut self, runtime: &Runtime, table: &str) {
        let sql = format!(
            "SELECT d.objid::regclass::text FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass \
             AND d.refobjid = pg_catalog.to_regclass({}) AND d.deptype IN ('a', 'i') \
             AND s.seqtypid <> 'pg_catalog.int8'::regtype",
            plan::quote_literal(table)
        );
        let names = self
            .first_column(runtime, 0, &sql)
            .await
            .unwrap_or_default();
        for name in names.into_iter().flatten() {
            self.notices.push(crate::protocol::messages::ServerError {
                severity: "NOTICE".into(),
                code: "01000".into(),
                message: format!(
                    "sequence {} of sharded table {table} is not bigint: each shard draws the \
                     same values from its own copy",
                    String::from_utf8_lossy(&name)
                ),
                detail: None,
                hint: Some(
                    "use bigserial or a bigint identity column: pg-router gives each shard its \
                     own range of those"
                        .into(),
                ),
                position: None,
            });
        }
    }
}
