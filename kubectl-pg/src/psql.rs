//! Where `psql` connects and with which credentials (pure): the Service's or the pod's address,
//! the application database and owner, and a pgpass line so that the password never appears on
//! a command line.

use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::api::core::v1::{Pod, Service};

/// A host and port to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Where a client outside the cluster network reaches `service`: its load balancer's address when
/// it has one, else its cluster IP; on the port named `postgresql` (else its first port).
pub fn service_endpoint(service: &Service) -> Option<Endpoint> {
    let spec = service.spec.as_ref()?;
    let ports = spec.ports.clone().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(contract::PORT_NAME_POSTGRES))
        .or(ports.first())
        .map(|p| p.port)?;
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|ingress| ingress.first())
        .and_then(|first| first.ip.clone().or(first.hostname.clone()));
    let cluster_ip = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None");
    Some(Endpoint {
        host: ingress.or(cluster_ip)?,
        port: u16::try_from(port).ok()?,
    })
}

/// The pod's IP and the container port named `postgresql` (5432 when there is none).
pub fn pod_endpoint(pod: &Pod) -> Option<Endpoint> {
    let host = pod.status.as_ref()?.pod_ip.clone()?;
    let port = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(contract::PORT_NAME_POSTGRES))
        .and_then(|port| u16::try_from(port.container_port).ok())
        .unwrap_or(contract::POSTGRES_PORT);
    Some(Endpoint { host, port })
}

/// The Secret with the application owner's credentials: the user's (`bootstrap.initdb.secret`)
/// or the generated `<cluster>-app`.
pub fn app_secret(cluster: &PostgresCluster) -> String {
    initdb(cluster)
        .and_then(|initdb| initdb.secret.as_ref())
        .map(|secret| secret.name.clone())
        .unwrap_or_else(|| contract::app_secret(&cluster.metadata.name.clone().unwrap_or_default()))
}

/// The application database (`bootstrap.initdb.database`, `app` by default).
pub fn app_database(cluster: &PostgresCluster) -> String {
    initdb(cluster)
        .map(|initdb| initdb.database.clone())
        .unwrap_or_else(|| "app".to_string())
}

fn initdb(cluster: &PostgresCluster) -> Option<&api::postgres_cluster::InitdbBootstrap> {
    cluster.spec.bootstrap.as_ref()?.initdb.as_ref()
}

/// One `.pgpass` line (`host:port:database:user:password`, `\` and `:` escaped).
pub fn pgpass_line(endpoint: &Endpoint, database: &str, user: &str, password: &str) -> String {
    let escape = |field: &str| field.replace('\\', "\\\\").replace(':', "\\:");
    format!(
        "{}:{}:{}:{}:{}\n",
        escape(&endpoint.host),
        endpoint.port,
        escape(database),
        escape(user),
        escape(password)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, LoadBalancerIngress, LoadBalancerStatus, PodSpec, PodStatus,
        ServicePort, ServiceSpec, ServiceStatus,
    };
    use serde_json::json;

    fn service(cluster_ip: &str, ingress: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ports: Some(vec![
                    ServicePort {
                        name: Some("metrics".into()),
                        port: 9187,
                        ..ServicePort::default()
                    },
                    ServicePort {
                        name: Some("postgresql".into()),
                        port: 5432,
                        ..ServicePort::default()
                    },
                ]),
                ..ServiceSpec::default()
            }),
            status: ingress.map(|ip| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(ip.into()),
                        ..LoadBalancerIngress::default()
                    }]),
                }),
                ..ServiceStatus::default()
            }),
            ..Service::default()
        }
    }

    #[test]
    fn a_service_is_reached_on_its_load_balancer_else_its_cluster_ip() {
        let endpoint = |s: &Service| service_endpoint(s).map(|e| format!("{}:{}", e.host, e.port));
        assert_eq!(
            endpoint(&service("10.0.0.5", None)).as_deref(),
            Some("10.0.0.5:5432")
        );
        assert_eq!(
            endpoint(&service("10.0.0.5", Some("192.0.2.1"))).as_deref(),
            Some("192.0.2.1:5432")
        );
        assert_eq!(endpoint(&service("None", None)), None);
    }

    #[test]
    fn a_pod_is_reached_on_its_ip_and_named_port() {
        let mut pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "postgres".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("postgresql".into()),
                        container_port: 15432,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("127.0.0.9".into()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        assert_eq!(
            pod_endpoint(&pod),
            Some(Endpoint {
                host: "127.0.0.9".into(),
                port: 15432
            })
        );
        pod.spec.as_mut().unwrap().containers[0].ports = None;
        assert_eq!(pod_endpoint(&pod).unwrap().port, 5432);
        pod.status = None;
        assert_eq!(pod_endpoint(&pod), None);
    }

    #[test]
    fn credentials_come_from_the_bootstrap_or_the_generated_secret() {
        let cluster = |bootstrap: serde_json::Value| -> PostgresCluster {
            serde_json::from_value(json!({
                "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresCluster",
                "metadata": {"name": "db"},
                "spec": {"image": "pg:18", "bootstrap": bootstrap}
            }))
            .unwrap()
        };
        let plain = cluster(json!({}));
        assert_eq!(app_secret(&plain), "db-app");
        assert_eq!(app_database(&plain), "app");
        let custom =
            cluster(json!({"initdb": {"database": "shop", "secret": {"name": "shop-owner"}}}));
        assert_eq!(app_secret(&custom), "shop-owner");
        assert_eq!(app_database(&custom), "shop");
    }

    #[test]
    fn pgpass_escapes_colons_and_backslashes() {
        let endpoint = Endpoint {
            host: "10.0.0.5".into(),
            port: 5432,
        };
        assert_eq!(
            pgpass_line(&endpoint, "app", "app", r"a:b\c"),
            "10.0.0.5:5432:app:app:a\\:b\\\\c\n"
        );
    }
}
