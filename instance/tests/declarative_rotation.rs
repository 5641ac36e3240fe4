//! Password rotation under load, through `pg-instance` under a real kube-apiserver and
//! PostgreSQL 18: a pool of clients that read the Secret and reconnect in a loop sees no
//! authentication failure through two rotations, and the previous credentials stop working
//! after the grace period. Then a failover: the new primary takes the declarative work over.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use api::postgres_user::{PostgresUser, ROTATE_PASSWORD_ANNOTATION};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::{TestCluster, eventually};
use tokio::sync::Mutex;

const STARTUP: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(60);
const GRACE_SECONDS: u64 = 6;

async fn credentials(secrets: &Api<Secret>) -> Option<(String, String)> {
    let secret = secrets.get_opt("app-credentials").await.ok()??;
    let data = secret.data?;
    let field = |key: &str| {
        data.get(key)
            .map(|value| String::from_utf8_lossy(&value.0).into_owned())
    };
    Some((field("username")?, field("password")?))
}

/// Connects and runs `SELECT current_user`; the SQLSTATE when refused.
async fn session(port: u16, user: &str, password: &str) -> Result<String, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|error| {
            error
                .as_db_error()
                .map(|db| db.code().code().to_string())
                .unwrap_or_else(|| error.to_string())
        })?;
    tokio::spawn(connection);
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .map(|row| row.get(0))
        .map_err(|error| error.to_string())
}

async fn rotate(users: &Api<PostgresUser>, token: &str) {
    users
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {ROTATE_PASSWORD_ANNOTATION: token}}
            })),
        )
        .await
        .unwrap();
}

async fn active_login(users: &Api<PostgresUser>) -> Option<String> {
    users.get("app").await.ok()?.status?.active_login
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_pool_sees_no_authentication_failure_through_rotations() {
    // SAFETY: set before any instance starts, in the only test of this binary.
    unsafe { std::env::set_var("DECLARATIVE_RESYNC_SECONDS", "1") };
    let mut cluster = TestCluster::start("rot", 2, 0).await.unwrap();
    cluster.api.install_crds(&api::all_crds()).await.unwrap();
    for index in 0..2 {
        cluster.stop_instance(index);
        cluster.start_instance(index).unwrap();
    }
    let primary = cluster
        .wait_for_primary_with_replicas(1, STARTUP)
        .await
        .unwrap();
    let port = cluster.instances[primary].pg_port;
    let users: Api<PostgresUser> = Api::namespaced(cluster.client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), "default");
    let user: PostgresUser = serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "PostgresUser",
        "metadata": {"name": "app"},
        "spec": {
            "cluster": {"name": "rot"},
            "roleName": "app_owner",
            "password": {
                "secretName": "app-credentials",
                "generate": true,
                "rotationDays": 30,
                "rotationGraceSeconds": GRACE_SECONDS,
            },
        },
    }))
    .unwrap();
    users.create(&PostParams::default(), &user).await.unwrap();
    eventually("the first credentials work", SETTLE, || async {
        match credentials(&secrets).await {
            Some((user, password)) => session(port, &user, &password).await.is_ok(),
            None => false,
        }
    })
    .await
    .unwrap();
    let (first_user, first_password) = credentials(&secrets).await.unwrap();
    assert_eq!(first_user, "app_owner_a");
    assert_eq!(
        session(port, &first_user, &first_password).await.unwrap(),
        "app_owner",
        "login roles act as the group (SET ROLE on login)"
    );

    // The pool: each client reads the Secret (as a mounted file would be read) and reconnects.
    let stop = Arc::new(AtomicBool::new(false));
    let successes = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let logins = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, successes, failures, logins, secrets) = (
            stop.clone(),
            successes.clone(),
            failures.clone(),
            logins.clone(),
            secrets.clone(),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Some((user, password)) = credentials(&secrets).await else {
                    failures
                        .lock()
                        .await
                        .push("the Secret could not be read".into());
                    continue;
                };
                match session(port, &user, &password).await {
                    Ok(_) => {
                        successes.fetch_add(1, Ordering::SeqCst);
                        logins.lock().await.insert(user);
                    }
                    Err(error) => failures.lock().await.push(format!("{user}: {error}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rotate(&users, "first").await;
    eventually(
        "the first rotation switches to app_owner_b",
        SETTLE,
        || async { active_login(&users).await.as_deref() == Some("app_owner_b") },
    )
    .await
    .unwrap();
    let (second_user, second_password) = credentials(&secrets).await.unwrap();
    assert_eq!(second_user, "app_owner_b");
    tokio::time::sleep(Duration::from_secs(GRACE_SECONDS + 2)).await;
    assert_eq!(
        session(port, &first_user, &first_password).await,
        Err("28P01".into()),
        "the first credentials stopped working after the grace period"
    );
    rotate(&users, "second").await;
    eventually(
        "the second rotation switches back to app_owner_a",
        SETTLE,
        || async { active_login(&users).await.as_deref() == Some("app_owner_a") },
    )
    .await
    .unwrap();
    let (third_user, third_password) = credentials(&secrets).await.unwrap();
    assert_eq!(third_user, "app_owner_a");
    assert_ne!(
        third_password, first_password,
        "a rotation brings a new password"
    );
    tokio::time::sleep(Duration::from_secs(GRACE_SECONDS + 2)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }

    let failures = failures.lock().await.clone();
    let successes = successes.load(Ordering::SeqCst);
    println!(
        "rotation under load: sessions={successes} failures={}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "client failures during rotation: {failures:?}"
    );
    assert!(
        successes > 20,
        "the pool kept connecting ({successes} sessions)"
    );
    assert_eq!(
        *logins.lock().await,
        BTreeSet::from(["app_owner_a".to_string(), "app_owner_b".to_string()]),
        "the pool used both login roles"
    );
    assert_eq!(
        session(port, &second_user, &second_password).await,
        Err("28P01".into()),
        "the second credentials stopped working after the grace period"
    );
    assert_eq!(
        session(port, &third_user, &third_password).await.unwrap(),
        "app_owner"
    );
    let log = cluster.instances[primary].log();
    for password in [&first_password, &second_password, &third_password] {
        assert!(
            !log.contains(password.as_str()),
            "pg-instance logged a password"
        );
    }

    // Failover: the replica becomes primary and takes over (the old primary is killed).
    let old_primary = cluster.instances[primary].name.clone();
    cluster.kill_instance(primary);
    let new_primary = cluster
        .wait_for_new_primary(&old_primary, STARTUP)
        .await
        .unwrap();
    let new_port = cluster.instances[new_primary].pg_port;
    users
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"attributes": {"connectionLimit": 7}}})),
        )
        .await
        .unwrap();
    let promoted = cluster.connect(new_primary).await.unwrap();
    eventually("the new primary applies the change", SETTLE, || async {
        promoted
            .query_one(
                "SELECT rolconnlimit FROM pg_roles WHERE rolname = 'app_owner_a'",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, i32>(0) == 7)
    })
    .await
    .unwrap();
    let (user, password) = credentials(&secrets).await.unwrap();
    assert_eq!(
        session(new_port, &user, &password).await.unwrap(),
        "app_owner"
    );
}
