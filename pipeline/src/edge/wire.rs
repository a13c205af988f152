//! The wire format of batches crossing a process boundary (the broker edge): versioned, compact, and
//! many events per message (the broker moves ~100 k messages/s; the pipeline moves millions of events).
//!
//! ```text
//! header (12 bytes): b"TLW" | version u8 | kind u8 (1 events, 2 flows, 3 partition) | codec u8 (0 raw, 1 zstd)
//!                    | extra u16 | body length before compression u32 (little endian)
//! extra: flows: the producer's shard count (0: not said, as in messages of older builds); events: 0
//! body: the batch, fixed-width little-endian fields; strings as u16 length + UTF-8
//! ```
//!
//! Version 3 added who is talking: an event batch lists its distinct cgroup paths and pods (five
//! names each) once, before its events, and each event says its role and the index of its path and of
//! its pod in the lists (0: none); a flow record says its role, cgroup path and pod names.
//!
//! Version 4 added, to flows, the settings the aggregator made them with (window, allowed lateness,
//! late horizon), after the replay point: a sink learns them from the data, as it learns the shard
//! count. Event batches are unchanged, and still written as version 3.
//!
//! Kind 3, a partition's share of a node batch (partitioned streams), is an event body followed by
//! the node's watermarks: the `seq` after the node batch (u64), the node's newest event time after it
//! (i64), and before each event (the first as i64, then each as its u64 increase).
//!
//! Decoding checks everything and says what was wrong ([`WireError`]); a message that fails is counted
//! and dead-lettered by the edge, never half-applied.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::event::cgroup::Paths;
use crate::event::flow::WindowConfig;
use crate::event::pod::Pods;
use crate::event::{
    Cgroup, Comm, Event, EventBatch, EventKind, FlowBatch, FlowKey, FlowRecord, Pod, ReplayPoint,
    Role, TcpState,
};

const MAGIC: &[u8; 3] = b"TLW";
/// The newest version this build reads and the one it writes flows in. It reads events of versions 1
/// and 2 too (without role and cgroup path: `unknown` and none), and flows of versions 2 and 3
/// (without the settings they were made with) and 4 (without how far each node's events were
/// consumed, which only sharded sinks need: they refuse such batches); flows of version 1 (ranked rows, another replay
/// point) are refused: drain the flows stream of an older tcplake before upgrading its aggregators.
/// An older build refuses a newer version's messages (dead-lettered, counted): upgrade consumers
/// first.
pub const VERSION: u8 = 5;
/// Event batches are written in version 3: versions 4 and 5 changed only flows, so a sink or aggregator of
/// version 3 still reads an upgraded capture's events.
const EVENTS_VERSION: u8 = 3;
const KIND_EVENTS: u8 = 1;
const KIND_FLOWS: u8 = 2;
/// A partition's share of a node batch, with the node's watermarks (see [`encode_partition`]).
const KIND_PARTITION: u8 = 3;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const HEADER: usize = 12;
/// Largest body accepted (decompression bomb guard): far above any batch tcplake cuts.
const MAX_BODY: usize = 256 << 20;

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a tcplake message (bad magic)")]
    Magic,
    #[error(
        "unsupported wire version {0} (this build reads versions 2 to {VERSION}, and version 1 events)"
    )]
    Version(u8),
    #[error("expected a {expected} message, got kind {found}")]
    Kind { expected: &'static str, found: u8 },
    #[error("unknown codec {0}")]
    Codec(u8),
    #[error("body of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("zstd")]
    Decompress(#[source] std::io::Error),
    #[error("truncated: {0}")]
    Truncated(&'static str),
    #[error("invalid {field}: {value}")]
    Invalid { field: &'static str, value: u64 },
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn addr(&mut self, a: &IpAddr) {
        match a {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.to_ipv6_mapped().octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
    }
    fn comm(&mut self, c: &Comm) {
        self.0.extend_from_slice(c.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn str(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid {
            field: what,
            value: n as u64,
        })
    }
    fn addr(&mut self, what: &'static str) -> Result<IpAddr, WireError> {
        let family = self.u8(what)?;
        let raw: [u8; 16] = self.take(16, what)?.try_into().unwrap();
        match family {
            4 => Ok(IpAddr::V4(
                Ipv6Addr::from(raw)
                    .to_ipv4_mapped()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
            )),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(raw))),
            f => Err(WireError::Invalid {
                field: what,
                value: u64::from(f),
            }),
        }
    }
    fn comm(&mut self) -> Result<Comm, WireError> {
        Ok(Comm::from_bytes(self.take(probe_common::COMM_LEN, "comm")?))
    }
}

/// Does `msg` start like a tcplake message (magic and version)? Cheap; decoding says the rest.
pub fn is_batch(msg: &[u8]) -> bool {
    msg.len() >= HEADER && &msg[..3] == MAGIC && (1..=VERSION).contains(&msg[3])
}

fn frame(kind: u8, body: Vec<u8>, compress: bool, extra: u16) -> Vec<u8> {
    let version = if kind == KIND_EVENTS {
        EVENTS_VERSION
    } else {
        VERSION
    };
    let body_len = body.len();
    let (codec, payload) = match compress {
        // Level 1: several hundred MB/s; event batches shrink ~4x, which is what crosses the network.
        true => (
            CODEC_ZSTD,
            zstd::bulk::compress(&body, 1).expect("zstd compresses any input"),
        ),
        // Uncompressed, the body is the payload: no copy of it but the one into the message.
        false => (CODEC_RAW, body),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version, kind, codec]);
    out.extend_from_slice(&extra.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Fewest body bytes one event or flow record can take (fixed-width fields alone).
const MIN_EVENT_BYTES: usize = 64;
const MIN_FLOW_BYTES: usize = 64;

/// A message's body (borrowed from it when uncompressed: decoding reads it in place), its header's
/// `extra` field and its version.
fn unframe<'m>(
    msg: &'m [u8],
    kind: u8,
    expected: &'static str,
) -> Result<(std::borrow::Cow<'m, [u8]>, u16, u8), WireError> {
    if msg.len() < HEADER || &msg[..3] != MAGIC {
        return Err(WireError::Magic);
    }
    let readable = (2..=VERSION).contains(&msg[3]) || (msg[3] == 1 && kind == KIND_EVENTS);
    if !readable {
        return Err(WireError::Version(msg[3]));
    }
    if msg[4] != kind {
        return Err(WireError::Kind {
            expected,
            found: msg[4],
        });
    }
    let extra = u16::from_le_bytes(msg[6..8].try_into().unwrap());
    let len = u32::from_le_bytes(msg[8..12].try_into().unwrap()) as usize;
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    let payload = &msg[HEADER..];
    let body = match msg[5] {
        CODEC_RAW if payload.len() == len => Ok(std::borrow::Cow::Borrowed(payload)),
        CODEC_RAW => Err(WireError::Truncated("body")),
        CODEC_ZSTD => {
            let body = zstd::bulk::decompress(payload, len).map_err(WireError::Decompress)?;
            if body.len() != len {
                return Err(WireError::Truncated("body"));
            }
            Ok(std::borrow::Cow::Owned(body))
        }
        c => Err(WireError::Codec(c)),
    }?;
    Ok((body, extra, msg[3]))
}

/// Encodes an event batch (its position is the edge's business, not the message's).
pub fn encode_events(b: &EventBatch, compress: bool) -> Vec<u8> {
    frame(KIND_EVENTS, events_body(b).0, compress, 0)
}

/// Encodes a partition's share of a node batch: the events, then its watermarks (see
/// [`crate::event::partition`]): the `seq` after the node batch, the node's newest event time after
/// it, and before each event (the first as is, then each as its increase over the one before: a
/// running maximum, so mostly zero).
pub fn encode_partition(b: &EventBatch, compress: bool) -> Vec<u8> {
    let mut w = events_body(b);
    let marks = b.watermarks.as_deref().cloned().unwrap_or_default();
    w.u64(marks.next_seq);
    w.i64(marks.after);
    let mut last = i64::MIN;
    for (i, &before) in marks.before.iter().enumerate() {
        match i {
            0 => w.i64(before),
            _ => w.u64(before.wrapping_sub(last) as u64),
        }
        last = before;
    }
    frame(KIND_PARTITION, w.0, compress, 0)
}

fn events_body(b: &EventBatch) -> Writer {
    let mut w = Writer(Vec::with_capacity(64 + b.events.len() * 110));
    w.str(&b.node);
    match b.clock_us {
        Some(c) => {
            w.u8(1);
            w.i64(c);
        }
        None => {
            w.u8(0);
            w.i64(0);
        }
    }
    w.u8(u8::from(b.sent_at_us.is_some()));
    w.i64(b.sent_at_us.unwrap_or(0));
    // The batch's distinct cgroups and pods, each once (a batch holds a few): events name them by
    // index + 1.
    let (cgroups, index) = distinct(b.events.iter().map(|e| e.cgroup.as_ref()));
    w.u32(cgroups.len() as u32);
    for c in &cgroups {
        w.str(c.path());
    }
    let (pods, pod_index) = distinct(b.events.iter().map(|e| e.pod.as_ref()));
    w.u32(pods.len() as u32);
    for p in &pods {
        write_pod(&mut w, p);
    }
    w.u32(b.events.len() as u32);
    for ((e, cgroup), pod) in b.events.iter().zip(index).zip(pod_index) {
        w.u64(e.seq);
        w.i64(e.ts_us);
        w.u64(e.sock_id);
        w.u64(e.cgroup_id);
        w.u32(e.pid);
        w.comm(&e.comm);
        w.addr(&e.local_addr);
        w.u16(e.local_port);
        w.addr(&e.remote_addr);
        w.u16(e.remote_port);
        let (tag, a, b) = match e.kind {
            EventKind::StateChange { old, new } => (1, old as u64, new as u64),
            EventKind::Retransmit { state } => (2, state as u64, 0),
            EventKind::RttSample { srtt_us, snd_cwnd } => {
                (3, u64::from(srtt_us), u64::from(snd_cwnd))
            }
            EventKind::BytesSent { bytes } => (4, bytes, 0),
            EventKind::BytesReceived { bytes } => (5, bytes, 0),
        };
        w.u8(tag);
        w.u64(a);
        w.u64(b);
        w.u8(role_byte(e.role));
        w.u32(cgroup);
        w.u32(pod);
    }
    w
}

/// The distinct values of `rows`, in first-seen order, and each row's index + 1 among them (0: none).
fn distinct<'a, T: std::hash::Hash + Eq>(
    rows: impl ExactSizeIterator<Item = Option<&'a T>>,
) -> (Vec<&'a T>, Vec<u32>) {
    let mut values: Vec<&T> = Vec::new();
    let mut known: rustc_hash::FxHashMap<&T, u32> = Default::default();
    let mut index = Vec::with_capacity(rows.len());
    for row in rows {
        index.push(match row {
            None => 0,
            Some(v) => *known.entry(v).or_insert_with(|| {
                values.push(v);
                values.len() as u32
            }),
        });
    }
    (values, index)
}

/// Decodes an event batch; `position` is set to the range of its events' `seq`s.
pub fn decode_events(msg: &[u8]) -> Result<EventBatch, WireError> {
    let (body, _, version) = unframe(msg, KIND_EVENTS, "events")?;
    let mut r = Reader(&body);
    let batch = read_events(&mut r, version)?;
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(batch)
}

/// Decodes a partition's share of a node batch ([`encode_partition`]), watermarks included.
pub fn decode_partition(msg: &[u8]) -> Result<EventBatch, WireError> {
    let (body, _, version) = unframe(msg, KIND_PARTITION, "partition")?;
    let mut r = Reader(&body);
    let mut batch = read_events(&mut r, version)?;
    let next_seq = r.u64("next seq")?;
    let after = r.i64("watermark after")?;
    let mut before = Vec::with_capacity(batch.events.len());
    let mut last = i64::MIN;
    for i in 0..batch.events.len() {
        last = match i {
            0 => r.i64("watermark before")?,
            _ => last.wrapping_add(r.u64("watermark before")? as i64),
        };
        before.push(last);
    }
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    batch.watermarks = Some(Arc::new(crate::event::partition::Watermarks {
        before,
        after,
        next_seq,
    }));
    Ok(batch)
}

fn read_events(r: &mut Reader<'_>, version: u8) -> Result<EventBatch, WireError> {
    let node: Arc<str> = r.str("node")?.into();
    let has_clock = r.u8("clock")?;
    let clock = r.i64("clock")?;
    let has_sent = r.u8("sent_at")?;
    let sent_at = r.i64("sent_at")?;
    let mut cgroups: Vec<Cgroup> = Vec::new();
    if version >= 3 {
        let n = r.u32("cgroups")? as usize;
        let mut paths = Paths::default();
        for _ in 0..n.min(r.0.len() / 2) {
            cgroups.push(paths.get(&r.str("cgroup path")?));
        }
        if cgroups.len() < n {
            return Err(WireError::Truncated("cgroups"));
        }
    }
    let mut pods: Vec<Pod> = Vec::new();
    if version >= 3 {
        let n = r.u32("pods")? as usize;
        let mut known = Pods::default();
        for _ in 0..n.min(r.0.len() / 10) {
            pods.push(read_pod(r, &mut known)?);
        }
        if pods.len() < n {
            return Err(WireError::Truncated("pods"));
        }
    }
    let n = r.u32("count")? as usize;
    // Capacity from what the body can hold, not from the count it claims: a 20-byte message must not
    // make the consumer allocate for a million events.
    let mut events = Vec::with_capacity(n.min(r.0.len() / MIN_EVENT_BYTES));
    for _ in 0..n {
        let seq = r.u64("seq")?;
        // Every consumer computes `seq + 1` (the next position): the last value is never a real one.
        if seq == u64::MAX {
            return Err(WireError::Invalid {
                field: "seq",
                value: seq,
            });
        }
        let ts_us = r.i64("ts")?;
        let sock_id = r.u64("sock_id")?;
        let cgroup_id = r.u64("cgroup_id")?;
        let pid = r.u32("pid")?;
        let comm = r.comm()?;
        let local_addr = r.addr("local_addr")?;
        let local_port = r.u16("local_port")?;
        let remote_addr = r.addr("remote_addr")?;
        let remote_port = r.u16("remote_port")?;
        let tag = r.u8("kind")?;
        let a_raw = r.take(8, "kind payload")?;
        let b = r.u64("kind payload")?;
        let a = u64::from_le_bytes(a_raw.try_into().unwrap());
        let state = |v: u64, field| {
            TcpState::from_kernel(v as u8)
                .filter(|_| v <= u64::from(u8::MAX))
                .ok_or(WireError::Invalid { field, value: v })
        };
        let kind = match tag {
            1 => EventKind::StateChange {
                old: state(a, "old state")?,
                new: state(b, "new state")?,
            },
            2 => EventKind::Retransmit {
                state: state(a, "state")?,
            },
            3 => EventKind::RttSample {
                srtt_us: a as u32,
                snd_cwnd: b as u32,
            },
            4 => EventKind::BytesSent { bytes: a },
            5 => EventKind::BytesReceived { bytes: a },
            t => {
                return Err(WireError::Invalid {
                    field: "kind",
                    value: u64::from(t),
                })
            }
        };
        let (role, cgroup, pod) = if version >= 3 {
            (
                read_role(r)?,
                read_index(r, &cgroups, "cgroup")?,
                read_index(r, &pods, "pod")?,
            )
        } else {
            (None, None, None)
        };
        events.push(Event {
            seq,
            ts_us,
            sock_id,
            cgroup_id,
            cgroup,
            pod,
            role,
            pid,
            comm,
            local_addr,
            local_port,
            remote_addr,
            remote_port,
            kind,
        });
    }
    let mut batch = EventBatch::new(node, events, (has_clock == 1).then_some(clock));
    batch.sent_at_us = (has_sent == 1).then_some(sent_at);
    Ok(batch)
}

/// A role on the wire: the kernel's numbering, [`NO_ROLE`] where none was recorded.
fn role_byte(role: Option<Role>) -> u8 {
    role.map_or(NO_ROLE, Role::to_kernel)
}

const NO_ROLE: u8 = u8::MAX;

fn read_role(r: &mut Reader<'_>) -> Result<Option<Role>, WireError> {
    let v = r.u8("role")?;
    if v == NO_ROLE {
        return Ok(None);
    }
    Role::from_kernel(v).map(Some).ok_or(WireError::Invalid {
        field: "role",
        value: u64::from(v),
    })
}

/// An event's cgroup or pod: an index into its batch's list, 0 for none.
fn read_index<T: Clone>(
    r: &mut Reader<'_>,
    list: &[T],
    field: &'static str,
) -> Result<Option<T>, WireError> {
    let i = r.u32(field)?;
    match i {
        0 => Ok(None),
        i => list
            .get(i as usize - 1)
            .cloned()
            .map(Some)
            .ok_or(WireError::Invalid {
                field,
                value: u64::from(i),
            }),
    }
}

/// A presence byte: 0 or 1, anything else refused.
fn flag(r: &mut Reader<'_>, field: &'static str) -> Result<bool, WireError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(WireError::Invalid {
            field,
            value: u64::from(v),
        }),
    }
}

fn write_pod(w: &mut Writer, p: &Pod) {
    for s in [
        p.name(),
        p.namespace(),
        p.workload_kind(),
        p.workload_name(),
        p.node(),
    ] {
        w.str(s);
    }
}

fn read_pod(r: &mut Reader<'_>, known: &mut Pods) -> Result<Pod, WireError> {
    let name = r.str("pod name")?;
    let namespace = r.str("pod namespace")?;
    let kind = r.str("workload kind")?;
    let workload = r.str("workload name")?;
    let node = r.str("pod node")?;
    Ok(known.get(&name, &namespace, &kind, &workload, &node))
}

fn opt(w: &mut Writer, v: Option<u32>) {
    w.u8(u8::from(v.is_some()));
    w.u32(v.unwrap_or(0));
}

fn read_opt(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u32>, WireError> {
    let present = r.u8(what)?;
    let v = r.u32(what)?;
    Ok((present == 1).then_some(v))
}

/// Encodes a flow emission (or a piece of one) with its replay point.
pub fn encode_flows(b: &FlowBatch, compress: bool) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + b.records.len() * 180));
    w.str(&b.producer);
    w.u64(b.seq);
    w.u32(b.first_row);
    w.u32(b.total_rows);
    w.u64(b.replay.from_seq);
    w.u64(b.replay.through_seq);
    w.u32(b.replay.max_ts.len() as u32);
    for (node, ts) in &b.replay.max_ts {
        w.str(node);
        w.i64(*ts);
    }
    w.u32(b.replay.events_through.len() as u32);
    for (node, seq) in &b.replay.events_through {
        w.str(node);
        w.u64(*seq);
    }
    w.u8(u8::from(b.windows.is_some()));
    let c = b.windows.unwrap_or(WindowConfig {
        window_us: 0,
        allowed_lateness_us: 0,
        horizon_us: 0,
    });
    for v in [c.window_us, c.allowed_lateness_us, c.horizon_us] {
        w.i64(v);
    }
    w.u32(b.records.len() as u32);
    for r in &b.records {
        w.i64(r.window_start_us);
        w.i64(r.window_end_us);
        w.str(&r.key.node);
        w.u32(r.key.pid);
        w.comm(&r.key.comm);
        w.u64(r.key.cgroup_id);
        w.addr(&r.key.local_addr);
        w.u16(r.key.local_port);
        w.addr(&r.key.remote_addr);
        w.u16(r.key.remote_port);
        w.u8(role_byte(r.key.role));
        w.u8(u8::from(r.key.cgroup.is_some()));
        w.str(r.key.cgroup.as_ref().map_or("", Cgroup::path));
        w.u8(u8::from(r.key.pod.is_some()));
        if let Some(p) = &r.key.pod {
            write_pod(&mut w, p);
        }
        for v in [r.bytes_sent, r.bytes_received, r.retransmits, r.rtt_samples] {
            w.u64(v);
        }
        for v in [r.rtt_min_us, r.rtt_p50_us, r.rtt_p99_us, r.rtt_max_us] {
            opt(&mut w, v);
        }
        for v in [
            r.connections_opened,
            r.connections_closed,
            r.resets,
            r.events,
        ] {
            w.u64(v);
        }
    }
    frame(
        KIND_FLOWS,
        w.0,
        compress,
        b.shard_count.min(u32::from(u16::MAX)) as u16,
    )
}

pub fn decode_flows(msg: &[u8]) -> Result<FlowBatch, WireError> {
    let (body, shard_count, version) = unframe(msg, KIND_FLOWS, "flows")?;
    let mut paths = Paths::default();
    let mut pods = Pods::default();
    let mut r = Reader(&body);
    let producer: Arc<str> = r.str("producer")?.into();
    let seq = r.u64("seq")?;
    let first_row = r.u32("first_row")?;
    let total_rows = r.u32("total_rows")?;
    let from_seq = r.u64("replay")?;
    let through_seq = r.u64("replay")?;
    let nodes = r.u32("replay")? as usize;
    let mut max_ts = Vec::with_capacity(nodes.min(r.0.len() / 10));
    for _ in 0..nodes {
        let node: Arc<str> = r.str("replay node")?.into();
        max_ts.push((node, r.i64("replay node")?));
    }
    let mut events_through = Vec::new();
    if version >= 5 {
        let nodes = r.u32("replay")? as usize;
        events_through.reserve(nodes.min(r.0.len() / 10));
        for _ in 0..nodes {
            let node: Arc<str> = r.str("replay node")?.into();
            events_through.push((node, r.u64("replay node")?));
        }
    }
    let replay = ReplayPoint {
        from_seq,
        through_seq,
        max_ts,
        events_through,
    };
    let windows = if version >= 4 {
        let said = flag(&mut r, "windows")?;
        let (window_us, allowed_lateness_us, horizon_us) =
            (r.i64("windows")?, r.i64("windows")?, r.i64("windows")?);
        said.then_some(WindowConfig {
            window_us,
            allowed_lateness_us,
            horizon_us,
        })
    } else {
        None
    };
    let n = r.u32("count")? as usize;
    let cap = n.min(r.0.len() / MIN_FLOW_BYTES);
    let mut records = Vec::with_capacity(cap);
    let mut nodes: Vec<Arc<str>> = Vec::new();
    for _ in 0..n {
        let window_start_us = r.i64("window_start")?;
        let window_end_us = r.i64("window_end")?;
        let node_name = r.str("node")?;
        // Records of one batch share a few node names: share the allocation too.
        let node = match nodes.iter().find(|n| ***n == *node_name) {
            Some(n) => Arc::clone(n),
            None => {
                let n: Arc<str> = node_name.into();
                nodes.push(Arc::clone(&n));
                n
            }
        };
        let mut key = FlowKey {
            node,
            pid: r.u32("pid")?,
            comm: r.comm()?,
            cgroup_id: r.u64("cgroup_id")?,
            cgroup: None,
            pod: None,
            role: None,
            local_addr: r.addr("local_addr")?,
            local_port: r.u16("local_port")?,
            remote_addr: r.addr("remote_addr")?,
            remote_port: r.u16("remote_port")?,
        };
        if version >= 3 {
            key.role = read_role(&mut r)?;
            let has_cgroup = flag(&mut r, "cgroup")?;
            let path = r.str("cgroup path")?;
            key.cgroup = has_cgroup.then(|| paths.get(&path));
            if flag(&mut r, "pod")? {
                key.pod = Some(read_pod(&mut r, &mut pods)?);
            }
        }
        let bytes_sent = r.u64("bytes_sent")?;
        let bytes_received = r.u64("bytes_received")?;
        let retransmits = r.u64("retransmits")?;
        let rtt_samples = r.u64("rtt_samples")?;
        let rtt_min_us = read_opt(&mut r, "rtt_min")?;
        let rtt_p50_us = read_opt(&mut r, "rtt_p50")?;
        let rtt_p99_us = read_opt(&mut r, "rtt_p99")?;
        let rtt_max_us = read_opt(&mut r, "rtt_max")?;
        records.push(FlowRecord {
            window_start_us,
            window_end_us,
            key,
            bytes_sent,
            bytes_received,
            retransmits,
            rtt_samples,
            rtt_min_us,
            rtt_p50_us,
            rtt_p99_us,
            rtt_max_us,
            connections_opened: r.u64("connections_opened")?,
            connections_closed: r.u64("connections_closed")?,
            resets: r.u64("resets")?,
            events: r.u64("events")?,
        });
    }
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    if first_row as usize + records.len() > total_rows as usize {
        return Err(WireError::Invalid {
            field: "first_row",
            value: u64::from(first_row),
        });
    }
    Ok(FlowBatch {
        producer,
        seq,
        records,
        first_row,
        total_rows,
        replay,
        replay_before: None,
        shard_count: u32::from(shard_count),
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};

    fn batch() -> EventBatch {
        let mut s = Synthetic::new(
            "node-1".into(),
            SyntheticConfig {
                seed: 3,
                total: 5_000,
                start_us: 1_700_000_000_000_000,
                events_per_sim_sec: 1_000,
            },
        );
        let mut b = s.next_batch(5_000).unwrap();
        b.clock_us = Some(42);
        b.sent_at_us = Some(1_700_000_000_123_456);
        b
    }

    #[test]
    fn event_batches_round_trip_raw_and_compressed() {
        let b = batch();
        for compress in [false, true] {
            let msg = encode_events(&b, compress);
            assert_eq!(decode_events(&msg).unwrap(), b);
        }
        let raw = encode_events(&b, false).len();
        let packed = encode_events(&b, true).len();
        assert!(packed * 2 < raw, "zstd shrinks batches: {raw} -> {packed}");
    }

    /// A partition's share round-trips with its watermarks (`i64::MIN` and a late event's flat
    /// stretch included); an events decoder refuses it by kind, so a sink cannot mistake it for a
    /// node's log.
    #[test]
    fn partition_batches_round_trip_with_their_watermarks() {
        let b = batch();
        let mut max_ts = i64::MIN;
        for part in crate::event::partition::split(&b, 2, &mut max_ts) {
            for compress in [false, true] {
                let msg = encode_partition(&part, compress);
                let got = decode_partition(&msg).unwrap();
                assert_eq!(got.events, part.events);
                assert_eq!(got.watermarks, part.watermarks);
                assert_eq!(got.clock_us, part.clock_us);
                assert!(matches!(decode_events(&msg), Err(WireError::Kind { .. })));
            }
        }
        assert!(matches!(
            decode_partition(&encode_events(&b, true)),
            Err(WireError::Kind { .. })
        ));
    }

    #[test]
    fn flow_batches_round_trip() {
        let b = batch();
        let mut w = crate::aggregate::Windows::new(crate::aggregate::WindowConfig {
            window_us: 1_000_000,
            allowed_lateness_us: 0,
            horizon_us: 0,
        });
        w.add(&b.node, &b.events, b.position.clone(), |_| true);
        let mut records = Vec::new();
        w.emit_all(&mut records);
        let fb = FlowBatch {
            producer: "agg-1".into(),
            seq: 9,
            first_row: 0,
            total_rows: records.len() as u32,
            records,
            replay: ReplayPoint {
                from_seq: 5,
                through_seq: 77,
                max_ts: vec![
                    ("node-1".into(), -3),
                    ("node-2".into(), 1_700_000_000_000_000),
                ],
                events_through: vec![("node-1".into(), 12), ("node-2".into(), 1 << 40)],
            },
            replay_before: None,
            shard_count: 3,
            windows: Some(crate::aggregate::WindowConfig {
                window_us: 10_000_000,
                allowed_lateness_us: 5_000_000,
                horizon_us: 60_000_000,
            }),
        };
        for compress in [false, true] {
            assert_eq!(decode_flows(&encode_flows(&fb, compress)).unwrap(), fb);
        }
        // A version 4 message (an older aggregator's) has no `events_through`: read as none.
        let mut old = fb.clone();
        old.replay.max_ts.clear();
        old.replay.events_through.clear();
        let mut msg = encode_flows(&old, false);
        let at = HEADER + 2 + old.producer.len() + 8 + 4 + 4 + 8 + 8 + 4;
        assert_eq!(msg[at..at + 4], [0, 0, 0, 0], "the events_through count");
        msg.drain(at..at + 4);
        msg[3] = 4;
        let len = (msg.len() - HEADER) as u32;
        msg[8..12].copy_from_slice(&len.to_le_bytes());
        assert_eq!(decode_flows(&msg).unwrap(), old);
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let good = encode_events(&batch(), true);
        assert!(matches!(
            decode_events(b"hello world!!").unwrap_err(),
            WireError::Magic
        ));
        let mut newer = good.clone();
        newer[3] = VERSION + 1;
        assert!(matches!(
            decode_events(&newer).unwrap_err(),
            WireError::Version(v) if v == VERSION + 1
        ));
        assert!(matches!(
            decode_flows(&good).unwrap_err(),
            WireError::Kind { found: 1, .. }
        ));
        let raw = encode_events(&batch(), false);
        assert!(matches!(
            decode_events(&raw[..raw.len() - 5]).unwrap_err(),
            WireError::Truncated("body")
        ));
        let mut corrupt = good.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        corrupt[HEADER + 4] ^= 0xff;
        assert!(decode_events(&corrupt).is_err());
        // Every truncation of a valid message is an error, never a panic.
        let mut small = batch();
        small.events.truncate(20);
        let raw = encode_events(&small, false);
        for cut in 0..raw.len() {
            let mut m = raw[..cut].to_vec();
            if m.len() >= HEADER {
                let len = (m.len() - HEADER) as u32;
                m[8..12].copy_from_slice(&len.to_le_bytes());
            }
            assert!(decode_events(&m).is_err(), "cut at {cut}");
        }
    }
}
