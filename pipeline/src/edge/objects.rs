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
//! This edge is for comparing topologies (`tcplake bench`): it has no crash recovery of its own. For a
//! split deployment that survives restarts, use the broker edge.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::wire;
use super::{EdgeError, Rx, Tx};
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
        self.store
            .put_if_absent(&k, &body)
            .await
            .map_err(|source| EdgeError::Handoff {
                what: format!("object {k}"),
                source: Box::new(source),
            })?;
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

/// How many aggregator shards of `node`'s pipeline write flows to the hand-off store, learned from the
/// data: the first object of shard 0 (waited for) says it; a shard 0 that ended without any batch
/// leaves the count to the streams present.
pub async fn shard_count(
    store: &Store,
    node: &str,
    metrics: &HandoffMetrics,
) -> Result<u32, EdgeError> {
    let k = key(&flows_stream(node, 0), 0);
    loop {
        metrics.gets.add(1);
        let got = store.get(&k).await.map_err(|source| EdgeError::Handoff {
            what: format!("object {k}"),
            source: Box::new(source),
        })?;
        let Some(bytes) = got else {
            metrics.misses.add(1);
            tokio::time::sleep(POLL).await;
            continue;
        };
        if !bytes.is_empty() {
            let b = FlowBatch::decode(&bytes, 0).map_err(|source| EdgeError::HandoffDecode {
                what: format!("object {k}"),
                source: Box::new(source),
            })?;
            if b.shard_count > 0 {
                return Ok(b.shard_count);
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
        return Ok(n.map_or(1, |m| m + 1));
    }
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
        loop {
            self.metrics.gets.add(1);
            let got = self
                .store
                .get(&k)
                .await
                .map_err(|source| EdgeError::Handoff {
                    what: format!("object {k}"),
                    source: Box::new(source),
                })?;
            let Some(bytes) = got else {
                self.metrics.misses.add(1);
                tokio::time::sleep(POLL).await;
                continue;
            };
            self.metrics.bytes_read.add(bytes.len() as u64);
            let n = self.next;
            self.next += 1;
            if bytes.is_empty() {
                return Ok(None);
            }
            return T::decode(&bytes, n)
                .map(Some)
                .map_err(|source| EdgeError::HandoffDecode {
                    what: format!("object {k}"),
                    source: Box::new(source),
                });
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
}
