//! The planner's entry points: one SQL text to its statements, each statement kind to its planner.

use super::*;

/// Splits and plans a query string (one or more statements).
pub fn plan_sql(topology: &Topology, sql: &str) -> Result<Vec<Planned>, PlanError> {
    // The planner is synchronous: the topology's aggregates hold for this call on this thread.
    let previous = USER_AGGREGATES.with(|user| user.replace(topology.aggregates.clone()));
    let planned = plan_sql_inner(topology, sql).map_err(|error| error.located(sql));
    USER_AGGREGATES.with(|user| user.replace(previous));
    planned
}

pub(super) fn plan_sql_inner(topology: &Topology, sql: &str) -> Result<Vec<Planned>, PlanError> {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => statements,
        // sqlparser wants `FREEZE true` where PostgreSQL (and pgbench) also write `FREEZE on`;
        // only the parse sees the rewrite, the shards get the client's text.
        Err(error) if first_keyword(sql) == "COPY" => {
            let rewritten = sql
                .replace("freeze on", "freeze true")
                .replace("FREEZE ON", "FREEZE TRUE")
                .replace("freeze off", "freeze false")
                .replace("FREEZE OFF", "FREEZE FALSE");
            let statements = Parser::parse_sql(&PostgreSqlDialect {}, &rewritten)
                .map_err(|_| PlanError::Syntax(error.to_string()))?;
            if statements.len() != 1 {
                return Err(PlanError::Syntax(error.to_string()));
            }
            statements
        }
        // Maintenance commands sqlparser does not know run on every shard as written.
        Err(_)
            if matches!(
                first_keyword(sql).as_str(),
                "VACUUM" | "ANALYZE" | "REINDEX" | "CLUSTER" | "CHECKPOINT"
            ) && !sql.trim().trim_end_matches(';').contains(';') =>
        {
            return Ok(vec![Planned {
                sql: sql.trim().trim_end_matches(';').to_string(),
                plan: Plan::Broadcast,
                returns_rows: false,
            }]);
        }
        Err(error) => return Err(PlanError::Syntax(error.to_string())),
    };
    let single = statements.len() == 1;
    statements
        .into_iter()
        .map(|statement| {
            // One statement goes to the shard as the client wrote it; several are re-rendered.
            let text = if single {
                sql.trim().trim_end_matches(';').to_string()
            } else {
                statement.to_string()
            };
            plan_statement(topology, statement, text)
        })
        .collect()
}

pub(super) fn first_keyword(sql: &str) -> String {
    sql.trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Plans one parsed statement; `text` is its SQL.
pub fn plan_statement(
    topology: &Topology,
    statement: Statement,
    text: String,
) -> Result<Planned, PlanError> {
    let plain = |plan: Plan, returns_rows: bool| Planned {
        sql: text.clone(),
        plan,
        returns_rows,
    };
    match statement {
        Statement::StartTransaction { .. } => {
            Ok(plain(Plan::Transaction(TransactionControl::Begin), false))
        }
        Statement::Commit { chain: false, .. } => {
            Ok(plain(Plan::Transaction(TransactionControl::Commit), false))
        }
        Statement::Rollback {
            chain: false,
            savepoint: None,
        } => Ok(plain(
            Plan::Transaction(TransactionControl::Rollback),
            false,
        )),
        Statement::Rollback {
            chain: false,
            savepoint: Some(name),
        } => Ok(plain(
            Plan::Savepoint(SavepointOp::RollbackTo(normalize(&name))),
            false,
        )),
        Statement::Commit { .. } | Statement::Rollback { .. } => {
            unsupported("COMMIT AND CHAIN / ROLLBACK AND CHAIN")
        }
        Statement::Savepoint { name } => Ok(plain(
            Plan::Savepoint(SavepointOp::Create(normalize(&name))),
            false,
        )),
        Statement::ReleaseSavepoint { name } => Ok(plain(
            Plan::Savepoint(SavepointOp::Release(normalize(&name))),
            false,
        )),
        Statement::Set(_) | Statement::Discard { .. } => Ok(plain(Plan::Setting, false)),
        Statement::ShowVariable { .. } => Ok(plain(Plan::Single(Target::Any), true)),
        Statement::Copy {
            source:
                sqlparser::ast::CopySource::Table {
                    table_name,
                    columns,
                },
            to: false,
            target: sqlparser::ast::CopyTarget::Stdin,
            options,
            legacy_options,
            ..
        } => {
            let format = copy_format(&options, &legacy_options)?;
            let table = last_name(&table_name);
            let destination = if topology.is_reference(&table) {
                CopyDestination::Everywhere
            } else if let Some(sharded) = topology.tables.get(&table) {
                // Without a column list the key's position comes from the catalog at COPY start.
                let key_position = if columns.is_empty() {
                    None
                } else {
                    match columns
                        .iter()
                        .position(|c| normalize(c) == sharded.shard_key)
                    {
                        Some(position) => Some(position),
                        None => {
                            return unsupported(format!(
                                "COPY into sharded table {table} without its shard key column {} in the column list",
                                sharded.shard_key
                            ));
                        }
                    }
                };
                if !sharded.lookups.is_empty() {
                    return unsupported("COPY into a table with a lookup vindex");
                }
                CopyDestination::ByKey {
                    key_position,
                    table: table.clone(),
                    key_column: sharded.shard_key.clone(),
                    group: sharded.group,
                }
            } else {
                CopyDestination::FirstShard
            };
            Ok(plain(Plan::CopyIn(destination, format), false))
        }
        Statement::Copy {
            source,
            to: true,
            target: sqlparser::ast::CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } => {
            let binary = options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyOption::Format(f) if f.value.eq_ignore_ascii_case("binary"))
            }) || legacy_options
                .iter()
                .any(|o| matches!(o, sqlparser::ast::CopyLegacyOption::Binary));
            let header = options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyOption::Header(true))
            }) || legacy_options.iter().any(|o| {
                matches!(o, sqlparser::ast::CopyLegacyOption::Csv(csv) if csv.iter().any(|c| matches!(c, sqlparser::ast::CopyLegacyCsvOption::Header)))
            });
            let shard = match source {
                sqlparser::ast::CopySource::Table { table_name, .. } => {
                    let table = last_name(&table_name);
                    if topology.is_reference(&table) {
                        Some(Target::Any)
                    } else if topology.tables.contains_key(&table) {
                        None
                    } else {
                        Some(Target::Shard(0))
                    }
                }
                sqlparser::ast::CopySource::Query(query) => {
                    let inner = plan_sql(topology, &query.to_string())?;
                    match inner.into_iter().next() {
                        Some(Planned {
                            plan: Plan::Single(target @ (Target::Shard(_) | Target::Any)),
                            ..
                        }) => Some(target),
                        Some(Planned {
                            plan:
                                Plan::Scatter {
                                    shards: None,
                                    merge,
                                    write: false,
                                },
                            ..
                        }) if merge == MergeSpec::default() => None,
                        // Anything else the router runs itself and writes out as COPY.
                        Some(planned) if planned.returns_rows && !binary => {
                            return copy_query(planned, &options, &legacy_options, header);
                        }
                        _ => {
                            return unsupported(
                                "COPY (query) TO STDOUT of this query across shards (binary \
                                 format, or a statement without rows)",
                            );
                        }
                    }
                }
            };
            if binary && shard.is_none() {
                return unsupported(
                    "COPY TO STDOUT in binary format across shards (use text or csv)",
                );
            }
            Ok(plain(Plan::CopyOut(CopyOut { shard, header }), false))
        }
        Statement::Copy { .. } => unsupported("COPY other than FROM STDIN or TO STDOUT"),
        // Client statements live in the router's session, backend ones per pooled connection:
        // DEALLOCATE has nothing to free on the shards.
        Statement::Deallocate { .. } => Ok(plain(Plan::Deallocate, false)),
        Statement::Prepare { .. } | Statement::Execute { .. } => {
            unsupported("SQL-level PREPARE/EXECUTE (use the extended query protocol)")
        }
        Statement::Query(mut query) => {
            // Bare column names bound to their relations: every spelling plans alike. A plan
            // that sends the statement as it came keeps the client's text (its comments too):
            // PostgreSQL binds the names the same way.
            bind::bind_query(&topology.columns, &mut query)?;
            plan_query(topology, *query, text)
        }
        Statement::Insert(insert) => plan_insert(topology, insert, text),
        Statement::Update(update) => {
            let usage = table_use(topology, &update);
            let returns_rows = update.returning.is_some();
            let planned = plan_write(
                topology,
                usage,
                &update.table,
                update.selection.as_ref(),
                text,
                returns_rows,
            );
            bound_write_fallback(topology, planned, Statement::Update(update))
        }
        Statement::Delete(delete) => {
            let usage = table_use(topology, &delete);
            let returns_rows = delete.returning.is_some();
            let tables = match &delete.from {
                sqlparser::ast::FromTable::WithFromKeyword(t)
                | sqlparser::ast::FromTable::WithoutKeyword(t) => t.clone(),
            };
            let planned = match tables.first() {
                Some(table) => plan_write(
                    topology,
                    usage,
                    table,
                    delete.selection.as_ref(),
                    text,
                    returns_rows,
                ),
                None => unsupported("DELETE without a table"),
            };
            bound_write_fallback(topology, planned, Statement::Delete(delete))
        }
        Statement::Explain {
            describe_alias,
            analyze,
            verbose,
            query_plan,
            estimate,
            statement,
            format,
            options,
        } => {
            let inner_text = statement.to_string();
            let inner = plan_statement(topology, *statement, inner_text)?;
            let (shards, merge, write) = match inner.plan {
                Plan::Single(target) => return Ok(plain(Plan::Single(target), true)),
                Plan::Scatter {
                    shards,
                    merge,
                    write,
                } => (shards, merge, write),
                _ => return unsupported("EXPLAIN of this multi-shard statement"),
            };
            let options_text: Vec<String> = options
                .iter()
                .flatten()
                .map(|o| o.to_string().to_ascii_lowercase())
                .collect();
            let analyzing = analyze
                || options_text.iter().any(|o| {
                    o.starts_with("analyze")
                        && !(o.ends_with("false") || o.ends_with("off") || o.ends_with(" 0"))
                });
            if analyzing && write {
                return unsupported(
                    "EXPLAIN ANALYZE of a multi-shard write (it would write outside the \
                     router's two-phase commit)",
                );
            }
            if format.is_some() || options_text.iter().any(|o| o.starts_with("format")) {
                return unsupported(
                    "EXPLAIN of a multi-shard statement in a format other than text",
                );
            }
            let shard_statement = Parser::parse_sql(&PostgreSqlDialect {}, &inner.sql)
                .map_err(|e| PlanError::Syntax(e.to_string()))?
                .pop()
                .ok_or_else(|| PlanError::Syntax("empty statement".into()))?;
            let explain = Statement::Explain {
                describe_alias,
                analyze,
                verbose,
                query_plan,
                estimate,
                statement: Box::new(shard_statement),
                format,
                options,
            };
            let mut summary = vec![match &shards {
                Some(list) => format!(
                    "pg-router: {} on {} shards",
                    kind_of(&merge, write),
                    list.len()
                ),
                None => format!("pg-router: {} on every shard", kind_of(&merge, write)),
            }];
            summary.push(format!("  Statement on each shard: {}", inner.sql));
            if let Some(finalize) = &merge.finalize {
                summary.push(format!(
                    "  Then over the merged groups, on one shard: {}",
                    finalize.sql
                ));
            }
            Ok(plain(
                Plan::Explain(Box::new(ExplainScatter {
                    sql: explain.to_string(),
                    shards,
                    summary,
                })),
                true,
            ))
        }
        _ => {
            let keyword = first_keyword(&text);
            match keyword.as_str() {
                "CREATE" | "ALTER" | "DROP" | "TRUNCATE" | "GRANT" | "REVOKE" | "COMMENT" => {
                    Ok(plain(Plan::Broadcast, false))
                }
                "VACUUM" | "ANALYZE" => Ok(plain(Plan::Broadcast, false)),
                "RESET" => Ok(plain(Plan::Setting, false)),
                _ => unsupported(format!("the {keyword} statement")),
            }
        }
    }
}
