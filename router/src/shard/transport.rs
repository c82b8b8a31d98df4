//! The router's own HTTP/2 connection to a shard's etcd: unary gRPC calls
//! made directly on an `h2` connection, over TCP, TLS or a Unix socket.
//!
//! Why not tonic's `Channel`: a call through it crosses tower's `Buffer`
//! (a worker task every request is handed to), the reconnect layer, hyper's
//! dispatch channel to its connection task and, for a request body, a task
//! hyper spawns per request to stream it. Here the caller (for writes: the
//! shard's committer) opens the stream, writes the encoded request as one
//! DATA frame and reads the answer itself; the only other task is the
//! connection's I/O driver, which every HTTP/2 client needs.
//!
//! One `Connection` is one HTTP/2 connection, made on first use and made
//! again after it broke or a call on it timed out (a peer that stopped
//! answering would otherwise keep it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::Uri;
use tonic::{Code, Status};
use tracing::debug;

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

/// One HTTP/2 connection to a shard, made when first needed.
pub struct Connection {
    target: Target,
    /// `http://authority`, the prefix of every request URI.
    base: String,
    timeout: Duration,
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Serializes connecting, so concurrent first calls make one connection.
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
}

impl Connection {
    pub fn new(target: Target, timeout: Duration) -> Self {
        let base = format!("http://{}", target.authority());
        Connection {
            target,
            base,
            timeout,
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
        let answer = tokio::time::timeout(self.timeout, async {
            let (g, sender) = self.ready_sender().await?;
            generation = g;
            let body = self.exchange(sender, path, frame).await?;
            decode_frame(body)
        })
        .await;
        match answer {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(CallError::Grpc(status))) => Err(status),
            Ok(Err(CallError::Transport(message))) => {
                self.forget(generation);
                Err(Status::unavailable(message))
            }
            Err(_) => {
                // Maybe a peer that stopped answering: the next call connects afresh.
                self.forget(generation);
                Err(Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            }
        }
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
        let sender = self.connect().await?;
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

    async fn connect(&self) -> Result<SendRequest<Bytes>, CallError> {
        let connect_timeout = self.timeout.min(Duration::from_secs(2));
        let connecting = async {
            match &self.target {
                Target::Tcp { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(transport)?;
                    tcp.set_nodelay(true).map_err(transport)?;
                    handshake(tcp).await
                }
                Target::Tls { uri, tls } => {
                    handshake(tls.connect(uri).await.map_err(transport)?.into_inner()).await
                }
                Target::Unix(path) => {
                    let unix = UnixStream::connect(path).await.map_err(|e| {
                        CallError::Transport(format!("connecting to {}: {e}", path.display()))
                    })?;
                    handshake(unix).await
                }
            }
        };
        tokio::time::timeout(connect_timeout, connecting)
            .await
            .map_err(|_| {
                CallError::Transport(format!("no connection within {connect_timeout:?}"))
            })?
    }

    /// Sends one request frame and reads the answer's body (its one message).
    async fn exchange(
        &self,
        mut sender: SendRequest<Bytes>,
        path: &'static str,
        frame: Bytes,
    ) -> Result<Bytes, CallError> {
        let request = http::Request::post(format!("{}{}", self.base, path))
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
}

async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, CallError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        // hyper's client defaults: a range of many keys is not slowed by window updates.
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(64 * 1024)
        .handshake(io)
        .await
        .map_err(transport)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(error = %err, "shard connection ended");
        }
    });
    Ok(sender)
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
