//! The aggregate stage: event batches in, flow-record emissions out.
//!
//! Contract: every event received is folded into exactly one flow record or counted as late (beyond the
//! late horizon); a window is emitted once its end passes the watermark and emitted again, whole, each
//! time it gains events while mutable — the later rows replace the earlier; everything with unemitted
//! changes is emitted when the input ends. The stage does not know what feeds it or where records go.
//!
//! After a restart it is started from the replay point of the last emission committed ([`Resume`]):
//! fed the event log from there, it rebuilds every window it held, emits nothing until it reaches the
//! point where that emission was made, and goes on as the original would have. Emitting a window again
//! with the same content is harmless: the table keeps the rows it has (see [`crate::lake`]).

pub mod window;

use std::sync::Arc;

use crate::edge::{EdgeError, Rx, Tx};
use crate::event::{EventBatch, FlowBatch, FlowRecord, ReplayPoint};
use crate::metrics::AggregateMetrics;
pub use window::{WindowConfig, WindowStats, Windows};

/// Settings of the aggregate stage.
#[derive(Clone, Debug)]
pub struct AggregateConfig {
    pub windows: WindowConfig,
    /// Name stamped on emitted batches (e.g. `agg-0`).
    pub producer: Arc<str>,
    /// Set when continuing after the last committed row rather than from an empty state.
    pub resume: Option<Resume>,
    /// Which flows this aggregator owns (all of them unless sharded).
    pub shard: Shard,
}

/// One of `count` aggregators, each owning the flows whose key hashes to its index: together they
/// count every flow exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Does this shard own the flow of `e`? The hash is fixed (FNV-1a over the key's fields), so every
    /// process agrees whatever its build or start order.
    pub fn owns(&self, node: &str, e: &crate::event::Event) -> bool {
        self.count <= 1 || crate::event::partition::partition_of(node, e, self.count) == self.index
    }
}

/// FNV-1a: a fixed hash every process and build agrees on (shards, sink parts).
pub(crate) struct Fnv(pub(crate) u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Where a restarted aggregator picks up: its input starts at `point.from_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub point: ReplayPoint,
    /// Number of the next emission (emissions are numbered across restarts).
    pub next_emission: u64,
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
    let mut windows = match &cfg.resume {
        Some(r) => Windows::resumed(cfg.windows, &r.point),
        None => Windows::new(cfg.windows),
    };
    let mut seq = cfg.resume.as_ref().map_or(0, |r| r.next_emission);
    // The checkpoint before the next emission: where it was rebuilt from, or the stream's start.
    let mut checkpoint = cfg
        .resume
        .as_ref()
        .map_or_else(ReplayPoint::default, |r| r.point.clone());
    let mut out: Vec<FlowRecord> = Vec::new();
    let mut published = WindowStats::default();
    loop {
        let batch = input.recv().await?;
        match &batch {
            Some(b) => {
                match &b.watermarks {
                    // A partition's share: the edge delivered only this shard's flows.
                    Some(marks) => {
                        windows.add_partition(&b.node, &b.events, b.position.clone(), marks)
                    }
                    None => windows.add(&b.node, &b.events, b.position.clone(), |e| {
                        cfg.shard.owns(&b.node, e)
                    }),
                }
                if let Some(clock) = b.clock_us {
                    windows.advance_clock(&b.node, clock);
                }
                windows.emit_ready(&mut out);
            }
            None => windows.emit_all(&mut out),
        }
        publish(metrics, &mut published, windows.stats());
        if !out.is_empty() {
            let records = std::mem::take(&mut out);
            let total_rows = u32::try_from(records.len()).unwrap_or(u32::MAX);
            // Taken after the emission: what a rebuild needs to continue from here.
            let replay = windows.replay_point();
            output
                .send(FlowBatch {
                    producer: Arc::clone(&cfg.producer),
                    seq,
                    records,
                    first_row: 0,
                    total_rows,
                    replay: replay.clone(),
                    replay_before: Some(std::mem::replace(&mut checkpoint, replay)),
                    shard_count: cfg.shard.count,
                    windows: Some(cfg.windows),
                })
                .await?;
            seq += 1;
        }
        if batch.is_none() {
            output.close(true).await?;
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
    m.late_folded.add(now.late_folded - last.late_folded);
    m.windows_rewritten
        .add(now.windows_rewritten - last.windows_rewritten);
    *last = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};
    use crate::edge::memory;
    use crate::event::Event;
    use std::collections::BTreeMap;

    const S: i64 = 1_000_000;

    fn events(n: u64) -> Vec<Event> {
        let mut src = Synthetic::new(
            "n".into(),
            SyntheticConfig {
                seed: 11,
                total: n,
                start_us: 0,
                // 120 s of event time: a dozen windows, many emissions.
                events_per_sim_sec: 500,
            },
        );
        let mut all = Vec::new();
        while let Some(b) = src.next_batch(4096) {
            all.extend(b.events);
        }
        all
    }

    fn config(resume: Option<Resume>, shard: Shard) -> AggregateConfig {
        AggregateConfig {
            windows: WindowConfig {
                window_us: 10 * S,
                allowed_lateness_us: 2 * S,
                horizon_us: 15 * S,
            },
            producer: "agg".into(),
            resume,
            shard,
        }
    }

    /// Runs the stage over `events` (batches of `batch`; positions are `seq`s) and returns what it
    /// emitted.
    async fn run_over(events: &[Event], batch: usize, cfg: AggregateConfig) -> Vec<FlowBatch> {
        let batches = events
            .chunks(batch)
            .map(|chunk| EventBatch::new("n".into(), chunk.to_vec(), None));
        run_batches(batches, cfg).await
    }

    /// Like [`run_over`], fed only partition `part` of `count` of every batch, as a capture that
    /// partitions its stream publishes it (a fresh capture: it knows no watermark before `events`).
    async fn run_over_partition(
        events: &[Event],
        batch: usize,
        part: u32,
        count: u32,
        cfg: AggregateConfig,
    ) -> Vec<FlowBatch> {
        let mut max_ts = i64::MIN;
        let batches: Vec<EventBatch> = events
            .chunks(batch)
            .map(|chunk| {
                let b = EventBatch::new("n".into(), chunk.to_vec(), None);
                crate::event::partition::split(&b, count, &mut max_ts).swap_remove(part as usize)
            })
            .collect();
        run_batches(batches, cfg).await
    }

    /// Runs the stage over `batches` and returns what it emitted.
    async fn run_batches(
        batches: impl IntoIterator<Item = EventBatch>,
        cfg: AggregateConfig,
    ) -> Vec<FlowBatch> {
        let gauge = Arc::new(crate::metrics::Gauge::default());
        let (mut tx, rx) = memory::channel("in", 1 << 16, Arc::clone(&gauge));
        let (otx, mut orx) = memory::channel("out", 1 << 16, gauge);
        for b in batches {
            tx.send(Arc::new(b)).await.unwrap();
        }
        drop(tx);
        run(cfg, rx, otx, &AggregateMetrics::default())
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(b) = orx.recv().await.unwrap() {
            out.push(b);
        }
        out
    }

    /// An aggregator fed only its partition makes every decision one fed the whole stream makes:
    /// the same emissions, row for row and at the same points (late folds, rewrites and drops
    /// beyond the horizon included), also when it is restarted from any emission's replay point
    /// and fed by a restarted capture that lost its watermark.
    #[tokio::test]
    async fn a_partitions_aggregator_emits_what_the_whole_streams_shard_emits() {
        let mut all = events(60_000);
        for i in (2_000..58_000).step_by(97) {
            // Late within the horizon (folded, windows emitted again) and beyond it (dropped).
            all[i].ts_us -= if i % 2 == 0 { 13 * S } else { 40 * S };
        }
        // Events just past the horizon by the node's watermark before them (moved by another
        // partition's event just before, 3 s ahead) but not by anything their own partition has seen:
        // only the per-event marks decide these as the whole stream does.
        let (w, h) = (10 * S, 15 * S);
        let part = |e: &Event| crate::event::partition::partition_of("n", e, 3);
        let mut edge_cases = 0;
        for k in 3..58 {
            let i = k * 1_000 + 700;
            if part(&all[i - 1]) == part(&all[i]) {
                continue;
            }
            let newest =
                |all: &[Event], to: usize| all[..to].iter().map(|e| e.ts_us).max().unwrap();
            all[i - 1].ts_us = newest(&all, i - 1) + 3 * S;
            let own = all[..i - 1]
                .iter()
                .filter(|e| part(e) == part(&all[i]))
                .map(|e| e.ts_us)
                .max()
                .unwrap();
            let end = (newest(&all, i) - h).div_euclid(w) * w;
            if end > own - h {
                all[i].ts_us = end - w + 1;
                edge_cases += 1;
            }
        }
        assert!(edge_cases >= 3, "{edge_cases}");
        let strip = |bs: &[FlowBatch]| -> Vec<(u64, Vec<FlowRecord>)> {
            bs.iter().map(|b| (b.seq, b.records.clone())).collect()
        };
        for part in 0..3 {
            let shard = Shard {
                index: part,
                count: 3,
            };
            let whole = run_over(&all, 1_000, config(None, shard)).await;
            let parted = run_over_partition(&all, 1_000, part, 3, config(None, shard)).await;
            assert!(whole.len() > 5);
            assert_eq!(strip(&parted), strip(&whole), "partition {part}");
            assert_eq!(
                parted.iter().map(|b| &b.replay).collect::<Vec<_>>(),
                whole.iter().map(|b| &b.replay).collect::<Vec<_>>()
            );
            // Restarted after emission i: the capture too (its watermark starts unknown again).
            let want = table_of(&whole);
            for i in [0, whole.len() / 3, whole.len() / 2, whole.len() - 2] {
                let last = &whole[i];
                let resume = Resume {
                    point: last.replay.clone(),
                    next_emission: last.seq + 1,
                };
                let from = last.replay.from_seq as usize;
                let mut t = table_of(&whole[..=i]);
                let rest =
                    run_over_partition(&all[from..], 1_000, part, 3, config(Some(resume), shard))
                        .await;
                for e in &rest {
                    apply(&mut t, e);
                }
                assert!(t == want, "partition {part} resumed after emission {i}");
            }
        }
    }

    type Table = BTreeMap<(i64, Arc<str>), Vec<FlowRecord>>;

    /// What a sink makes of emissions: the latest rows of every (window, node).
    fn apply(table: &mut Table, e: &FlowBatch) {
        let mut by: Table = BTreeMap::new();
        for r in &e.records {
            by.entry((r.window_start_us, Arc::clone(&r.key.node)))
                .or_default()
                .push(r.clone());
        }
        table.extend(by);
    }

    fn table_of(emissions: &[FlowBatch]) -> Table {
        let mut t = BTreeMap::new();
        for e in emissions {
            apply(&mut t, e);
        }
        t
    }

    #[tokio::test]
    async fn resuming_after_any_committed_emission_yields_the_same_table() {
        let mut all = events(60_000);
        // Late events (within and beyond the horizon) make rewrites and drops part of what must agree.
        all[30_000].ts_us -= 12 * S;
        all[45_000].ts_us -= 40 * S;
        let full = run_over(&all, 1_000, config(None, Shard::ALL)).await;
        let want = table_of(&full);
        assert!(full.len() > 5, "{}", full.len());
        assert!(want.values().map(Vec::len).sum::<usize>() > 2_000);
        // A restart after emissions 0..=i were committed, wherever i falls.
        for i in [0, 1, full.len() / 2, full.len() - 2, full.len() - 1] {
            let last = &full[i];
            let resume = Resume {
                point: last.replay.clone(),
                next_emission: last.seq + 1,
            };
            let from = last.replay.from_seq as usize;
            assert!(from as u64 <= last.replay.through_seq);
            // The committed table, then the resumed run over the log from its replay point, cut into
            // other batches than the first run's.
            let mut t = table_of(&full[..=i]);
            let rest = run_over(&all[from..], 333, config(Some(resume), Shard::ALL)).await;
            for e in &rest {
                assert!(e.seq > last.seq, "emissions are numbered on");
                apply(&mut t, e);
            }
            assert!(t == want, "table after resuming at emission {i} differs");
        }
    }

    /// A restart after emission i was only partly published (the sink drops those pieces when the
    /// next emission supersedes them): rebuilt from the checkpoint before it, which is what its pieces
    /// that do not complete it carry, the table comes out whole. Rebuilt from the point after it (what
    /// every piece used to carry), windows re-emitted in the pass that let them go lose their late
    /// rows for some i.
    #[tokio::test]
    async fn resuming_after_a_half_published_emission_rebuilds_it_whole() {
        let mut all = events(60_000);
        for i in (2_000..58_000).step_by(97) {
            // Late events near the horizon: windows emitted again in the pass that lets them go.
            all[i].ts_us -= 13 * S;
        }
        let full = run_over(&all, 1_000, config(None, Shard::ALL)).await;
        let want = table_of(&full);
        let mut lost_from_after = 0;
        for i in 0..full.len() {
            let e = &full[i];
            let before = e
                .replay_before
                .clone()
                .expect("the stage says its checkpoint");
            if i > 0 {
                assert_eq!(before, full[i - 1].replay);
            }
            for (point, from_before) in [(before, true), (e.replay.clone(), false)] {
                let from = point.from_seq as usize;
                let resume = Resume {
                    point,
                    next_emission: e.seq + 1,
                };
                let mut t = table_of(&full[..i]);
                for r in run_over(&all[from..], 333, config(Some(resume), Shard::ALL)).await {
                    apply(&mut t, &r);
                }
                if from_before {
                    assert!(t == want, "rebuilt from before half-published emission {i}");
                } else if t != want {
                    lost_from_after += 1;
                }
            }
        }
        assert!(
            lost_from_after > 0,
            "the case this guards against does not occur in this input"
        );
    }

    #[tokio::test]
    async fn shards_split_the_flows_and_together_equal_one_aggregator() {
        let mut all = events(60_000);
        all[30_000].ts_us -= 12 * S;
        all[45_000].ts_us -= 40 * S;
        let one: Vec<FlowRecord> = table_of(&run_over(&all, 1_000, config(None, Shard::ALL)).await)
            .into_values()
            .flatten()
            .collect();
        let mut parts = Vec::new();
        for index in 0..3 {
            let shard = Shard { index, count: 3 };
            let got: Vec<FlowRecord> = table_of(&run_over(&all, 777, config(None, shard)).await)
                .into_values()
                .flatten()
                .collect();
            assert!(
                !got.is_empty() && got.len() < one.len(),
                "shard {index} has a share"
            );
            parts.extend(got);
        }
        let key = |r: &FlowRecord| (r.window_start_us, r.key.clone());
        let mut one = one;
        one.sort_by_key(key);
        parts.sort_by_key(key);
        assert!(
            parts == one,
            "the shards' rows are exactly the single aggregator's"
        );
    }
}
