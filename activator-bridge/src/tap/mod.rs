//! The stat tap: a websocket proxy on the activator → autoscaler stat
//! stream. Every byte the activator sends is forwarded to the autoscaler
//! first, unchanged and in order; a copy is then decoded, and a stat with
//! load for a revision whose Deployment is at 0 replicas is a wake
//! ([`wake`]). If either side fails, both are closed: the activator's
//! `DurableSendingConnection` reconnects.

pub mod frames;
pub mod wake;

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use ste_knative_stat::WireStatMessages;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use frames::{FrameReader, Message};

/// How long either side may take to send its HTTP upgrade head.
const HEAD_WITHIN: Duration = Duration::from_secs(10);
/// The largest HTTP head accepted.
const MAX_HEAD: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--stat-tap-upstream {0:?}: expected ws://HOST:PORT[/PATH]")]
    Upstream(String),
    #[error("{side}: {source}")]
    Io {
        side: &'static str,
        source: std::io::Error,
    },
    #[error("{side}: no complete HTTP head within {HEAD_WITHIN:?} (or over {MAX_HEAD} bytes)")]
    Head { side: &'static str },
    #[error("the autoscaler refused the upgrade: {0}")]
    Refused(String),
}

fn io(side: &'static str) -> impl Fn(std::io::Error) -> TapError {
    move |source| TapError::Io { side, source }
}

/// Where the autoscaler's stat server is: `ws://HOST:PORT[/PATH]` → `HOST:PORT`.
pub fn upstream_addr(url: &str) -> Result<String, TapError> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| TapError::Upstream(url.into()))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(TapError::Upstream(url.into()));
    }
    Ok(match host.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => host.to_string(),
        Some(_) => return Err(TapError::Upstream(url.into())),
        None => format!("{host}:80"),
    })
}

/// What the tap does with the stat messages it read (after forwarding them).
pub trait StatSink: Send + Sync + 'static {
    fn stats(&self, messages: WireStatMessages, received: Instant);
}

/// Accepts activator connections until `stop`; one upstream connection each.
pub async fn serve(
    listener: TcpListener,
    upstream: String,
    sink: Arc<dyn StatSink>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (down, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                warn!(error = %err, "stat tap: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (upstream, sink, stop) = (upstream.clone(), sink.clone(), stop.clone());
        tokio::spawn(async move {
            info!(%peer, "stat tap: activator connected");
            tokio::select! {
                _ = stop.cancelled() => {}
                result = relay(down, &upstream, sink.as_ref()) => match result {
                    Ok(()) => info!(%peer, "stat tap: connection closed"),
                    Err(err) => warn!(%peer, error = %err, "stat tap: connection closed"),
                },
            }
        });
    }
}

/// Reads an HTTP head (through the blank line); returns it and the bytes after it.
async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    side: &'static str,
) -> Result<(Vec<u8>, Vec<u8>), TapError> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return Ok((buf, rest));
            }
            if buf.len() > MAX_HEAD {
                return Err(TapError::Head { side });
            }
            let n = stream.read(&mut chunk).await.map_err(io(side))?;
            if n == 0 {
                return Err(TapError::Head { side });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(HEAD_WITHIN, read)
        .await
        .map_err(|_| TapError::Head { side })?
}

/// One activator connection: the upgrade handshake passed through, then the
/// activator's bytes forwarded and inspected, the autoscaler's copied back.
async fn relay(mut down: TcpStream, upstream: &str, sink: &dyn StatSink) -> Result<(), TapError> {
    let (head, early) = read_head(&mut down, "activator").await?;
    let mut up = TcpStream::connect(upstream)
        .await
        .map_err(io("connecting to the autoscaler"))?;
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    up.write_all(&head).await.map_err(io("autoscaler"))?;
    let (answer, rest) = read_head(&mut up, "autoscaler").await?;
    down.write_all(&answer).await.map_err(io("activator"))?;
    down.write_all(&rest).await.map_err(io("activator"))?;
    let status = String::from_utf8_lossy(&answer);
    if !status.starts_with("HTTP/1.1 101") {
        return Err(TapError::Refused(
            status.lines().next().unwrap_or_default().into(),
        ));
    }
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let back = tokio::io::copy(&mut up_r, &mut down_w);
    let forth = async {
        let mut reader = Some(FrameReader::default());
        let mut buf = vec![0u8; 64 << 10];
        let mut pending = early;
        loop {
            if !pending.is_empty() {
                let received = Instant::now();
                // Forwarded first: the bridge's own work never delays a stat.
                up_w.write_all(&pending).await.map_err(io("autoscaler"))?;
                inspect(&mut reader, &pending, received, sink);
            }
            let n = down_r.read(&mut buf).await.map_err(io("activator"))?;
            if n == 0 {
                return Ok::<(), TapError>(());
            }
            pending = buf[..n].to_vec();
        }
    };
    tokio::select! {
        r = back => r.map(|_| ()).map_err(io("autoscaler → activator")),
        r = forth => r,
    }
}

/// Decodes the stat messages in `bytes`; a stream it cannot read is no
/// longer inspected (and still forwarded).
fn inspect(reader: &mut Option<FrameReader>, bytes: &[u8], received: Instant, sink: &dyn StatSink) {
    let Some(r) = reader else { return };
    match r.push(bytes) {
        Ok(messages) => {
            for m in messages {
                let Message::Binary(payload) = m else {
                    continue;
                };
                match WireStatMessages::decode(payload.as_slice()) {
                    Ok(stats) => sink.stats(stats, received),
                    Err(err) => debug!(error = %err, "stat tap: not a WireStatMessages"),
                }
            }
        }
        Err(err) => {
            warn!(error = %err, "stat tap: stops reading this connection (still forwarding it)");
            *reader = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_name_a_host_and_port() {
        assert_eq!(
            upstream_addr("ws://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            upstream_addr("ws://ste-autoscaler-direct.knative-serving.svc:8080").unwrap(),
            "ste-autoscaler-direct.knative-serving.svc:8080"
        );
        assert_eq!(upstream_addr("ws://autoscaler").unwrap(), "autoscaler:80");
        for bad in ["http://a:1", "ws://", "ws://a:port", "ws://:80/"] {
            assert!(upstream_addr(bad).is_err(), "{bad}");
        }
    }
}
