//! The capture stage: a source of TCP events, cut into batches and sent downstream.
//!
//! Contract: every event the source yields is sent exactly once, in order, with consecutive `seq`
//! numbers; when shutdown is requested the stage stops taking new events, sends what it holds and
//! returns. It closes its output edge at the end, marking the end of the stream only when the source
//! is exhausted or `--duration` is over (not on a signal: a restarted capture continues the stream).
//! The stage does not know what is downstream of its output edge.

pub mod ebpf;
pub mod kubernetes;
pub mod recorded;
mod rng;
pub mod synthetic;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::edge::{EdgeError, Tx};
use crate::event::EventBatch;
use crate::metrics::CaptureMetrics;
use crate::shutdown::Shutdown;

/// An idle source's clock goes downstream at most this often (windows close on it).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Why capture stopped early.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Load(#[from] ebpf::LoadError),
    #[error("replay source: no event log of node `{node}` in {store} (nodes there: {nodes})")]
    ReplayNoNode {
        node: String,
        store: String,
        nodes: String,
    },
    #[error("replay source: no committed event log in {store}{why}")]
    ReplayNoLog { store: String, why: &'static str },
    #[error(
        "replay source: {store} holds the logs of several nodes ({nodes}): pick one with --node"
    )]
    ReplayWhichNode { store: String, nodes: String },
    #[error("replay source: {0}")]
    ReplayLog(#[from] crate::lake::events_log::ReadLogError),
    #[error("replay source: {0}")]
    ReplayListing(#[from] crate::lake::events_log::LogError),
}

/// Something that yields TCP events.
pub trait Source: Send {
    /// The next batch of at most `max` events, or `None` when the source is exhausted.
    fn next_batch(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<EventBatch>, CaptureError>> + Send;

    /// Events the source still holds when capture stops (`next_batch` may be interrupted between
    /// polls by shutdown; whatever it had gathered comes out here, so nothing is lost).
    fn finish(&mut self) -> Option<EventBatch> {
        None
    }
}

/// The sources a mode can pick from.
pub enum AnySource {
    Synthetic(synthetic::Synthetic),
    Ebpf(Box<ebpf::EbpfSource>),
    Recorded(Box<recorded::Recorded>),
}

impl AnySource {
    /// Continues a stream whose events up to `seq` (exclusive) are already committed.
    pub fn resume_at(&mut self, seq: u64) {
        match self {
            AnySource::Synthetic(s) => s.resume_at(seq),
            AnySource::Ebpf(s) => s.resume_at(seq),
            AnySource::Recorded(s) => s.resume_at(seq),
        }
    }
}

impl Source for AnySource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<EventBatch>, CaptureError> {
        Ok(match self {
            AnySource::Synthetic(s) => s.next_batch(max),
            AnySource::Ebpf(s) => s.next_batch(max).await,
            AnySource::Recorded(s) => s.next_batch(max).await?,
        })
    }

    fn finish(&mut self) -> Option<EventBatch> {
        match self {
            AnySource::Synthetic(_) | AnySource::Recorded(_) => None,
            AnySource::Ebpf(s) => s.finish(),
        }
    }
}

/// Settings of the capture stage.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Events per batch sent downstream.
    pub batch_size: usize,
    /// Optional pacing, events per second of wall time.
    pub rate: Option<u64>,
    /// Stop capturing after this long (then drain and flush as on shutdown).
    pub duration: Option<Duration>,
}

/// What the capture stage did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub events: u64,
    pub batches: u64,
}

/// Runs the stage until the source is exhausted or shutdown is requested.
pub async fn run<S, O>(
    cfg: CaptureConfig,
    mut source: S,
    mut output: O,
    mut shutdown: Shutdown,
    metrics: &CaptureMetrics,
) -> Result<CaptureStats, CaptureError>
where
    S: Source,
    O: Tx<Arc<EventBatch>>,
{
    let mut stats = CaptureStats::default();
    let started = tokio::time::Instant::now();
    // Bounded by configuration; an instant past the clock's range simply means no deadline.
    let deadline = cfg.duration.and_then(|d| started.checked_add(d));
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let mut exhausted = false;
    let mut last_sent = None;
    while !shutdown.is_triggered() {
        let batch = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = &mut until_deadline => {
                // A bounded capture (--duration) is a finite stream: it ends like an exhausted source.
                exhausted = true;
                break;
            }
            b = source.next_batch(cfg.batch_size.max(1)) => b?,
        };
        let Some(batch) = batch else {
            exhausted = true;
            break;
        };
        let n = batch.len() as u64;
        // Empty batches only matter when they carry the clock (they let idle windows close), and
        // once a [`HEARTBEAT_EVERY`] is enough for that: over a broker each is a stored message.
        if n == 0
            && (batch.clock_us.is_none()
                || last_sent.is_some_and(|t: tokio::time::Instant| t.elapsed() < HEARTBEAT_EVERY))
        {
            continue;
        }
        let mut batch = batch;
        batch.sent_at_us = Some(crate::time::now_us());
        output.send(Arc::new(batch)).await?;
        last_sent = Some(tokio::time::Instant::now());
        if n > 0 {
            stats.events += n;
            stats.batches += 1;
            metrics.events.add(n);
            metrics.batches.add(1);
        }
        if let Some(rate) = cfg.rate.filter(|&r| r > 0) {
            let due = started + Duration::from_secs_f64(stats.events as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.wait() => break,
            }
        }
    }
    if let Some(mut last) = source.finish().filter(|b| !b.is_empty()) {
        last.sent_at_us = Some(crate::time::now_us());
        let n = last.len() as u64;
        output.send(Arc::new(last)).await?;
        stats.events += n;
        stats.batches += 1;
        metrics.events.add(n);
        metrics.batches.add(1);
    }
    // Only an exhausted source or the end of --duration ends the stream for good; a capture stopped by
    // a signal may be restarted and continue it.
    output.close(exhausted).await?;
    Ok(stats)
}
