//! The `postgres-operator` binary against a real API server: /healthz, /readyz and /metrics,
//! leader election between two replicas (only the holder reconciles; a crash hands over), and a
//! clean shutdown that releases the Lease.

mod common;

use std::process::{Child, Command, Stdio};

use common::{Env, spec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

struct Operator {
    child: Child,
    port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_operator(env: &Env, identity: &str) -> Operator {
    let port = testbed::free_port();
    let log = std::fs::File::create(env.server.dir().join(format!("{identity}.log"))).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_postgres-operator"));
    command
        .env("KUBECONFIG", env.server.kubeconfig_path())
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--identity", identity])
        .args(["--lease-namespace", "default"])
        .args(["--lease-duration-seconds", "3"])
        .args(["--log-json"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    testbed::process::die_with_parent(&mut command);
    Operator {
        child: command.spawn().expect("starting postgres-operator"),
        port,
    }
}

/// GET `path` on the operator: (status code, body), or None while it does not answer.
async fn get(operator: &Operator, path: &str) -> Option<(u16, String)> {
    testbed::http::request(operator.port, "GET", path)
        .await
        .ok()
}

async fn holder(env: &Env) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    leases
        .get_opt("postgres-operator-leader")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_serve_health_and_metrics_and_hand_over() {
    let env = Env::without_controller("apps").await;
    let first = start_operator(&env, "operator-a");
    env.eventually("operator-a ready", || async {
        (get(&first, "/readyz").await? == (200, "ok".to_string())).then_some(())
    })
    .await;
    assert_eq!(get(&first, "/healthz").await.unwrap().0, 200);
    env.eventually("operator-a holds the Lease", || async {
        (holder(&env).await? == "operator-a").then_some(())
    })
    .await;

    let second = start_operator(&env, "operator-b");
    env.eventually("operator-b ready as a standby", || async {
        (get(&second, "/readyz").await? == (200, "ok".to_string())).then_some(())
    })
    .await;
    let standby_metrics = get(&second, "/metrics").await.unwrap().1;
    assert!(
        standby_metrics.contains("postgres_operator_leader 0"),
        "{standby_metrics}"
    );

    // The leader reconciles, and counts it.
    env.create_cluster("one", spec(1, "pg:18.1")).await;
    let _: StatefulSet = env.object("one").await;
    env.eventually("reconciles counted on the leader", || async {
        let metrics = get(&first, "/metrics").await?.1;
        (metrics.contains("postgres_operator_leader 1")
            && metrics.contains("postgres_operator_reconciles_total{controller=\"postgrescluster\",result=\"success\"}"))
        .then_some(())
    })
    .await;
    let standby_metrics = get(&second, "/metrics").await.unwrap().1;
    assert!(
        !standby_metrics.contains("postgres_operator_reconciles_total{"),
        "the standby does not reconcile: {standby_metrics}"
    );

    // Generated passwords never reach the logs.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = env.api();
    let mut passwords = Vec::new();
    for secret in ["one-superuser", "one-replication", "one-app"] {
        let secret = env
            .eventually(&format!("Secret {secret}"), || {
                let secrets = secrets.clone();
                async move { secrets.get_opt(secret).await.ok()? }
            })
            .await;
        let password = secret.data.unwrap()["password"].0.clone();
        passwords.push(String::from_utf8(password).unwrap());
    }
    let log = std::fs::read_to_string(env.server.dir().join("operator-a.log")).unwrap();
    assert!(
        log.contains("generated credentials Secret"),
        "the log is there: {log}"
    );
    for password in &passwords {
        assert!(!log.contains(password.as_str()), "a password is in the log");
    }

    // The leader crashes: the standby takes the expired Lease and reconciles.
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    env.eventually("operator-b takes over", || async {
        (holder(&env).await? == "operator-b").then_some(())
    })
    .await;
    env.create_cluster("two", spec(1, "pg:18.1")).await;
    let _: StatefulSet = env.object("two").await;

    // SIGTERM: a clean exit that gives the Lease up.
    let mut second = second;
    kill(Pid::from_raw(second.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = second.child.wait().unwrap();
        drop(second);
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    env.eventually("the Lease released", || async {
        holder(&env).await.is_none().then_some(())
    })
    .await;
}
