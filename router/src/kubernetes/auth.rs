//! Client authentication in Kubernetes mode: the roles PostgresUser objects declare for the
//! cluster (with the password from their Secret), plus the backend login, checked with
//! SCRAM-SHA-256. Read when the router starts: a new or changed PostgresUser reaches the router
//! with its next rollout (the frontend keeps its verifiers for its lifetime).

use api::postgres_user::PostgresUser;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::WatchError;
use crate::topology::{AuthConfig, AuthMethod, UserConfig};

/// The users the router accepts for `cluster`: every PostgresUser of the cluster with a password
/// Secret (the Secret's `username`, when the operator rotates logins, else `roleName`), and
/// `backend` (the login the router itself uses on the shards).
pub async fn users_from_postgres_users(
    client: &Client,
    namespace: &str,
    cluster: &str,
    backend: Option<UserConfig>,
) -> Result<AuthConfig, WatchError> {
    let kube_error = |what: String| move |source| WatchError::Kube { what, source };
    let users = Api::<PostgresUser>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(kube_error(format!("the PostgresUsers of {namespace}")))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut accepted: Vec<UserConfig> = backend.into_iter().collect();
    for user in users.items {
        if user.spec.cluster.name != cluster || !user.spec.attributes.login {
            continue;
        }
        let Some(password) = &user.spec.password else {
            continue;
        };
        let Some(secret) = secrets
            .get_opt(&password.secret_name)
            .await
            .map_err(kube_error(format!("Secret {}", password.secret_name)))?
        else {
            tracing::warn!(role = %user.spec.role_name, secret = %password.secret_name, "password Secret not found; the role cannot log in through the router yet");
            continue;
        };
        let data = secret.data.unwrap_or_default();
        let Some(value) = data.get("password") else {
            continue;
        };
        let name = data
            .get("username")
            .map(|u| String::from_utf8_lossy(&u.0).into_owned())
            .unwrap_or_else(|| user.spec.role_name.clone());
        accepted.retain(|u| u.name != name);
        accepted.push(UserConfig {
            name,
            password: String::from_utf8_lossy(&value.0).into_owned(),
        });
    }
    Ok(AuthConfig {
        method: AuthMethod::ScramSha256,
        users: accepted,
    })
}
