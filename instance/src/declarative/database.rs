//! The PostgresDatabase reconciler, in stages: validate (create-only fields against what the
//! database was created with) -> apply (the database, then what lives inside it) -> update the
//! status. Deletion with `reclaimPolicy: Delete` drops the database behind a finalizer.

use std::sync::Arc;
use std::time::Duration;

use api::postgres_database::{
    CreatedWith, PostgresDatabase, PostgresDatabaseStatus, ReclaimPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::Context;
use super::database_sql::{self, AppliedDatabase};
use super::error::{DeclarativeError, Result};
use super::finalizer::{has_finalizer, set_finalizer};
use super::status::{publish_event, ready_changes, ready_conditions};

/// How often a non-primary instance looks again (it acts as soon as it is primary).
const NOT_PRIMARY_RETRY: Duration = Duration::from_secs(2);

/// Reconciles one PostgresDatabase.
pub async fn reconcile(database: Arc<PostgresDatabase>, context: Arc<Context>) -> Result<Action> {
    if database.spec.cluster.name != context.cluster {
        return Ok(Action::await_change());
    }
    if let Some(error) = context.read_only("database") {
        let api = Api::namespaced(context.client.clone(), &context.namespace);
        fail(&api, &database, &context, &error).await;
        return Err(error);
    }
    if !context.is_primary() {
        return Ok(Action::requeue(NOT_PRIMARY_RETRY));
    }
    let api: Api<PostgresDatabase> = Api::namespaced(context.client.clone(), &context.namespace);
    let name = database.name_any();
    let has_finalizer = has_finalizer(database.as_ref());
    if database.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            if database.spec.reclaim_policy == ReclaimPolicy::Delete {
                let dropped = database_sql::drop_database(
                    &context.connector,
                    &database.spec.name,
                    database.spec.force_delete,
                )
                .await;
                if let Err(error) = dropped {
                    fail(&api, &database, &context, &error).await;
                    return Err(error);
                }
                info!(object = %name, database = %database.spec.name, "database dropped");
            }
            set_finalizer(&api, database.as_ref(), false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = database.spec.reclaim_policy == ReclaimPolicy::Delete;
    if wants_finalizer != has_finalizer {
        set_finalizer(&api, database.as_ref(), wants_finalizer).await?;
    }
    let outcome = match check_template(&database) {
        Ok(()) => database_sql::apply_database(&context.connector, &database.spec).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(applied) => {
            if !applied.statements.is_empty() {
                info!(object = %name, statements = ?applied.statements, "database applied");
            }
            publish_event(
                &context.recorder,
                database.as_ref(),
                Ok(&applied.statements),
            )
            .await;
            write_status(
                &api,
                &database,
                Ok("database matches the spec"),
                Some(&applied),
            )
            .await;
            Ok(Action::requeue(context.resync))
        }
        Err(error) => {
            warn!(object = %name, %error, "applying the database failed");
            fail(&api, &database, &context, &error).await;
            Err(error)
        }
    }
}

/// The template leaves no trace in the catalog: compare with what this object created it from.
fn check_template(database: &PostgresDatabase) -> Result<()> {
    let Some(created) = database
        .status
        .as_ref()
        .and_then(|status| status.created_with.as_ref())
    else {
        return Ok(());
    };
    if created.template != database.spec.template {
        return Err(DeclarativeError::Immutable(format!(
            "template is {:?} in the spec but the database was created from {:?}: template is used only at creation; restore the spec's value or create another database",
            database.spec.template, created.template
        )));
    }
    Ok(())
}

/// Reports a failed stage: a Warning event when the condition changes, and the condition.
async fn fail(
    api: &Api<PostgresDatabase>,
    database: &PostgresDatabase,
    context: &Context,
    error: &DeclarativeError,
) {
    let previous = database
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    if ready_changes(previous, Err(error)) {
        publish_event(&context.recorder, database, Err(error)).await;
    }
    write_status(api, database, Err(error), None).await;
}

/// Retries soon, or after a minute when the object itself must change.
pub fn error_policy(
    _database: Arc<PostgresDatabase>,
    error: &DeclarativeError,
    _: Arc<Context>,
) -> Action {
    if error.needs_change() {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(Duration::from_secs(5))
    }
}

/// Writes the Ready condition and, after a change, what ran and when.
async fn write_status(
    api: &Api<PostgresDatabase>,
    database: &PostgresDatabase,
    outcome: std::result::Result<&str, &DeclarativeError>,
    applied: Option<&AppliedDatabase>,
) {
    let previous = database.status.clone().unwrap_or_default();
    let ran = applied.filter(|applied| !applied.statements.is_empty());
    let status = PostgresDatabaseStatus {
        conditions: ready_conditions(&previous.conditions, outcome, database.metadata.generation),
        observed_generation: database.metadata.generation,
        applied_at: match ran {
            Some(_) => Some(Time(k8s_openapi::jiff::Timestamp::now())),
            None => previous.applied_at.clone(),
        },
        applied: ran
            .map(|applied| applied.statements.clone())
            .unwrap_or_else(|| previous.applied.clone()),
        created_with: match applied {
            Some(applied) if applied.created => Some(CreatedWith {
                encoding: database.spec.encoding.clone(),
                locale: database.spec.locale.clone(),
                template: database.spec.template.clone(),
            }),
            _ => previous.created_with.clone(),
        },
    };
    if database.status.as_ref() == Some(&status) {
        return;
    }
    let patch = serde_json::json!({ "status": status });
    if let Err(error) = api
        .patch_status(
            &database.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        warn!(object = %database.name_any(), %error, "writing the status failed");
    }
}
