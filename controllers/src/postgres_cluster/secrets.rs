//! The cluster's credentials Secrets: the generated superuser, replication and application
//! ones, and the check of an application Secret the user names.

use std::collections::BTreeMap;

use api::contract;
use api::postgres_cluster::PostgresCluster;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

use super::builders;
use super::reconcile::is_status;
use super::status::Problem;
use super::{Context, Error, kube_error};

/// Creates the generated credentials Secrets that do not exist yet (existing ones are kept as
/// they are) and checks a user-named application Secret. Returns the application Secret's name.
pub(super) async fn ensure_secrets(
    cluster: &PostgresCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<String, Problem>, Error> {
    let name = cluster.name_any();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut generated = vec![
        (
            contract::superuser_secret(&name),
            contract::SUPERUSER.to_string(),
        ),
        (
            contract::replication_secret(&name),
            contract::REPLICATION_USER.to_string(),
        ),
    ];
    let user_secret = builders::user_app_secret(cluster);
    if user_secret.is_none() {
        generated.push((contract::app_secret(&name), builders::app_owner(cluster)));
    }
    for (secret_name, username) in generated {
        if let Some(existing) = api
            .get_metadata_opt(&secret_name)
            .await
            .map_err(kube_error(format!("reading Secret {secret_name}")))?
        {
            // Kept as it is, but for the user's inherited labels and annotations.
            if let Some(patch) = crate::inherited::metadata_patch(cluster, &existing.metadata) {
                api.patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(kube_error(format!("labelling Secret {secret_name}")))?;
            }
            continue;
        }
        let secret = builders::credentials_secret(
            cluster,
            secret_name.clone(),
            &username,
            builders::generate_password(),
        );
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(cluster = %name, namespace, secret = %secret_name, "generated credentials Secret");
            }
            Err(error) if is_status(&error, 409) => {}
            Err(error) => return Err(kube_error(format!("creating Secret {secret_name}"))(error)),
        }
    }
    let Some(user_secret) = user_secret else {
        return Ok(Ok(contract::app_secret(&name)));
    };
    let secret = api
        .get_opt(&user_secret)
        .await
        .map_err(kube_error(format!("reading Secret {user_secret}")))?;
    Ok(match secret {
        None => Err(Problem {
            reason: "SecretNotFound",
            message: format!(
                "Secret {user_secret} (spec.bootstrap.initdb.secret) not found in namespace {namespace}: create it with the keys username and password"
            ),
        }),
        Some(secret) => check_user_secret(
            &user_secret,
            &secret.data.unwrap_or_default(),
            &builders::app_owner(cluster),
        )
        .map(|()| user_secret),
    })
}

/// A user-named application Secret holds a password for `owner`: keys `username` (equal to
/// `spec.bootstrap.initdb.owner`, or the instance manager would make another role than the one
/// the spec names) and a non-empty `password`.
fn check_user_secret(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    owner: &str,
) -> Result<(), Problem> {
    let invalid = |message: String| Problem {
        reason: "SecretInvalid",
        message,
    };
    let text = |key: &str| data.get(key).map(|value| String::from_utf8_lossy(&value.0));
    let (Some(username), Some(password)) = (text("username"), text("password")) else {
        return Err(invalid(format!(
            "Secret {secret} (spec.bootstrap.initdb.secret) must have the keys username and password"
        )));
    };
    if username != owner {
        return Err(invalid(format!(
            "Secret {secret} (spec.bootstrap.initdb.secret) is for user {username:?} but spec.bootstrap.initdb.owner is {owner:?}: make its username {owner:?}"
        )));
    }
    if password.is_empty() {
        return Err(invalid(format!(
            "Secret {secret} (spec.bootstrap.initdb.secret) has an empty password"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn a_user_secret_must_name_the_owner_and_hold_a_password() {
        let check = |pairs: &[(&str, &str)]| {
            check_user_secret("mine", &data(pairs), "shop").map_err(|problem| problem.message)
        };
        assert_eq!(check(&[("username", "shop"), ("password", "x")]), Ok(()));
        let wrong = check(&[("username", "buyer"), ("password", "x")]).unwrap_err();
        assert!(
            wrong.contains("\"buyer\"") && wrong.contains("make its username \"shop\""),
            "{wrong}"
        );
        assert!(
            check(&[("username", "shop")])
                .unwrap_err()
                .contains("keys username and password")
        );
        assert!(
            check(&[("username", "shop"), ("password", "")])
                .unwrap_err()
                .contains("empty password")
        );
    }
}
