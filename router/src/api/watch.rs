//! etcd's Watch service, fed from the router's event history.
//!
//! One loop per stream serves all of its watches in turn: each pass delivers,
//! for every watch, the events up to the published revision P, and only then
//! answers progress requests with P. So a progress notification with P always
//! follows every event ≤ P on that stream, as kube-apiserver requires.
//!
//! The loop has no task of its own: it runs when the stream's answers are
//! polled ([`Answers`]), i.e. on the connection's task (`serve/inline.rs`).
//! A published revision then wakes that task directly, which builds the
//! events and writes them in one turn; with a task per stream, each event
//! woke the stream's task, which woke the connection's — one more sleep and
//! wake-up per event, the cost that dominates when pods change one at a time.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::{event::EventType, Event};
use ste_etcd_proto::pb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::error::StoreError;
use crate::history::{key_in_range, StoredEvent};
use crate::store::Store;

/// Events per response; a revision is never split across responses.
const MAX_EVENTS_PER_RESPONSE: usize = 1000;

pub struct WatchService {
    pub store: Arc<Store>,
    /// How often watches that asked for progress_notify get one (etcd: 10 minutes).
    pub progress_interval: Duration,
}

struct Watcher {
    key: Bytes,
    range_end: Bytes,
    /// The next revision this watcher has not yet been sent.
    next: i64,
    prev_kv: bool,
    progress_notify: bool,
    no_put: bool,
    no_delete: bool,
}

impl Watcher {
    fn matches(&self, event: &StoredEvent) -> bool {
        if !key_in_range(event.key(), &self.key, &self.range_end) {
            return false;
        }
        let is_put = event.event.r#type == EventType::Put as i32;
        !(is_put && self.no_put || !is_put && self.no_delete)
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Answers;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
        let stream = WatchStream {
            store: self.store.clone(),
            tx,
            watchers: BTreeMap::new(),
            next_id: 0,
            progress_requested: false,
        };
        Ok(Response::new(Answers {
            serve: Some(Box::pin(
                stream.run(request.into_inner(), self.progress_interval),
            )),
            rx,
        }))
    }
}

/// Answers a stream's loop may queue before it waits for them to be taken:
/// small, so that a watch catching up on many events yields the connection's
/// task to its other calls every few answers.
const ANSWERS_QUEUED: usize = 8;

/// A watch stream's answers. Polling it runs the stream's loop until the loop
/// waits (for a request, a published revision, the progress ticker or room
/// for answers) and hands out what the loop queued. Dropping it (the client
/// went away) drops the loop.
pub struct Answers {
    serve: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    rx: mpsc::Receiver<Result<WatchResponse, Status>>,
}

impl Stream for Answers {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Queued answers first: the loop runs again once they are taken.
        if let Poll::Ready(Some(answer)) = self.rx.poll_recv(cx) {
            return Poll::Ready(Some(answer));
        }
        if let Some(serve) = self.serve.as_mut() {
            if serve.as_mut().poll(cx).is_ready() {
                // The loop is done and its sender dropped: the queue ends the stream.
                self.serve = None;
            }
        }
        self.rx.poll_recv(cx)
    }
}

struct WatchStream {
    store: Arc<Store>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    progress_requested: bool,
}

/// The client went away; stop serving the stream.
struct Gone;

impl Drop for WatchStream {
    /// However the stream ends (the loop returns, or the client goes away and
    /// the loop is dropped mid-wait), its watchers stop counting.
    fn drop(&mut self) {
        self.store
            .metrics()
            .watchers
            .dec_by(self.watchers.len() as i64);
    }
}

impl WatchStream {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, progress_interval: Duration) {
        let mut published = self.store.sequencer().subscribe();
        let closing = self.store.closing();
        let mut ticker = tokio::time::interval(progress_interval);
        ticker.tick().await;
        let _ = self
            .serve(&mut inbound, &mut published, &closing, &mut ticker)
            .await;
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<WatchRequest>,
        published: &mut tokio::sync::watch::Receiver<i64>,
        closing: &CancellationToken,
        ticker: &mut tokio::time::Interval,
    ) -> Result<(), Gone> {
        loop {
            let current = *published.borrow_and_update();
            self.deliver(current).await?;
            if self.progress_requested {
                self.progress_requested = false;
                // etcd ≥ 3.5.13 answers RequestProgress with watch id -1.
                self.send(self.response(current, -1)).await?;
            }
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.handle(request, current).await?,
                    _ => return Ok(()),
                },
                _ = published.changed() => {}
                _ = ticker.tick() => {
                    let ids: Vec<i64> = self.watchers.iter()
                        .filter(|(_, w)| w.progress_notify)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        self.send(self.response(current, id)).await?;
                    }
                }
                _ = closing.cancelled() => {
                    // A clean error the client resumes from (it re-watches from its last revision).
                    let _ = self.tx.send(Err(Status::unavailable("ste-router is shutting down"))).await;
                    return Err(Gone);
                }
            }
        }
    }

    fn response(&self, revision: i64, watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: Some(self.store.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn send(&self, response: WatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(response)).await.map_err(|_| Gone)
    }

    async fn handle(&mut self, request: WatchRequest, current: i64) -> Result<(), Gone> {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create, current).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    self.store.metrics().watchers.dec();
                    let mut response = self.response(current, cancel.watch_id);
                    response.canceled = true;
                    self.send(response).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_requested = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, create: WatchCreateRequest, current: i64) -> Result<(), Gone> {
        let id = if create.watch_id != 0 {
            if self.watchers.contains_key(&create.watch_id) {
                let mut response = self.response(current, create.watch_id);
                response.created = true;
                response.canceled = true;
                response.cancel_reason =
                    "mvcc: duplicate watch ID provided on the WatchStream".into();
                return self.send(response).await;
            }
            create.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let mut created = self.response(current, id);
        created.created = true;
        self.send(created).await?;

        let compact_revision = self.store.history().compact_revision();
        if create.start_revision != 0 && create.start_revision < compact_revision {
            let mut response = self.response(current, id);
            response.canceled = true;
            response.compact_revision = compact_revision;
            response.cancel_reason = StoreError::Compacted.to_string();
            return self.send(response).await;
        }
        let filters = |f: FilterType| create.filters.contains(&(f as i32));
        self.watchers.insert(
            id,
            Watcher {
                next: if create.start_revision == 0 {
                    current + 1
                } else {
                    create.start_revision
                },
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                key: create.key,
                range_end: create.range_end,
                prev_kv: create.prev_kv,
                progress_notify: create.progress_notify,
            },
        );
        self.store.metrics().watchers.inc();
        Ok(())
    }

    /// Sends every watcher the events it has not seen, up to `current`.
    async fn deliver(&mut self, current: i64) -> Result<(), Gone> {
        let mut compacted = Vec::new();
        let mut batches = Vec::new();
        for (id, watcher) in self.watchers.iter_mut() {
            if watcher.next > current {
                continue;
            }
            match self
                .store
                .history()
                .read(watcher.next, current, |e| watcher.matches(e))
            {
                Ok(events) => {
                    watcher.next = current + 1;
                    if !events.is_empty() {
                        batches.push((*id, watcher.prev_kv, events));
                    }
                }
                // The watcher fell behind the retention window.
                Err(_) => compacted.push(*id),
            }
        }
        let compact_revision = self.store.history().compact_revision();
        for (id, prev_kv, events) in batches {
            for chunk in chunk_by_revision(&events, MAX_EVENTS_PER_RESPONSE) {
                let mut response = self.response(current, id);
                response.events = chunk
                    .iter()
                    .map(|e| client_event(e, prev_kv, compact_revision))
                    .collect();
                self.send(response).await?;
            }
        }
        for id in compacted {
            self.watchers.remove(&id);
            self.store.metrics().watchers.dec();
            let mut response = self.response(current, id);
            response.canceled = true;
            response.compact_revision = self.store.history().compact_revision();
            response.cancel_reason = StoreError::Compacted.to_string();
            self.send(response).await?;
        }
        Ok(())
    }
}

/// The event as the watcher asked for it. Like etcd, which reads the previous
/// value at revision - 1, an event at or below the compaction revision has no
/// previous value any more.
fn client_event(stored: &StoredEvent, with_prev: bool, compact_revision: i64) -> Event {
    let mut event = stored.event.clone();
    if !with_prev || stored.revision <= compact_revision {
        event.prev_kv = None;
    }
    event
}

/// Splits events into chunks of about `max` events, never inside one revision.
fn chunk_by_revision(events: &[Arc<StoredEvent>], max: usize) -> Vec<&[Arc<StoredEvent>]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let mut end = (start + max).min(events.len());
        while end < events.len() && events[end].revision == events[end - 1].revision {
            end += 1;
        }
        chunks.push(&events[start..end]);
        start = end;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::FutureExt;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::metrics::Metrics;
    use crate::shard::memory::{self, MemoryShard};
    use crate::store::StoreConfig;

    #[tokio::test]
    async fn answers_run_the_loop_when_polled_and_end_with_it() {
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        let serve = async move {
            // More answers than the queue holds: the loop must wait for room.
            for id in 0..3 * ANSWERS_QUEUED as i64 {
                tx.send(Ok(WatchResponse {
                    watch_id: id,
                    ..Default::default()
                }))
                .await
                .expect("answers still taken");
                counter.fetch_add(1, Ordering::SeqCst);
            }
        };
        let answers = Answers {
            serve: Some(Box::pin(serve)),
            rx,
        };
        tokio::task::yield_now().await;
        assert_eq!(sent.load(Ordering::SeqCst), 0, "no task runs the loop");
        let ids: Vec<i64> = answers.map(|a| a.unwrap().watch_id).collect().await;
        assert_eq!(ids, (0..3 * ANSWERS_QUEUED as i64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_client_gone_mid_wait_takes_its_watchers_off_the_gauge() {
        let shards = BTreeMap::from([("s0".to_string(), MemoryShard::new())]);
        let store = Store::open_with(
            StoreConfig::default(),
            &[memory::spec("s0")],
            Arc::new(Metrics::default()),
            memory::connector(&shards),
        )
        .await
        .expect("store opens on a memory shard");
        let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
        let mut stream = WatchStream {
            store: store.clone(),
            tx,
            watchers: BTreeMap::new(),
            next_id: 0,
            progress_requested: false,
        };
        for id in 0..2 {
            stream.watchers.insert(
                id,
                Watcher {
                    key: Bytes::from_static(b"/registry/pods/"),
                    range_end: Bytes::from_static(b"/registry/pods0"),
                    next: 1,
                    prev_kv: false,
                    progress_notify: false,
                    no_put: false,
                    no_delete: false,
                },
            );
            store.metrics().watchers.inc();
        }
        // The loop holds the stream and waits, as it waits for a revision.
        let serve = async move {
            let _stream = stream;
            std::future::pending::<()>().await
        };
        let mut answers = Answers {
            serve: Some(Box::pin(serve)),
            rx,
        };
        // One poll: the loop runs, waits, and has nothing to hand out.
        assert!(
            answers.next().now_or_never().is_none(),
            "a waiting loop yields nothing"
        );
        assert_eq!(store.metrics().watchers.get(), 2);
        drop(answers);
        assert_eq!(store.metrics().watchers.get(), 0);
    }

    #[test]
    fn chunks_never_split_a_revision() {
        let events: Vec<Arc<StoredEvent>> = [1, 2, 2, 2, 3, 4]
            .iter()
            .map(|g| StoredEvent::test_put(b"k", *g))
            .collect();
        let sizes: Vec<usize> = chunk_by_revision(&events, 2)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, vec![4, 2]);
        assert!(chunk_by_revision(&[], 2).is_empty());
    }

    #[test]
    fn watcher_ranges_follow_etcd() {
        let watcher = |key: &'static [u8], end: &'static [u8]| Watcher {
            key: Bytes::from_static(key),
            range_end: Bytes::from_static(end),
            next: 0,
            prev_kv: false,
            progress_notify: false,
            no_put: false,
            no_delete: false,
        };
        let event = StoredEvent::test_put(b"b", 1);
        assert!(watcher(b"b", b"").matches(&event));
        assert!(!watcher(b"a", b"").matches(&event));
        assert!(watcher(b"a", b"c").matches(&event));
        assert!(!watcher(b"a", b"b").matches(&event));
        assert!(watcher(b"a", &[0]).matches(&event));
        let mut no_put = watcher(b"b", b"");
        no_put.no_put = true;
        assert!(!no_put.matches(&event));
    }
}
