//! The capture stage: a source of TCP events, cut into batches and sent downstream.
//!
//! Contract: every event the source yields is sent exactly once, in order, with consecutive `seq`
//! numbers; when shutdown is requested the stage stops taking new events, sends what it holds and
//! returns. The stage does not know what is downstream of its output edge.

mod rng;
pub mod synthetic;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::edge::{EdgeError, Tx};
use crate::event::EventBatch;
use crate::metrics::CaptureMetrics;
use crate::shutdown::Shutdown;

/// Why capture stopped early.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
}

/// Something that yields TCP events.
pub trait Source: Send {
    /// The next batch of at most `max` events, or `None` when the source is exhausted.
    fn next_batch(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<EventBatch>, CaptureError>> + Send;
}

impl Source for synthetic::Synthetic {
    async fn next_batch(&mut self, max: usize) -> Result<Option<EventBatch>, CaptureError> {
        Ok(synthetic::Synthetic::next_batch(self, max))
    }
}

/// Settings of the capture stage.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Events per batch sent downstream.
    pub batch_size: usize,
    /// Optional pacing, events per second of wall time.
    pub rate: Option<u64>,
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
    while !shutdown.is_triggered() {
        let batch = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            b = source.next_batch(cfg.batch_size.max(1)) => b?,
        };
        let Some(batch) = batch else { break };
        let n = batch.len() as u64;
        if n == 0 {
            continue;
        }
        output.send(Arc::new(batch)).await?;
        stats.events += n;
        stats.batches += 1;
        metrics.events.add(n);
        metrics.batches.add(1);
        if let Some(rate) = cfg.rate.filter(|&r| r > 0) {
            let due = started + Duration::from_secs_f64(stats.events as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.wait() => break,
            }
        }
    }
    Ok(stats)
}
