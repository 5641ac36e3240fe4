//! The Ready condition and events of declarative objects, through one helper per outcome.

use api::common::{condition, new_condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

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
