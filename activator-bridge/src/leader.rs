//! Leader election on a coordination.k8s.io/v1 Lease, as client-go does it:
//! the holder renews every retry period; another candidate takes the Lease
//! over only when it has seen the same Lease record unchanged for a whole
//! lease duration (its own clock, not the holder's timestamps). The holder
//! stops acting when it could not renew within the renew deadline, which
//! is shorter than the lease duration, so two replicas never act at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

fn now_micro() -> MicroTime {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    MicroTime(k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or_default())
}

enum Outcome {
    Leading,
    Following(Option<String>),
}

struct Elector {
    api: Api<Lease>,
    cfg: Config,
    /// The last Lease record seen from someone else and when it changed.
    observed: Option<(String, Instant)>,
}

impl Elector {
    fn spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquire.or_else(|| Some(now_micro())),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Outcome, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Following(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder.as_deref() == Some(self.cfg.identity.as_str()) {
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            let now = Instant::now();
            let changed_at = match &self.observed {
                Some((seen, at)) if *seen == rv => *at,
                _ => {
                    self.observed = Some((rv, now));
                    now
                }
            };
            let duration = spec
                .lease_duration_seconds
                .map_or(self.cfg.lease_duration, |s| {
                    Duration::from_secs(s.max(1) as u64)
                });
            if holder.is_some() && now.duration_since(changed_at) < duration {
                return Ok(Outcome::Following(holder));
            }
            self.spec(transitions + 1, None)
        };
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Outcome::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Following(holder)),
            Err(e) => Err(e),
        }
    }
}

/// Runs forever, keeping `leading` true exactly while this replica holds the Lease.
pub async fn run(client: kube::Client, cfg: Config, leading: Arc<AtomicBool>) {
    let mut elector = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg: cfg.clone(),
        observed: None,
    };
    let mut last_renew: Option<Instant> = None;
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(Outcome::Leading) => {
                last_renew = Some(Instant::now());
                if !leading.swap(true, Ordering::SeqCst) {
                    info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "became leader");
                }
            }
            Ok(Outcome::Following(holder)) => {
                if leading.swap(false, Ordering::SeqCst) {
                    warn!(lease = %format!("{}/{}", cfg.namespace, cfg.name), holder = ?holder, "lost the lease; standing by");
                }
                last_renew = None;
            }
            Err(err) => {
                warn!(lease = %format!("{}/{}", cfg.namespace, cfg.name), error = %err, "lease acquire/renew failed");
                if last_renew.is_some_and(|t| t.elapsed() >= cfg.renew_deadline)
                    && leading.swap(false, Ordering::SeqCst)
                {
                    warn!("could not renew the lease within the renew deadline; stopped acting");
                    last_renew = None;
                }
            }
        }
        tokio::time::sleep(cfg.retry_period).await;
    }
}

/// Gives the Lease up (best effort) so a standby takes over at once.
pub async fn release(client: kube::Client, cfg: &Config) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await {
        if lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(cfg.identity.as_str())
        {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
            }
            let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
        }
    }
}
