//! The logins the frontend accepts, swappable while the router runs: a new table applies to the
//! connections that authenticate after the swap; sessions already logged in keep going.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ring::digest;

use super::scram::Verifier;
use crate::topology::{AuthConfig, AuthMethod};

/// One accepted user: its SCRAM verifier, and a digest of the secret it was made from (so that
/// a swap keeps the verifier of an unchanged password instead of deriving it again).
struct Login {
    secret_digest: Vec<u8>,
    verifier: Arc<Verifier>,
}

/// The method and users in force at one moment.
pub struct LoginTable {
    method: AuthMethod,
    users: HashMap<String, Login>,
}

impl LoginTable {
    /// How clients authenticate.
    pub fn method(&self) -> AuthMethod {
        self.method
    }

    /// The verifier of `user`, when the user is accepted.
    pub fn verifier(&self, user: &str) -> Option<Arc<Verifier>> {
        self.users.get(user).map(|login| login.verifier.clone())
    }
}

/// What a swap changed, by user name (never a password).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginChanges {
    /// Users accepted now that were not before.
    pub added: Vec<String>,
    /// Users no longer accepted.
    pub removed: Vec<String>,
    /// Users whose password changed.
    pub changed: Vec<String>,
}

impl LoginChanges {
    /// Whether the swap changed nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The accepted logins, shared by every client connection of a listener.
pub struct Logins {
    table: RwLock<Arc<LoginTable>>,
}

fn secret_digest(secret: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

impl Logins {
    /// The logins `auth` declares.
    pub fn new(auth: &AuthConfig) -> Self {
        let logins = Self {
            table: RwLock::new(Arc::new(LoginTable {
                method: auth.method,
                users: HashMap::new(),
            })),
        };
        logins.replace(auth);
        logins
    }

    /// The table in force now (a connection authenticates against one table, start to end).
    pub fn current(&self) -> Arc<LoginTable> {
        self.table.read().expect("logins lock").clone()
    }

    /// Puts `auth` in force for the connections that authenticate from now on.
    pub fn replace(&self, auth: &AuthConfig) -> LoginChanges {
        let current = self.current();
        let mut changes = LoginChanges::default();
        let mut users = HashMap::new();
        for user in &auth.users {
            let digest = secret_digest(&user.password);
            let login = match current.users.get(&user.name) {
                Some(login) if login.secret_digest == digest => Login {
                    secret_digest: digest,
                    verifier: login.verifier.clone(),
                },
                known => {
                    if known.is_some() {
                        changes.changed.push(user.name.clone());
                    } else {
                        changes.added.push(user.name.clone());
                    }
                    Login {
                        secret_digest: digest,
                        verifier: Arc::new(Verifier::from_secret(&user.password)),
                    }
                }
            };
            users.insert(user.name.clone(), login);
        }
        changes.removed = current
            .users
            .keys()
            .filter(|name| !users.contains_key(*name))
            .cloned()
            .collect();
        for list in [
            &mut changes.added,
            &mut changes.removed,
            &mut changes.changed,
        ] {
            list.sort();
            list.dedup();
        }
        *self.table.write().expect("logins lock") = Arc::new(LoginTable {
            method: auth.method,
            users,
        });
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::UserConfig;

    fn auth(users: &[(&str, &str)]) -> AuthConfig {
        AuthConfig {
            method: AuthMethod::ScramSha256,
            users: users
                .iter()
                .map(|(name, password)| UserConfig {
                    name: name.to_string(),
                    password: password.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_swap_reports_added_removed_and_changed_users_and_keeps_unchanged_verifiers() {
        let logins = Logins::new(&auth(&[("app", "a"), ("old", "o"), ("ops", "p")]));
        let before = logins.current();
        let changes = logins.replace(&auth(&[("app", "a"), ("ops", "p2"), ("new", "n")]));
        assert_eq!(
            changes,
            LoginChanges {
                added: vec!["new".into()],
                removed: vec!["old".into()],
                changed: vec!["ops".into()],
            }
        );
        let after = logins.current();
        assert!(after.verifier("old").is_none());
        assert!(before.verifier("old").is_some(), "an old table stays whole");
        assert!(Arc::ptr_eq(
            &before.verifier("app").unwrap(),
            &after.verifier("app").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &before.verifier("ops").unwrap(),
            &after.verifier("ops").unwrap()
        ));
        assert!(
            logins
                .replace(&auth(&[("app", "a"), ("ops", "p2"), ("new", "n")]))
                .is_empty()
        );
    }
}
