//! Reading the committed event log back: the log is the truth, and anything derived from it (the flow
//! table after a restart, a rebuilt projection) is obtained by feeding these events through the same
//! aggregate stage again.
//!
//! Only committed files are read (those named by a commit record whose data exists), in stream order,
//! one file in memory at a time.

use std::sync::Arc;

use crate::edge::{EdgeError, Tx};
use crate::event::schema::{batch_to_events, SchemaError};
use crate::event::EventBatch;
use crate::lake::events_log::{self, LogError};
use crate::lake::read::{self, ReadError};
use crate::storage::Store;

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("committed file `{key}`: {source}")]
    Schema { key: String, source: SchemaError },
    #[error("the event log of `{node}` has a gap: seq {expected} expected, file `{key}` starts at {found}")]
    Gap {
        node: String,
        key: String,
        expected: u64,
        found: u64,
    },
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
    let files = events_log::files(store, node).await?;
    let mut sent = 0u64;
    let mut expected = from;
    for f in files {
        let (first, last) = (f.first_seq, f.last_seq);
        if last < from || first >= to {
            continue;
        }
        if first > expected {
            return Err(ReplayError::Gap {
                node: node.to_string(),
                key: f.key,
                expected,
                found: first,
            });
        }
        expected = last + 1;
        let key = f.key.as_str();
        for rb in read::open(store, key, batch).await? {
            let rb = rb.map_err(|e| read::batch_error(key, e))?;
            let events: Vec<_> = batch_to_events(&rb)
                .map_err(|source| ReplayError::Schema {
                    key: key.to_string(),
                    source,
                })?
                .into_iter()
                .map(|(_, e)| e)
                .filter(|e| (from..to).contains(&e.seq))
                .collect();
            if events.is_empty() {
                continue;
            }
            sent += events.len() as u64;
            out.send(Arc::new(EventBatch::new(Arc::clone(node), events, None)))
                .await?;
        }
        if expected >= to {
            break;
        }
    }
    if expected < to {
        return Err(ReplayError::Gap {
            node: node.to_string(),
            key: "(end of log)".into(),
            expected,
            found: to,
        });
    }
    Ok(sent)
}
