//! `cargo xtask demo`: a local control plane with our API: etcd + kube-apiserver, the CRDs, the
//! samples of examples/, and a listing of what the API server stored.

use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use testbed::{ApiServer, manifests, paths};

/// Runs the demo; with `once` it exits after printing, else it serves until Ctrl-C.
pub fn run(once: bool) -> anyhow::Result<()> {
    crate::setup::install_servers()?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        crate::step("starting etcd and kube-apiserver on loopback");
        let server = ApiServer::start().await?;
        let client = server.client().await?;
        let crds = api::all_crds();
        crate::step(&format!("installing {} CRDs", crds.len()));
        server.install_crds(&crds).await?;
        let examples = manifests::read_folder(&paths::workspace_root().join("examples"))?;
        crate::step(&format!(
            "applying {} objects from examples/",
            examples.len()
        ));
        manifests::apply_all(&client, &examples, "default").await?;

        println!();
        for crd in &crds {
            let gvk = GroupVersionKind::gvk(
                &crd.spec.group,
                &crd.spec.versions[0].name,
                &crd.spec.names.kind,
            );
            let resource = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            for object in api.list(&ListParams::default()).await? {
                println!(
                    "{:<22} {:<12} {:<22} generation={}",
                    crd.spec.names.kind,
                    object.metadata.namespace.as_deref().unwrap_or("-"),
                    object.metadata.name.as_deref().unwrap_or("-"),
                    object.metadata.generation.unwrap_or_default()
                );
            }
        }
        let clusters: Api<api::PostgresCluster> = Api::namespaced(client.clone(), "default");
        let demo = clusters.get("demo").await?;
        println!(
            "\nPostgresCluster default/demo as stored (defaults filled in by the API server):\n"
        );
        println!("{}", serde_yaml::to_string(&demo.spec)?);
        println!("kubeconfig: {}", server.kubeconfig_path().display());
        println!("API server: {}", server.url());
        if once {
            return Ok(());
        }
        println!(
            "\nServing until Ctrl-C (try: KUBECONFIG={} kubectl get postgres)",
            server.kubeconfig_path().display()
        );
        tokio::signal::ctrl_c().await?;
        drop(server);
        Ok(())
    })
}
