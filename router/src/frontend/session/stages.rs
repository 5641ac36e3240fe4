//! Multi-stage plans: subquery and intermediate results computed first and shipped to the
//! shards as arrays, drawn keys, INSERT ... SELECT.

use super::*;

/// The most an intermediate result (merged groups, a WITH query's or a pulled table's rows) may
/// take in the router, as text arrays.
pub(super) const MAX_INTERMEDIATE_BYTES: usize = 256 << 20;

/// `name AS (SELECT ... FROM unnest(<arrays>) AS name(<columns>))`: a stage's result in a
/// WITH; columns that came as text (`casts`) are cast back to their types.
pub(super) fn stage_definition(
    stage: &plan::Stage,
    columns: &[Column],
    arrays: &[String],
    casts: &[Option<String>],
) -> String {
    let names: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| plan::quote_ident(stage.columns.get(i).unwrap_or(&column.name)))
        .collect();
    let name = plan::quote_ident(&stage.name);
    let items: Vec<String> = names
        .iter()
        .zip(casts)
        .map(|(column, cast)| match cast {
            Some(cast) => format!("{name}.{column}::{cast} AS {column}"),
            None => format!("{name}.{column}"),
        })
        .collect();
    format!(
        "{name} AS (SELECT {} FROM unnest({}) AS {name}({}))",
        items.join(", "),
        arrays.join(", "),
        names.join(", ")
    )
}

/// The rows of a result (text format), as one text-format array literal per column.
pub(super) async fn collect_arrays(
    width: usize,
    mut rows: RowStream,
) -> Result<Vec<bytes::Bytes>, RouterError> {
    let mut arrays: Vec<Vec<u8>> = vec![b"{".to_vec(); width];
    let mut first = true;
    let mut total = 0;
    while let Some(row) = rows.next().await {
        let row = row?;
        total += row.data.len();
        if total > MAX_INTERMEDIATE_BYTES {
            return Err(RouterError::session(
                "54000",
                format!(
                    "the intermediate result of this statement exceeds {} MiB in pg-router \
                     (rows read from the shards to finish it on one shard); restrict it \
                     with WHERE, or run it per shard key",
                    MAX_INTERMEDIATE_BYTES >> 20
                ),
            ));
        }
        for (array, field) in arrays.iter_mut().zip(split_fields(&row.data)) {
            if !first {
                array.push(b',');
            }
            array_element(array, field);
        }
        first = false;
    }
    Ok(arrays
        .into_iter()
        .map(|mut array| {
            array.push(b'}');
            bytes::Bytes::from(array)
        })
        .collect())
}

impl Session {
    /// A multi-stage statement whose outer statement reads sharded tables: the stages' rows go
    /// to every shard it runs on as array literals, in a WITH in front of its statement.
    pub(super) async fn multi_stage_distributed(
        &mut self,
        runtime: &Runtime,
        multi: &plan::MultiStage,
        outer: &Planned,
        params: &Params,
        result_formats: &[i16],
    ) -> Result<Outcome, RouterError> {
        let mut definitions = Vec::with_capacity(multi.stages.len() + multi.kept.len());
        for stage in &multi.stages {
            let (columns, arrays) = self.run_stage(stage, params).await?;
            let mut literals = Vec::with_capacity(columns.len());
            let mut casts = Vec::with_capacity(columns.len());
            for (column, array) in columns.iter().zip(arrays) {
                let (array_oid, cast) = self.stage_transport(runtime, column).await?;
                let array_type = match cast {
                    Some(_) => "pg_catalog.text[]".to_string(),
                    None => {
                        self.array_type_name(runtime, column.type_oid, array_oid)
                            .await?
                    }
                };
                literals.push(format!(
                    "{}::{array_type}",
                    plan::quote_literal(&String::from_utf8_lossy(&array))
                ));
                casts.push(cast);
            }
            definitions.push(stage_definition(stage, &columns, &literals, &casts));
        }
        definitions.extend(multi.kept.iter().cloned());
        let mut planned = outer.clone();
        planned.sql = format!("WITH {} {}", definitions.join(", "), outer.sql);
        let outer_params = params.subset(&multi.outer_params);
        // A statement text made for this execution: not kept prepared on the shards.
        self.execute_plan(&planned, &outer_params, result_formats, false)
            .await
    }

    /// A `NOT EXISTS` the shards answer over their own rows (`plan/anti.rs`): the statement
    /// runs on the first shard, whose rows carry their keys (the `hidden` last columns); each
    /// other shard then gets the keys still kept as arrays and runs `check`, which keeps those
    /// that pass there. The first shard's rows whose key passed everywhere are the answer. The
    /// other shards only probe the few keys, where running the whole statement on each would
    /// repeat its reference-table work once per shard.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn anti_join(
        &mut self,
        runtime: &Runtime,
        planned: &Planned,
        hidden: usize,
        check: &str,
        params: &Params,
        shards: &[usize],
        cache: bool,
    ) -> Result<Outcome, RouterError> {
        let cancel = self.cancel.clone();
        let Some((&first, others)) = shards.split_first() else {
            return Err(RouterError::session("XX000", "a statement on no shard"));
        };
        let handle = self.handle_for(runtime, first).await?;
        let mut cursor =
            ShardCursor::open(cancel.as_ref(), handle, &planned.sql, params, &[], cache).await?;
        self.notices.append(&mut cursor.notices);
        let columns = cursor.columns.take().unwrap_or_default();
        let mut rows = Vec::new();
        let mut total = 0;
        while let Some(row) = cursor.next_row().await? {
            total += row.data.len();
            if total > MAX_INTERMEDIATE_BYTES {
                return Err(RouterError::session(
                    "54000",
                    format!(
                        "the rows of this NOT EXISTS exceed {} MiB in pg-router; restrict them \
                         with WHERE",
                        MAX_INTERMEDIATE_BYTES >> 20
                    ),
                ));
            }
            rows.push(row);
        }
        self.notices.append(&mut cursor.notices);
        drop(cursor);
        let key_columns = &columns[columns.len().saturating_sub(hidden)..];
        let mut kept: std::collections::HashSet<Vec<u8>> = rows
            .iter()
            .map(|row| merge::key_of(row, hidden).to_vec())
            .collect();
        for &shard in others {
            if kept.is_empty() {
                break;
            }
            let mut types = Vec::with_capacity(key_columns.len());
            for column in key_columns {
                types.push(self.array_type(runtime, shard, column.type_oid).await?);
            }
            let keys: Vec<Result<Row, RouterError>> = kept
                .iter()
                .map(|key| {
                    Ok(Row {
                        fields: hidden as i16,
                        data: bytes::BytesMut::from(&key[..]),
                    })
                })
                .collect();
            let arrays = collect_arrays(hidden, futures::stream::iter(keys).boxed()).await?;
            let check_params = Params {
                types,
                values: arrays.into_iter().map(Some).collect(),
                formats: Vec::new(),
            };
            let handle = self.handle_for(runtime, shard).await?;
            let mut cursor =
                ShardCursor::open(cancel.as_ref(), handle, check, &check_params, &[], cache)
                    .await?;
            let mut passed = std::collections::HashSet::with_capacity(kept.len());
            while let Some(row) = cursor.next_row().await? {
                passed.insert(row.data.to_vec());
            }
            kept = passed;
        }
        let answer: Vec<Result<Row, RouterError>> = rows
            .into_iter()
            .filter(|row| kept.contains(merge::key_of(row, hidden)))
            .map(|row| Ok(merge::strip_hidden(row, hidden)))
            .collect();
        let visible = columns.len().saturating_sub(hidden);
        Ok(Outcome::Rows {
            columns: columns[..visible].to_vec(),
            rows: futures::stream::iter(answer).boxed(),
            command: "SELECT".into(),
        })
    }

    /// Runs one stage: its result columns and their values as text arrays.
    pub(super) async fn run_stage(
        &mut self,
        stage: &plan::Stage,
        params: &Params,
    ) -> Result<(Vec<Column>, Vec<bytes::Bytes>), RouterError> {
        let stage_params = params.subset(&stage.params);
        let outcome = self
            .execute_plan(&stage.planned, &stage_params, &[], true)
            .await?;
        let Outcome::Rows { columns, rows, .. } = outcome else {
            return Err(RouterError::session(
                "0A000",
                format!("the WITH query or subquery {} returns no rows", stage.name),
            ));
        };
        if columns.is_empty() || stage.columns.len() > columns.len() {
            return Err(RouterError::session(
                "42P10",
                format!(
                    "WITH query \"{}\" has {} columns available but {} columns specified",
                    stage.name,
                    columns.len(),
                    stage.columns.len()
                ),
            ));
        }
        let arrays = collect_arrays(columns.len(), rows).await?;
        Ok((columns, arrays))
    }

    /// The SQL name of `array`, the array type of `element` (for a cast), without a typmod.
    pub(super) async fn array_type_name(
        &mut self,
        runtime: &Runtime,
        element: u32,
        array: u32,
    ) -> Result<String, RouterError> {
        match crate::protocol::values::oid::builtin_name(element) {
            Some(name) => Ok(format!("pg_catalog.{name}[]")),
            None => self.type_name(runtime, array).await,
        }
    }

    /// Runs a multi-stage statement: each stage's rows become text arrays, read by the outer
    /// statement on the first shard as `WITH name AS (SELECT * FROM unnest($k, ...) AS name(...))`.
    pub(super) fn multi_stage<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        multi: &'a plan::MultiStage,
        params: &'a Params,
        result_formats: &'a [i16],
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            if let Some(outer) = &multi.distributed {
                return self
                    .multi_stage_distributed(runtime, multi, outer, params, result_formats)
                    .await;
            }
            let outer = params.subset(&multi.outer_params);
            let (mut types, mut values, mut formats) = (outer.types, outer.values, outer.formats);
            let mut definitions = Vec::with_capacity(multi.stages.len() + multi.kept.len());
            for stage in &multi.stages {
                let (columns, arrays) = self.run_stage(stage, params).await?;
                let mut placeholders = Vec::with_capacity(columns.len());
                let mut casts = Vec::with_capacity(columns.len());
                for (column, array) in columns.iter().zip(arrays) {
                    let (array_type, cast) = self.stage_transport(runtime, column).await?;
                    types.push(array_type);
                    values.push(Some(array));
                    formats.push(0);
                    placeholders.push(format!("${}", values.len()));
                    casts.push(cast);
                }
                definitions.push(stage_definition(stage, &columns, &placeholders, &casts));
            }
            definitions.extend(multi.kept.iter().cloned());
            let sql = format!("WITH {} {}", definitions.join(", "), multi.outer);
            let params = Params {
                types,
                values,
                formats,
            };
            self.rows_on_shard(runtime, 0, &sql, &params, result_formats)
                .await
        })
    }

    /// Runs a statement's WHERE subqueries first and then the statement, their answers bound
    /// as its parameters.
    pub(super) fn bound_subqueries<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        bound: &'a plan::BoundSubqueries,
        params: &'a Params,
        result_formats: &'a [i16],
        cache: bool,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let mut answers: Vec<(u32, Option<bytes::Bytes>)> = Vec::new();
            for subquery in &bound.subqueries {
                let stage = &subquery.stage;
                let stage_params = params.subset(&stage.params);
                let outcome = self
                    .execute_plan(&stage.planned, &stage_params, &[], true)
                    .await?;
                let Outcome::Rows { columns, rows, .. } = outcome else {
                    return Err(RouterError::session(
                        "42601",
                        "a subquery used as an expression returns no rows",
                    ));
                };
                let answer = match subquery.kind {
                    SubqueryKind::Exists => {
                        // Read to the end (the shard's LIMIT 1 keeps it to one row at most).
                        let mut rows = rows;
                        let mut any = false;
                        while let Some(row) = rows.next().await {
                            row?;
                            any = true;
                        }
                        (
                            crate::protocol::values::oid::BOOL,
                            Some(bytes::Bytes::from_static(if any { b"t" } else { b"f" })),
                        )
                    }
                    _ if columns.len() != 1 => {
                        return Err(RouterError::session(
                            "42601",
                            "subquery must return only one column",
                        ));
                    }
                    SubqueryKind::List => {
                        let array = collect_arrays(1, rows).await?.remove(0);
                        let oid = self.array_type(runtime, 0, columns[0].type_oid).await?;
                        (oid, Some(array))
                    }
                    SubqueryKind::Scalar => {
                        let mut rows = rows;
                        let mut value = None;
                        let mut count = 0;
                        while let Some(row) = rows.next().await {
                            let row = row?;
                            count += 1;
                            if count > 1 {
                                return Err(RouterError::session(
                                    "21000",
                                    "more than one row returned by a subquery used as an \
                                     expression",
                                ));
                            }
                            value = split_fields(&row.data)
                                .first()
                                .copied()
                                .flatten()
                                .map(bytes::Bytes::copy_from_slice);
                        }
                        (columns[0].type_oid, value)
                    }
                };
                answers.push(answer);
            }
            let mut outer = Params::default();
            for source in &bound.outer_params {
                match source {
                    ParamSource::Client(index) => {
                        let client = params.subset(&[*index]);
                        outer.types.extend(client.types);
                        outer.values.extend(client.values);
                        outer.formats.extend(client.formats);
                    }
                    ParamSource::Subquery(index) => {
                        let (oid, value) = answers[*index].clone();
                        outer.types.push(oid);
                        outer.values.push(value);
                        outer.formats.push(0);
                    }
                }
            }
            self.execute_plan(&bound.outer, &outer, result_formats, cache)
                .await
        })
    }

    /// Draws the shard keys of an INSERT from the key column's sequence on the first shard,
    /// then runs the INSERT with them as parameters.
    pub(super) fn draw_keys<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        draw: &'a plan::DrawKeys,
        params: &'a Params,
        result_formats: &'a [i16],
        cache: bool,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT pg_catalog.nextval(s) FROM pg_catalog.pg_get_serial_sequence({}, {}) s, \
                 pg_catalog.generate_series(1, {}) WHERE s IS NOT NULL",
                plan::quote_literal(&plan::quote_ident(&draw.table)),
                plan::quote_literal(&draw.key),
                draw.count
            );
            // In the client's transaction if there is one (the table may be new in it).
            let keys = self.first_column(runtime, 0, &sql).await?;
            if keys.len() != draw.count {
                return Err(RouterError::session(
                    "0A000",
                    format!(
                        "INSERT into sharded table {} without its shard key column {}, which has \
                         no sequence (serial or identity) to draw keys from: name the key",
                        draw.table, draw.key
                    ),
                ));
            }
            let mut params = params.clone();
            // The client's parameters up to the first drawn key (Bind may leave types out).
            let first = draw.first_param - 1;
            params.types.resize(first, 0);
            params.values.resize(first, None);
            let formats: Vec<i16> = (0..first).map(|i| params.format_of(i)).collect();
            params.formats = formats;
            for key in keys {
                params.types.push(crate::protocol::values::oid::INT8);
                params.values.push(key);
                params.formats.push(0);
            }
            self.execute_plan(&draw.inner, &params, result_formats, cache)
                .await
        })
    }

    /// Runs an INSERT ... SELECT: reads the SELECT's rows (text), then copies them in as COPY
    /// FROM STDIN text, each row to its shard.
    pub(super) fn insert_select<'a>(
        &'a mut self,
        runtime: &'a Runtime,
        insert: &'a plan::InsertSelect,
        params: &'a Params,
    ) -> futures::future::BoxFuture<'a, Result<Outcome, RouterError>> {
        Box::pin(async move {
            let source_params = params.subset(&insert.source_params);
            let outcome = self
                .execute_plan(&insert.source, &source_params, &[], true)
                .await?;
            let Outcome::Rows { mut rows, .. } = outcome else {
                return Err(RouterError::session(
                    "42601",
                    "the source of INSERT ... SELECT returns no rows",
                ));
            };
            // Read whole before writing: the rows may come from the connections the COPY uses.
            let mut data = Vec::new();
            while let Some(row) = rows.next().await {
                let row = row?;
                copy_text_row(&mut data, &row);
                if data.len() > MAX_INTERMEDIATE_BYTES {
                    return Err(RouterError::session(
                        "54000",
                        format!(
                            "INSERT ... SELECT reads more than {} MiB in pg-router; insert in \
                             batches (restrict the SELECT with WHERE)",
                            MAX_INTERMEDIATE_BYTES >> 20
                        ),
                    ));
                }
            }
            drop(rows);
            self.start_copy(
                runtime,
                &insert.destination,
                &insert.format,
                &insert.copy_sql,
            )
            .await?;
            for chunk in data.chunks(COPY_CHUNK) {
                self.copy_data(chunk).await;
            }
            let inserted = self.finish_copy(None).await?;
            Ok(Outcome::Command(format!("INSERT 0 {inserted}")))
        })
    }

    /// The array type of a column type: built-in ones from a table, others from the shard's
    /// catalog. A column that is an array itself has none (`unnest` would flatten it).
    pub(super) async fn array_type(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        element: u32,
    ) -> Result<u32, RouterError> {
        match self.array_type_of(runtime, shard, element).await? {
            0 => Err(RouterError::session(
                "0A000",
                "an expression over aggregates across shards whose groups or aggregates are \
                 arrays (or of a type without an array type) is not supported",
            )),
            array => Ok(array),
        }
    }

    /// The first column of each row of a statement the router runs for itself on `shard`
    /// (catalog reads, sequence draws), without parameters, in text.
    pub(super) async fn first_column(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        sql: &str,
    ) -> Result<Vec<Option<bytes::Bytes>>, RouterError> {
        let handle = self.handle_for(runtime, shard).await?;
        let mut cursor =
            ShardCursor::open(None, handle, sql, &Params::default(), &[], false).await?;
        Ok(cursor
            .collect()
            .await?
            .iter()
            .map(|row| {
                split_fields(&row.data)
                    .first()
                    .copied()
                    .flatten()
                    .map(bytes::Bytes::copy_from_slice)
            })
            .collect())
    }

    /// `pg_type.typarray` of `element`: 0 for an array type itself.
    pub(super) async fn array_type_of(
        &mut self,
        runtime: &Runtime,
        shard: usize,
        element: u32,
    ) -> Result<u32, RouterError> {
        if let Some(array) = crate::protocol::values::oid::array_of(element) {
            return Ok(array);
        }
        let sql = format!(
            "SELECT typarray FROM pg_catalog.pg_type WHERE oid = {}",
            plan::quote_literal(&element.to_string())
        );
        Ok(self
            .first_column(runtime, shard, &sql)
            .await?
            .first()
            .cloned()
            .flatten()
            .and_then(|field| std::str::from_utf8(&field).ok()?.parse::<u32>().ok())
            .unwrap_or(0))
    }

    /// The SQL name of a type (`format_type`), for a cast.
    pub(super) async fn type_name(
        &mut self,
        runtime: &Runtime,
        oid: u32,
    ) -> Result<String, RouterError> {
        let sql = format!(
            "SELECT pg_catalog.format_type({}::pg_catalog.oid, NULL)",
            plan::quote_literal(&oid.to_string())
        );
        self.first_column(runtime, 0, &sql)
            .await?
            .first()
            .cloned()
            .flatten()
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .ok_or_else(|| RouterError::session("XX000", "no name for a column type"))
    }

    /// How a stage's column travels to the outer statement: as an array of its type, or (an
    /// array column itself, which `unnest` would flatten) as text cast back to its type.
    pub(super) async fn stage_transport(
        &mut self,
        runtime: &Runtime,
        column: &Column,
    ) -> Result<(u32, Option<String>), RouterError> {
        match self.array_type_of(runtime, 0, column.type_oid).await? {
            0 => {
                let name = self.type_name(runtime, column.type_oid).await?;
                Ok((crate::protocol::values::oid::TEXT_ARRAY, Some(name)))
            }
            array => Ok((array, None)),
        }
    }
}
