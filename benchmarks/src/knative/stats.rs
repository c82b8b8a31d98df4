//! The activator's side of Knative's stat protocol: request statistics
//! reported to the autoscaler over its websocket, so that the autoscaler
//! itself decides to scale a revision from zero and patches its Deployment
//! at its own pace.
//!
//! Followed from knative.dev/serving v0.42.2 (hack/knative/go.mod):
//! - `pkg/autoscaler/metrics/stat.proto`: a binary websocket message is one
//!   protobuf `WireStatMessages` { repeated `WireStatMessage` { namespace,
//!   name (the revision), `Stat` } }.
//! - `pkg/activator/stat_reporter.go`: the activator marshals each batch with
//!   `ToWireStatMessages` and sends it as one `websocket.BinaryMessage` to
//!   `ws://autoscaler.knative-serving:8080` (`cmd/activator/main.go`); the
//!   autoscaler serves that on `:8080`, a constant (`cmd/autoscaler/main.go`,
//!   `pkg/autoscaler/statserver`), stamps `Timestamp` 0 with its receive time
//!   and hands the stat to the revision's bucket owner, itself here.
//! - `pkg/activator/handler/concurrency_reporter.go`: the first request of a
//!   revision sends at once `{AverageConcurrentRequests: 1, RequestCount: 1}`
//!   (the autoscaler's `MultiScaler.Poke` ticks a scaler at 0 right away);
//!   then every second a report per revision with the time-weighted average
//!   concurrency (`knative.dev/networking/pkg/http/stats.RequestStats`),
//!   minus the request already reported in the first period; a revision
//!   with no activity for a whole period is forgotten after its report.
//!
//! The autoscaler accepts the stats of a revision once its KPA reconciler
//! made the revision's `Metric` (a `MultiScaler` scaler and a collection
//! exist); stats for other keys are dropped silently.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Where Knative's autoscaler listens for stats (`statsServerAddr = ":8080"`).
pub const AUTOSCALER_STATS_ADDR: &str = "127.0.0.1:8080";

/// The activator's report period (`reportInterval` in concurrency_reporter.go).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("connecting to Knative's autoscaler at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("websocket handshake with {addr}: {detail}")]
    Handshake { addr: String, detail: String },
    #[error("sending stats to Knative's autoscaler: {0}")]
    Send(io::Error),
}

// The protobuf messages, shared with ste-activator-bridge's stat tap.
pub use ste_knative_stat::{Stat, WireStatMessage, WireStatMessages};

/// A revision, as the autoscaler keys its scalers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevisionKey {
    pub namespace: String,
    pub name: String,
}

impl RevisionKey {
    pub fn new(namespace: &str, name: &str) -> RevisionKey {
        RevisionKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// `knative.dev/networking/pkg/http/stats.RequestStats`: time-weighted
/// concurrency and request count since the last report.
#[derive(Debug)]
struct RequestStats {
    concurrency: f64,
    computed_concurrency: f64,
    seconds_in_use: f64,
    request_count: f64,
    last_change: Instant,
}

impl RequestStats {
    fn new(now: Instant) -> RequestStats {
        RequestStats {
            concurrency: 0.0,
            computed_concurrency: 0.0,
            seconds_in_use: 0.0,
            request_count: 0.0,
            last_change: now,
        }
    }

    fn compute(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.last_change)
            .as_secs_f64();
        if secs > 0.0 {
            self.seconds_in_use += secs;
            self.computed_concurrency += self.concurrency * secs;
            self.last_change = now;
        }
    }

    fn request_in(&mut self, now: Instant) {
        self.compute(now);
        self.request_count += 1.0;
        self.concurrency += 1.0;
    }

    fn request_out(&mut self, now: Instant) {
        self.compute(now);
        self.concurrency -= 1.0;
    }

    /// (average concurrency, request count) since the last report; resets.
    fn report(&mut self, now: Instant) -> (f64, f64) {
        self.compute(now);
        let average = if self.seconds_in_use > 0.0 {
            self.computed_concurrency / self.seconds_in_use
        } else {
            0.0
        };
        let out = (average, self.request_count);
        self.computed_concurrency = 0.0;
        self.seconds_in_use = 0.0;
        self.request_count = 0.0;
        out
    }
}

#[derive(Debug)]
struct RevisionStats {
    stats: RequestStats,
    first_request: f64,
}

/// The activator's `ConcurrencyReporter`: request accounting per revision
/// and the stat messages it sends (pure logic, no I/O).
#[derive(Debug)]
pub struct ConcurrencyReporter {
    pod_name: String,
    stats: HashMap<RevisionKey, RevisionStats>,
}

impl ConcurrencyReporter {
    pub fn new(pod_name: &str) -> ConcurrencyReporter {
        ConcurrencyReporter {
            pod_name: pod_name.into(),
            stats: HashMap::new(),
        }
    }

    fn stat(&self, concurrency: f64, count: f64) -> Stat {
        Stat {
            pod_name: self.pod_name.clone(),
            average_concurrent_requests: concurrency,
            request_count: count,
            ..Stat::default()
        }
    }

    /// A request for `key` arrives; returns the message to send at once when
    /// the revision had no stats (the scale-from-zero poke).
    pub fn request_in(&mut self, key: &RevisionKey, now: Instant) -> Option<WireStatMessages> {
        let mut first = None;
        if !self.stats.contains_key(key) {
            self.stats.insert(
                key.clone(),
                RevisionStats {
                    stats: RequestStats::new(now),
                    first_request: 1.0,
                },
            );
            first = Some(wire(vec![(key.clone(), self.stat(1.0, 1.0))]));
        }
        if let Some(s) = self.stats.get_mut(key) {
            s.stats.request_in(now);
        }
        first
    }

    /// A request for `key` is done (a no-op for an unknown revision).
    pub fn request_out(&mut self, key: &RevisionKey, now: Instant) {
        if let Some(s) = self.stats.get_mut(key) {
            s.stats.request_out(now);
        }
    }

    /// The periodic report (`computeReport`): one message per revision;
    /// revisions idle for the whole period are forgotten.
    pub fn report(&mut self, now: Instant) -> Option<WireStatMessages> {
        let mut out = Vec::new();
        let mut idle = Vec::new();
        for (key, s) in &mut self.stats {
            let (average, count) = s.stats.report(now);
            let first = std::mem::take(&mut s.first_request);
            if average == 0.0 && s.stats.concurrency == 0.0 {
                idle.push(key.clone());
            }
            out.push((key.clone(), (f64::max(average - first, 0.0), count - first)));
        }
        for key in idle {
            self.stats.remove(&key);
        }
        if out.is_empty() {
            return None;
        }
        Some(wire(
            out.into_iter()
                .map(|(k, (c, n))| (k, self.stat(c, n)))
                .collect(),
        ))
    }

    /// Revisions with stats kept.
    pub fn tracked(&self) -> usize {
        self.stats.len()
    }

    /// Whether stats are kept for `key` (a request held, or activity in the
    /// last period): a new request for it would not poke the autoscaler.
    pub fn reports_on(&self, key: &RevisionKey) -> bool {
        self.stats.contains_key(key)
    }
}

fn wire(stats: Vec<(RevisionKey, Stat)>) -> WireStatMessages {
    WireStatMessages {
        messages: stats
            .into_iter()
            .map(|(k, stat)| WireStatMessage {
                namespace: k.namespace,
                name: k.name,
                stat: Some(stat),
            })
            .collect(),
    }
}

/// A minimal RFC 6455 client that only sends: the HTTP/1.1 upgrade, then
/// masked binary frames (gorilla/websocket on the autoscaler's side).
pub struct StatSocket {
    stream: TcpStream,
    mask_seed: u32,
}

/// 16 bytes for `Sec-WebSocket-Key`, base64 (the server only checks the
/// shape: 16 bytes once decoded).
fn challenge_key(seed: u128) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = seed.to_be_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

/// One masked binary frame (FIN, opcode 2) carrying `payload`.
pub fn binary_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0x82u8];
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn seed() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0x5eed)
}

impl StatSocket {
    pub async fn connect(addr: &str) -> Result<StatSocket, StatsError> {
        let connect = |source| StatsError::Connect {
            addr: addr.into(),
            source,
        };
        let mut stream = TcpStream::connect(addr).await.map_err(connect)?;
        stream.set_nodelay(true).map_err(connect)?;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            challenge_key(seed())
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(connect)?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
                .await
                .map_err(|_| StatsError::Handshake {
                    addr: addr.into(),
                    detail: "no answer within 10s".into(),
                })?
                .map_err(connect)?;
            if n == 0 || head.len() > 8192 {
                return Err(StatsError::Handshake {
                    addr: addr.into(),
                    detail: format!(
                        "connection closed after {:?}",
                        String::from_utf8_lossy(&head)
                    ),
                });
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            return Err(StatsError::Handshake {
                addr: addr.into(),
                detail: head.lines().next().unwrap_or_default().to_string(),
            });
        }
        Ok(StatSocket {
            stream,
            mask_seed: seed() as u32,
        })
    }

    /// Sends one `WireStatMessages` as one binary message.
    pub async fn send(&mut self, messages: &WireStatMessages) -> Result<(), StatsError> {
        use prost::Message;
        self.mask_seed = self
            .mask_seed
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        let frame = binary_frame(&messages.encode_to_vec(), self.mask_seed.to_be_bytes());
        self.stream
            .write_all(&frame)
            .await
            .map_err(StatsError::Send)
    }
}

/// An activator for the benchmark: holds requests per revision, sends the
/// first-request poke at once and the periodic reports every second, over
/// one websocket to the autoscaler.
#[derive(Clone)]
pub struct Activator {
    reporter: Arc<Mutex<ConcurrencyReporter>>,
    socket: Arc<tokio::sync::Mutex<StatSocket>>,
    messages_sent: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
}

impl Activator {
    /// Connects to the autoscaler and starts the 1-second report loop
    /// (stopped by [`Activator::stop`] or when dropped by all clones… use stop).
    pub async fn connect(addr: &str, pod_name: &str) -> Result<Activator, StatsError> {
        let socket = StatSocket::connect(addr).await?;
        let activator = Activator {
            reporter: Arc::new(Mutex::new(ConcurrencyReporter::new(pod_name))),
            socket: Arc::new(tokio::sync::Mutex::new(socket)),
            messages_sent: Arc::default(),
            stop: CancellationToken::new(),
        };
        let a = activator.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REPORT_INTERVAL);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = a.stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let report = a.lock().report(Instant::now());
                if let Some(m) = report {
                    if let Err(e) = a.send(&m).await {
                        tracing::warn!("activator stats: {e}");
                    }
                }
            }
        });
        Ok(activator)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConcurrencyReporter> {
        self.reporter.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(&self, m: &WireStatMessages) -> Result<(), StatsError> {
        self.socket.lock().await.send(m).await?;
        self.messages_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// A request for the revision arrives and waits (as at the activator,
    /// until the revision has a pod to forward it to).
    pub async fn request_in(&self, key: &RevisionKey) -> Result<(), StatsError> {
        let poke = self.lock().request_in(key, Instant::now());
        match poke {
            Some(m) => self.send(&m).await,
            None => Ok(()),
        }
    }

    /// The request is answered.
    pub fn request_out(&self, key: &RevisionKey) {
        self.lock().request_out(key, Instant::now());
    }

    /// Revisions still reported on (requests held or active in the last period).
    pub fn tracked(&self) -> usize {
        self.lock().tracked()
    }

    /// Whether the activator still reports on `key` (see
    /// [`ConcurrencyReporter::reports_on`]).
    pub fn reports_on(&self, key: &RevisionKey) -> bool {
        self.lock().reports_on(key)
    }

    /// Websocket messages sent so far.
    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn key() -> RevisionKey {
        RevisionKey::new("default", "r-00001")
    }

    #[test]
    fn the_first_request_pokes_with_concurrency_one() {
        let mut r = ConcurrencyReporter::new("activator-0");
        let t0 = Instant::now();
        let poke = r.request_in(&key(), t0).expect("a poke");
        let m = &poke.messages[0];
        assert_eq!(
            (m.namespace.as_str(), m.name.as_str()),
            ("default", "r-00001")
        );
        let stat = m.stat.clone().unwrap();
        assert_eq!(stat.average_concurrent_requests, 1.0);
        assert_eq!(stat.request_count, 1.0);
        assert_eq!(stat.pod_name, "activator-0");
        assert!(
            r.request_in(&key(), t0).is_none(),
            "a second request does not poke"
        );
    }

    #[test]
    fn reports_subtract_the_poke_then_follow_held_requests_then_forget() {
        let mut r = ConcurrencyReporter::new("a");
        let t0 = Instant::now();
        r.request_in(&key(), t0);
        assert!(r.reports_on(&key()));
        let stat = |m: WireStatMessages| m.messages[0].stat.clone().unwrap();
        // First period: one request held the whole second, minus the poke.
        let s = stat(r.report(t0 + Duration::from_secs(1)).unwrap());
        assert_eq!((s.average_concurrent_requests, s.request_count), (0.0, 0.0));
        // Second period: still held.
        let s = stat(r.report(t0 + Duration::from_secs(2)).unwrap());
        assert_eq!((s.average_concurrent_requests, s.request_count), (1.0, 0.0));
        // Answered half-way through the third.
        r.request_out(&key(), t0 + Duration::from_millis(2500));
        let s = stat(r.report(t0 + Duration::from_secs(3)).unwrap());
        assert!((s.average_concurrent_requests - 0.5).abs() < 1e-9);
        // A whole idle period: reported at 0, then forgotten.
        let s = stat(r.report(t0 + Duration::from_secs(4)).unwrap());
        assert_eq!(s.average_concurrent_requests, 0.0);
        assert_eq!(r.tracked(), 0);
        assert!(!r.reports_on(&key()));
        assert!(r.report(t0 + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn wire_messages_round_trip_through_protobuf() {
        let mut r = ConcurrencyReporter::new("a");
        let poke = r.request_in(&key(), Instant::now()).unwrap();
        let bytes = poke.encode_to_vec();
        assert_eq!(WireStatMessages::decode(bytes.as_slice()).unwrap(), poke);
        // Field 1 (messages), wire type 2.
        assert_eq!(bytes[0], 0x0a);
    }

    #[test]
    fn frames_are_masked_with_the_right_length_encoding() {
        let mask = [1, 2, 3, 4];
        let small = binary_frame(b"abc", mask);
        assert_eq!(&small[..2], &[0x82, 0x83]);
        assert_eq!(&small[2..6], &mask);
        assert_eq!(small[6], b'a' ^ 1);
        let medium = binary_frame(&[0u8; 300], mask);
        assert_eq!(&medium[..4], &[0x82, 0x80 | 126, 1, 44]);
        let large = binary_frame(&vec![0u8; 70_000], mask);
        assert_eq!(large[1], 0x80 | 127);
        assert_eq!(large.len(), 2 + 8 + 4 + 70_000);
    }

    #[test]
    fn the_challenge_key_is_16_bytes_of_base64() {
        let k = challenge_key(0);
        assert_eq!(k, "AAAAAAAAAAAAAAAAAAAAAA==");
        assert_eq!(challenge_key(u128::MAX).len(), 24);
    }
}
