//! Plan cache for the simple query protocol: statements that differ only in their literals
//! (`... WHERE aid = 17`, `... WHERE aid = 42`) share one plan. The SQL is normalized by
//! replacing integer and string literals with `$n`; a shape that plans to one shard is cached
//! with the position of its key literal, so later statements skip parsing and planning.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::planner::{self, Plan, PlanError, Planned, Target};
use crate::topology::{KeyType, Topology};
use crate::vindex::KeyValue;

/// Most shapes kept (the cache is cleared when full).
const CAPACITY: usize = 4096;

/// A literal taken out of a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal {
    /// An integer.
    Integer(String),
    /// A string (unescaped).
    Text(String),
}

/// Splits `sql` into its shape (literals replaced by `$1`, `$2`, ...) and the literals. `None`
/// when the text has anything the simple scanner does not handle exactly (comments, parameters,
/// escape strings, dollar quoting, non-integer numbers, several statements).
pub fn normalize(sql: &str) -> Option<(String, Vec<Literal>)> {
    let bytes = sql.as_bytes();
    let mut shape = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'$' | b'\\' => return None,
            b'-' if bytes.get(i + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(i + 1) == Some(&b'*') => return None,
            b';' => {
                if sql[i + 1..].trim().is_empty() {
                    break;
                }
                return None;
            }
            b'"' => {
                let end = sql[i + 1..].find('"')? + i + 1;
                shape.push_str(&sql[i..=end]);
                i = end + 1;
            }
            b'\'' => {
                if i > 0 && is_word(bytes[i - 1]) {
                    // E'...', B'...', X'...', U&'...': not a plain string.
                    return None;
                }
                let mut value = String::new();
                let mut j = i + 1;
                loop {
                    let next = sql[j..].find('\'')? + j;
                    value.push_str(&sql[j..next]);
                    if bytes.get(next + 1) == Some(&b'\'') {
                        value.push('\'');
                        j = next + 2;
                    } else {
                        i = next + 1;
                        break;
                    }
                }
                literals.push(Literal::Text(value));
                shape.push_str(&format!("${}", literals.len()));
            }
            b'0'..=b'9' if i == 0 || !(is_word(bytes[i - 1]) || bytes[i - 1] == b'.') => {
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i < bytes.len() && (is_word(bytes[i]) || bytes[i] == b'.') {
                    return None;
                }
                literals.push(Literal::Integer(sql[start..i].to_string()));
                shape.push_str(&format!("${}", literals.len()));
            }
            _ => {
                let c = sql[i..].chars().next()?;
                shape.push(c);
                i += c.len_utf8();
            }
        }
    }
    Some((shape, literals))
}

/// The cached route of a shape.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    /// Not cacheable: plan every statement in full.
    Uncached,
    /// The shard of literal `literal` (0-based) in table group `group`.
    Key { literal: usize, group: usize },
    /// A fixed target.
    Fixed(Target),
}

/// Shapes and their routes, for one topology version.
#[derive(Debug, Default)]
pub struct PlanCache {
    routes: Mutex<HashMap<String, (Route, bool)>>,
}

impl PlanCache {
    /// Plans `sql` (one or more statements) using the cache when it can.
    pub fn plan(&self, topology: &Topology, sql: &str) -> Result<Vec<Planned>, PlanError> {
        let Some((shape, literals)) = normalize(sql) else {
            return planner::plan_sql(topology, sql);
        };
        let cached = self
            .routes
            .lock()
            .expect("plan cache lock")
            .get(&shape)
            .cloned();
        let (route, returns_rows) = match cached {
            Some(entry) => entry,
            None => {
                let entry = match planner::plan_sql(topology, &shape) {
                    Ok(mut planned) if planned.len() == 1 => {
                        let planned = planned.remove(0);
                        let route = match planned.plan {
                            Plan::Single(Target::Param { param, group }) => Route::Key {
                                literal: param - 1,
                                group,
                            },
                            Plan::Single(target @ (Target::Shard(_) | Target::Any)) => {
                                Route::Fixed(target)
                            }
                            _ => Route::Uncached,
                        };
                        (route, planned.returns_rows)
                    }
                    _ => (Route::Uncached, false),
                };
                let mut routes = self.routes.lock().expect("plan cache lock");
                if routes.len() >= CAPACITY {
                    routes.clear();
                }
                routes.insert(shape, entry.clone());
                entry
            }
        };
        let target = match route {
            Route::Uncached => return planner::plan_sql(topology, sql),
            Route::Fixed(target) => target,
            Route::Key { literal, group } => {
                let key = match (literals.get(literal), topology.groups[group].key_type) {
                    (Some(Literal::Integer(text)), KeyType::Bigint) => {
                        text.parse().ok().map(KeyValue::Int)
                    }
                    (Some(Literal::Text(text)), KeyType::Bigint) => {
                        text.trim().parse().ok().map(KeyValue::Int)
                    }
                    (Some(Literal::Text(text)), KeyType::Text) => {
                        Some(KeyValue::Text(text.clone()))
                    }
                    _ => None,
                };
                match key {
                    Some(key) => Target::Shard(planner::shard_of(topology, group, &key)?),
                    None => return planner::plan_sql(topology, sql),
                }
            }
        };
        Ok(vec![Planned {
            sql: sql.trim().trim_end_matches(';').to_string(),
            plan: Plan::Single(target),
            returns_rows,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::RouterConfig;

    #[test]
    fn literals_are_taken_out() {
        let (shape, literals) =
            normalize("UPDATE t SET b = b + -12, s = 'it''s' WHERE \"id2\" = 7;").unwrap();
        assert_eq!(shape, "UPDATE t SET b = b + -$1, s = $2 WHERE \"id2\" = $3");
        assert_eq!(
            literals,
            vec![
                Literal::Integer("12".into()),
                Literal::Text("it's".into()),
                Literal::Integer("7".into())
            ]
        );
        assert!(normalize("SELECT 1.5").is_none());
        assert!(normalize("SELECT E'x'").is_none());
        assert!(normalize("SELECT 1; SELECT 2").is_none());
        assert!(normalize("SELECT $1").is_none());
    }

    #[test]
    fn cached_plans_equal_full_plans() {
        let config = RouterConfig::from_toml(
            "[[shards]]\nname='a'\nport=1\n[[shards]]\nname='b'\nport=2\n[[table_groups]]\nname='g'\n\
             [[sharded_tables]]\nname='t'\ntable_group='g'\nshard_key='id'\n",
        )
        .unwrap();
        let topology = Topology::from_config(&config).unwrap();
        let cache = PlanCache::default();
        for id in 0..50 {
            for sql in [
                format!("SELECT * FROM t WHERE id = {id}"),
                format!("SELECT * FROM t WHERE id = '{id}' AND x = 'a'"),
                format!("INSERT INTO t (id, x) VALUES ({id}, 'v')"),
                format!("SELECT count(*) FROM t WHERE x = {id}"),
            ] {
                let full = planner::plan_sql(&topology, &sql).unwrap();
                let cached = cache.plan(&topology, &sql).unwrap();
                assert_eq!(cached[0].plan, full[0].plan, "{sql}");
                assert_eq!(cached[0].sql, full[0].sql, "{sql}");
            }
        }
    }
}
