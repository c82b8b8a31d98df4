//! Fewer socket writes: what an HTTP/2 connection writes in one turn of
//! its task goes out in one `write`, and a gRPC-Go peer's bandwidth probes
//! are answered late, with other bytes, instead of at once in a write of
//! their own.
//!
//! Why (docs/benchmarks.md, "Socket writes per pod write" and "What wakes
//! the router at a churn rate"): h2 flushes before it buffers a frame
//! after a DATA frame of 256 bytes or more, so a watch event (a pod is 1–4
//! KiB) and the Txn answer made in the same turn left in two writes, and
//! each write to a loopback socket wakes the reader again. And gRPC-Go
//! (etcd's server, kube-apiserver's client) runs a BDP estimator: it sends
//! a PING with the first DATA it receives after its last probe was
//! answered, and stops only once its estimate reaches 16 MiB, which small
//! messages never do. Answered at once, that is a PING per answer or
//! watch event the router writes: 41 % of what the router read from
//! kube-apiserver at a churn rate was nothing else, each read a wake-up.
//!
//! [`Coalesce`] copies what is written into its own buffer and writes it
//! on flush, except:
//! - while its [`Cork`] is held (the server's connection task holds it
//!   while it polls the connection and its calls, and releases it for one
//!   last poll of the turn, which writes everything in one go);
//! - ACKs of gRPC-Go's BDP PING are taken out of what is flushed and held
//!   until a flush with other bytes comes at least [`ACK_HOLD`] after the
//!   first was held, or after [`ACK_HOLD_BYTES`] more were written, or
//!   with a flush of [`ACK_NOW_FLUSH_BYTES`] or more; then they go out
//!   after those bytes, in the same write. The probe has no
//!   deadline: until its ACK arrives the peer sends no other probe, so it
//!   probes at most about once per [`ACK_HOLD`] instead of once per
//!   answer. Going after the bytes, not before, matters as much: the peer
//!   starts its next probe on the first DATA after the ACK. Under a bulk
//!   transfer (a LIST of many pods) every flush is large, so the probe is
//!   answered as often as before and gRPC-Go grows its window as fast
//!   (with the 1 MiB bound alone it stopped at about 2 MiB, and a 53 MB
//!   read took ~10 % longer). Any other PING (a keepalive) is answered at
//!   once.
//!
//! Apart from those ACKs nothing is reordered, and nothing is dropped: the
//! bytes go out in the order written. ACKs are only looked for in whole
//! frames that start where the last flush ended (h2 flushes only after
//! writing whole frames); after a write forced out mid-frame by a full
//! buffer, none is looked for until the next flush.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many bytes buffered, writes go out even under the cork.
const MAX_BUFFERED: usize = 256 * 1024;

/// An HTTP/2 frame header: 3 bytes of length, type, flags, stream id.
const FRAME_HEADER_LEN: usize = 9;

/// The ACK of gRPC-Go's BDP estimator PING (payload `bdpPing` in its
/// `internal/transport`), the only PING whose ACK may wait, as it goes on
/// the wire: length 8, type PING (6), flags ACK (1), stream 0, the payload.
const BDP_PING_ACK: [u8; 17] = [0, 0, 8, 6, 1, 0, 0, 0, 0, 2, 4, 16, 16, 9, 14, 7, 7];

/// How long a BDP PING's ACK may wait for a write to ride with.
pub const ACK_HOLD: Duration = Duration::from_millis(500);

/// Or how many bytes written meanwhile.
pub const ACK_HOLD_BYTES: usize = 1024 * 1024;

/// A flush this large is a bulk transfer (a long List answer, a burst of
/// events): held ACKs go out with it, so gRPC-Go probes as often as it
/// would and grows its window as fast.
pub const ACK_NOW_FLUSH_BYTES: usize = 16 * 1024;

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
    /// Where in `buf` the bytes not yet looked at for ACKs begin, at a
    /// frame boundary; `None` after a write cut a frame (see module docs).
    unscanned: Option<usize>,
    /// BDP PING ACKs taken out of the stream, waiting to go out.
    held: Option<HeldAcks>,
    hold: Duration,
    cork: Option<Cork>,
}

#[derive(Debug)]
struct HeldAcks {
    count: usize,
    /// When the first of them was taken out.
    since: Instant,
    /// Bytes written since then.
    bytes: usize,
}

impl<IO> Coalesce<IO> {
    /// Writes on every flush (but BDP PING ACKs wait for the next one).
    pub fn new(inner: IO) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
            unscanned: Some(0),
            held: None,
            hold: ACK_HOLD,
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

    #[cfg(test)]
    fn holding_acks_for(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// Takes the BDP PING ACKs out of the frames not yet looked at, and
    /// puts the held ones back at the end when they have waited enough and
    /// other bytes go out with them. The end of `buf` must be a frame
    /// boundary (it is when the connection flushes).
    fn hold_or_release_acks(&mut self) {
        let taken = match self.unscanned {
            Some(from) => take_bdp_ping_acks(&mut self.buf, from),
            None => 0,
        };
        if taken > 0 {
            let held = self.held.get_or_insert_with(|| HeldAcks {
                count: 0,
                since: Instant::now(),
                bytes: 0,
            });
            held.count += taken;
        }
        let unheld = self.buf.len() - self.unscanned.unwrap_or(self.sent);
        if let Some(held) = self.held.as_mut().filter(|_| unheld > 0) {
            held.bytes += unheld;
            let waited = held.since.elapsed() >= self.hold;
            let bulk = unheld >= ACK_NOW_FLUSH_BYTES || held.bytes >= ACK_HOLD_BYTES;
            if waited || bulk {
                self.release_acks();
            }
        }
        // Whatever the scan could not see (after a cut) is behind us now.
        self.unscanned = Some(self.buf.len());
    }

    /// Puts the held ACKs at the end of `buf`, which must be a frame boundary.
    fn release_acks(&mut self) {
        for _ in 0..self.held.take().map_or(0, |held| held.count) {
            self.buf.extend_from_slice(&BDP_PING_ACK);
        }
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
        self.unscanned = self.unscanned.map(|_| 0);
        Poll::Ready(Ok(()))
    }

    /// Room for more: a full buffer is written first, whatever the cork.
    /// It may end inside a frame, so no ACK is looked for until the next
    /// flush.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending().len() >= MAX_BUFFERED {
            self.unscanned = None;
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Takes every whole frame that is an ACK of gRPC-Go's BDP PING out of
/// `buf[from..]`, which starts at a frame boundary, keeping the rest in
/// order; returns how many it took.
fn take_bdp_ping_acks(buf: &mut Vec<u8>, from: usize) -> usize {
    let (mut read, mut kept, mut taken) = (from, from, 0);
    while let Some(header) = buf.get(read..read + FRAME_HEADER_LEN) {
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let end = read + FRAME_HEADER_LEN + len;
        if end > buf.len() {
            break;
        }
        if buf[read..end] == BDP_PING_ACK {
            taken += 1;
        } else {
            buf.copy_within(read..end, kept);
            kept += end - read;
        }
        read = end;
    }
    if taken > 0 {
        let tail = buf.len() - read;
        buf.copy_within(read.., kept);
        buf.truncate(kept + tail);
    }
    taken
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
        if self.pending().is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(cork) = self.cork.as_ref().filter(|c| c.held()) {
            cork.owe();
            return Poll::Ready(Ok(()));
        }
        self.hold_or_release_acks();
        if self.pending().is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Writes what is buffered, then the held ACKs if the stream is at a
    /// frame boundary (it is when the last thing done was a flush).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unscanned == Some(self.buf.len()) {
            self.release_acks();
            self.unscanned = Some(self.buf.len());
        }
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

    /// A DATA frame on stream 1 with `len` bytes of `fill`.
    fn data_frame(len: usize, fill: u8) -> Vec<u8> {
        let n = u32::try_from(len).unwrap().to_be_bytes();
        let mut frame = vec![n[1], n[2], n[3], 0, 0, 0, 0, 0, 1];
        frame.resize(FRAME_HEADER_LEN + len, fill);
        frame
    }

    /// A socket that was asked to write a BDP PING's ACK, and flushed.
    async fn holding_an_ack(hold: Duration) -> Coalesce<Recorder> {
        let mut io = Coalesce::new(Recorder::default()).holding_acks_for(hold);
        io.write_all(&BDP_PING_ACK).await.unwrap();
        io.flush().await.unwrap();
        io
    }

    #[tokio::test]
    async fn a_bdp_ping_ack_rides_after_the_next_write_once_it_has_waited() {
        let mut io = holding_an_ack(Duration::ZERO).await;
        assert!(io.inner.writes.is_empty(), "an ACK alone waits");
        let answer = data_frame(40, b'a');
        io.write_all(&answer).await.unwrap();
        io.flush().await.unwrap();
        let expected = [answer, BDP_PING_ACK.to_vec()].concat();
        assert_eq!(
            io.inner.writes,
            vec![expected],
            "after the answer, in one write: the peer counts the answer into its probe"
        );
    }

    #[tokio::test]
    async fn a_bdp_ping_ack_waits_out_its_hold_across_writes() {
        let mut io = holding_an_ack(Duration::from_secs(3600)).await;
        // Flushes under the bulk bound, until a mebibyte has gone out.
        let frame = data_frame(ACK_NOW_FLUSH_BYTES / 2, 3);
        let flushes = ACK_HOLD_BYTES.div_ceil(frame.len());
        for _ in 0..flushes {
            io.write_all(&frame).await.unwrap();
            io.flush().await.unwrap();
        }
        let (last, before) = io.inner.writes.split_last().unwrap();
        assert_eq!(before.len(), flushes - 1);
        assert!(
            before.iter().all(|w| *w == frame),
            "no write carried the ACK before its hold"
        );
        assert_eq!(
            last[..],
            [frame, BDP_PING_ACK.to_vec()].concat()[..],
            "enough bytes since let it go before its time"
        );
    }

    #[tokio::test]
    async fn a_large_flush_takes_the_held_ack_at_once() {
        let mut io = holding_an_ack(Duration::from_secs(3600)).await;
        let small = data_frame(ACK_NOW_FLUSH_BYTES - FRAME_HEADER_LEN - 1, 1);
        io.write_all(&small).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, vec![small], "a flush just under the bound");
        let large = data_frame(ACK_NOW_FLUSH_BYTES, 2);
        io.write_all(&large).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            io.inner.writes.last().unwrap()[..],
            [large, BDP_PING_ACK.to_vec()].concat()[..]
        );
    }

    #[tokio::test]
    async fn an_ack_among_other_frames_is_taken_out_and_the_rest_kept_in_order() {
        let mut io = Coalesce::new(Recorder::default()).holding_acks_for(Duration::ZERO);
        let (first, second) = (data_frame(20, 1), data_frame(30, 2));
        let written = [first.clone(), BDP_PING_ACK.to_vec(), second.clone()].concat();
        io.write_all(&written).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            io.inner.writes,
            vec![[first, second, BDP_PING_ACK.to_vec()].concat()]
        );
    }

    #[tokio::test]
    async fn after_a_write_cut_mid_frame_nothing_is_taken_for_an_ack() {
        let mut io = Coalesce::new(Recorder::default()).holding_acks_for(Duration::ZERO);
        // One DATA frame whose payload ends in bytes that look like an ACK,
        // written in two pieces, the first big enough to be forced out.
        let mut frame = data_frame(MAX_BUFFERED + BDP_PING_ACK.len(), 5);
        let at = frame.len() - BDP_PING_ACK.len();
        frame[at..].copy_from_slice(&BDP_PING_ACK);
        io.write_all(&frame[..at]).await.unwrap();
        io.write_all(&frame[at..]).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes.concat(), frame, "every byte, in order");
        io.write_all(&BDP_PING_ACK).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            io.inner.writes.concat(),
            frame,
            "after that flush ACKs are found again"
        );
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
    async fn shutdown_writes_the_held_acks() {
        let mut io = Coalesce::new(Recorder::default());
        io.write_all(&BDP_PING_ACK).await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.inner.writes, vec![BDP_PING_ACK.to_vec()]);
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
    fn only_whole_acks_of_the_bdp_probe_are_taken() {
        assert_eq!(
            BDP_PING_ACK[9..],
            [2, 4, 16, 16, 9, 14, 7, 7],
            "gRPC-Go's bdpPing"
        );
        let mut not_ack = BDP_PING_ACK.to_vec();
        not_ack[4] = 0; // a PING asking for an ACK
        let keepalive = ping_ack(*b"keepaliv");
        let data = data_frame(3, 9);
        let mut buf = [
            b"before".to_vec(),
            BDP_PING_ACK.to_vec(),
            not_ack.clone(),
            BDP_PING_ACK.to_vec(),
            keepalive.clone(),
            data.clone(),
            BDP_PING_ACK[..16].to_vec(),
        ]
        .concat();
        assert_eq!(take_bdp_ping_acks(&mut buf, 6), 2);
        let kept = [
            b"before".to_vec(),
            not_ack,
            keepalive,
            data,
            BDP_PING_ACK[..16].to_vec(),
        ];
        assert_eq!(
            buf,
            kept.concat(),
            "the rest, a partial frame too, in order"
        );
        let mut none = data_frame(10, 1);
        assert_eq!(take_bdp_ping_acks(&mut none, 0), 0);
        assert_eq!(none, data_frame(10, 1));
    }
}
