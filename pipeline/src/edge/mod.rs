//! Edges: what joins one stage to the next. A mode is nothing but a choice of edges.
//!
//! Stages are written against [`Tx`] and [`Rx`] only, so the same capture, aggregate and sink code runs
//! whether its neighbours are in the same process ([`memory`]) or elsewhere. Every edge applies
//! back-pressure: when the next stage is slow, `send` waits; nothing is dropped to make room.

pub mod ack;
pub mod broker;
pub mod memory;
pub mod objects;
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
    /// The broker could not take or give an item (after retrying), or its stream says something the
    /// run must not go past (a gap, aggregators that disagree).
    #[error("broker: {0}")]
    Broker(String),
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
    /// An object of the object-store hand-off is not a batch this build can read.
    #[error("hand-off {what}: {source}")]
    HandoffDecode {
        what: String,
        #[source]
        source: Box<wire::WireError>,
    },
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
