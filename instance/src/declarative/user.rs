//! The PostgresUser reconciler, in stages: dereference (the password from its Secret, or a
//! generated one into a Secret this object owns) -> apply (the role, one transaction) -> update
//! the status. Deletion with `reclaimPolicy: Delete` drops the role behind a finalizer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::postgres_database::ReclaimPolicy;
use api::postgres_user::{PostgresUser, PostgresUserStatus};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::Context;
use super::connection_secret::{Endpoint, connection_data, generate_password};
use super::error::{DeclarativeError, Result};
use super::finalizer::{has_finalizer, set_finalizer};
use super::role_sql::{self, RoleSpec};
use super::status::ready_conditions;

/// How often a non-primary instance looks again (it acts as soon as it is primary).
const NOT_PRIMARY_RETRY: Duration = Duration::from_secs(2);

/// Reconciles one PostgresUser.
pub async fn reconcile(user: Arc<PostgresUser>, context: Arc<Context>) -> Result<Action> {
    if user.spec.cluster.name != context.cluster {
        return Ok(Action::await_change());
    }
    if !context.is_primary() {
        return Ok(Action::requeue(NOT_PRIMARY_RETRY));
    }
    let api: Api<PostgresUser> = Api::namespaced(context.client.clone(), &context.namespace);
    let name = user.name_any();
    let has_finalizer = has_finalizer(user.as_ref());
    if user.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            if user.spec.reclaim_policy == ReclaimPolicy::Delete {
                let dropped = role_sql::drop_role(
                    &context.connector,
                    &user.spec.role_name,
                    user.spec.reassign_owned_to.as_deref(),
                )
                .await;
                if let Err(error) = dropped {
                    write_status(&api, &user, Err(&error), None, false).await;
                    return Err(error);
                }
                info!(user = %name, role = %user.spec.role_name, "role dropped");
            }
            set_finalizer(&api, &user, false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = user.spec.reclaim_policy == ReclaimPolicy::Delete;
    if wants_finalizer != has_finalizer {
        set_finalizer(&api, &user, wants_finalizer).await?;
    }
    match apply(&user, &context).await {
        Ok(applied) => {
            if !applied.statements.is_empty() {
                info!(user = %name, statements = ?applied.statements, "role applied");
            }
            write_status(
                &api,
                &user,
                Ok("role matches the spec"),
                Some(&applied.statements),
                applied.password_set,
            )
            .await;
            Ok(Action::requeue(context.resync))
        }
        Err(error) => {
            warn!(user = %name, %error, "applying the role failed");
            write_status(&api, &user, Err(&error), None, false).await;
            Err(error)
        }
    }
}

/// Retries soon, or after a minute when the object itself must change.
pub fn error_policy(_user: Arc<PostgresUser>, error: &DeclarativeError, _: Arc<Context>) -> Action {
    if error.needs_change() {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(Duration::from_secs(5))
    }
}

async fn apply(user: &PostgresUser, context: &Context) -> Result<role_sql::AppliedRole> {
    let password = password_of(user, context).await?;
    let spec = RoleSpec {
        name: user.spec.role_name.clone(),
        attributes: user.spec.attributes.clone(),
        valid_until: user.spec.valid_until.clone(),
        memberships: user.spec.member_of.clone(),
    };
    role_sql::apply_role(&context.connector, &spec, password.as_deref()).await
}

/// The password the role should have: from the user's Secret, or generated into a Secret owned
/// by the PostgresUser (whose connection keys are kept current).
async fn password_of(user: &PostgresUser, context: &Context) -> Result<Option<String>> {
    let Some(password_spec) = &user.spec.password else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &context.namespace);
    let secret_name = &password_spec.secret_name;
    let existing = secrets
        .get_opt(secret_name)
        .await
        .map_err(DeclarativeError::kube(format!("get Secret {secret_name}")))?;
    let stored = existing.as_ref().and_then(|secret| {
        secret
            .data
            .as_ref()
            .and_then(|data| data.get("password"))
            .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
    });
    if !password_spec.generate {
        return stored.map(Some).ok_or_else(|| {
            DeclarativeError::Secret(format!(
                "Secret {secret_name} with the key `password` not found: create it, or set password.generate: true"
            ))
        });
    }
    let password = stored.unwrap_or_else(generate_password);
    let endpoint = Endpoint {
        host: context.service_host.clone(),
        port: context.service_port,
        dbname: password_spec
            .database
            .clone()
            .unwrap_or_else(|| "postgres".to_string()),
    };
    let data: BTreeMap<String, ByteString> =
        connection_data(&user.spec.role_name, &password, &endpoint)
            .into_iter()
            .map(|(key, value)| (key, ByteString(value.into_bytes())))
            .collect();
    match existing {
        None => {
            let mut owner = user.controller_owner_ref(&()).ok_or_else(|| {
                DeclarativeError::Invalid("the PostgresUser has no uid yet".into())
            })?;
            // Garbage collection only: blocking the owner's deletion would need update on
            // postgresusers/finalizers, which the instance managers do not hold.
            owner.block_owner_deletion = None;
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(secret_name.clone()),
                    namespace: Some(context.namespace.clone()),
                    owner_references: Some(vec![owner]),
                    labels: Some(BTreeMap::from([(
                        api::contract::LABEL_CLUSTER.to_string(),
                        context.cluster.clone(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".to_string()),
                ..Default::default()
            };
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .map_err(DeclarativeError::kube(format!(
                    "create Secret {secret_name}"
                )))?;
            info!(secret = %secret_name, role = %user.spec.role_name, "generated a password Secret");
        }
        Some(mut secret) if secret.data.as_ref() != Some(&data) => {
            // Same password; the other keys follow the spec (database, role name).
            secret.data = Some(data);
            secrets
                .replace(secret_name, &PostParams::default(), &secret)
                .await
                .map_err(DeclarativeError::kube(format!(
                    "update Secret {secret_name}"
                )))?;
        }
        Some(_) => {}
    }
    Ok(Some(password))
}

/// Writes the Ready condition; on success also what was applied (when something ran) and when
/// the password was set. A failure to write is logged: the next reconcile writes again.
async fn write_status(
    api: &Api<PostgresUser>,
    user: &PostgresUser,
    outcome: std::result::Result<&str, &DeclarativeError>,
    applied: Option<&[String]>,
    password_set: bool,
) {
    let previous = user.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ran = applied.is_some_and(|statements| !statements.is_empty());
    let status = PostgresUserStatus {
        conditions: ready_conditions(&previous.conditions, outcome, user.metadata.generation),
        observed_generation: user.metadata.generation,
        password_set_at: if password_set {
            Some(now.clone())
        } else {
            previous.password_set_at.clone()
        },
        applied_at: if ran {
            Some(now)
        } else {
            previous.applied_at.clone()
        },
        applied: match applied {
            Some(statements) if !statements.is_empty() => statements.to_vec(),
            _ => previous.applied.clone(),
        },
    };
    if user.status.as_ref() == Some(&status) {
        return;
    }
    let patch = serde_json::json!({ "status": status });
    if let Err(error) = api
        .patch_status(
            &user.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        warn!(user = %user.name_any(), %error, "writing the status failed");
    }
}
