//! Edges: what joins one stage to the next. A mode is nothing but a choice of edges.
//!
//! Stages are written against [`Tx`] and [`Rx`] only, so the same capture, aggregate and sink code runs
//! whether its neighbours are in the same process ([`memory`]) or elsewhere. Every edge applies
//! back-pressure: when the next stage is slow, `send` waits; nothing is dropped to make room.

pub mod memory;
pub mod tee;

use std::future::Future;

/// Why an edge could not move an item.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The other side is gone (it failed or shut down early); the item was not delivered.
    #[error("the {0} edge is closed: the stage on the other side stopped")]
    Closed(&'static str),
}

/// The sending half of an edge.
pub trait Tx<T>: Send {
    /// Delivers `item`, waiting while the edge is full.
    fn send(&mut self, item: T) -> impl Future<Output = Result<(), EdgeError>> + Send;
}

/// The receiving half of an edge.
pub trait Rx<T>: Send {
    /// The next item, or `None` once the sender has finished and everything was received.
    fn recv(&mut self) -> impl Future<Output = Result<Option<T>, EdgeError>> + Send;
}
