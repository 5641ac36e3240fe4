//! SELECT: the query planner (single shard, scatter, co-located join, multi-stage) and its
//! placeholder and GROUP BY normalisation.

use super::*;

pub(super) fn plan_query(
    topology: &Topology,
    query: Query,
    text: String,
) -> Result<Planned, PlanError> {
    let usage = table_use(topology, &query);
    let single = |target| {
        Ok(Planned {
            sql: text.clone(),
            plan: Plan::Single(target),
            returns_rows: true,
        })
    };
    if query.locks.is_empty() && usage.sharded.is_empty() {
        return if usage.other > 0 {
            single(Target::Shard(0))
        } else {
            single(Target::Any)
        };
    }
    if usage.sharded.is_empty() {
        return single(if usage.other > 0 {
            Target::Shard(0)
        } else {
            Target::Any
        });
    }
    // WITH, UNION, subqueries: the whole statement runs on one shard when every sharded table
    // in it is restricted to keys of that shard (a Citus "router query").
    if !pinned::is_flat(topology, &query, &usage)
        && let Some(target) = pinned::one_shard(topology, &query)
    {
        return single(target);
    }
    // FROM subqueries that read sharded tables only in WHERE subqueries: those run first and
    // the whole statement after them.
    if let Some(planned) = bound::plan_nested(topology, query.clone())? {
        return Ok(planned);
    }
    // WITH queries and FROM subqueries over sharded tables, read by a statement that reads no
    // sharded table itself: they run first.
    if let Some(planned) = intermediate::plan(topology, query.clone())? {
        return Ok(planned);
    }
    if usage.other > 0 {
        return unsupported("a query joining sharded tables with tables the router does not know");
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        // Unions that merge stream from the shards; other set operations run in stages.
        return match set_operation::plan_union(topology, query.clone()) {
            Err(PlanError::Unsupported(reason)) => {
                intermediate::plan_set_operation(topology, query)?
                    .ok_or(PlanError::Unsupported(reason))
            }
            planned => planned,
        };
    };
    if query.with.is_some() {
        return unsupported("WITH over sharded tables");
    }
    // A FROM of reference tables only, with subqueries over sharded tables in WHERE: those run
    // first (correlated EXISTS decorrelated into IN), their answers bound as parameters.
    if table_use(topology, &select.from).sharded.is_empty() {
        // NOT EXISTS alone: every shard answers it over its own rows at once.
        if let Some(planned) = anti::plan(topology, &query) {
            return Ok(planned);
        }
        if let Some(planned) = grouped_joins(topology, &query)? {
            return Ok(planned);
        }
        let mut query = query.clone();
        if let SetExpr::Select(select) = query.body.as_mut() {
            decorrelate::exists_conjuncts(topology, select);
        }
        if let Some(planned) = bound::plan(topology, query)? {
            return Ok(planned);
        }
    }
    let from = match analyze_from(topology, select) {
        Ok(from) => from,
        // Sharded tables joined off their shard keys: all but the first go to every shard.
        Err(PlanError::Unsupported(reason)) => {
            return intermediate::broadcast_join(topology, query)?
                .ok_or(PlanError::Unsupported(reason));
        }
        Err(error) => return Err(error),
    };
    // Sharded tables must all be in the top-level FROM, or in subqueries (WHERE, select list)
    // co-located with it (pushed down whole).
    let top_level = from.key_columns.len();
    if usage.sharded.len() != top_level {
        let pushed = colocated::pushed_down_tables(
            topology,
            select.selection.iter().chain(projection_exprs(select)),
            &from.key_columns,
            from.group,
        );
        if pushed != Some(usage.sharded.len() - top_level) {
            // Correlated aggregates become joins with grouped derived tables.
            if let Some(planned) = grouped_joins(topology, &query)? {
                return Ok(planned);
            }
            // Uncorrelated ones run first, their answers bound as parameters.
            let mut decorrelated = query.clone();
            if let SetExpr::Select(select) = decorrelated.body.as_mut() {
                decorrelate::exists_conjuncts(topology, select);
            }
            if let Some(planned) = bound::plan(topology, decorrelated)? {
                return Ok(planned);
            }
            return unsupported("a subquery over a sharded table");
        }
    }
    let key_type = topology.groups[from.group].key_type;
    let keys = select
        .selection
        .as_ref()
        .map(|s| key_restriction(s, &from.key_columns, key_type))
        .unwrap_or_default();
    if keys.is_empty()
        && usage.sharded.len() == 1
        && let Some(selection) = &select.selection
    {
        let aliases: Vec<String> = from.key_columns.keys().cloned().collect();
        if let Some(lookup) =
            lookup_restriction(topology, selection, &usage.sharded[0], &aliases, from.group)
        {
            return single(lookup);
        }
    }
    let shards = match route_keys(
        topology,
        from.group,
        keys,
        |target| Ok(Err(target)),
        |shards| Ok(Ok(shards)),
    )? {
        Err(target) => return single(target),
        Ok(shards) => shards,
    };
    let original = query.clone();
    let planned = if !is_aggregate_query(&query) {
        plan_scatter_select(query, shards)
    } else {
        let mut query = query;
        group_by_positions(&mut query);
        // Aggregates the merger finishes itself, or else with a final statement over the merged
        // groups (expressions over aggregates, HAVING and ORDER BY beyond plain comparisons).
        with_shard_keys(&distinct_key_columns(&query, &from.key_columns), || {
            match plan_scatter_select(query.clone(), shards.clone()) {
                Err(PlanError::Unsupported(_)) => finalize::plan(query, shards),
                planned => planned,
            }
        })
    };
    // What neither merges (window functions, DISTINCT ON, aggregates such as string_agg or
    // percentile_cont) runs over the table's matching rows, pulled from the shards first.
    match planned {
        Err(PlanError::Unsupported(reason)) => {
            intermediate::pull_up(topology, original)?.ok_or(PlanError::Unsupported(reason))
        }
        planned => planned,
    }
}

/// `query` with its correlated scalar aggregate subqueries over sharded tables decorrelated
/// into joins with grouped derived tables, planned; `None` if it has none.
fn grouped_joins(topology: &Topology, query: &Query) -> Result<Option<Planned>, PlanError> {
    let mut query = query.clone();
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let joined = decorrelate_scalar::scalar_conjuncts(topology, select)?;
    if !decorrelate_scalar::left_joins(topology, select)? && !joined {
        return Ok(None);
    }
    let text = query.to_string();
    plan_query(topology, query, text).map(Some)
}

/// Parses SQL the planner writes itself (a rewritten statement, a final statement) as a query.
pub(super) fn parse_query(sql: &str) -> Result<Query, PlanError> {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| PlanError::Syntax(e.to_string()))?
        .pop()
    {
        Some(Statement::Query(query)) => Ok(*query),
        _ => unsupported("a subquery"),
    }
}

/// The number `n` of a bind parameter `$n` (n >= 1).
pub(super) fn placeholder_number(expr: &Expr) -> Option<usize> {
    let Expr::Value(value) = expr else {
        return None;
    };
    let Value::Placeholder(p) = &value.value else {
        return None;
    };
    p.strip_prefix('$')?.parse().ok().filter(|n| *n >= 1)
}

/// Renumbers the `$k` of a statement's parts from `first` on, in order of first use, and
/// records which client parameter (0-based) each new number stands for: a statement sent with
/// parameters it does not use would fail on the shard (their types cannot be determined).
pub(super) struct Renumber<'a> {
    /// The first new number.
    pub(super) first: usize,
    /// Old number -> new number.
    pub(super) new: HashMap<usize, usize>,
    /// The client parameter (0-based) of each new number, in order.
    pub(super) used: &'a mut Vec<usize>,
}

impl<'a> Renumber<'a> {
    /// Numbers from `first` on, recording into `used`.
    pub(super) fn new(first: usize, used: &'a mut Vec<usize>) -> Self {
        Self {
            first,
            new: HashMap::new(),
            used,
        }
    }

    pub(super) fn apply<V: sqlparser::ast::VisitMut>(&mut self, node: &mut V) {
        let _ = visit_expressions_mut(node, |expr| {
            if let Some(n) = placeholder_number(expr) {
                let next = self.first + self.new.len();
                let new = *self.new.entry(n).or_insert_with(|| {
                    self.used.push(n - 1);
                    next
                });
                *expr = Expr::value(Value::Placeholder(format!("${new}")));
            }
            ControlFlow::<()>::Continue(())
        });
    }
}

/// `GROUP BY 1, 2` names select-list items: the merger and the final statement need the
/// expressions themselves.
pub(super) fn group_by_positions(query: &mut Query) {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return;
    };
    let projection = select.projection.clone();
    if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
        for expr in exprs {
            if let Some(n) = literal_u64(expr)
                && n >= 1
                && let Some(
                    SelectItem::UnnamedExpr(item) | SelectItem::ExprWithAlias { expr: item, .. },
                ) = projection.get(n as usize - 1)
            {
                *expr = item.clone();
            }
        }
    }
}

/// The expressions of a select list (not its `*`s).
pub(super) fn projection_exprs(select: &Select) -> impl Iterator<Item = &Expr> {
    select.projection.iter().filter_map(|item| match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    })
}

/// A plain GROUP BY's expressions (ROLLUP, CUBE, GROUPING SETS and GROUP BY ALL are refused).
pub(super) fn plain_group_by(select: &Select) -> Result<Vec<Expr>, PlanError> {
    if grouping_sets(select) {
        return unsupported("GROUP BY ROLLUP/CUBE/GROUPING SETS across shards");
    }
    match &select.group_by {
        GroupByExpr::Expressions(exprs, _) => Ok(exprs.clone()),
        GroupByExpr::All(_) => unsupported("GROUP BY ALL"),
    }
}

/// GROUP BY ROLLUP / CUBE / GROUPING SETS (or `WITH ROLLUP`-style modifiers)?
pub(super) fn grouping_sets(select: &Select) -> bool {
    match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            !modifiers.is_empty()
                || exprs
                    .iter()
                    .any(|e| matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
        }
        GroupByExpr::All(_) => false,
    }
}

/// A SELECT with GROUP BY or aggregates.
pub(super) fn is_aggregate_query(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let grouped =
        !matches!(&select.group_by, GroupByExpr::Expressions(exprs, _) if exprs.is_empty());
    grouped || select.having.is_some() || projection_exprs(select).any(contains_aggregate)
}
