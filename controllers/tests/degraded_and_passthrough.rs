//! What the API server cannot reject shows as a Degraded condition with a reason; user requests
//! for a switchover or fencing are passed to the instance managers (Lease and pod annotations).

mod common;

use std::collections::BTreeMap;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use common::{Env, spec};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

fn degraded(cluster: &PostgresCluster) -> Option<(String, String, String)> {
    let status = cluster.status.as_ref()?;
    let condition = api::common::find_condition(&status.conditions, "Degraded")?;
    Some((
        condition.status.clone(),
        condition.reason.clone(),
        condition.message.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_is_a_degraded_condition_until_it_exists() {
    let env = Env::start("degraded").await;
    let mut cluster_spec = spec(1, "pg:18.1");
    cluster_spec.bootstrap = Some(
        serde_json::from_value(
            json!({"initdb": {"owner": "shop", "secret": {"name": "shop-credentials"}}}),
        )
        .unwrap(),
    );
    env.create_cluster("db", cluster_spec).await;
    let cluster = env.cluster_in_phase("db", "Degraded").await;
    let (status, reason, message) = degraded(&cluster).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert!(message.contains("shop-credentials"), "{message}");
    // No StatefulSet whose pods could not start; the other objects exist.
    let statefulsets: Api<StatefulSet> = env.api();
    assert!(statefulsets.get_opt("db").await.unwrap().is_none());
    let _: k8s_openapi::api::core::v1::Service = env.object("db-rw").await;
    // The user's Secret replaces the generated one: none is generated.
    let secrets: Api<Secret> = env.api();
    assert!(secrets.get_opt("db-app").await.unwrap().is_none());

    let credentials = |username: &str| Secret {
        metadata: ObjectMeta {
            name: Some("shop-credentials".into()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            ("username".into(), username.into()),
            ("password".into(), "s3cret-from-the-user".into()),
        ])),
        ..Secret::default()
    };
    // A Secret for another user than the owner the spec names is refused, with what to change.
    secrets
        .create(&PostParams::default(), &credentials("buyer"))
        .await
        .unwrap();
    let cluster = env
        .cluster_where("db", "the Secret found and refused", |cluster| {
            degraded(cluster).is_some_and(|(_, reason, _)| reason == "SecretInvalid")
        })
        .await;
    let (_, _, message) = degraded(&cluster).unwrap();
    assert!(
        message.contains("\"buyer\"") && message.contains("make its username \"shop\""),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");
    assert!(statefulsets.get_opt("db").await.unwrap().is_none());

    secrets
        .replace(
            "shop-credentials",
            &PostParams::default(),
            &credentials("shop"),
        )
        .await
        .unwrap();
    let cluster = env.cluster_in_phase("db", "Creating").await;
    assert_eq!(degraded(&cluster).unwrap().0, "False");
    let sts: StatefulSet = env.object("db").await;
    let volumes = sts.spec.unwrap().template.spec.unwrap().volumes.unwrap();
    assert!(volumes.iter().any(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some("shop-credentials"))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_fencing_requests_reach_the_instance_managers() {
    let env = Env::start("passthrough").await;
    env.create_cluster("db", spec(3, "pg:18.1")).await;
    let _: StatefulSet = env.object("db").await;
    env.play_healthy_cluster("db", 3).await;
    env.cluster_in_phase("db", "Healthy").await;

    // A target that is no instance of the cluster is reported, not passed on.
    env.patch_spec("db", json!({"switchoverTo": "db-9"})).await;
    env.eventually("a SwitchoverTargetNotFound event", || async {
        env.event_reasons("db")
            .await
            .contains(&"SwitchoverTargetNotFound".to_string())
            .then_some(())
    })
    .await;
    env.patch_spec("db", json!({"switchoverTo": "db-2"})).await;
    let leases: Api<Lease> = env.api();
    env.eventually("the switchover request on the Lease", || async {
        let lease = leases.get("db-primary").await.ok()?;
        (lease
            .annotations()
            .get(contract::ANNOTATION_SWITCHOVER_TO)?
            == "db-2")
            .then_some(())
    })
    .await;
    env.cluster_in_phase("db", "SwitchingOver").await;
    // The instance managers carry it out and clear the request.
    env.set_role("db-0", "replica").await;
    env.set_role("db-2", "primary").await;
    leases
        .patch(
            "db-primary",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                contract::ANNOTATION_SWITCHOVER_TO: null
            }}})),
        )
        .await
        .unwrap();
    let cluster = env
        .cluster_where("db", "db-2 is the primary", |c| {
            c.status.as_ref().is_some_and(|s| {
                s.current_primary.as_deref() == Some("db-2")
                    && s.phase.as_deref() == Some("Healthy")
            })
        })
        .await;
    assert_eq!(cluster.status.unwrap().ready_instances, 3);
    // db-2 is the primary now: the request is not repeated.
    let lease = leases.get("db-primary").await.unwrap();
    assert!(
        !lease
            .annotations()
            .contains_key(contract::ANNOTATION_SWITCHOVER_TO)
    );

    // Fencing: spec list and annotation put the fenced annotation on the pods.
    let pods: Api<Pod> = env.api();
    let fenced = |pods: Api<Pod>| async move {
        let mut names: Vec<String> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| {
                p.annotations()
                    .get(contract::ANNOTATION_FENCED)
                    .map(String::as_str)
                    == Some("true")
            })
            .map(|p| p.name_any())
            .collect();
        names.sort();
        names
    };
    env.patch_spec("db", json!({"fencedInstances": ["db-1"]}))
        .await;
    env.eventually("db-1 fenced", || async {
        (fenced(pods.clone()).await == ["db-1"]).then_some(())
    })
    .await;
    env.clusters()
        .patch(
            "db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {contract::ANNOTATION_FENCED: "*"}}}),
            ),
        )
        .await
        .unwrap();
    env.eventually("every instance fenced", || async {
        (fenced(pods.clone()).await == ["db-0", "db-1", "db-2"]).then_some(())
    })
    .await;
    env.clusters()
        .patch(
            "db",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
                "metadata": {"annotations": {contract::ANNOTATION_FENCED: null}},
                "spec": {"fencedInstances": null}
            })),
        )
        .await
        .unwrap();
    env.eventually("no instance fenced", || async {
        fenced(pods.clone()).await.is_empty().then_some(())
    })
    .await;

    // Scaling down to 2 would remove db-2, the primary: it hands over first.
    env.patch_spec("db", json!({"instances": 2})).await;
    env.eventually("a switchover to db-0 before the scale down", || async {
        let lease = leases.get("db-primary").await.ok()?;
        (lease
            .annotations()
            .get(contract::ANNOTATION_SWITCHOVER_TO)?
            == "db-0")
            .then_some(())
    })
    .await;
    let sts: StatefulSet = env.object("db").await;
    assert_eq!(
        sts.spec.unwrap().replicas,
        Some(3),
        "the primary's pod is kept meanwhile"
    );
    env.set_role("db-2", "replica").await;
    env.set_role("db-0", "primary").await;
    leases
        .patch(
            "db-primary",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {
                contract::ANNOTATION_SWITCHOVER_TO: null
            }}})),
        )
        .await
        .unwrap();
    let statefulsets: Api<StatefulSet> = env.api();
    env.eventually("the StatefulSet scaled down after the handover", || async {
        (statefulsets.get("db").await.ok()?.spec?.replicas? == 2).then_some(())
    })
    .await;
    // spec.switchoverTo still names db-2, but that request was passed on once already: the
    // handover to db-0 is not undone.
    let cluster = env.cluster_in_phase("db", "Healthy").await;
    assert_eq!(
        cluster.status.unwrap().current_primary.as_deref(),
        Some("db-0")
    );
    let lease = leases.get("db-primary").await.unwrap();
    assert!(
        !lease
            .annotations()
            .contains_key(contract::ANNOTATION_SWITCHOVER_TO)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_stopped_by_the_api_server_says_why_in_an_event() {
    // An admission policy (as a platform team would write one) refuses the Secrets of this
    // namespace, so the reconcile stops before it writes any status. The user must still see why.
    let env = Env::start("refused").await;
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(env.client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(env.client.clone());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": "no-secrets-in-refused"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["secrets"]
            }]},
            "validations": [{
                "expression": "object.metadata.namespace != 'refused'",
                "message": "Secrets are frozen in this namespace"
            }]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": "no-secrets-in-refused"},
        "spec": {"policyName": "no-secrets-in-refused", "validationActions": ["Deny"]}
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // The policy takes effect once the API server has loaded it.
    env.eventually("the admission policy is enforced", || async {
        let probe: Secret = serde_json::from_value(json!({"metadata": {"name": "probe"}})).unwrap();
        match env
            .api::<Secret>()
            .create(&PostParams::default(), &probe)
            .await
        {
            Ok(_) => {
                env.api::<Secret>()
                    .delete("probe", &Default::default())
                    .await
                    .unwrap();
                None
            }
            Err(_) => Some(()),
        }
    })
    .await;
    env.create_cluster("db", spec(1, "pg:18.1")).await;
    let note = env
        .eventually("a ReconcileFailed event on the cluster", || async {
            let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
            events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .find(|event| {
                    event.reason.as_deref() == Some("ReconcileFailed")
                        && event.type_.as_deref() == Some("Warning")
                        && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("db")
                })
                .and_then(|event| event.note)
        })
        .await;
    assert!(
        note.contains("Secret db-superuser")
            && note.contains("Secrets are frozen in this namespace"),
        "the event names the object and the API server's reason: {note}"
    );
    assert!(
        env.clusters().get("db").await.unwrap().status.is_none(),
        "no status was written"
    );
    // The policy goes: the next attempt gets through and the status appears.
    bindings
        .delete("no-secrets-in-refused", &Default::default())
        .await
        .unwrap();
    env.cluster_where("db", "a status phase", |cluster| {
        cluster
            .status
            .as_ref()
            .is_some_and(|status| status.phase.is_some())
    })
    .await;
}
