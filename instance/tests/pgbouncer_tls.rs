//! A real PgBouncer (Debian's 1.18, what the Pooler image ships) in front of a TLS cluster run by
//! `pg-instance` (PostgreSQL with OpenSSL, `hostssl` only), configured with the pgbouncer.ini the
//! Pooler reconciler renders plus its server TLS lines: PgBouncer verifies PostgreSQL's
//! certificate (`verify-full` against the cluster's CA and the `-rw` Service name), logs in with
//! `auth_query` over TLS and serves clients; `pg_stat_ssl` shows its server connections encrypted.
//! With a CA that did not sign the server certificate, or a host name the certificate does not
//! carry, PgBouncer refuses to connect and the client gets an error. The instance managers' probe
//! of the rw Service (PAUSE/RESUME) logs in over TLS verified the same way.
//!
//! PgBouncer also serves its clients over TLS with the Pooler's own certificate (issued from the
//! cluster's CA for the Pooler's Service names, `client_tls_sslmode = require` as the reconciler
//! renders it by default): a client verifying `verify-full` against the cluster's CA and the
//! Pooler's Service name gets in, a plain-text client and a client expecting another name do not.
//!
//! The test cannot add DNS names, so PgBouncer reaches the Service by its short name (one of the
//! certificate's names) resolved to the loopback address through c-ares's `HOSTALIASES`.

mod support;

use std::path::Path;
use std::time::Duration;

use api::common::ClusterReference;
use api::contract;
use api::pooler::ClientTlsMode;
use api::pooler::{PgBouncerSpec, PoolMode, Pooler, PoolerSpec, PoolerType};
use api::postgres_cluster::{PostgresCluster, PostgresClusterSpec};
use controllers::pooler::builders::{Target, auth_file_line, pgbouncer_ini};
use controllers::tls::certificates::{self, Issued, Leaf};
use controllers::tls::pooler::{
    CA_MOUNT_PATH, CLIENT_TLS_MOUNT_PATH, client_tls_lines, client_tls_mode, server_tls_lines,
};
use instance::pooler::pause::{RwTls, is_writable};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use support::{TestCluster, eventually};
use testbed::pgbouncer::PgBouncer;

const NAME: &str = "tls";
const NAMESPACE: &str = "default";
const AUTH_PASSWORD: &str = "pool'auth\"tls";
/// The application role of test clusters (support/mod.rs creates its Secret).
const APP_USER: &str = "app";
const APP_PASSWORD: &str = "app-pass";
/// The Pooler's Service name, as a client in the namespace verifies it.
const POOLER_SERVICE: &str = "pool.default.svc";

/// Writes `content` readable by everyone (PgBouncer runs as the unprivileged user).
fn write_public(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
}

/// Issues a server and a replication certificate from `ca` into `dir` as the operator's two
/// Secrets would be mounted.
fn mount_certificates(dir: &Path, ca: &Issued) {
    let now = time::OffsetDateTime::now_utc();
    let lifetime = Duration::from_secs(3600);
    let server = Leaf::Server {
        cluster: NAME.into(),
        names: certificates::server_dns_names(NAME, NAMESPACE),
    };
    let replication = Leaf::Client {
        user: contract::REPLICATION_USER.into(),
    };
    for (folder, leaf) in [("server", server), ("replication", replication)] {
        let issued = certificates::issue(ca, &leaf, now, lifetime).unwrap();
        let folder = dir.join(folder);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("ca.crt"), &ca.certificate_pem).unwrap();
        std::fs::write(folder.join("tls.key"), &issued.key_pem).unwrap();
        std::fs::write(folder.join("tls.crt"), &issued.certificate_pem).unwrap();
    }
}

fn pooler() -> Pooler {
    let mut pooler = Pooler::new(
        "pool",
        PoolerSpec {
            cluster: ClusterReference { name: NAME.into() },
            type_: PoolerType::Rw,
            instances: 1,
            pgbouncer: PgBouncerSpec {
                pool_mode: PoolMode::Session,
                ..PgBouncerSpec::default()
            },
            resources: None,
            service: None,
        },
    );
    pooler.metadata.namespace = Some(NAMESPACE.into());
    pooler
}

/// Issues the Pooler's server certificate from `ca` into `dir` as its Secret would be mounted.
fn mount_pooler_certificate(dir: &Path, ca: &Issued) {
    let leaf = Leaf::Pooler {
        pooler: "pool".into(),
        names: certificates::pooler_dns_names("pool", NAMESPACE),
    };
    let now = time::OffsetDateTime::now_utc();
    let issued = certificates::issue(ca, &leaf, now, Duration::from_secs(3600)).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    write_public(&dir.join("tls.crt"), &issued.certificate_pem);
    write_public(&dir.join("tls.key"), &issued.key_pem);
}

/// A PgBouncer with the reconciler's pgbouncer.ini and TLS lines, reaching the primary at
/// `host` (resolved to 127.0.0.1 by `aliases`) and trusting the CA in `ca_dir/ca.crt`, serving
/// its clients with the certificate in `client_tls_dir` (the Pooler pod's mount paths replaced
/// by the test's folders).
fn bouncer(
    host: &str,
    port: u16,
    aliases: &Path,
    ca_dir: &Path,
    client_tls_dir: &Path,
) -> PgBouncer {
    let mut bouncer = PgBouncer::prepare().unwrap();
    let target = Target {
        host: host.into(),
        port,
        listen_addr: "127.0.0.1".into(),
        listen_port: bouncer.port(),
        auth_file: bouncer.auth_file().display().to_string(),
        unix_socket_dir: String::new(),
    };
    let cluster = PostgresCluster::new(NAME, PostgresClusterSpec::with_image(1, "pg"));
    let tls = server_tls_lines(&cluster);
    assert!(tls.contains("server_tls_sslmode = verify-full"), "{tls}");
    let mode = client_tls_mode(&pooler(), &cluster).unwrap();
    assert_eq!(mode, ClientTlsMode::Required);
    let ini = pgbouncer_ini(&pooler(), &target)
        + &tls.replace(CA_MOUNT_PATH, &ca_dir.display().to_string())
        + &client_tls_lines(mode)
            .replace(CLIENT_TLS_MOUNT_PATH, &client_tls_dir.display().to_string())
        // A client of a PgBouncer that cannot log in to the server gets its error when the
        // query wait times out (120 s by default): the refusals below need not wait that long.
        + "query_wait_timeout = 5\n";
    bouncer.env("HOSTALIASES", &aliases.display().to_string());
    bouncer.start(&ini, &auth_file_line(AUTH_PASSWORD)).unwrap();
    bouncer
}

fn client_config(port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_USER)
        .connect_timeout(Duration::from_secs(20));
    config
}

/// Connects to PgBouncer at `port` over TLS, verifying it as `verify-full` would: chained to
/// `ca_pem` and named `server_name`.
async fn connect_tls(
    port: u16,
    ca_pem: &str,
    server_name: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = testbed::pg_tls::VerifyFull::new(ca_pem, server_name).unwrap();
    let (client, connection) = client_config(port)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(tls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connects to PgBouncer at `port` without TLS.
async fn connect_plain(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = client_config(port)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbouncer_verifies_the_cluster_certificate_and_serves_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca = certificates::new_ca(NAME, NAMESPACE, now, Duration::from_secs(86400)).unwrap();
    let certs = dir.path().join("certs");
    mount_certificates(&certs, &ca);
    let cluster = TestCluster::start_with_tls(NAME, 1, &certs, &ca.certificate_pem)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(0, Duration::from_secs(120))
        .await
        .unwrap();
    let pg_port = cluster.instances[primary].pg_port;

    // What the operator makes for the cluster's first Pooler: its auth Secret; the primary's
    // instance manager creates the auth role and lookup function from it.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": contract::pooler_auth_secret(NAME)},
        "stringData": {"username": contract::POOLER_AUTH_USER, "password": AUTH_PASSWORD},
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let admin = cluster.connect(primary).await.unwrap();
    eventually(
        "the pooler auth function exists",
        Duration::from_secs(40),
        || {
            let admin = &admin;
            async move {
                admin
                    .query_opt(
                        "SELECT 1 FROM pg_proc WHERE proname = $1 AND prosecdef",
                        &[&contract::POOLER_AUTH_FUNCTION],
                    )
                    .await
                    .is_ok_and(|row| row.is_some())
            }
        },
    )
    .await
    .unwrap();

    // The instance managers' probe of the rw Service (when to RESUME paused Poolers) logs in over
    // TLS verified against the mounted CA; without TLS the cluster refuses it.
    let rw_address = format!("127.0.0.1:{pg_port}");
    let rw_tls = RwTls {
        ca_file: certs.join("server").join("ca.crt"),
        server_name: format!("{}.{NAMESPACE}.svc", contract::rw_service(NAME)),
    };
    assert!(is_writable(&rw_address, Some(&rw_tls), AUTH_PASSWORD).await);
    assert!(!is_writable(&rw_address, None, AUTH_PASSWORD).await);
    let wrong_name = RwTls {
        server_name: "db.example.org".into(),
        ..rw_tls.clone()
    };
    assert!(!is_writable(&rw_address, Some(&wrong_name), AUTH_PASSWORD).await);

    // Short Service names (certificate names) to the loopback address, for c-ares.
    let rw = contract::rw_service(NAME);
    let aliases = dir.path().join("hostaliases");
    write_public(&aliases, &format!("{rw} localhost\nelsewhere localhost\n"));
    let right_ca = dir.path().join("right");
    std::fs::create_dir_all(&right_ca).unwrap();
    write_public(&right_ca.join("ca.crt"), &ca.certificate_pem);
    let pooler_tls = dir.path().join("pooler-tls");
    mount_pooler_certificate(&pooler_tls, &ca);

    // verify-full to the -rw name against the cluster's CA: auth_query and the client's session
    // run over TLS. The client verifies PgBouncer in turn: the cluster's CA and the Pooler's
    // Service name.
    let good = bouncer(&rw, pg_port, &aliases, &right_ca, &pooler_tls);
    let client = connect_tls(good.port(), &ca.certificate_pem, POOLER_SERVICE)
        .await
        .unwrap_or_else(|error| panic!("through PgBouncer: {error}\n{}", good.log()));
    let rows = client
        .simple_query(
            "SELECT current_user, ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                row.get(0).unwrap().to_string(),
                row.get(1).unwrap().to_string(),
            )),
            _ => None,
        })
        .unwrap();
    assert_eq!(row, (APP_USER.to_string(), "true".to_string()));
    // Every connection PgBouncer holds to PostgreSQL (its auth_query login included) is TLS.
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename IN ($1, $2)",
            &[&APP_USER, &contract::POOLER_AUTH_USER],
        )
        .await
        .unwrap();
    let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        encrypted >= 1 && plain == 0,
        "{encrypted} TLS, {plain} plain"
    );
    drop(client);

    // A client without TLS is refused (client_tls_sslmode = require), and so is a client that
    // expects another name than the Pooler's (verify-full checks the name) or trusts another CA.
    let plain = connect_plain(good.port()).await;
    let Err(refusal) = plain else {
        panic!("a plain-text client was let in");
    };
    let refusal = refusal
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| refusal.to_string());
    assert!(
        refusal.to_lowercase().contains("ssl") || refusal.contains("TLS"),
        "{refusal}"
    );
    assert!(
        connect_tls(good.port(), &ca.certificate_pem, "db-rw.default.svc")
            .await
            .is_err(),
        "PgBouncer passed for a name its certificate does not carry"
    );
    let foreign =
        certificates::new_ca("foreign", NAMESPACE, now, Duration::from_secs(86400)).unwrap();
    assert!(
        connect_tls(good.port(), &foreign.certificate_pem, POOLER_SERVICE)
            .await
            .is_err(),
        "PgBouncer passed with a CA that did not sign its certificate"
    );
    // A CA that did not sign the server certificate: PgBouncer refuses the server.
    let other = certificates::new_ca("other", NAMESPACE, now, Duration::from_secs(86400)).unwrap();
    let wrong_ca = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong_ca).unwrap();
    write_public(&wrong_ca.join("ca.crt"), &other.certificate_pem);
    let untrusted = bouncer(&rw, pg_port, &aliases, &wrong_ca, &pooler_tls);
    assert!(
        connect_tls(untrusted.port(), &ca.certificate_pem, POOLER_SERVICE)
            .await
            .is_err(),
        "a server signed by another CA was trusted:\n{}",
        untrusted.log()
    );
    assert!(
        untrusted.log().contains("certificate verify failed"),
        "{}",
        untrusted.log()
    );

    // A host name the certificate does not carry: refused too (verify-full checks the name).
    let misnamed = bouncer("elsewhere", pg_port, &aliases, &right_ca, &pooler_tls);
    assert!(
        connect_tls(misnamed.port(), &ca.certificate_pem, POOLER_SERVICE)
            .await
            .is_err(),
        "a server without the host's name was trusted:\n{}",
        misnamed.log()
    );
    let log = misnamed.log();
    assert!(
        log.contains("name") || log.contains("certificate verify failed"),
        "{log}"
    );
}
