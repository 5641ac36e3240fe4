//! Client authentication in Kubernetes mode: the roles PostgresUser objects declare for the
//! cluster (with the password from their Secret), plus the backend login, checked with
//! SCRAM-SHA-256. Followed live: the PostgresUsers of the namespace are watched, and each password
//! Secret one of them names with a watch of its own (by name: what the router's Role allows, see
//! the operator's `router_role`); every change swaps the frontend's [`Logins`] for the
//! connections that log in next. A session already logged in is never dropped. After a password
//! rotation the previous login stays accepted for the PostgresUser's grace period, as PostgreSQL
//! accepts it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use api::postgres_user::PostgresUser;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::WatchError;
use crate::frontend::logins::Logins;
use crate::topology::{AuthConfig, AuthMethod, UserConfig};

/// Changes closer together than this are applied as one swap.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// The data of the password Secrets, by Secret name (absent: not found or not readable).
type SecretData = BTreeMap<String, BTreeMap<String, ByteString>>;

/// The Secret names of the cluster's login PostgresUsers with a password.
fn password_secrets<'a>(
    users: impl IntoIterator<Item = &'a PostgresUser>,
    cluster: &str,
) -> BTreeSet<String> {
    users
        .into_iter()
        .filter(|user| user.spec.cluster.name == cluster && user.spec.attributes.login)
        .filter_map(|user| Some(user.spec.password.as_ref()?.secret_name.clone()))
        .collect()
}

/// The users the router accepts for `cluster`: every login PostgresUser of the cluster whose
/// password Secret has a `password` (under the Secret's `username`, when the operator rotates
/// logins, else `roleName`), and `backend` (the login the router itself uses on the shards).
pub fn accepted_users<'a>(
    users: impl IntoIterator<Item = &'a PostgresUser>,
    secrets: &SecretData,
    cluster: &str,
    backend: Option<UserConfig>,
) -> AuthConfig {
    let mut users: Vec<&PostgresUser> = users
        .into_iter()
        .filter(|user| user.spec.cluster.name == cluster && user.spec.attributes.login)
        .collect();
    // The same answer whatever order the API server or the watch gives.
    users.sort_by(|a, b| a.spec.role_name.cmp(&b.spec.role_name));
    let mut accepted: Vec<UserConfig> = backend.into_iter().collect();
    for user in users {
        let Some(password) = &user.spec.password else {
            continue;
        };
        let Some(data) = secrets.get(&password.secret_name) else {
            continue;
        };
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
    AuthConfig {
        method: AuthMethod::ScramSha256,
        users: accepted,
    }
}

/// Follows the PostgresUsers of `cluster` and their password Secrets.
pub struct LoginSource {
    client: Client,
    namespace: String,
    cluster: String,
    backend: Option<UserConfig>,
    /// The password Secrets as last read: [`Self::initial`] fills it, so that following starts
    /// from what the router started with (no user missing while the watches start).
    secrets: SecretData,
    /// Logins a password rotation replaced, still accepted for the user's grace period.
    rotated: Vec<Rotated>,
    /// The client's read timeout, which the watches stay below (see [`super::watch_config`]).
    api_timeout: Duration,
}

/// The login a rotation (`password.rotationDays`) replaced in its Secret: PostgreSQL accepts it
/// for `rotationGraceSeconds` more, so the router does too (clients that have not read the new
/// Secret yet keep connecting).
struct Rotated {
    secret: String,
    login: UserConfig,
    until: Instant,
}

impl LoginSource {
    /// The source for PostgresCluster `cluster` in `namespace`; `backend` is always accepted.
    pub fn new(
        client: Client,
        namespace: &str,
        cluster: &str,
        backend: Option<UserConfig>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            backend,
            secrets: SecretData::new(),
            rotated: Vec::new(),
            api_timeout: super::DEFAULT_API_TIMEOUT,
        }
    }

    /// The read timeout of the client given to [`Self::new`] (made by [`super::client`]).
    pub fn with_api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }

    /// Reads the users the router accepts now (see [`accepted_users`]).
    pub async fn initial(&mut self) -> Result<AuthConfig, WatchError> {
        let kube_error = |what: String| move |source| WatchError::Kube { what, source };
        let users = Api::<PostgresUser>::namespaced(self.client.clone(), &self.namespace)
            .list(&Default::default())
            .await
            .map_err(kube_error(format!(
                "the PostgresUsers of {}",
                self.namespace
            )))?
            .items;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        for name in password_secrets(&users, &self.cluster) {
            match secrets
                .get_opt(&name)
                .await
                .map_err(kube_error(format!("Secret {name}")))?
            {
                Some(secret) => {
                    self.secrets.insert(name, secret.data.unwrap_or_default());
                }
                None => {
                    tracing::warn!(secret = %name, "password Secret not found; its role cannot log in through the router yet")
                }
            }
        }
        Ok(accepted_users(
            &users,
            &self.secrets,
            &self.cluster,
            self.backend.clone(),
        ))
    }

    /// Follows changes forever, swapping `logins` whenever the accepted users change.
    pub async fn follow(mut self, logins: Arc<Logins>) {
        let (users, users_writer) = reflector::store::<PostgresUser>();
        let mut user_changes = reflector::reflector(
            users_writer,
            watcher(
                Api::<PostgresUser>::namespaced(self.client.clone(), &self.namespace),
                super::watch_config(self.api_timeout),
            ),
        )
        .default_backoff()
        .boxed();
        let (secret_changes, mut secret_changed) = mpsc::unbounded_channel::<SecretChange>();
        let mut secret_watches: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        // The store is empty until the first list is complete: no swap before it.
        let mut listed = false;
        loop {
            let expiry = self.rotated.iter().map(|r| r.until).min();
            tokio::select! {
                change = user_changes.next() => match change {
                    None => break,
                    Some(Err(error)) => {
                        tracing::warn!(cluster = %self.cluster, %error, "watching PostgresUsers");
                        continue;
                    }
                    Some(Ok(event)) => listed |= matches!(event, watcher::Event::InitDone),
                },
                Some(change) = secret_changed.recv() => self.absorb(change, &users),
                () = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {}
            }
            // A burst (a user and its Secret made together) settles into one swap.
            tokio::time::sleep(DEBOUNCE).await;
            while let Ok(change) = secret_changed.try_recv() {
                self.absorb(change, &users);
            }
            while let Some(Some(event)) = futures::FutureExt::now_or_never(user_changes.next()) {
                listed |= matches!(event, Ok(watcher::Event::InitDone));
            }
            if !listed {
                continue;
            }
            let wanted = password_secrets(users.state().iter().map(|u| &**u), &self.cluster);
            secret_watches.retain(|name, task| {
                let keep = wanted.contains(name);
                if !keep {
                    task.abort();
                }
                keep
            });
            self.secrets.retain(|name, _| wanted.contains(name));
            for name in &wanted {
                if !secret_watches.contains_key(name) {
                    let task = tokio::spawn(watch_secret(
                        Api::namespaced(self.client.clone(), &self.namespace),
                        super::watch_config(self.api_timeout),
                        self.cluster.clone(),
                        name.clone(),
                        secret_changes.clone(),
                    ));
                    secret_watches.insert(name.clone(), task);
                }
            }
            self.swap(&users, &logins);
        }
        for task in secret_watches.into_values() {
            task.abort();
        }
    }

    /// Takes in a Secret's new data; when a rotation pointed it at another login, the previous
    /// one stays accepted for the PostgresUser's grace period.
    fn absorb(&mut self, change: SecretChange, users: &Store<PostgresUser>) {
        let secret = change.name.clone();
        let before = change.apply(&mut self.secrets);
        let login = |data: &BTreeMap<String, ByteString>| {
            let text = |key: &str| Some(String::from_utf8_lossy(&data.get(key)?.0).into_owned());
            Some(UserConfig {
                name: text("username")?,
                password: text("password")?,
            })
        };
        let (Some(previous), Some(now)) = (
            before.as_ref().and_then(login),
            self.secrets.get(&secret).and_then(login),
        ) else {
            return;
        };
        if previous.name == now.name {
            return;
        }
        let grace = users.state().iter().find_map(|user| {
            let password = user.spec.password.as_ref()?;
            (user.spec.cluster.name == self.cluster
                && password.secret_name == secret
                && password.rotation_days.is_some())
            .then_some(password.rotation_grace_seconds)
        });
        if let Some(grace) = grace {
            tracing::info!(cluster = %self.cluster, %secret, previous = %previous.name, current = %now.name, grace_seconds = grace, "password rotated; the previous login stays accepted for the grace period");
            self.rotated.push(Rotated {
                secret,
                login: previous,
                until: Instant::now() + Duration::from_secs(grace.max(0) as u64),
            });
        }
    }

    fn swap(&mut self, users: &Store<PostgresUser>, logins: &Logins) {
        let state = users.state();
        let mut auth = accepted_users(
            state.iter().map(|u| &**u),
            &self.secrets,
            &self.cluster,
            self.backend.clone(),
        );
        let now = Instant::now();
        let secrets = &self.secrets;
        self.rotated
            .retain(|r| r.until > now && secrets.contains_key(&r.secret));
        for rotated in &self.rotated {
            if !auth.users.iter().any(|u| u.name == rotated.login.name) {
                auth.users.push(rotated.login.clone());
            }
        }
        let changes = logins.replace(&auth);
        if !changes.is_empty() {
            tracing::info!(
                cluster = %self.cluster,
                added = ?changes.added,
                removed = ?changes.removed,
                password_changed = ?changes.changed,
                "client logins from PostgresUsers applied"
            );
        }
    }
}

/// Watches one password Secret (a watch restricted to its name, which a Role can grant by
/// `resourceNames`), sending its data on every change. When the watch is refused (a Role that
/// does not list the Secret yet), the Secret is read with a `get` at each retry instead, so a new
/// user can log in before the operator has updated the Role.
async fn watch_secret(
    secrets: Api<Secret>,
    config: watcher::Config,
    cluster: String,
    name: String,
    changes: mpsc::UnboundedSender<SecretChange>,
) {
    let mut stream = watcher(
        secrets.clone(),
        config.fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .boxed();
    let mut listed: Option<BTreeMap<String, ByteString>> = None;
    let mut warned = false;
    while let Some(event) = stream.next().await {
        let data = match event {
            Ok(watcher::Event::Init) => {
                listed = None;
                continue;
            }
            Ok(watcher::Event::InitApply(secret)) => {
                listed = Some(secret.data.unwrap_or_default());
                continue;
            }
            Ok(watcher::Event::InitDone) => listed.take(),
            Ok(watcher::Event::Apply(secret)) => Some(secret.data.unwrap_or_default()),
            Ok(watcher::Event::Delete(_)) => None,
            Err(error) => {
                if !warned {
                    tracing::warn!(%cluster, secret = %name, %error, "watching a password Secret failed; reading it at each retry instead");
                    warned = true;
                }
                // Unreadable now: keep what was read before.
                let Ok(secret) = secrets.get_opt(&name).await else {
                    continue;
                };
                secret.map(|s| s.data.unwrap_or_default())
            }
        };
        let change = SecretChange {
            name: name.clone(),
            data,
        };
        if changes.send(change).is_err() {
            return;
        }
    }
}

/// The data of one password Secret now (`None`: it does not exist).
struct SecretChange {
    name: String,
    data: Option<BTreeMap<String, ByteString>>,
}

impl SecretChange {
    /// Records the change; returns the data it replaced.
    fn apply(self, secrets: &mut SecretData) -> Option<BTreeMap<String, ByteString>> {
        match self.data {
            Some(data) => secrets.insert(self.name, data),
            None => secrets.remove(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(role: &str, cluster: &str, secret: &str) -> PostgresUser {
        serde_json::from_value(json!({
            "apiVersion": "postgres.keiailab.io/v1alpha1", "kind": "PostgresUser",
            "metadata": {"name": role},
            "spec": {"cluster": {"name": cluster}, "roleName": role,
                     "password": {"secretName": secret}}
        }))
        .unwrap()
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn the_cluster_s_users_with_a_password_in_their_secret_are_accepted() {
        let users = [
            user("app", "db", "app-pw"),
            user("rotated", "db", "rotated-pw"),
            user("pending", "db", "pending-pw"),
            user("elsewhere", "other", "elsewhere-pw"),
        ];
        let secrets = SecretData::from([
            ("app-pw".to_string(), data(&[("password", "a")])),
            (
                "rotated-pw".to_string(),
                data(&[("username", "rotated_b"), ("password", "r")]),
            ),
            ("elsewhere-pw".to_string(), data(&[("password", "e")])),
        ]);
        assert_eq!(
            password_secrets(&users, "db"),
            BTreeSet::from(["app-pw".into(), "pending-pw".into(), "rotated-pw".into()])
        );
        let backend = UserConfig {
            name: "postgres".into(),
            password: "b".into(),
        };
        let auth = accepted_users(&users, &secrets, "db", Some(backend));
        let names: Vec<&str> = auth.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["postgres", "app", "rotated_b"]);
        assert_eq!(auth.method, AuthMethod::ScramSha256);
    }
}
