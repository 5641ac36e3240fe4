//! Leader election among operator replicas on a `coordination.k8s.io/v1` Lease: only the holder
//! runs the controllers. Optimistic concurrency (resourceVersion) decides races.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a Lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
    /// A holder that could not renew for this long gives up leadership.
    pub renew_deadline: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// Errors of the election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed a Lease call.
    #[error("Lease {name}: {source}")]
    Kube {
        /// Lease name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The holder could not renew within the renew deadline.
    #[error("lost the leader Lease {0}: could not renew it in time")]
    Lost(String),
}

/// One candidate for the leader Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElector {
    /// A candidate named `identity` for the Lease `name` of `api`'s namespace.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
        }
    }

    fn error(&self) -> impl FnOnce(kube::Error) -> LeaderError + '_ {
        move |source| LeaderError::Kube {
            name: self.name.clone(),
            source,
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquired.or_else(|| Some(now())),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt: creates, renews or takes over the Lease. `Ok(true)` when this candidate
    /// holds it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(self.error())? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(self.error()(error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder.as_deref() == Some(self.identity.as_str()) {
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            let duration = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds
                    .unwrap_or(self.timing.lease_duration.as_secs() as i32),
            ));
            let expired = match &spec.renew_time {
                None => true,
                Some(MicroTime(renewed)) => renewed
                    .checked_add(duration)
                    .map(|until| until < Timestamp::now())
                    .unwrap_or(true),
            };
            if holder.is_some() && !expired {
                return Ok(false);
            }
            self.spec(transitions + 1, None)
        };
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(self.error()(error)),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the Lease every retry period; returns [`LeaderError::Lost`] when renewal fails for
    /// longer than the renew deadline or another candidate holds it.
    ///
    /// Each attempt is bounded by the time left before the deadline: an API server that stops
    /// answering (a partition that drops packets) would otherwise hold the request for the
    /// client's read timeout while a standby takes the expired Lease and two leaders reconcile.
    /// It is bounded by half the deadline too, and a failed attempt is followed by another a
    /// retry period after it started, at once when it took longer: it may have gone to a
    /// connection that died without a word (a load balancer or NAT forgot it; the client's read
    /// timeout or this bound ends it) while a new one would get through, and one such connection
    /// must not cost the leadership. A renewal counts from when its attempt started, since the
    /// Lease's renewTime is taken then too.
    pub async fn keep(&self) -> LeaderError {
        let mut last_renewal = tokio::time::Instant::now();
        let mut pause = self.timing.retry_period;
        loop {
            tokio::time::sleep(pause).await;
            pause = self.timing.retry_period;
            let started = tokio::time::Instant::now();
            let left = self
                .timing
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            let bound = left.min(self.timing.renew_deadline / 2);
            match tokio::time::timeout(bound, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = started,
                Ok(Ok(false)) => return LeaderError::Lost(self.name.clone()),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "renewing the leader Lease failed");
                    pause = self.timing.retry_period.saturating_sub(started.elapsed());
                }
                Err(_) => {
                    tracing::warn!(
                        lease = %self.name,
                        seconds = bound.as_secs_f64(),
                        "renewing the leader Lease got no answer"
                    );
                    pause = self.timing.retry_period.saturating_sub(started.elapsed());
                }
            }
            if last_renewal.elapsed() >= self.timing.renew_deadline {
                return LeaderError::Lost(self.name.clone());
            }
        }
    }

    /// Gives the Lease up (on shutdown) so that another replica takes over at once; within the
    /// renew deadline (an API server that does not answer must not hold up a shutdown: the Lease
    /// then expires as after a crash).
    pub async fn release(&self) {
        if tokio::time::timeout(self.timing.renew_deadline, self.release_now())
            .await
            .is_err()
        {
            tracing::warn!(lease = %self.name, "releasing the leader Lease got no answer in time");
        }
    }

    async fn release_now(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(%error, "releasing the leader Lease failed");
        }
    }
}
