//! TLS on real PostgreSQL 18 run by `pg-instance`, with certificates from the operator CA's
//! code laid out as the operator mounts them: psql with `sslmode=verify-full` to the `-rw`
//! Service name succeeds, a client without TLS is refused, the replica streams over TLS and
//! logs in with the `streaming_replica` client certificate; a renewal swaps the certificate
//! PostgreSQL presents (a client sees the new serial) with no client error, no restart and no
//! failover, and every instance exports the validity of what it installed.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api::contract;
use controllers::tls::certificates::{self, Issued, Leaf};
use support::{SUPERUSER_PASSWORD, TestCluster, connect_port_tls};

const NAME: &str = "tls";
const NAMESPACE: &str = "default";

fn write_atomically(path: &Path, content: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, content).unwrap();
    std::fs::rename(&staged, path).unwrap();
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
        write_atomically(&folder.join("ca.crt"), &ca.certificate_pem);
        write_atomically(&folder.join("tls.key"), &issued.key_pem);
        write_atomically(&folder.join("tls.crt"), &issued.certificate_pem);
    }
}

/// A certificate's expiry, Unix seconds.
fn not_after_of(der: &[u8]) -> i64 {
    instance::tls::der_validity(der)
        .expect("an X.509 certificate")
        .1
}

/// `metric{certificate="<certificate>"}` from an instance's `/metrics` text (a Unix time).
fn certificate_metric(text: &str, metric: &str, certificate: &str) -> Option<i64> {
    testbed::pooler_exporter::sample(text, metric, &[("certificate", certificate)])
        .map(|seconds| seconds as i64)
}

fn serial_of(der: &[u8]) -> String {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).unwrap();
    certificate.raw_serial_as_string()
}

/// psql with `conninfo`; (success, stdout + stderr).
fn psql(conninfo: &str, sql: &str) -> (bool, String) {
    let output = Command::new(testbed::paths::pg_bin_tls().join("psql"))
        .arg(conninfo)
        .args(["-XAtc", sql])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_verify_full_clients_certificate_replication_and_renewal_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates::new_ca(
        NAME,
        NAMESPACE,
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(86400),
    )
    .unwrap();
    mount_certificates(dir.path(), &ca);
    let ca_file = dir.path().join("server/ca.crt");
    let cluster = TestCluster::start_with_tls(NAME, 2, dir.path(), &ca.certificate_pem)
        .await
        .unwrap();
    let primary = cluster
        .wait_for_primary_with_replicas(1, Duration::from_secs(120))
        .await
        .unwrap();
    let replica = 1 - primary;
    let port = cluster.instances[primary].pg_port;
    let service = format!("{}.{NAMESPACE}.svc", contract::rw_service(NAME));

    // verify-full to the -rw Service name (reached at the loopback address) succeeds over TLS.
    let verify_full = |host: &str, sslmode: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={}",
            ca_file.display()
        )
    };
    let (ok, output) = psql(
        &verify_full(&service, "verify-full"),
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(ok, "verify-full to {service}: {output}");
    assert!(output.starts_with("t|TLSv1."), "{output}");
    let (ok, output) = psql(
        &verify_full(&service, "verify-full"),
        "SHOW ssl_min_protocol_version",
    );
    assert!(ok && output.trim() == "TLSv1.2", "{output}");
    // A name the certificate does not carry fails verification.
    let (ok, output) = psql(&verify_full("db.example.org", "verify-full"), "SELECT 1");
    assert!(!ok && output.contains("does not match"), "{output}");
    // A client without TLS is refused by hostssl.
    let (ok, output) = psql(&verify_full(&service, "disable"), "SELECT 1");
    assert!(
        !ok && output.contains("no pg_hba.conf entry") && output.contains("no encryption"),
        "{output}"
    );

    // The replica streams over TLS, logged in with the streaming_replica client certificate.
    let client = cluster.connect(primary).await.unwrap();
    let row = client
        .query_one(
            "SELECT r.usename::text, s.ssl, s.client_dn FROM pg_stat_replication r \
             JOIN pg_stat_ssl s USING (pid) WHERE r.application_name <> 'pg_basebackup'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), contract::REPLICATION_USER);
    assert!(row.get::<_, bool>(1), "replication over TLS");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("/CN=streaming_replica")
    );

    // Renewal: new files in the mounted Secrets while clients connect and query in a loop.
    let serial_before = serial_of(
        &testbed::pg_tls::server_certificate("127.0.0.1", port, &ca.certificate_pem, &service)
            .await
            .unwrap(),
    );
    let primary_pid = cluster.instances[primary].postmaster_pid();
    let replica_pid = cluster.instances[replica].postmaster_pid();
    let holder = cluster.lease_holder().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (successes, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, successes, errors) = (stop.clone(), successes.clone(), errors.clone());
        let tls = testbed::pg_tls::VerifyFull::new(&ca.certificate_pem, &service).unwrap();
        clients.push(tokio::spawn(async move {
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let client = connect_port_tls(port, tls.clone()).await?;
                    client.simple_query("SELECT 1").await?;
                    anyhow::Ok(())
                }
                .await;
                match result {
                    Ok(()) => successes.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        last_error = Some(error.to_string());
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            last_error
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mount_certificates(dir.path(), &ca);
    let renewed_at = Instant::now();
    let (serial_after, renewed) = loop {
        if let Ok(der) =
            testbed::pg_tls::server_certificate("127.0.0.1", port, &ca.certificate_pem, &service)
                .await
        {
            let serial = serial_of(&der);
            if serial != serial_before {
                break (serial, der);
            }
        }
        assert!(
            renewed_at.elapsed() < Duration::from_secs(20),
            "PostgreSQL still presents the old certificate\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let swap = renewed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last_errors = Vec::new();
    for client in clients {
        last_errors.extend(client.await.unwrap());
    }
    let (successes, errors) = (
        successes.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    println!(
        "tls_renewal_swap_ms={} tls_renewal_client_connections={successes} tls_renewal_client_errors={errors} serial {serial_before} -> {serial_after}",
        swap.as_millis()
    );
    assert_eq!(
        errors, 0,
        "client errors during the renewal: {last_errors:?}"
    );
    assert!(successes > 10, "the clients kept connecting ({successes})");
    assert_eq!(
        cluster.instances[primary].postmaster_pid(),
        primary_pid,
        "no restart of the primary"
    );
    assert_eq!(
        cluster.instances[replica].postmaster_pid(),
        replica_pid,
        "no restart of the replica"
    );
    assert_eq!(cluster.lease_holder().await.unwrap(), holder, "no failover");
    // The replica is still streaming with its certificate.
    let streaming: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE s.ssl AND r.state = 'streaming' AND r.application_name <> 'pg_basebackup'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streaming, 1);

    // Each instance exports the validity of what it installed: the renewed server certificate,
    // the replication client's, and the CA's (the PostgresCertificateExpiresSoon alert).
    let ca_der = x509_parser::pem::parse_x509_pem(ca.certificate_pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let expected = [
        ("server", not_after_of(&renewed)),
        ("ca", not_after_of(&ca_der)),
    ];
    for index in [primary, replica] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, text) = cluster.http_get(index, "/metrics").await.unwrap();
            let after = |certificate| {
                certificate_metric(
                    &text,
                    "pg_instance_certificate_not_after_timestamp_seconds",
                    certificate,
                )
            };
            let seen = expected.map(|(certificate, _)| after(certificate));
            if seen == expected.map(|(_, not_after)| Some(not_after)) {
                // The replication certificate was issued beside the server's: the same hour.
                let replication = after("replication").expect("replication's expiry");
                assert!((replication - expected[0].1).abs() < 60, "{text}");
                let before = certificate_metric(
                    &text,
                    "pg_instance_certificate_not_before_timestamp_seconds",
                    "server",
                )
                .expect("server's start of validity");
                assert_eq!(
                    expected[0].1 - before,
                    3600 + 300,
                    "lifetime and backdating"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance {index} exports {seen:?}, not {expected:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
