//! A stand-in for the StatefulSet controller and the kubelet, for the demo only: the local control
//! plane has neither, so this creates the pods of our StatefulSets and runs each pod's instance
//! manager (`pg-instance`) as a local process on loopback ports, keeping its data directory across
//! pod re-creations as a PersistentVolumeClaim would.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use api::contract;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerPort, PersistentVolumeClaimVolumeSource, Pod, PodCondition, Volume,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nix::sys::signal::Signal;
use testbed::process::{ChildGuard, die_with_parent};

/// One pod the local kubelet runs.
struct LocalPod {
    process: ChildGuard,
    postgres_port: u16,
    http_port: u16,
}

/// Creates and runs the pods of the StatefulSets in `namespace`.
pub struct LocalKubelet {
    client: kube::Client,
    namespace: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    instance_binary: PathBuf,
    pods: BTreeMap<String, LocalPod>,
}

impl LocalKubelet {
    /// A kubelet whose pods keep their files under `dir`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        dir: &Path,
        kubeconfig: &Path,
        instance_binary: &Path,
    ) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            dir: dir.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            instance_binary: instance_binary.to_path_buf(),
            pods: BTreeMap::new(),
        }
    }

    /// PostgreSQL port of a running pod.
    pub fn postgres_port(&self, pod: &str) -> Option<u16> {
        self.pods.get(pod).map(|local| local.postgres_port)
    }

    /// One pass: create missing pods, start their instance managers, stop the ones whose pod is
    /// gone, and report readiness into the pod status.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let statefulsets: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut wanted = BTreeMap::new();
        for statefulset in statefulsets
            .list(&ListParams::default().labels(contract::LABEL_CLUSTER))
            .await?
        {
            let name = statefulset.metadata.name.clone().unwrap_or_default();
            let replicas = statefulset
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            for ordinal in 0..replicas {
                wanted.insert(format!("{name}-{ordinal}"), statefulset.clone());
            }
        }

        let existing: BTreeMap<String, Pod> = pods
            .list(&ListParams::default().labels(contract::LABEL_CLUSTER))
            .await?
            .into_iter()
            .map(|pod| (pod.metadata.name.clone().unwrap_or_default(), pod))
            .collect();

        // Pods deleted (rolling update, scale-down, hibernation): stop their instance manager.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|name| !existing.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            eprintln!("    kubelet: pod {name} is gone, stopping its instance manager");
            self.pods.remove(&name);
        }

        for (name, statefulset) in &wanted {
            if !existing.contains_key(name) {
                self.create_pod(&pods, name, statefulset).await?;
            }
            if !self.pods.contains_key(name) {
                self.start(name, statefulset).await?;
            }
        }

        for (name, local) in &self.pods {
            let ready = http_ok(local.http_port, "/readyz");
            let status = serde_json::json!({
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [PodCondition {
                        type_: "Ready".to_string(),
                        status: if ready { "True" } else { "False" }.to_string(),
                        ..PodCondition::default()
                    }],
                }
            });
            let _ = pods
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        }
        Ok(())
    }

    async fn create_pod(
        &mut self,
        pods: &Api<Pod>,
        name: &str,
        statefulset: &StatefulSet,
    ) -> anyhow::Result<()> {
        let template = statefulset
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let postgres_port = testbed::free_port();
        let http_port = testbed::free_port();
        let mut pod = Pod {
            metadata: template.metadata.unwrap_or_default(),
            spec: template.spec,
            status: None,
        };
        pod.metadata.name = Some(name.to_string());
        pod.metadata.namespace = Some(self.namespace.clone());
        pod.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(contract::LABEL_INSTANCE.to_string(), name.to_string());
        // Peers reach each other through the ports named in the pod spec: give each local pod its own.
        let claims = statefulset
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.clone())
            .unwrap_or_default();
        if let Some(spec) = pod.spec.as_mut() {
            // As the StatefulSet controller does: one claim per template and pod.
            let volumes = spec.volumes.get_or_insert_with(Vec::new);
            for claim in claims {
                let claim_name = claim.metadata.name.unwrap_or_default();
                volumes.push(Volume {
                    name: claim_name.clone(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: format!("{claim_name}-{name}"),
                        read_only: None,
                    }),
                    ..Volume::default()
                });
            }
            for container in &mut spec.containers {
                if let Some(ports) = container.ports.as_mut() {
                    for port in ports.iter_mut() {
                        match port.name.as_deref() {
                            Some(contract::PORT_NAME_POSTGRES) => {
                                *port = named_port(contract::PORT_NAME_POSTGRES, postgres_port)
                            }
                            Some(contract::PORT_NAME_STATUS) => {
                                *port = named_port(contract::PORT_NAME_STATUS, http_port)
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        eprintln!("    kubelet: created pod {name} (postgres 127.0.0.1:{postgres_port})");
        Ok(())
    }

    async fn start(&mut self, name: &str, statefulset: &StatefulSet) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods.get(name).await?;
        let port_of = |wanted: &str| -> Option<u16> {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.clone().unwrap_or_default())
                .find(|p| p.name.as_deref() == Some(wanted))
                .map(|p| p.container_port as u16)
        };
        let (Some(postgres_port), Some(http_port)) = (
            port_of(contract::PORT_NAME_POSTGRES),
            port_of(contract::PORT_NAME_STATUS),
        ) else {
            anyhow::bail!(
                "pod {name} has no {} / {} ports",
                contract::PORT_NAME_POSTGRES,
                contract::PORT_NAME_STATUS
            );
        };
        let cluster = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(contract::LABEL_CLUSTER))
            .cloned()
            .unwrap_or_default();
        let env: BTreeMap<String, String> = statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();

        // The "volumes": data kept across pod re-creations, the ConfigMap written out as a file.
        let pod_dir = self.dir.join(name);
        std::fs::create_dir_all(&pod_dir)?;
        testbed::process::chown_to_unprivileged(&pod_dir)?;
        let config_file = pod_dir.join(contract::CONFIG_KEY_POSTGRESQL);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Ok(config) = config_maps.get(&contract::config_map(&cluster)).await
            && let Some(text) = config
                .data
                .as_ref()
                .and_then(|d| d.get(contract::CONFIG_KEY_POSTGRESQL))
        {
            std::fs::write(&config_file, text)?;
        }

        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pod_dir.join("pg-instance.log"))?;
        let mut command = Command::new(&self.instance_binary);
        command
            .arg(format!("--pod-name={name}"))
            .arg(format!("--namespace={}", self.namespace))
            .arg(format!("--cluster={cluster}"))
            .arg(format!("--pgdata={}", pod_dir.join("data").display()))
            .arg(format!("--pg-bin={}", testbed::paths::pg_bin().display()))
            .arg("--listen-address=127.0.0.1")
            .arg(format!("--port={postgres_port}"))
            .arg(format!("--http-address=127.0.0.1:{http_port}"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--postgres-setting=include_if_exists={}",
                config_file.display()
            ))
            .arg("--postgres-setting=shared_buffers=32MB");
        if nix::unistd::Uid::effective().is_root() {
            command.arg(format!(
                "--run-as-user={}",
                testbed::process::UNPRIVILEGED_USER
            ));
        }
        for (flag, variable) in [
            ("--lease-duration-seconds", "LEASE_DURATION_SECONDS"),
            ("--renew-deadline-seconds", "RENEW_DEADLINE_SECONDS"),
            ("--synchronous-standbys", "SYNCHRONOUS_STANDBYS"),
        ] {
            if let Some(value) = env.get(variable) {
                command.arg(format!("{flag}={value}"));
            }
        }
        command
            .env_remove("PGDATA")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting pg-instance for {name}"))?;
        eprintln!("    kubelet: started the instance manager of {name}");
        self.pods.insert(
            name.to_string(),
            LocalPod {
                process: ChildGuard::new(child, Signal::SIGTERM, Duration::from_secs(20)),
                postgres_port,
                http_port,
            },
        );
        Ok(())
    }

    /// Stops every instance manager (and so PostgreSQL).
    pub fn stop_all(&mut self) {
        for (_, mut local) in std::mem::take(&mut self.pods) {
            local.process.stop();
        }
    }
}

fn named_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}
