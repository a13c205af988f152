//! The object-store hand-off edge: the seed's original split design, kept to measure it. Each batch
//! becomes an object `_handoff/<stream>/<n>.tlw` (the [`super::wire`] format) in a store (a local
//! directory or S3); the next stage polls for the next number with a GET (a miss is a 404, counted like
//! any request), so the store itself is the queue and no other service is needed. An empty object ends
//! the stream.
//!
//! Each capture node has a pipeline of its own on this edge (the original design scaled by running one
//! per stream): its events under `_handoff/<node>/events`, its aggregators' flows under
//! `_handoff/<node>/flows/<shard>`, and the flows producers are named after the node, so several
//! nodes' pipelines share one output.
//!
//! This edge is for comparing topologies (`tcplake bench`). The store keeps every object, so a restarted
//! **sink** reads its streams again from the first object and skips what its output already holds
//! ([`CommittedEvents`], [`CommittedFlows`]); every commit records the hand-off's run (written by its
//! capture at start), so an output is never continued from another run's hand-off. A restarted
//! **producer** numbers its objects from 0 again: a capture is refused at once (its run is there),
//! and an object already there with other bytes stops any producer with an error naming it, rather
//! than its new data being dropped in favour of the old (an aggregator that computes the same
//! objects again goes on). For a split deployment whose every service resumes, use the broker edge.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::wire;
use super::{Ack, EdgeError, Finalized, Rx, Tx};
use crate::event::flow::WindowConfig;
use crate::event::{EventBatch, FlowBatch};
use crate::metrics::HandoffMetrics;
use crate::storage::Store;

/// How long a reader waits before asking again for an object that is not there yet.
const POLL: Duration = Duration::from_millis(20);

pub fn events_stream(node: &str) -> String {
    format!("_handoff/{node}/events")
}

pub fn flows_stream(node: &str, shard: u32) -> String {
    format!("_handoff/{node}/flows/{shard}")
}

/// The flows producer of aggregator `shard` of `node`'s pipeline: unique across nodes, so each
/// pipeline's commits to the shared `flows/` table are its own.
pub fn flows_producer(node: &str, shard: u32) -> String {
    format!("agg-{shard}-{node}")
}

/// Where a node's hand-off run says who it is.
fn run_key(node: &str) -> String {
    format!("_handoff/{node}/run")
}

/// Starts a node's hand-off run: its capture records a new run id (with `source`, what it records)
/// before its first object. A run already there is refused: a restarted capture would number its
/// objects from the first again. The sink records the id with every commit ([`run_of`]).
pub async fn start_run(
    store: &Store,
    node: &str,
    source: &str,
    metrics: &HandoffMetrics,
) -> Result<(), EdgeError> {
    let k = run_key(node);
    let body = format!("{} {source}", crate::storage::new_id());
    metrics.puts.add(1);
    let written = store
        .put_if_absent(&k, body.as_bytes())
        .await
        .map_err(store_err(&k))?;
    if !written {
        return Err(EdgeError::HandoffTaken {
            object: k,
            stream: events_stream(node),
        });
    }
    Ok(())
}

/// The run of a node's hand-off (waited for until its capture has started): what a sink records as
/// the source of what it commits, so that an output continued from another run's hand-off (a new
/// location, its objects and `seq`s numbered from the first again) is refused rather than its rows
/// skipped as already held.
pub async fn run_of(
    store: &Store,
    node: &str,
    metrics: &HandoffMetrics,
) -> Result<String, EdgeError> {
    let body = wait_for(store, &run_key(node), metrics).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// What a request for object `k` failed with.
fn store_err(k: &str) -> impl Fn(crate::storage::StoreError) -> EdgeError + '_ {
    move |source| EdgeError::Handoff {
        what: format!("object {k}"),
        source: Box::new(source),
    }
}

/// Object `k`, polled for until it is there (each GET counted, a miss too).
async fn wait_for(store: &Store, k: &str, metrics: &HandoffMetrics) -> Result<Vec<u8>, EdgeError> {
    loop {
        metrics.gets.add(1);
        match store.get(k).await.map_err(store_err(k))? {
            Some(bytes) => return Ok(bytes),
            None => {
                metrics.misses.add(1);
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

fn key(stream: &str, n: u64) -> String {
    format!("{stream}/{n:020}.tlw")
}

/// Items this edge can carry.
pub trait Handoff: Sized + Send + 'static {
    fn encode(&self) -> Vec<u8>;
    /// `n` is the object's number: the item's position on this edge.
    fn decode(bytes: &[u8], n: u64) -> Result<Self, wire::WireError>;
}

impl Handoff for Arc<EventBatch> {
    fn encode(&self) -> Vec<u8> {
        wire::encode_events(self, true)
    }
    fn decode(bytes: &[u8], n: u64) -> Result<Self, wire::WireError> {
        let mut b = wire::decode_events(bytes)?;
        b.position = n..n + 1;
        Ok(Arc::new(b))
    }
}

impl Handoff for FlowBatch {
    fn encode(&self) -> Vec<u8> {
        wire::encode_flows(self, true)
    }
    fn decode(bytes: &[u8], _n: u64) -> Result<Self, wire::WireError> {
        wire::decode_flows(bytes)
    }
}

/// Writes each item as the next numbered object.
pub struct ObjectTx<T> {
    store: Store,
    stream: String,
    next: u64,
    metrics: Arc<HandoffMetrics>,
    _items: PhantomData<fn(T)>,
}

impl<T> ObjectTx<T> {
    pub fn new(store: Store, stream: String, metrics: Arc<HandoffMetrics>) -> Self {
        ObjectTx {
            store,
            stream,
            next: 0,
            metrics,
            _items: PhantomData,
        }
    }

    async fn put(&mut self, body: Vec<u8>) -> Result<(), EdgeError> {
        let k = key(&self.stream, self.next);
        self.metrics.puts.add(1);
        self.metrics.bytes_written.add(body.len() as u64);
        let written = self
            .store
            .put_if_absent(&k, &body)
            .await
            .map_err(store_err(&k))?;
        if !written {
            // A producer restarted on a stream it wrote before. The same bytes (an aggregator
            // computing the same emission again) are harmless; other bytes are new data that the
            // readers would never see, since they read the old object.
            self.metrics.gets.add(1);
            let there = self.store.get(&k).await.map_err(store_err(&k))?;
            if there.as_deref() != Some(body.as_slice()) {
                return Err(EdgeError::HandoffTaken {
                    object: k,
                    stream: self.stream.clone(),
                });
            }
        }
        self.next += 1;
        Ok(())
    }
}

impl<T: Handoff + Sync> Tx<T> for ObjectTx<T> {
    async fn send(&mut self, item: T) -> Result<(), EdgeError> {
        let body = item.encode();
        self.put(body).await
    }

    async fn close(&mut self, end_of_stream: bool) -> Result<(), EdgeError> {
        if end_of_stream {
            self.put(Vec::new()).await?;
        }
        Ok(())
    }
}

/// How many aggregator shards of `node`'s pipeline write flows to the hand-off store, and with which
/// settings (with the producer that said them), learned from the data: the first object of shard 0
/// (waited for) says it; a shard 0 that ended without any batch leaves the count to the streams
/// present, and the settings unknown.
pub async fn shard_count(
    store: &Store,
    node: &str,
    metrics: &HandoffMetrics,
) -> Result<(u32, Option<(Arc<str>, WindowConfig)>), EdgeError> {
    let k = key(&flows_stream(node, 0), 0);
    let bytes = wait_for(store, &k, metrics).await?;
    if !bytes.is_empty() {
        let b = FlowBatch::decode(&bytes, 0).map_err(|source| EdgeError::HandoffDecode {
            what: format!("object {k}"),
            source: Box::new(source),
        })?;
        let windows = b.windows.map(|w| (Arc::clone(&b.producer), w));
        if b.shard_count > 0 {
            return Ok((b.shard_count, windows));
        }
    }
    let dirs = store
        .list_dirs(&format!("_handoff/{node}/flows/"))
        .await
        .map_err(|source| EdgeError::Handoff {
            what: "streams".into(),
            source: Box::new(source),
        })?;
    let n = dirs.iter().filter_map(|d| d.parse::<u32>().ok()).max();
    Ok((n.map_or(1, |m| m + 1), None))
}

/// Reads the numbered objects in order, polling for the next one.
pub struct ObjectRx<T> {
    store: Store,
    stream: String,
    next: u64,
    metrics: Arc<HandoffMetrics>,
    _items: PhantomData<fn() -> T>,
}

impl<T> ObjectRx<T> {
    pub fn new(store: Store, stream: String, metrics: Arc<HandoffMetrics>) -> Self {
        ObjectRx {
            store,
            stream,
            next: 0,
            metrics,
            _items: PhantomData,
        }
    }
}

impl<T: Handoff> Rx<T> for ObjectRx<T> {
    async fn recv(&mut self) -> Result<Option<T>, EdgeError> {
        let k = key(&self.stream, self.next);
        let bytes = wait_for(&self.store, &k, &self.metrics).await?;
        self.metrics.bytes_read.add(bytes.len() as u64);
        let n = self.next;
        self.next += 1;
        if bytes.is_empty() {
            return Ok(None);
        }
        T::decode(&bytes, n)
            .map(Some)
            .map_err(|source| EdgeError::HandoffDecode {
                what: format!("object {k}"),
                source: Box::new(source),
            })
    }
}

/// The events of a node's hand-off stream for its event-log sink, from the first object, without the
/// rows its output already holds (a restarted sink: every event with a `seq` below `next_seq`). Each
/// batch comes with an ack at its object number; releasing it (the sink does, once the batch's rows
/// are committed) moves [`CommittedEvents::through`] on, which is how far the flows sink may commit:
/// the aggregators' replay points count objects too.
pub struct CommittedEvents {
    rx: ObjectRx<Arc<EventBatch>>,
    next_seq: u64,
    through: Arc<watch::Sender<u64>>,
}

impl CommittedEvents {
    pub fn new(rx: ObjectRx<Arc<EventBatch>>, next_seq: u64) -> (Self, watch::Receiver<u64>) {
        let (through, after) = watch::channel(0);
        let me = CommittedEvents {
            rx,
            next_seq,
            through: Arc::new(through),
        };
        (me, after)
    }

    fn ack(&self, end: u64) -> Ack {
        let through = Arc::clone(&self.through);
        Ack::new(end, move || {
            Box::pin(async move {
                through.send_if_modified(|t| std::mem::replace(t, (*t).max(end)) < end);
            })
        })
    }
}

impl Rx<Finalized<Arc<EventBatch>>> for CommittedEvents {
    async fn recv(&mut self) -> Result<Option<Finalized<Arc<EventBatch>>>, EdgeError> {
        let Some(batch) = self.rx.recv().await? else {
            return Ok(None);
        };
        let ack = self.ack(batch.position.end);
        let (held, rest) = batch.unheld(self.next_seq);
        self.rx.metrics.rows_skipped.add(held as u64);
        Ok(Some(match rest {
            Some(rest) => Finalized::new(rest, ack),
            None => Finalized::acks(vec![ack]),
        }))
    }
}

/// An aggregator's flows on the hand-off for its flows sink, without the emissions its output already
/// holds (a restarted sink: every emission up to the last committed one). Emissions are whole objects
/// and are committed whole, in order. Every batch must say the settings the first one of the pipeline
/// that said them said (`windows`, shared by the shards' readers): one flows table holds one
/// projection.
pub struct CommittedFlows {
    rx: ObjectRx<FlowBatch>,
    committed: Option<u64>,
    windows: SharedWindows,
}

/// What the first batch that said its settings said, and who made it.
pub type SharedWindows = Arc<std::sync::Mutex<Option<(Arc<str>, WindowConfig)>>>;

impl CommittedFlows {
    pub fn new(rx: ObjectRx<FlowBatch>, committed: Option<u64>, windows: SharedWindows) -> Self {
        CommittedFlows {
            rx,
            committed,
            windows,
        }
    }
}

impl Rx<FlowBatch> for CommittedFlows {
    async fn recv(&mut self) -> Result<Option<FlowBatch>, EdgeError> {
        loop {
            let got = self.rx.recv().await?;
            if let Some(b) = &got {
                let mut known = self.windows.lock().unwrap_or_else(|e| e.into_inner());
                super::check_windows(&mut known, b)?;
                if self.committed.is_some_and(|c| b.seq <= c) {
                    continue;
                }
            }
            return Ok(got);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalDir;

    #[tokio::test]
    async fn objects_arrive_in_order_and_the_empty_one_ends_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let m = Arc::new(HandoffMetrics::default());
        let mut tx: ObjectTx<Arc<EventBatch>> =
            ObjectTx::new(store.clone(), events_stream("n"), Arc::clone(&m));
        let mut rx: ObjectRx<Arc<EventBatch>> =
            ObjectRx::new(store, events_stream("n"), Arc::clone(&m));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(b) = rx.recv().await.unwrap() {
                got.push((b.position.clone(), b.events.len()));
            }
            got
        });
        for n in 1..=3 {
            let b = EventBatch::new("n".into(), Vec::new(), Some(n));
            tx.send(Arc::new(b)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tx.close(true).await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got, vec![(0..1, 0), (1..2, 0), (2..3, 0)]);
        assert_eq!(m.puts.get(), 4);
        assert!(m.misses.get() >= 1, "the reader polled ahead of the writer");
    }

    #[tokio::test]
    async fn a_restarted_sink_gets_only_what_its_output_lacks_and_hears_how_far_events_are_committed(
    ) {
        use crate::event::{Event, EventKind};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let m = Arc::new(HandoffMetrics::default());
        let mut tx: ObjectTx<Arc<EventBatch>> =
            ObjectTx::new(store.clone(), events_stream("n"), Arc::clone(&m));
        for first in [0u64, 4, 8] {
            let events = (first..first + 4)
                .map(|s| Event::sample(s, s as i64, EventKind::BytesSent { bytes: 1 }))
                .collect();
            tx.send(Arc::new(EventBatch::new("n".into(), events, None)))
                .await
                .unwrap();
        }
        tx.close(true).await.unwrap();
        // The output holds events up to seq 5: the first batch is all held, the second half.
        let (mut rx, mut through) =
            CommittedEvents::new(ObjectRx::new(store, events_stream("n"), Arc::clone(&m)), 6);
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await.unwrap() {
            let seqs: Vec<u64> = f
                .item
                .iter()
                .flat_map(|b| b.events.iter().map(|e| e.seq))
                .collect();
            got.push((seqs, f.acks.iter().map(Ack::position).collect::<Vec<_>>()));
            for a in f.acks {
                a.release().await;
            }
            assert!(through.has_changed().unwrap());
            through.mark_unchanged();
        }
        assert_eq!(
            got,
            vec![
                (vec![], vec![1]),
                (vec![6, 7], vec![2]),
                (vec![8, 9, 10, 11], vec![3]),
            ]
        );
        assert_eq!(
            *through.borrow(),
            3,
            "events committed through the third object"
        );
        assert_eq!(m.rows_skipped.get(), 6);
    }

    #[tokio::test]
    async fn a_producer_writing_other_bytes_over_an_object_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let m = Arc::new(HandoffMetrics::default());
        let batch = |clock| Arc::new(EventBatch::new("n".into(), Vec::new(), Some(clock)));
        let mut first: ObjectTx<Arc<EventBatch>> =
            ObjectTx::new(store.clone(), events_stream("n"), Arc::clone(&m));
        first.send(batch(1)).await.unwrap();
        first.send(batch(2)).await.unwrap();
        // The same bytes again (a deterministic producer rerun) are fine; other bytes are not.
        let mut again: ObjectTx<Arc<EventBatch>> =
            ObjectTx::new(store, events_stream("n"), Arc::clone(&m));
        again.send(batch(1)).await.unwrap();
        match again.send(batch(3)).await {
            Err(EdgeError::HandoffTaken { object, .. }) => {
                assert!(object.ends_with("00000000000000000001.tlw"), "{object}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn flows_made_with_other_settings_than_the_pipelines_first_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let m = Arc::new(HandoffMetrics::default());
        let mut tx: ObjectTx<FlowBatch> =
            ObjectTx::new(store.clone(), flows_stream("n", 1), Arc::clone(&m));
        let w = |secs: i64| WindowConfig {
            window_us: secs * 1_000_000,
            allowed_lateness_us: 5_000_000,
            horizon_us: 60_000_000,
        };
        for (seq, windows) in [(0, Some(w(10))), (1, None), (2, Some(w(5)))] {
            let b = FlowBatch {
                producer: "agg-1-n".into(),
                seq,
                records: Vec::new(),
                first_row: 0,
                total_rows: 0,
                replay: Default::default(),
                replay_before: None,
                shard_count: 2,
                windows,
            };
            tx.send(b).await.unwrap();
        }
        // Shard 0's first batch said 10 s windows; a batch of an older build says nothing.
        let known = Some((Arc::from("agg-0-n"), w(10)));
        let rx = ObjectRx::new(store, flows_stream("n", 1), Arc::clone(&m));
        let mut rx = CommittedFlows::new(rx, None, Arc::new(std::sync::Mutex::new(known)));
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 0);
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 1);
        let err = rx.recv().await.unwrap_err().to_string();
        assert!(err.contains("`agg-1-n` with window 5 s"), "{err}");
        assert!(err.contains("`agg-0-n` with window 10 s"), "{err}");
    }
}
