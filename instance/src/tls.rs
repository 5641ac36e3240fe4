//! PostgreSQL's TLS from the mounted certificate Secrets: which files PostgreSQL and its
//! replication clients use, the settings and pg_hba rules that require TLS, and the fingerprint
//! that tells when the Secrets were renewed (the manager then copies the files again and reloads
//! PostgreSQL: no restart).
//!
//! The mounted files cannot be used in place: PostgreSQL and libpq refuse a private key that is
//! group-readable unless root owns it, and a Secret volume's modes and owner are the kubelet's.
//! So the instance manager copies them into its private run folder (mode 0600, owned by the
//! PostgreSQL user), each through a rename so that a reload never reads half a file.

use std::path::{Path, PathBuf};

use api::contract::tls_keys;

/// The mounted Secrets' folders (`<tls_dir>/server`, `<tls_dir>/replication`) and the private
/// copies PostgreSQL reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Where the operator mounts the Secrets.
    pub mounted: PathBuf,
    /// Private copies (in the instance manager's run folder).
    pub private: PathBuf,
}

/// The files of one mounted Secret, as (folder, key) pairs.
const FILES: [(&str, &str); 6] = [
    ("server", tls_keys::CERTIFICATE),
    ("server", tls_keys::KEY),
    ("server", tls_keys::CA),
    ("replication", tls_keys::CERTIFICATE),
    ("replication", tls_keys::KEY),
    ("replication", tls_keys::CA),
];

/// A replica cluster's source certificates (`spec.replica.streaming.certificateSecret`),
/// mounted only when it streams from its source.
const SOURCE_FILES: [(&str, &str); 3] = [
    ("source", tls_keys::CA),
    ("source", tls_keys::CERTIFICATE),
    ("source", tls_keys::KEY),
];

impl TlsFiles {
    /// TLS from the Secrets mounted at `mounted`, copied into `run_dir/tls`.
    pub fn new(mounted: &Path, run_dir: &Path) -> Self {
        Self {
            mounted: mounted.to_path_buf(),
            private: run_dir.join("tls"),
        }
    }

    fn private_file(&self, folder: &str, key: &str) -> PathBuf {
        self.private.join(format!("{folder}-{key}"))
    }

    /// Contents of the mounted files (`None` for a missing one): a change means the Secrets were
    /// renewed.
    pub fn fingerprint(&self) -> Vec<Option<Vec<u8>>> {
        FILES
            .iter()
            .chain(SOURCE_FILES.iter())
            .map(|(folder, key)| std::fs::read(self.mounted.join(folder).join(key)).ok())
            .collect()
    }

    /// [`api::contract::ca_bundle_digest`] of the CA bundle the installed copies trust, when
    /// the server's and the replication client's are the same (they are two Secrets the
    /// operator writes one after the other; between the two writes there is no one bundle).
    pub fn installed_ca_digest(&self) -> Option<String> {
        let server = std::fs::read(self.private_file("server", tls_keys::CA)).ok()?;
        let replication = std::fs::read(self.private_file("replication", tls_keys::CA)).ok()?;
        (server == replication).then(|| api::contract::ca_bundle_digest(&server))
    }

    /// The validity of the installed certificates, for the status and the metrics (the
    /// `PostgresCertificateExpiresSoon` alert): the server's, the replication client's, the
    /// CA of the installed bundle that expires last (during a CA renewal the bundle holds the
    /// old and the renewed CA; the cluster stays trusted as long as the latest one is valid),
    /// and, on a replica cluster that streams from its source, the source's client certificate
    /// and CA (a copy the operator does not renew: its expiry must be watched).
    pub fn installed_validity(&self) -> Vec<CertificateValidity> {
        let installed = [
            ("server", "server", tls_keys::CERTIFICATE),
            ("replication", "replication", tls_keys::CERTIFICATE),
            ("ca", "server", tls_keys::CA),
            ("source", "source", tls_keys::CERTIFICATE),
            ("source-ca", "source", tls_keys::CA),
        ];
        installed
            .iter()
            .filter_map(|(certificate, folder, key)| {
                let pem = std::fs::read(self.private_file(folder, key)).ok()?;
                // A certificate file's first entry is the certificate (a chain may follow); of
                // a CA bundle, the CA that expires last.
                let (not_before, not_after) = if *key == tls_keys::CA {
                    bundle_validity(&pem)?
                } else {
                    pem_validities(&pem).into_iter().next()?
                };
                Some(CertificateValidity {
                    certificate: certificate.to_string(),
                    not_before,
                    not_after,
                })
            })
            .collect()
    }

    /// Whether a replica cluster's source certificates are mounted (`source/`).
    pub fn has_source(&self) -> bool {
        self.mounted
            .join(SOURCE_FILES[1].0)
            .join(SOURCE_FILES[1].1)
            .exists()
    }

    /// libpq options of a replica cluster's connection to its source's primary: verified
    /// against the source's CA and the host name (`verify-full`: the source is reached by its
    /// Service's or load balancer's name, which its certificate lists), with the source's
    /// replication client certificate.
    pub fn source_client_options(&self) -> Vec<(String, String)> {
        let path = |key| self.private_file("source", key).display().to_string();
        vec![
            ("sslmode".to_string(), "verify-full".to_string()),
            ("sslrootcert".to_string(), path(tls_keys::CA)),
            ("sslcert".to_string(), path(tls_keys::CERTIFICATE)),
            ("sslkey".to_string(), path(tls_keys::KEY)),
        ]
    }

    /// The private copies to write: (target path, content), or the first missing file. The
    /// source's files are copied when they are mounted.
    pub fn copies(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, PathBuf> {
        let source: &[(&str, &str)] = if self.has_source() {
            &SOURCE_FILES
        } else {
            &[]
        };
        FILES
            .iter()
            .chain(source.iter())
            .map(|(folder, key)| {
                let source = self.mounted.join(folder).join(key);
                std::fs::read(&source)
                    .map(|content| (self.private_file(folder, key), content))
                    .map_err(|_| source)
            })
            .collect()
    }

    /// postgresql.conf settings: TLS on, 1.2 at least, the server certificate, and the CA that
    /// client certificates (replication) must chain to.
    pub fn server_settings(&self) -> Vec<(String, String)> {
        let path = |folder, key| self.private_file(folder, key).display().to_string();
        vec![
            ("ssl".into(), "on".into()),
            ("ssl_min_protocol_version".into(), "TLSv1.2".into()),
            (
                "ssl_cert_file".into(),
                path("server", tls_keys::CERTIFICATE),
            ),
            ("ssl_key_file".into(), path("server", tls_keys::KEY)),
            ("ssl_ca_file".into(), path("replication", tls_keys::CA)),
        ]
    }

    /// libpq options of a connection to a peer: TLS verified against the cluster's CA
    /// (`verify-ca`: peers are reached by pod IP, which no certificate names; the CA is the
    /// cluster's own, so only this cluster's servers pass), with the replication client
    /// certificate when `client_certificate`.
    pub fn client_options(&self, client_certificate: bool) -> Vec<(String, String)> {
        let path = |folder, key| self.private_file(folder, key).display().to_string();
        let mut options = vec![
            ("sslmode".to_string(), "verify-ca".to_string()),
            ("sslrootcert".to_string(), path("server", tls_keys::CA)),
        ];
        if client_certificate {
            options.push((
                "sslcert".to_string(),
                path("replication", tls_keys::CERTIFICATE),
            ));
            options.push(("sslkey".to_string(), path("replication", tls_keys::KEY)));
        }
        options
    }
}

/// When an installed certificate is valid (status `certificates`, metrics
/// `pg_instance_certificate_not_{before,after}_timestamp_seconds`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateValidity {
    /// `server`, `replication`, `ca`, `source` or `source-ca` (see
    /// [`TlsFiles::installed_validity`]).
    pub certificate: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// (not before, not after) in Unix seconds of each certificate of a PEM file, in file order;
/// blocks that are not X.509 certificates are skipped.
fn pem_validities(pem: &[u8]) -> Vec<(i64, i64)> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(|block| {
            let block = block.ok()?;
            (block.label == "CERTIFICATE")
                .then(|| der_validity(&block.contents))
                .flatten()
        })
        .collect()
}

/// (not before, not after) in Unix seconds of a DER certificate.
pub fn der_validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = certificate.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The validity of the CA of a PEM bundle that expires last (during a CA renewal a bundle holds
/// the old and the renewed CA: trust lasts as long as the latest).
pub fn bundle_validity(pem: &[u8]) -> Option<(i64, i64)> {
    pem_validities(pem)
        .into_iter()
        .max_by_key(|(_, not_after)| *not_after)
}

/// pg_hba.conf. With TLS, every TCP connection must use it (`hostssl`; a client without TLS
/// finds no rule and is refused), and the replication user authenticates with its client
/// certificate (`cert`: the certificate's CN must be the role), not a password. Without TLS,
/// SCRAM over plain TCP.
pub fn pg_hba(replication_user: &str, tls: bool) -> String {
    let user = crate::quote::identifier(replication_user);
    let (kind, replication_method) = if tls {
        ("hostssl", "cert")
    } else {
        ("host", "scram-sha-256")
    };
    let mut text = String::from(
        "# Written by pg-instance.\n\
         # The socket folder is private to the pod (mode 0700).\n\
         local all all trust\n",
    );
    for network in ["0.0.0.0/0", "::/0"] {
        text.push_str(&format!(
            "{kind} replication {user} {network} {replication_method}\n"
        ));
    }
    for network in ["0.0.0.0/0", "::/0"] {
        text.push_str(&format!("{kind} all all {network} scram-sha-256\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_tls_every_tcp_rule_is_hostssl_and_replication_uses_the_certificate() {
        let hba = pg_hba("streaming_replica", true);
        assert!(hba.contains("hostssl replication \"streaming_replica\" 0.0.0.0/0 cert\n"));
        assert!(hba.contains("hostssl replication \"streaming_replica\" ::/0 cert\n"));
        assert!(hba.contains("hostssl all all 0.0.0.0/0 scram-sha-256\n"));
        assert!(
            !hba.lines().any(|line| line.starts_with("host ")),
            "no rule lets a client in without TLS:\n{hba}"
        );
        let plain = pg_hba("streaming_replica", false);
        assert!(plain.contains("host replication \"streaming_replica\" 0.0.0.0/0 scram-sha-256\n"));
        assert!(!plain.contains("hostssl"));
    }

    #[test]
    fn settings_and_client_options_name_the_private_copies() {
        let files = TlsFiles::new(Path::new("/mnt/tls"), Path::new("/run/pg"));
        let settings = files.server_settings();
        let get = |name: &str| {
            settings
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .unwrap()
        };
        assert_eq!(get("ssl"), "on");
        assert_eq!(get("ssl_min_protocol_version"), "TLSv1.2");
        assert_eq!(get("ssl_cert_file"), "/run/pg/tls/server-tls.crt");
        assert_eq!(get("ssl_key_file"), "/run/pg/tls/server-tls.key");
        assert_eq!(get("ssl_ca_file"), "/run/pg/tls/replication-ca.crt");
        let replication = files.client_options(true);
        assert!(replication.contains(&("sslmode".into(), "verify-ca".into())));
        assert!(
            replication.contains(&("sslcert".into(), "/run/pg/tls/replication-tls.crt".into()))
        );
        assert!(replication.contains(&("sslkey".into(), "/run/pg/tls/replication-tls.key".into())));
        assert!(
            !files
                .client_options(false)
                .iter()
                .any(|(key, _)| key == "sslcert")
        );
    }

    #[test]
    fn fingerprint_changes_when_a_mounted_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        for folder in ["server", "replication"] {
            std::fs::create_dir_all(dir.path().join(folder)).unwrap();
            for key in ["tls.crt", "tls.key", "ca.crt"] {
                std::fs::write(dir.path().join(folder).join(key), key).unwrap();
            }
        }
        let files = TlsFiles::new(dir.path(), Path::new("/run/pg"));
        let before = files.fingerprint();
        assert!(before[..6].iter().all(Option::is_some));
        assert!(!files.has_source(), "no source certificates mounted");
        assert_eq!(files.copies().unwrap().len(), 6);
        std::fs::write(dir.path().join("server/tls.crt"), "renewed").unwrap();
        assert_ne!(files.fingerprint(), before);
        // A replica cluster's source certificates join the copies and the fingerprint.
        let with_source = files.fingerprint();
        std::fs::create_dir_all(dir.path().join("source")).unwrap();
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::write(dir.path().join("source").join(key), key).unwrap();
        }
        assert!(files.has_source());
        assert_eq!(files.copies().unwrap().len(), 9);
        assert_ne!(files.fingerprint(), with_source);
        let options = files.source_client_options();
        assert!(
            options.contains(&("sslmode".to_string(), "verify-full".to_string())),
            "{options:?}"
        );
        assert!(
            options
                .iter()
                .any(|(key, value)| key == "sslkey" && value == "/run/pg/tls/source-tls.key"),
            "{options:?}"
        );
        std::fs::remove_file(dir.path().join("replication/tls.key")).unwrap();
        assert_eq!(
            files.copies().unwrap_err(),
            dir.path().join("replication/tls.key")
        );
    }

    #[test]
    fn installed_validity_reads_each_certificate_and_the_ca_that_expires_last() {
        use controllers::tls::certificates::{Leaf, issue, new_ca};
        let day = std::time::Duration::from_secs(86_400);
        let now = time::OffsetDateTime::now_utc();
        let old = new_ca("db", "ns", now, 30 * day).unwrap();
        let renewed = new_ca("db", "ns", now, 3650 * day).unwrap();
        let server = issue(
            &old,
            &Leaf::Server {
                cluster: "db".into(),
                names: vec!["db-rw".into()],
            },
            now,
            90 * day,
        )
        .unwrap();
        let run = tempfile::tempdir().unwrap();
        let files = TlsFiles::new(Path::new("/mnt/tls"), run.path());
        assert_eq!(files.installed_validity(), Vec::new(), "nothing installed");
        std::fs::create_dir_all(&files.private).unwrap();
        // A chain after the server's certificate is not the server's.
        let chain = format!("{}{}", server.certificate_pem, renewed.certificate_pem);
        std::fs::write(files.private_file("server", tls_keys::CERTIFICATE), chain).unwrap();
        let bundle = format!("{}{}", renewed.certificate_pem, old.certificate_pem);
        std::fs::write(files.private_file("server", tls_keys::CA), bundle).unwrap();
        std::fs::write(
            files.private_file("replication", tls_keys::CERTIFICATE),
            "not a certificate",
        )
        .unwrap();
        let validity = files.installed_validity();
        let names: Vec<&str> = validity.iter().map(|v| v.certificate.as_str()).collect();
        assert_eq!(names, ["server", "ca"], "{validity:?}");
        let lifetime = |v: &CertificateValidity| (v.not_after - v.not_before) / 86_400;
        // Issued certificates start a little before `now` (clock tolerance): whole days round.
        assert_eq!(lifetime(&validity[0]), 90, "{validity:?}");
        assert_eq!(lifetime(&validity[1]), 3650, "the renewed CA: {validity:?}");
        assert!((validity[0].not_after - now.unix_timestamp() - 90 * 86_400).abs() < 600);
    }

    #[test]
    fn the_installed_bundle_is_reported_only_when_both_copies_agree() {
        let run = tempfile::tempdir().unwrap();
        let files = TlsFiles::new(Path::new("/mnt/tls"), run.path());
        assert_eq!(files.installed_ca_digest(), None, "nothing installed yet");
        std::fs::create_dir_all(&files.private).unwrap();
        let write = |folder: &str, text: &str| {
            std::fs::write(files.private_file(folder, tls_keys::CA), text).unwrap()
        };
        write("server", "old\nnew\n");
        write("replication", "old\n");
        assert_eq!(files.installed_ca_digest(), None, "mid-renewal");
        write("replication", "old\nnew\n");
        assert_eq!(
            files.installed_ca_digest(),
            Some(api::contract::ca_bundle_digest(b"old\nnew\n"))
        );
    }
}
