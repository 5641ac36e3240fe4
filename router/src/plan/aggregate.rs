//! Aggregates: which calls the merger can combine and the per-shard rewrite of them (avg as
//! sum and count, HAVING on merged values).

use super::*;

/// An aggregate the merger can combine across shards, as the merge it needs: `bool_and` and
/// `every` are the least of the shards' booleans (false < true), `bool_or` the greatest,
/// `any_value` any of them.
pub(super) fn is_aggregate_name(name: &str) -> Option<&'static str> {
    match name {
        "count" => Some("count"),
        "sum" => Some("sum"),
        "min" | "bool_and" | "every" | "any_value" => Some("min"),
        "max" | "bool_or" => Some("max"),
        "avg" => Some("avg"),
        _ => None,
    }
}

/// PostgreSQL's built-in aggregates (`pg_aggregate`), so that those the merger cannot combine
/// are refused by name instead of being taken for plain functions (one row per shard).
pub(super) const BUILTIN_AGGREGATES: &[&str] = &[
    "any_value",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "dense_rank",
    "every",
    "json_agg",
    "json_agg_strict",
    "json_arrayagg",
    "json_object_agg",
    "json_object_agg_strict",
    "json_object_agg_unique",
    "json_object_agg_unique_strict",
    "json_objectagg",
    "jsonb_agg",
    "jsonb_agg_strict",
    "jsonb_object_agg",
    "jsonb_object_agg_strict",
    "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict",
    "max",
    "min",
    "mode",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "range_agg",
    "range_intersect_agg",
    "rank",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "xmlagg",
];

thread_local! {
    /// The topology's user-defined aggregates, for the planning under way on this thread.
    pub(super) static USER_AGGREGATES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The shard keys of the co-located FROM being aggregated (table or alias -> key column),
    /// for the aggregate rewrite under way on this thread.
    static SHARD_KEYS: std::cell::RefCell<HashMap<String, String>> = std::cell::RefCell::new(HashMap::new());
}

/// Runs `plan` with `keys` as the shard keys of the FROM it aggregates over.
pub(super) fn with_shard_keys<T>(keys: &HashMap<String, String>, plan: impl FnOnce() -> T) -> T {
    let previous = SHARD_KEYS.with(|current| current.replace(keys.clone()));
    let result = plan();
    SHARD_KEYS.with(|current| current.replace(previous));
    result
}

/// `keys` if every `count(DISTINCT x)` of `query` counts a shard key (then each shard counts
/// its own values); no keys otherwise: the shards group by the other arguments, which splits a
/// group's key values over several partial rows.
pub(super) fn distinct_key_columns(
    query: &Query,
    keys: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut all_keys = true;
    let _ = sqlparser::ast::visit_expressions(query, |expr| {
        if let Some(("count", true)) = top_aggregate(expr) {
            all_keys &= sole_argument(expr).is_some_and(|argument| {
                matches!(argument, Expr::CompoundIdentifier(_)) && is_key_column(&argument, keys)
            });
        }
        ControlFlow::<()>::Continue(())
    });
    if all_keys {
        keys.clone()
    } else {
        HashMap::new()
    }
}

/// Is `count(DISTINCT argument)` countable per shard: `argument` is the shard key of a sharded
/// table of the FROM, so each of its values lives on one shard only and the shards' distinct
/// counts add up (no value counted on two shards)?
pub(super) fn distinct_per_shard(argument: &Expr) -> bool {
    SHARD_KEYS.with(|keys| {
        let keys = keys.borrow();
        // A bare name could be another table's column of the same name.
        matches!(argument, Expr::CompoundIdentifier(_)) && is_key_column(argument, &keys)
    })
}

/// Is `function` a call of an aggregate, PostgreSQL's own or one the shards define (not a
/// window function)?
pub(super) fn is_aggregate_call(function: &sqlparser::ast::Function) -> bool {
    if function.over.is_some() {
        return false;
    }
    let name = last_name(&function.name);
    BUILTIN_AGGREGATES.contains(&name.as_str())
        || USER_AGGREGATES.with(|user| user.borrow().contains(&name))
}

/// Does `expr` call an aggregate or a window function (of its own query level, not inside a
/// subquery)?
pub(super) fn contains_aggregate(expr: &Expr) -> bool {
    struct Finder {
        depth: usize,
        found: bool,
    }
    impl sqlparser::ast::Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if self.depth == 0
                && let Expr::Function(f) = expr
                && (is_aggregate_call(f) || f.over.is_some())
            {
                self.found = true;
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder {
        depth: 0,
        found: false,
    };
    let _ = sqlparser::ast::Visit::visit(expr, &mut finder);
    finder.found
}

/// Does `expr` call a window function?
pub(super) fn contains_window(expr: &Expr) -> bool {
    let mut found = false;
    let mut copy = expr.clone();
    let _ = visit_expressions_mut(&mut copy, |e| {
        if let Expr::Function(f) = e
            && f.over.is_some()
        {
            found = true;
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// An aggregate call at the top of an expression: (name, distinct?).
pub(super) fn top_aggregate(expr: &Expr) -> Option<(&'static str, bool)> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let name = is_aggregate_name(&last_name(&function.name))?;
    if function.over.is_some() || function.filter.is_some() {
        return None;
    }
    let distinct = matches!(
        &function.args,
        FunctionArguments::List(list) if list.duplicate_treatment == Some(sqlparser::ast::DuplicateTreatment::Distinct)
    );
    Some((name, distinct))
}

/// The one plain argument of a function call (`x` of `count(DISTINCT x)`).
pub(super) fn sole_argument(expr: &Expr) -> Option<Expr> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let FunctionArguments::List(list) = &function.args else {
        return None;
    };
    match list.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(argument))] if list.clauses.is_empty() => {
            Some(argument.clone())
        }
        _ => None,
    }
}

pub(super) fn with_function_name(expr: &Expr, name: &str) -> Expr {
    let mut expr = expr.clone();
    if let Expr::Function(function) = &mut expr {
        function.name = ObjectName::from(vec![Ident::new(name)]);
    }
    expr
}

pub(super) fn count_of(expr: &Expr) -> Expr {
    let mut expr = with_function_name(expr, "count");
    if let Expr::Function(function) = &mut expr
        && let FunctionArguments::List(list) = &mut function.args
        && list.args.is_empty()
    {
        list.args
            .push(FunctionArg::Unnamed(FunctionArgExpr::Wildcard));
    }
    expr
}

pub(super) fn literal_u64(expr: &Expr) -> Option<u64> {
    match expr {
        Expr::Value(value) => match &value.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn literal_value(expr: &Expr) -> Option<values::Value> {
    match expr {
        Expr::Nested(inner) => literal_value(inner),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match literal_value(expr)? {
            values::Value::Int(v) => Some(values::Value::Int(-v)),
            values::Value::Numeric(mut d) => {
                d.mantissa = -d.mantissa;
                Some(values::Value::Numeric(d))
            }
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            Value::Number(n, _) => n
                .parse::<i64>()
                .ok()
                .map(values::Value::Int)
                .or_else(|| values::Decimal::parse(n).map(values::Value::Numeric)),
            Value::SingleQuotedString(s) => Some(values::Value::Bytes(s.clone().into_bytes())),
            Value::Boolean(b) => Some(values::Value::Bool(*b)),
            _ => None,
        },
        _ => None,
    }
}

/// Builder of the rewritten projection of a scatter-gather aggregate query.
pub(super) struct AggregateRewrite {
    pub(super) projection: Vec<SelectItem>,
    pub(super) merges: Vec<ColumnMerge>,
    pub(super) hidden: usize,
    /// Expression text -> column, for ORDER BY / HAVING resolution.
    pub(super) by_text: HashMap<String, usize>,
}

impl AggregateRewrite {
    pub(super) fn push_hidden(&mut self, expr: Expr, merge: ColumnMerge) -> usize {
        let index = self.projection.len();
        self.by_text.insert(expr.to_string(), index);
        self.projection.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("__pgr_{index}")),
        });
        self.merges.push(merge);
        self.hidden += 1;
        index
    }

    /// The column of a HAVING / ORDER BY expression, adding a hidden one if needed.
    pub(super) fn column_for(
        &mut self,
        expr: &Expr,
        groups: &[String],
    ) -> Result<usize, PlanError> {
        if let Some(index) = self.by_text.get(&expr.to_string()) {
            return Ok(*index);
        }
        match top_aggregate(expr) {
            Some((_, true)) => unsupported("DISTINCT aggregates across shards"),
            Some(("avg", _)) => unsupported("avg() in HAVING/ORDER BY unless it is also selected"),
            Some((name, _)) => {
                let merge = match name {
                    "count" => ColumnMerge::Count,
                    "sum" => ColumnMerge::Sum,
                    "min" => ColumnMerge::Min,
                    _ => ColumnMerge::Max,
                };
                Ok(self.push_hidden(expr.clone(), merge))
            }
            None if groups.contains(&expr.to_string()) => {
                Ok(self.push_hidden(expr.clone(), ColumnMerge::Group))
            }
            None => unsupported(format!(
                "the expression {expr} over aggregates across shards"
            )),
        }
    }
}

pub(super) fn having_of(
    expr: &Expr,
    rewrite: &mut AggregateRewrite,
    groups: &[String],
) -> Result<Having, PlanError> {
    match expr {
        Expr::Nested(inner) => having_of(inner, rewrite, groups),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Having::Not(Box::new(having_of(expr, rewrite, groups)?))),
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::And => Ok(Having::And(
                Box::new(having_of(left, rewrite, groups)?),
                Box::new(having_of(right, rewrite, groups)?),
            )),
            BinaryOperator::Or => Ok(Having::Or(
                Box::new(having_of(left, rewrite, groups)?),
                Box::new(having_of(right, rewrite, groups)?),
            )),
            BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq => {
                let operand =
                    |e: &Expr, rewrite: &mut AggregateRewrite| -> Result<Operand, PlanError> {
                        match literal_value(e) {
                            Some(value) => Ok(Operand::Literal(value)),
                            None => Ok(Operand::Column(rewrite.column_for(e, groups)?)),
                        }
                    };
                let l = operand(left, rewrite)?;
                let r = operand(right, rewrite)?;
                Ok(Having::Compare(l, op.clone(), r))
            }
            _ => unsupported(format!("the HAVING operator {op} across shards")),
        },
        _ => unsupported(format!("the HAVING condition {expr} across shards")),
    }
}
