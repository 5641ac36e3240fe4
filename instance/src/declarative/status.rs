//! The Ready condition and events of declarative objects, through one helper per outcome.

use api::common::{condition, new_condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use super::error::DeclarativeError;

/// Reason of a Ready condition after a successful reconcile.
pub const REASON_APPLIED: &str = "Applied";

/// `conditions` with Ready set from `outcome` (`Ok(message)` or the error of the failed stage;
/// PostgreSQL's SQLSTATE and message are in the error's text verbatim).
pub fn ready_conditions(
    previous: &[Condition],
    outcome: Result<&str, &DeclarativeError>,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut conditions = previous.to_vec();
    let ready = match outcome {
        Ok(message) => new_condition(condition::READY, true, REASON_APPLIED, message, generation),
        Err(error) => new_condition(
            condition::READY,
            false,
            error.reason(),
            error.to_string(),
            generation,
        ),
    };
    set_condition(&mut conditions, ready);
    conditions
}

/// Whether `outcome` changes the Ready condition (so that a failure retried every few seconds
/// makes one event, not one per retry).
pub fn ready_changes(previous: &[Condition], outcome: Result<&str, &DeclarativeError>) -> bool {
    let current = previous.iter().find(|c| c.type_ == condition::READY);
    match (current, outcome) {
        (Some(current), Ok(message)) => current.status != "True" || current.message != message,
        (Some(current), Err(error)) => {
            current.status != "False"
                || current.reason != error.reason()
                || current.message != error.to_string()
        }
        (None, _) => true,
    }
}

/// An event on `object`: a Warning with the failed stage's reason and message, or a Normal
/// `Applied` event when statements ran (their summaries never hold a secret).
pub async fn publish_event<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    object: &K,
    outcome: Result<&[String], &DeclarativeError>,
) {
    let event = match outcome {
        Ok([]) => return,
        Ok(statements) => Event {
            type_: EventType::Normal,
            reason: REASON_APPLIED.to_string(),
            note: Some(truncate(format!(
                "{} statement(s): {}",
                statements.len(),
                statements.join("; ")
            ))),
            action: "Apply".to_string(),
            secondary: None,
        },
        Err(error) => Event {
            type_: EventType::Warning,
            reason: error.reason().to_string(),
            note: Some(truncate(error.to_string())),
            action: "Apply".to_string(),
            secondary: None,
        },
    };
    if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::debug!(%error, "publishing an event failed");
    }
}

/// Events notes hold at most 1 kB.
fn truncate(mut note: String) -> String {
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}
