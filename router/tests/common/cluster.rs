//! PostgresCluster specs the router's Kubernetes-mode tests write, as the operator would.

use api::postgres_cluster::{
    PostgresClusterSpec, ShardKeyType, ShardedTableSpec, ShardingSpec, TableGroupSpec, TlsMode,
};
use api::sharding::VindexKind;

/// `orders`, sharded by `customer_id` in table group `customers`.
pub fn orders() -> ShardedTableSpec {
    ShardedTableSpec {
        name: "orders".into(),
        table_group: "customers".into(),
        shard_key: "customer_id".into(),
        lookups: Vec::new(),
    }
}

/// A 2-shard cluster's spec with one hashed bigint table group, `customers`.
pub fn two_shards(
    tls: TlsMode,
    sharded_tables: Vec<ShardedTableSpec>,
    reference_tables: Vec<String>,
) -> PostgresClusterSpec {
    let mut spec = PostgresClusterSpec::with_image(1, "example.org/pg:18");
    spec.tls.mode = tls;
    spec.sharding = Some(ShardingSpec {
        shards: 2,
        router: Default::default(),
        table_groups: vec![TableGroupSpec {
            name: "customers".into(),
            vindex: VindexKind::Hash,
            key_type: ShardKeyType::Bigint,
        }],
        sharded_tables,
        reference_tables,
    });
    spec
}
