//! Fewer socket writes: what an HTTP/2 connection writes in one turn of
//! its task goes out in one `write`, and a gRPC-Go peer's bandwidth probes
//! are answered with the next write instead of a write of their own.
//!
//! Why (docs/benchmarks.md, "Socket writes per pod write"): h2 flushes
//! before it buffers a frame after a DATA frame of 256 bytes or more, so a
//! watch event (a pod is 1–4 KiB) and the Txn answer made in the same turn
//! left in two writes, and each write to a loopback socket wakes the
//! reader again. And gRPC-Go (etcd's server, kube-apiserver's client)
//! sends a BDP PING with the first DATA it receives after its last one was
//! answered: with one call at a time that is one PING per call, and h2
//! answered each at once, in a write of 17 bytes that woke the peer for
//! nothing else.
//!
//! [`Coalesce`] copies what is written into its own buffer and writes it
//! on flush, except:
//! - while its [`Cork`] is held (the server's connection task holds it
//!   while it polls the connection and its calls, and releases it for one
//!   last poll of the turn, which writes everything in one go);
//! - when all that is buffered is ACKs of gRPC-Go's BDP PING: those wait
//!   for the next write (or the end of the connection). The probe has no
//!   deadline; until its ACK arrives the peer just sends no other probe.
//!   Any other PING (a keepalive) is answered at once.
//!
//! Nothing is reordered or dropped: the bytes go out in the order written.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many bytes buffered, writes go out even under the cork.
const MAX_BUFFERED: usize = 256 * 1024;

/// The payload of gRPC-Go's BDP estimator PING (`bdpPing` in its
/// `internal/transport`): the only PING whose ACK may wait.
const BDP_PING_PAYLOAD: [u8; 8] = [2, 4, 16, 16, 9, 14, 7, 7];

/// An HTTP/2 frame header (9 bytes) and a PING's payload (8).
const PING_FRAME_LEN: usize = 17;

/// Held by a connection's task while it polls the connection several times
/// in one turn; see [`Cork::release`].
#[derive(Clone, Debug, Default)]
pub struct Cork(Arc<CorkState>);

#[derive(Debug, Default)]
struct CorkState {
    held: AtomicBool,
    /// A flush was asked for while held: bytes wait to be written.
    owed: AtomicBool,
}

impl Cork {
    pub fn hold(&self) {
        self.0.held.store(true, Ordering::Relaxed);
    }

    /// Lets flushes write again; true when one was put off meanwhile (the
    /// caller polls its connection once more, which flushes).
    pub fn release(&self) -> bool {
        self.0.held.store(false, Ordering::Relaxed);
        self.0.owed.swap(false, Ordering::Relaxed)
    }

    fn held(&self) -> bool {
        self.0.held.load(Ordering::Relaxed)
    }

    fn owe(&self) {
        self.0.owed.store(true, Ordering::Relaxed);
    }
}

/// A socket whose writes are gathered until a flush (see the module docs).
#[derive(Debug)]
pub struct Coalesce<IO> {
    inner: IO,
    buf: Vec<u8>,
    /// How much of `buf` is already written.
    sent: usize,
    cork: Option<Cork>,
}

impl<IO> Coalesce<IO> {
    /// Writes on every flush (but BDP PING ACKs wait for the next one).
    pub fn new(inner: IO) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
            cork: None,
        }
    }

    /// Puts flushes off while `cork` is held.
    pub fn corked(inner: IO, cork: Cork) -> Self {
        Coalesce {
            cork: Some(cork),
            ..Coalesce::new(inner)
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.sent..]
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Room for more: a full buffer is written first, whatever the cork.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending().len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// True when `bytes` is one or more ACKs of gRPC-Go's BDP PING, nothing else.
fn only_bdp_ping_acks(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len().is_multiple_of(PING_FRAME_LEN)
        && bytes.chunks(PING_FRAME_LEN).all(|frame| {
            let (head, payload) = frame.split_at(9);
            // length 8, type PING (6), flags ACK (1), stream 0
            head == [0, 0, 8, 6, 1, 0, 0, 0, 0] && payload == BDP_PING_PAYLOAD
        })
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        let mut n = 0;
        for slice in slices {
            self.buf.extend_from_slice(slice);
            n += slice.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending().is_empty() || only_bdp_ping_acks(self.pending()) {
            return Poll::Ready(Ok(()));
        }
        if let Some(cork) = self.cork.as_ref().filter(|c| c.held()) {
            cork.owe();
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A socket that records each write it is given; it takes at most
    /// `limit` bytes per write, and says Pending (waking at once) to every
    /// other write when `stutter` is set.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) writes: Vec<Vec<u8>>,
        pub(crate) limit: Option<usize>,
        pub(crate) stutter: bool,
        pub(crate) refused: bool,
        pub(crate) shut: bool,
    }

    impl<IO> Coalesce<IO> {
        pub(crate) fn socket(&self) -> &IO {
            &self.inner
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stutter && !self.refused {
                self.refused = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.refused = false;
            let n = self.limit.map_or(data.len(), |l| l.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Recorder;
    use super::*;
    use futures::FutureExt;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    fn ping_ack(payload: [u8; 8]) -> Vec<u8> {
        let mut frame = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
        frame.extend_from_slice(&payload);
        frame
    }

    fn flushed_now(io: &mut Coalesce<Recorder>) -> bool {
        poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx))
            .now_or_never()
            .is_some_and(|r| r.is_ok())
    }

    #[tokio::test]
    async fn writes_between_flushes_go_out_as_one() {
        let mut io = Coalesce::new(Recorder::default());
        io.write_all(b"headers").await.unwrap();
        let slices = [io::IoSlice::new(b"+data"), io::IoSlice::new(b"+more")];
        let n = io.write_vectored(&slices).await.unwrap();
        assert_eq!(n, 10, "every slice is taken at once");
        assert!(
            io.inner.writes.is_empty(),
            "nothing is written before a flush"
        );
        io.flush().await.unwrap();
        io.write_all(b"next").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            io.inner.writes,
            vec![b"headers+data+more".to_vec(), b"next".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_held_cork_puts_flushes_off_until_released() {
        let cork = Cork::default();
        let mut io = Coalesce::corked(Recorder::default(), cork.clone());
        cork.hold();
        io.write_all(b"event").await.unwrap();
        assert!(
            flushed_now(&mut io),
            "a flush under the cork returns at once"
        );
        io.write_all(b"answer").await.unwrap();
        assert!(flushed_now(&mut io));
        assert!(io.inner.writes.is_empty());
        assert!(cork.release(), "the release says a flush is owed");
        assert!(!cork.release(), "and only once");
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, vec![b"eventanswer".to_vec()]);
    }

    #[tokio::test]
    async fn a_bdp_ping_ack_waits_for_the_next_write() {
        let mut io = Coalesce::new(Recorder::default());
        let ack = ping_ack(BDP_PING_PAYLOAD);
        io.write_all(&ack).await.unwrap();
        io.flush().await.unwrap();
        assert!(io.inner.writes.is_empty(), "the probe's ACK waits");
        io.write_all(b"request").await.unwrap();
        io.flush().await.unwrap();
        let mut expected = ack.clone();
        expected.extend_from_slice(b"request");
        assert_eq!(io.inner.writes, vec![expected], "in order, in one write");
    }

    #[tokio::test]
    async fn a_keepalive_ping_ack_goes_out_at_once() {
        let mut io = Coalesce::new(Recorder::default());
        let ack = ping_ack(*b"keepaliv");
        io.write_all(&ack).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, vec![ack]);
    }

    #[tokio::test]
    async fn shutdown_writes_what_waits_first() {
        let mut io = Coalesce::new(Recorder::default());
        io.write_all(&ping_ack(BDP_PING_PAYLOAD)).await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.inner.writes, vec![ping_ack(BDP_PING_PAYLOAD)]);
        assert!(io.inner.shut);
    }

    #[tokio::test]
    async fn short_and_refused_writes_lose_and_reorder_nothing() {
        let inner = Recorder {
            limit: Some(3),
            stutter: true,
            ..Recorder::default()
        };
        let mut io = Coalesce::new(inner);
        io.write_all(b"0123456789").await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"abc").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes.concat(), b"0123456789abc".to_vec());
        assert!(io.inner.writes.iter().all(|w| w.len() <= 3));
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_even_under_the_cork() {
        let cork = Cork::default();
        let mut io = Coalesce::corked(Recorder::default(), cork.clone());
        cork.hold();
        let chunk = vec![7u8; MAX_BUFFERED];
        io.write_all(&chunk).await.unwrap();
        assert!(io.inner.writes.is_empty());
        io.write_all(b"x").await.unwrap();
        assert_eq!(
            io.inner.writes,
            vec![chunk],
            "the full buffer went out first"
        );
        assert!(flushed_now(&mut io));
        assert!(cork.release());
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes.last().unwrap(), b"x");
    }

    #[test]
    fn only_acks_of_the_bdp_probe_are_recognised() {
        let bdp = ping_ack(BDP_PING_PAYLOAD);
        assert!(only_bdp_ping_acks(&bdp));
        assert!(only_bdp_ping_acks(&[bdp.clone(), bdp.clone()].concat()));
        assert!(!only_bdp_ping_acks(&[]));
        assert!(!only_bdp_ping_acks(&bdp[..16]));
        let mut not_ack = bdp.clone();
        not_ack[4] = 0; // a PING asking for an ACK is not one
        assert!(!only_bdp_ping_acks(&not_ack));
        assert!(!only_bdp_ping_acks(&[bdp, b"more".to_vec()].concat()));
    }
}
