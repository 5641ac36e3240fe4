//! The client and namespace from the flags every kubectl plugin takes (`--kubeconfig`,
//! `--context`, `--cluster`, `--user`, `-n/--namespace`), with kubectl's fallbacks: `KUBECONFIG`,
//! `~/.kube/config`, the in-cluster service account, and the context's namespace.

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::cli::KubeFlags;
use crate::error::Error;

/// A client and the namespace the command works in.
pub async fn connect(flags: &KubeFlags) -> Result<(kube::Client, String), Error> {
    let options = KubeConfigOptions {
        context: flags.context.clone(),
        cluster: flags.kube_cluster.clone(),
        user: flags.user.clone(),
    };
    let config = if let Some(path) = &flags.kubeconfig {
        let kubeconfig =
            Kubeconfig::read_from(path).map_err(|error| Error::Config(error.to_string()))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|error| Error::Config(error.to_string()))?
    } else if options.context.is_some() || options.cluster.is_some() || options.user.is_some() {
        kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|error| Error::Config(error.to_string()))?
    } else {
        kube::Config::infer()
            .await
            .map_err(|error| Error::Config(error.to_string()))?
    };
    let namespace = flags
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client =
        kube::Client::try_from(config).map_err(|error| Error::Config(error.to_string()))?;
    Ok((client, namespace))
}
