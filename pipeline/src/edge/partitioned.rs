//! Partitioned streams, the producing side: with `P` partitions (recorded by the events stream, see
//! [`Broker::partitions`]), a capture publishes every batch to its node's subject, as always (the
//! event log: complete and ordered per node, what sinks read), and then once more cut by flow key,
//! one message per partition (`tcplake.part.<p>.<node>` on [`PARTS_STREAM`], empty shares too),
//! each event with the node's watermark before it ([`crate::event::partition`]). Aggregator `p`
//! reads only partition `p`: aggregation costs the same per event whatever the number of aggregators.
//!
//! Order of publishing, and what a restart repairs: the node message first, then the shares, each
//! marked with the stream sequence of the node message it was cut from ([`FROM_HEADER`]). A capture
//! that dies in between leaves node messages some partitions lack (or lack part of); the next capture
//! of the node ([`repair`]) cuts them again from the node's messages on the stream before it publishes
//! anything new, so every partition holds every event of the node log, once and in order. Until a
//! capture of that node runs again, its partitions lack those events (at most one batch): a node
//! whose capture is gone for good needs one more run of it (with the same settings) to repair them.

use std::sync::Arc;

use super::broker::{
    events_subject, part_subject, Broker, BrokerError, BrokerTx, END_HEADER, EVENTS_STREAM,
    PARTS_STREAM,
};
use super::wire;
use super::{EdgeError, Tx};
use crate::event::partition::{split, Watermarks};
use crate::event::EventBatch;
use crate::shutdown::Shutdown;

/// On a partition message: the stream sequence (on [`EVENTS_STREAM`]) of the node message through
/// which the partition holds the node's events. A piece of a share that does not complete it says the
/// node message before (as a piece of a flow emission carries the checkpoint before it), so a capture
/// killed between the pieces leaves a partition whose last message points before the node message
/// it lacks part of.
pub const FROM_HEADER: &str = "Tcplake-From";
/// On a piece that does not complete its share: the node message the share is cut from. What a
/// partition holds of that message's events is known only from such a piece.
pub const PIECE_OF_HEADER: &str = "Tcplake-Piece-Of";

/// A partition's share of a node batch, and where it stands on the node's messages.
pub struct Share {
    pub batch: Arc<EventBatch>,
    /// The node message (stream sequence) the share is cut from.
    pub from: u64,
    /// The node message before it: what a piece that does not complete the share says.
    pub from_before: u64,
    /// Set on a piece that does not complete its share: the node message the share is cut from.
    pub piece_of: Option<u64>,
}

impl Share {
    /// Cuts a share in two (`None`: fewer than two events). The first half's watermark after it is
    /// the node's before the second half's first event, and its `seq` after is that event's: true of
    /// the node stream at that point, which is all an aggregator folds them into. Only the second
    /// half completes the share, so only it says the node message the share is cut from.
    pub(crate) fn halve(&self) -> Option<(Share, Share)> {
        let b = &self.batch;
        let mid = b.events.len() / 2;
        let marks = b.watermarks.as_deref()?;
        (mid > 0 && marks.before.len() == b.events.len()).then(|| {
            let half = |r: std::ops::Range<usize>,
                        after: i64,
                        next_seq: u64,
                        from: u64,
                        piece_of: Option<u64>| Share {
                batch: Arc::new(EventBatch {
                    node: Arc::clone(&b.node),
                    events: b.events[r.clone()].to_vec(),
                    clock_us: b.clock_us,
                    position: b.position.clone(),
                    sent_at_us: b.sent_at_us,
                    watermarks: Some(Arc::new(Watermarks {
                        before: marks.before[r].to_vec(),
                        after,
                        next_seq,
                    })),
                }),
                from,
                from_before: self.from_before,
                piece_of,
            };
            let of = self.piece_of.unwrap_or(self.from);
            (
                half(
                    0..mid,
                    marks.before[mid],
                    b.events[mid].seq,
                    self.from_before,
                    Some(of),
                ),
                half(
                    mid..b.events.len(),
                    marks.after,
                    marks.next_seq,
                    self.from,
                    self.piece_of,
                ),
            )
        })
    }
}

/// A capture's producer: its node's messages, and (partitioned) every partition's shares of them.
pub struct EventsTx {
    node: BrokerTx<Arc<EventBatch>>,
    parts: Vec<BrokerTx<Share>>,
    /// The node's newest event time so far (`i64::MIN` at start: see the module doc of
    /// [`crate::event::partition`] for why a restart may start low).
    max_ts: i64,
    /// The node's last message whose shares are all published (`None`: not looked up yet).
    last_from: Option<u64>,
}

impl EventsTx {
    pub(crate) fn new(node: BrokerTx<Arc<EventBatch>>, parts: Vec<BrokerTx<Share>>) -> Self {
        EventsTx {
            node,
            parts,
            max_ts: i64::MIN,
            last_from: None,
        }
    }

    /// See [`BrokerTx::starting_run`].
    pub fn starting_run(mut self) -> Self {
        self.node = self.node.starting_run();
        self
    }
}

impl Tx<Arc<EventBatch>> for EventsTx {
    async fn send(&mut self, item: Arc<EventBatch>) -> Result<(), EdgeError> {
        if self.parts.is_empty() {
            return self.node.send(item).await;
        }
        // Before this batch: the node's last message, whose shares are all out (a restarted capture
        // repaired them before it got here).
        let from_before = match self.last_from {
            Some(f) => f,
            None => self.node.last_stored_seq().await?,
        };
        self.node.send(Arc::clone(&item)).await?;
        let from = self.node.last_stored_seq().await?;
        let shares = split(&item, self.parts.len() as u32, &mut self.max_ts);
        // Each partition is a subject of its own: their publishes need not wait for each other.
        futures_util::future::try_join_all(self.parts.iter_mut().zip(shares).map(|(tx, share)| {
            tx.send(Share {
                batch: Arc::new(share),
                from,
                from_before,
                piece_of: None,
            })
        }))
        .await?;
        self.last_from = Some(from);
        Ok(())
    }

    async fn close(&mut self, end_of_stream: bool) -> Result<(), EdgeError> {
        self.node.close(end_of_stream).await?;
        if end_of_stream && !self.parts.is_empty() {
            // The partitions' end markers point at the node's: nothing is left to repair after them.
            let from = [(FROM_HEADER, self.node.last_stored_seq().await?.to_string())];
            for tx in &mut self.parts {
                tx.end_with(&from).await?;
            }
        }
        Ok(())
    }
}

/// Before a capture of `node` publishes: cuts again what a partition lacks of the node's messages (a
/// capture killed between a node message and its shares, or between the pieces of a share), and
/// ends the partitions of an ended node. Returns how many shares it published. Nothing to do unless
/// the stream is partitioned.
pub async fn repair(broker: &Broker, node: &str, shutdown: Shutdown) -> Result<u64, EdgeError> {
    let count = broker.partitions();
    if count <= 1 {
        return Ok(0);
    }
    let request = |what: &'static str| {
        move |e: BrokerError| EdgeError::BrokerRequest {
            what,
            source: Box::new(e),
        }
    };
    let subject = events_subject(node);
    let Some(last) = broker
        .last_on(EVENTS_STREAM, &subject)
        .await
        .map_err(request("reading the node's last message"))?
    else {
        return Ok(0);
    };
    let mut repaired = 0;
    for part in 0..count {
        let held = broker
            .last_on(PARTS_STREAM, &part_subject(part, node))
            .await
            .map_err(request("reading a partition's last message"))?;
        let mut after = held
            .as_ref()
            .and_then(|m| m.headers.get(FROM_HEADER))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .unwrap_or(0);
        if after >= last.sequence {
            continue;
        }
        // Events the partition holds already of the node messages up to `piece_of` (the last message
        // is a piece of a share, published before the capture died). A complete share holds all of
        // its node message: what comes after it is wanted whole, whatever its numbering.
        let (held_through, piece_of) = match held.as_ref().and_then(|m| {
            let of = m
                .headers
                .get(PIECE_OF_HEADER)?
                .as_str()
                .parse::<u64>()
                .ok()?;
            Some((m, of))
        }) {
            None => (0, 0),
            Some((m, of)) => match wire::decode_partition(&m.payload) {
                Ok(b) => (b.watermarks.map_or(0, |w| w.next_seq), of),
                Err(e) => {
                    tracing::warn!(
                        node,
                        partition = part,
                        seq = m.sequence,
                        error = %crate::report::one_line(&e),
                        "a partition's last message is unreadable: its node message is cut again whole"
                    );
                    (0, 0)
                }
            },
        };
        let mut tx = broker.part_tx(part, node, shutdown.clone());
        while let Some(m) = broker
            .message_after(EVENTS_STREAM, &subject, after)
            .await
            .map_err(request("reading the node's messages"))?
        {
            let from_before = std::mem::replace(&mut after, m.sequence);
            if m.headers.get(END_HEADER).is_some() {
                tx.end_with(&[(FROM_HEADER, m.sequence.to_string())])
                    .await?;
                break;
            }
            let batch = match wire::decode_events(&m.payload) {
                Ok(b) => b,
                Err(e) => {
                    // The sink dead-letters it too: its events are in neither log nor flows. An
                    // empty share moves the partition past it.
                    tracing::warn!(
                        node,
                        seq = m.sequence,
                        error = %crate::report::one_line(&e),
                        "a node message is unreadable: its partitions get an empty share for it"
                    );
                    EventBatch::new(Arc::from(node), Vec::new(), None)
                }
            };
            // A low watermark is safe here: the partition's aggregator holds the node's watermark
            // up to the shares before these, and takes the larger.
            let mut max_ts = i64::MIN;
            let mut share = split(&batch, count, &mut max_ts).swap_remove(part as usize);
            let held = match m.sequence <= piece_of {
                true => share
                    .events
                    .iter()
                    .take_while(|e| e.seq < held_through)
                    .count(),
                false => 0,
            };
            if held > 0 {
                share.events.drain(..held);
                if let Some(w) = share.watermarks.as_mut() {
                    Arc::make_mut(w).before.drain(..held);
                }
            }
            tx.send(Share {
                batch: Arc::new(share),
                from: m.sequence,
                from_before,
                piece_of: None,
            })
            .await?;
            repaired += 1;
            if after >= last.sequence {
                break;
            }
        }
        tracing::info!(
            node,
            partition = part,
            through = after,
            "cut the node's messages this partition lacked (a capture stopped between them)"
        );
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    #[test]
    fn halves_keep_every_event_a_true_watermark_and_only_the_last_completes_the_share() {
        let events: Vec<Event> = (0..9)
            .map(|i| Event::sample(i * 3, 100 + i as i64, EventKind::BytesSent { bytes: 1 }))
            .collect();
        let b = EventBatch::new("n".into(), events, None);
        let mut max_ts = 7;
        let share = Share {
            batch: Arc::new(split(&b, 1, &mut max_ts).remove(0)),
            from: 12,
            from_before: 10,
            piece_of: None,
        };
        let (first, second) = share.halve().unwrap();
        let (m1, m2) = (
            first.batch.watermarks.as_deref().unwrap(),
            second.batch.watermarks.as_deref().unwrap(),
        );
        assert_eq!(first.batch.events.len() + second.batch.events.len(), 9);
        assert_eq!(m1.after, m2.before[0]);
        assert_eq!(m1.next_seq, second.batch.events[0].seq);
        assert_eq!(m2.after, 108);
        assert_eq!(m2.next_seq, 25);
        assert_eq!(
            [&m1.before[..], &m2.before[..]].concat(),
            share.batch.watermarks.as_deref().unwrap().before
        );
        assert_eq!((first.from, second.from), (10, 12));
        assert_eq!((first.piece_of, second.piece_of), (Some(12), None));
        // Cut again: still only the very last piece completes the share; every other one says
        // which node message it is a piece of.
        let (a, b) = second.halve().unwrap();
        assert_eq!((a.from, b.from), (10, 12));
        assert_eq!((a.piece_of, b.piece_of), (Some(12), None));
        let (a, b) = first.halve().unwrap();
        assert_eq!((a.from, b.from), (10, 10));
        assert_eq!((a.piece_of, b.piece_of), (Some(12), Some(12)));
    }
}
