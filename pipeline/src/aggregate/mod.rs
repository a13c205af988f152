//! The aggregate stage: event batches in, flow-record batches out.
//!
//! Contract: every event received is either folded into exactly one flow record or counted as late;
//! records leave in window order once the watermark passes their window, and everything still open is
//! flushed when the input ends. The stage does not know what feeds it or where records go.

pub mod sketch;
pub mod window;

use std::sync::Arc;

use crate::edge::{EdgeError, Rx, Tx};
use crate::event::{EventBatch, FlowBatch, FlowRecord};
use crate::metrics::AggregateMetrics;
pub use window::{WindowConfig, WindowStats, Windows};

/// Settings of the aggregate stage.
#[derive(Clone, Debug)]
pub struct AggregateConfig {
    pub windows: WindowConfig,
    /// Name stamped on emitted batches (e.g. `agg-0`).
    pub producer: Arc<str>,
    /// Upper bound on records per emitted batch.
    pub max_batch_records: usize,
}

/// Runs the stage until its input ends; returns the final counters.
pub async fn run<I, O>(
    cfg: AggregateConfig,
    mut input: I,
    mut output: O,
    metrics: &AggregateMetrics,
) -> Result<WindowStats, EdgeError>
where
    I: Rx<Arc<EventBatch>>,
    O: Tx<FlowBatch>,
{
    let mut windows = Windows::new(cfg.windows);
    let mut seq = 0u64;
    let mut closed: Vec<FlowRecord> = Vec::new();
    let mut published = WindowStats::default();
    loop {
        let batch = input.recv().await?;
        match &batch {
            Some(b) => {
                windows.add(&b.node, &b.events);
                if let Some(clock) = b.clock_us {
                    windows.advance_to(clock.saturating_sub(cfg.windows.allowed_lateness_us));
                }
                windows.drain_closed(&mut closed);
            }
            None => windows.drain_all(&mut closed),
        }
        publish(metrics, &mut published, windows.stats());
        let mut records = std::mem::take(&mut closed).into_iter().peekable();
        while records.peek().is_some() {
            let out = FlowBatch {
                producer: Arc::clone(&cfg.producer),
                seq,
                records: records
                    .by_ref()
                    .take(cfg.max_batch_records.max(1))
                    .collect(),
            };
            seq += 1;
            output.send(out).await?;
        }
        if batch.is_none() {
            return Ok(windows.stats());
        }
    }
}

/// Adds what changed since the last publish to the shared counters (once per batch, not per event).
fn publish(m: &AggregateMetrics, last: &mut WindowStats, now: WindowStats) {
    m.events_in.add(now.events_in - last.events_in);
    m.late_events.add(now.late_events - last.late_events);
    m.records_out.add(now.records_out - last.records_out);
    m.windows_closed
        .add(now.windows_closed - last.windows_closed);
    *last = now;
}
