//! One router writes at a time: leader election in the durable etcd, and a
//! fence on every shard so that a router that lost leadership cannot write
//! even before it notices.
//!
//! Why the durable etcd and not a coordination Lease: kube-apiserver does not
//! start until the router answers, so a router that needed kube-apiserver to
//! become leader could never start a cold control plane. The durable etcd
//! (kube-apiserver's own, reachable with its etcd client certificate) is up
//! first and does not depend on the router.
//!
//! The leader holds a key with an etcd lease (like etcd's `concurrency`
//! election); the key's create revision is its epoch, so epochs only grow.
//! Before its first write to a shard the leader raises the shard's fence key
//! to its epoch, and every Txn it sends carries `fence == epoch` as a
//! compare: a newer leader raises the fence, so the old one's next write
//! fails and it steps down.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    lease_client::LeaseClient,
    request_op::Request,
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::tls::ClientTls;

#[derive(Clone)]
pub struct LeaderConfig {
    /// The durable etcd (kube-apiserver's), e.g. `https://127.0.0.1:2379`.
    pub endpoint: String,
    /// Its CA and client certificate, for `https://` endpoints.
    pub tls: Option<ClientTls>,
    /// The election key.
    pub key: String,
    /// This router's name in the key's value (e.g. the node name).
    pub identity: String,
    /// TTL of the leader's etcd lease: how long a dead leader blocks a takeover.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops serving (shorter
    /// than the lease duration, so it stops before anyone may take over).
    pub renew_deadline: Duration,
    /// How often the leader renews, and standbys check.
    pub retry_period: Duration,
}

impl std::fmt::Debug for LeaderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderConfig")
            .field("endpoint", &self.endpoint)
            .field("key", &self.key)
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: the durable etcd at {endpoint} answered: {status}")]
    Etcd {
        endpoint: String,
        status: tonic::Status,
    },
    #[error("leader election: invalid etcd endpoint {0:?}")]
    Endpoint(String),
}

/// What the last look at the election key told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader { epoch: i64 },
    Follower,
}

struct Held {
    lease: i64,
    epoch: i64,
    keep_alive: mpsc::Sender<LeaseKeepAliveRequest>,
    answers: tonic::Streaming<LeaseKeepAliveResponse>,
}

pub struct Elector {
    config: LeaderConfig,
    kv: KvClient<Channel>,
    leases: LeaseClient<Channel>,
    held: Option<Held>,
    last_renewed: Option<Instant>,
}

impl Elector {
    pub fn new(config: LeaderConfig) -> Result<Self, LeaderError> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|_| LeaderError::Endpoint(config.endpoint.clone()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(config.retry_period.max(Duration::from_secs(2)))
            .tcp_nodelay(true);
        let channel = match (&config.tls, config.endpoint.starts_with("https://")) {
            (Some(tls), true) => {
                let tls = tls.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri| {
                    let tls = tls.clone();
                    async move { tls.connect(&uri).await }
                }))
            }
            _ => endpoint.connect_lazy(),
        };
        Ok(Elector {
            kv: KvClient::new(channel.clone()),
            leases: LeaseClient::new(channel),
            config,
            held: None,
            last_renewed: None,
        })
    }

    fn etcd_error(&self, status: tonic::Status) -> LeaderError {
        LeaderError::Etcd {
            endpoint: self.config.endpoint.clone(),
            status,
        }
    }

    /// Takes the election key if it is free, or renews it if it is ours.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Role, LeaderError> {
        if self.held.is_some() {
            return self.renew().await;
        }
        let ttl = self.config.lease_duration.as_secs().max(2) as i64;
        let lease = self
            .leases
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(|s| self.etcd_error(s))?
            .into_inner()
            .id;
        let key = Bytes::from(self.config.key.clone());
        let answer = self
            .kv
            .txn(TxnRequest {
                compare: vec![Compare {
                    key: key.clone(),
                    target: CompareTarget::Create as i32,
                    result: CompareResult::Equal as i32,
                    target_union: Some(TargetUnion::CreateRevision(0)),
                    range_end: Bytes::new(),
                }],
                success: vec![RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key,
                        value: Bytes::from(self.config.identity.clone()),
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            })
            .await
            .map_err(|s| self.etcd_error(s))?
            .into_inner();
        if !answer.succeeded {
            let _ = self
                .leases
                .lease_revoke(LeaseRevokeRequest { id: lease })
                .await;
            return Ok(Role::Follower);
        }
        let epoch = answer.header.map(|h| h.revision).unwrap_or(0);
        // etcd answers the stream's headers with its first keep-alive, so one
        // goes out at once (the call would otherwise wait for headers).
        let (keep_alive, requests) = mpsc::channel(4);
        let _ = keep_alive.send(LeaseKeepAliveRequest { id: lease }).await;
        let mut answers = self
            .leases
            .lease_keep_alive(ReceiverStream::new(requests))
            .await
            .map_err(|s| self.etcd_error(s))?
            .into_inner();
        let _ = answers.message().await;
        self.held = Some(Held {
            lease,
            epoch,
            keep_alive,
            answers,
        });
        self.last_renewed = Some(Instant::now());
        info!(identity = %self.config.identity, epoch, "became the leader");
        Ok(Role::Leader { epoch })
    }

    async fn renew(&mut self) -> Result<Role, LeaderError> {
        let Some(held) = self.held.as_mut() else {
            return Ok(Role::Follower);
        };
        let epoch = held.epoch;
        let sent = held
            .keep_alive
            .send(LeaseKeepAliveRequest { id: held.lease })
            .await
            .is_ok();
        let answer = if sent {
            tokio::time::timeout(
                self.config.retry_period.max(Duration::from_secs(1)),
                held.answers.message(),
            )
            .await
        } else {
            Ok(Ok(None))
        };
        match answer {
            Ok(Ok(Some(kept))) if kept.ttl > 0 => {}
            Ok(Ok(Some(_))) => {
                // The lease expired: the key is gone, someone else may hold it now.
                self.held = None;
                return Ok(Role::Follower);
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                // The stream broke: open a new one next time, and keep leading
                // only until the renew deadline.
                let lease = held.lease;
                if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), async {
                    let (keep_alive, requests) = mpsc::channel(4);
                    let _ = keep_alive.send(LeaseKeepAliveRequest { id: lease }).await;
                    let mut answers = self
                        .leases
                        .lease_keep_alive(ReceiverStream::new(requests))
                        .await?
                        .into_inner();
                    let _ = answers.message().await;
                    Ok::<_, tonic::Status>((keep_alive, answers))
                })
                .await
                {
                    if let Some(held) = self.held.as_mut() {
                        (held.keep_alive, held.answers) = stream;
                    }
                }
                return Err(self.etcd_error(tonic::Status::unavailable("lease keep-alive failed")));
            }
        }
        // Still our key (nobody deleted it by hand)?
        let current = self
            .kv
            .range(RangeRequest {
                key: Bytes::from(self.config.key.clone()),
                ..Default::default()
            })
            .await
            .map_err(|s| self.etcd_error(s))?
            .into_inner();
        if current.kvs.first().map(|kv| kv.create_revision) != Some(epoch) {
            self.held = None;
            return Ok(Role::Follower);
        }
        self.last_renewed = Some(Instant::now());
        debug!(epoch, "renewed leadership");
        Ok(Role::Leader { epoch })
    }

    /// When leadership was last acquired or renewed.
    pub fn last_renewed(&self) -> Option<Instant> {
        self.last_renewed
    }

    /// True while a leader may keep acting: its last renewal is recent.
    pub fn within_renew_deadline(&self) -> bool {
        self.last_renewed
            .is_some_and(|at| at.elapsed() < self.config.renew_deadline)
    }

    /// Gives leadership up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&mut self) {
        if let Some(held) = self.held.take() {
            if let Err(err) = self
                .leases
                .lease_revoke(LeaseRevokeRequest { id: held.lease })
                .await
            {
                warn!(error = %err, "could not release leadership; it expires by itself");
            }
        }
    }
}

/// How long this router may still act as the leader: its last renewal plus
/// the renew deadline (shorter than the lease, so no other router can lead
/// yet). Readable from any thread; the store serves reads from its value
/// cache only within it (a deposed leader's index may be behind the shards).
#[derive(Debug)]
pub struct Tenure {
    start: Instant,
    renew_deadline: Duration,
    /// Microseconds after `start` until which leadership holds (0: ended).
    until_micros: std::sync::atomic::AtomicU64,
}

impl Tenure {
    /// Leadership acquired (or last renewed) at `at`.
    pub fn new(at: Instant, renew_deadline: Duration) -> Self {
        Tenure {
            start: at,
            renew_deadline,
            until_micros: std::sync::atomic::AtomicU64::new(renew_deadline.as_micros() as u64),
        }
    }

    /// A renewal at `at` extends leadership to `at` + the renew deadline.
    pub fn renewed_at(&self, at: Instant) {
        let until = at.saturating_duration_since(self.start) + self.renew_deadline;
        self.until_micros.fetch_max(
            until.as_micros() as u64,
            std::sync::atomic::Ordering::AcqRel,
        );
    }

    /// Leadership is over (lost, or given up).
    pub fn end(&self) {
        self.until_micros
            .store(0, std::sync::atomic::Ordering::Release);
    }

    pub fn is_valid(&self) -> bool {
        (self.start.elapsed().as_micros() as u64)
            < self.until_micros.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tenure_tests {
    use super::*;

    #[test]
    fn tenure_lasts_the_renew_deadline_after_the_last_renewal() {
        let at = Instant::now();
        let tenure = Tenure::new(at, Duration::from_secs(60));
        assert!(tenure.is_valid());
        tenure.renewed_at(at + Duration::from_secs(1));
        assert!(tenure.is_valid());
        tenure.end();
        assert!(!tenure.is_valid());
        let expired = Tenure::new(at, Duration::ZERO);
        assert!(!expired.is_valid());
    }
}
