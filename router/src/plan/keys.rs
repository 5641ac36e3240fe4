//! Shard keys in WHERE clauses: the key values an equality or IN list restricts a statement to.

use super::*;

pub(super) fn route_keys<T>(
    topology: &Topology,
    group: usize,
    keys: Vec<KeyExpr>,
    single: impl FnOnce(Target) -> Result<T, PlanError>,
    scatter: impl FnOnce(Option<Vec<usize>>) -> Result<T, PlanError>,
) -> Result<T, PlanError> {
    match keys.as_slice() {
        [] => scatter(None),
        [KeyExpr::Param(param)] => single(Target::Param {
            param: *param,
            group,
        }),
        _ => {
            let mut shards = Vec::new();
            for key in &keys {
                match key {
                    KeyExpr::Literal(value) => {
                        let shard = shard_of(topology, group, value)?;
                        if !shards.contains(&shard) {
                            shards.push(shard);
                        }
                    }
                    KeyExpr::Param(_) => return scatter(None),
                }
            }
            if shards.len() == 1 {
                single(Target::Shard(shards[0]))
            } else {
                shards.sort();
                scatter(Some(shards))
            }
        }
    }
}

/// The shard of `value` in table group `group`.
pub fn shard_of(topology: &Topology, group: usize, value: &KeyValue) -> Result<usize, PlanError> {
    topology.groups[group]
        .vindex
        .shard_for(value)
        .map_err(|e| PlanError::NoShard(e.to_string()))
}

/// A literal or parameter as a key of type `key_type`.
pub(super) fn key_expr(expr: &Expr, key_type: KeyType) -> Option<KeyExpr> {
    match expr {
        Expr::Nested(inner) => key_expr(inner, key_type),
        Expr::Cast { expr, .. } => key_expr(expr, key_type),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match key_expr(expr, key_type)? {
            KeyExpr::Literal(KeyValue::Int(v)) => Some(KeyExpr::Literal(KeyValue::Int(-v))),
            _ => None,
        },
        Expr::Value(value) => match &value.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(KeyExpr::Param),
            Value::Number(n, _) if key_type == KeyType::Bigint => {
                n.parse().ok().map(|v| KeyExpr::Literal(KeyValue::Int(v)))
            }
            Value::SingleQuotedString(s) => match key_type {
                KeyType::Bigint => s
                    .trim()
                    .parse()
                    .ok()
                    .map(|v| KeyExpr::Literal(KeyValue::Int(v))),
                KeyType::Text => Some(KeyExpr::Literal(KeyValue::Text(s.clone()))),
            },
            _ => None,
        },
        _ => None,
    }
}

/// Is `expr` a reference to a shard-key column? `columns` maps table names and aliases to
/// their shard key.
pub(super) fn is_key_column(expr: &Expr, columns: &HashMap<String, String>) -> bool {
    match expr {
        Expr::Nested(inner) => is_key_column(inner, columns),
        Expr::Identifier(ident) => {
            let name = normalize(ident);
            columns.values().any(|key| *key == name)
        }
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let table = normalize(&parts[parts.len() - 2]);
            let column = normalize(&parts[parts.len() - 1]);
            columns.get(&table).is_some_and(|key| *key == column)
        }
        _ => false,
    }
}

pub(super) fn conjuncts(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut out = conjuncts(left);
            out.extend(conjuncts(right));
            out
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// Shard-key values the WHERE clause restricts the rows to (empty: no restriction).
pub(super) fn key_restriction(
    selection: &Expr,
    columns: &HashMap<String, String>,
    key_type: KeyType,
) -> Vec<KeyExpr> {
    for conjunct in conjuncts(selection) {
        match conjunct {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                if is_key_column(left, columns)
                    && let Some(key) = key_expr(right, key_type)
                {
                    return vec![key];
                }
                if is_key_column(right, columns)
                    && let Some(key) = key_expr(left, key_type)
                {
                    return vec![key];
                }
            }
            Expr::In {
                expr,
                target: sqlparser::ast::InTarget::List(list),
                negated: false,
                ..
            } if is_key_column(expr, columns) => {
                let keys: Option<Vec<KeyExpr>> =
                    list.iter().map(|e| key_expr(e, key_type)).collect();
                if let Some(keys) = keys
                    && !keys.is_empty()
                {
                    return keys;
                }
            }
            _ => {}
        }
    }
    Vec::new()
}
