//! Lookup vindexes: the restriction a statement puts on a looked-up column and the query that
//! resolves it to a shard key.

use super::*;

/// A value to look up in a lookup vindex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupValue {
    /// A literal, as text.
    Literal(String),
    /// A bind parameter (1-based).
    Param(usize),
}

/// SQL that reads the shard key for a lookup value (`$1`).
pub fn lookup_query(lookup_table: &str) -> String {
    format!(
        "SELECT {} FROM {} WHERE {} = $1 LIMIT 1",
        quote_ident("key"),
        quote_ident(lookup_table),
        quote_ident("value")
    )
}

pub(super) fn lookup_value(expr: &Expr) -> Option<LookupValue> {
    match expr {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => lookup_value(inner),
        Expr::Value(value) => match &value.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok().map(LookupValue::Param),
            Value::Number(n, _) => Some(LookupValue::Literal(n.clone())),
            Value::SingleQuotedString(s) => Some(LookupValue::Literal(s.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// A lookup-vindex restriction in WHERE: `lookup_column = value` for a sharded table whose
/// name or alias is in `aliases`.
pub(super) fn lookup_restriction(
    topology: &Topology,
    selection: &Expr,
    table: &str,
    aliases: &[String],
    group: usize,
) -> Option<Target> {
    let sharded = topology.tables.get(table)?;
    if sharded.lookups.is_empty() {
        return None;
    }
    let column_of = |expr: &Expr| -> Option<String> {
        match expr {
            Expr::Identifier(ident) => Some(normalize(ident)),
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let qualifier = normalize(&parts[parts.len() - 2]);
                aliases
                    .contains(&qualifier)
                    .then(|| normalize(&parts[parts.len() - 1]))
            }
            _ => None,
        }
    };
    for conjunct in conjuncts(selection) {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = conjunct
        {
            for (column, value) in [(left, right), (right, left)] {
                if let Some(name) = column_of(column)
                    && let Some(lookup_table) = sharded.lookups.get(&name)
                    && let Some(value) = lookup_value(value)
                {
                    return Some(Target::Lookup {
                        lookup_table: lookup_table.clone(),
                        value,
                        group,
                    });
                }
            }
        }
    }
    None
}
