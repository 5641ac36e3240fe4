//! Scatter-gather SELECT: the per-shard query, its paging, sort keys and the merge of its rows.

use super::*;

/// LIMIT and OFFSET of a multi-shard query, as numbers (the merger applies them).
/// LIMIT and OFFSET (or FETCH FIRST) of a multi-shard query: numbers, or bind parameters the
/// executor reads before merging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Paging {
    pub(super) limit: Option<u64>,
    pub(super) offset: u64,
    /// `LIMIT $n` / `FETCH FIRST $n ROWS ONLY`: parameter number (1-based).
    pub(super) limit_param: Option<usize>,
    /// `OFFSET $n`.
    pub(super) offset_param: Option<usize>,
}

impl Paging {
    /// Fills the merge's paging.
    pub(super) fn apply(&self, merge: &mut MergeSpec) {
        merge.limit = self.limit;
        merge.offset = self.offset;
        merge.limit_param = self.limit_param;
        merge.offset_param = self.offset_param;
    }
}

pub(super) fn paging(query: &Query) -> Result<Paging, PlanError> {
    let mut paging = Paging::default();
    let bound = |expr: &Expr, what: &str| -> Result<(Option<u64>, Option<usize>), PlanError> {
        if let Some(n) = literal_u64(expr) {
            return Ok((Some(n), None));
        }
        if let Some(n) = placeholder_number(expr) {
            return Ok((None, Some(n)));
        }
        unsupported(format!(
            "{what} that is not a number or a parameter in a multi-shard query"
        ))
    };
    match &query.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return unsupported("LIMIT BY");
            }
            if let Some(expr) = limit
                && !matches!(expr, Expr::Value(v) if v.value == Value::Null)
            {
                (paging.limit, paging.limit_param) = bound(expr, "a LIMIT")?;
            }
            if let Some(Offset { value, .. }) = offset {
                let (number, param) = bound(value, "an OFFSET")?;
                paging.offset = number.unwrap_or(0);
                paging.offset_param = param;
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => return unsupported("LIMIT offset, count"),
    }
    if let Some(fetch) = &query.fetch {
        if fetch.with_ties || fetch.percent {
            return unsupported("FETCH FIRST ... WITH TIES or PERCENT in a multi-shard query");
        }
        (paging.limit, paging.limit_param) = match &fetch.quantity {
            None => (Some(1), None),
            Some(expr) => bound(expr, "a FETCH FIRST count")?,
        };
    }
    Ok(paging)
}

/// What each shard is asked for: the first `limit + offset` rows (the merger skips the offset).
pub(super) fn shard_limit(paging: &Paging) -> Option<LimitClause> {
    let number = |n: u64| Expr::value(Value::Number(n.to_string(), false));
    let param = |n: usize| Expr::Cast {
        kind: sqlparser::ast::CastKind::DoubleColon,
        expr: Box::new(Expr::value(Value::Placeholder(format!("${n}")))),
        data_type: sqlparser::ast::DataType::BigInt(None),
        format: None,
    };
    if let (Some(limit), None) = (paging.limit, paging.offset_param) {
        return limit_clause(number(limit + paging.offset));
    }
    let limit = match (paging.limit, paging.limit_param) {
        (Some(n), _) => number(n),
        (None, Some(p)) => param(p),
        (None, None) => return None,
    };
    let offset = match (paging.offset, paging.offset_param) {
        (_, Some(p)) => param(p),
        (0, None) => return limit_clause(limit),
        (n, None) => number(n),
    };
    limit_clause(Expr::Nested(Box::new(Expr::BinaryOp {
        left: Box::new(limit),
        op: BinaryOperator::Plus,
        right: Box::new(offset),
    })))
}

pub(super) fn limit_clause(limit: Expr) -> Option<LimitClause> {
    Some(LimitClause::LimitOffset {
        limit: Some(limit),
        offset: None,
        limit_by: Vec::new(),
    })
}

pub(super) fn plan_scatter_select(
    mut query: Query,
    shards: Option<Vec<usize>>,
) -> Result<Planned, PlanError> {
    let paging = paging(&query)?;
    query.fetch = None;
    let order_exprs = match &query.order_by {
        None => Vec::new(),
        Some(order) => match &order.kind {
            OrderByKind::Expressions(exprs) => exprs.clone(),
            OrderByKind::All(_) => return unsupported("ORDER BY ALL"),
        },
    };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return unsupported("a set operation");
    };
    let groups = plain_group_by(select)?;
    let has_aggregates =
        projection_exprs(select).any(contains_aggregate) || select.having.is_some();
    let distinct = match &select.distinct {
        None | Some(Distinct::All) => false,
        Some(Distinct::Distinct) => true,
        Some(Distinct::On(_)) => return unsupported("DISTINCT ON across shards"),
    };
    let mut merge = MergeSpec {
        distinct,
        ..MergeSpec::default()
    };
    paging.apply(&mut merge);
    let wildcard = select.projection.iter().any(|item| {
        matches!(
            item,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    });

    if has_aggregates || !groups.is_empty() {
        if wildcard {
            return unsupported("* with GROUP BY or aggregates across shards");
        }
        let group_texts: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let mut rewrite = AggregateRewrite {
            projection: Vec::new(),
            merges: Vec::new(),
            hidden: 0,
            by_text: HashMap::new(),
        };
        let mut avg_columns = Vec::new();
        // Arguments of count(DISTINCT ...): the shards group by them too.
        let mut distinct_groups: Vec<Expr> = Vec::new();
        let mut aliases: HashMap<String, usize> = HashMap::new();
        for item in &select.projection {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.clone())),
                _ => return unsupported("this projection across shards"),
            };
            let index = rewrite.projection.len();
            if let Some(alias) = &alias {
                aliases.insert(normalize(alias), index);
            }
            rewrite.by_text.insert(expr.to_string(), index);
            let (shard_expr, merge_kind) = match top_aggregate(expr) {
                Some(("count", true))
                    if sole_argument(expr)
                        .is_some_and(|argument| distinct_per_shard(&argument)) =>
                {
                    (expr.clone(), ColumnMerge::Count)
                }
                Some(("count", true)) => {
                    let argument = sole_argument(expr).ok_or_else(|| {
                        PlanError::Unsupported(
                            "count(DISTINCT ...) of several expressions across shards".into(),
                        )
                    })?;
                    distinct_groups.push(argument.clone());
                    (argument, ColumnMerge::CountDistinct)
                }
                Some((_, true)) => {
                    return unsupported(
                        "DISTINCT aggregates other than count(DISTINCT ...) across shards",
                    );
                }
                Some(("count", _)) => (expr.clone(), ColumnMerge::Count),
                Some(("sum", _)) => (expr.clone(), ColumnMerge::Sum),
                Some(("min", _)) => (expr.clone(), ColumnMerge::Min),
                Some(("max", _)) => (expr.clone(), ColumnMerge::Max),
                Some(_) => {
                    avg_columns.push((index, count_of(expr)));
                    (
                        with_function_name(expr, "sum"),
                        ColumnMerge::Avg { count: 0 },
                    )
                }
                None if group_texts.contains(&expr.to_string()) => {
                    (expr.clone(), ColumnMerge::Group)
                }
                None if contains_aggregate(expr) => {
                    return unsupported(format!(
                        "the expression {expr} over aggregates across shards"
                    ));
                }
                None => {
                    return unsupported(format!("{expr} is neither grouped nor aggregated"));
                }
            };
            // Keep the client's column name: `sum(x)` for `avg(x)` would rename the column.
            let alias = alias.unwrap_or_else(|| Ident::with_quote('"', default_column_name(expr)));
            rewrite.projection.push(SelectItem::ExprWithAlias {
                expr: shard_expr,
                alias,
            });
            rewrite.merges.push(merge_kind);
        }
        for (index, count_expr) in avg_columns {
            let count = rewrite.push_hidden(count_expr, ColumnMerge::Helper);
            rewrite.merges[index] = ColumnMerge::Avg { count };
        }
        for group in &groups {
            if !rewrite.by_text.contains_key(&group.to_string()) {
                rewrite.push_hidden(group.clone(), ColumnMerge::Group);
            }
        }
        let having = match select.having.take() {
            Some(expr) => Some(having_of(&expr, &mut rewrite, &group_texts)?),
            None => None,
        };
        let mut order = Vec::new();
        for item in &order_exprs {
            let column = match literal_u64(&item.expr) {
                Some(n) if n >= 1 && (n as usize) <= select.projection.len() => n as usize - 1,
                _ => match &item.expr {
                    Expr::Identifier(ident) if aliases.contains_key(&normalize(ident)) => {
                        aliases[&normalize(ident)]
                    }
                    expr => rewrite.column_for(expr, &group_texts)?,
                },
            };
            order.push(sort_key(ColumnRef::Front(column), item));
        }
        merge.hidden = rewrite.hidden;
        merge.order = order;
        merge.aggregation = Some(Aggregation {
            columns: rewrite.merges,
            having,
            global: groups.is_empty(),
        });
        if !distinct_groups.is_empty() {
            // Sub-groups by the counted values: every other aggregate still merges exactly
            // (counts and sums add up, extremes compare), and each value reaches the merger.
            let mut by = groups.clone();
            for expr in distinct_groups {
                if !by.contains(&expr) {
                    by.push(expr);
                }
            }
            select.group_by = GroupByExpr::Expressions(by, Vec::new());
        }
        select.projection = rewrite.projection;
        query.order_by = None;
        query.limit_clause = None;
    } else {
        // Plain rows: shards sort and limit (to limit + offset); the merger merges sorted
        // streams and applies OFFSET/LIMIT.
        let visible = select.projection.len();
        let mut hidden_exprs: Vec<Expr> = Vec::new();
        let mut order = Vec::new();
        for item in &order_exprs {
            let position = match literal_u64(&item.expr) {
                Some(n) if !wildcard && n >= 1 && (n as usize) <= visible => Some(n as usize - 1),
                _ => select.projection.iter().position(|p| match p {
                    SelectItem::UnnamedExpr(e) => !wildcard && *e == item.expr,
                    SelectItem::ExprWithAlias { expr, alias } => {
                        !wildcard
                            && (*expr == item.expr
                                || matches!(&item.expr, Expr::Identifier(i) if normalize(i) == normalize(alias)))
                    }
                    _ => false,
                }),
            };
            let column = match position {
                Some(i) => ColumnRef::Front(i),
                None => {
                    hidden_exprs.push(item.expr.clone());
                    ColumnRef::Back(0) // fixed below
                }
            };
            order.push((column, item.clone()));
        }
        let hidden = hidden_exprs.len();
        let mut next_hidden = 0;
        merge.order = order
            .into_iter()
            .map(|(column, item)| {
                let column = match column {
                    ColumnRef::Back(_) => {
                        next_hidden += 1;
                        ColumnRef::Back(hidden - next_hidden + 1)
                    }
                    front => front,
                };
                sort_key(column, &item)
            })
            .collect();
        merge.hidden = hidden;
        if distinct && hidden > 0 {
            return unsupported("SELECT DISTINCT ordered by a column that is not selected");
        }
        for (i, expr) in hidden_exprs.into_iter().enumerate() {
            select.projection.push(SelectItem::ExprWithAlias {
                expr,
                alias: Ident::new(format!("__pgr_order_{i}")),
            });
        }
        // Rewrite ORDER BY to positions of the (possibly hidden) columns only if we added
        // hidden columns: shards still sort by the original expressions.
        query.limit_clause = shard_limit(&paging);
    }
    if merge.limit_param.is_some() || merge.offset_param.is_some() {
        // The merger reads LIMIT/OFFSET parameters; the shards get only those they use (an
        // aggregate's shard statement has no LIMIT, and an unused parameter without a type
        // fails on the shard).
        let mut used = Vec::new();
        Renumber::new(1, &mut used).apply(&mut query);
        merge.shard_params = Some(used);
    }
    Ok(Planned {
        sql: query.to_string(),
        plan: Plan::Scatter {
            shards,
            merge,
            write: false,
        },
        returns_rows: true,
    })
}

pub(super) fn sort_key(column: ColumnRef, item: &sqlparser::ast::OrderByExpr) -> SortKey {
    let descending = matches!(item.options.sort, Some(sqlparser::ast::OrderBySort::Desc));
    SortKey {
        column,
        descending,
        nulls_first: item.options.nulls_first.unwrap_or(descending),
    }
}

/// The column name PostgreSQL gives an unaliased expression (its `FigureColname`): a column's
/// or function's name, a cast's operand's name or else its type's, `case`, `array`, ... and
/// `?column?` for the rest.
pub(super) fn default_column_name(expr: &Expr) -> String {
    figure_column_name(expr)
        .map(|(name, _)| name)
        .unwrap_or_else(|| "?column?".to_string())
}

/// A name and its strength (2: a column or function; 1: a type or keyword, which a cast's
/// operand of strength 2 overrides).
pub(super) fn figure_column_name(expr: &Expr) -> Option<(String, u8)> {
    match expr {
        Expr::Function(function) => Some((last_name(&function.name), 2)),
        Expr::Identifier(ident) => Some((normalize(ident), 2)),
        Expr::CompoundIdentifier(parts) => parts.last().map(|p| (normalize(p), 2)),
        Expr::Nested(inner) | Expr::Collate { expr: inner, .. } => figure_column_name(inner),
        Expr::Cast {
            expr, data_type, ..
        } => match figure_column_name(expr) {
            Some((name, 2)) => Some((name, 2)),
            _ => Some((type_column_name(data_type), 1)),
        },
        Expr::Case { .. } => Some(("case".into(), 1)),
        Expr::Array(_) => Some(("array".into(), 2)),
        Expr::Tuple(_) => Some(("row".into(), 2)),
        Expr::Exists { .. } => Some(("exists".into(), 2)),
        Expr::Ceil { .. } => Some(("ceil".into(), 2)),
        Expr::Floor { .. } => Some(("floor".into(), 2)),
        Expr::Extract { .. } => Some(("extract".into(), 2)),
        Expr::Substring { .. } => Some(("substring".into(), 2)),
        Expr::Position { .. } => Some(("position".into(), 2)),
        Expr::Overlay { .. } => Some(("overlay".into(), 2)),
        _ => None,
    }
}

/// The name PostgreSQL shows for a cast's type: its internal name (`int4` for `integer`).
pub(super) fn type_column_name(data_type: &sqlparser::ast::DataType) -> String {
    let text = data_type.to_string().to_ascii_lowercase();
    let base = text.split('(').next().unwrap_or("").trim();
    let name = match base {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "real" | "float4" => "float4",
        "float" | "double precision" | "float8" => "float8",
        "decimal" | "numeric" | "dec" => "numeric",
        "boolean" | "bool" => "bool",
        "character varying" | "varchar" => "varchar",
        "character" | "char" | "bpchar" => "bpchar",
        "timestamp with time zone" | "timestamptz" => "timestamptz",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "time with time zone" | "timetz" => "timetz",
        "time" | "time without time zone" => "time",
        other => other.rsplit('.').next().unwrap_or(other),
    };
    name.trim_matches('"').to_string()
}
