//! Running a connection's request streams on the connection's own task.
//!
//! hyper's HTTP/2 server hands every new stream (one gRPC call) to an
//! executor; with tokio's, each call is a task of its own: a spawn, a
//! wake-up on whichever worker picks it, and a wake-up of the connection
//! task for every frame it answers. [`Inline`] is an executor that keeps
//! the streams in the connection's task instead: [`drive`] polls the
//! connection and its streams together, so a unary call is decoded,
//! handled and answered without leaving the task that read it.

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::coalesce::Cork;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An executor whose futures run in [`drive`], on the caller's task.
#[derive(Clone, Default)]
pub struct Inline {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Streams handed over since [`drive`] last looked.
    queue: Mutex<Vec<Stream>>,
    /// The task running [`drive`] (hyper calls `execute` from inside the
    /// connection's poll, so this is only a safety net).
    waker: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        // A handler that panics ends its own stream (dropped: hyper resets
        // it), not the connection with every other call on it.
        let stream = AssertUnwindSafe(stream).catch_unwind().map(|r| {
            if r.is_err() {
                warn!("a gRPC call's handler panicked; its stream was reset");
            }
        });
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::pin(stream));
        self.shared.waker.wake();
    }
}

impl Inline {
    fn take(&self, into: &mut FuturesUnordered<Stream>) -> bool {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let any = !queue.is_empty();
        into.extend(queue.drain(..));
        any
    }
}

/// What [`drive`] needs of a connection: a future that can be told to
/// finish its streams and stop (hyper's `graceful_shutdown`).
pub trait Connection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> Connection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// Runs `connection`, whose executor is `streams`, with the streams it
/// starts, until it ends; once `stop` is cancelled it finishes the calls in
/// flight, takes no new ones and ends. `cork` is the one of the
/// connection's socket ([`Coalesce::corked`]): held while the connection
/// and its streams are polled, so that what a turn answers (a watch event,
/// a Txn's answer) leaves in one write, made by a last poll of the turn.
///
/// [`Coalesce::corked`]: crate::coalesce::Coalesce::corked
pub async fn drive<C: Connection>(
    connection: C,
    streams: Inline,
    stop: CancellationToken,
    cork: Cork,
) -> C::Output {
    let mut connection = pin!(connection);
    let mut stopped = pin!(stop.cancelled_owned());
    let mut stopping = false;
    let mut running: FuturesUnordered<Stream> = FuturesUnordered::new();
    poll_fn(|cx| {
        streams.shared.waker.register(cx.waker());
        if !stopping && stopped.as_mut().poll(cx).is_ready() {
            stopping = true;
            connection.as_mut().graceful_shutdown();
        }
        cork.hold();
        // The connection, then the streams, twice: what the streams answer
        // is handed to the connection in the same turn, without a wake-up
        // of this task in between.
        let mut progressed = false;
        for _ in 0..2 {
            if let Poll::Ready(done) = connection.as_mut().poll(cx) {
                cork.release();
                return Poll::Ready(done);
            }
            progressed = streams.take(&mut running);
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        // One last poll writes what the turn put off, in one write.
        if cork.release() || progressed {
            if let Poll::Ready(done) = connection.as_mut().poll(cx) {
                return Poll::Ready(done);
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalesce::{testing::Recorder, Coalesce};
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWrite;

    /// A stand-in connection: starts `n` streams on its first poll, each
    /// counting `done` when run; ends once they all ran.
    struct Fake {
        exec: Inline,
        n: usize,
        started: bool,
        done: Arc<AtomicUsize>,
        shutdown: bool,
    }

    impl Future for Fake {
        type Output = (usize, bool);
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
            if !self.started {
                self.started = true;
                for i in 0..self.n {
                    let done = self.done.clone();
                    let waker = cx.waker().clone();
                    self.exec.execute(async move {
                        if i == 0 {
                            panic!("one handler panics");
                        }
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                        waker.wake();
                    });
                }
            }
            let done = self.done.load(Ordering::SeqCst);
            if done + 1 == self.n || self.shutdown {
                Poll::Ready((done, self.shutdown))
            } else {
                Poll::Pending
            }
        }
    }

    impl Connection for Fake {
        fn graceful_shutdown(mut self: Pin<&mut Self>) {
            self.shutdown = true;
        }
    }

    #[tokio::test]
    async fn streams_run_on_the_driving_task_and_a_panic_ends_only_its_own() {
        let exec = Inline::default();
        let fake = Fake {
            exec: exec.clone(),
            n: 5,
            started: false,
            done: Arc::default(),
            shutdown: false,
        };
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            drive(fake, exec, CancellationToken::new(), Cork::default()),
        )
        .await
        .expect("the streams ran");
        assert_eq!(out, (4, false));
    }

    /// A connection writing through a corked socket: one frame per poll,
    /// each flushed at once; it starts one stream on its first poll and
    /// ends as soon as anything reached the socket.
    struct Writer {
        io: Coalesce<Recorder>,
        exec: Inline,
        polls: usize,
    }

    impl Future for Writer {
        type Output = Vec<Vec<u8>>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
            self.polls += 1;
            if self.polls == 1 {
                self.exec.execute(async {});
            }
            let frame = format!("frame{};", self.polls);
            let io = Pin::new(&mut self.io);
            assert!(matches!(
                io.poll_write(cx, frame.as_bytes()),
                Poll::Ready(Ok(_))
            ));
            let io = Pin::new(&mut self.io);
            assert!(matches!(io.poll_flush(cx), Poll::Ready(Ok(()))));
            match self.io.socket().writes.is_empty() {
                true => Poll::Pending,
                false => Poll::Ready(self.io.socket().writes.clone()),
            }
        }
    }

    impl Connection for Writer {
        fn graceful_shutdown(self: Pin<&mut Self>) {}
    }

    #[tokio::test]
    async fn what_a_turn_writes_leaves_in_one_write_by_its_last_poll() {
        let exec = Inline::default();
        let cork = Cork::default();
        let writer = Writer {
            io: Coalesce::corked(Recorder::default(), cork.clone()),
            exec: exec.clone(),
            polls: 0,
        };
        let writes = drive(writer, exec, CancellationToken::new(), cork)
            .now_or_never()
            .expect("done within the first turn");
        // Polled for the stream it started, then once more uncorked.
        assert_eq!(writes, vec![b"frame1;frame2;frame3;".to_vec()]);
    }

    #[tokio::test]
    async fn a_cancelled_token_shuts_the_connection_down() {
        let exec = Inline::default();
        let stop = CancellationToken::new();
        stop.cancel();
        let fake = Fake {
            exec: exec.clone(),
            n: 0,
            started: true,
            done: Arc::default(),
            shutdown: false,
        };
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            drive(fake, exec, stop, Cork::default()),
        )
        .await
        .expect("shut down");
        assert_eq!(out, (0, true));
    }
}
