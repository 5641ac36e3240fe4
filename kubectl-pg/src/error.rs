//! Errors of the plugin: each says what failed, on which object, and what to do.

/// What can go wrong in a `kubectl pg` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read or has no usable context.
    #[error("cannot load the kubeconfig: {0}")]
    Config(String),
    /// No PostgresCluster of that name in the namespace.
    #[error(
        "PostgresCluster {name} not found in namespace {namespace} (list them with `kubectl get postgresclusters -n {namespace}`)"
    )]
    ClusterNotFound {
        /// Cluster name.
        name: String,
        /// Namespace searched.
        namespace: String,
    },
    /// The pod named on the command line is not an instance of the cluster.
    #[error("pod {pod} is not an instance of PostgresCluster {cluster} (instances: {instances})")]
    PodNotFound {
        /// Pod name given.
        pod: String,
        /// Cluster name.
        cluster: String,
        /// The cluster's instance pods, comma-separated.
        instances: String,
    },
    /// The command cannot be carried out in the cluster's current state.
    #[error("{0}")]
    Refused(String),
    /// A call to the API server failed.
    #[error("{what}: {source}")]
    Kube {
        /// What the call was for.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A wait ran out of time.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        seconds: u64,
    },
    /// A local file or process (pgpass file, psql) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Wraps a client error with what the call was for.
pub fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Kube { what, source }
}
