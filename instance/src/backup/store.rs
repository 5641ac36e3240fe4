//! Where backups live: an S3-compatible location (endpoint, bucket, prefix, region, addressing
//! style, and the names of the environment variables that hold its keys), and point-in-time
//! recovery targets.

use api::common::S3Store;

/// One repository location: `s3://<bucket>/<path>` with the cluster's folder `<server_name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    /// Endpoint URL.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Prefix inside the bucket.
    pub path: String,
    /// Region.
    pub region: String,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Folder of the cluster under the prefix (barman's server name): the cluster's name.
    pub server_name: String,
    /// Environment variable holding the access key id.
    pub access_key_env: String,
    /// Environment variable holding the secret access key.
    pub secret_key_env: String,
    /// File with the PEM CA certificate(s) the store's TLS certificate must chain to
    /// (`caSecret`); the system's when unset.
    pub ca_bundle: Option<std::path::PathBuf>,
}

impl Store {
    /// The location of `cluster` in `spec` (the prefix is the cluster's name when unset); keys
    /// from the environment variables named.
    pub fn from_spec(
        spec: &S3Store,
        cluster: &str,
        access_key_env: &str,
        secret_key_env: &str,
    ) -> Self {
        Self {
            endpoint: spec.endpoint.clone(),
            bucket: spec.bucket.clone(),
            path: spec
                .path
                .clone()
                .map(|path| path.trim_matches('/').to_string())
                .filter(|path| !path.is_empty())
                .unwrap_or_else(|| cluster.to_string()),
            region: spec.region.clone(),
            force_path_style: spec.force_path_style,
            server_name: cluster.to_string(),
            access_key_env: access_key_env.to_string(),
            secret_key_env: secret_key_env.to_string(),
            ca_bundle: None,
        }
    }

    /// With the CA certificate(s) of `spec.caSecret`, read from the environment variable
    /// `ca_env` (the pod takes it from the Secret) and written to `file` for the engine; the
    /// store as is when the spec names no CA, or the variable is empty (then TLS verification
    /// fails and archiving reports it).
    pub fn with_ca_bundle(
        mut self,
        spec: &S3Store,
        ca_env: &str,
        file: &std::path::Path,
    ) -> std::io::Result<Self> {
        if spec.ca_secret.is_none() {
            return Ok(self);
        }
        let pem = std::env::var(ca_env).unwrap_or_default();
        if pem.trim().is_empty() {
            return Ok(self);
        }
        std::fs::write(file, pem)?;
        // The engine runs as the PostgreSQL user (restore_command); a CA is no secret.
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        self.ca_bundle = Some(file.to_path_buf());
        Ok(self)
    }

    /// `s3://<bucket>/<path>`.
    pub fn destination(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.path)
    }

    /// Whether both name the same cluster folder in the same bucket.
    pub fn same_location(&self, other: &Store) -> bool {
        self.endpoint.trim_end_matches('/') == other.endpoint.trim_end_matches('/')
            && self.bucket == other.bucket
            && self.path == other.path
            && self.server_name == other.server_name
    }

    /// The access key pair from the environment, when both variables are set.
    pub fn credentials(&self) -> Option<(String, String)> {
        match (
            std::env::var(&self.access_key_env),
            std::env::var(&self.secret_key_env),
        ) {
            (Ok(id), Ok(secret)) if !id.is_empty() && !secret.is_empty() => Some((id, secret)),
            _ => None,
        }
    }
}

/// A point-in-time recovery target (`spec.bootstrap.recovery.target`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Recover up to this timestamp (RFC 3339).
    Time(String),
    /// Up to this WAL location.
    Lsn(String),
    /// Up to this transaction id.
    Xid(i64),
    /// Up to this named restore point.
    Name(String),
}

impl Target {
    /// The target of the API type; `None` when it names none.
    pub fn from_spec(spec: &api::postgres_cluster::RecoveryTarget) -> Option<Self> {
        if let Some(time) = &spec.time {
            Some(Self::Time(time.clone()))
        } else if let Some(lsn) = &spec.lsn {
            Some(Self::Lsn(lsn.clone()))
        } else if let Some(xid) = spec.xid {
            Some(Self::Xid(xid))
        } else {
            spec.name.clone().map(Self::Name)
        }
    }

    /// The PostgreSQL setting and value that set this target.
    pub fn setting(&self) -> (&'static str, String) {
        match self {
            Self::Time(time) => ("recovery_target_time", postgres_timestamp(time)),
            Self::Lsn(lsn) => ("recovery_target_lsn", lsn.clone()),
            Self::Xid(xid) => ("recovery_target_xid", xid.to_string()),
            Self::Name(name) => ("recovery_target_name", name.clone()),
        }
    }
}

/// An RFC 3339 timestamp as `recovery_target_time` accepts it (a space for the `T`, `+00:00`
/// for `Z`).
fn postgres_timestamp(time: &str) -> String {
    let spaced = time.replacen(['T', 't'], " ", 1);
    match spaced.strip_suffix(['Z', 'z']) {
        Some(utc) => format!("{utc}+00:00"),
        None => spaced,
    }
}

/// barman's retention policy for `spec.backup.retention` (`<n>d`, `<n>w`, `<n>m`):
/// `RECOVERY WINDOW OF <n> DAYS|WEEKS|MONTHS`; `None` for anything else.
pub fn retention_policy(retention: &str) -> Option<String> {
    let retention = retention.trim();
    let unit = match retention.chars().last()? {
        'd' => "DAYS",
        'w' => "WEEKS",
        'm' => "MONTHS",
        _ => return None,
    };
    let count: u32 = retention[..retention.len() - 1].parse().ok()?;
    (count > 0).then(|| format!("RECOVERY WINDOW OF {count} {unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_becomes_a_recovery_window() {
        assert_eq!(
            retention_policy("30d").as_deref(),
            Some("RECOVERY WINDOW OF 30 DAYS")
        );
        assert_eq!(
            retention_policy("2w").as_deref(),
            Some("RECOVERY WINDOW OF 2 WEEKS")
        );
        assert_eq!(
            retention_policy("6m").as_deref(),
            Some("RECOVERY WINDOW OF 6 MONTHS")
        );
        assert_eq!(retention_policy("0d"), None);
        assert_eq!(retention_policy("5y"), None);
    }

    #[test]
    fn target_time_is_written_as_postgres_reads_it() {
        assert_eq!(
            Target::Time("2026-12-04T03:55:28.505197Z".into()).setting(),
            (
                "recovery_target_time",
                "2026-12-04 03:55:28.505197+00:00".into()
            )
        );
        assert_eq!(
            Target::Time("2026-12-04T05:00:00+02:00".into()).setting().1,
            "2026-12-04 05:00:00+02:00"
        );
    }

    #[test]
    fn prefix_defaults_to_the_cluster_name() {
        let spec = S3Store {
            endpoint: "http://s3:9000".into(),
            bucket: "backups".into(),
            path: None,
            region: "us-east-1".into(),
            credentials_secret: Default::default(),
            force_path_style: true,
            ca_secret: None,
        };
        let store = Store::from_spec(&spec, "main", "A", "B");
        assert_eq!(store.destination(), "s3://backups/main");
        assert_eq!(store.server_name, "main");
        let other = Store::from_spec(
            &S3Store {
                path: Some("/main/".into()),
                ..spec
            },
            "main",
            "C",
            "D",
        );
        assert!(store.same_location(&other));
    }
}
