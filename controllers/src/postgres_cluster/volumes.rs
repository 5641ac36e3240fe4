//! Volume growth: PVC templates of a StatefulSet cannot change, so a larger `storage.size` or
//! `walStorage.size` is applied to the existing PersistentVolumeClaims directly (pure part).

use api::postgres_cluster::PostgresCluster;

use super::builders::{DATA_VOLUME, WAL_VOLUME};

/// Bytes of a Kubernetes quantity such as `10Gi`, `500M`, `1.5Gi` or `1073741824`; `None` when
/// it cannot be read.
pub fn quantity_bytes(quantity: &str) -> Option<f64> {
    let quantity = quantity.trim();
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        _ => return None,
    };
    Some(number * multiplier)
}

/// The size the claim `claim` (named `<template>-<pod>`) should request, when it should grow.
pub fn growth(cluster: &PostgresCluster, claim: &str, current: &str) -> Option<String> {
    let desired = if claim.starts_with(&format!("{DATA_VOLUME}-")) {
        cluster.spec.storage.size.clone()
    } else if claim.starts_with(&format!("{WAL_VOLUME}-")) {
        cluster.spec.wal_storage.as_ref()?.size.clone()
    } else {
        return None;
    };
    (quantity_bytes(&desired)? > quantity_bytes(current)?).then_some(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::postgres_cluster::PostgresClusterSpec;

    #[test]
    fn quantities_in_binary_and_decimal_units() {
        assert_eq!(quantity_bytes("1Gi"), Some(1073741824.0));
        assert_eq!(quantity_bytes("1024Mi"), quantity_bytes("1Gi"));
        assert_eq!(quantity_bytes("500M"), Some(5e8));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536.0));
        assert_eq!(quantity_bytes("42"), Some(42.0));
        assert_eq!(quantity_bytes("10Xi"), None);
    }

    #[test]
    fn claims_grow_to_the_spec_and_never_shrink() {
        let mut cluster = PostgresCluster::new("db", PostgresClusterSpec::with_image(1, "pg"));
        cluster.spec.storage.size = "2Gi".into();
        assert_eq!(growth(&cluster, "pgdata-db-0", "1Gi"), Some("2Gi".into()));
        assert_eq!(growth(&cluster, "pgdata-db-0", "2048Mi"), None);
        assert_eq!(growth(&cluster, "pgdata-db-0", "4Gi"), None);
        assert_eq!(
            growth(&cluster, "pg-wal-db-0", "1Gi"),
            None,
            "no WAL volume in the spec"
        );
        cluster.spec.wal_storage = Some(api::common::StorageSpec {
            size: "3Gi".into(),
            storage_class: None,
        });
        assert_eq!(growth(&cluster, "pg-wal-db-0", "1Gi"), Some("3Gi".into()));
    }
}
