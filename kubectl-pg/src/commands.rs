//! The commands' acting part: each reads the objects it needs, decides with the pure modules, and
//! writes the request the operator and the instance managers honour (annotations, a BackupJob).
//! Nothing here talks to PostgreSQL; `psql` hands the connection to the user's psql.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use api::backup::{BackupAction, BackupJob, BackupJobSpec, BackupMethod, BackupType};
use api::common::{ClusterReference, StorageSpec};
use api::contract;
use api::postgres_cluster::{FENCED_ANNOTATION, HIBERNATION_ANNOTATION, PostgresCluster};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::cli::{BackupKind, Command, Method, Output};
use crate::error::{Error, kube_error};
use crate::fence::FenceList;
use crate::view::{self, InstanceRow};
use crate::{psql, render, restart, switchover};

/// How many BackupJobs `status` lists.
const BACKUPS_SHOWN: usize = 5;
/// How often a wait reads the objects again.
const POLL: Duration = Duration::from_millis(500);

/// The API client and the namespace of the cluster.
pub struct Context {
    /// Client.
    pub client: Client,
    /// Namespace.
    pub namespace: String,
}

impl Context {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn cluster(&self, name: &str) -> Result<PostgresCluster, Error> {
        self.api::<PostgresCluster>()
            .get_opt(name)
            .await
            .map_err(kube_error(format!("reading PostgresCluster {name}")))?
            .ok_or_else(|| Error::ClusterNotFound {
                name: name.to_string(),
                namespace: self.namespace.clone(),
            })
    }

    async fn pods(&self, cluster: &str) -> Result<Vec<Pod>, Error> {
        let selector = format!("{}={}", contract::LABEL_CLUSTER, cluster);
        Ok(self
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_error(format!("listing the pods of {cluster}")))?
            .items)
    }

    async fn rows(&self, cluster: &str) -> Result<Vec<InstanceRow>, Error> {
        let mut rows: Vec<InstanceRow> = self
            .pods(cluster)
            .await?
            .iter()
            .map(InstanceRow::from_pod)
            .collect();
        view::sort_instances(&mut rows);
        Ok(rows)
    }

    async fn lease_annotations(&self, cluster: &str) -> Result<BTreeMap<String, String>, Error> {
        let name = contract::lease_name(cluster);
        Ok(self
            .api::<Lease>()
            .get_opt(&name)
            .await
            .map_err(kube_error(format!("reading Lease {name}")))?
            .map(|lease| lease.annotations().clone())
            .unwrap_or_default())
    }

    async fn annotate_cluster(
        &self,
        cluster: &str,
        annotations: serde_json::Value,
    ) -> Result<(), Error> {
        let patch = json!({"metadata": {"annotations": annotations}});
        self.api::<PostgresCluster>()
            .patch(cluster, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_error(format!("annotating PostgresCluster {cluster}")))?;
        Ok(())
    }
}

/// Runs `command`; returns the process exit code (psql's own, for `psql`).
pub async fn run(context: &Context, command: Command) -> Result<i32, Error> {
    match command {
        Command::Status { cluster, output } => status(context, &cluster, output).await,
        Command::Switchover {
            cluster,
            pod,
            to,
            wait,
            timeout,
        } => switchover(context, &cluster, pod.or(to).as_deref(), wait, timeout).await,
        Command::Fence { cluster, pod } => fence(context, &cluster, &pod, true).await,
        Command::Unfence { cluster, pod } => fence(context, &cluster, &pod, false).await,
        Command::Hibernate { cluster } => hibernate(context, &cluster, true).await,
        Command::Resume { cluster } => hibernate(context, &cluster, false).await,
        Command::Restart {
            cluster,
            pod,
            no_wait,
            timeout,
        } => restart(context, &cluster, pod.as_deref(), !no_wait, timeout).await,
        Command::Backup {
            cluster,
            name,
            method,
            backup_type,
            prefer_replica,
            volume_size,
            storage_class,
        } => {
            let volume = volume_size.map(|size| StorageSpec {
                size,
                storage_class,
            });
            let job = |name: &str| {
                backup_job(
                    name,
                    &cluster,
                    method,
                    backup_type,
                    prefer_replica,
                    volume.clone(),
                )
            };
            backup(context, &cluster, name, job).await
        }
        Command::Psql {
            cluster,
            replica,
            pod,
            host,
            port,
            dbname,
            psql,
            args,
        } => {
            let target = match (pod, replica) {
                (Some(pod), _) => Target::Pod(pod),
                (None, true) => Target::Replicas,
                (None, false) => Target::Primary,
            };
            let options = PsqlOptions {
                target,
                host,
                port,
                dbname,
                program: psql,
                args,
            };
            run_psql(context, &cluster, options).await
        }
        Command::Logs {
            cluster,
            pod,
            follow,
            tail,
            container,
        } => logs(context, &cluster, pod.as_deref(), follow, tail, &container).await,
    }
}

async fn status(context: &Context, name: &str, output: Output) -> Result<i32, Error> {
    let cluster = context.cluster(name).await?;
    let (pods, lease, jobs) =
        futures::try_join!(context.pods(name), context.lease_annotations(name), async {
            context
                .api::<BackupJob>()
                .list(&ListParams::default())
                .await
                .map_err(kube_error("listing BackupJobs"))
        },)?;
    let view = view::cluster_view(&cluster, &pods, &lease, &jobs.items, BACKUPS_SHOWN);
    match output {
        Output::Text => print!("{}", render::status(&view, Timestamp::now())),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&view).expect("the view serializes")
        ),
    }
    Ok(0)
}

async fn switchover(
    context: &Context,
    name: &str,
    requested: Option<&str>,
    wait: bool,
    timeout: u64,
) -> Result<i32, Error> {
    let cluster = context.cluster(name).await?;
    let (rows, lease) = futures::try_join!(context.rows(name), context.lease_annotations(name))?;
    if let Some(in_flight) = lease
        .get(contract::ANNOTATION_SWITCHOVER_TO)
        .filter(|v| !v.is_empty())
    {
        return Err(Error::Refused(format!(
            "a switchover of {name} to {in_flight} is in progress: wait for it to finish (`kubectl pg status {name}`)"
        )));
    }
    let target = switchover::choose_target(name, &rows, requested)?;
    if let Some(declared) = cluster
        .spec
        .switchover_to
        .as_ref()
        .filter(|d| **d != target)
    {
        return Err(Error::Refused(format!(
            "spec.switchoverTo of {name} asks for {declared} and takes precedence over the annotation: change or remove spec.switchoverTo instead"
        )));
    }
    let from = rows
        .iter()
        .find(|row| row.is_primary())
        .map(|row| row.pod.clone())
        .unwrap_or_default();
    // Removing the passed-on mark makes the operator pass the request on even when the same
    // target was asked for before (and a failover has moved the primary since).
    context
        .annotate_cluster(
            name,
            json!({
                contract::ANNOTATION_SWITCHOVER_TO: target,
                contract::ANNOTATION_SWITCHOVER_PASSED_ON: null,
            }),
        )
        .await?;
    println!("switchover of {name} requested: {from} -> {target}");
    if !wait {
        return Ok(0);
    }
    let pods = context.api::<Pod>();
    wait_for(
        timeout,
        &format!("{target} to become the primary of {name}"),
        || async {
            let pod = pods
                .get_opt(&target)
                .await
                .map_err(kube_error(format!("reading pod {target}")))?;
            Ok(pod.is_some_and(|pod| InstanceRow::from_pod(&pod).is_primary()))
        },
    )
    .await?;
    println!("{target} is the primary of {name}");
    Ok(0)
}

async fn fence(context: &Context, name: &str, target: &str, on: bool) -> Result<i32, Error> {
    let cluster = context.cluster(name).await?;
    let rows = context.rows(name).await?;
    let instances: Vec<String> = rows.iter().map(|row| row.pod.clone()).collect();
    let current = FenceList::from_annotation(
        cluster
            .annotations()
            .get(FENCED_ANNOTATION)
            .map(String::as_str),
    );
    let known = target == "*" || instances.iter().any(|p| p == target) || current.contains(target);
    if !known {
        return Err(Error::PodNotFound {
            pod: target.to_string(),
            cluster: name.to_string(),
            instances: if instances.is_empty() {
                "none".to_string()
            } else {
                instances.join(", ")
            },
        });
    }
    if !on {
        let declared = &cluster.spec.fenced_instances;
        if declared
            .iter()
            .any(|d| d == "*" || d == target || target == "*")
            && !declared.is_empty()
        {
            return Err(Error::Refused(format!(
                "spec.fencedInstances of {name} fences {}: remove {target} there (kubectl pg only lifts fences it can set, the annotation's)",
                declared.join(", ")
            )));
        }
    }
    let next = if on {
        current.fence(target)
    } else {
        current.unfence(target, &instances)
    };
    if next == current {
        let state = if on { "fenced" } else { "not fenced" };
        println!("{target} of {name} is already {state}");
        return Ok(0);
    }
    context
        .annotate_cluster(name, json!({ FENCED_ANNOTATION: next.to_annotation() }))
        .await?;
    let who = if target == "*" {
        "every instance".to_string()
    } else {
        target.to_string()
    };
    if on {
        println!(
            "fenced {who} of {name}: PostgreSQL stops there and stays stopped until `kubectl pg unfence {name} {target}`"
        );
    } else {
        println!("unfenced {who} of {name}: PostgreSQL starts again");
    }
    Ok(0)
}

async fn hibernate(context: &Context, name: &str, on: bool) -> Result<i32, Error> {
    let cluster = context.cluster(name).await?;
    let annotated = cluster
        .annotations()
        .get(HIBERNATION_ANNOTATION)
        .is_some_and(|value| value == "on" || value == "true");
    if !on && cluster.spec.hibernation {
        return Err(Error::Refused(format!(
            "{name} hibernates because spec.hibernation is true: set it to false to resume"
        )));
    }
    if on == (annotated || cluster.spec.hibernation) {
        let state = if on { "hibernating" } else { "not hibernating" };
        println!("{name} is already {state}");
        return Ok(0);
    }
    let value = if on { json!("on") } else { json!(null) };
    context
        .annotate_cluster(name, json!({ HIBERNATION_ANNOTATION: value }))
        .await?;
    if on {
        println!(
            "{name} hibernates: its pods are deleted, its volumes kept; `kubectl pg resume {name}` brings it back"
        );
    } else {
        println!("{name} resumes on its volumes");
    }
    Ok(0)
}

async fn restart(
    context: &Context,
    name: &str,
    pod: Option<&str>,
    wait: bool,
    timeout: u64,
) -> Result<i32, Error> {
    context.cluster(name).await?;
    let rows = context.rows(name).await?;
    let targets = match pod {
        Some(pod) if rows.iter().any(|row| row.pod == pod) => vec![pod.to_string()],
        Some(pod) => {
            return Err(Error::PodNotFound {
                pod: pod.to_string(),
                cluster: name.to_string(),
                instances: rows
                    .iter()
                    .map(|row| row.pod.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        None => restart::order(&rows),
    };
    if targets.is_empty() {
        return Err(Error::Refused(format!(
            "{name} has no instance pods to restart (hibernated, or not created yet)"
        )));
    }
    let token = Timestamp::now().to_string();
    let pods = context.api::<Pod>();
    for target in &targets {
        let patch = json!({"metadata": {"annotations": {contract::ANNOTATION_RESTART: token}}});
        pods.patch(target, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_error(format!("asking pod {target} for a restart")))?;
        if !wait {
            println!("restart of {target} requested");
            continue;
        }
        println!("restarting {target} ...");
        std::io::stdout().flush().ok();
        wait_for(
            timeout,
            &format!("the instance manager of {target} to restart PostgreSQL"),
            || async {
                let pod = pods
                    .get_opt(target)
                    .await
                    .map_err(kube_error(format!("reading pod {target}")))?;
                Ok(pod.is_some_and(|pod| restart::done(&InstanceRow::from_pod(&pod), &token)))
            },
        )
        .await?;
        println!("{target} restarted");
    }
    Ok(0)
}

async fn backup(
    context: &Context,
    cluster_name: &str,
    name: Option<String>,
    job: impl Fn(&str) -> BackupJob,
) -> Result<i32, Error> {
    let cluster = context.cluster(cluster_name).await?;
    let name = name.unwrap_or_else(|| {
        format!(
            "{cluster_name}-{}",
            Timestamp::now().strftime("%Y%m%d%H%M%S")
        )
    });
    let job = job(&name);
    if cluster.spec.backup.is_none() && job.spec.volume.is_none() {
        return Err(Error::Refused(format!(
            "PostgresCluster {cluster_name} has no backup repository: set spec.backup (an S3 store) first, or back up to a volume with --volume-size"
        )));
    }
    match context
        .api::<BackupJob>()
        .create(&PostParams::default(), &job)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            return Err(Error::Refused(format!(
                "BackupJob {name} already exists: pick another --name"
            )));
        }
        Err(error) => return Err(kube_error(format!("creating BackupJob {name}"))(error)),
    }
    println!("BackupJob {name} created; follow it with `kubectl pg status {cluster_name}`");
    Ok(0)
}

/// The BackupJob `backup` creates.
pub fn backup_job(
    name: &str,
    cluster: &str,
    method: Method,
    kind: BackupKind,
    prefer_replica: bool,
    volume: Option<StorageSpec>,
) -> BackupJob {
    let mut job = BackupJob::new(
        name,
        BackupJobSpec {
            cluster: ClusterReference {
                name: cluster.to_string(),
            },
            action: BackupAction::Backup,
            method: match method {
                Method::PgBackRest => BackupMethod::PgBackRest,
                Method::BarmanCloud => BackupMethod::BarmanCloud,
            },
            backup_type: match kind {
                BackupKind::Full => BackupType::Full,
                BackupKind::Diff => BackupType::Diff,
                BackupKind::Incr => BackupType::Incr,
            },
            prefer_replica,
            volume,
        },
    );
    job.metadata.labels = Some(BTreeMap::from([(
        contract::LABEL_CLUSTER.to_string(),
        cluster.to_string(),
    )]));
    job
}

/// Which instances `psql` connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The rw Service.
    Primary,
    /// The ro Service.
    Replicas,
    /// One pod's address.
    Pod(String),
}

/// What `psql` needs besides the cluster.
#[derive(Clone, Debug)]
pub struct PsqlOptions {
    /// Where to connect.
    pub target: Target,
    /// Host override.
    pub host: Option<String>,
    /// Port override.
    pub port: Option<u16>,
    /// Database override.
    pub dbname: Option<String>,
    /// psql program.
    pub program: std::path::PathBuf,
    /// Extra psql arguments.
    pub args: Vec<String>,
}

async fn run_psql(context: &Context, name: &str, options: PsqlOptions) -> Result<i32, Error> {
    let cluster = context.cluster(name).await?;
    let endpoint = match &options.target {
        Target::Pod(pod) => {
            let pods = context.pods(name).await?;
            let Some(found) = pods.iter().find(|p| p.name_any() == *pod) else {
                return Err(Error::PodNotFound {
                    pod: pod.clone(),
                    cluster: name.to_string(),
                    instances: pods
                        .iter()
                        .map(|p| p.name_any())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            psql::pod_endpoint(found)
                .ok_or_else(|| Error::Refused(format!("pod {pod} has no IP address yet")))?
        }
        Target::Primary | Target::Replicas => {
            let service = if options.target == Target::Primary {
                contract::rw_service(name)
            } else {
                contract::ro_service(name)
            };
            let found = context
                .api::<Service>()
                .get_opt(&service)
                .await
                .map_err(kube_error(format!("reading Service {service}")))?
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "Service {service} not found: the operator creates it once it reconciled {name}"
                    ))
                })?;
            psql::service_endpoint(&found).ok_or_else(|| {
                Error::Refused(format!(
                    "Service {service} has no address to connect to: use --pod, or --host with a port-forward"
                ))
            })?
        }
    };
    let endpoint = psql::Endpoint {
        host: options.host.unwrap_or(endpoint.host),
        port: options.port.unwrap_or(endpoint.port),
    };
    let secret_name = psql::app_secret(&cluster);
    let secret = context
        .api::<Secret>()
        .get_opt(&secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?
        .ok_or_else(|| {
            Error::Refused(format!(
                "Secret {secret_name} with the application owner's credentials not found"
            ))
        })?;
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| {
        data.get(key)
            .map(|value| String::from_utf8_lossy(&value.0).into_owned())
            .ok_or_else(|| Error::Refused(format!("Secret {secret_name} has no key {key}")))
    };
    let (user, password) = (field("username")?, field("password")?);
    let database = options
        .dbname
        .unwrap_or_else(|| psql::app_database(&cluster));

    // The password goes into a private pgpass file (0600), removed when psql exits: never on
    // a command line, where other users could read it.
    let io = |what: &str| {
        let what = what.to_string();
        move |source| Error::Io { what, source }
    };
    let mut pgpass = tempfile::Builder::new()
        .prefix("kubectl-pg-pgpass-")
        .tempfile()
        .map_err(io("creating the pgpass file"))?;
    pgpass
        .write_all(psql::pgpass_line(&endpoint, &database, &user, &password).as_bytes())
        .and_then(|()| pgpass.flush())
        .map_err(io("writing the pgpass file"))?;
    let status = std::process::Command::new(&options.program)
        .arg("-h")
        .arg(&endpoint.host)
        .arg("-p")
        .arg(endpoint.port.to_string())
        .arg("-U")
        .arg(&user)
        .arg("-d")
        .arg(&database)
        .args(&options.args)
        .env("PGPASSFILE", pgpass.path())
        .env_remove("PGPASSWORD")
        .status()
        .map_err(io(&format!("running {}", options.program.display())))?;
    Ok(status.code().unwrap_or(1))
}

async fn logs(
    context: &Context,
    name: &str,
    pod: Option<&str>,
    follow: bool,
    tail: Option<i64>,
    container: &str,
) -> Result<i32, Error> {
    context.cluster(name).await?;
    let rows = context.rows(name).await?;
    let pods: Vec<String> = match pod {
        Some(pod) if rows.iter().any(|row| row.pod == pod) => vec![pod.to_string()],
        Some(pod) => {
            return Err(Error::PodNotFound {
                pod: pod.to_string(),
                cluster: name.to_string(),
                instances: rows
                    .iter()
                    .map(|row| row.pod.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        None => rows.iter().map(|row| row.pod.clone()).collect(),
    };
    if pods.is_empty() {
        return Err(Error::Refused(format!("{name} has no instance pods")));
    }
    let params = LogParams {
        container: Some(container.to_string()),
        follow,
        tail_lines: tail,
        ..LogParams::default()
    };
    let api = context.api::<Pod>();
    let prefix = |pod: &str| {
        if pods.len() > 1 {
            format!("[{pod}] ")
        } else {
            String::new()
        }
    };
    if !follow {
        for pod in &pods {
            let text = api
                .logs(pod, &params)
                .await
                .map_err(kube_error(format!("reading the logs of pod {pod}")))?;
            let prefix = prefix(pod);
            for line in text.lines() {
                println!("{prefix}{line}");
            }
        }
        return Ok(0);
    }
    let mut streams = Vec::new();
    for pod in &pods {
        let stream = api
            .log_stream(pod, &params)
            .await
            .map_err(kube_error(format!("following the logs of pod {pod}")))?;
        let prefix = prefix(pod);
        streams.push(
            stream
                .lines()
                .map(move |line| line.map(|line| format!("{prefix}{line}")))
                .boxed(),
        );
    }
    let mut all = futures::stream::select_all(streams);
    while let Some(line) = all.next().await {
        match line {
            Ok(line) => println!("{line}"),
            Err(source) => {
                return Err(Error::Io {
                    what: "reading a log stream".into(),
                    source,
                });
            }
        }
    }
    Ok(0)
}

/// Polls `done` until it says yes, or fails with [`Error::Timeout`] after `seconds`.
async fn wait_for<F, Fut>(seconds: u64, what: &str, mut done: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                seconds,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
