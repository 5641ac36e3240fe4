//! Topology: shards and their endpoints, table groups with their vindex, sharded tables with
//! their shard key, and reference tables. Read from a TOML file in standalone mode; the
//! Kubernetes mode (ShardRange objects) builds the same [`Topology`] and hands it to
//! `RouterState::reload`, which swaps it in without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::vindex::{HashRanges, KeyValue, Vindex, consistent_ring, key_hash};

/// Errors while loading a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("reading router config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the router.
    #[error("parsing router config: {0}")]
    Parse(#[from] toml::de::Error),
    /// The file parses but describes an impossible topology.
    #[error("invalid router config: {0}")]
    Invalid(String),
}

/// The router's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Address the PostgreSQL frontend listens on, e.g. `127.0.0.1:6432`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the Prometheus `/metrics` endpoint; none disables it.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// How clients authenticate to the router.
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS for client connections (clients negotiate it with SSLRequest or direct TLS); none
    /// disables it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How the router connects to the shards.
    #[serde(default)]
    pub backend: BackendConfig,
    /// The shards, in order (the order gives the default hash ranges).
    pub shards: Vec<ShardConfig>,
    /// Table groups: tables sharded the same way (co-located rows).
    #[serde(default)]
    pub table_groups: Vec<TableGroupConfig>,
    /// Sharded tables.
    #[serde(default)]
    pub sharded_tables: Vec<ShardedTableConfig>,
    /// Reference tables: a full copy on every shard (reads go to one, writes to all).
    #[serde(default)]
    pub reference_tables: Vec<String>,
}

fn default_listen() -> String {
    "127.0.0.1:6432".to_string()
}

/// Server certificate for client connections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain.
    pub cert_file: PathBuf,
    /// PEM file with the private key.
    pub key_file: PathBuf,
}

/// Client authentication.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `trust` (no password) or `scram-sha-256`.
    #[serde(default)]
    pub method: AuthMethod,
    /// Users and passwords accepted with `scram-sha-256`.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

/// Client authentication method.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum AuthMethod {
    /// Any user, no password.
    #[default]
    #[serde(rename = "trust")]
    Trust,
    /// SCRAM-SHA-256 against the configured users.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// One user the router accepts.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User name.
    pub name: String,
    /// Password (never logged).
    pub password: String,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Backend connection settings shared by all shards.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// User the router connects to the shards as.
    #[serde(default = "default_user")]
    pub user: String,
    /// Its password (cleartext, MD5 and SCRAM-SHA-256 are supported); never logged.
    #[serde(default)]
    pub password: Option<String>,
    /// Database on every shard.
    #[serde(default = "default_database")]
    pub database: String,
    /// Most connections per shard.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Send simple-protocol statements whose literals are plain values (`WHERE id = 17`) to
    /// the shard prepared once per connection, with the literals bound as typed parameters, so
    /// the shard skips parsing them (see `plan_cache`). On by default.
    #[serde(default = "default_auto_prepare")]
    pub auto_prepare: bool,
    /// CA certificate(s) (PEM) the shards' server certificates must chain to. When set, the
    /// router speaks TLS to every shard and checks its certificate and name (libpq's
    /// `sslmode=verify-full`); a shard without TLS is refused. Plain TCP when unset.
    #[serde(default)]
    pub ssl_root_cert: Option<PathBuf>,
    /// How long (milliseconds) a statement that writes to a range paused for a split's cut-over
    /// waits for the range to be active again (on its new shard) before it fails with SQLSTATE
    /// 40001, which clients retry. Also what bounds a transaction that holds locks on the
    /// source and then waits: the cut-over can never be blocked by it for longer.
    #[serde(default = "default_write_pause_hold_ms")]
    pub write_pause_hold_ms: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            user: default_user(),
            password: None,
            database: default_database(),
            pool_size: default_pool_size(),
            auto_prepare: default_auto_prepare(),
            ssl_root_cert: None,
            write_pause_hold_ms: default_write_pause_hold_ms(),
        }
    }
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("pool_size", &self.pool_size)
            .field("auto_prepare", &self.auto_prepare)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("write_pause_hold_ms", &self.write_pause_hold_ms)
            .finish_non_exhaustive()
    }
}

fn default_write_pause_hold_ms() -> u64 {
    5000
}
fn default_auto_prepare() -> bool {
    true
}
fn default_user() -> String {
    "postgres".to_string()
}
fn default_database() -> String {
    "postgres".to_string()
}
fn default_pool_size() -> usize {
    32
}

/// One shard.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Shard name (unique).
    pub name: String,
    /// Host of its primary.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port of its primary.
    pub port: u16,
    /// First hash (inclusive) of the range of the 64-bit hash space this shard owns; the range
    /// ends where the next shard's begins. A number, or a string (`"0x8000000000000000"` or
    /// decimal) for values above TOML's integer range. Omit on every shard for equal ranges.
    #[serde(default)]
    pub hash_range_start: Option<HashStart>,
    /// Name the shard's certificate must carry, with `backend.ssl_root_cert`; `host` when unset.
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

/// A position in the 64-bit hash space, as written in the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum HashStart {
    /// A TOML integer (up to 2^63 - 1).
    Number(u64),
    /// Hex (`0x...`) or decimal text.
    Text(String),
}

impl HashStart {
    fn value(&self) -> Result<u64, TopologyError> {
        match self {
            HashStart::Number(n) => Ok(*n),
            HashStart::Text(text) => {
                let parsed = match text.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => text.parse(),
                };
                parsed.map_err(|_| TopologyError::Invalid(format!("bad hash_range_start {text:?}")))
            }
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}

/// Kind of vindex of a table group.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VindexKind {
    /// PostgreSQL's partition hash over ranges of the hash space.
    #[default]
    Hash,
    /// Integer key ranges.
    Range,
    /// Consistent hashing (a ring of virtual nodes).
    ConsistentHash,
}

/// Type of a shard key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// smallint / integer / bigint.
    #[default]
    Bigint,
    /// text / varchar.
    Text,
}

/// A table group.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableGroupConfig {
    /// Group name.
    pub name: String,
    /// Vindex of the group.
    #[serde(default)]
    pub vindex: VindexKind,
    /// Type of the shard key of every table of the group.
    #[serde(default)]
    pub key_type: KeyType,
    /// For `range`: `[lower bound inclusive, shard name]` pairs.
    #[serde(default)]
    pub ranges: Vec<(i64, String)>,
    /// For `consistent_hash`: virtual nodes per shard.
    #[serde(default = "default_points")]
    pub points_per_shard: usize,
}

fn default_points() -> usize {
    64
}

/// A sharded table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTableConfig {
    /// Table name (unqualified, lower case).
    pub name: String,
    /// Its table group.
    pub table_group: String,
    /// Its shard-key column.
    pub shard_key: String,
    /// Secondary columns with a lookup vindex: column -> lookup table. The lookup table has the
    /// columns `(value, shard_key)` and is a reference table.
    #[serde(default)]
    pub lookups: HashMap<String, String>,
}

/// One shard's connection endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Shard name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS to the shard (verify-full), or none.
    pub tls: Option<crate::backend::tls::EndpointTls>,
}

/// A table group as the planner uses it.
#[derive(Clone, Debug)]
pub struct TableGroup {
    /// Group name.
    pub name: String,
    /// Shard-key type.
    pub key_type: KeyType,
    /// The vindex.
    pub vindex: Vindex,
}

/// A sharded table as the planner uses it.
#[derive(Clone, Debug)]
pub struct ShardedTable {
    /// Index into [`Topology::groups`].
    pub group: usize,
    /// Shard-key column.
    pub shard_key: String,
    /// Lookup vindexes: column -> lookup table.
    pub lookups: HashMap<String, String>,
}

/// The resolved topology: everything the planner and executor need.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Shard endpoints, by shard index.
    pub shards: Vec<Endpoint>,
    /// Table groups.
    pub groups: Vec<TableGroup>,
    /// Sharded tables by name.
    pub tables: HashMap<String, ShardedTable>,
    /// Reference tables by name.
    pub reference_tables: Vec<String>,
    /// Aggregate functions the shards define beyond PostgreSQL's own (`CREATE AGGREGATE`), read
    /// from the first shard's catalog: the planner must not take them for plain functions.
    pub aggregates: Vec<String>,
    /// Column lists of the tables the shards hold (first shard's catalog, refreshed after DDL):
    /// what the binder resolves bare column names against.
    pub columns: crate::plan::bind::Catalog,
    /// Ranges whose writes are held (a split's cut-over: ShardRange `state: WritePaused`). Their
    /// reads still go to the shard the vindex names.
    pub paused: Vec<PausedRange>,
    /// Routing epoch: the highest ShardRange epoch this topology was built from (0 in
    /// standalone mode).
    pub epoch: i64,
}

/// A range of a table group whose writes wait for the range to be active again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PausedRange {
    /// The ShardRange's name (for the client's error and the logs).
    pub name: String,
    /// Index into [`Topology::groups`].
    pub group: usize,
    /// First position (inclusive); the lowest one when unset.
    pub start: Option<i64>,
    /// End (exclusive); the end of the space when unset.
    pub end: Option<i64>,
}

impl PausedRange {
    /// Does the range hold `position`?
    pub fn contains(&self, position: i64) -> bool {
        self.start.is_none_or(|start| position >= start)
            && self.end.is_none_or(|end| position < end)
    }
}

impl Topology {
    /// Where `key` lies in the space ShardRange bounds are written in: the partition hash read
    /// as a signed number for the hash vindex, the key itself for the range vindex; none for a
    /// consistent-hash group (no ShardRange drives those).
    pub fn range_position(&self, group: usize, key: &KeyValue) -> Option<i64> {
        match (&self.groups.get(group)?.vindex, key) {
            (Vindex::Hash(_), key) => Some(key_hash(key) as i64),
            (Vindex::Range(_), KeyValue::Int(value)) => Some(*value),
            _ => None,
        }
    }

    /// The paused range of `group` that holds `key`, if any.
    pub fn paused_range(&self, group: usize, key: &KeyValue) -> Option<&PausedRange> {
        if self.paused.is_empty() {
            return None;
        }
        let position = self.range_position(group, key)?;
        self.paused
            .iter()
            .find(|range| range.group == group && range.contains(position))
    }
}

impl Topology {
    /// Resolves a configuration into a topology, checking references between its parts.
    pub fn from_config(config: &RouterConfig) -> Result<Self, TopologyError> {
        if config.shards.is_empty() {
            return Err(TopologyError::Invalid(
                "at least one shard is needed".into(),
            ));
        }
        let names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
        let shard_index = |name: &str| {
            names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| TopologyError::Invalid(format!("unknown shard {name:?} in a range")))
        };
        let hash_ranges = if config.shards.iter().all(|s| s.hash_range_start.is_none()) {
            HashRanges::equal(config.shards.len())
        } else {
            let mut starts = Vec::new();
            for (i, shard) in config.shards.iter().enumerate() {
                let start = shard.hash_range_start.as_ref().ok_or_else(|| {
                    TopologyError::Invalid(format!(
                        "shard {:?} has no hash_range_start; set it on every shard or on none",
                        shard.name
                    ))
                })?;
                starts.push((start.value()?, i));
            }
            starts.sort();
            if starts[0].0 != 0 {
                return Err(TopologyError::Invalid(
                    "one shard's hash_range_start must be 0 (the ranges must cover the space)"
                        .into(),
                ));
            }
            HashRanges { starts }
        };
        let mut groups = Vec::new();
        for group in &config.table_groups {
            let vindex = match group.vindex {
                VindexKind::Hash => Vindex::Hash(hash_ranges.clone()),
                VindexKind::Range => {
                    let mut bounds = group
                        .ranges
                        .iter()
                        .map(|(start, shard)| Ok((*start, shard_index(shard)?)))
                        .collect::<Result<Vec<_>, TopologyError>>()?;
                    bounds.sort();
                    if bounds.is_empty() {
                        return Err(TopologyError::Invalid(format!(
                            "table group {:?} has vindex range but no ranges",
                            group.name
                        )));
                    }
                    Vindex::Range(bounds)
                }
                VindexKind::ConsistentHash => {
                    Vindex::ConsistentHash(consistent_ring(&names, group.points_per_shard.max(1)))
                }
            };
            groups.push(TableGroup {
                name: group.name.clone(),
                key_type: group.key_type,
                vindex,
            });
        }
        let mut tables = HashMap::new();
        for table in &config.sharded_tables {
            let group = groups
                .iter()
                .position(|g| g.name == table.table_group)
                .ok_or_else(|| {
                    TopologyError::Invalid(format!(
                        "sharded table {:?} names unknown table group {:?}",
                        table.name, table.table_group
                    ))
                })?;
            tables.insert(
                table.name.to_lowercase(),
                ShardedTable {
                    group,
                    shard_key: table.shard_key.to_lowercase(),
                    lookups: table
                        .lookups
                        .iter()
                        .map(|(c, t)| (c.to_lowercase(), t.to_lowercase()))
                        .collect(),
                },
            );
        }
        let ca_pem = match &config.backend.ssl_root_cert {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let mut shards = Vec::new();
        for shard in &config.shards {
            let tls = match &ca_pem {
                Some(pem) => {
                    let name = shard.tls_server_name.as_deref().unwrap_or(&shard.host);
                    Some(
                        crate::backend::tls::EndpointTls::new(pem, name).map_err(|e| {
                            TopologyError::Invalid(format!(
                                "backend.ssl_root_cert for shard {}: {e}",
                                shard.name
                            ))
                        })?,
                    )
                }
                None => None,
            };
            shards.push(Endpoint {
                name: shard.name.clone(),
                host: shard.host.clone(),
                port: shard.port,
                tls,
            });
        }
        Ok(Self {
            shards,
            groups,
            tables,
            reference_tables: config
                .reference_tables
                .iter()
                .map(|t| t.to_lowercase())
                .collect(),
            aggregates: Vec::new(),
            columns: Default::default(),
            paused: Vec::new(),
            epoch: 0,
        })
    }

    /// Is `name` a reference table?
    pub fn is_reference(&self, name: &str) -> bool {
        self.reference_tables.iter().any(|t| t == name)
    }
}

impl RouterConfig {
    /// Parses a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, TopologyError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let config = RouterConfig::from_toml(
            r#"
            listen = "127.0.0.1:7000"
            reference_tables = ["countries"]
            [[shards]]
            name = "a"
            port = 5432
            [[shards]]
            name = "b"
            port = 5433
            [[table_groups]]
            name = "customers"
            [[table_groups]]
            name = "events"
            vindex = "range"
            ranges = [[0, "a"], [1000, "b"]]
            [[sharded_tables]]
            name = "orders"
            table_group = "customers"
            shard_key = "customer_id"
            "#,
        )
        .unwrap();
        let topology = Topology::from_config(&config).unwrap();
        assert_eq!(topology.shards.len(), 2);
        assert_eq!(topology.tables["orders"].shard_key, "customer_id");
        assert!(topology.is_reference("countries"));
    }

    #[test]
    fn explicit_hash_ranges_accept_hex() {
        let config = RouterConfig::from_toml(
            r#"
            [[shards]]
            name = "a"
            port = 1
            hash_range_start = 0
            [[shards]]
            name = "b"
            port = 2
            hash_range_start = "0xc000000000000000"
            [[table_groups]]
            name = "g"
            "#,
        )
        .unwrap();
        let topology = Topology::from_config(&config).unwrap();
        let crate::vindex::Vindex::Hash(ranges) = &topology.groups[0].vindex else {
            panic!("hash vindex expected")
        };
        assert_eq!(ranges.shard_for(0xbfff_ffff_ffff_ffff), 0);
        assert_eq!(ranges.shard_for(0xc000_0000_0000_0000), 1);
    }

    #[test]
    fn rejects_an_unknown_table_group() {
        let config = RouterConfig::from_toml(
            r#"
            [[shards]]
            name = "a"
            port = 5432
            [[sharded_tables]]
            name = "orders"
            table_group = "nope"
            shard_key = "id"
            "#,
        )
        .unwrap();
        let error = Topology::from_config(&config).unwrap_err().to_string();
        assert!(error.contains("unknown table group"), "{error}");
    }
}
