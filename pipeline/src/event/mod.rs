//! The domain model: one TCP telemetry [`Event`], batches of them, and the per-flow, per-window
//! [`FlowRecord`] the aggregate stage projects them into.
//!
//! The model is defined once and encoded three ways, each in its own submodule and tested against the
//! others: the kernel record ([`probe_common::TcpEvent`], decoded in [`kernel`]), this domain type, and
//! the explicit Arrow schemas of the two datasets ([`schema`]).

pub mod cgroup;
pub mod flow;
pub mod kernel;
pub mod partition;
pub mod pod;
pub mod schema;
mod shared;
mod tcp_state;

use std::net::IpAddr;
use std::sync::Arc;

pub use cgroup::Cgroup;
pub use flow::{FlowBatch, FlowKey, FlowRecord, ReplayPoint};
pub use pod::Pod;
pub use tcp_state::TcpState;

/// Address family of a connection, derived from its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// Which side of the connection this socket is: it connected (`client`), it was accepted on a
/// listener (`server`), or its start was not seen (`unknown`: it predates the capture).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    #[default]
    Unknown,
    Client,
    Server,
}

impl Role {
    /// The `role` column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Client => "client",
            Role::Server => "server",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [Role::Unknown, Role::Client, Role::Server]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// The kernel's numbering (`probe_common::ROLE_*`).
    pub fn from_kernel(n: u8) -> Option<Self> {
        match n {
            probe_common::ROLE_UNKNOWN => Some(Role::Unknown),
            probe_common::ROLE_CLIENT => Some(Role::Client),
            probe_common::ROLE_SERVER => Some(Role::Server),
            _ => None,
        }
    }

    pub fn to_kernel(self) -> u8 {
        match self {
            Role::Unknown => probe_common::ROLE_UNKNOWN,
            Role::Client => probe_common::ROLE_CLIENT,
            Role::Server => probe_common::ROLE_SERVER,
        }
    }
}

/// A process name (`task->comm`): at most 16 bytes, stored inline so events never allocate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Comm([u8; probe_common::COMM_LEN]);

impl Comm {
    /// Takes the bytes up to the first NUL (the kernel pads `comm` with NULs).
    pub fn from_bytes(raw: &[u8]) -> Self {
        let mut out = [0u8; probe_common::COMM_LEN];
        let len = raw
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw.len())
            .min(out.len());
        out[..len].copy_from_slice(&raw[..len]);
        Comm(out)
    }

    /// The raw, NUL-padded bytes.
    pub fn as_bytes(&self) -> &[u8; probe_common::COMM_LEN] {
        &self.0
    }

    /// Text form; bytes that are not UTF-8 are replaced (comm is set by the process and may be anything).
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..len])
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// What happened to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The socket moved from one TCP state to another.
    StateChange { old: TcpState, new: TcpState },
    /// A segment was retransmitted while the socket was in `state`.
    Retransmit { state: TcpState },
    /// A smoothed RTT / congestion window sample.
    RttSample { srtt_us: u32, snd_cwnd: u32 },
    /// The application wrote `bytes` to the socket.
    BytesSent { bytes: u64 },
    /// The application read `bytes` from the socket.
    BytesReceived { bytes: u64 },
}

impl EventKind {
    /// The `kind` column value in the `events/` dataset.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::StateChange { .. } => "state_change",
            EventKind::Retransmit { .. } => "retransmit",
            EventKind::RttSample { .. } => "rtt",
            EventKind::BytesSent { .. } => "bytes_sent",
            EventKind::BytesReceived { .. } => "bytes_received",
        }
    }
}

/// One TCP telemetry event, as every stage sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Position of this event in its node's stream (0, 1, 2, ...): with `node` it identifies the event.
    pub seq: u64,
    /// Event time, microseconds since the Unix epoch (UTC).
    pub ts_us: i64,
    /// Identifies one socket for its lifetime (kernel socket address; synthetic ids otherwise).
    pub sock_id: u64,
    /// cgroup v2 id of the owning task (0 when unknown).
    pub cgroup_id: u64,
    /// cgroup v2 path of the owning task, when known (shared by every event of the cgroup).
    pub cgroup: Option<Cgroup>,
    /// The Kubernetes names of the owner's pod, when capture runs with them and knows the pod.
    pub pod: Option<Pod>,
    /// Client, server or unknown side of the connection; `None` where it was not recorded (an event
    /// of schema version 2 or older: the `role` column reads null).
    pub role: Option<Role>,
    /// Process id of the owning task.
    pub pid: u32,
    /// Process name of the owning task.
    pub comm: Comm,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub kind: EventKind,
}

impl Event {
    pub fn family(&self) -> Family {
        Family::of(&self.local_addr)
    }

    /// One event of a fixed socket (`curl`, 10.0.0.1:40000 → 10.0.0.2:443), for unit tests.
    #[cfg(test)]
    pub fn sample(seq: u64, ts_us: i64, kind: EventKind) -> Self {
        Event {
            seq,
            ts_us,
            sock_id: 1,
            cgroup_id: 0,
            cgroup: None,
            pod: None,
            role: Some(Role::Client),
            pid: 7,
            comm: Comm::from_bytes(b"curl"),
            local_addr: "10.0.0.1".parse().unwrap(),
            local_port: 40_000,
            remote_addr: "10.0.0.2".parse().unwrap(),
            remote_port: 443,
            kind,
        }
    }
}

/// A batch of events from one node: the unit every edge moves.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    /// Name of the node that captured these events.
    pub node: Arc<str>,
    /// The events, in capture order; their `seq` values are consecutive.
    pub events: Vec<Event>,
    /// The capture clock when the batch was cut (µs, UTC), if the source has a live clock: lets the
    /// aggregator close windows while no traffic flows. Sources with simulated time leave it `None`, so
    /// their output never depends on the wall clock.
    pub clock_us: Option<i64>,
    /// Where the batch sits on the edge it arrived by, `[start, end)`: its events' `seq`s on memory
    /// edges and when read back from the log; the broker's stream sequence `[s, s + 1)` on a broker
    /// edge. The aggregator records it so a restart knows where to replay from.
    pub position: std::ops::Range<u64>,
    /// Wall-clock time (µs, UTC) capture handed the batch on: the start of its end-to-end latency,
    /// which the sink measures when the batch's rows are committed.
    pub sent_at_us: Option<i64>,
    /// Set on a partition's share of a node batch ([`partition::split`]): the node's watermark
    /// before each event and after the batch, which the share alone cannot know.
    pub watermarks: Option<Arc<partition::Watermarks>>,
}

impl EventBatch {
    /// A batch positioned by its events' `seq`s (consecutive, as capture numbers them).
    pub fn new(node: Arc<str>, events: Vec<Event>, clock_us: Option<i64>) -> Self {
        let position = match (events.first(), events.last()) {
            // Saturating: a batch decoded from a malformed message may carry any seq (found by
            // fuzzing: fuzz/regressions/wire/seq-at-u64-max).
            (Some(a), Some(b)) => a.seq..b.seq.saturating_add(1),
            _ => 0..0,
        };
        EventBatch {
            node,
            events,
            clock_us,
            position,
            sent_at_us: None,
            watermarks: None,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// How many of the first events an output already holds (`seq` below `next_seq`: delivered
    /// again), and the rest as a batch of their own (`None` if none is left; the batch itself if none
    /// is held, without a copy). The rest keeps the batch's position and times.
    pub fn unheld(self: &Arc<Self>, next_seq: u64) -> (usize, Option<Arc<Self>>) {
        let held = self.events.iter().take_while(|e| e.seq < next_seq).count();
        let rest = match held {
            0 => Some(Arc::clone(self)),
            n if n == self.events.len() => None,
            n => Some(Arc::new(EventBatch {
                node: Arc::clone(&self.node),
                events: self.events[n..].to_vec(),
                clock_us: self.clock_us,
                position: self.position.clone(),
                sent_at_us: self.sent_at_us,
                watermarks: self.watermarks.as_ref().map(|w| {
                    Arc::new(partition::Watermarks {
                        before: w.before[n.min(w.before.len())..].to_vec(),
                        after: w.after,
                        next_seq: w.next_seq,
                    })
                }),
            })),
        };
        (held, rest)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}
