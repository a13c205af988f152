//! Edges: what joins one stage to the next. A mode is nothing but a choice of edges.
//!
//! Stages are written against [`Tx`] and [`Rx`] only, so the same capture, aggregate and sink code runs
//! whether its neighbours are in the same process ([`memory`]) or elsewhere. Every edge applies
//! back-pressure: when the next stage is slow, `send` waits; nothing is dropped to make room.

pub mod ack;
pub mod broker;
pub mod memory;
pub mod objects;
pub mod partitioned;
pub mod tee;
pub mod wire;

use std::future::Future;

pub use ack::{Ack, Finalized, Finalizing};

/// Why an edge could not move an item.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The other side is gone (it failed or shut down early); the item was not delivered.
    #[error("the {0} edge is closed: the stage on the other side stopped")]
    Closed(&'static str),
    /// The broker's stream holds something the run must not go past.
    #[error("broker: {0}")]
    Stream(#[from] StreamFault),
    /// Publishing kept failing for the whole retry allowance.
    #[error("broker: publish to {subject} failed for {secs}s{hint}")]
    Publish {
        subject: String,
        secs: u64,
        /// What to change, when the failure says (a full stream).
        hint: String,
        #[source]
        source: broker::Cause,
    },
    /// Shutdown came while publishing was failing: the batch was not published.
    #[error(
        "broker: stopped while publishing to {subject} was failing{hint}: the {rows} rows of this \
         batch were not published (a restarted producer continues from the last stored message)"
    )]
    PublishStopped {
        subject: String,
        rows: usize,
        hint: String,
        #[source]
        source: broker::Cause,
    },
    /// The broker went away while consuming and did not come back within the retry allowance.
    #[error("broker: consuming; the broker was still unavailable after {secs}s (lost it: {lost})")]
    Lost {
        secs: u64,
        lost: broker::Cause,
        #[source]
        source: broker::Cause,
    },
    /// The broker's answer to a request was an error.
    #[error("broker: {what}: {source}")]
    BrokerRequest {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An object of the object-store hand-off could not be written or read.
    #[error("hand-off {what}: {source}")]
    Handoff {
        what: String,
        #[source]
        source: Box<crate::storage::StoreError>,
    },
    /// A producer restarted on a hand-off stream it wrote before, with other data than it wrote then.
    #[error(
        "hand-off object {object} already exists, with other bytes than this producer's: a \
         restarted capture or aggregator numbers its objects from the first again, and the readers \
         would never see its new ones; start its pipeline on an empty hand-off location (stream \
         {stream}) and a new --out, or use the broker, whose services resume"
    )]
    HandoffTaken { object: String, stream: String },
    /// An object of the object-store hand-off is not a batch this build can read.
    #[error("hand-off {what}: {source}")]
    HandoffDecode {
        what: String,
        #[source]
        source: Box<wire::WireError>,
    },
}

/// What a stream can hold that the run must not go past: going on would lose or mix rows.
#[derive(Debug, thiserror::Error)]
pub enum StreamFault {
    #[error(
        "{subject}: a message this producer did not send is on its subject (stream sequence {seq}): \
         is a second tcplake running with the same node name or shard?"
    )]
    Foreign { subject: String, seq: u64 },
    #[error(
        "{subject}: one row takes {bytes} bytes, more than fits in the broker's max_payload of \
         {max_payload} beside the message's headers (1 KiB is kept for them): raise max_payload in \
         nats-server's configuration"
    )]
    RowTooLarge {
        subject: String,
        bytes: usize,
        max_payload: usize,
    },
    #[error(
        "this output holds no events of node `{node}` yet, but the first of them the stream still \
         delivers is seq {first} (stream sequence {stream_seq}): events 0..{first} were removed by the \
         stream's retention, so this output cannot hold the node's log from its start (write to the \
         output that holds them, or replay that output into a new one)"
    )]
    Retained {
        node: String,
        first: u64,
        stream_seq: u64,
    },
    #[error(
        "events {next}..{first} of node `{node}` are missing from this sink's deliveries (stream \
         sequence {stream_seq} starts at {first}): refusing to write past a gap; is a second sink \
         consuming for the same output? (it takes a share of the messages: run one sink per output)"
    )]
    EventGap {
        node: String,
        next: u64,
        first: u64,
        stream_seq: u64,
    },
    #[error(
        "emission {emission} of `{producer}`: rows {next}..{first} are missing from the stream \
         (stream sequence {stream_seq}): refusing to write past a gap"
    )]
    FlowGap {
        emission: u64,
        producer: String,
        next: usize,
        first: usize,
        stream_seq: u64,
    },
    #[error(
        "the aggregators disagree on how many shards there are: {this} as one of {n}, {earlier} as \
         one of {known}; every aggregator of a deployment must run with the same N in --shard I/N"
    )]
    ShardsDisagree {
        this: String,
        n: u32,
        earlier: String,
        known: u32,
    },
    #[error(
        "shard {shard} ended, but the aggregators say there are {n} shards (0..{n}): every \
         aggregator of a deployment must run with the same N in --shard I/N"
    )]
    ShardBeyond { shard: u32, n: u32 },
    #[error(
        "the aggregators made their flows with different settings: `{this}` with {this_settings}, \
         `{earlier}` with {earlier_settings}; one flows table holds one projection: run every \
         aggregator of a deployment with the same window, allowed lateness and late horizon (the \
         batches already published stay on the flows stream: write to a new output from a purged \
         flows stream, e.g. `nats stream purge TCPLAKE_FLOWS`)"
    )]
    WindowsDisagree {
        this: String,
        this_settings: String,
        earlier: String,
        earlier_settings: String,
    },
    #[error(
        "flows of `{producer}` (emission {emission}) do not say how far they consumed each node's \
         events (an aggregator older than this sink): a sharded sink (--sink-part) cannot order their \
         commit after the event log's; upgrade the aggregators, or run one sink"
    )]
    NoEventsThrough { producer: String, emission: u64 },
}

/// The window settings as a person would set them.
pub fn describe_windows(w: &crate::event::flow::WindowConfig) -> String {
    let [window, lateness, horizon] = w.secs();
    format!("window {window} s, allowed lateness {lateness} s, late horizon {horizon} s")
}

/// Every aggregator feeding one sink must make its flows with the same settings: the first batch that
/// says them (with its producer) is what the others are held to. Batches of older builds do not say.
pub fn check_windows(
    known: &mut Option<(std::sync::Arc<str>, crate::event::flow::WindowConfig)>,
    b: &crate::event::FlowBatch,
) -> Result<(), StreamFault> {
    let Some(w) = b.windows else { return Ok(()) };
    match known {
        Some((first, k)) if *k != w => Err(StreamFault::WindowsDisagree {
            this: b.producer.to_string(),
            this_settings: describe_windows(&w),
            earlier: first.to_string(),
            earlier_settings: describe_windows(k),
        }),
        Some(_) => Ok(()),
        None => {
            *known = Some((std::sync::Arc::clone(&b.producer), w));
            Ok(())
        }
    }
}

/// The sending half of an edge.
pub trait Tx<T>: Send {
    /// Delivers `item`, waiting while the edge is full.
    fn send(&mut self, item: T) -> impl Future<Output = Result<(), EdgeError>> + Send;

    /// Makes everything sent durable on the other side; with `end_of_stream`, also tells the other
    /// side that nothing more will come (a finite source was exhausted). In-process edges need
    /// neither: dropping the sender ends the stream.
    fn close(&mut self, end_of_stream: bool) -> impl Future<Output = Result<(), EdgeError>> + Send {
        let _ = end_of_stream;
        async { Ok(()) }
    }
}

/// The receiving half of an edge.
pub trait Rx<T>: Send {
    /// The next item, or `None` once the sender has finished and everything was received.
    fn recv(&mut self) -> impl Future<Output = Result<Option<T>, EdgeError>> + Send;
}
