//! A recorded event log as a source (`--source replay:DIR|s3://...`): the committed `events/` of one
//! node, read back in `seq` order and fed through any mode. Replaying with the original settings
//! rebuilds the original `flows/` row for row; with other settings it is a new projection.

use std::collections::VecDeque;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::CaptureError;
use crate::event::schema::batch_to_events;
use crate::event::{Event, EventBatch};
use crate::lake::events_log::{self, EventFile};
use crate::lake::read;
use crate::storage::Store;

/// Which stretch of a recorded log to replay, by event time (microseconds since the epoch). A log is
/// replayed as it was recorded, in `seq` order: the stretch starts at the first event at or after
/// `since` and ends before the first event at or after `until`, so it is one contiguous run of `seq`
/// (events slightly out of time order inside it stay in; their neighbours decide, not their own time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
}

/// Reads committed event files one at a time.
pub struct Recorded {
    store: Store,
    node: Arc<str>,
    files: VecDeque<EventFile>,
    pending: VecDeque<Event>,
    next_seq: u64,
    range: TimeRange,
    /// The stretch has begun (an event at or after `since` was seen, or there is no `since`).
    started: bool,
    /// The stretch has ended (an event at or after `until` was seen).
    ended: bool,
    progress: ProgressBar,
    /// Which recorded output this is (its id, else where it is).
    origin: String,
}

impl Recorded {
    /// Opens the log of `node` in `store` (the only node there when `node` is `None`).
    pub async fn open(
        store: Store,
        node: Option<&str>,
        range: TimeRange,
    ) -> Result<Self, CaptureError> {
        let nodes: Vec<String> = events_log::nodes(&store)
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
        let files = events_log::files(&store, &node)
            .await
            .map_err(|e| CaptureError::Replay(e.to_string()))?;
        // Drawn only on a terminal (indicatif hides it otherwise): services and tests log no bars.
        let progress = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "replay {bar:30} {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
            )
            .expect("a valid progress template"),
        );
        let origin = match crate::lake::read_output_id(&store).await {
            Ok(Some(id)) => format!("output {id}"),
            _ => store.describe(),
        };
        let rec = Recorded {
            origin,
            store,
            node: node.into(),
            files: files.into(),
            pending: VecDeque::new(),
            next_seq: 0,
            range,
            started: range.since_us.is_none(),
            ended: false,
            progress,
        };
        rec.set_progress_length();
        Ok(rec)
    }

    /// The bar's length: rows still to read (an upper bound when --since/--until cut the log).
    fn set_progress_length(&self) {
        let rows: u64 = self
            .files
            .iter()
            .map(|f| f.rows.unwrap_or(f.last_seq - f.first_seq + 1))
            .sum();
        self.progress.set_length(rows);
    }

    /// Which recorded output is replayed (its id, else where it is).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The recorded node's name (rows keep it).
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Skips the events before `seq` (a restarted replay continues after its last commit).
    pub fn resume_at(&mut self, seq: u64) {
        self.next_seq = seq;
        while self.files.front().is_some_and(|f| f.last_seq < seq) {
            self.files.pop_front();
        }
        // Events before `seq` were replayed and committed: the stretch had begun.
        self.started |= seq > 0;
        self.set_progress_length();
    }

    async fn load_next_file(&mut self) -> Result<bool, CaptureError> {
        let Some(f) = self.files.pop_front() else {
            return Ok(false);
        };
        let key = f.key.as_str();
        let err = CaptureError::Replay;
        for rb in read::open(&self.store, key, 8192)
            .await
            .map_err(|e| err(e.to_string()))?
        {
            let rb = rb.map_err(|e| err(read::batch_error(key, e).to_string()))?;
            self.progress.inc(rb.num_rows() as u64);
            let events = batch_to_events(&rb).map_err(|e| err(format!("reading `{key}`: {e}")))?;
            for (_, e) in events {
                if e.seq < self.next_seq {
                    continue;
                }
                if !self.started {
                    if self.range.since_us.is_some_and(|t| e.ts_us < t) {
                        continue;
                    }
                    self.started = true;
                }
                if self.range.until_us.is_some_and(|t| e.ts_us >= t) {
                    self.ended = true;
                    self.files.clear();
                    break;
                }
                self.pending.push_back(e);
            }
            if self.ended {
                break;
            }
        }
        Ok(true)
    }

    pub async fn next_batch(&mut self, max: usize) -> Result<Option<EventBatch>, CaptureError> {
        while self.pending.is_empty() {
            if !self.load_next_file().await? {
                self.progress.finish_and_clear();
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
