//! A recorded event log as a source (`--source replay:DIR|s3://...`): the committed `events/` of one
//! node, read back in `seq` order and fed through any mode. Replaying with the original settings
//! rebuilds the original `flows/` row for row; with other settings it is a new projection.

use std::collections::VecDeque;
use std::sync::Arc;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::CaptureError;
use crate::event::schema::batch_to_events;
use crate::event::{Event, EventBatch};
use crate::sink::{CommitLog, CommitRecord, Dataset, Store};

/// Reads committed event files one at a time.
pub struct Recorded {
    store: Store,
    node: Arc<str>,
    files: VecDeque<CommitRecord>,
    pending: VecDeque<Event>,
    next_seq: u64,
}

impl Recorded {
    /// Opens the log of `node` in `store` (the only node there when `node` is `None`).
    pub async fn open(store: Store, node: Option<&str>) -> Result<Self, CaptureError> {
        let nodes: Vec<String> = store
            .list_dirs("_tcplake/commits/events/")
            .await
            .map_err(|e| CaptureError::Replay(e.to_string()))?;
        let node = match (node, nodes.as_slice()) {
            (Some(n), _) if nodes.iter().any(|x| x == n) => n.to_string(),
            (Some(n), _) => {
                return Err(CaptureError::Replay(format!(
                    "no event log of node `{n}` in {} (nodes there: {})",
                    store.describe(),
                    nodes.join(", ")
                )))
            }
            (None, [only]) => only.clone(),
            (None, []) => {
                return Err(CaptureError::Replay(format!(
                    "no committed event log in {}",
                    store.describe()
                )))
            }
            (None, many) => {
                return Err(CaptureError::Replay(format!(
                    "{} holds the logs of several nodes ({}): pick one with --node",
                    store.describe(),
                    many.join(", ")
                )))
            }
        };
        let files = CommitLog::all(&store, Dataset::Events, &node)
            .await
            .map_err(|e| CaptureError::Replay(e.to_string()))?;
        Ok(Recorded {
            store,
            node: node.into(),
            files: files.into(),
            pending: VecDeque::new(),
            next_seq: 0,
        })
    }

    /// The recorded node's name (rows keep it).
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Skips the events before `seq` (a restarted replay continues after its last commit).
    pub fn resume_at(&mut self, seq: u64) {
        self.next_seq = seq;
        while self.files.front().is_some_and(|f| f.last.event_seq() < seq) {
            self.files.pop_front();
        }
    }

    async fn load_next_file(&mut self) -> Result<bool, CaptureError> {
        let Some(f) = self.files.pop_front() else {
            return Ok(false);
        };
        let err = |reason: String| CaptureError::Replay(format!("reading `{}`: {reason}", f.key));
        let bytes = self
            .store
            .get(&f.key)
            .await
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("committed but missing".into()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .and_then(|b| b.build())
            .map_err(|e| err(e.to_string()))?;
        for rb in reader {
            let rb = rb.map_err(|e| err(e.to_string()))?;
            let events = batch_to_events(&rb).map_err(|e| err(e.to_string()))?;
            self.pending.extend(
                events
                    .into_iter()
                    .map(|(_, e)| e)
                    .filter(|e| e.seq >= self.next_seq),
            );
        }
        Ok(true)
    }

    pub async fn next_batch(&mut self, max: usize) -> Result<Option<EventBatch>, CaptureError> {
        while self.pending.is_empty() {
            if !self.load_next_file().await? {
                return Ok(None);
            }
        }
        let n = max.min(self.pending.len());
        let events: Vec<Event> = self.pending.drain(..n).collect();
        if let Some(last) = events.last() {
            self.next_seq = last.seq + 1;
        }
        Ok(Some(EventBatch::new(Arc::clone(&self.node), events, None)))
    }
}
