//! Pure builders of what a Pooler owns: pgbouncer.ini, the ConfigMap that carries it, the
//! PgBouncer Deployment (with its reload supervisor and its metrics exporter), the Service, and
//! the auth Secret.

use std::collections::BTreeMap;

use api::contract;
use api::pooler::{PoolMode, Pooler, PoolerType};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, Secret, SecretVolumeSource, Service, ServicePort, ServiceSpec, TCPSocketAction,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::postgres_cluster::builders::{fnv1a64, restricted_container_security};

/// Label naming the Pooler a pod or object belongs to. Pooler pods never carry
/// [`contract::LABEL_CLUSTER`], so the cluster's instance selectors do not pick them up.
pub const LABEL_POOLER: &str = contract::LABEL_POOLER;
/// Annotation on the Deployment (not its pod template) with the checksum of pgbouncer.ini: a
/// change is applied by the supervisor's reload, not by a new pod.
pub const ANNOTATION_CONFIG_HASH: &str = "postgres.keiailab.io/pgbouncer-config-hash";
/// Role PgBouncer logs in as to run `auth_query` (SCRAM, not a superuser).
pub const AUTH_USER: &str = contract::POOLER_AUTH_USER;
/// Key of pgbouncer.ini in the ConfigMap.
pub const CONFIG_KEY: &str = "pgbouncer.ini";
/// Key of the auth file (the auth user's line only) in the auth Secret.
pub const AUTH_FILE_KEY: &str = "userlist.txt";
/// Key of the auth user's password in the auth Secret (the metrics exporter reads it).
pub const PASSWORD_KEY: &str = "password";
/// Name of the metrics exporter's container in the PgBouncer pods.
pub const EXPORTER_CONTAINER: &str = "metrics-exporter";
/// Where the ConfigMap is mounted.
pub const CONFIG_MOUNT_PATH: &str = "/etc/pgbouncer/config";
/// Where the auth Secret is mounted.
pub const AUTH_MOUNT_PATH: &str = "/etc/pgbouncer/auth";
/// Port PgBouncer listens on.
pub const PGBOUNCER_PORT: u16 = 5432;
/// Uid of the PgBouncer process (non-root; the image's `pgbouncer` user).
pub const PGBOUNCER_UID: i64 = 70;
/// Default PgBouncer image: Debian's `pgbouncer` package and a POSIX shell.
pub const DEFAULT_IMAGE: &str = "ghcr.io/keiailab/postgres-operator/pgbouncer:1.18";

/// pgbouncer.ini settings the operator owns; `spec.pgbouncer.parameters` may not set them.
pub const OWNED_SETTINGS: &[&str] = &[
    "listen_addr",
    "listen_port",
    "unix_socket_dir",
    "auth_type",
    "auth_file",
    "auth_user",
    "auth_query",
    "pool_mode",
    "default_pool_size",
    "max_client_conn",
    "pidfile",
    "logfile",
    "admin_users",
    "stats_users",
    "client_tls_sslmode",
    "client_tls_cert_file",
    "client_tls_key_file",
];

/// Name of the Deployment, Service and ConfigMap of `pooler` (the Pooler's own name).
pub fn object_name(pooler: &Pooler) -> String {
    pooler.name_any()
}

/// Name of the per-cluster Secret with the auth user's credentials.
pub fn auth_secret(cluster: &str) -> String {
    contract::pooler_auth_secret(cluster)
}

/// Labels of every object of `pooler`, and the pod selector.
pub fn labels(pooler: &Pooler) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_POOLER.to_string(), pooler.name_any()),
        (
            "app.kubernetes.io/name".to_string(),
            "pgbouncer".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), pooler.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            contract::MANAGED_BY.to_string(),
        ),
    ])
}

fn selector(pooler: &Pooler) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_POOLER.to_string(), pooler.name_any())])
}

fn owned_meta(pooler: &Pooler) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name(pooler)),
        namespace: pooler.namespace(),
        labels: Some(labels(pooler)),
        owner_references: pooler.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

/// A problem with the spec the user must fix (shown as a condition and an event).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    /// A parameter the operator sets itself.
    #[error("spec.pgbouncer.parameters.{0} is set by the operator: remove it")]
    OwnedSetting(String),
    /// A parameter name that is not a pgbouncer.ini key.
    #[error(
        "spec.pgbouncer.parameters has an invalid name {0:?}: use lower-case letters, digits and _"
    )]
    BadName(String),
    /// A value that would break the ini file.
    #[error("spec.pgbouncer.parameters.{0} has a line break or ';' in its value: remove it")]
    BadValue(String),
}

/// Checks `spec.pgbouncer.parameters` before anything is rendered.
pub fn validate(pooler: &Pooler) -> Result<(), InvalidSpec> {
    for (name, value) in &pooler.spec.pgbouncer.parameters {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(InvalidSpec::BadName(name.clone()));
        }
        if OWNED_SETTINGS.contains(&name.as_str()) {
            return Err(InvalidSpec::OwnedSetting(name.clone()));
        }
        if value.contains(['\n', '\r', ';']) {
            return Err(InvalidSpec::BadValue(name.clone()));
        }
    }
    Ok(())
}

/// Where pgbouncer.ini points the pool: a host, a port, and the file paths it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host of the cluster's rw or ro Service (or a local address in tests).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Address PgBouncer listens on.
    pub listen_addr: String,
    /// Port PgBouncer listens on.
    pub listen_port: u16,
    /// Path of the auth file (the auth user's SCRAM secret or password).
    pub auth_file: String,
    /// Directory of the Unix socket (empty: none).
    pub unix_socket_dir: String,
}

impl Target {
    /// The target inside Kubernetes: the cluster's Service for the pooler's type.
    pub fn for_pooler(pooler: &Pooler) -> Self {
        let cluster = &pooler.spec.cluster.name;
        let service = match pooler.spec.type_ {
            PoolerType::Rw => contract::rw_service(cluster),
            PoolerType::Ro => contract::ro_service(cluster),
        };
        let namespace = pooler.namespace().unwrap_or_default();
        Self {
            host: format!("{service}.{namespace}.svc"),
            port: contract::POSTGRES_PORT,
            listen_addr: "*".to_string(),
            listen_port: PGBOUNCER_PORT,
            auth_file: format!("{AUTH_MOUNT_PATH}/{AUTH_FILE_KEY}"),
            unix_socket_dir: String::new(),
        }
    }
}

/// `pool_mode` as pgbouncer.ini spells it.
pub fn pool_mode(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
        PoolMode::Statement => "statement",
    }
}

/// The auth_query: PgBouncer runs it as [`AUTH_USER`] with the client's user name as `$1`.
/// The function (`SECURITY DEFINER`, executable by [`AUTH_USER`] only, returning the SCRAM
/// verifier of a non-superuser login role) is created by the primary's instance manager.
pub fn auth_query() -> String {
    format!(
        "SELECT usename, passwd FROM {}.{}($1)",
        contract::POOLER_AUTH_SCHEMA,
        contract::POOLER_AUTH_FUNCTION
    )
}

/// Renders pgbouncer.ini. Application passwords are never in it: PgBouncer asks PostgreSQL
/// through `auth_query` as the auth user, whose own secret is the only line of `auth_file`.
pub fn pgbouncer_ini(pooler: &Pooler, target: &Target) -> String {
    let spec = &pooler.spec.pgbouncer;
    let mut ini = String::from("[databases]\n");
    ini.push_str(&format!(
        "* = host={} port={} auth_user={AUTH_USER}\n\n[pgbouncer]\n",
        target.host, target.port
    ));
    let mut settings: Vec<(String, String)> = vec![
        ("listen_addr".into(), target.listen_addr.clone()),
        ("listen_port".into(), target.listen_port.to_string()),
        ("unix_socket_dir".into(), target.unix_socket_dir.clone()),
        ("auth_type".into(), "scram-sha-256".into()),
        ("auth_file".into(), target.auth_file.clone()),
        ("auth_user".into(), AUTH_USER.into()),
        ("auth_query".into(), auth_query()),
        ("pool_mode".into(), pool_mode(spec.pool_mode).into()),
        (
            "default_pool_size".into(),
            spec.default_pool_size.to_string(),
        ),
        ("max_client_conn".into(), spec.max_client_conn.to_string()),
        // The admin console (PAUSE/RESUME/RELOAD, SHOW POOLS) over the Unix socket or by the
        // auth user; clients that send these options through drivers should not be refused.
        ("admin_users".into(), AUTH_USER.into()),
        ("stats_users".into(), AUTH_USER.into()),
        (
            "ignore_startup_parameters".into(),
            "extra_float_digits,options".into(),
        ),
        // After a failover the first server logins fail until the rw Service reaches the new
        // primary; PgBouncer's 15 s default would keep clients waiting that long after it.
        ("server_login_retry".into(), "2".into()),
    ];
    for (name, value) in &spec.parameters {
        match settings.iter_mut().find(|(key, _)| key == name) {
            Some(existing) => existing.1 = value.clone(),
            None => settings.push((name.clone(), value.clone())),
        }
    }
    for (name, value) in settings {
        ini.push_str(&format!("{name} = {value}\n"));
    }
    ini
}

/// Stable checksum of a rendered configuration.
pub fn config_hash(ini: &str) -> String {
    format!("{:016x}", fnv1a64(ini.as_bytes()))
}

/// The ConfigMap with pgbouncer.ini.
pub fn config_map(pooler: &Pooler, ini: &str) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(pooler),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), ini.to_string())])),
        ..ConfigMap::default()
    }
}

/// The line of PgBouncer's auth file for the auth user. `"` in a password is doubled, as
/// PgBouncer's userlist format wants.
pub fn auth_file_line(password: &str) -> String {
    format!("\"{AUTH_USER}\" \"{}\"\n", password.replace('"', "\"\""))
}

/// The per-cluster auth Secret: the auth user's credentials and the ready-made auth file. It is
/// created once (the password is generated) and owned, without being the controller, by the
/// first Pooler that needed it.
pub fn auth_secret_object(pooler: &Pooler, password: &str) -> Secret {
    let mut metadata = owned_meta(pooler);
    metadata.name = Some(auth_secret(&pooler.spec.cluster.name));
    if let Some(owners) = metadata.owner_references.as_mut() {
        for owner in owners {
            owner.controller = None;
        }
    }
    Secret {
        metadata,
        type_: Some("kubernetes.io/basic-auth".to_string()),
        string_data: Some(BTreeMap::from([
            ("username".to_string(), AUTH_USER.to_string()),
            (PASSWORD_KEY.to_string(), password.to_string()),
            (AUTH_FILE_KEY.to_string(), auth_file_line(password)),
        ])),
        ..Secret::default()
    }
}

/// The supervisor script: starts PgBouncer and sends it SIGHUP (a reload that keeps every client
/// and server connection) whenever the mounted pgbouncer.ini changes, so a spec change never
/// restarts the pod. SIGTERM is passed on (PgBouncer then finishes its clients' transactions).
pub fn supervisor_script() -> String {
    supervisor_script_for(&format!("{CONFIG_MOUNT_PATH}/{CONFIG_KEY}"))
}

/// [`supervisor_script`] for a pgbouncer.ini at `config` (tests run it outside a pod).
pub fn supervisor_script_for(config: &str) -> String {
    format!(
        r#"set -eu
config='{config}'
pgbouncer "$config" &
child=$!
trap 'kill -TERM "$child"; wait "$child"; exit 0' TERM INT
last=$(cksum "$config")
while kill -0 "$child" 2>/dev/null; do
  sleep 2 &
  wait $! || true
  now=$(cksum "$config" 2>/dev/null || echo "$last")
  if [ "$now" != "$last" ]; then
    last=$now
    kill -HUP "$child"
  fi
done
wait "$child"
"#
    )
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The metrics exporter beside PgBouncer: `pg-instance pooler-exporter` from the instance
/// manager's image (the PgBouncer image has only a shell and PgBouncer), logged in to the admin
/// console on loopback as the auth user with the mounted Secret's password, serving
/// pgbouncer_exporter's metrics on the `metrics` port that the Pooler's PodMonitor scrapes. Its
/// probes ask `/healthz`, which answers while PgBouncer is down (`pgbouncer_up` reports that), so
/// it never takes the pod out of the Service by itself.
pub fn exporter_container(image: &str) -> Container {
    let http_probe = |period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".to_string()),
            port: IntOrString::String(crate::monitoring::METRICS_PORT.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.to_string())),
            ("memory".to_string(), Quantity(memory.to_string())),
        ])
    };
    Container {
        name: EXPORTER_CONTAINER.to_string(),
        image: Some(image.to_string()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![
            "/usr/local/bin/pg-instance".to_string(),
            "pooler-exporter".to_string(),
        ]),
        args: Some(vec![
            "--listen".to_string(),
            format!("0.0.0.0:{}", contract::POOLER_METRICS_PORT),
            "--pgbouncer-host".to_string(),
            "127.0.0.1".to_string(),
            "--pgbouncer-port".to_string(),
            PGBOUNCER_PORT.to_string(),
            "--user".to_string(),
            AUTH_USER.to_string(),
            "--password-file".to_string(),
            format!("{AUTH_MOUNT_PATH}/{PASSWORD_KEY}"),
        ]),
        // JSON lines, as the instance managers log in pods.
        env: Some(vec![EnvVar {
            name: contract::env::LOG_JSON.to_string(),
            value: Some("true".to_string()),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some(crate::monitoring::METRICS_PORT.to_string()),
            container_port: i32::from(contract::POOLER_METRICS_PORT),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe(10)),
        liveness_probe: Some(http_probe(20)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("10m", "16Mi")),
            limits: Some(quantities("100m", "64Mi")),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![mount("auth", AUTH_MOUNT_PATH)]),
        ..Container::default()
    }
}

/// The PgBouncer Deployment: restricted pod security, non-root, read-only root filesystem;
/// PgBouncer from `image`, its metrics exporter from `exporter_image` (the instance manager's).
pub fn deployment(
    pooler: &Pooler,
    image: &str,
    exporter_image: &str,
    config_hash: &str,
) -> Deployment {
    let tcp_probe = |period: i32| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(i32::from(PGBOUNCER_PORT)),
            host: None,
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let mut template_labels = labels(pooler);
    template_labels.insert(LABEL_POOLER.to_string(), pooler.name_any());
    let container = Container {
        name: "pgbouncer".to_string(),
        image: Some(image.to_string()),
        command: Some(vec!["/bin/sh".to_string(), "-c".to_string()]),
        args: Some(vec![supervisor_script()]),
        ports: Some(vec![ContainerPort {
            name: Some(contract::PORT_NAME_PGBOUNCER.to_string()),
            container_port: i32::from(PGBOUNCER_PORT),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(tcp_probe(5)),
        liveness_probe: Some(tcp_probe(10)),
        resources: pooler.spec.resources.clone(),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![
            mount("config", CONFIG_MOUNT_PATH),
            mount("auth", AUTH_MOUNT_PATH),
            VolumeMount {
                name: "run".to_string(),
                mount_path: "/var/run/pgbouncer".to_string(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    // The checksum goes on the Deployment, never on the pod template: a template change would
    // roll the pods and drop every client, while the supervisor reloads in place.
    let mut metadata = owned_meta(pooler);
    metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_CONFIG_HASH.to_string(),
        config_hash.to_string(),
    )]));
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(pooler.spec.instances),
            selector: LabelSelector {
                match_labels: Some(selector(pooler)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(PGBOUNCER_UID),
                        run_as_group: Some(PGBOUNCER_UID),
                        // The auth Secret's files (mode 0440) belong to this group, so that
                        // PgBouncer and the exporter, both non-root, can read them.
                        fs_group: Some(PGBOUNCER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_string(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container, exporter_container(exporter_image)],
                    volumes: Some(vec![
                        Volume {
                            name: "config".to_string(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: object_name(pooler),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "auth".to_string(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(auth_secret(&pooler.spec.cluster.name)),
                                default_mode: Some(0o440),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "run".to_string(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The Service clients connect to.
pub fn service(pooler: &Pooler) -> Service {
    let exposure = pooler.spec.service.clone().unwrap_or_default();
    let mut metadata = owned_meta(pooler);
    if !exposure.annotations.is_empty() {
        metadata.annotations = Some(exposure.annotations);
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(exposure.type_.as_str().to_string()),
            load_balancer_source_ranges: (!exposure.load_balancer_source_ranges.is_empty())
                .then_some(exposure.load_balancer_source_ranges),
            selector: Some(selector(pooler)),
            ports: Some(vec![ServicePort {
                name: Some("pgbouncer".to_string()),
                port: i32::from(PGBOUNCER_PORT),
                target_port: Some(IntOrString::String("pgbouncer".to_string())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The endpoint clients use: `host:port` of the Service.
pub fn endpoint(pooler: &Pooler) -> String {
    format!(
        "{}.{}.svc:{PGBOUNCER_PORT}",
        object_name(pooler),
        pooler.namespace().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::common::ClusterReference;
    use api::pooler::{PgBouncerSpec, PoolerSpec};

    fn pooler() -> Pooler {
        let mut pooler = Pooler::new(
            "pool",
            PoolerSpec {
                cluster: ClusterReference {
                    name: "db".to_string(),
                },
                type_: PoolerType::Rw,
                instances: 2,
                pgbouncer: PgBouncerSpec::default(),
                resources: None,
                service: None,
            },
        );
        pooler.metadata.namespace = Some("ns".to_string());
        pooler.metadata.uid = Some("uid-1".to_string());
        pooler
    }

    #[test]
    fn ini_points_at_the_rw_or_ro_service_with_auth_query_and_spec_settings() {
        let mut pooler = pooler();
        pooler.spec.pgbouncer.pool_mode = PoolMode::Session;
        pooler.spec.pgbouncer.default_pool_size = 7;
        pooler.spec.pgbouncer.max_client_conn = 300;
        pooler
            .spec
            .pgbouncer
            .parameters
            .insert("server_idle_timeout".into(), "30".into());
        let ini = pgbouncer_ini(&pooler, &Target::for_pooler(&pooler));
        assert!(ini.contains("* = host=db-rw.ns.svc port=5432 auth_user=pgbouncer_auth\n"));
        assert!(ini.contains("pool_mode = session\n"));
        assert!(ini.contains("default_pool_size = 7\n"));
        assert!(ini.contains("max_client_conn = 300\n"));
        assert!(ini.contains("server_idle_timeout = 30\n"));
        assert!(ini.contains("auth_type = scram-sha-256\n"));
        assert!(ini.contains(
            "auth_query = SELECT usename, passwd FROM public.pgbouncer_user_lookup($1)\n"
        ));
        pooler.spec.type_ = PoolerType::Ro;
        assert!(pgbouncer_ini(&pooler, &Target::for_pooler(&pooler)).contains("host=db-ro.ns.svc"));
    }

    #[test]
    fn parameters_the_operator_owns_or_that_break_the_file_are_refused() {
        let mut pooler = pooler();
        pooler
            .spec
            .pgbouncer
            .parameters
            .insert("auth_type".into(), "trust".into());
        assert_eq!(
            validate(&pooler),
            Err(InvalidSpec::OwnedSetting("auth_type".into()))
        );
        pooler.spec.pgbouncer.parameters.clear();
        pooler
            .spec
            .pgbouncer
            .parameters
            .insert("x y".into(), "1".into());
        assert_eq!(validate(&pooler), Err(InvalidSpec::BadName("x y".into())));
        pooler.spec.pgbouncer.parameters.clear();
        pooler.spec.pgbouncer.parameters.insert(
            "server_reset_query".into(),
            "DISCARD ALL\nauth_type = trust".into(),
        );
        assert_eq!(
            validate(&pooler),
            Err(InvalidSpec::BadValue("server_reset_query".into()))
        );
        pooler.spec.pgbouncer.parameters.clear();
        assert_eq!(validate(&pooler), Ok(()));
    }

    #[test]
    fn deployment_is_restricted_non_root_and_not_selected_as_an_instance() {
        let pooler = pooler();
        let deployment = deployment(&pooler, DEFAULT_IMAGE, "manager:1", "abc");
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let template = spec.template;
        let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert!(!labels.contains_key(contract::LABEL_CLUSTER));
        let pod = template.spec.unwrap();
        let security = pod.security_context.unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.run_as_user, Some(PGBOUNCER_UID));
        let container = &pod.containers[0];
        let container_security = container.security_context.clone().unwrap();
        assert_eq!(container_security.allow_privilege_escalation, Some(false));
        assert_eq!(container_security.read_only_root_filesystem, Some(true));
        assert_eq!(
            deployment.metadata.owner_references.unwrap()[0].controller,
            Some(true)
        );
    }

    #[test]
    fn the_exporter_runs_beside_pgbouncer_on_the_metrics_port_the_pod_monitor_scrapes() {
        let pooler = pooler();
        let pod = deployment(&pooler, DEFAULT_IMAGE, "manager:1", "abc")
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(pod.containers.len(), 2);
        let exporter = pod
            .containers
            .iter()
            .find(|container| container.name == EXPORTER_CONTAINER)
            .unwrap();
        assert_eq!(exporter.image.as_deref(), Some("manager:1"));
        assert_eq!(
            exporter.command.as_deref().unwrap(),
            ["/usr/local/bin/pg-instance", "pooler-exporter"]
        );
        let args = exporter.args.clone().unwrap().join(" ");
        assert!(args.contains("--pgbouncer-port 5432"), "{args}");
        assert!(
            args.contains("--password-file /etc/pgbouncer/auth/password"),
            "{args}"
        );
        assert!(args.contains("--user pgbouncer_auth"), "{args}");
        assert!(
            exporter
                .env
                .iter()
                .flatten()
                .any(|e| e.name == contract::env::LOG_JSON && e.value.as_deref() == Some("true"))
        );
        // The port the PodMonitor names, on pgbouncer_exporter's number.
        let port = &exporter.ports.as_ref().unwrap()[0];
        assert_eq!(port.name.as_deref(), Some(crate::monitoring::METRICS_PORT));
        assert_eq!(port.container_port, 9127);
        let monitor = crate::monitoring::pooler::pod_monitor(&pooler, "db");
        assert_eq!(
            monitor["spec"]["podMetricsEndpoints"][0]["port"],
            port.name.clone().unwrap()
        );
        // Probed on /healthz (never on PgBouncer), restricted, small, and the password readable.
        let readiness = exporter.readiness_probe.as_ref().unwrap();
        assert_eq!(
            readiness.http_get.as_ref().unwrap().path.as_deref(),
            Some("/healthz")
        );
        let security = exporter.security_context.clone().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let limits = exporter.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["memory"].0, "64Mi");
        assert_eq!(
            exporter.volume_mounts.as_ref().unwrap()[0].mount_path,
            AUTH_MOUNT_PATH
        );
        assert_eq!(pod.security_context.unwrap().fs_group, Some(PGBOUNCER_UID));
        assert!(auth_secret_object(&pooler, "pw").string_data.unwrap()[PASSWORD_KEY] == "pw");
        // The admin console the instance managers PAUSE through is still PgBouncer's port.
        let pgbouncer = &pod.containers[0];
        assert_eq!(pgbouncer.name, "pgbouncer");
        assert_eq!(
            pgbouncer.ports.as_ref().unwrap()[0].name.as_deref(),
            Some(contract::PORT_NAME_PGBOUNCER)
        );
    }

    #[test]
    fn auth_secret_has_only_the_auth_users_line_and_no_controller() {
        let pooler = pooler();
        let secret = auth_secret_object(&pooler, "pa\"ss");
        assert_eq!(secret.metadata.name.as_deref(), Some("db-pooler-auth"));
        let data = secret.string_data.unwrap();
        assert_eq!(data[AUTH_FILE_KEY], "\"pgbouncer_auth\" \"pa\"\"ss\"\n");
        assert_eq!(
            secret.metadata.owner_references.unwrap()[0].controller,
            None
        );
    }

    #[test]
    fn config_hash_follows_the_rendered_file() {
        let mut pooler = pooler();
        let target = Target::for_pooler(&pooler);
        let before = config_hash(&pgbouncer_ini(&pooler, &target));
        pooler.spec.pgbouncer.default_pool_size = 3;
        assert_ne!(before, config_hash(&pgbouncer_ini(&pooler, &target)));
    }

    #[test]
    fn the_service_is_exposed_as_the_spec_says() {
        let mut pooler = pooler();
        assert_eq!(
            service(&pooler).spec.unwrap().type_.as_deref(),
            Some("ClusterIP")
        );
        pooler.spec.service = Some(api::common::ServiceExposure {
            type_: api::common::ServiceType::LoadBalancer,
            annotations: BTreeMap::from([("lb".to_string(), "internal".to_string())]),
            load_balancer_source_ranges: vec!["10.0.0.0/8".to_string()],
        });
        let built = service(&pooler);
        assert_eq!(built.metadata.annotations.unwrap()["lb"], "internal");
        let spec = built.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_string()])
        );
    }
}
