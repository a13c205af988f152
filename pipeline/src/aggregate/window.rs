//! Tumbling event-time windows over per-flow state, with a watermark and a counted rule for late events.
//!
//! * An event belongs to the window `[floor(ts / W) * W, + W)`.
//! * The watermark is the largest event time seen so far minus the allowed lateness (and, for live
//!   sources, the capture clock minus the lateness). It only moves forward.
//! * An event whose window ended at or before the watermark is **late**: it is counted
//!   ([`WindowStats::late_events`]) and left out of the projection. It is never lost: the event log keeps
//!   it, and a replay with a larger lateness folds it in.
//! * A window is emitted once the watermark passes its end, or when the input ends.
//!
//! Lateness is decided per event against the watermark built from the events before it, so the output
//! depends only on the order of events, never on how they were cut into batches.
//!
//! Each open window remembers the input position of the batch that opened it and the watermark at that
//! batch's start ([`Windows::replay_point`]): replaying the input from there, with that watermark,
//! rebuilds every open window exactly (for sources whose watermark comes from event times alone).
//!
//! A sharded aggregator folds only its share of the flows (`keep`) but lets every on-time event move
//! the watermark, so each shard makes exactly the lateness decisions a single aggregator would.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::sketch::RttSketch;
use crate::event::{Event, EventKind, FlowKey, FlowRecord, ReplayPoint};

/// Window length and lateness, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    pub window_us: i64,
    pub allowed_lateness_us: i64,
}

/// Counters the window logic keeps; read for metrics and the end summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    pub events_in: u64,
    pub late_events: u64,
    pub records_out: u64,
    pub windows_closed: u64,
}

#[derive(Debug, Default)]
struct FlowState {
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u64,
    rtt: RttSketch,
    opened: u64,
    closed: u64,
    resets: u64,
    events: u64,
}

impl FlowState {
    fn apply(&mut self, kind: &EventKind) {
        self.events += 1;
        match *kind {
            EventKind::StateChange { old, new } => {
                use crate::event::TcpState::{Close, Established};
                if new == Established {
                    self.opened += 1;
                }
                if new == Close && old.was_established() {
                    self.closed += 1;
                    if old.is_open_data_state() {
                        self.resets += 1;
                    }
                }
            }
            EventKind::Retransmit { .. } => self.retransmits += 1,
            EventKind::RttSample { srtt_us, .. } => self.rtt.insert(srtt_us),
            EventKind::BytesSent { bytes } => self.bytes_sent += bytes,
            EventKind::BytesReceived { bytes } => self.bytes_received += bytes,
        }
    }

    fn into_record(self, key: FlowKey, start: i64, end: i64) -> FlowRecord {
        FlowRecord {
            window_start_us: start,
            window_end_us: end,
            key,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            retransmits: self.retransmits,
            rtt_samples: self.rtt.count(),
            rtt_min_us: self.rtt.min(),
            rtt_p50_us: self.rtt.quantile(0.50),
            rtt_p99_us: self.rtt.quantile(0.99),
            rtt_max_us: self.rtt.max(),
            connections_opened: self.opened,
            connections_closed: self.closed,
            resets: self.resets,
            events: self.events,
        }
    }
}

/// One open window: its flows, and where its events began.
#[derive(Debug)]
struct OpenWindow {
    flows: FxHashMap<FlowKey, FlowState>,
    /// Input position of the batch that opened the window.
    first_pos: u64,
    /// The watermark when that batch began.
    watermark_before: i64,
}

/// Per-flow, per-window state.
#[derive(Debug)]
pub struct Windows {
    cfg: WindowConfig,
    open: BTreeMap<i64, OpenWindow>,
    watermark: i64,
    /// End of the input consumed so far (position).
    next_pos: u64,
    stats: WindowStats,
}

impl Windows {
    pub fn new(cfg: WindowConfig) -> Self {
        assert!(cfg.window_us > 0, "window length must be positive");
        Windows {
            cfg,
            open: BTreeMap::new(),
            watermark: i64::MIN,
            next_pos: 0,
            stats: WindowStats::default(),
        }
    }

    /// Windows that resume a replay from a [`ReplayPoint`]: the watermark as it was there.
    pub fn resumed(cfg: WindowConfig, point: ReplayPoint) -> Self {
        let mut w = Windows::new(cfg);
        w.watermark = point.watermark_us;
        w.next_pos = point.from_seq;
        w
    }

    /// Where a replay must start to rebuild every window open now, and what has been consumed.
    pub fn replay_point(&self) -> ReplayPoint {
        let oldest = self
            .open
            .values()
            .min_by_key(|w| w.first_pos)
            .map(|w| (w.first_pos, w.watermark_before));
        let (from_seq, watermark_us) = oldest.unwrap_or((self.next_pos, self.watermark));
        ReplayPoint {
            from_seq,
            watermark_us,
            through_seq: self.next_pos,
            closing: false,
        }
    }

    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    fn window_start(&self, ts: i64) -> i64 {
        ts.div_euclid(self.cfg.window_us) * self.cfg.window_us
    }

    /// Folds one batch of a node's events, found at input `position`, into their windows: all of
    /// them, or (sharded) those `keep` selects.
    pub fn add(
        &mut self,
        node: &Arc<str>,
        events: &[Event],
        position: std::ops::Range<u64>,
        keep: impl Fn(&Event) -> bool,
    ) {
        let watermark_before = self.watermark;
        for e in events {
            let start = self.window_start(e.ts_us);
            let late = start.saturating_add(self.cfg.window_us) <= self.watermark;
            if !keep(e) {
                // Another shard's event: it only moves the watermark, as it would in one aggregator.
                if !late {
                    self.advance_to(e.ts_us.saturating_sub(self.cfg.allowed_lateness_us));
                }
                continue;
            }
            self.stats.events_in += 1;
            if late {
                self.stats.late_events += 1;
                continue;
            }
            let window = self.open.entry(start).or_insert_with(|| OpenWindow {
                flows: FxHashMap::default(),
                first_pos: position.start,
                watermark_before,
            });
            let key = FlowKey::of(node, e);
            window.flows.entry(key).or_default().apply(&e.kind);
            self.advance_to(e.ts_us.saturating_sub(self.cfg.allowed_lateness_us));
        }
        self.next_pos = self.next_pos.max(position.end);
    }

    /// Moves the watermark forward (never back), e.g. from a live capture clock.
    pub fn advance_to(&mut self, watermark: i64) {
        self.watermark = self.watermark.max(watermark);
    }

    /// Appends the records of every window the watermark has passed, in window then key order.
    pub fn drain_closed(&mut self, out: &mut Vec<FlowRecord>) {
        while let Some(entry) = self.open.first_entry() {
            if entry.key().saturating_add(self.cfg.window_us) > self.watermark {
                break;
            }
            let start = *entry.key();
            let window = entry.remove();
            self.emit(start, window.flows, out);
        }
    }

    /// Appends the records of every open window (end of input). The watermark moves past them: they
    /// are closed for good, and events for them that a resumed run sees are late.
    pub fn drain_all(&mut self, out: &mut Vec<FlowRecord>) {
        while let Some((start, window)) = self.open.pop_first() {
            self.advance_to(start.saturating_add(self.cfg.window_us));
            self.emit(start, window.flows, out);
        }
    }

    fn emit(
        &mut self,
        start: i64,
        flows: FxHashMap<FlowKey, FlowState>,
        out: &mut Vec<FlowRecord>,
    ) {
        let end = start + self.cfg.window_us;
        let mut flows: Vec<_> = flows.into_iter().collect();
        // Sorted so the same input always yields the same rows in the same order (stable files).
        flows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.stats.windows_closed += 1;
        self.stats.records_out += flows.len() as u64;
        out.extend(flows.into_iter().map(|(k, s)| s.into_record(k, start, end)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};
    use crate::event::{Comm, TcpState};

    const S: i64 = 1_000_000;

    fn cfg() -> WindowConfig {
        WindowConfig {
            window_us: 10 * S,
            allowed_lateness_us: 2 * S,
        }
    }

    fn ev(seq: u64, ts_s: f64, kind: EventKind) -> Event {
        Event {
            seq,
            ts_us: (ts_s * S as f64) as i64,
            sock_id: 1,
            cgroup_id: 0,
            pid: 7,
            comm: Comm::from_bytes(b"curl"),
            local_addr: "10.0.0.1".parse().unwrap(),
            local_port: 40_000,
            remote_addr: "10.0.0.2".parse().unwrap(),
            remote_port: 443,
            kind,
        }
    }

    fn add(w: &mut Windows, node: &Arc<str>, events: &[Event]) {
        let pos = events.first().map_or(0, |e| e.seq)..events.last().map_or(0, |e| e.seq + 1);
        w.add(node, events, pos, |_| true);
    }

    fn sc(old: TcpState, new: TcpState) -> EventKind {
        EventKind::StateChange { old, new }
    }

    #[test]
    fn counts_lifecycle_bytes_and_rtt() {
        use TcpState::*;
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        add(
            &mut w,
            &node,
            &[
                ev(0, 1.0, sc(SynSent, Established)),
                ev(1, 1.1, EventKind::BytesSent { bytes: 100 }),
                ev(2, 1.2, EventKind::BytesReceived { bytes: 50 }),
                ev(
                    3,
                    1.3,
                    EventKind::RttSample {
                        srtt_us: 200,
                        snd_cwnd: 10,
                    },
                ),
                ev(
                    4,
                    1.4,
                    EventKind::RttSample {
                        srtt_us: 400,
                        snd_cwnd: 10,
                    },
                ),
                ev(5, 1.5, EventKind::Retransmit { state: Established }),
                ev(6, 1.6, sc(Established, Close)),
                ev(7, 1.7, sc(SynSent, Established)),
                ev(8, 1.8, sc(Established, FinWait1)),
                ev(9, 1.9, sc(FinWait1, FinWait2)),
                ev(10, 2.0, sc(FinWait2, Close)),
                ev(11, 2.1, sc(SynSent, Close)), // connect refused: neither opened nor closed
            ],
        );
        let mut out = Vec::new();
        w.drain_all(&mut out);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!((r.window_start_us, r.window_end_us), (0, 10 * S));
        assert_eq!(
            (r.bytes_sent, r.bytes_received, r.retransmits),
            (100, 50, 1)
        );
        assert_eq!(
            (r.connections_opened, r.connections_closed, r.resets),
            (2, 2, 1)
        );
        assert_eq!(
            (r.rtt_samples, r.rtt_min_us, r.rtt_max_us),
            (2, Some(200), Some(400))
        );
        assert_eq!(r.events, 12);
    }

    #[test]
    fn late_events_are_counted_and_left_out() {
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        let b = |bytes| EventKind::BytesSent { bytes };
        add(&mut w, &node, &[ev(0, 5.0, b(1)), ev(1, 12.5, b(2))]);
        // Watermark 10.5 s: window [0, 10) is closed.
        let mut out = Vec::new();
        w.drain_closed(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes_sent, 1);
        // 9.9 s belongs to the closed window [0, 10): late. 11.0 s is on time.
        add(&mut w, &node, &[ev(2, 9.9, b(4)), ev(3, 11.0, b(8))]);
        assert_eq!(w.stats().late_events, 1);
        w.drain_all(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].bytes_sent, 2 + 8);
        assert_eq!(w.stats().events_in, 4);
    }

    #[test]
    fn a_slightly_out_of_order_event_within_lateness_is_not_late() {
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        let b = |bytes| EventKind::BytesSent { bytes };
        // 11.0 s moves the watermark to 9.0 s: window [0, 10) is still open for the 9.5 s event.
        add(&mut w, &node, &[ev(0, 11.0, b(1)), ev(1, 9.5, b(2))]);
        let mut out = Vec::new();
        w.drain_all(&mut out);
        assert_eq!(w.stats().late_events, 0);
        assert_eq!(out.iter().map(|r| r.bytes_sent).sum::<u64>(), 3);
    }

    fn project(batch: usize, events: u64) -> (Vec<FlowRecord>, u64) {
        let mut src = Synthetic::new(
            "n".into(),
            SyntheticConfig {
                seed: 5,
                total: events,
                start_us: 0,
                // 30 s of event time: several 10 s windows.
                events_per_sim_sec: 2_000,
            },
        );
        let mut w = Windows::new(cfg());
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(b) = src.next_batch(batch) {
            for e in &b.events {
                if let EventKind::BytesSent { bytes: n } | EventKind::BytesReceived { bytes: n } =
                    e.kind
                {
                    bytes += n;
                }
            }
            w.add(&b.node, &b.events, b.position.clone(), |_| true);
            w.drain_closed(&mut out);
        }
        w.drain_all(&mut out);
        (out, bytes)
    }

    #[test]
    fn projection_is_independent_of_batching_and_conserves_bytes() {
        let (a, bytes) = project(1, 60_000);
        let (b, _) = project(997, 60_000);
        let (c, _) = project(60_000, 60_000);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(a.len() > 1_000, "many flows: {}", a.len());
        let windows: std::collections::BTreeSet<_> = a.iter().map(|r| r.window_start_us).collect();
        assert!(windows.len() >= 2, "spans several windows");
        let projected: u64 = a.iter().map(|r| r.bytes_sent + r.bytes_received).sum();
        assert_eq!(projected, bytes);
        assert_eq!(a.iter().map(|r| r.events).sum::<u64>(), 60_000);
    }
}
