//! Tumbling event-time windows over per-flow state: when a window is emitted, when it is emitted again,
//! and when an event is too late to count. The rules depend only on the events of each node in input
//! order, so a replay of the event log makes exactly the decisions the original run made.
//!
//! * An event belongs to the window `[floor(ts / W) * W, + W)`; windows are per node.
//! * A node's **event-time watermark** is the newest event time seen from it so far.
//! * A window is **emitted** once the watermark minus the allowed lateness (or, for live sources, the
//!   capture clock minus the lateness) passes its end, or when the input ends. That decides only *when*
//!   rows appear, never what they count.
//! * A window stays **mutable** until the watermark minus the **late horizon** passes its end: an event
//!   for it until then is folded in, and the window is emitted again — its rows replace the earlier
//!   ones. An event later than the horizon is counted ([`WindowStats::late_events`]) and left out of
//!   the projection (never lost: the event log keeps it, and a replay with a larger horizon folds it in).
//! * The end of the input emits every window that has unemitted changes, without closing anything: a
//!   run that continues the input (a restart) folds further events into the same windows.
//!
//! [`Windows::replay_point`] says where the input must be replayed from to rebuild every window still
//! held, and the watermark per node to seed: the rebuild then emits nothing until it reaches the point
//! where the original stopped, and from there on behaves exactly as the original would have.
//!
//! A sharded aggregator folds only its share of the flows (`keep`) but lets every event move its node's
//! watermark, so each shard makes exactly the decisions a single aggregator would. One that receives
//! only its partition of the stream moves the watermark by the marks the partition carries instead
//! ([`Windows::add_partition`]), to the same effect.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::event::partition::Watermarks;
use crate::event::{Event, EventKind, FlowKey, FlowRecord, ReplayPoint};
use crate::sketch::RttSketch;

pub use crate::event::flow::WindowConfig;

/// Counters the window logic keeps; read for metrics and the end summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    pub events_in: u64,
    /// Events later than the horizon: in `events/`, not in `flows/`.
    pub late_events: u64,
    /// Events for a window already emitted, folded in (the window is emitted again).
    pub late_folded: u64,
    pub records_out: u64,
    /// Windows emitted for the first time.
    pub windows_closed: u64,
    /// Windows emitted again with more events.
    pub windows_rewritten: u64,
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

    fn to_record(&self, key: FlowKey, start: i64, end: i64) -> FlowRecord {
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

/// A flow's key within its node's windows: [`FlowKey`] without the node, which every flow of the node
/// shares (no name to hash per event; the cgroup and pod are hashed by their precomputed hashes).
/// Orders like `FlowKey` within a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LocalKey {
    pid: u32,
    comm: crate::event::Comm,
    cgroup_id: u64,
    cgroup: Option<crate::event::Cgroup>,
    pod: Option<crate::event::Pod>,
    role: Option<crate::event::Role>,
    local_addr: std::net::IpAddr,
    local_port: u16,
    remote_addr: std::net::IpAddr,
    remote_port: u16,
}

impl LocalKey {
    fn of(e: &Event) -> Self {
        LocalKey {
            pid: e.pid,
            comm: e.comm,
            cgroup_id: e.cgroup_id,
            cgroup: e.cgroup.clone(),
            pod: e.pod.clone(),
            role: e.role,
            local_addr: e.local_addr,
            local_port: e.local_port,
            remote_addr: e.remote_addr,
            remote_port: e.remote_port,
        }
    }

    fn with_node(&self, node: &Arc<str>) -> FlowKey {
        FlowKey {
            node: Arc::clone(node),
            pid: self.pid,
            comm: self.comm,
            cgroup_id: self.cgroup_id,
            cgroup: self.cgroup.clone(),
            pod: self.pod.clone(),
            role: self.role,
            local_addr: self.local_addr,
            local_port: self.local_port,
            remote_addr: self.remote_addr,
            remote_port: self.remote_port,
        }
    }
}

/// One window of one node: its flows, and where its events began.
#[derive(Debug)]
struct Window {
    flows: FxHashMap<LocalKey, FlowState>,
    /// Input position of the batch that opened the window.
    first_pos: u64,
    /// Emitted at least once.
    emitted: bool,
    /// Changed since it was last emitted.
    dirty: bool,
}

/// The windows of one node and its watermarks.
#[derive(Debug)]
struct Node {
    windows: BTreeMap<i64, Window>,
    /// Newest event time seen (µs).
    max_ts: i64,
    /// `seq` after the last event consumed (0: none yet).
    next_seq: u64,
    /// Windows ending at or before this are emitted (event time or capture clock, minus the lateness).
    emit_wm: i64,
    /// The window period (`emit_wm / W`) of the last pass that emitted changed windows again: they are
    /// emitted again at most once per period (a steady trickle of stragglers does not re-emit a window
    /// per batch), and always before they are let go.
    refire_period: i64,
    /// Flows in the node's last emitted window: a new window's table starts that large rather than
    /// growing (and rehashing) its way there under connection churn.
    flows_hint: usize,
}

impl Node {
    fn new(max_ts: i64, lateness: i64) -> Self {
        Node {
            windows: BTreeMap::new(),
            max_ts,
            next_seq: 0,
            emit_wm: max_ts.saturating_sub(lateness),
            refire_period: i64::MIN,
            flows_hint: 0,
        }
    }
}

/// Per-flow, per-window state of every node.
#[derive(Debug)]
pub struct Windows {
    cfg: WindowConfig,
    nodes: BTreeMap<Arc<str>, Node>,
    /// End of the input consumed so far (position).
    next_pos: u64,
    /// A rebuild emits nothing before this position (the original run had emitted it all).
    quiet_until: u64,
    stats: WindowStats,
}

impl Windows {
    pub fn new(cfg: WindowConfig) -> Self {
        assert!(cfg.window_us > 0, "window length must be positive");
        Windows {
            cfg,
            nodes: BTreeMap::new(),
            next_pos: 0,
            quiet_until: 0,
            stats: WindowStats::default(),
        }
    }

    /// Windows that rebuild from a [`ReplayPoint`]: its input comes from `point.from_seq`, with each
    /// node's watermark as it was, and nothing is emitted before `point.through_seq`.
    pub fn resumed(cfg: WindowConfig, point: &ReplayPoint) -> Self {
        let mut w = Windows::new(cfg);
        for (node, max_ts) in &point.max_ts {
            w.nodes.insert(
                Arc::clone(node),
                Node::new(*max_ts, cfg.allowed_lateness_us),
            );
        }
        // How far each node was consumed never goes back: a node whose windows were let go before
        // the replay point is not consumed again, and its rows emitted before still count its events.
        for (node, next) in &point.events_through {
            let state = w
                .nodes
                .entry(Arc::clone(node))
                .or_insert_with(|| Node::new(i64::MIN, cfg.allowed_lateness_us));
            state.next_seq = state.next_seq.max(*next);
        }
        w.next_pos = point.from_seq;
        w.quiet_until = point.through_seq;
        w
    }

    /// Where a replay must start to rebuild every window held now, and what has been consumed.
    pub fn replay_point(&self) -> ReplayPoint {
        let from_seq = self
            .nodes
            .values()
            .flat_map(|n| n.windows.values().map(|w| w.first_pos))
            .min()
            .unwrap_or(self.next_pos);
        ReplayPoint {
            from_seq,
            through_seq: self.next_pos,
            max_ts: self
                .nodes
                .iter()
                .map(|(n, s)| (Arc::clone(n), s.max_ts))
                .collect(),
            events_through: self
                .nodes
                .iter()
                .filter(|(_, s)| s.next_seq > 0)
                .map(|(n, s)| (Arc::clone(n), s.next_seq))
                .collect(),
        }
    }

    pub fn stats(&self) -> WindowStats {
        self.stats
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
        self.fold(node, events, position, None, keep);
    }

    /// Folds a partition's share of a node batch ([`crate::event::partition::split`]): every event
    /// is this aggregator's, and the node's watermark comes from `marks` (the other partitions'
    /// events move it too), so each decision is the one the whole stream makes.
    pub fn add_partition(
        &mut self,
        node: &Arc<str>,
        events: &[Event],
        position: std::ops::Range<u64>,
        marks: &Watermarks,
    ) {
        self.fold(node, events, position, Some(marks), |_| true);
    }

    fn fold(
        &mut self,
        node: &Arc<str>,
        events: &[Event],
        position: std::ops::Range<u64>,
        marks: Option<&Watermarks>,
        keep: impl Fn(&Event) -> bool,
    ) {
        let cfg = self.cfg;
        let rebuilding = position.start < self.quiet_until;
        let state = self
            .nodes
            .entry(Arc::clone(node))
            .or_insert_with(|| Node::new(i64::MIN, cfg.allowed_lateness_us));
        if let Some(last) = events.last() {
            // A node's events arrive in `seq` order: the last of a batch is its newest.
            state.next_seq = state.next_seq.max(last.seq + 1);
        }
        let before = marks.map_or(&[][..], |m| &m.before[..]);
        for (i, e) in events.iter().enumerate() {
            if let Some(&b) = before.get(i) {
                state.max_ts = state.max_ts.max(b);
            }
            let start = e.ts_us.div_euclid(cfg.window_us) * cfg.window_us;
            let end = start.saturating_add(cfg.window_us);
            let beyond_horizon = end <= state.max_ts.saturating_sub(cfg.horizon_us);
            state.max_ts = state.max_ts.max(e.ts_us);
            if !keep(e) {
                continue;
            }
            if !rebuilding {
                self.stats.events_in += 1;
            }
            if beyond_horizon {
                // Late for good. (In a rebuild, also the events of windows the original run had
                // already finalized: the table holds them as they are.)
                if !rebuilding {
                    self.stats.late_events += 1;
                }
                continue;
            }
            let hint = state.flows_hint;
            let window = state.windows.entry(start).or_insert_with(|| Window {
                flows: FxHashMap::with_capacity_and_hasher(hint, Default::default()),
                first_pos: position.start,
                emitted: false,
                dirty: false,
            });
            if window.emitted && !rebuilding {
                self.stats.late_folded += 1;
            }
            window.dirty = true;
            window
                .flows
                .entry(LocalKey::of(e))
                .or_default()
                .apply(&e.kind);
        }
        if let Some(m) = marks {
            state.max_ts = state.max_ts.max(m.after);
            state.next_seq = state.next_seq.max(m.next_seq);
        }
        state.emit_wm = state
            .emit_wm
            .max(state.max_ts.saturating_sub(cfg.allowed_lateness_us));
        self.next_pos = self.next_pos.max(position.end);
    }

    /// Moves a node's emission watermark forward by the capture clock (live sources: windows without
    /// traffic are emitted on time). It changes when rows appear, never what they count.
    pub fn advance_clock(&mut self, node: &Arc<str>, clock_us: i64) {
        let lateness = self.cfg.allowed_lateness_us;
        let state = self
            .nodes
            .entry(Arc::clone(node))
            .or_insert_with(|| Node::new(i64::MIN, lateness));
        state.emit_wm = state.emit_wm.max(clock_us.saturating_sub(lateness));
    }

    /// Appends the rows of every window due (its end passed by the emission watermark, and changed
    /// since it was last emitted), in window then key order; then lets go of the windows past the late
    /// horizon. Nothing while a rebuild has not reached where the original run stopped.
    pub fn emit_ready(&mut self, out: &mut Vec<FlowRecord>) {
        if self.next_pos < self.quiet_until {
            return;
        }
        self.emit(out, false);
        let (w, h) = (self.cfg.window_us, self.cfg.horizon_us);
        for state in self.nodes.values_mut() {
            let done = state.max_ts.saturating_sub(h);
            while let Some(entry) = state.windows.first_entry() {
                if entry.key().saturating_add(w) > done {
                    break;
                }
                entry.remove();
            }
        }
    }

    /// Appends the rows of every window with unemitted changes (end of input). Nothing is closed: more
    /// input (a restarted run) folds into the same windows.
    pub fn emit_all(&mut self, out: &mut Vec<FlowRecord>) {
        self.emit(out, true);
    }

    fn emit(&mut self, out: &mut Vec<FlowRecord>, all: bool) {
        let (w, h) = (self.cfg.window_us, self.cfg.horizon_us);
        // Due windows of every node, in window then node order (rows then sort by key within).
        let mut due: Vec<(i64, Arc<str>)> = Vec::new();
        for (node, state) in &mut self.nodes {
            let period = state.emit_wm.div_euclid(w);
            let refire = all || period > state.refire_period;
            if refire {
                state.refire_period = period;
            }
            let final_before = state.max_ts.saturating_sub(h);
            for (start, win) in &state.windows {
                if !win.dirty {
                    continue;
                }
                let end = start.saturating_add(w);
                let is_due = if win.emitted {
                    refire || end <= final_before
                } else {
                    all || end <= state.emit_wm
                };
                if is_due {
                    due.push((*start, Arc::clone(node)));
                }
            }
        }
        due.sort();
        for (start, node) in due {
            let state = self.nodes.get_mut(&node).expect("listed above");
            let win = state.windows.get_mut(&start).expect("listed above");
            if win.emitted {
                self.stats.windows_rewritten += 1;
            } else {
                self.stats.windows_closed += 1;
            }
            win.emitted = true;
            win.dirty = false;
            let flows = win.flows.len();
            let mut rows: Vec<(&LocalKey, &FlowState)> = win.flows.iter().collect();
            // Sorted so the same input always yields the same rows in the same order (stable files).
            rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
            self.stats.records_out += rows.len() as u64;
            out.extend(
                rows.into_iter()
                    .map(|(k, s)| s.to_record(k.with_node(&node), start, start + w)),
            );
            state.flows_hint = flows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};
    use crate::event::TcpState;

    const S: i64 = 1_000_000;

    /// How far each node was consumed never goes back, also across a rebuild from a replay point that
    /// starts after a node's last event (its windows were let go): a sharded sink waits on it.
    #[test]
    fn events_through_grows_per_node_and_survives_a_rebuild() {
        let mut w = Windows::new(cfg());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let ev = |seq: u64| Event::sample(seq, seq as i64 * S, EventKind::BytesSent { bytes: 1 });
        w.add(&a, &[ev(0), ev(1), ev(2)], 0..1, |_| true);
        w.add(&b, &[ev(7)], 1..2, |_| true);
        let point = w.replay_point();
        assert_eq!(point.events_through, vec![(a.clone(), 3), (b.clone(), 8)]);
        let mut resumed = Windows::resumed(cfg(), &point);
        resumed.add(&b, &[ev(8)], 2..3, |_| true);
        assert_eq!(resumed.replay_point().events_through, vec![(a, 3), (b, 9)]);
    }

    fn cfg() -> WindowConfig {
        WindowConfig {
            window_us: 10 * S,
            allowed_lateness_us: 2 * S,
            horizon_us: 20 * S,
        }
    }

    fn ev(seq: u64, ts_s: f64, kind: EventKind) -> Event {
        Event::sample(seq, (ts_s * S as f64) as i64, kind)
    }

    fn add(w: &mut Windows, node: &Arc<str>, events: &[Event]) {
        let pos = events.first().map_or(0, |e| e.seq)..events.last().map_or(0, |e| e.seq + 1);
        w.add(node, events, pos, |_| true);
    }

    fn sc(old: TcpState, new: TcpState) -> EventKind {
        EventKind::StateChange { old, new }
    }

    fn b(bytes: u64) -> EventKind {
        EventKind::BytesSent { bytes }
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
        w.emit_all(&mut out);
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
    fn a_window_is_emitted_when_due_and_again_when_it_gains_events_until_the_horizon() {
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        let mut out = Vec::new();
        add(&mut w, &node, &[ev(0, 5.0, b(1)), ev(1, 12.5, b(2))]);
        // Watermark 12.5 - 2 = 10.5: window [0, 10) is due.
        w.emit_ready(&mut out);
        assert_eq!(
            out.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(),
            vec![1]
        );
        out.clear();
        // 9.9 s is late for [0, 10) but within the 20 s horizon: folded. The window is emitted again
        // once the watermark enters the next window period (not per straggler).
        add(&mut w, &node, &[ev(2, 9.9, b(4)), ev(3, 11.0, b(8))]);
        w.emit_ready(&mut out);
        assert!(out.is_empty(), "{out:?}");
        add(&mut w, &node, &[ev(4, 22.5, b(64))]);
        w.emit_ready(&mut out);
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.window_start_us / S, r.bytes_sent))
            .collect();
        assert_eq!(got, vec![(0, 5), (10, 10)]);
        assert_eq!((w.stats().late_folded, w.stats().late_events), (1, 0));
        assert_eq!(w.stats().windows_rewritten, 1);
        out.clear();
        // Newest 35 s: [0, 10) is past the horizon (35 - 20 = 15 >= 10): an event for it is dropped.
        add(&mut w, &node, &[ev(5, 35.0, b(16)), ev(6, 1.0, b(32))]);
        assert_eq!(w.stats().late_events, 1);
        w.emit_all(&mut out);
        // [20, 30) (64) and [30, 40) (16); nothing for [0, 10).
        let mut got: Vec<_> = out
            .iter()
            .map(|r| (r.window_start_us / S, r.bytes_sent))
            .collect();
        got.sort();
        assert_eq!(got, vec![(20, 64), (30, 16)]);
        assert_eq!(w.stats().events_in, 7);
    }

    #[test]
    fn the_end_of_input_emits_without_closing_and_more_input_folds_in() {
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        let mut out = Vec::new();
        add(&mut w, &node, &[ev(0, 1.0, b(1))]);
        w.emit_all(&mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        // A run continuing the same input: the window takes the event and is emitted again.
        add(&mut w, &node, &[ev(1, 2.0, b(2))]);
        w.emit_all(&mut out);
        assert_eq!(
            out.iter().map(|r| r.bytes_sent).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(w.stats().late_events, 0);
    }

    #[test]
    fn a_slightly_out_of_order_event_within_lateness_is_in_the_first_emission() {
        let node: Arc<str> = "n".into();
        let mut w = Windows::new(cfg());
        // 11.0 s makes the watermark 9.0 s: window [0, 10) is not yet due for the 9.5 s event.
        add(&mut w, &node, &[ev(0, 11.0, b(1)), ev(1, 9.5, b(2))]);
        let mut out = Vec::new();
        w.emit_ready(&mut out);
        assert!(out.is_empty());
        w.emit_all(&mut out);
        assert_eq!(w.stats().late_folded, 0);
        assert_eq!(out.iter().map(|r| r.bytes_sent).sum::<u64>(), 3);
    }

    /// The table a sink keeps: the latest rows of every (window, node).
    fn table(emissions: &[Vec<FlowRecord>]) -> Vec<FlowRecord> {
        let mut t: BTreeMap<(i64, Arc<str>), Vec<FlowRecord>> = BTreeMap::new();
        for e in emissions {
            let mut by: BTreeMap<(i64, Arc<str>), Vec<FlowRecord>> = BTreeMap::new();
            for r in e {
                by.entry((r.window_start_us, Arc::clone(&r.key.node)))
                    .or_default()
                    .push(r.clone());
            }
            t.extend(by);
        }
        t.into_values().flatten().collect()
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
        let mut emissions = Vec::new();
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
            let mut out = Vec::new();
            w.emit_ready(&mut out);
            emissions.push(out);
        }
        let mut out = Vec::new();
        w.emit_all(&mut out);
        emissions.push(out);
        (table(&emissions), bytes)
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
