//! End to end, day-2 operations under the real controllers and the node agent, with the
//! operator installed by helm (see `common`): scaling 3 -> 5 -> 3 (claims, the
//! PodDisruptionBudget and the Services follow, connections through `-ro` spread over every
//! replica; a scale down past the primary switches over first), the operator killed in the middle of a reconcile (it converges, nothing is created
//! twice), and a rolling image update (replicas first, then a switchover, the old primary last,
//! no acknowledged write lost), a supervised update (replicas, then it waits for the user's
//! switchover before the primary), and a network partition of the primary's pod (a replica
//! takes over and the `-rw` Service follows; healed, the old primary rejoins as a replica; no
//! acknowledged write lost). Scenarios run in parallel in their own namespaces.
//!
//! Needs the workspace's `postgres-operator` and `pg-instance` binaries next to this test's
//! target folder (`cargo build -p controllers -p instance`; `cargo xtask test` builds them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{
    INSTANCE_IMAGE, OPERATOR_NAMESPACE, Writer, calm_failover, connect, connect_when_served,
    connect_writable, create_cluster, eventually, kill_operator, lost_writes, patch_spec,
    pod_is_ready, stack, superuser_login,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

/// Ready addresses behind a Service, from its EndpointSlices (the real EndpointSlice
/// controller's view).
async fn ready_endpoints(
    client: &kube::Client,
    namespace: &str,
    service: &str,
) -> anyhow::Result<BTreeSet<String>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let mut ready = BTreeSet::new();
    for slice in slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?
    {
        for endpoint in slice.endpoints {
            if endpoint.conditions.and_then(|c| c.ready).unwrap_or(true) {
                ready.extend(endpoint.addresses);
            }
        }
    }
    Ok(ready)
}

/// (expected pods, currently healthy) of the cluster's PodDisruptionBudget, as the disruption
/// controller reports them.
async fn budget(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(i32, i32, i32)> {
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let status = pdb.status.unwrap_or_default();
    Ok((
        status.expected_pods,
        status.current_healthy,
        status.disruptions_allowed,
    ))
}

async fn claim_names(client: &kube::Client, namespace: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect(),
    )
}

async fn pod_names(client: &kube::Client, namespace: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_3_to_5_to_3_moves_claims_budget_and_services_along() -> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-scaling";
    let clusters = create_cluster(
        &client,
        namespace,
        "sc",
        json!({"instances": 3, "failover": calm_failover()}),
    )
    .await?;
    // The three instances start one after the other while this binary's other scenarios run on
    // the same two cores: in a clean-clone CI run (2026-12-07 20:43) the third passed its
    // startup probe 175 s after the cluster was created, and the 180 s this waited ran out.
    e2e.wait_healthy(&clusters, "sc", None, Duration::from_secs(300))
        .await?;
    let password = superuser_login(&client, namespace, "sc").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("sc"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute("CREATE TABLE kept (id bigint PRIMARY KEY); INSERT INTO kept VALUES (1)")
        .await?;

    // 3 -> 5: two more pods and claims; the budget expects 5; -ro serves 4 replicas.
    patch_spec(&clusters, "sc", json!({"instances": 5})).await?;
    e2e.wait_healthy(&clusters, "sc", None, Duration::from_secs(240))
        .await?;
    let expected_claims: BTreeSet<String> = (0..5).map(|i| format!("pgdata-sc-{i}")).collect();
    assert_eq!(claim_names(&client, namespace).await?, expected_claims);
    eventually(
        "the budget to expect 5 healthy pods",
        Duration::from_secs(60),
        || async {
            let seen = budget(&client, namespace, "sc").await?;
            Ok(if seen == (5, 5, 1) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            })
        },
    )
    .await?;
    eventually(
        "-ro to serve the 4 replicas, -rw the primary",
        Duration::from_secs(60),
        || async {
            let ro = ready_endpoints(&client, namespace, &api::contract::ro_service("sc")).await?;
            let rw = ready_endpoints(&client, namespace, &api::contract::rw_service("sc")).await?;
            Ok(if ro.len() == 4 && rw.len() == 1 && ro.is_disjoint(&rw) {
                Ok(())
            } else {
                Err(format!("ro {ro:?}, rw {rw:?}"))
            })
        },
    )
    .await?;

    // The -ro Service spreads connections over every ready replica, as kube-proxy does.
    let ro = e2e.service_port(namespace, &api::contract::ro_service("sc"))?;
    let mut servers = BTreeSet::new();
    for _ in 0..8 {
        let reader = connect_when_served(ro, &password).await?;
        let row = reader
            .query_one("SELECT host(inet_server_addr()), pg_is_in_recovery()", &[])
            .await?;
        assert!(row.get::<_, bool>(1), "-ro reached the primary");
        servers.insert(row.get::<_, String>(0));
    }
    assert_eq!(
        servers.len(),
        4,
        "8 connections through -ro reached {servers:?}"
    );

    // The primary moves to the highest ordinal, so that scaling down must hand it over first.
    patch_spec(&clusters, "sc", json!({"switchoverTo": "sc-4"})).await?;
    eventually(
        "sc-4 to become primary",
        Duration::from_secs(120),
        || async {
            let status = clusters.get("sc").await?.status.unwrap_or_default();
            Ok(
                match (status.current_primary.as_deref(), status.phase.as_deref()) {
                    (Some("sc-4"), Some("Healthy")) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
            )
        },
    )
    .await?;
    connect_writable(rw, &password)
        .await?
        .execute("INSERT INTO kept VALUES (2)", &[])
        .await?;

    // 5 -> 3: the primary sc-4 hands over before its pod goes; the claims of sc-3 and sc-4 are
    // kept (whenScaled: Retain); the budget and the Services shrink with the pods.
    patch_spec(&clusters, "sc", json!({"instances": 3})).await?;
    let expected_pods: BTreeSet<String> = (0..3).map(|i| format!("sc-{i}")).collect();
    eventually("3 pods left", Duration::from_secs(180), || async {
        let pods = pod_names(&client, namespace).await?;
        Ok(if pods == expected_pods {
            Ok(())
        } else {
            Err(format!("{pods:?}"))
        })
    })
    .await?;
    let primary = e2e
        .wait_healthy(&clusters, "sc", None, Duration::from_secs(180))
        .await?;
    assert!(
        expected_pods.contains(&primary),
        "primary {primary} is gone"
    );
    assert_eq!(claim_names(&client, namespace).await?, expected_claims);
    eventually(
        "the budget to expect 3 healthy pods",
        Duration::from_secs(60),
        || async {
            let seen = budget(&client, namespace, "sc").await?;
            Ok(if seen == (3, 3, 1) {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            })
        },
    )
    .await?;
    eventually(
        "-ro to serve the 2 replicas left",
        Duration::from_secs(60),
        || async {
            let ro = ready_endpoints(&client, namespace, &api::contract::ro_service("sc")).await?;
            Ok(if ro.len() == 2 {
                Ok(())
            } else {
                Err(format!("{ro:?}"))
            })
        },
    )
    .await?;
    let rows: Vec<i64> = connect_when_served(rw, &password)
        .await?
        .query("SELECT id FROM kept ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2], "rows written before and during scaling");
    Ok(())
}

/// Every object of a namespace the operator owns, as `kind/name`.
async fn owned_objects(client: &kube::Client, namespace: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    macro_rules! collect {
        ($kind:ty, $label:expr) => {
            for object in Api::<$kind>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await?
            {
                if object
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|owners| owners.iter().any(|o| o.kind == "PostgresCluster"))
                {
                    names.push(format!(
                        "{}/{}",
                        $label,
                        object.metadata.name.unwrap_or_default()
                    ));
                }
            }
        };
    }
    collect!(StatefulSet, "StatefulSet");
    collect!(Service, "Service");
    collect!(Secret, "Secret");
    collect!(ConfigMap, "ConfigMap");
    collect!(PodDisruptionBudget, "PodDisruptionBudget");
    collect!(
        k8s_openapi::api::networking::v1::NetworkPolicy,
        "NetworkPolicy"
    );
    collect!(k8s_openapi::api::core::v1::ServiceAccount, "ServiceAccount");
    collect!(k8s_openapi::api::rbac::v1::Role, "Role");
    collect!(k8s_openapi::api::rbac::v1::RoleBinding, "RoleBinding");
    names.sort();
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_killed_mid_reconcile_converges_without_duplicates() -> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-operator-kill";
    // The operator must be up (and leading) before the kill is mid-reconcile.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    eventually(
        "the operator Deployment to be available",
        Duration::from_secs(120),
        || async {
            let ready = deployments
                .get("postgres-operator")
                .await?
                .status
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            Ok(if ready >= 1 {
                Ok(())
            } else {
                Err(format!("{ready} ready"))
            })
        },
    )
    .await?;

    let clusters = create_cluster(
        &client,
        namespace,
        "ok",
        json!({"instances": 2, "failover": calm_failover()}),
    )
    .await?;
    // Killed as soon as the first objects of the first reconcile appear.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    eventually(
        "the operator to start creating objects",
        Duration::from_secs(120),
        || async {
            Ok(if statefulsets.get_opt("ok").await?.is_some() {
                Ok(())
            } else {
                Err("none".into())
            })
        },
    )
    .await?;
    let killed = kill_operator(&client).await?;
    let before = owned_objects(&client, namespace).await?;

    let started = Instant::now();
    e2e.wait_healthy(&clusters, "ok", None, Duration::from_secs(240))
        .await?;
    let replacement = Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect::<Vec<_>>();
    assert!(
        !replacement.contains(&killed),
        "the killed operator pod {killed} is still listed: {replacement:?}"
    );
    println!(
        "e2e: operator {killed} killed with {} objects made; cluster Healthy {:.0} s later under {replacement:?}",
        before.len(),
        started.elapsed().as_secs_f64()
    );

    // Converged: exactly one of each object, one primary, one pod per ordinal; and stable (a
    // later reconcile adds nothing).
    let after = owned_objects(&client, namespace).await?;
    let unique: BTreeSet<&String> = after.iter().collect();
    assert_eq!(unique.len(), after.len(), "duplicates in {after:?}");
    assert_eq!(
        after
            .iter()
            .filter(|o| o.starts_with("StatefulSet/"))
            .count(),
        1,
        "{after:?}"
    );
    for service in [
        api::contract::rw_service("ok"),
        api::contract::ro_service("ok"),
        api::contract::any_service("ok"),
    ] {
        assert!(
            after.contains(&format!("Service/{service}")),
            "{service} missing in {after:?}"
        );
    }
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let mut roles = BTreeMap::new();
    for pod in &pods {
        let role = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(api::contract::LABEL_ROLE))
            .cloned()
            .unwrap_or_default();
        *roles.entry(role).or_insert(0) += 1;
    }
    assert_eq!(pods.items.len(), 2, "pods: {roles:?}");
    assert_eq!(roles.get("primary"), Some(&1), "roles: {roles:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        owned_objects(&client, namespace).await?,
        after,
        "objects kept changing"
    );
    let password = superuser_login(&client, namespace, "ok").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("ok"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await?;
    Ok(())
}

/// What the observer saw during a rolling update, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A pod started terminating (or was replaced by a pod of another uid).
    Replaced(String),
    /// The primary's Lease went to this pod.
    Primary(String),
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_image_update_goes_replicas_first_then_switchover_then_primary()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-rolling";
    let clusters = create_cluster(
        &client,
        namespace,
        "ru",
        json!({"instances": 3, "failover": calm_failover(),
               "replication": {"synchronous": {"method": "any", "number": 1, "dataDurability": "required"}}}),
    )
    .await?;
    let first_primary = e2e
        .wait_healthy(&clusters, "ru", None, Duration::from_secs(180))
        .await?;
    let password = superuser_login(&client, namespace, "ru").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("ru"))?;
    connect_when_served(rw, &password)
        .await?
        .batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY)")
        .await?;

    // An observer records pod replacements and primary changes every 200 ms.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let observer = {
        let pods = pods.clone();
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), namespace);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut uids: BTreeMap<String, String> = BTreeMap::new();
            let mut terminating: BTreeSet<String> = BTreeSet::new();
            let mut primary = String::new();
            loop {
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for pod in list {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        let replaced = uids.get(&name).is_some_and(|known| *known != uid);
                        let deleting = pod.metadata.deletion_timestamp.is_some();
                        if (deleting || replaced) && !terminating.contains(&name) {
                            seen.push(Seen::Replaced(name.clone()));
                            terminating.insert(name.clone());
                        }
                        if !deleting && replaced {
                            terminating.remove(&name);
                        }
                        if !deleting {
                            uids.insert(name, uid);
                        }
                    }
                }
                // The Lease holder is the primary as the instance managers decide it (the
                // cluster's status follows a reconcile later).
                if let Ok(lease) = leases.get(&api::contract::lease_name("ru")).await
                    && let Some(now) = lease.spec.and_then(|s| s.holder_identity)
                    && !now.is_empty()
                    && now != primary
                {
                    if !primary.is_empty() {
                        seen.push(Seen::Primary(now.clone()));
                    }
                    primary = now;
                }
                if stopped.try_recv().is_ok() {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        (stop, task)
    };
    let writer = Writer::start(rw, &password, "acks");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A new minor image in the catalog.
    let new_image = INSTANCE_IMAGE.replace(":18.6", ":18.7");
    Api::<api::ImageCatalog>::namespaced(client.clone(), namespace)
        .patch(
            "postgresql",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"images": [{"major": 18, "image": new_image}]}})),
        )
        .await?;
    let started = Instant::now();
    eventually(
        "every pod to run the new image",
        Duration::from_secs(300),
        || async {
            let list = pods.list(&ListParams::default()).await?;
            let images: Vec<String> = list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
                .filter(|c| c.name == "postgres")
                .filter_map(|c| c.image.clone())
                .collect();
            Ok(
                if images.len() == 3 && images.iter().all(|i| *i == new_image) {
                    Ok(())
                } else {
                    Err(format!("{images:?}"))
                },
            )
        },
    )
    .await?;
    let primary = e2e
        .wait_healthy(&clusters, "ru", None, Duration::from_secs(180))
        .await?;
    let rolled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acknowledged, outage) = writer.stop().await?;
    let _ = observer.0.send(());
    let seen = observer.1.await?;
    let lost = lost_writes(rw, &password, "acks", &acknowledged).await?;
    println!(
        "e2e: rolling update in {:.0} s: {seen:?}; writes unavailable {:.1} s, acknowledged {}, lost {}",
        rolled.as_secs_f64(),
        outage.as_secs_f64(),
        acknowledged.len(),
        lost.len()
    );

    // Replicas first, then the switchover, the old primary last.
    let replaced: Vec<&String> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Replaced(pod) => Some(pod),
            Seen::Primary(_) => None,
        })
        .collect();
    assert_eq!(replaced.len(), 3, "each pod replaced once: {seen:?}");
    assert_eq!(
        replaced.last().map(|p| p.as_str()),
        Some(first_primary.as_str()),
        "the primary goes last: {seen:?}"
    );
    let switchover = seen
        .iter()
        .position(|s| matches!(s, Seen::Primary(_)))
        .ok_or_else(|| anyhow::anyhow!("no switchover seen: {seen:?}"))?;
    let primary_replaced = seen
        .iter()
        .position(|s| *s == Seen::Replaced(first_primary.clone()))
        .unwrap_or_default();
    for (position, event) in seen.iter().enumerate() {
        if let Seen::Replaced(pod) = event
            && *pod != first_primary
        {
            assert!(
                position < switchover,
                "replicas go before the switchover: {seen:?}"
            );
        }
    }
    assert!(
        switchover < primary_replaced,
        "the switchover comes before the old primary's pod goes: {seen:?}"
    );
    assert_ne!(
        primary, first_primary,
        "the primary moved to an updated replica"
    );
    assert!(!acknowledged.is_empty(), "the writer wrote nothing");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let _ = connect(rw, &password).await?;
    Ok(())
}

/// The Progressing condition of a cluster: (reason, message).
async fn progressing(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
) -> anyhow::Result<(String, String)> {
    let status = clusters.get(name).await?.status.unwrap_or_default();
    Ok(
        api::common::find_condition(&status.conditions, "Progressing")
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_supervised_update_waits_for_the_users_switchover_before_the_primary()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-supervised";
    let clusters = create_cluster(
        &client,
        namespace,
        "su",
        json!({"instances": 2, "failover": calm_failover(), "primaryUpdateStrategy": "supervised"}),
    )
    .await?;
    let primary = e2e
        .wait_healthy(&clusters, "su", None, Duration::from_secs(180))
        .await?;
    let replica = if primary == "su-0" { "su-1" } else { "su-0" };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let uid = |pod: Pod| pod.metadata.uid.unwrap_or_default();
    let primary_uid = uid(pods.get(&primary).await?);
    let replica_uid = uid(pods.get(replica).await?);

    // A pod spec change (resources): the replica is recreated, then the update waits at the
    // primary and says what to run.
    patch_spec(
        &clusters,
        "su",
        json!({"resources": {"requests": {"memory": "80Mi"}}}),
    )
    .await?;
    let message = eventually(
        "the update to wait for the user at the primary",
        Duration::from_secs(180),
        || async {
            let (reason, message) = progressing(&clusters, "su").await?;
            Ok(if reason == "WaitingForUser" {
                Ok(message)
            } else {
                Err(format!("{reason}: {message}"))
            })
        },
    )
    .await?;
    assert!(
        message.contains(&format!("kubectl pg switchover su --to {replica}")),
        "{message}"
    );
    assert_ne!(
        uid(pods.get(replica).await?),
        replica_uid,
        "the replica was updated"
    );
    // It keeps waiting: the primary is not touched by the operator.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(uid(pods.get(&primary).await?), primary_uid);
    assert_eq!(progressing(&clusters, "su").await?.0, "WaitingForUser");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|event| event.reason.as_deref() == Some("SwitchoverNeeded"))
        .filter_map(|event| event.message)
        .collect();
    assert_eq!(notes.len(), 1, "one SwitchoverNeeded event: {notes:?}");

    // The user's switchover: the old primary, now a replica, is updated and the cluster is
    // Healthy on the new spec.
    patch_spec(&clusters, "su", json!({"switchoverTo": replica})).await?;
    let now = e2e
        .wait_healthy(&clusters, "su", Some(&primary), Duration::from_secs(180))
        .await?;
    assert_eq!(now, replica);
    eventually(
        "the old primary to be recreated and the update to finish",
        Duration::from_secs(180),
        || async {
            let (reason, message) = progressing(&clusters, "su").await?;
            let recreated = uid(pods.get(&primary).await?) != primary_uid;
            Ok(if recreated && reason == "UpToDate" {
                Ok(())
            } else {
                Err(format!("recreated {recreated}, {reason}: {message}"))
            })
        },
    )
    .await?;
    e2e.wait_healthy(&clusters, "su", None, Duration::from_secs(120))
        .await?;
    Ok(())
}

/// The cluster's current primary once its status names another pod than `old`.
async fn new_primary(
    clusters: &Api<api::PostgresCluster>,
    name: &str,
    old: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    eventually("a new primary in the cluster's status", timeout, || async {
        let status = clusters.get(name).await?.status.unwrap_or_default();
        Ok(match status.current_primary {
            Some(primary) if primary != old && !primary.is_empty() => Ok(primary),
            other => Err(format!("primary {other:?}, phase {:?}", status.phase)),
        })
    })
    .await
}

/// The network cut from the primary's pod (another instance takes over, the old one is
/// relabelled and rejoins by rewind), then from a replica's (writes go on, the -ro Service leaves
/// it, it catches up): no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread")]
async fn partitions_of_the_primary_and_of_a_replica_lose_no_acknowledged_write()
-> anyhow::Result<()> {
    let e2e = stack()?;
    let client = e2e.client().await?;
    let namespace = "e2e-partition";
    let clusters = create_cluster(
        &client,
        namespace,
        "pt",
        json!({"instances": 3,
               "replication": {"synchronous": {"method": "any", "number": 1, "dataDurability": "required"}}}),
    )
    .await?;
    e2e.wait_healthy(&clusters, "pt", None, Duration::from_secs(180))
        .await?;
    let login = superuser_login(&client, namespace, "pt").await?;
    let rw = e2e.service_port(namespace, &api::contract::rw_service("pt"))?;
    connect_writable(rw, &login)
        .await?
        .batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY)")
        .await?;
    let writer = Writer::start(rw, &login, "acks");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The primary's pod loses the network: its replicas, the Services, the kubelet's probes and
    // the API server reach it no more, and it reaches none of them.
    let old = e2e
        .wait_healthy(&clusters, "pt", None, Duration::from_secs(60))
        .await?;
    let cut_at = Instant::now();
    e2e.partition(namespace, &old);
    let new = new_primary(&clusters, "pt", &old, Duration::from_secs(90)).await;
    let new = match new {
        Ok(new) => new,
        Err(error) => {
            e2e.heal(namespace, &old);
            anyhow::bail!(
                "{error:#}\n{}{}",
                e2e.instance_reports(namespace, "pt").await,
                e2e.cluster_logs(namespace, "pt", 3)
            );
        }
    };
    let replaced_after = cut_at.elapsed();
    // The old pod cannot take its primary label off; the operator relabels it, so the -rw
    // Service leaves it before its readiness probe fails.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    eventually(
        "the operator to relabel the cut-off primary",
        Duration::from_secs(30),
        || async {
            let role = pods
                .get(&old)
                .await?
                .labels()
                .get(api::contract::LABEL_ROLE)
                .cloned();
            Ok(match role.as_deref() {
                Some(api::contract::role::UNKNOWN) => Ok(()),
                other => Err(format!("role label {other:?}")),
            })
        },
    )
    .await?;
    let relabelled_after = cut_at.elapsed();
    // The -rw Service follows the new primary (the real EndpointSlice controller, from the pods'
    // labels and readiness): writes go on while the old primary is still cut off.
    let during = connect_writable(rw, &login).await?;
    during
        .execute("INSERT INTO acks (id) VALUES (-1)", &[])
        .await?;
    eventually(
        "the partitioned pod not ready (its probes reach nothing)",
        Duration::from_secs(60),
        || async {
            Ok(if pod_is_ready(&pods.get(&old).await?) {
                Err("still ready".to_string())
            } else {
                Ok(())
            })
        },
    )
    .await?;

    // The partition heals: the old primary finds the new one's Lease and rejoins as a replica.
    let healed_at = Instant::now();
    e2e.heal(namespace, &old);
    let primary = e2e
        .wait_healthy(&clusters, "pt", Some(&old), Duration::from_secs(180))
        .await?;
    let rejoined_after = healed_at.elapsed();
    let (acknowledged, outage) = writer.stop().await?;
    let lost = lost_writes(rw, &login, "acks", &acknowledged).await?;
    let status = clusters.get("pt").await?.status.unwrap_or_default();
    let rejoined = status
        .instances
        .iter()
        .find(|instance| instance.name == old)
        .cloned()
        .unwrap_or_default();
    println!(
        "e2e partition: primary {old} cut off, {new} primary after {:.1} s, {old} relabelled after {:.1} s, writes unavailable {:.1} s; healed, Healthy again after {:.1} s ({old}: {} by {:?}); acknowledged {}, lost {}",
        replaced_after.as_secs_f64(),
        relabelled_after.as_secs_f64(),
        outage.as_secs_f64(),
        rejoined_after.as_secs_f64(),
        rejoined.role,
        rejoined.last_join,
        acknowledged.len(),
        lost.len()
    );
    assert_eq!(primary, new, "the primary stays where the failover put it");
    assert_eq!(rejoined.role, api::contract::role::REPLICA, "{status:?}");
    assert!(
        matches!(rejoined.last_join.as_deref(), Some("rewind" | "reclone")),
        "the old primary rejoined by rewind or a new clone: {status:?}"
    );
    assert!(
        acknowledged.iter().any(|id| *id > 1_000_000),
        "the writer wrote nothing"
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let reader = connect_writable(rw, &login).await?;
    let kept: i64 = reader
        .query_one("SELECT count(*) FROM acks WHERE id = -1", &[])
        .await?
        .get(0);
    assert_eq!(kept, 1, "the write made during the partition is kept");

    // Then a replica loses the network: writes go on (the other replica answers the `ANY 1`
    // quorum), nobody fails over, the -ro Service leaves it; healed, it streams again and
    // replays every write made while it was cut off.
    let replica = status
        .instances
        .iter()
        .map(|instance| instance.name.clone())
        .find(|name| *name != old && *name != new)
        .ok_or_else(|| anyhow::anyhow!("no third instance in {status:?}"))?;
    let replica_ip = pods
        .get(&replica)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .unwrap_or_default();
    reader
        .batch_execute("CREATE TABLE replica_acks (id bigint PRIMARY KEY)")
        .await?;
    let writer = Writer::start(rw, &login, "replica_acks");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut_at = Instant::now();
    e2e.partition(namespace, &replica);
    let ro = api::contract::ro_service("pt");
    eventually(
        "the -ro Service to leave the partitioned replica",
        Duration::from_secs(60),
        || async {
            let ready = ready_endpoints(&client, namespace, &ro).await?;
            Ok(if ready.contains(&replica_ip) {
                Err(format!("-ro endpoints {ready:?}"))
            } else {
                Ok(())
            })
        },
    )
    .await?;
    let left_ro_after = cut_at.elapsed();
    // The status says so too.
    let during = eventually(
        "the status to count the partitioned replica out",
        Duration::from_secs(30),
        || async {
            let status = clusters.get("pt").await?.status.unwrap_or_default();
            let counted = status
                .instances
                .iter()
                .any(|instance| instance.name == replica && instance.ready);
            Ok(if counted || status.ready_instances != 2 {
                Err(format!("{status:?}"))
            } else {
                Ok(status)
            })
        },
    )
    .await?;
    // Longer than a Lease duration (4 s) has passed: nobody took the primary's place.
    assert_eq!(
        during.current_primary.as_deref(),
        Some(new.as_str()),
        "a replica's partition moves no primary: {during:?}"
    );
    let healed_at = Instant::now();
    e2e.heal(namespace, &replica);
    e2e.wait_healthy(&clusters, "pt", None, Duration::from_secs(180))
        .await?;
    let ready_after = healed_at.elapsed();
    let (acknowledged, outage) = writer.stop().await?;
    let lost = lost_writes(rw, &login, "replica_acks", &acknowledged).await?;
    // Every write, the last included, replayed on the healed replica (the primary's view of
    // its stream).
    let last_lsn: String = reader
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    eventually(
        "the healed replica to replay every write",
        Duration::from_secs(60),
        || async {
            let replayed: Option<bool> = reader
                .query_opt(
                    "SELECT replay_lsn >= $2::text::pg_lsn FROM pg_stat_replication \
                     WHERE host(client_addr) = $1",
                    &[&replica_ip, &last_lsn],
                )
                .await?
                .and_then(|row| row.get(0));
            Ok(match replayed {
                Some(true) => Ok(()),
                other => Err(format!("replayed up to {last_lsn}: {other:?}")),
            })
        },
    )
    .await?;
    println!(
        "e2e partition: replica {replica} cut off, out of -ro after {:.1} s (status then: {:?}, {} ready), longest write outage {:.1} s; healed, Healthy again after {:.1} s; acknowledged {}, lost {}",
        left_ro_after.as_secs_f64(),
        during.phase,
        during.ready_instances,
        outage.as_secs_f64(),
        ready_after.as_secs_f64(),
        acknowledged.len(),
        lost.len()
    );
    assert!(
        outage < Duration::from_secs(5),
        "writes went on while a replica was cut off (longest outage {outage:?})"
    );
    assert!(acknowledged.len() > 10, "the writer wrote {acknowledged:?}");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    Ok(())
}
