//! The aggregate stage: event batches in, flow-record batches out.
//!
//! Contract: every event received is either folded into exactly one flow record or counted as late;
//! records leave in window order once the watermark passes their window, and everything still open is
//! flushed when the input ends. The stage does not know what feeds it or where records go.
//!
//! After a restart it is started from the last committed flow row ([`Resume`]): fed the event log from
//! that row's replay point, it rebuilds the open windows and skips the rows already committed.

pub mod sketch;
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
    /// Upper bound on records per emitted batch.
    pub max_batch_records: usize,
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
        if self.count <= 1 {
            return true;
        }
        let mut h = Fnv::default();
        h.bytes(node.as_bytes());
        h.bytes(&e.pid.to_le_bytes());
        h.bytes(e.comm.as_bytes());
        h.bytes(&e.cgroup_id.to_le_bytes());
        for (addr, port) in [(e.local_addr, e.local_port), (e.remote_addr, e.remote_port)] {
            match addr {
                std::net::IpAddr::V4(a) => h.bytes(&a.octets()),
                std::net::IpAddr::V6(a) => h.bytes(&a.octets()),
            }
            h.bytes(&port.to_le_bytes());
        }
        h.0 % u64::from(self.count) == u64::from(self.index)
    }
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Where a restarted aggregator picks up: its input starts at `point.from_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub point: ReplayPoint,
    /// The last committed row, `(window_start_us, rank)`: it and every row before it are not emitted.
    pub committed_through: (i64, u32),
}

/// Ranks rows within their window and drops those a previous run already committed.
#[derive(Debug, Default)]
struct Ranker {
    window: Option<i64>,
    next_rank: u32,
    skip_through: Option<(i64, u32)>,
}

impl Ranker {
    /// The row's rank, or `None` if it was committed before.
    fn rank(&mut self, r: &FlowRecord) -> Option<u32> {
        if self.window != Some(r.window_start_us) {
            self.window = Some(r.window_start_us);
            self.next_rank = 0;
        }
        let rank = self.next_rank;
        self.next_rank += 1;
        match self.skip_through {
            Some(done) if (r.window_start_us, rank) <= done => None,
            _ => Some(rank),
        }
    }
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
    let mut windows = match cfg.resume {
        Some(r) => Windows::resumed(cfg.windows, r.point),
        None => Windows::new(cfg.windows),
    };
    let mut ranker = Ranker {
        skip_through: cfg.resume.map(|r| r.committed_through),
        ..Ranker::default()
    };
    // The previous run ended in a final flush that was not all committed: redo it once the replay
    // has brought the windows back to where they were.
    let mut reflush_at = cfg
        .resume
        .filter(|r| r.point.closing)
        .map(|r| r.point.through_seq);
    let mut seq = 0u64;
    let mut closed: Vec<FlowRecord> = Vec::new();
    let mut published = WindowStats::default();
    let mut started = false;
    loop {
        let batch = if started || reflush_at.is_none() {
            input.recv().await?
        } else {
            // Nothing may need replaying before the redone flush: check before the first receive.
            Some(Arc::new(EventBatch::new(
                Arc::clone(&cfg.producer),
                Vec::new(),
                None,
            )))
        };
        started = true;
        let mut replay;
        match &batch {
            Some(b) => {
                windows.add(&b.node, &b.events, b.position.clone(), |e| {
                    cfg.shard.owns(&b.node, e)
                });
                if let Some(clock) = b.clock_us {
                    windows.advance_to(clock.saturating_sub(cfg.windows.allowed_lateness_us));
                }
                // Taken before the drain: replaying from here rebuilds the windows about to close too.
                replay = windows.replay_point();
                if reflush_at.is_some_and(|at| windows.replay_point().through_seq >= at) {
                    reflush_at = None;
                    replay.closing = true;
                    windows.drain_all(&mut closed);
                } else {
                    windows.drain_closed(&mut closed);
                }
            }
            None => {
                // Every window closes now (a later run treats events for them as late).
                replay = windows.replay_point();
                replay.closing = true;
                windows.drain_all(&mut closed);
            }
        }
        publish(metrics, &mut published, windows.stats());
        let mut ranked = std::mem::take(&mut closed)
            .into_iter()
            .filter_map(|r| ranker.rank(&r).map(|rank| (r, rank)))
            .peekable();
        while ranked.peek().is_some() {
            let (records, ranks) = ranked.by_ref().take(cfg.max_batch_records.max(1)).unzip();
            let out = FlowBatch {
                producer: Arc::clone(&cfg.producer),
                seq,
                records,
                ranks,
                replay,
                shard_count: cfg.shard.count,
            };
            seq += 1;
            output.send(out).await?;
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
    *last = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};
    use crate::edge::memory;
    use crate::event::Event;

    const S: i64 = 1_000_000;

    fn events(n: u64) -> Vec<Event> {
        let mut src = Synthetic::new(
            "n".into(),
            SyntheticConfig {
                seed: 11,
                total: n,
                start_us: 0,
                events_per_sim_sec: 2_000,
            },
        );
        let mut all = Vec::new();
        while let Some(b) = src.next_batch(4096) {
            all.extend(b.events);
        }
        all
    }

    /// Runs the stage over `events` (batches of `batch`) and returns what it emitted.
    async fn run_over(events: &[Event], batch: usize, resume: Option<Resume>) -> Vec<FlowBatch> {
        run_shard(events, batch, resume, Shard::ALL).await
    }

    async fn run_shard(
        events: &[Event],
        batch: usize,
        resume: Option<Resume>,
        shard: Shard,
    ) -> Vec<FlowBatch> {
        let cfg = AggregateConfig {
            windows: WindowConfig {
                window_us: 10 * S,
                allowed_lateness_us: 2 * S,
            },
            producer: "agg".into(),
            max_batch_records: 500,
            resume,
            shard,
        };
        let gauge = Arc::new(crate::metrics::Gauge::default());
        let (mut tx, rx) = memory::channel("in", 1 << 16, Arc::clone(&gauge));
        let (otx, mut orx) = memory::channel("out", 1 << 16, gauge);
        for chunk in events.chunks(batch) {
            let b = EventBatch::new("n".into(), chunk.to_vec(), None);
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

    fn rows(batches: &[FlowBatch]) -> Vec<(FlowRecord, u32, ReplayPoint)> {
        batches
            .iter()
            .flat_map(|b| {
                b.records
                    .iter()
                    .cloned()
                    .zip(b.ranks.iter().copied())
                    .map(|(r, k)| (r, k, b.replay))
            })
            .collect()
    }

    #[tokio::test]
    async fn resuming_after_any_committed_row_emits_exactly_the_rest() {
        let all = events(60_000);
        let full = rows(&run_over(&all, 1_000, None).await);
        assert!(full.len() > 2_000, "{}", full.len());
        // A restart after rows 0..=i were committed, wherever i falls (mid-window, mid-batch, last).
        for i in [0, 1, 777, full.len() / 2, full.len() - 2] {
            let (last, rank, point) = &full[i];
            let resume = Resume {
                point: *point,
                committed_through: (last.window_start_us, *rank),
            };
            let from = point.from_seq as usize;
            assert!(from <= point.through_seq as usize);
            // The replayed log from `from`, cut into other batches than the first run's.
            let rest = rows(&run_over(&all[from..], 333, Some(resume)).await);
            let expected: Vec<_> = full[i + 1..].iter().map(|(r, k, _)| (r, k)).collect();
            let got: Vec<_> = rest.iter().map(|(r, k, _)| (r, k)).collect();
            assert_eq!(got.len(), expected.len(), "after row {i}");
            assert!(got == expected, "rows after row {i} differ");
        }
    }

    #[tokio::test]
    async fn shards_split_the_flows_and_together_equal_one_aggregator() {
        let mut all = events(60_000);
        // A few late events, so lateness decisions are part of what must agree.
        all[30_000].ts_us -= 15 * S;
        all[45_000].ts_us -= 15 * S;
        let key = |r: &FlowRecord| (r.window_start_us, r.key.clone());
        let mut one: Vec<_> = rows(&run_over(&all, 1_000, None).await)
            .into_iter()
            .map(|(r, _, _)| r)
            .collect();
        let mut parts = Vec::new();
        for index in 0..3 {
            let shard = Shard { index, count: 3 };
            let got = rows(&run_shard(&all, 777, None, shard).await);
            assert!(
                !got.is_empty() && got.len() < one.len(),
                "shard {index} has a share"
            );
            parts.extend(got.into_iter().map(|(r, _, _)| r));
        }
        one.sort_by_key(key);
        parts.sort_by_key(key);
        assert!(
            parts == one,
            "the shards' rows are exactly the single aggregator's"
        );
    }

    #[test]
    fn ranks_restart_per_window_and_skip_what_was_committed() {
        let rec = |w: i64| FlowRecord {
            window_start_us: w,
            window_end_us: w + 1,
            key: crate::event::FlowKey {
                node: "n".into(),
                pid: 1,
                comm: crate::event::Comm::from_bytes(b"x"),
                cgroup_id: 0,
                local_addr: "127.0.0.1".parse().unwrap(),
                local_port: 1,
                remote_addr: "127.0.0.1".parse().unwrap(),
                remote_port: 2,
            },
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            rtt_samples: 0,
            rtt_min_us: None,
            rtt_p50_us: None,
            rtt_p99_us: None,
            rtt_max_us: None,
            connections_opened: 0,
            connections_closed: 0,
            resets: 0,
            events: 0,
        };
        let mut r = Ranker {
            skip_through: Some((10, 1)),
            ..Ranker::default()
        };
        let got: Vec<_> = [0, 10, 10, 10, 20]
            .iter()
            .map(|&w| r.rank(&rec(w)))
            .collect();
        assert_eq!(got, vec![None, None, None, Some(2), Some(0)]);
    }
}
