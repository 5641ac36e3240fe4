//! Pure decisions of a split: the split point, the names of the replication objects (derived
//! from the job's uid, so every step can be repeated after a restart), and the SQL predicate
//! "this row's shard key falls in [start, end)" computed exactly as pg-router computes it.

use api::postgres_cluster::ShardKeyType;
use api::sharding::VindexKind;
use router::plan::{quote_ident, quote_literal};
use router::vindex::HASH_PARTITION_SEED;

/// What `hash_combine64(0, h)` adds to the hash of a one-column key (PostgreSQL's partition
/// hash of a single key is `h + 0x49a0f4dd15e5a8e3`, wrapping; see `router::vindex`).
const COMBINE_OFFSET: u64 = 0x49a0_f4dd_15e5_a8e3;
const TWO_63: i128 = 1i128 << 63;
const TWO_64: i128 = 1i128 << 64;

/// Lower bound of a range as a number (`None` is the lowest 64-bit value).
pub fn lower(start: Option<i64>) -> i128 {
    start.map_or(-TWO_63, i128::from)
}

/// Upper bound of a range as a number (`None` is one past the highest 64-bit value).
pub fn upper(end: Option<i64>) -> i128 {
    end.map_or(TWO_63, i128::from)
}

/// The split point: `requested` when it lies strictly inside `[start, end)`, else the middle.
/// The error says what is wrong, for the job's condition.
pub fn split_point(
    start: Option<i64>,
    end: Option<i64>,
    requested: Option<i64>,
) -> Result<i64, String> {
    let (low, high) = (lower(start), upper(end));
    let show = |bound: Option<i64>, open: &str| bound.map_or(open.to_string(), |b| b.to_string());
    let range = format!("[{}, {})", show(start, "-2^63"), show(end, "2^63"));
    let point = match requested {
        Some(point) => i128::from(point),
        None => low + (high - low) / 2,
    };
    if point <= low || point >= high {
        return Err(match requested {
            Some(point) => format!(
                "spec.splitPoint {point} is not strictly inside the source range {range}: choose a hash h with start < h < end"
            ),
            None => format!("the source range {range} is too narrow to split"),
        });
    }
    Ok(point as i64)
}

/// Name of the slot, publication and subscription of the job with `uid` (lower case letters,
/// digits and `_`, within PostgreSQL's 63 bytes).
pub fn replication_name(uid: &str) -> String {
    let compact: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("pgsplit_{compact}")
}

/// Name of the table the job uses as a replication barrier (on both shards).
pub fn barrier_table(uid: &str) -> String {
    format!("{}_barrier", replication_name(uid))
}

/// Name of the fence trigger and its function (kept on the source after the split).
pub fn fence_name(uid: &str) -> String {
    format!("{}_fence", replication_name(uid))
}

/// Name of the ShardRange that holds the moving half while the job runs (and after).
pub fn moving_range_name(job: &str) -> String {
    format!("{job}-moving")
}

/// A table name as SQL: `schema.table` quoted part by part, a bare name quoted whole.
pub fn table_sql(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// A `[low, high)` piece of a 64-bit value space; `None` ends are open.
type Piece = (Option<i64>, Option<i64>);

/// The range `[start, end)` of the row hash as conditions on the raw hash function result
/// (`hashint8extended`/`hashtextextended` with the partition seed): the row hash is the raw
/// hash plus [`COMBINE_OFFSET`] (wrapping), so the range shifts by that offset and may wrap
/// around the end of the signed space into two pieces, which are OR-ed.
fn raw_hash_pieces(start: Option<i64>, end: Option<i64>) -> Vec<Piece> {
    let (low, high) = (lower(start), upper(end));
    let length = high - low;
    if length >= TWO_64 {
        return vec![(None, None)];
    }
    let wrap = |x: i128| -> i128 { (x + TWO_63).rem_euclid(TWO_64) - TWO_63 };
    let shifted = wrap(low - i128::from(COMBINE_OFFSET));
    let shifted_end = shifted + length;
    let bound = |x: i128| (x > -TWO_63).then_some(x as i64);
    if shifted_end <= TWO_63 {
        vec![(
            bound(shifted),
            (shifted_end < TWO_63).then_some(shifted_end as i64),
        )]
    } else {
        vec![
            (bound(shifted), None),
            (None, Some(wrap(shifted_end) as i64)),
        ]
    }
}

/// The SQL expression of the raw partition hash of `key` (an SQL expression of the shard key).
fn raw_hash_sql(key: &str, key_type: ShardKeyType) -> String {
    let seed = HASH_PARTITION_SEED as i64;
    match key_type {
        ShardKeyType::Bigint => format!("hashint8extended(({key})::bigint, {seed})"),
        ShardKeyType::Text => format!("hashtextextended(({key})::text, {seed})"),
    }
}

fn pieces_sql(value: &str, pieces: &[Piece]) -> String {
    let rendered: Vec<String> = pieces
        .iter()
        .map(|(low, high)| match (low, high) {
            (None, None) => "true".to_string(),
            (Some(low), None) => format!("{value} >= ({low})::bigint"),
            (None, Some(high)) => format!("{value} < ({high})::bigint"),
            (Some(low), Some(high)) => {
                format!("({value} >= ({low})::bigint AND {value} < ({high})::bigint)")
            }
        })
        .collect();
    format!("({})", rendered.join(" OR "))
}

/// SQL condition, true for a row whose shard key `key` (an SQL expression, for example a
/// quoted column) lies in `[start, end)` as pg-router places keys: the partition hash for the
/// `hash` vindex, the key itself for `range`. Only immutable built-in functions, so it also
/// serves as a publication row filter. A NULL key matches nothing.
pub fn range_predicate(
    key: &str,
    key_type: ShardKeyType,
    vindex: VindexKind,
    start: Option<i64>,
    end: Option<i64>,
) -> String {
    match vindex {
        VindexKind::Range => pieces_sql(&format!("({key})::bigint"), &[(start, end)]),
        _ => pieces_sql(&raw_hash_sql(key, key_type), &raw_hash_pieces(start, end)),
    }
}

/// Text of the error the fence raises on the source for a write to the moved range.
pub fn fence_message(
    start: Option<i64>,
    end: Option<i64>,
    group: &str,
    target: &str,
    epoch: i64,
) -> String {
    let show = |bound: Option<i64>, open: &str| bound.map_or(open.to_string(), |b| b.to_string());
    format!(
        "range [{}, {}) of table group {group} moved to {target} (routing epoch {epoch}): retry",
        show(start, "-2^63"),
        show(end, "2^63")
    )
}

/// Text of the error the fence raises while a split freezes the range to verify it.
pub fn verify_fence_message(start: Option<i64>, end: Option<i64>, group: &str) -> String {
    let show = |bound: Option<i64>, open: &str| bound.map_or(open.to_string(), |b| b.to_string());
    format!(
        "range [{}, {}) of table group {group} is paused for a split's verification: retry",
        show(start, "-2^63"),
        show(end, "2^63")
    )
}

/// The fence: a trigger function refusing INSERT, UPDATE and DELETE of rows whose key (the
/// column named by the trigger's first argument) lies in the moved range, with SQLSTATE 40001
/// so that clients and routers retry (by then on the new layout). Replication apply and the
/// clean-up run with `session_replication_role = replica`, where ordinary triggers do not fire.
pub fn fence_function_sql(
    function: &str,
    key_type: ShardKeyType,
    vindex: VindexKind,
    range: (Option<i64>, Option<i64>),
    message: &str,
) -> String {
    let predicate = range_predicate("k", key_type, vindex, range.0, range.1);
    format!(
        "CREATE OR REPLACE FUNCTION public.{function}() RETURNS trigger LANGUAGE plpgsql AS $fence$
DECLARE k text;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    k := to_jsonb(OLD) ->> TG_ARGV[0];
    IF {predicate} THEN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = {message}; END IF;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    k := to_jsonb(NEW) ->> TG_ARGV[0];
    IF {predicate} THEN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = {message}; END IF;
    RETURN NEW;
  END IF;
  RETURN OLD;
END
$fence$",
        function = quote_ident(function),
        message = quote_literal(message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use router::vindex::{KeyValue, hashint8extended, key_hash};

    fn in_pieces(raw: i64, pieces: &[Piece]) -> bool {
        pieces.iter().any(|(low, high)| {
            low.is_none_or(|low| raw >= low) && high.is_none_or(|high| raw < high)
        })
    }

    #[test]
    fn the_raw_hash_pieces_select_exactly_the_keys_the_router_places_in_the_range() {
        let bounds = [
            (None, None),
            (None, Some(0)),
            (Some(0), None),
            (
                Some(-4_611_686_018_427_387_904),
                Some(4_611_686_018_427_387_904),
            ),
            (Some(i64::MIN + 5), Some(-7)),
            (Some(3_000_000_000_000_000_000), None),
            (Some(-100), Some(i64::MAX)),
        ];
        for (start, end) in bounds {
            let pieces = raw_hash_pieces(start, end);
            for key in -3000i64..3000 {
                let row = key_hash(&KeyValue::Int(key)) as i64;
                let raw = hashint8extended(key, HASH_PARTITION_SEED) as i64;
                let expected = lower(start) <= i128::from(row) && i128::from(row) < upper(end);
                assert_eq!(
                    in_pieces(raw, &pieces),
                    expected,
                    "key {key} range {start:?}..{end:?}"
                );
            }
        }
    }

    #[test]
    fn the_split_point_is_the_middle_or_a_requested_point_strictly_inside() {
        assert_eq!(split_point(None, Some(0), None), Ok(-(1i64 << 62)));
        assert_eq!(split_point(None, None, None), Ok(0));
        assert_eq!(split_point(Some(10), Some(20), Some(11)), Ok(11));
        let outside = split_point(Some(10), Some(20), Some(20)).unwrap_err();
        assert!(outside.contains("not strictly inside"), "{outside}");
        assert!(split_point(Some(10), Some(11), None).is_err());
    }

    #[test]
    fn names_come_from_the_uid_and_fit_postgresql() {
        let name = replication_name("6F1c2d3e-0000-4444-8888-aaaabbbbcccc");
        assert_eq!(name, "pgsplit_6f1c2d3e000044448888aaaabbbbcccc");
        assert!(fence_name("6F1c2d3e-0000-4444-8888-aaaabbbbcccc").len() <= 63);
        assert_eq!(table_sql("app.orders"), "\"app\".\"orders\"");
    }
}
