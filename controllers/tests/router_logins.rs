//! PostgresUser changes reach a running pg-router (Kubernetes mode, a real process against a
//! real API server and TLS-only PostgreSQL 18 shards) without a restart, with the router logged
//! in as its own API user bound to the Role the operator builds for it (RBAC enforced, so the
//! by-name watch of a password Secret is what that Role allows): a new user logs in within
//! seconds; after a password change the new password logs in and the old one is refused; after
//! a rotation the new login role logs in and the previous one for the grace period only; a
//! removed user is refused; sessions logged in before each change keep working.

mod split_bed;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use api::postgres_cluster::PostgresCluster;
use api::postgres_user::PostgresUser;
use controllers::sharded_cluster::builders;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding, Subject};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use split_bed::routers::{self, RouterProcess};
use split_bed::{SCHEMA, start_shards, two_shard_cluster};
use testbed::ApiServer;
use testbed::apiserver::ApiServerOptions;

const NAMESPACE: &str = "logins";
/// The API user pg-router runs as.
const ROUTER_USER: &str = "pg-router";
const FIRST_PASSWORD: &str = "first-app-password";
const SECOND_PASSWORD: &str = "second-app-password";
const ROTATED_PASSWORD: &str = "rotated-app-password";
/// `password.rotationGraceSeconds` of the user.
const GRACE: Duration = Duration::from_secs(5);

/// A login through the router as `user`; the error text when refused.
async fn login(port: u16, user: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Waits (up to 20 s) until `check` holds; returns how long it took.
async fn within_seconds<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// The session still answers (it was not dropped by a change of the logins).
async fn still_works(session: &tokio_postgres::Client) {
    let rows: i64 = session
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .expect("a session logged in before the change keeps working")
        .get(0);
    assert!(rows >= 1);
}

/// What the operator does on a PostgresUser change: the router's Role, built for the
/// namespace's PostgresUsers now.
async fn apply_router_role(client: &Client, cluster: &PostgresCluster) {
    let users = Api::<PostgresUser>::namespaced(client.clone(), NAMESPACE)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    Api::<Role>::namespaced(client.clone(), NAMESPACE)
        .patch(
            &builders::router_name("db"),
            &PatchParams::apply("test").force(),
            &Patch::Apply(builders::router_role(cluster, &users)),
        )
        .await
        .expect("the router's Role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_user_changes_reach_a_running_router() {
    let server = ApiServer::start_with(ApiServerOptions {
        users: vec![(ROUTER_USER.to_string(), vec![])],
        ..ApiServerOptions::default()
    })
    .await
    .expect("API server");
    server.install_crds(&api::all_crds()).await.expect("CRDs");
    let client = server.client().await.unwrap();
    testbed::apiserver::create_namespace(&client, NAMESPACE)
        .await
        .unwrap();
    let (ca, shards) = start_shards(NAMESPACE, 2, &[]);
    two_shard_cluster(&client, NAMESPACE, &ca, &shards).await;
    for shard in &shards {
        shard
            .client()
            .await
            .unwrap()
            .batch_execute(SCHEMA)
            .await
            .unwrap();
    }
    let cluster = Api::<PostgresCluster>::namespaced(client.clone(), NAMESPACE)
        .get("db")
        .await
        .unwrap();
    // The router's Role and RoleBinding as the operator writes them, the binding also naming
    // the API user the test's router logs in as (no pod, so no ServiceAccount token).
    apply_router_role(&client, &cluster).await;
    let mut binding = builders::router_role_binding(&cluster);
    binding.subjects.get_or_insert_default().push(Subject {
        kind: "User".into(),
        name: ROUTER_USER.into(),
        api_group: Some("rbac.authorization.k8s.io".into()),
        ..Subject::default()
    });
    Api::<RoleBinding>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let kubeconfig = server.write_user_kubeconfig(ROUTER_USER).unwrap();
    let log = server.dir().join("router.log");
    let router = RouterProcess::start(&kubeconfig, NAMESPACE, 5_000, log.clone())
        .await
        .expect("pg-router with the Role's rights only");
    let superuser = routers::connect(router.port).await.unwrap();
    superuser
        .execute("INSERT INTO orders (customer_id, id) VALUES (1, 1)", &[])
        .await
        .unwrap();
    assert!(login(router.port, "app_a", FIRST_PASSWORD).await.is_err());

    // A new PostgresUser with its password Secret; the operator updates the Role for it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("app-password".into()),
            ..Default::default()
        },
        ..Secret::default()
    };
    // As the instance manager writes it for a user with rotation: the login role in use.
    secret.data = Some(BTreeMap::from([
        ("username".to_string(), ByteString(b"app_a".to_vec())),
        (
            "password".to_string(),
            ByteString(FIRST_PASSWORD.as_bytes().to_vec()),
        ),
    ]));
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let user: PostgresUser = serde_json::from_value(json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresUser",
        "metadata": {"name": "app", "namespace": NAMESPACE},
        "spec": {"cluster": {"name": "db"}, "roleName": "app",
                 "password": {"secretName": "app-password", "generate": true,
                              "rotationDays": 30, "rotationGraceSeconds": GRACE.as_secs()}}
    }))
    .unwrap();
    let users: Api<PostgresUser> = Api::namespaced(client.clone(), NAMESPACE);
    let created = Instant::now();
    users.create(&PostParams::default(), &user).await.unwrap();
    apply_router_role(&client, &cluster).await;
    within_seconds("the new user logs in", || async {
        login(router.port, "app_a", FIRST_PASSWORD).await.is_ok()
    })
    .await;
    println!(
        "router_logins_new_user_ms={}",
        created.elapsed().as_millis()
    );
    let first_session = login(router.port, "app_a", FIRST_PASSWORD).await.unwrap();
    still_works(&first_session).await;

    // The password changes in the Secret (the PostgresUser stays as it is).
    let changed = Instant::now();
    secrets
        .patch(
            "app-password",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": SECOND_PASSWORD}})),
        )
        .await
        .unwrap();
    within_seconds("the new password logs in", || async {
        login(router.port, "app_a", SECOND_PASSWORD).await.is_ok()
    })
    .await;
    println!(
        "router_logins_password_change_ms={}",
        changed.elapsed().as_millis()
    );
    let refused = login(router.port, "app_a", FIRST_PASSWORD)
        .await
        .unwrap_err();
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    still_works(&first_session).await;
    let second_session = login(router.port, "app_a", SECOND_PASSWORD).await.unwrap();

    // A rotation points the Secret at the other login role: it logs in at once, and the
    // previous one keeps logging in for the grace period (as PostgreSQL accepts it), then not.
    let rotated = Instant::now();
    secrets
        .patch(
            "app-password",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"stringData": {"username": "app_b", "password": ROTATED_PASSWORD}}),
            ),
        )
        .await
        .unwrap();
    within_seconds("the rotated login logs in", || async {
        login(router.port, "app_b", ROTATED_PASSWORD).await.is_ok()
    })
    .await;
    assert!(
        login(router.port, "app_a", SECOND_PASSWORD).await.is_ok(),
        "the previous login works during the grace period"
    );
    within_seconds(
        "the previous login is refused after the grace period",
        || async { login(router.port, "app_a", SECOND_PASSWORD).await.is_err() },
    )
    .await;
    let elapsed = rotated.elapsed();
    assert!(
        elapsed >= GRACE - Duration::from_millis(500),
        "refused after {elapsed:?}"
    );
    println!("router_logins_rotation_grace_ms={}", elapsed.as_millis());
    still_works(&second_session).await;

    // The PostgresUser goes: the role cannot start sessions any more; its open ones go on.
    let removed = Instant::now();
    users.delete("app", &DeleteParams::default()).await.unwrap();
    apply_router_role(&client, &cluster).await;
    within_seconds("the removed user is refused", || async {
        login(router.port, "app_b", ROTATED_PASSWORD).await.is_err()
    })
    .await;
    println!(
        "router_logins_removed_user_ms={}",
        removed.elapsed().as_millis()
    );
    let refused = login(router.port, "app_b", ROTATED_PASSWORD)
        .await
        .unwrap_err();
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    still_works(&first_session).await;
    still_works(&second_session).await;
    assert!(
        routers::connect(router.port).await.is_ok(),
        "the backend login stays"
    );

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    // The Role let the router watch the Secret by name: no fall-back to reads.
    assert!(
        !log_text.contains("watching a password Secret failed"),
        "{log_text}"
    );
    assert!(
        [FIRST_PASSWORD, SECOND_PASSWORD, ROTATED_PASSWORD]
            .iter()
            .all(|password| !log_text.contains(password)),
        "no password in the router log"
    );
}
