//! The merger: combines the shards' results of a scatter-gather query. ORDER BY is a streaming
//! k-way merge of the shards' sorted streams, LIMIT/OFFSET and DISTINCT apply on the fly;
//! aggregates are merged per group (that needs every group before the first row).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use bytes::{BufMut, BytesMut};
use futures::stream::{self, BoxStream, StreamExt};

use crate::error::RouterError;
use crate::exec::cursor::ShardCursor;
use crate::plan::{Aggregation, ColumnMerge, Having, MergeSpec, Operand, SortKey};
use crate::protocol::messages::Row;
use crate::protocol::messages::{Column, split_fields};
use crate::protocol::values::{self, Decimal, Value, decode, oid};

/// A stream of merged rows.
pub type RowStream = BoxStream<'static, Result<Row, RouterError>>;

/// The columns the client sees: hidden helper columns removed, `avg` columns retyped.
pub fn output_columns(columns: &[Column], spec: &MergeSpec) -> Vec<Column> {
    let visible = columns.len().saturating_sub(spec.hidden);
    let mut out: Vec<Column> = columns[..visible].to_vec();
    if let Some(aggregation) = &spec.aggregation {
        for (i, column) in out.iter_mut().enumerate() {
            if let Some(ColumnMerge::CountDistinct) = aggregation.columns.get(i) {
                column.type_oid = oid::INT8;
                column.type_size = 8;
                column.type_modifier = -1;
                column.table_oid = 0;
                column.column_id = 0;
            }
            if let Some(ColumnMerge::Avg { .. }) = aggregation.columns.get(i) {
                let float = matches!(column.type_oid, oid::FLOAT4 | oid::FLOAT8);
                column.type_oid = if float { oid::FLOAT8 } else { oid::NUMERIC };
                column.type_size = if float { 8 } else { -1 };
                column.type_modifier = -1;
                column.table_oid = 0;
                column.column_id = 0;
            }
        }
    }
    out
}

/// A DataRow body of `fields`.
pub fn build_row(fields: &[Option<&[u8]>]) -> Row {
    let mut data =
        BytesMut::with_capacity(fields.iter().map(|f| 4 + f.map_or(0, |b| b.len())).sum());
    for field in fields {
        match field {
            Some(bytes) => {
                data.put_i32(bytes.len() as i32);
                data.put_slice(bytes);
            }
            None => data.put_i32(-1),
        }
    }
    Row {
        fields: fields.len() as i16,
        data,
    }
}

/// The row without its last `hidden` fields.
pub fn strip_hidden(row: Row, hidden: usize) -> Row {
    if hidden == 0 {
        return row;
    }
    let fields = split_fields(&row.data);
    let keep = fields.len().saturating_sub(hidden);
    build_row(&fields[..keep])
}

fn sort_values(row: &Row, columns: &[Column], order: &[SortKey]) -> Vec<Value> {
    let fields = split_fields(&row.data);
    order
        .iter()
        .map(|key| {
            let index = key.column.resolve(columns.len());
            let column = &columns[index.min(columns.len().saturating_sub(1))];
            decode(
                column.type_oid,
                column.format,
                fields.get(index).copied().flatten(),
            )
        })
        .collect()
}

fn compare_keys(a: &[Value], b: &[Value], order: &[SortKey]) -> Ordering {
    for ((x, y), key) in a.iter().zip(b).zip(order) {
        let ordering = match (x, y) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Null, _) => {
                if key.nulls_first {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            (_, Value::Null) => {
                if key.nulls_first {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            _ => {
                let o = values::compare(x, y);
                if key.descending { o.reverse() } else { o }
            }
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    Ordering::Equal
}

/// Merges the cursors' rows according to `spec`; `columns` is the shards' row description.
pub fn merge(cursors: Vec<ShardCursor>, columns: Vec<Column>, spec: MergeSpec) -> RowStream {
    let hidden = spec.hidden;
    let offset = spec.offset as usize;
    let limit = spec.limit.map(|l| l as usize).unwrap_or(usize::MAX);
    let distinct = spec.distinct;
    // DISTINCT compares values as PostgreSQL does: `1.0` and `1.00` from two shards are one
    // numeric, `-0` and `0` one float.
    let types: Vec<(u32, i16)> = output_columns(&columns, &spec)
        .iter()
        .map(|c| (c.type_oid, c.format))
        .collect();
    let merged: RowStream = if spec.intersect {
        intersect(cursors, hidden)
    } else if spec.aggregation.is_some() {
        aggregate(cursors, columns, spec)
    } else if spec.order.is_empty() {
        concat(cursors)
    } else {
        sorted_merge(cursors, columns, spec.order.clone())
    };
    let mut seen: BTreeSet<Vec<Ordered>> = BTreeSet::new();
    merged
        .map(move |row| row.map(|r| strip_hidden(r, hidden)))
        .filter(move |row| {
            let keep = match row {
                Ok(r) if distinct => {
                    let key = split_fields(&r.data)
                        .into_iter()
                        .zip(&types)
                        .map(|(field, (oid, format))| Ordered(decode(*oid, *format, field)))
                        .collect();
                    seen.insert(key)
                }
                _ => true,
            };
            futures::future::ready(keep)
        })
        .skip(offset)
        .take(limit)
        .boxed()
}

fn concat(cursors: Vec<ShardCursor>) -> RowStream {
    stream::iter(cursors)
        .flat_map(|cursor| {
            stream::unfold(Some(cursor), |state| async move {
                let mut cursor = state?;
                match cursor.next_row().await {
                    Ok(Some(row)) => Some((Ok(row), Some(cursor))),
                    Ok(None) => None,
                    Err(error) => Some((Err(error), None)),
                }
            })
        })
        .boxed()
}

/// The bytes of a row's last `count` fields (with their length words).
pub fn key_of(row: &Row, count: usize) -> &[u8] {
    let data = &row.data[..];
    let visible = (row.fields.max(0) as usize).saturating_sub(count);
    let mut at = 0;
    for _ in 0..visible {
        let Some(word) = data.get(at..at + 4) else {
            return &[];
        };
        let len = i32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        at += 4 + len.max(0) as usize;
    }
    data.get(at..).unwrap_or(&[])
}

/// The first shard's rows whose key (the last `key_columns` fields) every other shard sent
/// too (see `plan/anti.rs`). The other shards' keys are read first; the first shard's rows
/// then stream. Rows are compared as bytes: the shards computed them from the same
/// reference-table rows, in the same session settings.
fn intersect(mut cursors: Vec<ShardCursor>, key_columns: usize) -> RowStream {
    if cursors.is_empty() {
        return stream::empty().boxed();
    }
    let first = cursors.remove(0);
    // `None` until the other shards' keys are read; then their common keys (`None`: one shard).
    type Common = Option<Option<HashSet<Vec<u8>>>>;
    let state: (ShardCursor, Vec<ShardCursor>, Common) = (first, cursors, None);
    stream::unfold(Some(state), move |state| async move {
        let (mut first, others, mut common) = state?;
        if common.is_none() {
            let mut found: Option<HashSet<Vec<u8>>> = None;
            for mut cursor in others {
                let mut keys = HashSet::new();
                loop {
                    match cursor.next_row().await {
                        Ok(Some(row)) => {
                            let key = key_of(&row, key_columns);
                            if found.as_ref().is_none_or(|f| f.contains(key)) {
                                keys.insert(key.to_vec());
                            }
                        }
                        Ok(None) => break,
                        Err(error) => return Some((Err(error), None)),
                    }
                }
                found = Some(keys);
            }
            common = Some(found);
        }
        loop {
            match first.next_row().await {
                Ok(Some(row)) => {
                    let kept = match common.as_ref().and_then(Option::as_ref) {
                        Some(keys) => keys.contains(key_of(&row, key_columns)),
                        None => true,
                    };
                    if kept {
                        return Some((Ok(row), Some((first, Vec::new(), common))));
                    }
                }
                Ok(None) => return None,
                Err(error) => return Some((Err(error), None)),
            }
        }
    })
    .boxed()
}

struct MergeState {
    cursors: Vec<ShardCursor>,
    heads: Vec<Option<(Row, Vec<Value>)>>,
    exhausted: Vec<bool>,
    columns: Vec<Column>,
    order: Vec<SortKey>,
    failed: bool,
}

fn sorted_merge(cursors: Vec<ShardCursor>, columns: Vec<Column>, order: Vec<SortKey>) -> RowStream {
    let n = cursors.len();
    let state = MergeState {
        cursors,
        heads: (0..n).map(|_| None).collect(),
        exhausted: vec![false; n],
        columns,
        order,
        failed: false,
    };
    stream::unfold(state, |mut state| async move {
        if state.failed {
            return None;
        }
        for i in 0..state.cursors.len() {
            if state.heads[i].is_none() && !state.exhausted[i] {
                match state.cursors[i].next_row().await {
                    Ok(Some(row)) => {
                        let keys = sort_values(&row, &state.columns, &state.order);
                        state.heads[i] = Some((row, keys));
                    }
                    Ok(None) => state.exhausted[i] = true,
                    Err(error) => {
                        state.failed = true;
                        return Some((Err(error), state));
                    }
                }
            }
        }
        let mut best: Option<usize> = None;
        for i in 0..state.heads.len() {
            if let Some((_, keys)) = &state.heads[i] {
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let (_, best_keys) = state.heads[b].as_ref().expect("head");
                        if compare_keys(keys, best_keys, &state.order) == Ordering::Less {
                            Some(i)
                        } else {
                            Some(b)
                        }
                    }
                };
            }
        }
        let best = best?;
        let (row, _) = state.heads[best].take().expect("head");
        Some((Ok(row), state))
    })
    .boxed()
}

/// Accumulated state of one output column of one group.
#[derive(Clone, Debug)]
enum Accumulator {
    Raw(Option<Vec<u8>>),
    Total(Value),
    Extreme(Option<(Value, Vec<u8>)>),
    /// The distinct values seen (compared as values: `1.0` and `1.00` are one numeric).
    Distinct(BTreeSet<Ordered>),
}

/// A value ordered as the merger compares values.
#[derive(Clone, Debug)]
struct Ordered(Value);

impl PartialEq for Ordered {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> Ordering {
        values::compare(&self.0, &other.0)
    }
}

/// A group's accumulators before its first row.
fn new_state(aggregation: &Aggregation) -> Vec<Accumulator> {
    aggregation
        .columns
        .iter()
        .map(|m| match m {
            ColumnMerge::Group => Accumulator::Raw(None),
            ColumnMerge::Min | ColumnMerge::Max => Accumulator::Extreme(None),
            ColumnMerge::CountDistinct => Accumulator::Distinct(Default::default()),
            _ => Accumulator::Total(Value::Null),
        })
        .collect()
}

fn add(a: Value, b: Value) -> Result<Value, RouterError> {
    let overflow =
        || RouterError::session("22003", "numeric overflow while merging sums across shards");
    Ok(match (a, b) {
        (Value::Null, x) | (x, Value::Null) => x,
        (Value::Int(x), Value::Int(y)) => Value::Int(x.checked_add(y).ok_or_else(overflow)?),
        (Value::Float(x), Value::Float(y)) => Value::Float(x + y),
        (Value::Numeric(x), Value::Numeric(y)) => {
            Value::Numeric(x.checked_add(y).ok_or_else(overflow)?)
        }
        (Value::Int(x), Value::Numeric(y)) | (Value::Numeric(y), Value::Int(x)) => {
            Value::Numeric(Decimal::from_i64(x).checked_add(y).ok_or_else(overflow)?)
        }
        (x, _) => {
            return Err(RouterError::session(
                "0A000",
                format!("pg-router cannot merge sums of this type ({x:?})"),
            ));
        }
    })
}

fn evaluate(having: &Having, row: &[Value]) -> bool {
    let operand = |o: &Operand| match o {
        Operand::Column(i) => row.get(*i).cloned().unwrap_or(Value::Null),
        Operand::Literal(v) => v.clone(),
    };
    match having {
        Having::And(a, b) => evaluate(a, row) && evaluate(b, row),
        Having::Or(a, b) => evaluate(a, row) || evaluate(b, row),
        Having::Not(a) => !evaluate(a, row),
        Having::Compare(l, op, r) => {
            let (l, r) = (operand(l), operand(r));
            if l == Value::Null || r == Value::Null {
                return false;
            }
            let ordering = match (&l, &r) {
                (Value::Float(x), Value::Int(y)) => x.total_cmp(&(*y as f64)),
                (Value::Int(x), Value::Float(y)) => (*x as f64).total_cmp(y),
                (Value::Float(x), Value::Numeric(y)) => {
                    x.total_cmp(&(y.mantissa as f64 / 10f64.powi(y.scale as i32)))
                }
                (Value::Numeric(x), Value::Float(y)) => {
                    (x.mantissa as f64 / 10f64.powi(x.scale as i32)).total_cmp(y)
                }
                _ => values::compare(&l, &r),
            };
            use sqlparser::ast::BinaryOperator as B;
            match op {
                B::Eq => ordering == Ordering::Equal,
                B::NotEq => ordering != Ordering::Equal,
                B::Lt => ordering == Ordering::Less,
                B::LtEq => ordering != Ordering::Greater,
                B::Gt => ordering == Ordering::Greater,
                B::GtEq => ordering != Ordering::Less,
                _ => false,
            }
        }
    }
}

fn aggregate(cursors: Vec<ShardCursor>, columns: Vec<Column>, spec: MergeSpec) -> RowStream {
    let aggregation: Aggregation = spec.aggregation.clone().expect("aggregation");
    let output = output_columns(
        &columns,
        &MergeSpec {
            hidden: 0,
            ..spec.clone()
        },
    );
    let future = async move {
        let group_columns: Vec<usize> = aggregation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == ColumnMerge::Group)
            .map(|(i, _)| i)
            .collect();
        // Groups are told apart by value, as PostgreSQL does (`1.0` and `1.00` are one group).
        let mut groups: BTreeMap<Vec<Ordered>, usize> = BTreeMap::new();
        let mut states: Vec<Vec<Accumulator>> = Vec::new();
        for mut cursor in cursors {
            while let Some(row) = cursor.next_row().await? {
                let fields = split_fields(&row.data);
                let key: Vec<Ordered> = group_columns
                    .iter()
                    .map(|i| {
                        let column = &columns[*i];
                        let raw = fields.get(*i).copied().flatten();
                        Ordered(decode(column.type_oid, column.format, raw))
                    })
                    .collect();
                let index = *groups.entry(key).or_insert_with(|| {
                    states.push(new_state(&aggregation));
                    states.len() - 1
                });
                let state = &mut states[index];
                for (i, merge) in aggregation.columns.iter().enumerate() {
                    let raw = fields.get(i).copied().flatten();
                    let column = &columns[i];
                    match (&mut state[i], merge) {
                        (Accumulator::Raw(slot), _) => *slot = raw.map(|b| b.to_vec()),
                        (Accumulator::Distinct(seen), _) => {
                            if let Some(bytes) = raw {
                                seen.insert(Ordered(decode(
                                    column.type_oid,
                                    column.format,
                                    Some(bytes),
                                )));
                            }
                        }
                        (Accumulator::Total(total), _) => {
                            let value = decode(column.type_oid, column.format, raw);
                            *total = add(std::mem::replace(total, Value::Null), value)?;
                        }
                        (Accumulator::Extreme(best), merge) => {
                            let Some(bytes) = raw else { continue };
                            let value = decode(column.type_oid, column.format, Some(bytes));
                            let better = match best {
                                None => true,
                                Some((current, _)) => {
                                    let o = values::compare(&value, current);
                                    if *merge == ColumnMerge::Min {
                                        o == Ordering::Less
                                    } else {
                                        o == Ordering::Greater
                                    }
                                }
                            };
                            if better {
                                *best = Some((value, bytes.to_vec()));
                            }
                        }
                    }
                }
            }
        }
        if states.is_empty() && aggregation.global {
            // An aggregate without GROUP BY has one row even over no rows.
            states.push(new_state(&aggregation));
        }
        // Final values per group.
        let mut rows: Vec<(Vec<Value>, Row)> = Vec::with_capacity(states.len());
        for state in states {
            let mut final_values: Vec<Value> = Vec::with_capacity(state.len());
            let mut encoded: Vec<Option<Vec<u8>>> = Vec::with_capacity(state.len());
            for (i, merge) in aggregation.columns.iter().enumerate() {
                let column = &columns[i];
                let out = &output[i];
                let (value, bytes) = match (&state[i], merge) {
                    (Accumulator::Raw(raw), _) => (
                        decode(column.type_oid, column.format, raw.as_deref()),
                        raw.clone(),
                    ),
                    (Accumulator::Extreme(best), _) => match best {
                        Some((v, b)) => (v.clone(), Some(b.clone())),
                        None => (Value::Null, None),
                    },
                    (Accumulator::Distinct(seen), _) => {
                        let count = Value::Int(seen.len() as i64);
                        let bytes = values::encode(&count, out.type_oid, out.format);
                        (count, bytes)
                    }
                    (Accumulator::Total(total), ColumnMerge::Count) => {
                        let total = if *total == Value::Null {
                            Value::Int(0)
                        } else {
                            total.clone()
                        };
                        let bytes = values::encode(&total, out.type_oid, out.format);
                        (total, bytes)
                    }
                    (Accumulator::Total(sum), ColumnMerge::Avg { count }) => {
                        let count = match &state[*count] {
                            Accumulator::Total(Value::Int(c)) => *c,
                            _ => 0,
                        };
                        let value = if count == 0 {
                            Value::Null
                        } else {
                            match sum {
                                Value::Float(s) => Value::Float(s / count as f64),
                                Value::Int(s) => Decimal::from_i64(*s)
                                    .div_pg(Decimal::from_i64(count))
                                    .map(Value::Numeric)
                                    .unwrap_or(Value::Null),
                                Value::Numeric(s) => s
                                    .div_pg(Decimal::from_i64(count))
                                    .map(Value::Numeric)
                                    .unwrap_or(Value::Null),
                                _ => Value::Null,
                            }
                        };
                        let bytes = values::encode(&value, out.type_oid, out.format);
                        (value, bytes)
                    }
                    (Accumulator::Total(total), _) => {
                        let bytes = values::encode(total, out.type_oid, out.format);
                        (total.clone(), bytes)
                    }
                };
                final_values.push(value);
                encoded.push(bytes);
            }
            if let Some(having) = &aggregation.having
                && !evaluate(having, &final_values)
            {
                continue;
            }
            let fields: Vec<Option<&[u8]>> = encoded.iter().map(|b| b.as_deref()).collect();
            rows.push((final_values, build_row(&fields)));
        }
        if !spec.order.is_empty() {
            let width = output.len();
            rows.sort_by(|(a, _), (b, _)| {
                let keys_a: Vec<Value> = spec
                    .order
                    .iter()
                    .map(|k| a[k.column.resolve(width)].clone())
                    .collect();
                let keys_b: Vec<Value> = spec
                    .order
                    .iter()
                    .map(|k| b[k.column.resolve(width)].clone())
                    .collect();
                compare_keys(&keys_a, &keys_b, &spec.order)
            });
        }
        Ok::<_, RouterError>(rows.into_iter().map(|(_, row)| Ok(row)).collect::<Vec<_>>())
    };
    stream::once(future)
        .flat_map(|result| match result {
            Ok(rows) => stream::iter(rows).boxed(),
            Err(error) => stream::iter(vec![Err(error)]).boxed(),
        })
        .boxed()
}
