//! The sink stage: batches in, committed Parquet files out.
//!
//! Contract: every row received is in exactly one committed file when the stage returns `Ok`; files are
//! laid out Hive-style, `<dataset>/date=YYYY-MM-DD/hour=HH/<name>.parquet`, named deterministically from
//! the first row they hold, only ever appear complete, and are committed in stream order with a commit
//! record each ([`commit`]). One sink instance serves one dataset; it does not know what feeds it.

pub mod commit;
pub mod read;
pub mod rolling;
pub mod s3;
pub mod store;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;

use tokio::sync::watch;

use crate::edge::{EdgeError, Rx};
use crate::event::schema::{events_schema, events_to_batch, flows_schema, flows_to_batch};
use crate::event::{EventBatch, FlowBatch};
use crate::metrics::SinkMetrics;
use crate::time::utc_date_hour;
pub use commit::{output_id, CommitError, CommitLog, CommitRecord, Position};
pub use rolling::{RollPolicy, RollingWriter, SealedFile, WriteError};
pub use store::{LocalDir, Store, StoreError};

/// The two datasets tcplake writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// The raw event log: the source of truth.
    Events,
    /// Per-flow, per-window records: a projection of the log.
    Flows,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Events => "events",
            Dataset::Flows => "flows",
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            Dataset::Events => events_schema(),
            Dataset::Flows => flows_schema(),
        }
    }
}

/// A Hive partition: one UTC hour.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
}

impl Partition {
    pub fn of(ts_us: i64) -> Self {
        let (year, month, day, hour) = utc_date_hour(ts_us);
        Partition {
            year,
            month,
            day,
            hour,
        }
    }

    /// `date=YYYY-MM-DD/hour=HH`
    pub fn path(&self) -> String {
        format!(
            "date={:04}-{:02}-{:02}/hour={:02}",
            self.year, self.month, self.day, self.hour
        )
    }
}

/// What a sink can write: a batch that splits into partitioned record batches.
pub trait SinkRows: Send + 'static {
    const DATASET: Dataset;
    fn num_rows(&self) -> usize;
    /// Event time that decides row `i`'s partition.
    fn partition_ts(&self, i: usize) -> i64;
    /// Rows `range` as Arrow.
    fn to_arrow(&self, range: Range<usize>) -> Result<RecordBatch, ArrowError>;
    /// Deterministic, unique file stem for a file whose first row is row `i` of this batch.
    fn file_stem(&self, i: usize) -> String;
    /// Stream position of row `i`.
    fn position(&self, i: usize) -> Position;
    /// When capture sent these rows on (events only: flow rows wait for their window by design).
    fn sent_at_us(&self) -> Option<i64> {
        None
    }
}

impl SinkRows for Arc<EventBatch> {
    const DATASET: Dataset = Dataset::Events;
    fn num_rows(&self) -> usize {
        self.events.len()
    }
    fn partition_ts(&self, i: usize) -> i64 {
        self.events[i].ts_us
    }
    fn to_arrow(&self, range: Range<usize>) -> Result<RecordBatch, ArrowError> {
        events_to_batch(&self.node, &self.events[range])
    }
    fn file_stem(&self, i: usize) -> String {
        // (node, seq) identifies an event: the file is named after its first one.
        format!("{}-{:016}", self.node, self.events[i].seq)
    }
    fn position(&self, i: usize) -> Position {
        Position::Event {
            seq: self.events[i].seq,
        }
    }
    fn sent_at_us(&self) -> Option<i64> {
        self.sent_at_us
    }
}

impl SinkRows for FlowBatch {
    const DATASET: Dataset = Dataset::Flows;
    fn num_rows(&self) -> usize {
        self.records.len()
    }
    fn partition_ts(&self, i: usize) -> i64 {
        self.records[i].window_start_us
    }
    fn to_arrow(&self, range: Range<usize>) -> Result<RecordBatch, ArrowError> {
        flows_to_batch(&self.records[range])
    }
    fn file_stem(&self, i: usize) -> String {
        // (window, rank) identifies a row whatever run emitted it (batch numbers restart with a run).
        format!(
            "{}-{:016}-{:06}",
            self.producer, self.records[i].window_start_us, self.ranks[i]
        )
    }
    fn position(&self, i: usize) -> Position {
        Position::Flow {
            window_start_us: self.records[i].window_start_us,
            rank: self.ranks[i],
            replay_from_seq: self.replay.from_seq,
            replay_watermark_us: self.replay.watermark_us,
            through_seq: self.replay.through_seq,
            closing: self.replay.closing,
        }
    }
}

/// How a sink's commits relate to the world: it announces the last row of every file it commits (so
/// an edge can ack what is durable, and the flows sink can learn how far the log is), and the flows
/// sink waits until the event log is committed through the position its rows have consumed, so no
/// committed flow row ever counts an event the log does not hold.
#[derive(Debug, Default)]
pub struct CommitOrder {
    /// Told the position of the last row of each committed file.
    pub committed: Option<watch::Sender<Option<Position>>>,
    /// The event log's committed position on the events edge (next position not yet committed).
    pub after: Option<watch::Receiver<u64>>,
}

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("encoding {dataset} rows as Arrow: {source}")]
    Encode {
        dataset: &'static str,
        source: ArrowError,
    },
}

/// What one sink did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub rows: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Maximal runs of consecutive rows in the same partition (one run for time-ordered input).
fn partition_runs<T: SinkRows>(batch: &T) -> Vec<(Partition, Range<usize>)> {
    const HOUR_US: i64 = 3_600_000_000;
    // Compare hour numbers per row; the calendar date is only worked out once per run.
    let mut runs: Vec<(i64, Range<usize>)> = Vec::new();
    for i in 0..batch.num_rows() {
        let hour = batch.partition_ts(i).div_euclid(HOUR_US);
        match runs.last_mut() {
            Some((last, r)) if *last == hour => r.end = i + 1,
            _ => runs.push((hour, i..i + 1)),
        }
    }
    runs.into_iter()
        .map(|(hour, r)| (Partition::of(hour * HOUR_US), r))
        .collect()
}

/// Runs one dataset's sink until its input ends, then commits every open file.
pub async fn run<T, I>(
    mut input: I,
    mut writer: RollingWriter,
    log: &mut CommitLog,
    mut order: CommitOrder,
    metrics: &SinkMetrics,
) -> Result<SinkStats, SinkError>
where
    T: SinkRows,
    I: Rx<T>,
{
    let mut stats = SinkStats::default();
    let store = writer.store().clone();
    // Files also close on age while no data arrives, so a quiet node still commits its data.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sealed = tokio::select! {
            item = input.recv() => match item? {
                Some(batch) => write_batch(&mut writer, &batch, &mut stats, metrics)?,
                None => break,
            },
            _ = tick.tick() => writer.roll_aged(Instant::now())?,
        };
        // While a commit waits on the store, no input is taken: the edge fills and the producer waits.
        commit(sealed, &store, log, &mut order, &mut stats, metrics).await?;
    }
    let sealed = writer.close_all()?;
    commit(sealed, &store, log, &mut order, &mut stats, metrics).await?;
    Ok(stats)
}

/// Commits sealed files in order; on failure the rest are discarded (they were never visible).
async fn commit(
    sealed: Vec<SealedFile>,
    store: &Store,
    log: &mut CommitLog,
    order: &mut CommitOrder,
    stats: &mut SinkStats,
    metrics: &SinkMetrics,
) -> Result<(), SinkError> {
    let mut files = sealed.into_iter();
    while let Some(f) = files.next() {
        let result = commit_one(&f, log, order).await;
        if let Err(e) = result {
            store.discard(&f.staged);
            for rest in files {
                store.discard(&rest.staged);
            }
            return Err(e);
        }
        let now = crate::time::now_us();
        metrics.record_latencies(f.sent_at_us.iter().map(|t| now.saturating_sub(*t)));
        stats.files += 1;
        stats.bytes += f.bytes;
        metrics.files.add(1);
        metrics.bytes.add(f.bytes);
        tracing::debug!(key = %f.key, rows = f.rows, bytes = f.bytes, "file committed");
    }
    Ok(())
}

async fn commit_one(
    f: &SealedFile,
    log: &mut CommitLog,
    order: &mut CommitOrder,
) -> Result<(), SinkError> {
    if let (Some(after), Position::Flow { through_seq, .. }) = (order.after.as_mut(), f.last) {
        after
            .wait_for(|committed| *committed >= through_seq)
            .await
            .map_err(|_| EdgeError::Closed("event-log commit"))?;
    }
    log.commit(&f.staged, &f.key, f.rows, f.bytes, f.first, f.last)
        .await?;
    if let Some(committed) = &order.committed {
        committed.send_replace(Some(f.last));
    }
    Ok(())
}

fn write_batch<T: SinkRows>(
    writer: &mut RollingWriter,
    batch: &T,
    stats: &mut SinkStats,
    metrics: &SinkMetrics,
) -> Result<Vec<SealedFile>, SinkError> {
    let mut committed = Vec::new();
    for (partition, range) in partition_runs(batch) {
        let start = range.start;
        let span = (batch.position(start), batch.position(range.end - 1));
        let rows = range.len() as u64;
        let arrow = batch.to_arrow(range).map_err(|source| SinkError::Encode {
            dataset: T::DATASET.name(),
            source,
        })?;
        committed.extend(writer.write(
            partition,
            || batch.file_stem(start),
            &arrow,
            span,
            batch.sent_at_us(),
        )?);
        stats.rows += rows;
        metrics.rows.add(rows);
    }
    metrics.batches.add(1);
    Ok(committed)
}
