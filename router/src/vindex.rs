//! Vindexes: functions from a shard-key value to the shard that owns it.
//!
//! The hash vindex is PostgreSQL's own partition hash: the extended hash function of the key's
//! type (`hashint8extended`, `hashtextextended`) seeded with `HASH_PARTITION_SEED`, combined the
//! way `PARTITION BY HASH` combines columns. So `satisfies_hash_partition(parent, m, hash % m,
//! key)` agrees with the router, and placement can be checked in SQL. Shards own ranges of the
//! 64-bit hash space (not `hash % shards`), so splitting one range moves one shard's rows only.

use std::collections::BTreeMap;

/// Seed PostgreSQL passes to every extended hash function for hash partitioning.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// A shard-key value as the vindex sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    /// smallint / integer / bigint.
    Int(i64),
    /// text / varchar (UTF-8 bytes, deterministic collation).
    Text(String),
}

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// PostgreSQL's `hash_bytes_uint32_extended` (Bob Jenkins' lookup3 on one word, with a seed).
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = 0x9e37_79b9u32.wrapping_add(4).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// PostgreSQL's `hash_bytes_extended` (`hash_any_extended`), little-endian byte order.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    let init = 0x9e37_79b9u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let word = |k: &[u8]| u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
    let mut k = key;
    while k.len() >= 12 {
        a = a.wrapping_add(word(&k[0..4]));
        b = b.wrapping_add(word(&k[4..8]));
        c = c.wrapping_add(word(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 11 bytes; the lowest byte of c is reserved for the length.
    let len = k.len();
    if len >= 11 {
        c = c.wrapping_add((k[10] as u32) << 24);
    }
    if len >= 10 {
        c = c.wrapping_add((k[9] as u32) << 16);
    }
    if len >= 9 {
        c = c.wrapping_add((k[8] as u32) << 8);
    }
    if len >= 8 {
        b = b.wrapping_add((k[7] as u32) << 24);
    }
    if len >= 7 {
        b = b.wrapping_add((k[6] as u32) << 16);
    }
    if len >= 6 {
        b = b.wrapping_add((k[5] as u32) << 8);
    }
    if len >= 5 {
        b = b.wrapping_add(k[4] as u32);
    }
    if len >= 4 {
        a = a.wrapping_add((k[3] as u32) << 24);
    }
    if len >= 3 {
        a = a.wrapping_add((k[2] as u32) << 16);
    }
    if len >= 2 {
        a = a.wrapping_add((k[1] as u32) << 8);
    }
    if len >= 1 {
        a = a.wrapping_add(k[0] as u32);
    }
    final_mix(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// PostgreSQL's `hashint8extended` (also what `hashint4extended`/`hashint2extended` give for
/// the same logical value).
pub fn hashint8extended(value: i64, seed: u64) -> u64 {
    let mut lohalf = value as u32;
    let hihalf = (value >> 32) as u32;
    lohalf ^= if value >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(lohalf, seed)
}

/// PostgreSQL's `hash_combine64`.
pub fn hash_combine64(mut a: u64, b: u64) -> u64 {
    a ^= b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7);
    a
}

/// The partition hash PostgreSQL computes for a row whose partition key is `keys` (a NULL key
/// contributes nothing, as in `compute_partition_hash_value`).
pub fn partition_hash(keys: &[Option<&KeyValue>]) -> u64 {
    let mut row_hash = 0u64;
    for key in keys.iter().flatten() {
        let hash = match key {
            KeyValue::Int(value) => hashint8extended(*value, HASH_PARTITION_SEED),
            KeyValue::Text(value) => hash_bytes_extended(value.as_bytes(), HASH_PARTITION_SEED),
        };
        row_hash = hash_combine64(row_hash, hash);
    }
    row_hash
}

/// The partition hash of a single-column key.
pub fn key_hash(key: &KeyValue) -> u64 {
    partition_hash(&[Some(key)])
}

/// How a table group maps key values to shards (shard indexes into the topology's shard list).
#[derive(Clone, Debug)]
pub enum Vindex {
    /// Partition hash; shard `i` owns the half-open hash range `[starts[i], next start)`.
    Hash(HashRanges),
    /// Integer key ranges: `(lower bound inclusive, shard)`, sorted; keys below the first bound
    /// have no shard.
    Range(Vec<(i64, usize)>),
    /// A ring of virtual nodes (points in the 64-bit hash space) per shard; a key goes to the
    /// first point at or after its hash (wrapping around).
    ConsistentHash(BTreeMap<u64, usize>),
}

/// Ranges of the 64-bit hash space owned by shards.
#[derive(Clone, Debug)]
pub struct HashRanges {
    /// `(first hash owned, shard)`, sorted by first hash; the first entry starts at 0.
    pub starts: Vec<(u64, usize)>,
}

impl HashRanges {
    /// Splits the hash space into `shards` equal ranges, in shard order.
    pub fn equal(shards: usize) -> Self {
        let step = u64::MAX / shards as u64;
        let starts = (0..shards)
            .map(|i| (if i == 0 { 0 } else { step * i as u64 + 1 }, i))
            .collect();
        Self { starts }
    }

    /// The shard owning `hash`.
    pub fn shard_for(&self, hash: u64) -> usize {
        let index = self.starts.partition_point(|(start, _)| *start <= hash);
        self.starts[index.saturating_sub(1)].1
    }
}

/// Builds a consistent-hash ring with `points_per_shard` virtual nodes for each shard name.
pub fn consistent_ring(shard_names: &[String], points_per_shard: usize) -> BTreeMap<u64, usize> {
    let mut ring = BTreeMap::new();
    for (shard, name) in shard_names.iter().enumerate() {
        for point in 0..points_per_shard {
            let label = format!("{name}#{point}");
            ring.insert(
                hash_bytes_extended(label.as_bytes(), HASH_PARTITION_SEED),
                shard,
            );
        }
    }
    ring
}

/// Why a key has no shard.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VindexError {
    /// The range vindex has no range covering the key.
    #[error("no shard owns key {0:?} (no range of the range vindex covers it)")]
    NoRange(KeyValue),
    /// A range vindex needs an integer key.
    #[error("the range vindex needs an integer shard key, got {0:?}")]
    NotInteger(KeyValue),
}

impl Vindex {
    /// The shard that owns `key`.
    pub fn shard_for(&self, key: &KeyValue) -> Result<usize, VindexError> {
        match self {
            Vindex::Hash(ranges) => Ok(ranges.shard_for(key_hash(key))),
            Vindex::Range(bounds) => {
                let KeyValue::Int(value) = key else {
                    return Err(VindexError::NotInteger(key.clone()));
                };
                let index = bounds.partition_point(|(start, _)| *start <= *value);
                if index == 0 {
                    return Err(VindexError::NoRange(key.clone()));
                }
                Ok(bounds[index - 1].1)
            }
            Vindex::ConsistentHash(ring) => {
                let hash = key_hash(key);
                Ok(ring
                    .range(hash..)
                    .next()
                    .or_else(|| ring.iter().next())
                    .map(|(_, shard)| *shard)
                    .unwrap_or(0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_hash_does_not_depend_on_width() {
        // hashint4extended(5) == hashint8extended(5): PostgreSQL's cross-type guarantee.
        assert_eq!(
            hashint8extended(5, HASH_PARTITION_SEED),
            hash_uint32_extended(5, HASH_PARTITION_SEED)
        );
    }

    #[test]
    fn equal_ranges_cover_the_whole_space() {
        let ranges = HashRanges::equal(3);
        assert_eq!(ranges.shard_for(0), 0);
        assert_eq!(ranges.shard_for(u64::MAX), 2);
        assert_eq!(ranges.shard_for(u64::MAX / 3), 0);
        assert_eq!(ranges.shard_for(u64::MAX / 3 + 1), 1);
    }

    #[test]
    fn range_vindex_picks_the_covering_range() {
        let vindex = Vindex::Range(vec![(0, 0), (100, 1), (1000, 2)]);
        assert_eq!(vindex.shard_for(&KeyValue::Int(99)), Ok(0));
        assert_eq!(vindex.shard_for(&KeyValue::Int(100)), Ok(1));
        assert_eq!(vindex.shard_for(&KeyValue::Int(5000)), Ok(2));
        assert!(vindex.shard_for(&KeyValue::Int(-1)).is_err());
    }

    #[test]
    fn consistent_hash_moves_few_keys_when_a_shard_is_added() {
        let names: Vec<String> = (0..3).map(|i| format!("s{i}")).collect();
        let three = Vindex::ConsistentHash(consistent_ring(&names, 64));
        let mut four_names = names.clone();
        four_names.push("s3".into());
        let four = Vindex::ConsistentHash(consistent_ring(&four_names, 64));
        let moved = (0..10_000)
            .filter(|k| {
                let key = KeyValue::Int(*k);
                let before = three.shard_for(&key).unwrap();
                let after = four.shard_for(&key).unwrap();
                before != after && after != 3
            })
            .count();
        assert_eq!(moved, 0, "only keys moving to the new shard may move");
    }
}
