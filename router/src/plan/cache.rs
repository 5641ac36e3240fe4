//! Plan cache for the simple query protocol: statements that differ only in their literals
//! (`... WHERE aid = 17`, `... WHERE aid = 42`) share one plan. The SQL is normalized by
//! replacing integer and string literals with `$n`; a shape that plans to one shard is cached
//! with the position of its key literal, so later statements skip parsing and planning.
//!
//! Auto-prepare: a cached single-shard `SELECT`/`INSERT`/`UPDATE`/`DELETE` whose literals all sit
//! where a typed parameter means exactly what the literal means ([`literals_are_values`]) goes to
//! the shard as its shape, prepared once per backend connection, with the literals bound as
//! parameters typed as PostgreSQL types the literals themselves (an integer is `int4`, `int8` or
//! `numeric` by size; a string stays `unknown`). The shard then skips parsing and analysis, as for
//! a client's own prepared statement; the client still sees the simple protocol's answer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use crate::plan::{self as plan, Plan, PlanError, Planned, Target};
use crate::protocol::messages::Params;
use crate::topology::{KeyType, Topology};
use crate::vindex::KeyValue;

/// Most shapes kept (the cache is cleared when full).
const CAPACITY: usize = 4096;

/// A literal taken out of a statement, borrowed from its text (a string whose quotes are
/// doubled inside is the one kind that needs a copy, to unescape it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal<'a> {
    /// An integer.
    Integer(&'a str),
    /// A string (unescaped).
    Text(Cow<'a, str>),
}

/// Where a literal stood in the client's text and where its placeholder stands in the shape
/// (byte ranges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// In the client's statement.
    pub original: std::ops::Range<usize>,
    /// In the shape.
    pub shape: std::ops::Range<usize>,
}

/// A statement split into its shape and its literals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized<'a> {
    /// The statement with each literal replaced by `$1`, `$2`, ...
    pub shape: String,
    /// The literals, in order.
    pub literals: Vec<Literal<'a>>,
    /// Where each literal was and where its placeholder is.
    pub spans: Vec<Span>,
}

/// Splits `sql` into its shape (literals replaced by `$1`, `$2`, ...) and the literals. `None`
/// when the text has anything the simple scanner does not handle exactly (comments, parameters,
/// escape strings, dollar quoting, non-integer numbers, several statements).
pub fn normalize(sql: &str) -> Option<Normalized<'_>> {
    /// The first bytes of the `match` arms below other than `_` (digits too): a run of text
    /// copied in one piece stops before each of them. An arm added there belongs here too.
    const SPECIAL: &[u8] = b"$\\-/;\"'";
    let bytes = sql.as_bytes();
    let mut shape = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut spans = Vec::new();
    let mut placeholder = |shape: &mut String, original: std::ops::Range<usize>, count: usize| {
        use std::fmt::Write as _;
        let start = shape.len();
        // Written in place: this runs for every literal of every simple query.
        let _ = write!(shape, "${count}");
        spans.push(Span {
            original,
            shape: start..shape.len(),
        });
    };
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
                let start = i;
                if i > 0 && is_word(bytes[i - 1]) {
                    // E'...', B'...', X'...', U&'...': not a plain string.
                    return None;
                }
                let mut value = Cow::Borrowed("");
                let mut j = i + 1;
                loop {
                    let next = sql[j..].find('\'')? + j;
                    if bytes.get(next + 1) == Some(&b'\'') {
                        // A doubled quote: the value is no longer a slice of the text.
                        let owned = value.to_mut();
                        owned.push_str(&sql[j..next]);
                        owned.push('\'');
                        j = next + 2;
                    } else {
                        match &mut value {
                            Cow::Borrowed(_) => value = Cow::Borrowed(&sql[j..next]),
                            Cow::Owned(owned) => owned.push_str(&sql[j..next]),
                        }
                        i = next + 1;
                        break;
                    }
                }
                literals.push(Literal::Text(value));
                placeholder(&mut shape, start..i, literals.len());
            }
            b'0'..=b'9' if i == 0 || !(is_word(bytes[i - 1]) || bytes[i - 1] == b'.') => {
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i < bytes.len() && (is_word(bytes[i]) || bytes[i] == b'.') {
                    return None;
                }
                literals.push(Literal::Integer(&sql[start..i]));
                placeholder(&mut shape, start..i, literals.len());
            }
            _ => {
                // Everything up to the next byte that may start a token of interest is copied
                // as one slice (these bytes are ASCII, so the slice ends on a char boundary).
                let run = bytes[i + 1..]
                    .iter()
                    .position(|&b| SPECIAL.contains(&b) || b.is_ascii_digit())
                    .map_or(bytes.len(), |n| i + 1 + n);
                shape.push_str(&sql[i..run]);
                i = run;
            }
        }
    }
    Some(Normalized {
        shape,
        literals,
        spans,
    })
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

/// What the cache keeps of a shape.
#[derive(Clone, Debug)]
struct Entry {
    route: Route,
    returns_rows: bool,
    /// Whether the shape may go to the shard auto-prepared (see the module documentation).
    prepare: bool,
}

/// A simple-protocol statement, planned.
#[derive(Debug)]
pub struct SimplePlan {
    /// The statements to run, in order.
    pub planned: Vec<Planned>,
    /// Set when the (single) statement goes to its shard auto-prepared: `planned[0].sql` is then
    /// the shape, and this holds its parameters.
    pub prepared: Option<AutoPrepared>,
}

/// The parameters of an auto-prepared statement, and how to map positions in the shape (of a
/// shard's error) back to the client's text.
#[derive(Debug)]
pub struct AutoPrepared {
    /// The literals as typed text parameters.
    pub params: Params,
    spans: Vec<Span>,
}

impl AutoPrepared {
    /// Maps an error position in the shape (1-based, in characters, as PostgreSQL reports it)
    /// to the same place in the client's statement `original`, given the `shape`.
    pub fn client_position(&self, shape: &str, original: &str, position: usize) -> usize {
        let Some((shape_byte, _)) = shape.char_indices().nth(position.saturating_sub(1)) else {
            return position;
        };
        let mut original_byte = shape_byte;
        for span in &self.spans {
            if shape_byte >= span.shape.end {
                original_byte = span.original.end + (shape_byte - span.shape.end);
            } else {
                if shape_byte >= span.shape.start {
                    original_byte = span.original.start;
                }
                break;
            }
        }
        original
            .get(..original_byte)
            .map_or(position, |before| before.chars().count() + 1)
    }
}

/// The PostgreSQL type of a literal as the parser types it, as a parameter type OID: an integer
/// is `int4` if it fits, else `int8`, else `numeric`; a string is `unknown` (0), resolved from
/// its context as the literal would be.
fn literal_type(literal: &Literal) -> u32 {
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const NUMERIC: u32 = 1700;
    match literal {
        Literal::Integer(text) if text.parse::<i32>().is_ok() => INT4,
        Literal::Integer(text) if text.parse::<i64>().is_ok() => INT8,
        Literal::Integer(_) => NUMERIC,
        Literal::Text(_) => 0,
    }
}

/// Whether literal `literal` may stand as a parameter in arithmetic: an integer, except the
/// two whose negation PostgreSQL types narrower than the number itself (`-2147483648` is an
/// `int4` literal, but `2147483648` an `int8`).
fn integer_operand(literal: &Literal) -> bool {
    matches!(literal, Literal::Integer(text)
        if *text != "2147483648" && *text != "9223372036854775808")
}

/// Which of the first 64 literals are [`integer_operand`]s (bit `i` for literal `i`): with
/// the shape, what decides whether a statement may be auto-prepared.
fn integer_mask(literals: &[Literal]) -> u64 {
    literals
        .iter()
        .take(64)
        .enumerate()
        .filter(|(_, literal)| integer_operand(literal))
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

/// The literals as text-format parameters with their literal types.
fn literal_params(literals: &[Literal]) -> Params {
    Params {
        types: literals.iter().map(literal_type).collect(),
        values: literals
            .iter()
            .map(|literal| {
                let text: &str = match literal {
                    Literal::Integer(text) => text,
                    Literal::Text(text) => text,
                };
                Some(bytes::Bytes::copy_from_slice(text.as_bytes()))
            })
            .collect(),
        formats: Vec::new(),
    }
}

/// A token of a shape, as far as [`literals_are_values`] needs to tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    /// A keyword or an unquoted identifier (as written).
    Word(&'a str),
    /// A quoted identifier.
    Quoted,
    /// `$n` (1-based).
    Placeholder(usize),
    /// An operator (`=`, `<=`, `::`, `+`, ...).
    Operator(&'a str),
    /// `(`, `)`, `,`, `.`, `;`, `[`, `]`, or anything else of one character.
    Punctuation(char),
}

/// Splits a shape into tokens. `None` for anything unexpected (the caller then does not
/// auto-prepare).
fn tokens(shape: &str) -> Option<Vec<Token<'_>>> {
    let bytes = shape.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    while i < bytes.len() {
        let b = bytes[i];
        let start = i;
        if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'"' {
            i += shape[i + 1..].find('"')? + 2;
            tokens.push(Token::Quoted);
        } else if b == b'$' {
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            tokens.push(Token::Placeholder(shape[start + 1..i].parse().ok()?));
        } else if is_word(b) {
            while i < bytes.len() && (is_word(bytes[i]) || bytes[i] == b'$') {
                i += 1;
            }
            tokens.push(Token::Word(&shape[start..i]));
        } else if b"=<>!+-*/%^|&~#@?:".contains(&b) {
            while i < bytes.len() && b"=<>!+-*/%^|&~#@?:".contains(&bytes[i]) {
                i += 1;
            }
            tokens.push(Token::Operator(&shape[start..i]));
        } else if b.is_ascii() {
            i += 1;
            tokens.push(Token::Punctuation(char::from(b)));
        } else {
            return None;
        }
    }
    Some(tokens)
}

/// Whether every placeholder of `shape` stands where a parameter of the literal's own type means
/// what the literal meant, so the shape can run as a prepared statement with the literals bound.
///
/// Accepted, in a `SELECT`, `INSERT`, `UPDATE` or `DELETE`: a comparison with a column
/// (`col = $1`, `t.col <= $2`, also `SET col = $3`), an `IN ($1, $2)` list, the row values of
/// `INSERT ... VALUES`, and `LIMIT`/`OFFSET`; and an integer (`integer(n)` says which
/// placeholders were integers) as an operand of `+ - * / %` (`SET n = n + -5`), where an `int4`,
/// `int8` or `numeric` parameter is the literal itself, outside statements with `ORDER BY`,
/// `GROUP BY` or `FETCH` (where `-1` may be a position or must be a literal). Anything else (a
/// literal in the select list, in `ORDER BY 1`, a string in arithmetic, a typed literal such as
/// `DATE '...'`, a cast) keeps the statement on the simple protocol, where the literal is parsed
/// as the client wrote it.
pub fn literals_are_values(shape: &str, integer: impl Fn(usize) -> bool) -> bool {
    let Some(tokens) = tokens(shape) else {
        return false;
    };
    let keyword = |token: Option<&Token<'_>>, word: &str| matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(word));
    let is_insert = keyword(tokens.first(), "insert");
    if !(["select", "insert", "update", "delete"]
        .iter()
        .any(|word| keyword(tokens.first(), word)))
    {
        return false;
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Paren {
        InList,
        ValuesRow,
        Other,
    }
    let mut parens: Vec<Paren> = Vec::new();
    let mut after_values = false;
    let ordered = tokens.windows(2).any(|pair| {
        (keyword(pair.first(), "order") || keyword(pair.first(), "group"))
            && keyword(pair.get(1), "by")
    }) || tokens.iter().any(|t| keyword(Some(t), "fetch"));
    for (i, token) in tokens.iter().enumerate() {
        let previous = i.checked_sub(1).and_then(|j| tokens.get(j));
        match token {
            Token::Punctuation('(') => {
                let kind = if keyword(previous, "in") {
                    Paren::InList
                } else if after_values && parens.is_empty() {
                    Paren::ValuesRow
                } else {
                    Paren::Other
                };
                parens.push(kind);
            }
            Token::Punctuation(')') => {
                parens.pop();
            }
            Token::Word(word) if word.eq_ignore_ascii_case("values") => {
                after_values = is_insert && parens.is_empty();
            }
            Token::Placeholder(number) => {
                let next = tokens.get(i + 1);
                let ends_value = |extra: &[&str]| match next {
                    None | Some(Token::Punctuation(')' | ',' | ';')) => true,
                    Some(Token::Word(word)) => extra.iter().any(|e| word.eq_ignore_ascii_case(e)),
                    _ => false,
                };
                let in_list = matches!(parens.last(), Some(Paren::InList | Paren::ValuesRow))
                    && matches!(previous, Some(Token::Punctuation('(' | ',')))
                    && matches!(next, Some(Token::Punctuation(',' | ')')));
                let compared = matches!(
                    previous,
                    Some(Token::Operator("=" | "<>" | "!=" | "<" | ">" | "<=" | ">="))
                ) && matches!(
                    i.checked_sub(2).and_then(|j| tokens.get(j)),
                    Some(Token::Word(_) | Token::Quoted)
                ) && ends_value(&[
                    "and",
                    "or",
                    "where",
                    "order",
                    "group",
                    "limit",
                    "offset",
                    "returning",
                    "for",
                ]);
                let limit = (keyword(previous, "limit") || keyword(previous, "offset"))
                    && ends_value(&["limit", "offset", "for"]);
                let arithmetic = !ordered
                    && integer(*number)
                    && matches!(previous, Some(Token::Operator("+" | "-" | "*" | "/" | "%")))
                    && (matches!(
                        next,
                        Some(Token::Operator(
                            "+" | "-"
                                | "*"
                                | "/"
                                | "%"
                                | "="
                                | "<>"
                                | "!="
                                | "<"
                                | ">"
                                | "<="
                                | ">="
                        ))
                    ) || ends_value(&["and", "or", "where", "returning", "limit", "offset"]));
                if !(in_list || compared || limit || arithmetic) {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// Shapes and their routes, for one topology version.
#[derive(Debug, Default)]
pub struct PlanCache {
    /// By shape and [`integer_mask`]. Hashed with foldhash (seeded per process, so collisions
    /// stay unpredictable), several times cheaper than SipHash: every simple query hashes its
    /// shape.
    routes: Mutex<HashMap<(String, u64), Entry, foldhash::fast::RandomState>>,
}

impl PlanCache {
    /// Plans a simple-protocol `sql` using the cache when it can; with `auto_prepare`, a
    /// statement that allows it is returned as its shape with its literals as parameters.
    pub fn plan_simple(
        &self,
        topology: &Topology,
        sql: &str,
        auto_prepare: bool,
    ) -> Result<SimplePlan, PlanError> {
        let unprepared = |planned| SimplePlan {
            planned,
            prepared: None,
        };
        let Some(Normalized {
            shape,
            literals,
            spans,
        }) = normalize(sql)
        else {
            return plan::plan_sql(topology, sql).map(unprepared);
        };
        let key = (shape, integer_mask(&literals));
        let cached = self
            .routes
            .lock()
            .expect("plan cache lock")
            .get(&key)
            .cloned();
        let (shape, mask) = key;
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let entry = match plan::plan_sql(topology, &shape) {
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
                        Entry {
                            prepare: route != Route::Uncached
                                && literals_are_values(&shape, |n| {
                                    (1..=64).contains(&n) && mask & 1 << (n - 1) != 0
                                }),
                            route,
                            returns_rows: planned.returns_rows,
                        }
                    }
                    _ => Entry {
                        route: Route::Uncached,
                        returns_rows: false,
                        prepare: false,
                    },
                };
                let mut routes = self.routes.lock().expect("plan cache lock");
                if routes.len() >= CAPACITY {
                    routes.clear();
                }
                routes.insert((shape.clone(), mask), entry.clone());
                entry
            }
        };
        let target = match entry.route {
            Route::Uncached => return plan::plan_sql(topology, sql).map(unprepared),
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
                        Some(KeyValue::Text(text.to_string()))
                    }
                    _ => None,
                };
                match key {
                    Some(key) => Target::Shard(plan::shard_of(topology, group, &key)?),
                    None => return plan::plan_sql(topology, sql).map(unprepared),
                }
            }
        };
        let (sql, prepared) = if auto_prepare && entry.prepare {
            let prepared = AutoPrepared {
                params: literal_params(&literals),
                spans,
            };
            (shape, Some(prepared))
        } else {
            (sql.trim().trim_end_matches(';').to_string(), None)
        };
        Ok(SimplePlan {
            planned: vec![Planned {
                sql,
                plan: Plan::Single(target),
                returns_rows: entry.returns_rows,
            }],
            prepared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::RouterConfig;

    #[test]
    fn literals_are_taken_out() {
        let Normalized {
            shape,
            literals,
            spans,
        } = normalize("UPDATE t SET b = b + -12, s = 'it''s' WHERE \"id2\" = 7;").unwrap();
        assert_eq!(shape, "UPDATE t SET b = b + -$1, s = $2 WHERE \"id2\" = $3");
        assert_eq!(
            literals,
            vec![
                Literal::Integer("12"),
                Literal::Text("it's".into()),
                Literal::Integer("7")
            ]
        );
        let original = "UPDATE t SET b = b + -12, s = 'it''s' WHERE \"id2\" = 7;";
        let taken: Vec<&str> = spans
            .iter()
            .map(|s| &original[s.original.clone()])
            .collect();
        assert_eq!(taken, ["12", "'it''s'", "7"]);
        let placed: Vec<&str> = spans.iter().map(|s| &shape[s.shape.clone()]).collect();
        assert_eq!(placed, ["$1", "$2", "$3"]);
        assert!(normalize("SELECT 1.5").is_none());
        assert!(normalize("SELECT E'x'").is_none());
        assert!(normalize("SELECT 1; SELECT 2").is_none());
        assert!(normalize("SELECT $1").is_none());
    }

    /// Strings are borrowed from the text unless they hold doubled quotes, which are unescaped
    /// wherever they stand (first, last, alone, repeated).
    #[test]
    fn strings_are_unescaped_wherever_their_quotes_stand() {
        let Normalized { literals, .. } =
            normalize("SELECT '''', '', 'plain', 'a''b''c', '''x', 'y'''").unwrap();
        let texts: Vec<(&str, bool)> = literals
            .iter()
            .map(|literal| match literal {
                Literal::Text(text) => (&**text, matches!(text, Cow::Borrowed(_))),
                Literal::Integer(_) => unreachable!("only strings here"),
            })
            .collect();
        assert_eq!(
            texts,
            [
                ("'", false),
                ("", true),
                ("plain", true),
                ("a'b'c", false),
                ("'x", false),
                ("y'", false)
            ]
        );
    }

    /// Text between literals is copied in runs: identifiers with digits, multi-byte
    /// characters, and the characters that end a run all come through unchanged.
    #[test]
    fn text_between_literals_is_kept_exactly() {
        let sql =
            "SELECT t1.c2, \"ü 9\", größe FROM tab_3 WHERE é = 10 AND x2 = 'ä''b' AND n <> -7 ;";
        let Normalized {
            shape, literals, ..
        } = normalize(sql).unwrap();
        assert_eq!(
            shape,
            "SELECT t1.c2, \"ü 9\", größe FROM tab_3 WHERE é = $1 AND x2 = $2 AND n <> -$3 "
        );
        assert_eq!(
            literals,
            vec![
                Literal::Integer("10"),
                Literal::Text("ä'b".into()),
                Literal::Integer("7")
            ]
        );
        let many: String = (1..=12).map(|n| format!(" AND c = {n}")).collect();
        let Normalized { shape, .. } = normalize(&format!("SELECT 1 WHERE true{many}")).unwrap();
        assert!(shape.ends_with("AND c = $12 AND c = $13"), "{shape}");
        assert!(normalize("SELECT a -- 1\n").is_none());
        assert!(normalize("SELECT a /* 1 */").is_none());
        assert!(normalize("SELECT a\\b").is_none());
    }

    /// Two shards, table `t` sharded by `id`.
    fn two_shards() -> Topology {
        let config = RouterConfig::from_toml(
            "[[shards]]\nname='a'\nport=1\n[[shards]]\nname='b'\nport=2\n[[table_groups]]\nname='g'\n\
             [[sharded_tables]]\nname='t'\ntable_group='g'\nshard_key='id'\n",
        )
        .unwrap();
        Topology::from_config(&config).unwrap()
    }

    #[test]
    fn cached_plans_equal_full_plans() {
        let topology = two_shards();
        let cache = PlanCache::default();
        for id in 0..50 {
            for sql in [
                format!("SELECT * FROM t WHERE id = {id}"),
                format!("SELECT * FROM t WHERE id = '{id}' AND x = 'a'"),
                format!("INSERT INTO t (id, x) VALUES ({id}, 'v')"),
                format!("SELECT count(*) FROM t WHERE x = {id}"),
            ] {
                let full = plan::plan_sql(&topology, &sql).unwrap();
                let cached = cache.plan_simple(&topology, &sql, false).unwrap().planned;
                assert_eq!(cached[0].plan, full[0].plan, "{sql}");
                assert_eq!(cached[0].sql, full[0].sql, "{sql}");
            }
        }
    }

    #[test]
    fn literals_in_value_positions_allow_auto_prepare() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 17",
            "select * from t where t.id >= 3 and \"Name\" <> 'x' order by id limit 10 offset 5",
            "SELECT * FROM t WHERE id IN (1, 2, 3) AND x = 'a'",
            "INSERT INTO t (id, x) VALUES (1, 'a'), (2, 'b') RETURNING id",
            "UPDATE t SET x = 'b', y = 2 WHERE id = 7",
            "DELETE FROM t WHERE id = 7;",
            "SELECT count(*) FROM t",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE",
            "SELECT * FROM t WHERE id = -1",
            // pgbench's TPC-B-like transaction.
            "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 5;",
            "UPDATE pgbench_tellers SET tbalance = tbalance + 17 WHERE tid = 3",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 5, -1234, CURRENT_TIMESTAMP);",
            "UPDATE t SET n = n * 2 + 1 WHERE id = 7 RETURNING n",
        ] {
            assert!(allows(sql), "{sql}");
        }
    }

    /// Whether `sql` may be auto-prepared, as the cache decides it.
    fn allows(sql: &str) -> bool {
        let normalized = normalize(sql).unwrap();
        let mask = integer_mask(&normalized.literals);
        literals_are_values(&normalized.shape, |n| mask & 1 << (n - 1) != 0)
    }

    #[test]
    fn literals_whose_meaning_depends_on_being_literals_keep_the_simple_protocol() {
        for sql in [
            "SELECT 1",
            "SELECT 'a' FROM t WHERE id = 1",
            "SELECT * FROM t ORDER BY 1",
            "SELECT x, count(*) FROM t GROUP BY 1",
            "UPDATE t SET s = s + 'a' WHERE id = 2",
            "UPDATE t SET s = s || 'a' WHERE id = 2",
            "UPDATE t SET n = -2147483648 WHERE id = 2",
            "UPDATE t SET n = n - 9223372036854775808 WHERE id = 2",
            "SELECT * FROM t ORDER BY -1",
            "SELECT x + 1 FROM t GROUP BY 1",
            "SELECT * FROM t WHERE id = 1 FETCH FIRST 5 ROWS ONLY",
            "SELECT x[1] FROM t WHERE id = 1",
            "SELECT n ^ 2 FROM t WHERE id = 1",
            "SELECT * FROM t WHERE d = DATE '2020-01-01'",
            "SELECT * FROM t WHERE id = 1::bigint",
            "SELECT * FROM t WHERE x = 'a' || y",
            "SELECT * FROM (VALUES (1, 'a')) v(id, x) WHERE id = 1",
            "SELECT * FROM t WHERE f(id) = 1 AND id = 2 IS TRUE",
            "SET work_mem = 64",
            "CREATE TABLE t (x varchar(10))",
            "WITH w AS (SELECT 1) SELECT * FROM w",
            "SELECT * FROM t WHERE x LIKE 'a%'",
        ] {
            assert!(!allows(sql), "{sql}");
        }
    }

    #[test]
    fn literals_become_parameters_of_their_own_types() {
        let literals = [
            Literal::Integer("2147483647"),
            Literal::Integer("2147483648"),
            Literal::Integer("99999999999999999999"),
            Literal::Text("it's".into()),
        ];
        let params = literal_params(&literals);
        assert_eq!(params.types, [23, 20, 1700, 0]);
        assert_eq!(params.values[3].as_deref(), Some(&b"it's"[..]));
        assert!(params.formats.is_empty(), "text format");
    }

    #[test]
    fn error_positions_map_back_to_the_clients_text() {
        let original = "SELECT nope FROM t WHERE s = 'a long literal' AND é = 12345 AND zz";
        let normalized = normalize(original).unwrap();
        let prepared = AutoPrepared {
            params: literal_params(&normalized.literals),
            spans: normalized.spans,
        };
        let shape = &normalized.shape;
        let position_of =
            |text: &str, needle: &str| text[..text.find(needle).unwrap()].chars().count() + 1;
        for needle in ["nope", "AND é", "zz"] {
            assert_eq!(
                prepared.client_position(shape, original, position_of(shape, needle)),
                position_of(original, needle),
                "{needle}"
            );
        }
        // Inside a placeholder: the start of its literal.
        assert_eq!(
            prepared.client_position(shape, original, position_of(shape, "$2") + 1),
            position_of(original, "12345")
        );
    }

    #[test]
    fn auto_prepared_statements_carry_the_shape_and_typed_literals() {
        let topology = two_shards();
        let cache = PlanCache::default();
        for id in 0..20 {
            let sql = format!("SELECT * FROM t WHERE id = {id} AND x = 'v'");
            let full = plan::plan_sql(&topology, &sql).unwrap();
            let simple = cache.plan_simple(&topology, &sql, true).unwrap();
            assert_eq!(simple.planned[0].plan, full[0].plan, "{sql}");
            assert_eq!(
                simple.planned[0].sql,
                "SELECT * FROM t WHERE id = $1 AND x = $2"
            );
            let prepared = simple.prepared.unwrap();
            assert_eq!(prepared.params.types, [23, 0]);
            assert_eq!(
                prepared.params.values[0].as_deref(),
                Some(id.to_string().as_bytes())
            );

            let off = cache.plan_simple(&topology, &sql, false).unwrap();
            assert!(off.prepared.is_none());
            assert_eq!(off.planned[0].sql, sql);
        }
        let kept = cache
            .plan_simple(&topology, "SELECT id, 1 FROM t WHERE id = 3", true)
            .unwrap();
        assert!(kept.prepared.is_none());
        assert_eq!(kept.planned[0].sql, "SELECT id, 1 FROM t WHERE id = 3");
    }
}
