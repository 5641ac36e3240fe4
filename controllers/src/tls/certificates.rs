//! The operator CA's certificates (pure): what a cluster's CA, server and replication client
//! certificates contain, their names and validity, and when one is due for renewal.

use std::time::Duration;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use kube::ResourceExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

/// Errors of certificate generation and parsing.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// rcgen refused the parameters or a key.
    #[error("{what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A stored certificate is not PEM-encoded X.509.
    #[error("{what} is not a PEM X.509 certificate")]
    Parse {
        /// Which certificate.
        what: String,
    },
}

/// A certificate and its private key, PEM-encoded. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate.
    pub certificate_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("certificate_pem", &self.certificate_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// How long certificates live and how early they are renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Validity of the CA certificate.
    pub ca: Duration,
    /// Validity of the server and client certificates.
    pub leaf: Duration,
    /// A certificate with less than this left is replaced.
    pub renew_before: Duration,
    /// How long a renewed CA is published next to the old one before it signs (see
    /// [`super::rotation`]).
    pub ca_overlap: Duration,
}

impl Lifetimes {
    /// The overlap in use: at most half of `renew_before`, so that the old CA still has half
    /// of it left when the renewed one starts to sign.
    pub fn effective_overlap(&self) -> Duration {
        self.ca_overlap.min(self.renew_before / 2)
    }
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            ca: Duration::from_secs(10 * 365 * DAY),
            leaf: Duration::from_secs(90 * DAY),
            renew_before: Duration::from_secs(30 * DAY),
            ca_overlap: Duration::from_secs(7 * DAY),
        }
    }
}

/// Clock tolerance: certificates are valid from a little before they are made, so that a peer
/// whose clock is slightly behind still accepts them.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// The DNS names of the cluster's Services, each as `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` and
/// `<svc>.<ns>.svc.cluster.local`, for `-rw`, `-ro`, `-r` and `-router` (pg-router, when the
/// cluster is sharded: the same certificate serves it): every name a client in the Kubernetes
/// cluster can use with `sslmode=verify-full`.
pub fn server_dns_names(cluster: &str, namespace: &str) -> Vec<String> {
    [
        contract::rw_service(cluster),
        contract::ro_service(cluster),
        contract::any_service(cluster),
        contract::router_service(cluster),
    ]
    .iter()
    .flat_map(|service| {
        [
            service.clone(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ]
    })
    .collect()
}

/// The server certificate's DNS names: the Services' ([`server_dns_names`]) and then the
/// user's `spec.tls.serverAltDnsNames`, each once.
pub fn server_names(cluster: &PostgresCluster) -> Vec<String> {
    with_extra_names(
        server_dns_names(
            &cluster.name_any(),
            &cluster.namespace().unwrap_or_default(),
        ),
        &cluster.spec.tls.server_alt_dns_names,
    )
}

/// A Pooler certificate's DNS names: its Service's ([`pooler_dns_names`]) and then the user's
/// `spec.pgbouncer.serverAltDnsNames`, each once.
pub fn pooler_names(pooler: &api::pooler::Pooler) -> Vec<String> {
    with_extra_names(
        pooler_dns_names(&pooler.name_any(), &pooler.namespace().unwrap_or_default()),
        &pooler.spec.pgbouncer.server_alt_dns_names,
    )
}

/// `names`, then each of the user's `extra` names that is not there yet.
fn with_extra_names(mut names: Vec<String>, extra: &[String]) -> Vec<String> {
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The DNS names of a Pooler's Service (`<pooler>`, `<pooler>.<ns>`, `<pooler>.<ns>.svc`,
/// `<pooler>.<ns>.svc.cluster.local`): what its clients verify with `sslmode=verify-full`.
pub fn pooler_dns_names(pooler: &str, namespace: &str) -> Vec<String> {
    vec![
        pooler.to_string(),
        format!("{pooler}.{namespace}"),
        format!("{pooler}.{namespace}.svc"),
        format!("{pooler}.{namespace}.svc.cluster.local"),
    ]
}

fn generate_error(what: &str) -> impl FnOnce(rcgen::Error) -> CertificateError {
    let what = what.to_string();
    move |source| CertificateError::Generate { what, source }
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, now: OffsetDateTime, lifetime: Duration) {
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn common_name(params: &mut CertificateParams, name: &str) {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name = distinguished_name;
}

/// A new self-signed CA for one cluster (`CN=<cluster>.<namespace> CA`), allowed to sign leaf
/// certificates only (path length 0).
pub fn new_ca(
    cluster: &str,
    namespace: &str,
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<Issued, CertificateError> {
    let what = "the CA certificate";
    let key = KeyPair::generate().map_err(generate_error(what))?;
    let mut params = CertificateParams::default();
    common_name(&mut params, &format!("{cluster}.{namespace} CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    validity(&mut params, now, lifetime);
    let certificate = params.self_signed(&key).map_err(generate_error(what))?;
    Ok(Issued {
        certificate_pem: certificate.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Which leaf certificate to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// PostgreSQL's server certificate: CN the `-rw` Service, SANs from [`server_names`].
    Server {
        /// Cluster name.
        cluster: String,
        /// Its DNS names.
        names: Vec<String>,
    },
    /// A Pooler's server certificate (PgBouncer's `client_tls_cert_file`): CN the Pooler,
    /// SANs from [`pooler_names`]. For servers only, so it cannot log in anywhere.
    Pooler {
        /// Pooler name.
        pooler: String,
        /// Its DNS names.
        names: Vec<String>,
    },
    /// A client certificate whose CN is the PostgreSQL role it logs in as (`cert` auth).
    Client {
        /// The role.
        user: String,
    },
}

/// Issues `leaf` signed by `ca`, valid from `now` for `lifetime`.
pub fn issue(
    ca: &Issued,
    leaf: &Leaf,
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<Issued, CertificateError> {
    let what = match leaf {
        Leaf::Server { .. } => "the server certificate".to_string(),
        Leaf::Pooler { pooler, .. } => format!("the server certificate of Pooler {pooler}"),
        Leaf::Client { user } => format!("the client certificate of {user}"),
    };
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(generate_error("the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.certificate_pem, ca_key)
        .map_err(generate_error("the CA certificate"))?;
    let key = KeyPair::generate().map_err(generate_error(&what))?;
    let mut params = match leaf {
        Leaf::Server { cluster, names } => {
            let mut params =
                CertificateParams::new(names.clone()).map_err(generate_error(&what))?;
            common_name(&mut params, &contract::rw_service(cluster));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params
        }
        Leaf::Pooler { pooler, names } => {
            let mut params =
                CertificateParams::new(names.clone()).map_err(generate_error(&what))?;
            common_name(&mut params, pooler);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params
        }
        Leaf::Client { user } => {
            let mut params = CertificateParams::default();
            common_name(&mut params, user);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        }
    };
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, now, lifetime);
    let certificate = params
        .signed_by(&key, &issuer)
        .map_err(generate_error(&what))?;
    Ok(Issued {
        certificate_pem: certificate.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What the operator needs to know of a stored certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number, hexadecimal with colons.
    pub serial: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// DNS names of its subject alternative names, in order.
    pub dns_names: Vec<String>,
    /// Subject key identifier (a CA's).
    pub subject_key_id: Option<Vec<u8>>,
    /// Authority key identifier: the subject key identifier of the CA that signed it.
    pub authority_key_id: Option<Vec<u8>>,
}

/// A CA in the words of events and the `CertificateAuthority` condition: its issuer, serial and
/// end of validity, what an administrator compares with `openssl x509 -noout -text`.
pub fn describe_ca(certificate_pem: &str) -> Result<String, CertificateError> {
    summary(certificate_pem, "a CA").map(|summary| {
        format!(
            "{} (serial {}, valid until {})",
            summary.issuer, summary.serial, summary.not_after
        )
    })
}

/// Reads a PEM certificate's validity end, serial and issuer.
pub fn summary(certificate_pem: &str, what: &str) -> Result<Summary, CertificateError> {
    let parse = || CertificateError::Parse {
        what: what.to_string(),
    };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes()).map_err(|_| parse())?;
    let certificate = pem.parse_x509().map_err(|_| parse())?;
    let dns_names = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut subject_key_id = None;
    let mut authority_key_id = None;
    for extension in certificate.extensions() {
        match extension.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                subject_key_id = Some(id.0.to_vec());
            }
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
            }
            _ => {}
        }
    }
    Ok(Summary {
        not_before: certificate.validity().not_before.to_datetime(),
        not_after: certificate.validity().not_after.to_datetime(),
        serial: certificate.raw_serial_as_string(),
        issuer: certificate.issuer().to_string(),
        dns_names,
        subject_key_id,
        authority_key_id,
    })
}

/// Whether the certificate `leaf` was signed by the CA `ca` (by key identifiers, which the
/// operator's certificates all carry).
pub fn signed_by(leaf: &Summary, ca: &Summary) -> bool {
    leaf.authority_key_id.is_some() && leaf.authority_key_id == ca.subject_key_id
}

/// Whether a certificate that ends at `not_after` must be replaced now: less than
/// `renew_before` left (or already expired).
pub fn due_for_renewal(
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    renew_before: Duration,
) -> bool {
    not_after - renew_before <= now
}

/// How long until a certificate that ends at `not_after` is due for renewal (zero when due).
pub fn until_renewal(
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    renew_before: Duration,
) -> Duration {
    let due = not_after - renew_before;
    if due <= now {
        Duration::ZERO
    } else {
        (due - now).unsigned_abs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::X509Certificate;

    fn parsed(pem: &str) -> X509Certificate<'static> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let der: &'static [u8] = Box::leak(pem.contents.into_boxed_slice());
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn the_users_extra_names_follow_the_services_once() {
        let mut cluster = PostgresCluster::new(
            "db",
            api::postgres_cluster::PostgresClusterSpec::with_image(1, "pg"),
        );
        cluster.metadata.namespace = Some("ns".into());
        cluster.spec.tls.server_alt_dns_names = vec!["db.example.com".into(), "db-rw".into()];
        let names = server_names(&cluster);
        assert_eq!(&names[..16], &server_dns_names("db", "ns")[..]);
        assert_eq!(&names[16..], ["db.example.com"], "db-rw is there once");
        let mut pooler = api::pooler::Pooler::new(
            "pool",
            serde_json::from_value(serde_json::json!({"cluster": {"name": "db"}})).unwrap(),
        );
        pooler.metadata.namespace = Some("ns".into());
        pooler.spec.pgbouncer.server_alt_dns_names = vec!["pool.example.com".into()];
        let names = pooler_names(&pooler);
        assert_eq!(&names[..4], &pooler_dns_names("pool", "ns")[..]);
        assert_eq!(&names[4..], ["pool.example.com"]);
    }

    #[test]
    fn server_names_cover_every_service_in_every_form() {
        let names = server_dns_names("db", "team-a");
        assert_eq!(names.len(), 16);
        for service in ["db-rw", "db-ro", "db-r", "db-router"] {
            for name in [
                service.to_string(),
                format!("{service}.team-a"),
                format!("{service}.team-a.svc"),
                format!("{service}.team-a.svc.cluster.local"),
            ] {
                assert!(names.contains(&name), "{name} missing from {names:?}");
            }
        }
    }

    #[test]
    fn ca_is_a_constrained_ca_that_signs_certificates() {
        let ca = new_ca("db", "team-a", now(), 10 * 365 * DAY).unwrap();
        let certificate = parsed(&ca.certificate_pem);
        let constraints = certificate.basic_constraints().unwrap().unwrap().value;
        assert!(constraints.ca);
        assert_eq!(constraints.path_len_constraint, Some(0));
        let usage = certificate.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        assert_eq!(certificate.subject().to_string(), "CN=db.team-a CA");
        assert!(ca.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn server_certificate_names_the_services_and_is_for_servers_only() {
        let start = now();
        let ca = new_ca("db", "team-a", start, 10 * 365 * DAY).unwrap();
        let server = issue(
            &ca,
            &Leaf::Server {
                cluster: "db".into(),
                names: server_dns_names("db", "team-a"),
            },
            start,
            90 * DAY,
        )
        .unwrap();
        let certificate = parsed(&server.certificate_pem);
        assert_eq!(certificate.subject().to_string(), "CN=db-rw");
        assert_eq!(certificate.issuer().to_string(), "CN=db.team-a CA");
        assert!(!certificate.is_ca());
        let mut names = Vec::new();
        for extension in certificate.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
                for name in &san.general_names {
                    if let GeneralName::DNSName(name) = name {
                        names.push(name.to_string());
                    }
                }
            }
        }
        assert_eq!(names, server_dns_names("db", "team-a"));
        assert_eq!(
            summary(&server.certificate_pem, "server")
                .unwrap()
                .dns_names,
            names
        );
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.server_auth && !extended.client_auth);
        let usage = certificate.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        // Valid from a little before now for exactly the lifetime.
        let validity = certificate.validity();
        let not_before = validity.not_before.to_datetime();
        let not_after = validity.not_after.to_datetime();
        assert!(not_before < start && start - not_before <= BACKDATE + Duration::from_secs(1));
        assert!((not_after - (start + 90 * DAY)).abs() < time::Duration::seconds(2));
        // Its signature verifies with the CA's key.
        let ca_certificate = parsed(&ca.certificate_pem);
        certificate
            .verify_signature(Some(ca_certificate.public_key()))
            .unwrap();
    }

    #[test]
    fn client_certificate_carries_the_role_as_common_name() {
        let ca = new_ca("db", "team-a", now(), 365 * DAY).unwrap();
        let client = issue(
            &ca,
            &Leaf::Client {
                user: contract::REPLICATION_USER.into(),
            },
            now(),
            90 * DAY,
        )
        .unwrap();
        let certificate = parsed(&client.certificate_pem);
        assert_eq!(certificate.subject().to_string(), "CN=streaming_replica");
        let extended = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.client_auth && !extended.server_auth);
        assert!(certificate.subject_alternative_name().unwrap().is_none());
    }

    #[test]
    fn each_issue_has_a_new_key_and_serial() {
        let ca = new_ca("db", "ns", now(), 365 * DAY).unwrap();
        let leaf = Leaf::Client { user: "u".into() };
        let (first, second) = (
            issue(&ca, &leaf, now(), DAY).unwrap(),
            issue(&ca, &leaf, now(), DAY).unwrap(),
        );
        assert_ne!(first.key_pem, second.key_pem);
        assert_ne!(
            summary(&first.certificate_pem, "first").unwrap().serial,
            summary(&second.certificate_pem, "second").unwrap().serial
        );
    }

    #[test]
    fn renewal_is_due_inside_the_threshold() {
        let start = now();
        let not_after = start + 90 * DAY;
        assert!(!due_for_renewal(not_after, start, 30 * DAY));
        assert!(!due_for_renewal(not_after, start + 59 * DAY, 30 * DAY));
        assert!(due_for_renewal(not_after, start + 60 * DAY, 30 * DAY));
        assert!(due_for_renewal(not_after, start + 100 * DAY, 30 * DAY));
        assert_eq!(until_renewal(not_after, start, 30 * DAY), 60 * DAY);
        assert_eq!(
            until_renewal(not_after, start + 61 * DAY, 30 * DAY),
            Duration::ZERO
        );
    }

    #[test]
    fn summary_reads_what_was_issued_and_refuses_garbage() {
        let start = now();
        let ca = new_ca("db", "ns", start, 365 * DAY).unwrap();
        let read = summary(&ca.certificate_pem, "ca").unwrap();
        assert!((read.not_after - (start + 365 * DAY)).abs() < time::Duration::seconds(2));
        assert_eq!(read.issuer, "CN=db.ns CA");
        assert!(summary("not a certificate", "junk").is_err());
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
