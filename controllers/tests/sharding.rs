//! A sharded PostgresCluster on a real API server: one child cluster per shard (reconciled by the
//! single-shard reconciler: its StatefulSet appears), the initial ShardRanges covering the hash
//! space, the pg-router objects, and bad specs refused with messages that say what to do.

mod common;

use api::contract;
use api::postgres_cluster::{
    PostgresCluster, RouterAutoscaling, ShardKeyType, ShardedTableSpec, ShardingSpec,
    TableGroupSpec,
};
use api::postgres_user::PostgresUser;
use api::sharding::{ShardRange, VindexKind};
use common::{Env, dns_names, secret_text, spec};
use controllers::sharded_cluster::builders;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::rbac::v1::Role;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn sharding(shards: i32) -> ShardingSpec {
    ShardingSpec {
        shards,
        router: api::postgres_cluster::RouterSpec {
            autoscaling: Some(RouterAutoscaling {
                min_replicas: 2,
                max_replicas: 5,
                target_cpu_utilization_percent: 60,
            }),
            ..Default::default()
        },
        table_groups: vec![
            TableGroupSpec {
                name: "customers".into(),
                vindex: VindexKind::Hash,
                key_type: ShardKeyType::Bigint,
            },
            TableGroupSpec {
                name: "events".into(),
                vindex: VindexKind::Range,
                key_type: ShardKeyType::Bigint,
            },
        ],
        sharded_tables: vec![ShardedTableSpec {
            name: "orders".into(),
            table_group: "customers".into(),
            shard_key: "customer_id".into(),
            lookups: Vec::new(),
        }],
        reference_tables: vec!["countries".into()],
    }
}

/// Checks that `ranges` (one table group) cover the signed 64-bit space once.
fn assert_cover_the_space(mut ranges: Vec<&ShardRange>) {
    ranges.sort_by_key(|r| r.spec.start.map_or(i128::MIN, i128::from));
    assert_eq!(ranges.first().unwrap().spec.start, None, "open lower end");
    assert_eq!(ranges.last().unwrap().spec.end, None, "open upper end");
    for pair in ranges.windows(2) {
        assert!(pair[0].spec.end.is_some());
        assert_eq!(
            pair[0].spec.end,
            pair[1].spec.start,
            "gap or overlap between {} and {}",
            pair[0].name_any(),
            pair[1].name_any()
        );
    }
}

async fn refused(env: &Env, name: &str, sharding: serde_json::Value) -> String {
    let mut cluster =
        serde_json::to_value(PostgresCluster::new(name, spec(1, "example.org/pg:18"))).unwrap();
    cluster["spec"]["sharding"] = sharding;
    let cluster: PostgresCluster = serde_json::from_value(cluster).unwrap();
    let error = env
        .clusters()
        .create(&PostParams::default(), &cluster)
        .await
        .expect_err("the API server should refuse the spec");
    error.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_cluster_gets_shards_ranges_and_a_router_and_bad_specs_are_refused() {
    let env = Env::start("sharding").await;
    let mut cluster_spec = spec(2, "example.org/pg:18");
    cluster_spec.sharding = Some(sharding(3));
    let parent = env.create_cluster("db", cluster_spec).await;
    let uid = parent.uid().unwrap();

    // One child cluster per shard, owned by the parent, reconciled as any cluster.
    for index in 0..3 {
        let child: PostgresCluster = env.object(&format!("db-shard-{index}")).await;
        let owner = &child.metadata.owner_references.clone().unwrap()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            (uid.as_str(), Some(true))
        );
        assert!(child.spec.sharding.is_none());
        assert_eq!(child.spec.instances, 2);
        let sts: StatefulSet = env.object(&format!("db-shard-{index}")).await;
        assert_eq!(sts.spec.unwrap().replicas, Some(2));
    }
    // The parent has no instances of its own.
    assert!(
        env.api::<StatefulSet>()
            .get_opt("db")
            .await
            .unwrap()
            .is_none()
    );

    // Every shard logs in with the parent's superuser password (one router login for all).
    let password = |secret: Secret| secret.data.unwrap()["password"].0.clone();
    let parent_password = password(env.object("db-superuser").await);
    for index in 0..3 {
        let secret: Secret = env.object(&format!("db-shard-{index}-superuser")).await;
        assert_eq!(password(secret), parent_password);
    }

    // The shards' certificates come from the parent's one CA (a split's subscription verifies
    // its source with the target's own CA file), and no shard keeps a CA of its own.
    let parent_ca = secret_text(&env.object::<Secret>("db-ca").await, "ca.crt");
    for index in 0..3 {
        let child = format!("db-shard-{index}");
        let server: Secret = env.object(&format!("{child}-server-tls")).await;
        assert_eq!(secret_text(&server, "ca.crt"), parent_ca, "{child}");
        let public: Secret = env.object(&format!("{child}-ca")).await;
        assert_eq!(secret_text(&public, "ca.crt"), parent_ca, "{child}");
        assert!(
            env.api::<Secret>()
                .get_opt(&format!("{child}-ca-private"))
                .await
                .unwrap()
                .is_none(),
            "{child} has no CA of its own"
        );
    }

    // The initial ranges: 3 per table group, owned by the parent, covering the space.
    let ranges = env
        .eventually("six ShardRanges", || async {
            let list = env
                .api::<ShardRange>()
                .list(&ListParams::default().labels("postgres.keiailab.io/cluster=db"))
                .await
                .ok()?;
            (list.items.len() == 6).then_some(list.items)
        })
        .await;
    for group in ["customers", "events"] {
        let of_group: Vec<&ShardRange> = ranges
            .iter()
            .filter(|r| r.spec.table_group == group)
            .collect();
        assert_eq!(of_group.len(), 3);
        assert_cover_the_space(of_group.clone());
        let mut shards: Vec<&str> = of_group.iter().map(|r| r.spec.shard.as_str()).collect();
        shards.sort();
        assert_eq!(shards, ["shard-0", "shard-1", "shard-2"]);
        for range in of_group {
            assert_eq!(range.owner_references()[0].uid, uid);
        }
    }
    assert!(
        ranges
            .iter()
            .filter(|r| r.spec.table_group == "events")
            .all(|r| r.spec.vindex == VindexKind::Range)
    );

    // The router: Deployment in Kubernetes mode under restricted security, Service, autoscaler,
    // and a Role that reads what the router routes by.
    let deployment: Deployment = env.object("db-router").await;
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    assert_eq!(
        args[..2],
        ["--kubernetes-cluster".to_string(), "db".to_string()]
    );
    assert_eq!(
        pod.security_context.unwrap().run_as_non_root,
        Some(true),
        "restricted pod security"
    );
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.allow_privilege_escalation, Some(false));
    // TLS for the router's clients: the cluster's server certificate, which names the router.
    let certificate: k8s_openapi::api::core::v1::Secret = env.object("db-server-tls").await;
    let names = dns_names(&secret_text(&certificate, "tls.crt"));
    let router_name = format!("db-router.{}.svc", env.namespace);
    assert!(names.contains(&router_name), "{names:?}");
    assert!(
        args.windows(2).any(|w| w[0] == "--tls-cert-file"
            && w[1] == format!("{}/tls.crt", contract::ROUTER_TLS_MOUNT_PATH)),
        "{args:?}"
    );
    let volumes = pod.volumes.clone().unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                == Some("db-server-tls")),
        "{volumes:?}"
    );
    let annotations = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .clone()
        .unwrap()
        .annotations
        .unwrap_or_default();
    assert!(
        annotations.contains_key(builders::ANNOTATION_TLS_HASH),
        "{annotations:?}"
    );
    // The autoscaler owns the replica count: the operator does not apply it.
    let operator_fields = deployment
        .metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.manager.as_deref() == Some("postgres-operator"))
        .map(|f| serde_json::to_string(&f.fields_v1).unwrap())
        .collect::<String>();
    assert!(!operator_fields.is_empty());
    assert!(!operator_fields.contains("f:replicas"), "{operator_fields}");
    let service: Service = env.object("db-router").await;
    assert_eq!(
        service.spec.unwrap().selector.unwrap()[builders::LABEL_ROUTER],
        "db"
    );
    let autoscaler: HorizontalPodAutoscaler = env.object("db-router").await;
    let autoscaler = autoscaler.spec.unwrap();
    assert_eq!(
        (autoscaler.min_replicas, autoscaler.max_replicas),
        (Some(2), 5)
    );
    let role: Role = env.object("db-router").await;
    let resources: Vec<String> = role
        .rules
        .unwrap()
        .into_iter()
        .flat_map(|rule| rule.resources.unwrap_or_default())
        .collect();
    assert!(
        resources.contains(&"shardranges".to_string()),
        "{resources:?}"
    );
    assert!(resources.contains(&"pods".to_string()), "{resources:?}");
    // A PostgresUser of the cluster: the Role lets the router watch its password Secret, by
    // name only (the router follows password changes live), and no other Secret.
    let user: PostgresUser = serde_json::from_value(json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresUser",
        "metadata": {"name": "app", "namespace": env.namespace},
        "spec": {"cluster": {"name": "db"}, "roleName": "app",
                 "password": {"secretName": "app-password"}}
    }))
    .unwrap();
    env.api::<PostgresUser>()
        .create(&PostParams::default(), &user)
        .await
        .unwrap();
    let watched = |role: Role| -> Option<Vec<String>> {
        role.rules?
            .into_iter()
            .find(|rule| {
                rule.verbs.contains(&"watch".to_string())
                    && rule.resources.as_deref() == Some(&["secrets".to_string()])
            })
            .map(|rule| rule.resource_names.unwrap_or_default())
    };
    env.eventually(
        "the router may watch the user's password Secret",
        || async {
            let role = env.api::<Role>().get("db-router").await.ok()?;
            (watched(role)? == ["app-password"]).then_some(())
        },
    )
    .await;
    env.api::<PostgresUser>()
        .delete("app", &Default::default())
        .await
        .unwrap();
    env.eventually("no Secret watch without PostgresUsers", || async {
        let role = env.api::<Role>().get("db-router").await.ok()?;
        watched(role).is_none().then_some(())
    })
    .await;

    // Without autoscaling the Deployment has the replicas and the autoscaler goes.
    env.patch_spec(
        "db",
        json!({"sharding": {"router": {"autoscaling": null, "replicas": 3}}}),
    )
    .await;
    env.eventually("router replicas 3, no autoscaler", || async {
        let deployment = env.api::<Deployment>().get("db-router").await.ok()?;
        let gone = env
            .api::<HorizontalPodAutoscaler>()
            .get_opt("db-router")
            .await
            .ok()?
            .is_none();
        (deployment.spec?.replicas == Some(3) && gone).then_some(())
    })
    .await;

    // A range the operator wrote is never rewritten: a split owns it from now on.
    let moved = ranges[0].name_any();
    env.api::<ShardRange>()
        .patch(
            &moved,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"shard": "shard-2"}})),
        )
        .await
        .unwrap();
    env.patch_spec("db", json!({"sharding": {"router": {"replicas": 4}}}))
        .await;
    env.eventually("router replicas 4", || async {
        let deployment = env.api::<Deployment>().get("db-router").await.ok()?;
        (deployment.spec?.replicas == Some(4)).then_some(())
    })
    .await;
    let kept = env.api::<ShardRange>().get(&moved).await.unwrap();
    assert_eq!(kept.spec.shard, "shard-2");

    // Changing the shard count is refused, pointing at ShardSplitJob.
    let error = env
        .clusters()
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sharding": {"shards": 4}}})),
        )
        .await
        .expect_err("shard count change must be refused");
    assert!(error.to_string().contains("ShardSplitJob"), "{error}");

    // Bad specs, each refused with a message that names the fix.
    let unknown_group = refused(
        &env,
        "bad1",
        json!({"shards": 2, "tableGroups": [{"name": "a"}],
               "shardedTables": [{"name": "t", "tableGroup": "b", "shardKey": "id"}]}),
    )
    .await;
    assert!(
        unknown_group.contains("must name an entry of sharding.tableGroups"),
        "{unknown_group}"
    );
    let duplicate = refused(
        &env,
        "bad2",
        json!({"shards": 2, "tableGroups": [{"name": "a"}, {"name": "a"}]}),
    )
    .await;
    assert!(duplicate.contains("unique name"), "{duplicate}");
    let lookup = refused(
        &env,
        "bad3",
        json!({"shards": 2, "tableGroups": [{"name": "a", "vindex": "lookup"}]}),
    )
    .await;
    assert!(lookup.contains("hash and range are supported"), "{lookup}");
    let text_range = refused(
        &env,
        "bad4",
        json!({"shards": 2, "tableGroups": [{"name": "a", "vindex": "range", "keyType": "text"}]}),
    )
    .await;
    assert!(text_range.contains("needs keyType bigint"), "{text_range}");
    let both = refused(
        &env,
        "bad5",
        json!({"shards": 2, "tableGroups": [{"name": "a"}],
               "shardedTables": [{"name": "t", "tableGroup": "a", "shardKey": "id"}],
               "referenceTables": ["t"]}),
    )
    .await;
    assert!(both.contains("not both"), "{both}");
    let zero = refused(&env, "bad6", json!({"shards": 0})).await;
    assert!(zero.contains("between 1 and 256"), "{zero}");

    // The README's walk-through ("Sharding", "Resharding"): its manifests are accepted as
    // written, every field known (strict field validation), every CEL rule passed (dry run).
    let manifests = readme_manifests();
    let kinds: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["PostgresCluster", "ShardSplitJob"],
        "the walk-through's manifests"
    );
    let strict = PatchParams {
        dry_run: true,
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..PatchParams::apply("readme")
    };
    for manifest in &manifests {
        let name = manifest["metadata"]["name"].as_str().unwrap();
        let result = match manifest["kind"].as_str() {
            Some("PostgresCluster") => env
                .api::<PostgresCluster>()
                .patch(name, &strict, &Patch::Apply(manifest))
                .await
                .map(|_| ()),
            _ => env
                .api::<api::sharding::ShardSplitJob>()
                .patch(name, &strict, &Patch::Apply(manifest))
                .await
                .map(|_| ()),
        };
        result.unwrap_or_else(|error| panic!("README's {name} is refused: {error}"));
    }
}

/// The YAML manifests of README.md's sections "Sharding" and "Resharding", in order.
fn readme_manifests() -> Vec<serde_json::Value> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme.find("\n## Sharding\n").expect("a Sharding section");
    let end = start + readme[start + 1..].find("\n## ").expect("a next section") + 1;
    readme[start..end]
        .split("```yaml\n")
        .skip(1)
        .map(|block| {
            let yaml = &block[..block.find("```").expect("a closed block")];
            serde_yaml::from_str(yaml).expect("README YAML")
        })
        .collect()
}
