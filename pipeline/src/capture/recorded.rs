//! A recorded event log as a source (`--source replay:DIR|s3://...`): the committed `events/` of one
//! node, read back in `seq` order and fed through any mode. Replaying with the original settings
//! rebuilds the original `flows/` row for row; with other settings it is a new projection.

use std::collections::VecDeque;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::CaptureError;
use crate::event::{Event, EventBatch};
use crate::lake::events_log;
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

/// Reads the committed log, in `seq` order.
pub struct Recorded {
    store: Store,
    node: Arc<str>,
    /// Opened at the first read, from `next_seq` (a restarted replay resumes first).
    log: Option<events_log::Reader>,
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
        let nodes: Vec<String> = events_log::nodes(&store).await?;
        let node = match (node, nodes.as_slice()) {
            (Some(n), _) if nodes.iter().any(|x| x == n) => n.to_string(),
            (Some(n), _) => {
                return Err(CaptureError::ReplayNoNode {
                    node: n.to_string(),
                    store: store.describe(),
                    nodes: nodes.join(", "),
                })
            }
            (None, [only]) => only.clone(),
            (None, []) => {
                return Err(CaptureError::ReplayNoLog {
                    store: store.describe(),
                    why: "",
                })
            }
            (None, many) => {
                return Err(CaptureError::ReplayWhichNode {
                    store: store.describe(),
                    nodes: many.join(", "),
                })
            }
        };
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
            log: None,
            pending: VecDeque::new(),
            next_seq: 0,
            range,
            started: range.since_us.is_none(),
            ended: false,
            progress,
        };
        Ok(rec)
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
        self.log = None;
        self.pending.clear();
        // Events before `seq` were replayed and committed: the stretch had begun.
        self.started |= seq > 0;
    }

    /// Reads the next events of the stretch into `pending`; `false` at its end.
    async fn load_more(&mut self) -> Result<bool, CaptureError> {
        let err = CaptureError::ReplayLog;
        if self.ended {
            return Ok(false);
        }
        if self.log.is_none() {
            let log = events_log::Reader::open(&self.store, &self.node, self.next_seq, 8192)
                .await
                .map_err(err)?;
            self.progress.set_length(log.rows_left());
            self.log = Some(log);
        }
        let log = self.log.as_mut().expect("just opened");
        let events = log.next_events(8192, u64::MAX).await.map_err(err)?;
        if events.is_empty() {
            return Ok(false);
        }
        self.progress.inc(events.len() as u64);
        for e in events {
            if !self.started {
                if self.range.since_us.is_some_and(|t| e.ts_us < t) {
                    continue;
                }
                self.started = true;
            }
            if self.range.until_us.is_some_and(|t| e.ts_us >= t) {
                self.ended = true;
                break;
            }
            self.pending.push_back(e);
        }
        Ok(true)
    }

    pub async fn next_batch(&mut self, max: usize) -> Result<Option<EventBatch>, CaptureError> {
        while self.pending.is_empty() {
            if !self.load_more().await? {
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
