//! The pure half of Kubernetes mode: a [`Topology`] from a sharded PostgresCluster's spec (table
//! groups, sharded and reference tables), its ShardRange objects and the shards' primaries.
//!
//! ShardRange bounds are positions in the signed 64-bit space: for the `hash` vindex, the
//! partition hash of the key (the router's `u64` hash read as two's complement, which is what
//! PostgreSQL's `bigint` holds for the same bits); for `range`, the key value itself.

use std::collections::{BTreeMap, HashMap};

use api::contract;
use api::postgres_cluster::{PostgresCluster, ShardKeyType, TlsMode};
use api::sharding::{ShardRange, ShardRangeState, VindexKind as RangeVindex};

use crate::topology::{
    Endpoint, KeyType, PausedRange, ShardedTable, TableGroup, Topology, TopologyError,
    TopologyError::Invalid,
};
use crate::vindex::{HashRanges, Vindex};

/// Name of the child PostgresCluster of shard `shard` of `cluster` (the operator's naming).
pub fn shard_cluster_name(cluster: &str, shard: &str) -> String {
    format!("{cluster}-{shard}")
}

/// Sort key of a shard name: `shard-<n>` by number first, then any other name. Shard indexes
/// must stay stable across reloads (2PC gids name their coordinator by index), and new shards
/// take higher numbers.
fn shard_order(name: &str) -> (u64, String) {
    let number = name
        .strip_prefix("shard-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    (number, name.to_string())
}

/// The `[start, end)` pieces of the unsigned hash space a signed range covers (one piece, or two
/// when it crosses zero, since negative values are the upper half of the unsigned space).
fn unsigned_pieces(start: Option<i64>, end: Option<i64>) -> Vec<(u128, u128)> {
    let start = i128::from(start.unwrap_or(i64::MIN));
    let end = end.map_or(1i128 << 63, i128::from);
    let unsigned = |x: i128| {
        if x < 0 {
            (x + (1i128 << 64)) as u128
        } else {
            x as u128
        }
    };
    if start < 0 && end > 0 {
        vec![(unsigned(start), 1u128 << 64), (0, end as u128)]
    } else if start < 0 {
        // Both negative: [start, end) maps to [2^64 + start, 2^64 + end), with end 0 -> 2^64.
        vec![(unsigned(start), (end + (1i128 << 64)) as u128)]
    } else {
        vec![(start as u128, end as u128)]
    }
}

/// Turns on TLS to every shard of `topology` when the cluster speaks TLS (its `spec.tls.mode`
/// is not `Disabled`, and the shards, its child clusters, inherit it): each shard's certificate
/// must chain to its cluster's CA (`ca_pems`: child cluster name -> the `ca.crt` of its
/// `<child>-ca` Secret) and name its `-rw` Service, `<child>-rw.<namespace>.svc`.
pub fn secure(
    mut topology: Topology,
    cluster: &PostgresCluster,
    ca_pems: &BTreeMap<String, String>,
) -> Result<Topology, TopologyError> {
    if cluster.spec.tls.mode == TlsMode::Disabled {
        return Ok(topology);
    }
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
    for endpoint in &mut topology.shards {
        let child = shard_cluster_name(&name, &endpoint.name);
        let pem = ca_pems.get(&child).ok_or_else(|| {
            Invalid(format!(
                "shard {} speaks TLS only and its CA Secret {} is not there yet",
                endpoint.name,
                contract::tls_ca_secret(&child)
            ))
        })?;
        let server_name = format!("{}.{namespace}.svc", contract::rw_service(&child));
        let tls = crate::backend::tls::EndpointTls::new(pem, &server_name).map_err(|e| {
            Invalid(format!(
                "shard {}: Secret {}: {e}",
                endpoint.name,
                contract::tls_ca_secret(&child)
            ))
        })?;
        endpoint.tls = Some(tls);
    }
    Ok(topology)
}

/// Builds the topology. `primaries` maps a shard's child cluster name to its primary endpoint;
/// a shard a range names without a primary is an error (the caller keeps the topology it has).
pub fn build(
    cluster: &PostgresCluster,
    ranges: &[ShardRange],
    primaries: &BTreeMap<String, (String, u16)>,
) -> Result<Topology, TopologyError> {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let sharding = cluster
        .spec
        .sharding
        .as_ref()
        .ok_or_else(|| Invalid(format!("PostgresCluster {name} has no spec.sharding")))?;
    let live: Vec<&ShardRange> = ranges
        .iter()
        .filter(|r| r.spec.cluster.name == name && r.spec.state != ShardRangeState::Retired)
        .collect();

    // Shards: every shard of the spec, and any a range names (a split's new shard).
    let mut shard_names: Vec<String> = (0..sharding.shards).map(|i| format!("shard-{i}")).collect();
    for range in &live {
        if !shard_names.contains(&range.spec.shard) {
            shard_names.push(range.spec.shard.clone());
        }
    }
    shard_names.sort_by_key(|n| shard_order(n));
    let mut shards = Vec::new();
    for shard in &shard_names {
        let child = shard_cluster_name(&name, shard);
        let (host, port) = primaries.get(&child).ok_or_else(|| {
            Invalid(format!(
                "shard {shard} (PostgresCluster {child}) has no ready primary endpoint"
            ))
        })?;
        shards.push(Endpoint {
            name: shard.clone(),
            host: host.clone(),
            port: *port,
            tls: None,
        });
    }
    let index_of = |shard: &str| shard_names.iter().position(|n| n == shard).unwrap_or(0);

    let mut groups = Vec::new();
    for group in &sharding.table_groups {
        let mut of_group: Vec<&&ShardRange> = live
            .iter()
            .filter(|r| r.spec.table_group == group.name)
            .collect();
        if of_group.is_empty() {
            return Err(Invalid(format!(
                "table group {} has no ShardRange yet",
                group.name
            )));
        }
        if let Some(other) = of_group.iter().find(|r| r.spec.vindex != group.vindex) {
            return Err(Invalid(format!(
                "ShardRange {} has vindex {:?} but table group {} has {:?}",
                other.metadata.name.clone().unwrap_or_default(),
                other.spec.vindex,
                group.name,
                group.vindex
            )));
        }
        of_group.sort_by_key(|r| r.spec.start.map_or(i128::MIN, i128::from));
        // Cover the signed space exactly once, whatever the vindex.
        let mut expected = None;
        for (position, range) in of_group.iter().enumerate() {
            if range.spec.start != expected {
                return Err(Invalid(format!(
                    "ShardRanges of table group {} leave a gap or overlap at {} (ShardRange {})",
                    group.name,
                    range
                        .spec
                        .start
                        .map_or("the lowest value".into(), |s| s.to_string()),
                    range.metadata.name.clone().unwrap_or_default()
                )));
            }
            match range.spec.end {
                Some(end) => expected = Some(end),
                None => expected = None,
            }
            if range.spec.end.is_none() && position + 1 < of_group.len() {
                return Err(Invalid(format!(
                    "ShardRanges of table group {} overlap at the upper end",
                    group.name
                )));
            }
        }
        if of_group[of_group.len() - 1].spec.end.is_some() {
            return Err(Invalid(format!(
                "ShardRanges of table group {} do not reach the upper end",
                group.name
            )));
        }
        let vindex = match group.vindex {
            RangeVindex::Hash => {
                let mut starts: Vec<(u64, usize)> = Vec::new();
                for range in &of_group {
                    for (start, _end) in unsigned_pieces(range.spec.start, range.spec.end) {
                        starts.push((start as u64, index_of(&range.spec.shard)));
                    }
                }
                starts.sort();
                Vindex::Hash(HashRanges { starts })
            }
            RangeVindex::Range => Vindex::Range(
                of_group
                    .iter()
                    .map(|r| (r.spec.start.unwrap_or(i64::MIN), index_of(&r.spec.shard)))
                    .collect(),
            ),
            other => {
                return Err(Invalid(format!(
                    "table group {} has vindex {other:?}, which ShardRanges do not drive",
                    group.name
                )));
            }
        };
        groups.push(TableGroup {
            name: group.name.clone(),
            key_type: match group.key_type {
                ShardKeyType::Bigint => KeyType::Bigint,
                ShardKeyType::Text => KeyType::Text,
            },
            vindex,
        });
    }
    // A paused range still routes (reads go to its shard); its writes wait for the next
    // topology in which it is active again (see `frontend::session::pause`).
    let paused = live
        .iter()
        .filter(|r| r.spec.state == ShardRangeState::WritePaused)
        .filter_map(|r| {
            Some(PausedRange {
                name: r.metadata.name.clone().unwrap_or_default(),
                group: groups.iter().position(|g| g.name == r.spec.table_group)?,
                start: r.spec.start,
                end: r.spec.end,
            })
        })
        .collect();
    let mut tables = HashMap::new();
    for table in &sharding.sharded_tables {
        let group = groups
            .iter()
            .position(|g| g.name == table.table_group)
            .ok_or_else(|| {
                Invalid(format!(
                    "sharded table {} names unknown table group {}",
                    table.name, table.table_group
                ))
            })?;
        tables.insert(
            table.name.to_lowercase(),
            ShardedTable {
                group,
                shard_key: table.shard_key.to_lowercase(),
                lookups: table
                    .lookups
                    .iter()
                    .map(|lookup| (lookup.column.to_lowercase(), lookup.table.to_lowercase()))
                    .collect(),
            },
        );
    }
    Ok(Topology {
        shards,
        groups,
        tables,
        reference_tables: sharding
            .reference_tables
            .iter()
            .map(|t| t.to_lowercase())
            .collect(),
        aggregates: Vec::new(),
        // Read from the shards by the refresh loop; a reload keeps the ones already read.
        columns: Default::default(),
        paused,
        epoch: live.iter().map(|r| r.spec.epoch).max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vindex::KeyValue;
    use api::common::ClusterReference;
    use api::postgres_cluster::{PostgresClusterSpec, ShardingSpec, TableGroupSpec};
    use api::sharding::ShardRangeSpec;

    fn cluster() -> PostgresCluster {
        let mut spec = PostgresClusterSpec::with_image(1, "pg");
        spec.sharding = Some(ShardingSpec {
            shards: 2,
            router: Default::default(),
            table_groups: vec![TableGroupSpec {
                name: "g".into(),
                vindex: RangeVindex::Hash,
                key_type: ShardKeyType::Bigint,
            }],
            sharded_tables: vec![api::postgres_cluster::ShardedTableSpec {
                name: "t".into(),
                table_group: "g".into(),
                shard_key: "id".into(),
                lookups: Vec::new(),
            }],
            reference_tables: vec!["r".into()],
        });
        PostgresCluster::new("db", spec)
    }

    fn range(shard: &str, start: Option<i64>, end: Option<i64>) -> ShardRange {
        ShardRange::new(
            &format!("db-g-{shard}-{start:?}"),
            ShardRangeSpec {
                cluster: ClusterReference { name: "db".into() },
                table_group: "g".into(),
                shard: shard.into(),
                start,
                end,
                state: ShardRangeState::Active,
                vindex: RangeVindex::Hash,
                epoch: 0,
            },
        )
    }

    fn primaries() -> BTreeMap<String, (String, u16)> {
        BTreeMap::from([
            ("db-shard-0".into(), ("10.0.0.1".into(), 5432)),
            ("db-shard-1".into(), ("10.0.0.2".into(), 5432)),
        ])
    }

    #[test]
    fn signed_ranges_become_unsigned_hash_ranges() {
        let topology = build(
            &cluster(),
            &[
                range("shard-0", None, Some(0)),
                range("shard-1", Some(0), None),
            ],
            &primaries(),
        )
        .unwrap();
        let Vindex::Hash(ranges) = &topology.groups[0].vindex else {
            panic!("hash vindex expected")
        };
        // Signed [0, max] is unsigned [0, 2^63); signed negatives are the upper half.
        assert_eq!(ranges.shard_for(5), 1);
        assert_eq!(ranges.shard_for(u64::MAX), 0);
        assert_eq!(ranges.shard_for(1 << 63), 0);
        assert_eq!(topology.shards[1].host, "10.0.0.2");
        assert!(topology.is_reference("r"));
        assert_eq!(topology.tables["t"].shard_key, "id");
    }

    #[test]
    fn a_range_crossing_zero_is_two_unsigned_pieces() {
        let topology = build(
            &cluster(),
            &[
                range("shard-0", None, Some(-100)),
                range("shard-1", Some(-100), Some(100)),
                range("shard-0", Some(100), None),
            ],
            &primaries(),
        )
        .unwrap();
        let Vindex::Hash(ranges) = &topology.groups[0].vindex else {
            panic!()
        };
        assert_eq!(ranges.shard_for(0), 1);
        assert_eq!(ranges.shard_for(99), 1);
        assert_eq!(ranges.shard_for(100), 0);
        assert_eq!(ranges.shard_for((-100i64) as u64), 1);
        assert_eq!(ranges.shard_for((-101i64) as u64), 0);
    }

    #[test]
    fn paused_ranges_still_route_and_the_epoch_is_the_highest() {
        let mut paused = range("shard-1", Some(0), None);
        paused.metadata.name = Some("db-g-moving".into());
        paused.spec.state = ShardRangeState::WritePaused;
        paused.spec.epoch = 3;
        let topology = build(
            &cluster(),
            &[range("shard-0", None, Some(0)), paused],
            &primaries(),
        )
        .unwrap();
        assert_eq!(topology.epoch, 3);
        assert_eq!(
            topology.paused,
            vec![PausedRange {
                name: "db-g-moving".into(),
                group: 0,
                start: Some(0),
                end: None,
            }]
        );
        // A key of the paused range still reads from its shard; one of the other is not paused.
        let moving = (0..)
            .map(KeyValue::Int)
            .find(|k| (crate::vindex::key_hash(k) as i64) >= 0)
            .unwrap();
        let staying = (0..)
            .map(KeyValue::Int)
            .find(|k| (crate::vindex::key_hash(k) as i64) < 0)
            .unwrap();
        assert_eq!(topology.groups[0].vindex.shard_for(&moving), Ok(1));
        assert!(topology.paused_range(0, &moving).is_some());
        assert!(topology.paused_range(0, &staying).is_none());
    }

    #[test]
    fn gaps_and_missing_primaries_are_refused() {
        let gap = build(
            &cluster(),
            &[
                range("shard-0", None, Some(0)),
                range("shard-1", Some(10), None),
            ],
            &primaries(),
        )
        .unwrap_err()
        .to_string();
        assert!(gap.contains("gap or overlap"), "{gap}");
        let mut only_one = primaries();
        only_one.remove("db-shard-1");
        let missing = build(
            &cluster(),
            &[
                range("shard-0", None, Some(0)),
                range("shard-1", Some(0), None),
            ],
            &only_one,
        )
        .unwrap_err()
        .to_string();
        assert!(missing.contains("no ready primary"), "{missing}");
    }
}
