//! The `postgres-operator` binary against a real API server: /healthz, /readyz and /metrics,
//! leader election between two replicas (only the holder reconciles; a crash hands over; a
//! leader cut off from the API server steps down before a standby takes over), and a clean
//! shutdown that releases the Lease; a leader whose connections die without a word keeps the
//! Lease and its watches.

mod common;

use std::process::{Child, Command, Stdio};

use common::{Env, spec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
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
    start_operator_with(env, identity, &env.server.kubeconfig_path())
}

/// An operator replica that reaches the API server through `kubeconfig`, with a 3 s Lease.
fn start_operator_with(env: &Env, identity: &str, kubeconfig: &std::path::Path) -> Operator {
    start_operator_args(
        env,
        identity,
        kubeconfig,
        &["--lease-duration-seconds", "3"],
    )
}

/// An operator replica that reaches the API server through `kubeconfig`, with `args` added.
fn start_operator_args(
    env: &Env,
    identity: &str,
    kubeconfig: &std::path::Path,
    args: &[&str],
) -> Operator {
    let port = testbed::free_port();
    let log = std::fs::File::create(env.server.dir().join(format!("{identity}.log"))).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_postgres-operator"));
    command
        .env("KUBECONFIG", kubeconfig)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--identity", identity])
        .args(["--lease-namespace", "default"])
        .args(args)
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
    lease(env).await?.holder_identity
}

async fn lease(env: &Env) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    leases.get_opt("postgres-operator-leader").await.ok()??.spec
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

/// When the leader's line "leadership lost" was logged (its JSON log's timestamp).
fn leadership_lost_at(log: &str) -> Option<Timestamp> {
    log.lines()
        .filter(|line| line.contains("leadership lost"))
        .find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            entry["timestamp"].as_str()?.parse().ok()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_a_standby_takes_over() {
    let env = Env::without_controller("apps").await;
    // The leader reaches the API server through a proxy the test can black-hole: requests are
    // neither answered nor refused, as when packets are dropped.
    let kubeconfig = env.server.dir().join("kubeconfig-through-proxy");
    let proxy = env.server.proxied_kubeconfig(&kubeconfig).unwrap();
    let mut leader = start_operator_with(&env, "operator-cut", &kubeconfig);
    env.eventually("operator-cut holds the Lease", || async {
        (holder(&env).await? == "operator-cut").then_some(())
    })
    .await;
    let standby = start_operator(&env, "operator-standby");
    env.eventually("operator-standby ready as a standby", || async {
        (get(&standby, "/readyz").await? == (200, "ok".to_string())).then_some(())
    })
    .await;
    assert_eq!(holder(&env).await.as_deref(), Some("operator-cut"));

    proxy.black_hole();
    let cut_at = Timestamp::now();
    env.eventually("operator-standby takes over", || async {
        (holder(&env).await? == "operator-standby").then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let lease = leases.get("postgres-operator-leader").await.unwrap();
    let taken_at = lease.spec.unwrap().acquire_time.unwrap().0;

    // The cut-off leader gave up within its renew deadline (2 s of a 3 s Lease) and exited,
    // before the standby's takeover: never two leaders at once.
    let log_path = env.server.dir().join("operator-cut.log");
    let lost_at = env
        .eventually("operator-cut logs that it lost leadership", || async {
            leadership_lost_at(&std::fs::read_to_string(&log_path).ok()?)
        })
        .await;
    assert!(
        lost_at < taken_at,
        "operator-cut stepped down at {lost_at}, after operator-standby took the Lease at {taken_at}"
    );
    println!(
        "leader_stepped_down_after_cut_ms={} standby_took_over_after_cut_ms={}",
        lost_at.duration_since(cut_at).as_millis(),
        taken_at.duration_since(cut_at).as_millis()
    );
    let exited = env
        .eventually("operator-cut exits", || {
            let status = leader.child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
    assert!(
        !exited.success(),
        "losing leadership is a failure exit: {exited:?}"
    );
    proxy.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_api_connections_die_silently_keeps_the_lease_and_sees_new_clusters() {
    let env = Env::without_controller("stranded").await;
    // Every connection the operator has open goes silent at once while new ones go through, as
    // when a load balancer or NAT forgets them: its watches, its pooled connections and the one
    // its Lease renewals use.
    let kubeconfig = env.server.dir().join("kubeconfig-through-proxy");
    let proxy = env.server.proxied_kubeconfig(&kubeconfig).unwrap();
    let identity = "operator-stranded";
    let mut operator = start_operator_args(
        &env,
        identity,
        &kubeconfig,
        &[
            "--lease-duration-seconds",
            "15",
            "--api-timeout-seconds",
            "15",
        ],
    );
    env.eventually("operator-stranded holds the Lease", || async {
        (holder(&env).await? == identity).then_some(())
    })
    .await;
    env.create_cluster("before", spec(1, "pg:18.1")).await;
    let _: StatefulSet = env.object("before").await;
    let transitions = lease(&env).await.unwrap().lease_transitions;

    proxy.strand();
    let stranded_at = std::time::Instant::now();
    env.create_cluster("after", spec(1, "pg:18.1")).await;
    let _: StatefulSet = env.object("after").await;
    println!(
        "stranded_new_cluster_reconciled_after_ms={}",
        stranded_at.elapsed().as_millis()
    );

    // Still the leader it was: no exit, no handover, not even to itself.
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator exited"
    );
    let after = lease(&env).await.unwrap();
    assert_eq!(after.holder_identity.as_deref(), Some(identity));
    assert_eq!(after.lease_transitions, transitions);
    // A renewal went to a dead connection, was given up and made again in time.
    let log = std::fs::read_to_string(env.server.dir().join(format!("{identity}.log"))).unwrap();
    assert!(
        log.contains("renewing the leader Lease got no answer")
            || log.contains("renewing the leader Lease failed"),
        "no renewal went to a dead connection: the test did not test it"
    );
}
