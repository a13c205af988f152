//! The sink stage: batches in, committed Parquet files out.
//!
//! Contract: every row received is in exactly one committed file when the stage returns `Ok`; files are
//! laid out Hive-style, `<dataset>/date=YYYY-MM-DD/hour=HH/<name>.parquet`, only ever appear complete,
//! and are committed in stream order, a group of files (one per partition written) by one commit to the
//! dataset's table ([`crate::lake`]). One sink instance serves one dataset; it does not know what feeds
//! it.

pub mod dictionary_stats;
pub mod encoder;
pub mod parquet_file;
pub mod part;
pub mod rolling;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::error::ArrowError;

use tokio::sync::watch;

use crate::blocking;
use crate::edge::{Ack, EdgeError, Finalized, Rx};
use crate::event::schema::{events_to_file_batch_on, flows_to_batch};
use crate::event::{EventBatch, FlowBatch};
pub use crate::lake::producer::StagedFile;
pub use crate::lake::{output_id, CommitError, CommitLog, Dataset, Position};
use crate::metrics::SinkMetrics;
pub use crate::storage::{LocalDir, Store, StoreError};
pub use crate::time::Partition;
use encoder::Encoder;
pub use rolling::{Group, RollPolicy, RollingWriter, SealedFile, WriteError};

/// What a sink can write: a batch that splits into partitioned record batches.
pub trait SinkRows: Send + 'static {
    const DATASET: Dataset;
    fn num_rows(&self) -> usize;
    /// Event time that decides row `i`'s partition.
    fn partition_ts(&self, i: usize) -> i64;
    /// Rows `range` as Arrow, columns built on `encoder`, in the dataset's
    /// [`Dataset::batch_schema`].
    fn to_arrow(&self, range: Range<usize>, encoder: Encoder) -> Result<RecordBatch, ArrowError>;
    /// Deterministic, unique file stem for a file whose first row is row `i` of this batch.
    fn file_stem(&self, i: usize) -> String;
    /// Stream position of row `i`.
    fn position(&self, i: usize) -> Position;
    /// When capture sent these rows on (events only: flow rows wait for their window by design).
    fn sent_at_us(&self) -> Option<i64> {
        None
    }
    /// Flows: the replay point that comes with these rows.
    fn replay(&self) -> Option<&crate::event::ReplayPoint> {
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
    fn to_arrow(&self, range: Range<usize>, encoder: Encoder) -> Result<RecordBatch, ArrowError> {
        events_to_file_batch_on(encoder, &self.node, &self.events[range])
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
    fn to_arrow(&self, range: Range<usize>, _: Encoder) -> Result<RecordBatch, ArrowError> {
        // A window's flows are few next to its events: not worth the threads.
        flows_to_batch(&self.records[range])
    }
    fn file_stem(&self, i: usize) -> String {
        format!(
            "{}-{}-{}-{i}",
            self.producer, self.seq, self.records[i].window_start_us
        )
    }
    fn position(&self, _i: usize) -> Position {
        Position::Flow {
            emission: self.seq,
            through_seq: self.replay.through_seq,
        }
    }
    fn replay(&self) -> Option<&crate::event::ReplayPoint> {
        Some(&self.replay)
    }
}

/// A sink's input item: rows (or none) and the acks to release once the commit covering them is
/// durable (see [`crate::edge::ack`]). Plain batches come without acks.
pub trait Delivered: Send + 'static {
    type Rows: SinkRows;
    fn into_parts(self) -> (Option<Self::Rows>, Vec<Ack>);
}

impl Delivered for Arc<EventBatch> {
    type Rows = Self;
    fn into_parts(self) -> (Option<Self>, Vec<Ack>) {
        (Some(self), Vec::new())
    }
}

impl Delivered for FlowBatch {
    type Rows = Self;
    fn into_parts(self) -> (Option<Self>, Vec<Ack>) {
        (Some(self), Vec::new())
    }
}

impl<T: SinkRows> Delivered for Finalized<T> {
    type Rows = T;
    fn into_parts(self) -> (Option<T>, Vec<Ack>) {
        (self.item, self.acks)
    }
}

/// How a flows sink's commits follow the event log's: it waits until the log is committed through the
/// position its rows have consumed, so no committed flow row ever counts an event the log does not
/// hold. (What a sink tells the world of its commits travels as acks: [`Delivered`].)
#[derive(Debug, Default)]
pub struct CommitOrder {
    /// The event log's committed position on the events edge (next position not yet committed).
    pub after: Option<watch::Receiver<u64>>,
    /// Where other processes write the event log (sharded sinks): the table's commit records say how
    /// far each node's log is committed, and the flows' replay points how far they need it.
    pub table: Option<crate::lake::committed::EventsCommitted>,
}

/// Sealed groups, each with the acks its commit releases (an empty group: acks to release at once).
type Sealed = Vec<(Group, Vec<Ack>)>;

/// Pairs the groups a write sealed with the acks their commits release. The acks waiting on the open
/// files go with the first group sealed (their rows are in it); the item's own acks go with the last
/// group if the writer is left with nothing open (its last rows are in it), else they wait on the open
/// files. With nothing open or sealed, every row handed over before is committed (commits complete
/// before the next item is taken): the acks are released at once.
fn with_acks(groups: Vec<Group>, waiting: &mut Vec<Ack>, acks: Vec<Ack>, idle: bool) -> Sealed {
    let mut out: Sealed = groups.into_iter().map(|g| (g, Vec::new())).collect();
    if let Some((_, first)) = out.first_mut() {
        first.append(waiting);
    }
    if !idle {
        waiting.extend(acks);
    } else if let Some((_, last)) = out.last_mut() {
        last.extend(acks);
    } else {
        out.push((Vec::new(), acks));
    }
    out
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
        .map(|(hour, r)| (Partition::of(hour.saturating_mul(HOUR_US)), r))
        .collect()
}

/// Runs one dataset's sink until its input ends, then commits every open file. Each item's acks are
/// released once the commit holding its rows is durable.
pub async fn run<D, I>(
    mut input: I,
    mut writer: RollingWriter,
    log: &mut CommitLog,
    mut order: CommitOrder,
    metrics: &SinkMetrics,
) -> Result<SinkStats, SinkError>
where
    D: Delivered,
    I: Rx<D>,
{
    let mut stats = SinkStats::default();
    let store = writer.store().clone();
    // Acks of rows in the open files.
    let mut waiting: Vec<Ack> = Vec::new();
    // Files also close on age while no data arrives, so a quiet node still commits its data.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sealed = tokio::select! {
            item = input.recv() => match item? {
                Some(d) => {
                    let (rows, acks) = d.into_parts();
                    let groups = match &rows {
                        Some(b) => blocking::run(|| write_batch(&mut writer, b, &mut stats, metrics))?,
                        None => Vec::new(),
                    };
                    with_acks(groups, &mut waiting, acks, writer.is_idle())
                }
                None => break,
            },
            _ = tick.tick() => {
                let groups = blocking::run(|| writer.roll_aged(Instant::now()))?
                    .into_iter()
                    .collect();
                with_acks(groups, &mut waiting, Vec::new(), writer.is_idle())
            }
        };
        // While a commit waits on the store, no input is taken: the edge fills and the producer waits.
        if !commit(sealed, &store, log, &mut order, &mut stats, metrics).await? {
            return stopped(log, stats).await;
        }
    }
    let groups = blocking::run(|| writer.seal_all())?.into_iter().collect();
    let sealed = with_acks(groups, &mut waiting, Vec::new(), true);
    if !commit(sealed, &store, log, &mut order, &mut stats, metrics).await? {
        return stopped(log, stats).await;
    }
    log.finish().await?;
    Ok(stats)
}

/// The flows sink: like [`run`], but the rows of the open file are held per window until the file
/// closes (on size, age or the end of the input). A window emitted again while its rows wait just
/// replaces them in memory; one emitted again after its file was committed replaces its committed rows
/// (see [`crate::lake::projection`]). A window the table already holds unchanged (a rebuild after a
/// restart emits every window it held) is not written again.
pub async fn run_flows<D, I>(
    mut input: I,
    mut writer: RollingWriter,
    log: &mut CommitLog,
    mut order: CommitOrder,
    policy: RollPolicy,
    metrics: &SinkMetrics,
) -> Result<SinkStats, SinkError>
where
    D: Delivered<Rows = FlowBatch>,
    I: Rx<D>,
{
    let mut stats = SinkStats::default();
    let store = writer.store().clone();
    let mut open = OpenFlows::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            item = input.recv() => match item? {
                Some(d) => {
                    let (batch, acks) = d.into_parts();
                    let idle = open.rows.is_empty() && open.last.is_none() && !log.has_open();
                    let Some(mut batch) = batch else {
                        // Acks of emissions handed over before: released with them.
                        if idle {
                            release(acks).await;
                        } else {
                            open.acks.extend(acks);
                        }
                        continue;
                    };
                    metrics.batches.add(1);
                    let admitted = log.admit(std::mem::take(&mut batch.records));
                    if admitted.records.is_empty() && idle {
                        // Nothing new: the table holds this emission already.
                        release(acks).await;
                        continue;
                    }
                    open.add(admitted.records, batch);
                    open.acks.extend(acks);
                    open.bytes >= policy.max_bytes
                }
                None => break,
            },
            _ = tick.tick() => open.opened.is_some_and(|t| t.elapsed() >= policy.max_age),
        };
        if flush {
            let sealed = blocking::run(|| open.write(&mut writer, &mut stats, metrics))?;
            if !commit(sealed, &store, log, &mut order, &mut stats, metrics).await? {
                return stopped(log, stats).await;
            }
        }
    }
    let sealed = blocking::run(|| open.write(&mut writer, &mut stats, metrics))?;
    if !commit(sealed, &store, log, &mut order, &mut stats, metrics).await? {
        return stopped(log, stats).await;
    }
    log.finish().await?;
    Ok(stats)
}

/// The end of a sink that left rows uncommitted because it is stopping (see [`commit`]): nothing
/// more is committed or acknowledged (a later commit would record a position past the rows left out,
/// and an ack would tell the edge they are durable); the edge delivers them again.
async fn stopped(log: &mut CommitLog, stats: SinkStats) -> Result<SinkStats, SinkError> {
    log.finish().await?;
    Ok(stats)
}

async fn release(acks: Vec<Ack>) {
    for a in acks {
        a.release().await;
    }
}

/// The rows of the flows sink's open file, per window, until it is written.
#[derive(Default)]
struct OpenFlows {
    rows: std::collections::BTreeMap<(i64, Arc<str>), Vec<crate::event::FlowRecord>>,
    /// The newest emission taken in (its number and replay point go with the file).
    last: Option<FlowBatch>,
    opened: Option<Instant>,
    /// Rows' size estimate (their Parquet will be smaller).
    bytes: u64,
    /// Acks of the emissions taken in, released with the commit of their rows.
    acks: Vec<Ack>,
}

/// What one flow row takes before compression, about.
const FLOW_ROW_BYTES: u64 = 160;

impl OpenFlows {
    fn add(&mut self, records: Vec<crate::event::FlowRecord>, header: FlowBatch) {
        let mut by: std::collections::BTreeMap<(i64, Arc<str>), Vec<_>> = Default::default();
        for r in records {
            by.entry((r.window_start_us, Arc::clone(&r.key.node)))
                .or_default()
                .push(r);
        }
        for (k, rows) in by {
            if let Some(old) = self.rows.insert(k, rows) {
                self.bytes = self.bytes.saturating_sub(old.len() as u64 * FLOW_ROW_BYTES);
            }
        }
        self.bytes = self.rows.values().map(|v| v.len() as u64).sum::<u64>() * FLOW_ROW_BYTES;
        self.opened.get_or_insert_with(Instant::now);
        self.last = Some(header);
    }

    /// Writes every held row (window by window) and seals the files: one group, with the acks of
    /// every emission taken in (or, if nothing was written, the acks alone: released at once).
    fn write(
        &mut self,
        writer: &mut RollingWriter,
        stats: &mut SinkStats,
        metrics: &SinkMetrics,
    ) -> Result<Sealed, SinkError> {
        let acks = std::mem::take(&mut self.acks);
        let Some(mut batch) = self.last.take() else {
            let groups = writer.seal_all()?.into_iter().collect();
            return Ok(with_acks(groups, &mut Vec::new(), acks, true));
        };
        batch.records = std::mem::take(&mut self.rows)
            .into_values()
            .flatten()
            .collect();
        batch.first_row = 0;
        batch.total_rows = batch.records.len() as u32;
        self.opened = None;
        self.bytes = 0;
        let mut sealed = if batch.records.is_empty() {
            Vec::new()
        } else {
            write_batch(writer, &batch, stats, metrics)?
        };
        sealed.extend(writer.seal_all()?);
        // One flush is one commit: the projection indexes every window it wrote to the file of its
        // partition in that commit (the writer may have sealed a group midway, on size or partitions).
        // Rows are sorted by window, so each partition is one chunk, hence one file.
        let one: Group = sealed.into_iter().flatten().collect();
        Ok(vec![(one, acks)])
    }
}

/// Commits sealed groups in order, each in one commit, and releases each group's acks once it is
/// committed (an empty group's at once); on failure the rest are discarded (they were never visible)
/// and their acks are not released (the edge will deliver them again). `false`: the process is
/// stopping before a group could be committed (see [`CommitOrder::table`]); the rest are discarded
/// likewise, and the caller must stop (see [`stopped`]).
async fn commit(
    sealed: Sealed,
    store: &Store,
    log: &mut CommitLog,
    order: &mut CommitOrder,
    stats: &mut SinkStats,
    metrics: &SinkMetrics,
) -> Result<bool, SinkError> {
    let mut groups = sealed.into_iter();
    while let Some((g, acks)) = groups.next() {
        if g.is_empty() {
            release(acks).await;
            continue;
        }
        match commit_group(&g, log, order).await {
            Ok(true) => {}
            Ok(false) => {
                let rows: u64 = g.iter().map(|f| f.rows).sum();
                tracing::warn!(
                    rows,
                    "stopping before the event log these flow rows count was committed (by another \
                     sink part): they stay uncommitted and are delivered again"
                );
                for f in g.into_iter().chain(groups.flat_map(|(g, _)| g)) {
                    store.discard(&f.staged);
                }
                return Ok(false);
            }
            Err(e) => {
                for f in g.into_iter().chain(groups.flat_map(|(g, _)| g)) {
                    store.discard(&f.staged);
                }
                return Err(e);
            }
        }
        let now = crate::time::now_us();
        for f in &g {
            metrics.record_latencies(f.sent_at_us.iter().map(|t| now.saturating_sub(*t)));
            stats.files += 1;
            stats.bytes += f.bytes;
            metrics.files.add(1);
            metrics.bytes.add(f.bytes);
            tracing::debug!(key = %f.key, rows = f.rows, bytes = f.bytes, "file committed");
        }
        release(acks).await;
    }
    Ok(true)
}

/// Where a group ends in the stream: its files' last rows, the furthest.
fn group_last(g: &Group) -> Position {
    g.iter()
        .map(|f| f.last)
        .max_by_key(|p| match *p {
            Position::Event { seq } => (seq, 0),
            Position::Flow {
                emission,
                through_seq,
            } => (emission, through_seq),
        })
        .expect("a group holds a file")
}

/// Per node, the furthest event the group's flow rows count (from their replay points).
fn events_through(g: &Group) -> Vec<(Arc<str>, u64)> {
    let mut need: std::collections::BTreeMap<Arc<str>, u64> = Default::default();
    for (node, seq) in g
        .iter()
        .filter_map(|f| f.replay.as_ref())
        .flat_map(|r| &r.events_through)
    {
        let n = need.entry(Arc::clone(node)).or_default();
        *n = (*n).max(*seq);
    }
    need.into_iter().collect()
}

/// Commits one group; `false` if it was left uncommitted because the process is stopping while the
/// event log it counts is not yet committed by another process (see [`CommitOrder::table`]).
async fn commit_group(
    g: &Group,
    log: &mut CommitLog,
    order: &mut CommitOrder,
) -> Result<bool, SinkError> {
    let last = group_last(g);
    if let (Some(after), Position::Flow { through_seq, .. }) = (order.after.as_mut(), last) {
        after
            .wait_for(|committed| *committed >= through_seq)
            .await
            .map_err(|_| EdgeError::Closed("event-log commit"))?;
    }
    if let Some(table) = order.table.as_mut() {
        if !table.wait(&events_through(g)).await? {
            return Ok(false);
        }
    }
    let files: Vec<StagedFile> = g
        .iter()
        .map(|f| StagedFile {
            staged: f.staged.clone(),
            partition: f.partition.clone(),
            rows: f.rows,
            bytes: f.bytes,
            first: f.first,
            last: f.last,
            replay: f.replay.clone(),
            ts_range: f.ts_range,
        })
        .collect();
    log.commit(&files, last).await?;
    Ok(true)
}

fn write_batch<T: SinkRows>(
    writer: &mut RollingWriter,
    batch: &T,
    stats: &mut SinkStats,
    metrics: &SinkMetrics,
) -> Result<Vec<Group>, SinkError> {
    let mut committed = Vec::new();
    for (partition, range) in partition_runs(batch) {
        let start = range.start;
        let span = (batch.position(start), batch.position(range.end - 1));
        let rows = range.len() as u64;
        let ts_range = range.clone().fold((i64::MAX, i64::MIN), |(lo, hi), i| {
            let t = batch.partition_ts(i);
            (lo.min(t), hi.max(t))
        });
        let arrow =
            batch
                .to_arrow(range, writer.encoder())
                .map_err(|source| SinkError::Encode {
                    dataset: T::DATASET.name(),
                    source,
                })?;
        committed.extend(writer.write(
            rolling::Chunk {
                partition,
                batch: &arrow,
                span,
                ts_range,
                sent_at_us: batch.sent_at_us(),
                replay: batch.replay(),
            },
            || batch.file_stem(start),
        )?);
        stats.rows += rows;
        metrics.rows.add(rows);
    }
    metrics.batches.add(1);
    Ok(committed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    fn at(seq: u64, ts_us: i64) -> Event {
        Event::sample(seq, ts_us, EventKind::BytesSent { bytes: 1 })
    }

    /// Rows split where the hour changes; a corrupt timestamp at either end of the range names the
    /// nearest partition instead of overflowing.
    #[test]
    fn partition_runs_split_at_hours_and_survive_extreme_timestamps() {
        const H: i64 = 3_600_000_000;
        let b = Arc::new(EventBatch::new(
            "n".into(),
            vec![
                at(0, 0),
                at(1, H - 1),
                at(2, H),
                at(3, i64::MIN),
                at(4, i64::MAX),
            ],
            None,
        ));
        let runs = partition_runs(&b);
        let ranges: Vec<_> = runs.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(ranges, [0..2, 2..3, 3..4, 4..5]);
        assert_eq!(runs[1].0.path(), "date=1970-01-01/hour=01");
    }
}
