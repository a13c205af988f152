//! The flow record: one row per flow per window in the `flows/` dataset.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Comm, Event, Family};

/// What identifies a flow within a window. The owning process is part of the key, so a 4-tuple reused
/// by another process within one window yields two rows rather than a mixed one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub node: Arc<str>,
    pub pid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
}

impl FlowKey {
    pub fn of(node: &Arc<str>, e: &Event) -> Self {
        FlowKey {
            node: Arc::clone(node),
            pid: e.pid,
            comm: e.comm,
            cgroup_id: e.cgroup_id,
            local_addr: e.local_addr,
            local_port: e.local_port,
            remote_addr: e.remote_addr,
            remote_port: e.remote_port,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.local_addr)
    }
}

/// One flow in one tumbling window. See `docs/data-model.md` for every column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// Inclusive start of the window, µs since the epoch (UTC).
    pub window_start_us: i64,
    /// Exclusive end of the window, µs since the epoch (UTC).
    pub window_end_us: i64,
    pub key: FlowKey,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    /// Number of RTT samples in the window; the RTT columns are `None` when it is 0.
    pub rtt_samples: u64,
    pub rtt_min_us: Option<u32>,
    pub rtt_p50_us: Option<u32>,
    pub rtt_p99_us: Option<u32>,
    pub rtt_max_us: Option<u32>,
    /// Transitions into `ESTABLISHED`.
    pub connections_opened: u64,
    /// Transitions into `CLOSE` from a state reached only after establishment.
    pub connections_closed: u64,
    /// Aborts: `ESTABLISHED`/`CLOSE_WAIT` straight to `CLOSE` (RST sent or received).
    pub resets: u64,
    /// Events folded into this record.
    pub events: u64,
}

/// Flow records cut by the aggregate stage: the unit the flows edge moves.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowBatch {
    /// Who produced the batch (the aggregator's id, e.g. `agg-0`).
    pub producer: Arc<str>,
    /// Position of this batch in the producer's output (0, 1, 2, ...).
    pub seq: u64,
    pub records: Vec<FlowRecord>,
    /// Rank of each record among its window's rows (which leave sorted, window by window).
    pub ranks: Vec<u32>,
    /// How to emit these records again after a restart (see `sink::commit`).
    pub replay: ReplayPoint,
    /// How many aggregators share the flows (each owns those whose key hashes to its index): what a
    /// sink learns the shard count from. 0 in messages of older versions, which did not say.
    pub shard_count: u32,
}

/// Where the aggregator must replay the event log from to rebuild the state these records came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplayPoint {
    /// First event `seq` of the oldest window that was still open.
    pub from_seq: u64,
    /// The watermark just before that event: seeding it makes every lateness decision come out the same.
    pub watermark_us: i64,
    /// Events consumed so far (next `seq`).
    pub through_seq: u64,
    /// The records came from the final flush at the end of the input: a resumed run replays up to
    /// `through_seq` and flushes again, instead of waiting for the watermark.
    pub closing: bool,
}
