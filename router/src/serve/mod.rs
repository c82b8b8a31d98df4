//! The router's gRPC server: etcd's services (tonic's generated code, in
//! `api/`) on hyper's HTTP/2 server connections, one task per connection.
//!
//! Why not `tonic::transport::Server`: it runs every call as a task of its
//! own (hyper's tokio executor) and routes through axum. At saturation the
//! profile in docs/benchmarks.md ("Where the router's CPU goes") put 27 %
//! of the router's CPU in those per-call tasks and a third in the
//! connection task waking them and being woken back. Here, by default
//! ([`RequestTasks::Inline`]), a connection's calls run as futures on the
//! connection's own task ([`inline`]): no spawn, no hand-off between
//! workers, the answer written in the same turn it was made. kube-apiserver
//! multiplexes its calls on one connection, so that connection's decoding
//! and encoding use one core at a time; `--request-tasks spawn` gives every
//! call its own task again, as tonic did, for a control plane where that
//! connection would be CPU-bound.

pub mod dispatch;
pub mod inline;

use std::convert::Infallible;
use std::fmt::Display;
use std::time::Duration;

use futures::{Stream, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;
use tracing::{debug, warn};

pub use dispatch::Services;

use crate::coalesce::{Coalesce, Cork};

/// What [`Services`] needs of its gRPC health server (tonic-health's
/// `HealthServer<impl Health>`, a type its crate does not name).
pub trait Health:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = BoxFuture<Response<Body>, Infallible>,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<H> Health for H where
    H: tower_service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<Response<Body>, Infallible>,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Where a connection's gRPC calls run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestTasks {
    /// On the connection's own task (no task per call).
    #[default]
    Inline,
    /// Each on a task of its own (tonic's way: calls of one connection on
    /// several cores at once, at the cost of a spawn and hand-offs per call).
    Spawn,
}

/// How connections are served.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    pub requests: RequestTasks,
    /// HTTP/2 PINGs to an idle client this often (a dead peer is dropped).
    pub keepalive: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            requests: RequestTasks::Inline,
            keepalive: Duration::from_secs(30),
        }
    }
}

/// How long a stopping server waits for its connections to finish the
/// calls in flight before it drops them.
const DRAIN_WITHIN: Duration = Duration::from_secs(5);

/// Serves `services` on every connection `incoming` yields until `stop` is
/// cancelled; then finishes the calls in flight (at most
/// [`DRAIN_WITHIN`]) and returns. A failed accept is logged and skipped.
pub async fn serve<I, IO, E, H>(
    incoming: I,
    services: Services<H>,
    options: ServeOptions,
    stop: CancellationToken,
) where
    I: Stream<Item = Result<IO, E>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Display,
    H: Health,
{
    let mut incoming = std::pin::pin!(incoming);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = incoming.next() => match accepted {
                Some(Ok(io)) => {
                    connections.spawn(connection(io, services.clone(), options, stop.clone()));
                }
                Some(Err(e)) => warn!(error = %e, "accepting a gRPC connection failed"),
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let drained = tokio::time::timeout(DRAIN_WITHIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "gRPC connections still busy {DRAIN_WITHIN:?} after the stop: dropped"
        );
        connections.abort_all();
    }
}

/// One client connection, until it closes or `stop` is cancelled.
async fn connection<IO, H>(
    io: IO,
    services: Services<H>,
    options: ServeOptions,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Health,
{
    let cork = Cork::default();
    let io = TokioIo::new(Coalesce::corked(io, cork.clone()));
    let ended = match options.requests {
        RequestTasks::Inline => {
            let streams = inline::Inline::default();
            let connection = builder(streams.clone(), options).serve_connection(io, services);
            inline::drive(connection, streams, stop, cork).await
        }
        RequestTasks::Spawn => {
            let connection = builder(TokioExecutor::new(), options).serve_connection(io, services);
            inline::drive(connection, inline::Inline::default(), stop, cork).await
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "a gRPC connection ended");
    }
}

fn builder<E>(executor: E, options: ServeOptions) -> http2::Builder<E> {
    let mut b = http2::Builder::new(executor);
    b.timer(TokioTimer::new())
        .keep_alive_interval(options.keepalive)
        .keep_alive_timeout(Duration::from_secs(20));
    b
}
