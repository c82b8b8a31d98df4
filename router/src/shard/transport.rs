//! The router's own HTTP/2 connections to a shard's etcd: unary gRPC calls
//! made directly on an `h2` connection, over TCP, TLS or a Unix socket.
//!
//! Why not tonic's `Channel`: a call through it crosses tower's `Buffer`
//! (a worker task every request is handed to), the reconnect layer, hyper's
//! dispatch channel to its connection task and, for a request body, a task
//! hyper spawns per request to stream it. Here the caller opens the stream,
//! writes the encoded request as one DATA frame and reads the answer itself.
//!
//! Who polls the connection's I/O (reads its socket, writes its frames):
//! - [`Connection`]: a task of its own, spawned with the connection; any
//!   number of calls at once (the shard's reads, compactions, health checks).
//! - [`OwnedConnection`]: the caller, while it waits for its answer; one call
//!   at a time and no other task. The shard's Txns go there, so a group
//!   commit's request and answer are handled in the committer's own task:
//!   no wake-up of a driver task to send the frames, none to read the answer
//!   and wake the committer. Between calls nobody polls it; a call first
//!   polls it once, so a connection the shard closed meanwhile is seen (and
//!   made again) before anything is sent on it.
//!
//! A connection is made on first use and made again after it broke or a
//! call on it timed out (a peer that stopped answering would otherwise keep
//! it).

use std::future::{poll_fn, Future};
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::Uri;
use tonic::{Code, Status};
use tracing::debug;

use crate::coalesce::Coalesce;
use crate::tls::ClientTls;

/// Where a shard's etcd listens.
#[derive(Clone, Debug)]
pub enum Target {
    /// `http://host:port`
    Tcp { host: String, port: u16 },
    /// `https://host:port`, with the router's shard client certificate.
    Tls { uri: Uri, tls: ClientTls },
    /// `unix:///path/to.sock`: an etcd on the same host.
    Unix(PathBuf),
}

impl Target {
    /// The target of a shard endpoint URL (`http://`, `https://` or `unix://`).
    pub fn parse(endpoint: &str, tls: Option<&ClientTls>) -> Result<Target, String> {
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "shard endpoint {endpoint:?}: a unix:// URL needs an absolute path (unix:///path/to.sock)"
                ));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| format!("shard endpoint {endpoint:?} is not a valid URL: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("shard endpoint {endpoint:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        match (uri.scheme_str(), tls) {
            (Some("http"), _) => Ok(Target::Tcp {
                host,
                port: uri.port_u16().unwrap_or(2379),
            }),
            (Some("https"), Some(tls)) => Ok(Target::Tls {
                uri,
                tls: tls.clone(),
            }),
            (Some("https"), None) => Err(format!(
                "shard endpoint {endpoint:?} is an https:// URL but no shard CA is configured (--shard-ca-file)"
            )),
            _ => Err(format!(
                "shard endpoint {endpoint:?} must start with http://, https:// or unix://"
            )),
        }
    }

    /// The `:authority` sent with each request.
    fn authority(&self) -> String {
        match self {
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Tls { uri, .. } => uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "localhost".into()),
            Target::Unix(_) => "localhost".into(),
        }
    }
}

/// The socket under an HTTP/2 connection: TCP, TLS or Unix.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection's I/O half: polled by its own task (`Connection`) or by the
/// caller (`OwnedConnection`).
type Driver = h2::client::Connection<Box<dyn Io>, Bytes>;

/// Where and how to call: what both kinds of connection share.
struct Peer {
    target: Target,
    /// `http://authority`, the prefix of every request URI.
    base: String,
    timeout: Duration,
}

impl Peer {
    fn new(target: Target, timeout: Duration) -> Self {
        let base = format!("http://{}", target.authority());
        Peer {
            target,
            base,
            timeout,
        }
    }

    async fn connect(&self) -> Result<(SendRequest<Bytes>, Driver), CallError> {
        let connect_timeout = self.timeout.min(Duration::from_secs(2));
        let connecting = async {
            let io: Box<dyn Io> = match &self.target {
                Target::Tcp { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(transport)?;
                    tcp.set_nodelay(true).map_err(transport)?;
                    Box::new(tcp)
                }
                Target::Tls { uri, tls } => {
                    Box::new(tls.connect(uri).await.map_err(transport)?.into_inner())
                }
                Target::Unix(path) => Box::new(UnixStream::connect(path).await.map_err(|e| {
                    CallError::Transport(format!("connecting to {}: {e}", path.display()))
                })?),
            };
            handshake(Box::new(Coalesce::new(io))).await
        };
        tokio::time::timeout(connect_timeout, connecting)
            .await
            .map_err(|_| {
                CallError::Transport(format!("no connection within {connect_timeout:?}"))
            })?
    }

    /// What a call's outcome means for its connection: `Ok(answer)`, or the
    /// status to return and whether the connection must be dropped.
    fn outcome<Resp>(
        &self,
        answer: Result<Result<Resp, CallError>, tokio::time::error::Elapsed>,
    ) -> Result<Resp, (Status, bool)> {
        match answer {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(CallError::Grpc(status))) => Err((status, false)),
            Ok(Err(CallError::Transport(message))) => Err((Status::unavailable(message), true)),
            // Maybe a peer that stopped answering: the next call connects afresh.
            Err(_) => Err((
                Status::deadline_exceeded(format!("no answer within {:?}", self.timeout)),
                true,
            )),
        }
    }
}

/// One HTTP/2 connection to a shard, made when first needed, its I/O polled
/// by a task of its own: for any number of calls at once.
pub struct Connection {
    peer: Peer,
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Serializes connecting, so concurrent first calls make one connection.
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
}

impl Connection {
    pub fn new(target: Target, timeout: Duration) -> Self {
        Connection {
            peer: Peer::new(target, timeout),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        }
    }

    /// A unary gRPC call (`path` like `/etcdserverpb.KV/Txn`), within the timeout.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        path: &'static str,
        req: &Req,
    ) -> Result<Resp, Status> {
        let frame = encode_frame(req);
        let mut generation = 0;
        let answer = tokio::time::timeout(self.peer.timeout, async {
            let (g, mut sender) = self.ready_sender().await?;
            generation = g;
            let body = exchange(&self.peer.base, &mut sender, path, frame).await?;
            decode_frame(body)
        })
        .await;
        self.peer.outcome(answer).map_err(|(status, broken)| {
            if broken {
                self.forget(generation);
            }
            status
        })
    }

    /// The connection's sender once it can open a stream (connecting first
    /// when there is none or the last one broke).
    async fn ready_sender(&self) -> Result<(u64, SendRequest<Bytes>), CallError> {
        let known = self.current.lock().expect("connection lock").clone();
        if let Some((generation, sender)) = known {
            match sender.ready().await {
                Ok(sender) => return Ok((generation, sender)),
                // Nothing was sent on it: connecting again is safe for any call.
                Err(err) => {
                    debug!(error = %err, "shard connection closed; reconnecting");
                    self.forget(generation);
                }
            }
        }
        let _connecting = self.connecting.lock().await;
        if let Some((generation, sender)) = self.current.lock().expect("connection lock").clone() {
            return Ok((generation, sender));
        }
        let (sender, driver) = self.peer.connect().await?;
        tokio::spawn(async move {
            if let Err(err) = driver.await {
                debug!(error = %err, "shard connection ended");
            }
        });
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        *self.current.lock().expect("connection lock") = Some((generation, sender.clone()));
        let sender = sender.ready().await.map_err(transport)?;
        Ok((generation, sender))
    }

    /// Drops connection `generation` (if still current): the next call makes a new one.
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().expect("connection lock");
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
}

/// One HTTP/2 connection to a shard whose I/O is polled by the caller while
/// it waits for its answer: one call at a time, and no task of its own.
pub struct OwnedConnection {
    peer: Peer,
    /// The live connection between calls (`None` before the first call and
    /// after one that broke it); a call holds the lock throughout.
    live: tokio::sync::Mutex<Option<(SendRequest<Bytes>, Driver)>>,
}

impl OwnedConnection {
    pub fn new(target: Target, timeout: Duration) -> Self {
        OwnedConnection {
            peer: Peer::new(target, timeout),
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// A unary gRPC call, or `None` without waiting when another call is on
    /// the connection (the caller then uses another connection).
    pub fn try_call<'a, Req: Message, Resp: Message + Default + 'a>(
        &'a self,
        path: &'static str,
        req: &Req,
    ) -> Option<impl Future<Output = Result<Resp, Status>> + Send + 'a> {
        let mut live = self.live.try_lock().ok()?;
        let frame = encode_frame(req);
        Some(async move {
            let answer = tokio::time::timeout(self.peer.timeout, async {
                let (sender, driver) = self.ready(&mut live).await?;
                let body = drive(driver, exchange(&self.peer.base, sender, path, frame)).await??;
                decode_frame(body)
            })
            .await;
            self.peer.outcome(answer).map_err(|(status, broken)| {
                if broken {
                    *live = None;
                }
                status
            })
        })
    }

    /// The live connection, made again when there is none or the shard
    /// closed it since the last call (nothing was sent on it then: safe).
    async fn ready<'l>(
        &self,
        live: &'l mut Option<(SendRequest<Bytes>, Driver)>,
    ) -> Result<&'l mut (SendRequest<Bytes>, Driver), CallError> {
        if let Some((_, driver)) = live.as_mut() {
            // What came in while nobody polled: a GOAWAY, the end of the stream.
            let ended = poll_fn(|cx| Poll::Ready(Pin::new(&mut *driver).poll(cx).is_ready())).await;
            if ended {
                debug!("shard connection closed; reconnecting");
                *live = None;
            }
        }
        if live.is_none() {
            *live = Some(self.peer.connect().await?);
        }
        let (sender, driver) = live.as_mut().expect("just made");
        drive(driver, poll_fn(|cx| sender.poll_ready(cx)))
            .await?
            .map_err(transport)?;
        Ok(live.as_mut().expect("just made"))
    }
}

/// Runs `call` while polling the connection's I/O in the same task; a
/// connection that ends first fails the call.
async fn drive<F: Future>(driver: &mut Driver, call: F) -> Result<F::Output, CallError> {
    let mut call = pin!(call);
    poll_fn(|cx| {
        // I/O first: it sends what the call queued and reads its answer.
        let io = Pin::new(&mut *driver).poll(cx);
        if let Poll::Ready(output) = call.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match io {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Err(CallError::Transport(
                "the shard closed the connection".into(),
            ))),
            Poll::Ready(Err(err)) => Poll::Ready(Err(transport(err))),
        }
    })
    .await
}

/// Sends one request frame and reads the answer's body (its one message).
async fn exchange(
    base: &str,
    sender: &mut SendRequest<Bytes>,
    path: &'static str,
    frame: Bytes,
) -> Result<Bytes, CallError> {
    let request = http::Request::post(format!("{base}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| CallError::Grpc(Status::internal(e.to_string())))?;
    let (response, mut stream) = sender.send_request(request, false).map_err(transport)?;
    stream.send_data(frame, true).map_err(transport)?;
    let (parts, mut body) = response.await.map_err(transport)?.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(CallError::Grpc(Status::unavailable(format!(
            "the shard answered HTTP {}",
            parts.status
        ))));
    }
    // A failure without a message comes as headers only ("trailers-only").
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != Code::Ok {
            return Err(CallError::Grpc(status));
        }
    }
    let mut message = Body::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(transport)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.push(chunk);
    }
    let trailers = body.trailers().await.map_err(transport)?;
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) if status.code() == Code::Ok => Ok(message.finish()),
        Some(status) => Err(CallError::Grpc(status)),
        None => Err(CallError::Grpc(Status::unknown(
            "the shard's answer ended without a grpc-status",
        ))),
    }
}

async fn handshake(io: Box<dyn Io>) -> Result<(SendRequest<Bytes>, Driver), CallError> {
    h2::client::Builder::new()
        // hyper's client defaults: a range of many keys is not slowed by window updates.
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(64 * 1024)
        .handshake(io)
        .await
        .map_err(transport)
}

/// How a call failed: a gRPC status from etcd, or the connection.
enum CallError {
    Grpc(Status),
    Transport(String),
}

fn transport(err: impl std::fmt::Display) -> CallError {
    CallError::Transport(err.to_string())
}

/// The response body: one DATA frame (nothing copied) or several.
#[derive(Default)]
struct Body {
    first: Option<Bytes>,
    rest: Option<BytesMut>,
}

impl Body {
    fn push(&mut self, chunk: Bytes) {
        match (&self.first, &mut self.rest) {
            (None, _) => self.first = Some(chunk),
            (Some(first), None) => {
                let mut joined = BytesMut::with_capacity(expected_len(first).max(2 * first.len()));
                joined.extend_from_slice(first);
                joined.extend_from_slice(&chunk);
                self.rest = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&chunk),
        }
    }

    fn finish(self) -> Bytes {
        match (self.first, self.rest) {
            (_, Some(joined)) => joined.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

/// The length of a whole gRPC frame, from its 5-byte prefix.
fn expected_len(frame: &[u8]) -> usize {
    if frame.len() < 5 {
        return 0;
    }
    5 + u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize
}

/// A gRPC length-prefixed message (uncompressed).
fn encode_frame<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .expect("the buffer has room for the message");
    buf.freeze()
}

/// The one message of a unary answer; its `bytes` fields share `frame`.
fn decode_frame<M: Message + Default>(mut frame: Bytes) -> Result<M, CallError> {
    let malformed = |what: &str| CallError::Grpc(Status::internal(format!("shard answer: {what}")));
    if frame.len() < 5 {
        return Err(malformed("no message"));
    }
    if frame.get_u8() != 0 {
        return Err(malformed("compressed, but no compression was asked for"));
    }
    let len = frame.get_u32() as usize;
    if frame.len() != len {
        return Err(malformed("its length prefix does not match its body"));
    }
    M::decode(frame).map_err(|e| malformed(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ste_etcd_proto::pb::{PutRequest, RequestOp, TxnRequest};

    #[test]
    fn frames_round_trip_and_share_the_buffer() {
        let value = Bytes::from(vec![7u8; 3000]);
        let req = TxnRequest {
            success: vec![RequestOp {
                request: Some(ste_etcd_proto::pb::request_op::Request::RequestPut(
                    PutRequest {
                        key: Bytes::from_static(b"/registry/pods/a"),
                        value: value.clone(),
                        ..Default::default()
                    },
                )),
            }],
            ..Default::default()
        };
        let frame = encode_frame(&req);
        assert_eq!(expected_len(&frame), frame.len());
        // Split over two DATA frames, as a large answer arrives.
        let mut body = Body::default();
        body.push(frame.slice(..100));
        body.push(frame.slice(100..));
        let decoded: TxnRequest = decode_frame(body.finish()).ok().expect("decodes");
        assert_eq!(decoded, req);
        let mut one = Body::default();
        one.push(frame.clone());
        let whole = one.finish();
        assert_eq!(
            whole.as_ptr(),
            frame.as_ptr(),
            "one DATA frame is not copied"
        );
    }

    #[test]
    fn targets_parse_or_say_why_not() {
        assert!(matches!(
            Target::parse("unix:///run/etcd.sock", None),
            Ok(Target::Unix(p)) if p == std::path::Path::new("/run/etcd.sock")
        ));
        assert!(Target::parse("unix://relative.sock", None)
            .unwrap_err()
            .contains("absolute path"));
        assert!(matches!(
            Target::parse("http://127.0.0.1:2380", None),
            Ok(Target::Tcp { port: 2380, .. })
        ));
        assert!(Target::parse("https://127.0.0.1:2380", None)
            .unwrap_err()
            .contains("--shard-ca-file"));
        assert!(Target::parse("ftp://x:1", None)
            .unwrap_err()
            .contains("unix://"));
    }
}
