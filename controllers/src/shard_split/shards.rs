//! The SQL a split runs on the shard primaries: reaching a primary (its pod, as pg-router
//! does, and the shard's superuser Secret), the replication connection that creates the slot
//! with an exported snapshot, the binary copy of the moving rows, the barrier that tells how
//! far the target has applied, checksums, the fence, and the clean-up of each object. Every
//! statement is idempotent, so a step can run again after an operator restart.

use std::time::Duration;

use api::contract;
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use router::backend::tls::{BackendStream, EndpointTls};
use router::plan::{quote_ident, quote_literal};
use tokio::net::TcpStream;
use tokio_postgres::Client;

use super::plan::table_sql;

mod replication;
pub use replication::ReplicationConnection;

/// Database the sharded tables live in (pg-router's backend database).
pub const DATABASE: &str = "postgres";
/// Rows deleted per statement by the clean-ups.
const DELETE_BATCH: i64 = 10_000;
/// Bytes of COPY data the snapshot copy gathers before it hands them to the target.
const COPY_BATCH: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a shard's primary listens and how to log in (the password never reaches a log).
#[derive(Clone)]
pub struct Endpoint {
    /// Child PostgresCluster of the shard.
    pub cluster: String,
    /// Pod IP of the primary.
    pub host: String,
    /// PostgreSQL port.
    pub port: u16,
    password: String,
    /// TLS to the primary (`verify-full` against the shard cluster's CA and its `-rw` Service
    /// name, as pg-router does), when the shard speaks TLS.
    tls: Option<EndpointTls>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.cluster, self.host, self.port)
    }
}

/// Failures talking to a shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A statement failed.
    #[error("{what} on {shard}: {}", describe(source))]
    Sql {
        /// What was being done.
        what: String,
        /// Child cluster.
        shard: String,
        /// The PostgreSQL error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection failed.
    #[error("replication connection to {shard}: {message}")]
    Replication {
        /// Child cluster.
        shard: String,
        /// What failed.
        message: String,
    },
    /// The shard speaks TLS and its CA cannot be used (yet).
    #[error("TLS to {shard}: {message}")]
    Tls {
        /// Child cluster.
        shard: String,
        /// What is wrong.
        message: String,
    },
    /// The Kubernetes API could not be read.
    #[error("reading the primary of {shard}: {source}")]
    Kube {
        /// Child cluster.
        shard: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// PostgreSQL's own message (and SQLSTATE) of an error: tokio-postgres alone says "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Builds an error mapper for statements on `endpoint`.
pub fn sql_error(
    endpoint: &Endpoint,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> ShardError {
    let what = what.into();
    let shard = endpoint.cluster.clone();
    move |source| ShardError::Sql {
        what,
        shard,
        source,
    }
}

/// The primary of child cluster `cluster` (a pod labelled `role=primary` with an IP, ready ones
/// first) and its superuser password; `None` while it has none.
pub async fn endpoint(
    client: &kube::Client,
    namespace: &str,
    cluster: &str,
) -> Result<Option<Endpoint>, ShardError> {
    let kube = |source| ShardError::Kube {
        shard: cluster.to_string(),
        source,
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!(
        "{}={cluster},{}={}",
        contract::LABEL_CLUSTER,
        contract::LABEL_ROLE,
        contract::role::PRIMARY
    );
    let mut candidates: Vec<(bool, String, u16)> = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube)?
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let host = pod.status.as_ref()?.pod_ip.clone()?;
            let port = pod
                .spec
                .iter()
                .flat_map(|spec| &spec.containers)
                .flat_map(|container| container.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(contract::PORT_NAME_POSTGRES))
                .map_or(contract::POSTGRES_PORT, |p| p.container_port as u16);
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some((ready, host, port))
        })
        .collect();
    candidates.sort_by_key(|(ready, _, _)| !ready);
    let Some((_, host, port)) = candidates.into_iter().next() else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(&contract::superuser_secret(cluster))
        .await
        .map_err(kube)?;
    let password = secret
        .and_then(|s| s.data)
        .and_then(|data| data.get("password").cloned())
        .map(|p| String::from_utf8_lossy(&p.0).into_owned())
        .unwrap_or_default();
    let tls = shard_tls(client, namespace, cluster).await?;
    Ok(Some(Endpoint {
        cluster: cluster.to_string(),
        host,
        port,
        password,
        tls,
    }))
}

/// TLS to the primary of child cluster `cluster` when it speaks TLS (its `spec.tls.mode` is not
/// `Disabled`: it then takes TCP clients over TLS only): its CA from `<cluster>-ca`, and the name
/// its certificate carries, the `-rw` Service's (the primary is reached by its pod IP). Without
/// a cluster object, the CA Secret alone decides.
async fn shard_tls(
    client: &kube::Client,
    namespace: &str,
    cluster: &str,
) -> Result<Option<EndpointTls>, ShardError> {
    let kube = |source| ShardError::Kube {
        shard: cluster.to_string(),
        source,
    };
    let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), namespace);
    let child = clusters.get_opt(cluster).await.map_err(kube)?;
    if child
        .as_ref()
        .is_some_and(|c| c.spec.tls.mode == api::postgres_cluster::TlsMode::Disabled)
    {
        return Ok(None);
    }
    let name = contract::tls_ca_secret(cluster);
    let tls_error = |message: String| ShardError::Tls {
        shard: cluster.to_string(),
        message,
    };
    let pem = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await
        .map_err(kube)?
        .and_then(|secret| secret.data)
        .and_then(|mut data| data.remove(contract::tls_keys::CA))
        .and_then(|bytes| String::from_utf8(bytes.0).ok());
    let pem = match (pem, child) {
        (Some(pem), _) => pem,
        // A shard cluster with TLS on whose CA is not published yet.
        (None, Some(_)) => {
            return Err(tls_error(format!("the CA Secret {name} is not there yet")));
        }
        // No cluster object (a shard run outside the operator) and no CA: plain TCP.
        (None, None) => return Ok(None),
    };
    let server_name = format!("{}.{namespace}.svc", contract::rw_service(cluster));
    EndpointTls::new(&pem, &server_name)
        .map(Some)
        .map_err(|e| tls_error(format!("Secret {name}: {e}")))
}

impl Endpoint {
    fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(contract::SUPERUSER)
            .dbname(DATABASE)
            .application_name("postgres-operator-split")
            .connect_timeout(CONNECT_TIMEOUT);
        if !self.password.is_empty() {
            config.password(&self.password);
        }
        config
    }

    /// The TCP connection to the primary, with TLS when the shard speaks it.
    async fn stream(&self) -> Result<BackendStream, String> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        match &self.tls {
            Some(tls) => tls.connect(stream).await.map_err(|e| e.to_string()),
            None => Ok(BackendStream::Plain(stream)),
        }
    }

    /// A connection as the superuser; its task ends with the client.
    pub async fn connect(&self) -> Result<Client, ShardError> {
        let stream = self.stream().await.map_err(|message| ShardError::Tls {
            shard: self.cluster.clone(),
            message: format!("connecting: {message}"),
        })?;
        // TLS (if any) is already up on the stream: tokio-postgres speaks the protocol over it.
        let (client, connection) = self
            .config()
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(sql_error(self, "connecting"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Connection string the target's subscription uses to reach this (source) shard. With TLS
    /// it is `verify-full`, as everything else in the project: `hostaddr` is the primary's pod
    /// IP and `host` the source's `-rw` Service name, which its certificate carries and libpq
    /// checks; `root_cert` is a CA file on the target's server (the server process reads it),
    /// the target's own cluster CA, which verifies the source because the shards of one sharded
    /// cluster share their parent's CA (`tls::sharded_parent`).
    fn conninfo(&self, root_cert: Option<&str>) -> String {
        let value = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let host = match &self.tls {
            Some(tls) => format!(
                "host={} hostaddr={}",
                value(tls.server_name()),
                value(&self.host)
            ),
            None => format!("host={}", value(&self.host)),
        };
        let mut info = format!(
            "{host} port={} user={} dbname={} application_name=postgres-operator-split",
            self.port,
            value(contract::SUPERUSER),
            value(DATABASE)
        );
        if !self.password.is_empty() {
            info.push_str(&format!(" password={}", value(&self.password)));
        }
        // No client certificate: a path that cannot exist (libpq skips a missing one, but fails
        // on an unreadable default in a home folder it may not enter). Without `root_cert`
        // libpq looks for ~/.postgresql/root.crt and fails when there is none: never unverified.
        if self.tls.is_some() {
            info.push_str(" sslmode=verify-full sslcert=/dev/null/none sslkey=/dev/null/none");
            if let Some(root_cert) = root_cert {
                info.push_str(&format!(" sslrootcert={}", value(root_cert)));
            }
        }
        info
    }
}

/// A moving table: its name, its shard key column and its columns in order.
#[derive(Clone, Debug)]
pub struct MovingTable {
    /// Table name as declared in `spec.sharding.shardedTables`.
    pub name: String,
    /// Shard key column.
    pub key: String,
}

/// Why the source cannot stream the moving rows' changes, for the pre-flight: logical decoding
/// needs `wal_level = logical` (the operator sets it on every shard it creates; a user's own
/// value in the parameters wins). `None` when it is on.
pub async fn logical_decoding_refusal(
    source: &Client,
    endpoint: &Endpoint,
) -> Result<Option<String>, ShardError> {
    let level: String = source
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(sql_error(endpoint, "reading wal_level"))?
        .get(0);
    Ok(wal_level_refusal(&level))
}

/// The refusal for a source whose `wal_level` is `level`, if it cannot decode logically.
pub fn wal_level_refusal(level: &str) -> Option<String> {
    (level != "logical").then(|| {
        format!(
            "the source shard runs with wal_level = {level}: a split reads the moving rows' changes by logical decoding; set spec.postgresql.parameters.wal_level: logical on the sharded cluster (or remove your own value), wait for the shards to restart, then create a new ShardSplitJob"
        )
    })
}

/// Why a table cannot move, for the pre-flight; `None` when it can (or does not exist).
pub async fn preflight_refusal(
    source: &Client,
    endpoint: &Endpoint,
    table: &MovingTable,
) -> Result<Option<String>, ShardError> {
    let row = source
        .query_opt(
            "SELECT c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                              ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                             WHERE i.indrelid = c.oid
                               AND ((c.relreplident = 'd' AND i.indisprimary)
                                    OR (c.relreplident = 'i' AND i.indisreplident))
                               AND a.attname = $2)
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table_sql(&table.name), &table.key],
        )
        .await
        .map_err(sql_error(
            endpoint,
            format!("inspecting table {}", table.name),
        ))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let identity: String = row.get(0);
    let has_primary_key: bool = row.get(1);
    let key_in_identity: bool = row.get(2);
    Ok(match identity.as_str() {
        "f" => None,
        "n" => Some(format!(
            "table {} has REPLICA IDENTITY NOTHING: give it a primary key (or REPLICA IDENTITY FULL) so that its updates and deletes can be replicated, then create a new ShardSplitJob",
            table.name
        )),
        "d" if !has_primary_key => Some(format!(
            "table {} has no primary key and no REPLICA IDENTITY FULL: add a primary key (or ALTER TABLE {} REPLICA IDENTITY FULL), then create a new ShardSplitJob",
            table.name, table.name
        )),
        _ if !key_in_identity => Some(format!(
            "the shard key {} of table {} is not part of its replica identity (primary key): the range filter of the replication needs it; include it in the primary key or set REPLICA IDENTITY FULL",
            table.key, table.name
        )),
        _ => None,
    })
}

/// Does `table` exist on this shard?
pub async fn table_exists(
    client: &Client,
    endpoint: &Endpoint,
    table: &str,
) -> Result<bool, ShardError> {
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table_sql(table)])
        .await
        .map_err(sql_error(endpoint, format!("looking up table {table}")))?;
    Ok(row.get(0))
}

/// Column names of `table`, in order.
pub async fn columns(
    client: &Client,
    endpoint: &Endpoint,
    table: &str,
) -> Result<Vec<String>, ShardError> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1)
               AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&table_sql(table)],
        )
        .await
        .map_err(sql_error(
            endpoint,
            format!("reading the columns of {table}"),
        ))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// `CREATE TABLE` for `table` on the target, from the source's catalog: the columns with their
/// types and NOT NULL, the primary key and the replica identity (what replication needs).
pub async fn table_ddl(
    source: &Client,
    endpoint: &Endpoint,
    table: &str,
) -> Result<Vec<String>, ShardError> {
    let name = table_sql(table);
    let columns = source
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull
               FROM pg_attribute WHERE attrelid = to_regclass($1)
                AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&name],
        )
        .await
        .map_err(sql_error(
            endpoint,
            format!("reading the columns of {table}"),
        ))?;
    let mut parts: Vec<String> = columns
        .iter()
        .map(|row| {
            let column: String = row.get(0);
            let type_: String = row.get(1);
            let not_null: bool = row.get(2);
            // format_type gives SQL type syntax from the catalog, not user input.
            format!(
                "{} {type_}{}",
                quote_ident(&column),
                if not_null { " NOT NULL" } else { "" }
            )
        })
        .collect();
    let constraints = source
        .query(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint
              WHERE conrelid = to_regclass($1) AND contype IN ('p', 'u') ORDER BY contype, conname",
            &[&name],
        )
        .await
        .map_err(sql_error(endpoint, format!("reading the keys of {table}")))?;
    parts.extend(constraints.iter().map(|row| row.get::<_, String>(0)));
    let mut statements = vec![format!(
        "CREATE TABLE IF NOT EXISTS {name} ({})",
        parts.join(", ")
    )];
    let identity = source
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)",
            &[&name],
        )
        .await
        .map_err(sql_error(
            endpoint,
            format!("reading the replica identity of {table}"),
        ))?;
    if identity.get::<_, String>(0) == "f" {
        statements.push(format!("ALTER TABLE {name} REPLICA IDENTITY FULL"));
    }
    Ok(statements)
}

/// Deletes the rows of `table` matching `predicate`, in batches (short transactions, no long
/// lock); as `replica` the session's triggers (the fence) and replication do not apply.
pub async fn delete_rows(
    client: &Client,
    endpoint: &Endpoint,
    table: &str,
    predicate: &str,
    replica: bool,
) -> Result<u64, ShardError> {
    let role = if replica { "replica" } else { "origin" };
    client
        .batch_execute(&format!("SET session_replication_role = {role}"))
        .await
        .map_err(sql_error(endpoint, "setting session_replication_role"))?;
    let name = table_sql(table);
    let mut total = 0;
    loop {
        let deleted = client
            .execute(
                &format!(
                    "DELETE FROM {name} WHERE ctid = ANY (ARRAY (SELECT ctid FROM {name} WHERE {predicate} LIMIT {DELETE_BATCH}))"
                ),
                &[],
            )
            .await
            .map_err(sql_error(endpoint, format!("deleting moved rows of {table}")))?;
        total += deleted;
        if deleted == 0 {
            break;
        }
    }
    client
        .batch_execute("RESET session_replication_role")
        .await
        .map_err(sql_error(endpoint, "resetting session_replication_role"))?;
    Ok(total)
}

/// Copies the rows of `table` matching `predicate`, as of `snapshot` on the source, into the
/// target with binary COPY (one source and one target session); returns the rows copied.
pub async fn copy_table(
    source: &Endpoint,
    target: &Endpoint,
    snapshot: &str,
    table: &str,
    predicate: &str,
) -> Result<u64, ShardError> {
    let reader = source.connect().await?;
    let writer = target.connect().await?;
    let names = columns(&reader, source, table).await?;
    let list = names
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(sql_error(source, "importing the split's snapshot"))?;
    let name = table_sql(table);
    let out = reader
        .copy_out(&format!(
            "COPY (SELECT {list} FROM {name} WHERE {predicate}) TO STDOUT (FORMAT binary)"
        ))
        .await
        .map_err(sql_error(source, format!("COPY of {table} out")))?;
    let sink = writer
        .copy_in::<_, bytes::Bytes>(&format!("COPY {name} ({list}) FROM STDIN (FORMAT binary)"))
        .await
        .map_err(sql_error(target, format!("COPY of {table} in")))?;
    futures::pin_mut!(sink);
    futures::pin_mut!(out);
    // The source sends one CopyData message per row. Passed on one by one (`send` flushes
    // each), every row would cost the target connection a write and a TLS record, which made
    // the copy several times slower than a plain COPY pipe; batched, the target gets large
    // messages and the reader runs ahead while the target writes.
    let mut batch = BytesMut::with_capacity(COPY_BATCH);
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(sql_error(source, format!("reading the COPY of {table}")))?;
        batch.extend_from_slice(&chunk);
        if batch.len() >= COPY_BATCH {
            sink.feed(batch.split().freeze())
                .await
                .map_err(sql_error(target, format!("writing the COPY of {table}")))?;
        }
    }
    if !batch.is_empty() {
        sink.feed(batch.split().freeze())
            .await
            .map_err(sql_error(target, format!("writing the COPY of {table}")))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(sql_error(target, format!("finishing the COPY of {table}")))?;
    reader
        .batch_execute("COMMIT")
        .await
        .map_err(sql_error(source, "ending the snapshot transaction"))?;
    Ok(rows)
}

/// Creates the barrier table (one row) on a shard.
pub async fn create_barrier(
    client: &Client,
    endpoint: &Endpoint,
    barrier: &str,
) -> Result<(), ShardError> {
    let name = format!("public.{}", quote_ident(barrier));
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} (id int PRIMARY KEY, seq bigint NOT NULL);
             INSERT INTO {name} SELECT 1, 0 WHERE NOT EXISTS (SELECT FROM {name})"
        ))
        .await
        .map_err(sql_error(endpoint, "creating the barrier table"))
}

/// Bumps the barrier on the source: once the target shows this number, it has applied every
/// transaction the source committed before (logical replication applies in commit order).
pub async fn bump_barrier(
    client: &Client,
    endpoint: &Endpoint,
    barrier: &str,
) -> Result<i64, ShardError> {
    let row = client
        .query_one(
            &format!(
                "UPDATE public.{} SET seq = seq + 1 WHERE id = 1 RETURNING seq",
                quote_ident(barrier)
            ),
            &[],
        )
        .await
        .map_err(sql_error(endpoint, "bumping the barrier"))?;
    Ok(row.get(0))
}

/// The barrier number the target has applied.
pub async fn applied_barrier(
    client: &Client,
    endpoint: &Endpoint,
    barrier: &str,
) -> Result<i64, ShardError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT seq FROM public.{} WHERE id = 1",
                quote_ident(barrier)
            ),
            &[],
        )
        .await
        .map_err(sql_error(endpoint, "reading the barrier"))?;
    Ok(row.map_or(0, |row| row.get(0)))
}

/// Waits until the target has applied everything the source committed so far; `false` when
/// that takes longer than `within`.
pub async fn caught_up_within(
    source: &Client,
    source_endpoint: &Endpoint,
    target: &Client,
    target_endpoint: &Endpoint,
    barrier: &str,
    within: Duration,
) -> Result<bool, ShardError> {
    let deadline = tokio::time::Instant::now() + within;
    let wanted = bump_barrier(source, source_endpoint, barrier).await?;
    loop {
        if applied_barrier(target, target_endpoint, barrier).await? >= wanted {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Creates the publication of the moving rows (idempotent).
pub async fn create_publication(
    source: &Client,
    endpoint: &Endpoint,
    name: &str,
    tables: &[(String, String)],
    barrier: &str,
) -> Result<(), ShardError> {
    let exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(sql_error(endpoint, "looking up the publication"))?
        .get(0);
    if exists {
        return Ok(());
    }
    let mut members: Vec<String> = tables
        .iter()
        .map(|(table, predicate)| format!("{} WHERE ({predicate})", table_sql(table)))
        .collect();
    members.push(format!("public.{}", quote_ident(barrier)));
    source
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(name),
            members.join(", ")
        ))
        .await
        .map_err(sql_error(endpoint, "creating the publication"))
}

/// Creates the subscription on the target, streaming from the slot the copy started at
/// (idempotent). The statement carries the source's password: this session logs no statement.
pub async fn create_subscription(
    target: &Client,
    target_endpoint: &Endpoint,
    source_endpoint: &Endpoint,
    name: &str,
) -> Result<(), ShardError> {
    let exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)",
            &[&name],
        )
        .await
        .map_err(sql_error(target_endpoint, "looking up the subscription"))?
        .get(0);
    if exists {
        return Ok(());
    }
    // The CA file the target's server verifies the source with: its own cluster CA, the file
    // it checks client certificates against (`ssl_ca_file`, the private copy of the mounted
    // `ca.crt` in the operator's pods), so a path that exists wherever the target runs.
    let root_cert = match &source_endpoint.tls {
        None => None,
        Some(_) => {
            let path: String = target
                .query_one("SELECT current_setting('ssl_ca_file')", &[])
                .await
                .map_err(sql_error(
                    target_endpoint,
                    "reading the target's ssl_ca_file",
                ))?
                .get(0);
            if path.is_empty() {
                return Err(ShardError::Tls {
                    shard: target_endpoint.cluster.clone(),
                    message: format!(
                        "the target has no CA file (ssl_ca_file) to verify the source {} with",
                        source_endpoint.cluster
                    ),
                });
            }
            Some(path)
        }
    };
    target
        .batch_execute(
            "SET log_statement = 'none'; SET log_min_duration_statement = -1;
             SET log_min_error_statement = 'panic'",
        )
        .await
        .map_err(sql_error(target_endpoint, "silencing statement logging"))?;
    let result = target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {name} CONNECTION {conninfo} PUBLICATION {name}
               WITH (create_slot = false, copy_data = false, slot_name = {slot}, binary = true)",
            name = quote_ident(name),
            conninfo = quote_literal(&source_endpoint.conninfo(root_cert.as_deref())),
            slot = quote_literal(name),
        ))
        .await;
    // Never report the statement (it holds a password): only the server's message.
    result.map_err(sql_error(target_endpoint, "creating the subscription"))
}

/// Drops the subscription without touching its slot (the slot is dropped on the source).
pub async fn drop_subscription(
    target: &Client,
    endpoint: &Endpoint,
    name: &str,
) -> Result<(), ShardError> {
    let exists: bool = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)",
            &[&name],
        )
        .await
        .map_err(sql_error(endpoint, "looking up the subscription"))?
        .get(0);
    if !exists {
        return Ok(());
    }
    let name = quote_ident(name);
    target
        .batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
        .await
        .map_err(sql_error(endpoint, "disabling the subscription"))?;
    target
        .batch_execute(&format!("ALTER SUBSCRIPTION {name} SET (slot_name = NONE)"))
        .await
        .map_err(sql_error(
            endpoint,
            "detaching the subscription from its slot",
        ))?;
    target
        .batch_execute(&format!("DROP SUBSCRIPTION {name}"))
        .await
        .map_err(sql_error(endpoint, "dropping the subscription"))
}

/// Drops the replication slot (ending the walsender that still holds it) and the publication.
pub async fn drop_slot_and_publication(
    source: &Client,
    endpoint: &Endpoint,
    name: &str,
) -> Result<(), ShardError> {
    for _ in 0..50 {
        source
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&name],
            )
            .await
            .map_err(sql_error(endpoint, "ending the walsender of the slot"))?;
        match source
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1",
                &[&name],
            )
            .await
        {
            Ok(_) => break,
            // The walsender was still exiting: the slot is active for a moment longer.
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(sql_error(endpoint, "dropping the slot")(error)),
        }
    }
    source
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(sql_error(endpoint, "dropping the publication"))
}

/// Drops the barrier table.
pub async fn drop_barrier(
    client: &Client,
    endpoint: &Endpoint,
    barrier: &str,
) -> Result<(), ShardError> {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS public.{}",
            quote_ident(barrier)
        ))
        .await
        .map_err(sql_error(endpoint, "dropping the barrier table"))
}

/// Row count and checksum (sum of the rows' text hashes) of `table` over `predicate`.
pub async fn checksum(
    client: &Client,
    endpoint: &Endpoint,
    table: &str,
    columns: &[String],
    predicate: &str,
) -> Result<(i64, String), ShardError> {
    let list = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtextextended(ROW({list})::text, 0)), 0)::text
                   FROM {} t WHERE {predicate}",
                table_sql(table)
            ),
            &[],
        )
        .await
        .map_err(sql_error(endpoint, format!("checksumming {table}")))?;
    Ok((row.get(0), row.get(1)))
}

/// Installs the fence: the trigger function (see `plan::fence_function_sql`) and one trigger
/// per moving table, in one transaction. `CREATE TRIGGER` waits for the writes in flight on
/// each table, so no write that started before the fence commits after it unchecked.
pub async fn install_fence(
    source: &mut Client,
    endpoint: &Endpoint,
    function_sql: &str,
    fence: &str,
    tables: &[MovingTable],
    lock_timeout: Duration,
) -> Result<(), ShardError> {
    let transaction = source
        .transaction()
        .await
        .map_err(sql_error(endpoint, "starting the fence"))?;
    let mut sql = format!(
        "SET LOCAL lock_timeout = {}; {function_sql};",
        lock_timeout.as_millis().max(1)
    );
    for table in tables {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {fence} ON {name};
             CREATE TRIGGER {fence} BEFORE INSERT OR UPDATE OR DELETE ON {name}
               FOR EACH ROW EXECUTE FUNCTION public.{fence}({key});",
            fence = quote_ident(fence),
            name = table_sql(&table.name),
            key = quote_literal(&table.key),
        ));
    }
    transaction
        .batch_execute(&sql)
        .await
        .map_err(sql_error(endpoint, "installing the fence"))?;
    transaction
        .commit()
        .await
        .map_err(sql_error(endpoint, "committing the fence"))
}

/// Removes the fence (an aborted cut-over, a rollback).
pub async fn drop_fence(
    source: &Client,
    endpoint: &Endpoint,
    fence: &str,
    tables: &[MovingTable],
) -> Result<(), ShardError> {
    let mut sql = String::new();
    for table in tables {
        sql.push_str(&format!(
            "DO $drop$ BEGIN IF to_regclass({literal}) IS NOT NULL THEN
               DROP TRIGGER IF EXISTS {fence} ON {name}; END IF; END $drop$;",
            literal = quote_literal(&table_sql(&table.name)),
            fence = quote_ident(fence),
            name = table_sql(&table.name),
        ));
    }
    sql.push_str(&format!(
        "DROP FUNCTION IF EXISTS public.{}()",
        quote_ident(fence)
    ));
    source
        .batch_execute(&sql)
        .await
        .map_err(sql_error(endpoint, "removing the fence"))
}

#[cfg(test)]
mod tests {
    use super::wal_level_refusal;

    #[test]
    fn a_source_without_logical_decoding_is_refused_with_the_fix() {
        assert_eq!(wal_level_refusal("logical"), None);
        let refusal = wal_level_refusal("replica").unwrap();
        assert!(refusal.contains("wal_level = replica") && refusal.contains("wal_level: logical"));
    }
}
