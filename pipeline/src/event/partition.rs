//! Partitioned event batches: a node's batch cut into one batch per partition of the flow-key hash,
//! each event carrying the node's watermark just before it.
//!
//! An aggregator that receives only its partition must still decide lateness exactly as one that
//! receives the node's whole stream: an event is late when its window ended before the newest event
//! time of the node *so far* minus the late horizon, and "so far" includes the other partitions'
//! events. So each partition batch says, per event, the node's newest event time before it
//! ([`Watermarks::before`]) and after the whole node batch ([`Watermarks::after`]). Folded in with
//! `max`, they make the partition's watermark the node's at every event it holds and at every batch
//! end; a capture restarted without its running maximum sends lower values, which `max` absorbs
//! (the aggregator's watermark already covers everything before).
//!
//! Every node batch yields one batch per partition, empty ones too: the watermark and the capture
//! clock then move every partition at the same batch boundaries as the whole stream, so a partition's
//! aggregator emits when a whole-stream aggregator would (a share cut into pieces, or cut again by a
//! restarted capture, moves them at other points: when rows appear then differs, what they count
//! does not).

use std::sync::Arc;

use super::{Event, EventBatch};
use crate::aggregate::Fnv;

/// The node's newest event time (µs) before each event of a partition batch, and after the node
/// batch it was cut from (`i64::MIN`: none yet); and the `seq` after that node batch's last event
/// (how far the node's stream is consumed once this share is, whatever the share holds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watermarks {
    pub before: Vec<i64>,
    pub after: i64,
    pub next_seq: u64,
}

/// The fixed hash of an event's flow key (FNV-1a over node, pid, comm, cgroup id and both ends):
/// every process and build agrees on it, so shards and partitions need no coordination.
pub fn flow_hash(node: &str, e: &Event) -> u64 {
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
    h.0
}

/// Which of `count` partitions the flow of `e` falls in (the same as the shard that owns it).
pub fn partition_of(node: &str, e: &Event, count: u32) -> u32 {
    (flow_hash(node, e) % u64::from(count.max(1))) as u32
}

/// Cuts `batch` into `count` partition batches (index = partition; empty ones included), each with
/// its watermarks. `max_ts` is the node's newest event time before the batch (`i64::MIN` if none
/// is known) and is moved past it. Each keeps the batch's clock, send time and position.
pub fn split(batch: &EventBatch, count: u32, max_ts: &mut i64) -> Vec<EventBatch> {
    let count = count.max(1);
    let mut parts: Vec<(Vec<Event>, Vec<i64>)> = (0..count).map(|_| Default::default()).collect();
    for e in &batch.events {
        let (events, before) = &mut parts[partition_of(&batch.node, e, count) as usize];
        before.push(*max_ts);
        events.push(e.clone());
        *max_ts = (*max_ts).max(e.ts_us);
    }
    let after = *max_ts;
    let next_seq = batch.events.last().map_or(0, |e| e.seq.saturating_add(1));
    parts
        .into_iter()
        .map(|(events, before)| EventBatch {
            node: Arc::clone(&batch.node),
            events,
            clock_us: batch.clock_us,
            position: batch.position.clone(),
            sent_at_us: batch.sent_at_us,
            watermarks: Some(Arc::new(Watermarks {
                before,
                after,
                next_seq,
            })),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn every_event_lands_in_one_partition_with_the_nodes_watermark_before_it() {
        let ev = |seq: u64, ts: i64, port: u16| {
            let mut e = Event::sample(seq, ts, EventKind::BytesSent { bytes: 1 });
            e.local_port = port;
            e
        };
        let events: Vec<Event> = (0..200)
            .map(|i| {
                ev(
                    i,
                    if i % 7 == 0 { 5 } else { 100 + i as i64 },
                    i as u16 % 13,
                )
            })
            .collect();
        let batch = EventBatch::new("n".into(), events.clone(), Some(42));
        let mut max_ts = 50;
        let parts = split(&batch, 3, &mut max_ts);
        assert_eq!(parts.len(), 3);
        assert_eq!(max_ts, 299);
        let mut seen = Vec::new();
        for (p, part) in parts.iter().enumerate() {
            let marks = part.watermarks.as_ref().unwrap();
            assert_eq!(marks.after, 299);
            assert_eq!(marks.next_seq, 200);
            assert_eq!(marks.before.len(), part.events.len());
            assert_eq!(part.clock_us, Some(42));
            for (e, before) in part.events.iter().zip(&marks.before) {
                assert_eq!(partition_of("n", e, 3), p as u32);
                let want = events[..e.seq as usize]
                    .iter()
                    .map(|x| x.ts_us)
                    .fold(50, i64::max);
                assert_eq!(*before, want, "event {}", e.seq);
                seen.push(e.seq);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| !p.events.is_empty()));
    }
}
