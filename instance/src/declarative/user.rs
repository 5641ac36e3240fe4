//! The PostgresUser reconciler, in stages: dereference (the password from its Secret, or a
//! generated one into a Secret this object owns) -> apply (the role, one transaction; with
//! rotation, the group and its two login roles, see [`super::rotation`]) -> update the status.
//! Deletion with `reclaimPolicy: Delete` drops the role(s) behind a finalizer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::postgres_database::ReclaimPolicy;
use api::postgres_user::{
    Membership, PasswordSpec, PostgresUser, PostgresUserStatus, ROTATE_PASSWORD_ANNOTATION,
    RoleAttributes,
};
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
use super::rotation;
use super::status::{publish_event, ready_changes, ready_conditions};

/// How often a non-primary instance looks again (it acts as soon as it is primary).
const NOT_PRIMARY_RETRY: Duration = Duration::from_secs(2);

/// What a reconcile of a PostgresUser did.
#[derive(Clone, Debug, Default)]
struct Applied {
    statements: Vec<String>,
    password_set: bool,
    active_login: Option<String>,
    rotation_request: Option<String>,
}

/// Reconciles one PostgresUser.
pub async fn reconcile(user: Arc<PostgresUser>, context: Arc<Context>) -> Result<Action> {
    if user.spec.cluster.name != context.cluster {
        return Ok(Action::await_change());
    }
    if let Some(error) = context.read_only("role") {
        let api = Api::namespaced(context.client.clone(), &context.namespace);
        fail(&api, &user, &context, &error).await;
        return Err(error);
    }
    if !context.is_primary() {
        return Ok(Action::requeue(NOT_PRIMARY_RETRY));
    }
    let api: Api<PostgresUser> = Api::namespaced(context.client.clone(), &context.namespace);
    let name = user.name_any();
    let has_finalizer = has_finalizer(user.as_ref());
    if user.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            if user.spec.reclaim_policy == ReclaimPolicy::Delete
                && let Err(error) = drop_roles(&user, &context).await
            {
                fail(&api, &user, &context, &error).await;
                return Err(error);
            }
            set_finalizer(&api, user.as_ref(), false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = user.spec.reclaim_policy == ReclaimPolicy::Delete;
    if wants_finalizer != has_finalizer {
        set_finalizer(&api, user.as_ref(), wants_finalizer).await?;
    }
    let outcome = match rotating(&user) {
        Some(password) => apply_rotating(&user, password, &context).await,
        None => apply(&user, &context).await,
    };
    match outcome {
        Ok(applied) => {
            if !applied.statements.is_empty() {
                info!(user = %name, statements = ?applied.statements, "role applied");
            }
            publish_event(&context.recorder, user.as_ref(), Ok(&applied.statements)).await;
            write_status(&api, &user, Ok("role matches the spec"), Some(&applied)).await;
            Ok(Action::requeue(context.resync))
        }
        Err(error) => {
            warn!(user = %name, %error, "applying the role failed");
            fail(&api, &user, &context, &error).await;
            Err(error)
        }
    }
}

/// Reports a failed stage: a Warning event when the condition changes, and the condition.
async fn fail(
    api: &Api<PostgresUser>,
    user: &PostgresUser,
    context: &Context,
    error: &DeclarativeError,
) {
    let previous = user
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    if ready_changes(previous, Err(error)) {
        publish_event(&context.recorder, user, Err(error)).await;
    }
    write_status(api, user, Err(error), None).await;
}

/// Retries soon, or after a minute when the object itself must change.
pub fn error_policy(_user: Arc<PostgresUser>, error: &DeclarativeError, _: Arc<Context>) -> Action {
    if error.needs_change() {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(Duration::from_secs(5))
    }
}

/// The password spec when the user rotates (generated, with `rotationDays`).
fn rotating(user: &PostgresUser) -> Option<&PasswordSpec> {
    user.spec
        .password
        .as_ref()
        .filter(|password| password.generate && password.rotation_days.is_some())
}

fn role_spec(user: &PostgresUser) -> RoleSpec {
    RoleSpec {
        name: user.spec.role_name.clone(),
        attributes: user.spec.attributes.clone(),
        valid_until: user.spec.valid_until.clone(),
        memberships: user.spec.member_of.clone(),
    }
}

async fn apply(user: &PostgresUser, context: &Context) -> Result<Applied> {
    let password = match &user.spec.password {
        None => None,
        Some(spec) => {
            let existing = read_secret(context, &spec.secret_name).await?;
            let stored = existing.as_ref().and_then(|s| secret_field(s, "password"));
            if spec.generate {
                let password = stored.unwrap_or_else(generate_password);
                write_generated_secret(
                    user,
                    spec,
                    context,
                    existing,
                    &user.spec.role_name,
                    &password,
                )
                .await?;
                Some(password)
            } else {
                Some(stored.ok_or_else(|| {
                    DeclarativeError::Secret(format!(
                        "Secret {} with the key `password` not found: create it, or set password.generate: true",
                        spec.secret_name
                    ))
                })?)
            }
        }
    };
    let applied =
        role_sql::apply_role(&context.connector, &role_spec(user), password.as_deref()).await?;
    Ok(Applied {
        statements: applied.statements,
        password_set: applied.password_set,
        ..Applied::default()
    })
}

/// The group (`roleName`, NOLOGIN, the spec's attributes and memberships) and its two login
/// roles; rotates when due.
async fn apply_rotating(
    user: &PostgresUser,
    password_spec: &PasswordSpec,
    context: &Context,
) -> Result<Applied> {
    let role = &user.spec.role_name;
    let mut group = role_spec(user);
    group.attributes.login = false;
    group.valid_until = None;
    let mut applied = Applied {
        statements: role_sql::apply_role(&context.connector, &group, None)
            .await?
            .statements,
        ..Applied::default()
    };
    let login_spec = |name: &str| RoleSpec {
        name: name.to_string(),
        attributes: RoleAttributes {
            login: true,
            inherit: true,
            connection_limit: user.spec.attributes.connection_limit,
            superuser: false,
            create_db: false,
            create_role: false,
            replication: false,
            bypass_rls: false,
        },
        valid_until: user.spec.valid_until.clone(),
        memberships: vec![Membership {
            role: role.clone(),
            admin: false,
            inherit: true,
            set: true,
        }],
    };
    let existing = read_secret(context, &password_spec.secret_name).await?;
    let username = existing.as_ref().and_then(|s| secret_field(s, "username"));
    let stored = existing.as_ref().and_then(|s| secret_field(s, "password"));
    let active = rotation::active_login(role, username.as_deref());
    let status = user.status.clone().unwrap_or_default();
    let requested = user.annotations().get(ROTATE_PASSWORD_ANNOTATION).cloned();
    let set_at = status
        .password_set_at
        .as_ref()
        .and_then(|time| chrono::DateTime::from_timestamp(time.0.as_second(), 0));
    let now = chrono::Utc::now();
    let due = stored.is_some()
        && rotation::rotation_due(
            set_at,
            password_spec.rotation_days.unwrap_or(i32::MAX),
            now,
            requested.as_deref(),
            status.rotation_request.as_deref(),
        );
    let grace_end = now + chrono::Duration::seconds(password_spec.rotation_grace_seconds);
    let (login, password, previous) = if due {
        let next = rotation::idle_login(role, &active);
        (next, generate_password(), Some(active))
    } else {
        let idle = rotation::idle_login(role, &active);
        (active, stored.unwrap_or_else(generate_password), Some(idle))
    };
    // New credentials work before the Secret names them; the previous ones expire after.
    let login_applied =
        role_sql::apply_role(&context.connector, &login_spec(&login), Some(&password)).await?;
    applied.statements.extend(login_applied.statements);
    applied.password_set = login_applied.password_set;
    applied
        .statements
        .extend(role_sql::ensure_login_sets_group(&context.connector, &login, role).await?);
    write_generated_secret(user, password_spec, context, existing, &login, &password).await?;
    if let Some(previous) = previous {
        applied.statements.extend(
            role_sql::expire_unless_expiring(&context.connector, &previous, grace_end).await?,
        );
    }
    if due {
        info!(user = %user.name_any(), login = %login, "password rotated");
    }
    applied.rotation_request = if due || set_at.is_none() {
        requested
    } else {
        status.rotation_request.clone()
    };
    applied.active_login = Some(login);
    Ok(applied)
}

/// Drops the role (and, with rotation, its login roles first, their objects going to the group).
async fn drop_roles(user: &PostgresUser, context: &Context) -> Result<()> {
    let role = &user.spec.role_name;
    if rotating(user).is_some() {
        for login in rotation::login_roles(role) {
            role_sql::drop_role(&context.connector, &login, Some(role)).await?;
        }
    }
    role_sql::drop_role(
        &context.connector,
        role,
        user.spec.reassign_owned_to.as_deref(),
    )
    .await?;
    info!(user = %user.name_any(), role = %role, "role dropped");
    Ok(())
}

async fn read_secret(context: &Context, name: &str) -> Result<Option<Secret>> {
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &context.namespace);
    secrets
        .get_opt(name)
        .await
        .map_err(DeclarativeError::kube(format!("get Secret {name}")))
}

fn secret_field(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
}

/// Creates or updates the generated Secret (owned by the PostgresUser) with the connection keys
/// for `username` / `password`; nothing when it already holds them.
async fn write_generated_secret(
    user: &PostgresUser,
    spec: &PasswordSpec,
    context: &Context,
    existing: Option<Secret>,
    username: &str,
    password: &str,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &context.namespace);
    let secret_name = &spec.secret_name;
    let endpoint = Endpoint {
        host: context.service_host.clone(),
        port: context.service_port,
        dbname: spec
            .database
            .clone()
            .unwrap_or_else(|| "postgres".to_string()),
    };
    let data: BTreeMap<String, ByteString> = connection_data(username, password, &endpoint)
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
            info!(secret = %secret_name, role = %username, "generated a password Secret");
        }
        Some(mut secret) if secret.data.as_ref() != Some(&data) => {
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
    Ok(())
}

/// Writes the Ready condition; on success also what was applied (when something ran), when the
/// password was set and which login role is active. A failure to write is logged: the next
/// reconcile writes again.
async fn write_status(
    api: &Api<PostgresUser>,
    user: &PostgresUser,
    outcome: std::result::Result<&str, &DeclarativeError>,
    applied: Option<&Applied>,
) {
    let previous = user.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let ran = applied.filter(|applied| !applied.statements.is_empty());
    let status = PostgresUserStatus {
        conditions: ready_conditions(&previous.conditions, outcome, user.metadata.generation),
        observed_generation: user.metadata.generation,
        password_set_at: if applied.is_some_and(|applied| applied.password_set) {
            Some(now.clone())
        } else {
            previous.password_set_at.clone()
        },
        applied_at: if ran.is_some() {
            Some(now)
        } else {
            previous.applied_at.clone()
        },
        applied: ran
            .map(|applied| applied.statements.clone())
            .unwrap_or_else(|| previous.applied.clone()),
        active_login: match applied {
            Some(applied) => applied.active_login.clone(),
            None => previous.active_login.clone(),
        },
        rotation_request: match applied {
            Some(applied) => applied.rotation_request.clone(),
            None => previous.rotation_request.clone(),
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
