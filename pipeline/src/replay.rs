//! Reading the committed event log back: the log is the truth, and anything derived from it (the flow
//! table after a restart, a rebuilt projection) is obtained by feeding these events through the same
//! aggregate stage again.
//!
//! Only committed files are read (the table's current version), in `seq` order
//! ([`events_log::Reader`]).

use std::sync::Arc;

use crate::edge::{EdgeError, Tx};
use crate::event::EventBatch;
use crate::lake::events_log::{self, ReadLogError};
use crate::storage::Store;

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] ReadLogError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
}

/// Sends the committed events of `node` with `from <= seq < to` to `out`, in order, in batches of at
/// most `batch` events. Returns how many were sent.
pub async fn feed<O: Tx<Arc<EventBatch>>>(
    store: &Store,
    node: &Arc<str>,
    from: u64,
    to: u64,
    batch: usize,
    out: &mut O,
) -> Result<u64, ReplayError> {
    if from >= to {
        return Ok(0);
    }
    let mut log = events_log::Reader::open(store, node, from, batch).await?;
    let mut sent = 0u64;
    loop {
        let events = log.next_events(batch, to).await?;
        if events.is_empty() {
            break;
        }
        sent += events.len() as u64;
        out.send(Arc::new(EventBatch::new(Arc::clone(node), events, None)))
            .await?;
    }
    if log.next_seq() < to {
        return Err(ReplayError::Log(ReadLogError::Gap {
            node: node.to_string(),
            expected: log.next_seq(),
            found: format!("the log ends before {to}"),
        }));
    }
    Ok(sent)
}
