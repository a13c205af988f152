//! The flow record: one row per flow per window in the `flows/` dataset.

use std::net::IpAddr;
use std::sync::Arc;

use super::{Cgroup, Comm, Family, Pod, Role};

/// What identifies a flow within a window. The owning process is part of the key, so a 4-tuple reused
/// by another process within one window yields two rows rather than a mixed one; so are the socket's
/// role and the owner's cgroup path (one per cgroup id, but a path resolved for some events of a
/// cgroup and not others yields two rows rather than a guess).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub node: Arc<str>,
    pub pid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub cgroup: Option<Cgroup>,
    pub pod: Option<Pod>,
    pub role: Option<Role>,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
}

impl FlowKey {
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

/// What a projection is made with: window length, allowed lateness and late horizon, in microseconds.
/// Every aggregator feeding one `flows/` table must use the same, and the table records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    pub window_us: i64,
    pub allowed_lateness_us: i64,
    /// How long after the watermark passes a window it still takes late events (>= the lateness).
    pub horizon_us: i64,
}

impl WindowConfig {
    /// Window, allowed lateness and late horizon in seconds, as they are set (whole seconds).
    pub fn secs(&self) -> [i64; 3] {
        [self.window_us, self.allowed_lateness_us, self.horizon_us].map(|us| us / 1_000_000)
    }
}

/// One emission of the aggregate stage: the complete rows of every window it emits at one point (a
/// window's rows are never split across emissions), the unit the flows edge moves. A window emitted
/// again later (it gained events) replaces its earlier rows in the table. An edge that must cut an
/// emission into pieces (the broker's message size) marks each piece with its row offset.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowBatch {
    /// Who produced the batch (the aggregator's id, e.g. `agg-0`).
    pub producer: Arc<str>,
    /// Number of this emission in the producer's output; it continues across restarts.
    pub seq: u64,
    pub records: Vec<FlowRecord>,
    /// Offset of `records[0]` in the emission, and the emission's row count (a whole emission: 0 and
    /// `records.len()`).
    pub first_row: u32,
    pub total_rows: u32,
    /// How to rebuild the aggregator's state after these rows (see [`ReplayPoint`]). A piece that
    /// does not complete its emission carries [`Self::replay_before`] here instead: a checkpoint
    /// only moves past an emission once all of it is published (an aggregator restarted after a
    /// half-published one rebuilds it whole, windows let go in that pass included).
    pub replay: ReplayPoint,
    /// The aggregator's replay point before this emission (its previous emission's, or a rebuild
    /// from the start), for the pieces the emission may be cut into. Not on the wire (`None` when
    /// decoded): received pieces carry it as their `replay`.
    pub replay_before: Option<ReplayPoint>,
    /// How many aggregators share the flows (each owns those whose key hashes to its index): what a
    /// sink learns the shard count from. 0 in messages of older versions, which did not say.
    pub shard_count: u32,
    /// The settings the rows were made with: what a sink checks the table and the other aggregators
    /// against. `None` in messages of older versions, which did not say.
    pub windows: Option<WindowConfig>,
}

impl FlowBatch {
    /// Is this the last piece of its emission?
    pub fn completes(&self) -> bool {
        self.first_row as usize + self.records.len() >= self.total_rows as usize
    }
}

/// Where the aggregator must replay the event log from to rebuild every window it still holds, and
/// with which newest event time per node: seeded with those, the replay makes every lateness decision
/// as the original run did.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReplayPoint {
    /// Input position of the batch that opened the oldest window still held (mutable).
    pub from_seq: u64,
    /// Input consumed so far (next position): a rebuild emits nothing before it.
    pub through_seq: u64,
    /// Per node, the newest event time seen so far (µs).
    pub max_ts: Vec<(Arc<str>, i64)>,
    /// Per node, the `seq` after the last event consumed: the rows emitted so far count no event at
    /// or beyond it. A sink that does not write the event log itself (sharded sinks) waits for the
    /// table to hold each node's log up to here before it commits them. Empty in messages of older
    /// versions and in replay points read back from a table (a rebuild consumes the events again).
    pub events_through: Vec<(Arc<str>, u64)>,
}
