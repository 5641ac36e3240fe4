//! The node agent runs what the real controllers create: a StatefulSet's pods (init container,
//! env from a Secret and the downward API, ConfigMap and claim volumes, the service-account token
//! reaching the API server in-cluster) become Ready in order, and a deleted pod comes back with
//! its claim's data; exec probes run inside the container (its mount namespace, environment and
//! user): a passing one makes the pod Ready; a failing liveness probe, or a startup probe that
//! never passes, restarts the container.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use nodeagent::{ImageTable, LocalImage, NodeAgent, NodeAgentConfig};
use serde_json::json;
use testbed::ControlPlane;

const NAMESPACE: &str = "agent-test";

async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((address, 8080)).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

async fn ready_pod(pods: &Api<Pod>, name: &str, not_uid: Option<&str>) -> Option<Pod> {
    let pod = pods.get_opt(name).await.ok()??;
    if not_uid.is_some() && pod.metadata.uid.as_deref() == not_uid {
        return None;
    }
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then_some(pod)
}

async fn wait_ready(
    pods: &Api<Pod>,
    name: &str,
    not_uid: Option<&str>,
    dir: &std::path::Path,
) -> anyhow::Result<Pod> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(pod) = ready_pod(pods, name, not_uid).await {
            return Ok(pod);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "pod {name} not Ready after 90 s: {:?}\ninit log:\n{}\nweb log:\n{}",
                pods.get_opt(name).await?.and_then(|p| p.status),
                nodeagent::pod_log(dir, NAMESPACE, name, "prepare"),
                nodeagent::pod_log(dir, NAMESPACE, name, "web"),
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn ip_of(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn statefulset_pods_run_ready_in_order_and_keep_their_claims() -> anyhow::Result<()> {
    let plane = ControlPlane::shared()?;
    let client = plane.client().await?;
    let dir = tempfile::Builder::new()
        .prefix("nodeagent-")
        .tempdir_in(nodeagent::work_dir()?)?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut images = ImageTable::default();
    images.add(
        "python",
        LocalImage {
            files: Vec::new(),
            entrypoint: vec!["python3".to_string()],
        },
    );
    let _agent = NodeAgent::start(NodeAgentConfig {
        node_name: "agent-node".to_string(),
        kubeconfig: plane.kubeconfig_path().to_path_buf(),
        api_port: plane.port(),
        ca: plane.serving_ca_path().to_path_buf(),
        dir: dir.path().to_path_buf(),
        images,
    })?;

    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web", "namespace": NAMESPACE},
               "data": {"index.html": "hello from a ConfigMap"}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "greeting", "namespace": NAMESPACE},
               "stringData": {"word": "hi"}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {
            "replicas": 2,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "initContainers": [{
                        "name": "prepare", "image": "registry.example/python:3",
                        "command": ["sh", "-c", concat!(
                            "echo \"$GREETING $POD_NAME $POD_IP\" >> /data/boots.txt && ",
                            "cp /config/index.html /data/index.html && ",
                            "python3 -c \"import ssl,urllib.request,os; d='/var/run/secrets/kubernetes.io/serviceaccount/'; ",
                            "c=ssl.create_default_context(cafile=d+'ca.crt'); ",
                            "r=urllib.request.Request('https://'+os.environ['KUBERNETES_SERVICE_HOST']+'/api', headers={'Authorization': 'Bearer '+open(d+'token').read()}); ",
                            "print(urllib.request.urlopen(r, context=c).status)\" > /data/api.txt")],
                        "env": [
                            {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "word"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        ],
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data"},
                            {"name": "config", "mountPath": "/config", "readOnly": true},
                        ],
                    }],
                    "containers": [{
                        "name": "web", "image": "registry.example/python:3",
                        "args": ["-m", "http.server", "8080", "--directory", "/data"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/index.html", "port": "http"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "web"}}],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        }}),
    ];
    for object in objects {
        testbed::manifests::apply(&client, &object, NAMESPACE).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);

    // OrderedReady: web-1 exists only once web-0 is Running and Ready.
    let first = wait_ready(&pods, "web-0", None, dir.path()).await?;
    let second = wait_ready(&pods, "web-1", None, dir.path()).await?;
    let (first_ip, second_ip) = (ip_of(&first), ip_of(&second));
    assert_ne!(first_ip, second_ip, "each pod has its own address");
    assert_eq!(
        http_get(&first_ip, "/index.html").await.as_deref(),
        Some("hello from a ConfigMap")
    );
    assert_eq!(
        http_get(&second_ip, "/api.txt")
            .await
            .as_deref()
            .map(str::trim),
        Some("200"),
        "the pod reached the API server with its service-account token"
    );
    assert_eq!(
        http_get(&first_ip, "/boots.txt").await,
        Some(format!("hi web-0 {first_ip}\n"))
    );

    // A deleted pod is stopped, re-created by the StatefulSet controller, and finds its data.
    let old_uid = first.metadata.uid.clone().unwrap_or_default();
    pods.delete("web-0", &DeleteParams::default()).await?;
    let again = wait_ready(&pods, "web-0", Some(&old_uid), dir.path()).await?;
    let again_ip = ip_of(&again);
    let boots = http_get(&again_ip, "/boots.txt").await.unwrap_or_default();
    assert_eq!(
        boots.lines().count(),
        2,
        "the claim kept the first boot's line: {boots:?}"
    );

    exec_probes_run_inside_the_container(&client, dir.path()).await
}

async fn exec_probes_run_inside_the_container(
    client: &kube::Client,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let pod = |name: &str, container: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE},
               "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}})
    };
    // Ready only once the container has written /tmp/ready in its own /tmp (which the host
    // does not see) and when the probe sees the container's environment.
    let probed = pod(
        "probed",
        json!({"name": "web", "image": "registry.example/python:3",
               "command": ["sh", "-c", "sleep 2; touch /tmp/ready; exec python3 -m http.server 8080"],
               "env": [{"name": "MARK", "value": "inside"}],
               "readinessProbe": {"exec": {"command": ["sh", "-c", "test -e /tmp/ready && test \"$MARK\" = inside && test \"$(id -u)\" != 0"]},
                                  "periodSeconds": 1, "timeoutSeconds": 5}}),
    );
    // Never Ready, and restarted by its failing liveness probe.
    let failing = pod(
        "failing",
        json!({"name": "web", "image": "registry.example/python:3",
               "args": ["-m", "http.server", "8080"],
               "readinessProbe": {"exec": {"command": ["test", "-e", "/tmp/absent"]}, "periodSeconds": 1},
               "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}}),
    );
    // Never started: its startup probe fails, so its readiness probe (which would pass) never
    // runs, and after failureThreshold x periodSeconds the container is killed and restarted.
    let never_started = pod(
        "never-started",
        json!({"name": "web", "image": "registry.example/python:3",
               "args": ["-m", "http.server", "8080"],
               "startupProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2},
               "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}),
    );
    for object in [probed, failing, never_started] {
        testbed::manifests::apply(client, &object, NAMESPACE).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    wait_ready(&pods, "probed", None, dir).await?;
    // A status write that was lost (or overwritten) is written again: the stored status says
    // not Ready, the agent's own says Ready, and the agent puts its own back.
    let unready = json!({"status": {"conditions": [
        {"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}]}});
    pods.patch_status("probed", &PatchParams::default(), &Patch::Merge(&unready))
        .await?;
    anyhow::ensure!(
        ready_pod(&pods, "probed", None).await.is_none(),
        "the stored status was not changed"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready_pod(&pods, "probed", None).await.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not write its status (Ready) again within 15 s of a lost write"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    restarted_never_ready(&pods, "failing", "exec liveness probe fails").await?;
    restarted_never_ready(&pods, "never-started", "startup probe never passes").await?;
    // The agent's own lines about each pod say what it saw and did (a failure message shows them).
    for (pod, expected) in [
        ("never-started", "web: startup probe failed 2 times: killed"),
        (
            "never-started",
            "web: Startup probe failed: [\"false\"] ended with exit status: 1",
        ),
        (
            "failing",
            "web: Readiness probe failed: [\"test\", \"-e\", \"/tmp/absent\"] ended with exit status: 1",
        ),
        (
            "never-started",
            "status written: phase Running, Ready False",
        ),
        ("probed", "web: ready (readiness probe passed)"),
        ("probed", "status written: phase Running, Ready True"),
    ] {
        let notes = nodeagent::pod_log(dir, NAMESPACE, pod, nodeagent::pod::AGENT_LOG);
        anyhow::ensure!(
            notes.contains(expected),
            "the node agent's lines about {pod} lack {expected:?}:\n{notes}"
        );
    }
    Ok(())
}

/// Waits until the pod's container has been restarted, checking meanwhile that it is never Ready.
async fn restarted_never_ready(pods: &Api<Pod>, name: &str, why: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = pods.get(name).await?;
        let status = pod.status.unwrap_or_default();
        let ready = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(!ready, "{name} is Ready, but its {why}");
        let restarts = status
            .container_statuses
            .unwrap_or_default()
            .first()
            .map_or(0, |c| c.restart_count);
        if restarts >= 1 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: the container whose {why} was not restarted in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
