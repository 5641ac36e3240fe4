//! PostgresUser and PostgresDatabase reconciled by `pg-instance` under a real kube-apiserver and
//! PostgreSQL 18: generated and user-given password Secrets, status and conditions (with
//! PostgreSQL's SQLSTATE verbatim), periodic drift repair, create-only fields, both reclaim
//! policies, and no password in any log or status.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use api::postgres_database::PostgresDatabase;
use api::postgres_user::PostgresUser;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use support::{TestCluster, eventually};

const STARTUP: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(60);

fn user(name: &str, spec: serde_json::Value) -> PostgresUser {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "PostgresUser",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

async fn secret_data(secrets: &Api<Secret>, name: &str) -> Option<BTreeMap<String, String>> {
    let secret = secrets.get_opt(name).await.ok()??;
    Some(
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, String::from_utf8_lossy(&value.0).into_owned()))
            .collect(),
    )
}

/// The Ready condition as (status, reason, message).
async fn ready(users: &Api<PostgresUser>, name: &str) -> Option<(String, String, String)> {
    let user = users.get_opt(name).await.ok()??;
    user.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason, c.message))
}

/// The Ready condition of a PostgresDatabase as (status, reason, message).
async fn database_ready(
    databases: &Api<PostgresDatabase>,
    name: &str,
) -> Option<(String, String, String)> {
    let database = databases.get_opt(name).await.ok()??;
    database
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status, c.reason, c.message))
}

async fn login(port: u16, user: &str, password: &str) -> bool {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(3));
    config.connect(tokio_postgres::NoTls).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_applies_postgres_users_and_databases_with_status_and_reclaim_policies() {
    // Drift is repaired on a 2 s period here (60 s by default).
    // SAFETY: set before any instance starts, in the only test of this binary.
    unsafe { std::env::set_var("DECLARATIVE_RESYNC_SECONDS", "2") };
    let mut cluster = TestCluster::start("decl", 1, 0).await.unwrap();
    cluster.api.install_crds(&api::all_crds()).await.unwrap();
    // Restarted after the CRDs exist, so its watches start at once.
    cluster.stop_instance(0);
    cluster.start_instance(0).unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, STARTUP)
        .await
        .unwrap();
    let port = cluster.instances[primary].pg_port;
    let superuser = cluster.connect(primary).await.unwrap();
    let users: Api<PostgresUser> = Api::namespaced(cluster.client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), "default");

    // 1. A generated password in a Secret the PostgresUser owns, with the connection keys.
    users
        .create(
            &PostParams::default(),
            &user(
                "shop-owner",
                serde_json::json!({
                    "cluster": {"name": "decl"},
                    "roleName": "shop_owner",
                    "attributes": {"createDb": true, "connectionLimit": 9},
                    "password": {"secretName": "shop-owner-credentials", "generate": true, "database": "shop"},
                    "reclaimPolicy": "Delete",
                }),
            ),
        )
        .await
        .unwrap();
    eventually("shop-owner is Ready", SETTLE, || async {
        ready(&users, "shop-owner")
            .await
            .is_some_and(|(status, _, _)| status == "True")
    })
    .await
    .unwrap();
    let data = secret_data(&secrets, "shop-owner-credentials")
        .await
        .unwrap();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "dbname", "host", "jdbc-uri", "password", "pgpass", "port", "uri", "username"
        ]
    );
    assert_eq!(data["username"], "shop_owner");
    assert_eq!(data["host"], "decl-rw.default.svc");
    assert_eq!(data["dbname"], "shop");
    let generated = data["password"].clone();
    assert!(
        login(port, "shop_owner", &generated).await,
        "the generated password works"
    );
    let status = users.get("shop-owner").await.unwrap().status.unwrap();
    assert!(status.password_set_at.is_some());
    assert!(status.applied_at.is_some());
    assert!(
        status.applied[0].starts_with("CREATE ROLE \"shop_owner\""),
        "{:?}",
        status.applied
    );
    let secret = secrets.get("shop-owner-credentials").await.unwrap();
    assert_eq!(
        secret.metadata.owner_references.unwrap()[0].name,
        "shop-owner",
        "the generated Secret goes with its PostgresUser"
    );

    // An expiry that is not RFC 3339 is refused by the API server, with a message.
    let refused = users
        .create(
            &PostParams::default(),
            &user(
                "bad-expiry",
                serde_json::json!({
                    "cluster": {"name": "decl"}, "roleName": "bad", "validUntil": "tomorrow"
                }),
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("validUntil must be an RFC 3339 time"),
        "{refused}"
    );

    // 2. Drift repair: a change by hand is undone by the periodic reconcile.
    superuser
        .batch_execute("ALTER ROLE shop_owner NOCREATEDB CONNECTION LIMIT 1")
        .await
        .unwrap();
    eventually("the drift is repaired", SETTLE, || async {
        superuser
            .query_one(
                "SELECT rolcreatedb AND rolconnlimit = 9 FROM pg_roles WHERE rolname = 'shop_owner'",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0))
    })
    .await
    .unwrap();

    // 3. A password from the user's Secret: missing first (a condition), then used, then changed.
    users
        .create(
            &PostParams::default(),
            &user(
                "reporter",
                serde_json::json!({
                    "cluster": {"name": "decl"},
                    "roleName": "reporter",
                    "password": {"secretName": "reporter-password"},
                }),
            ),
        )
        .await
        .unwrap();
    eventually("reporter says its Secret is missing", SETTLE, || async {
        ready(&users, "reporter")
            .await
            .is_some_and(|(status, reason, message)| {
                status == "False"
                    && reason == "SecretProblem"
                    && message.contains("reporter-password")
            })
    })
    .await
    .unwrap();
    let given = |password: &str| -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reporter-password"},
            "stringData": {"password": password},
        }))
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &given("first'Pass\\word;"))
        .await
        .unwrap();
    eventually(
        "reporter logs in with the given password",
        SETTLE,
        || async { login(port, "reporter", "first'Pass\\word;").await },
    )
    .await
    .unwrap();
    secrets
        .replace("reporter-password", &PostParams::default(), &{
            let mut secret = given("second-Pass");
            secret.metadata.resource_version = secrets
                .get("reporter-password")
                .await
                .unwrap()
                .metadata
                .resource_version;
            secret
        })
        .await
        .unwrap();
    eventually("a changed Secret changes the password", SETTLE, || async {
        login(port, "reporter", "second-Pass").await
    })
    .await
    .unwrap();
    assert!(!login(port, "reporter", "first'Pass\\word;").await);

    // 4. PostgreSQL's refusal, verbatim, in the condition.
    users
        .patch(
            "reporter",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"memberOf": [{"role": "ghost"}]}})),
        )
        .await
        .unwrap();
    eventually("the SQLSTATE reaches the condition", SETTLE, || async {
        ready(&users, "reporter")
            .await
            .is_some_and(|(status, reason, message)| {
                status == "False"
                    && reason == "SqlError"
                    && message.contains("SQLSTATE 42704: role \"ghost\" does not exist")
            })
    })
    .await
    .unwrap();

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client.clone(), "default");
    eventually("a Warning event says what failed", SETTLE, || async {
        events.list(&Default::default()).await.is_ok_and(|list| {
            list.items.iter().any(|event| {
                event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("reporter")
                    && event.type_.as_deref() == Some("Warning")
                    && event.reason.as_deref() == Some("SqlError")
                    && event
                        .note
                        .as_deref()
                        .is_some_and(|note| note.contains("SQLSTATE 42704"))
            })
        })
    })
    .await
    .unwrap();

    // 5. A database with a schema and privileges, kept as declared.
    let databases: Api<PostgresDatabase> = Api::namespaced(cluster.client.clone(), "default");
    let database: PostgresDatabase = serde_json::from_value(serde_json::json!({
        "apiVersion": "postgres.keiailab.io/v1alpha1",
        "kind": "PostgresDatabase",
        "metadata": {"name": "shop"},
        "spec": {
            "cluster": {"name": "decl"},
            "name": "shop",
            "owner": "shop_owner",
            "template": "template0",
            "schemas": [{"name": "sales", "privileges": [{"role": "reporter", "schema": ["USAGE"], "tables": ["SELECT"]}]}],
            "privileges": [{"role": "reporter", "privileges": ["CONNECT"]}],
            "revokePublic": true,
            "reclaimPolicy": "Delete",
        },
    }))
    .unwrap();
    databases
        .create(&PostParams::default(), &database)
        .await
        .unwrap();
    eventually("shop is Ready", SETTLE, || async {
        database_ready(&databases, "shop")
            .await
            .is_some_and(|(status, _, _)| status == "True")
    })
    .await
    .unwrap();
    let status = databases.get("shop").await.unwrap().status.unwrap();
    assert!(
        status.applied[0].starts_with("CREATE DATABASE \"shop\""),
        "{:?}",
        status.applied
    );
    assert_eq!(
        status.created_with.unwrap().template.as_deref(),
        Some("template0")
    );
    let shop = support::connect_port_database(port, "shop").await.unwrap();
    shop.batch_execute("DROP SCHEMA sales").await.unwrap();
    eventually("the dropped schema comes back", SETTLE, || async {
        shop.query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'sales'",
            &[],
        )
        .await
        .is_ok_and(|row| row.get::<_, i64>(0) == 1)
    })
    .await
    .unwrap();
    databases
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": "template1"}})),
        )
        .await
        .unwrap();
    eventually("a changed template is reported", SETTLE, || async {
        database_ready(&databases, "shop")
            .await
            .is_some_and(|(status, reason, _)| {
                status == "False" && reason == "CreateOnlyFieldChanged"
            })
    })
    .await
    .unwrap();
    databases
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": "template0"}})),
        )
        .await
        .unwrap();
    // Deleting while a session is connected is refused, with a condition; then it goes.
    databases
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the delete is refused while shop has a session",
        SETTLE,
        || async {
            database_ready(&databases, "shop")
                .await
                .is_some_and(|(_, reason, message)| {
                    reason == "DeleteRefused" && message.contains("1 session(s)")
                })
        },
    )
    .await
    .unwrap();
    drop(shop);
    eventually("shop is dropped", SETTLE, || async {
        databases.get_opt("shop").await.is_ok_and(|d| d.is_none())
    })
    .await
    .unwrap();
    let left: i64 = superuser
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // 6. Reclaim policies: Retain keeps the role, Delete drops it (then the object goes).
    users
        .delete("reporter", &DeleteParams::default())
        .await
        .unwrap();
    users
        .delete("shop-owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually("shop-owner is gone with its role", SETTLE, || async {
        users.get_opt("shop-owner").await.is_ok_and(|u| u.is_none())
    })
    .await
    .unwrap();
    let roles: Vec<String> = superuser
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname IN ('shop_owner', 'reporter')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        roles,
        ["reporter"],
        "Retain kept reporter; Delete dropped shop_owner"
    );

    // 7. No password in the instance manager's log or in any status.
    let log = cluster.instances[primary].log();
    for password in [generated.as_str(), "first'Pass", "second-Pass"] {
        assert!(!log.contains(password), "pg-instance logged a password");
    }
    let statuses = serde_json::to_string(&users.list(&Default::default()).await.unwrap()).unwrap();
    assert!(!statuses.contains("second-Pass") && !statuses.contains("SCRAM-SHA-256$"));
}
