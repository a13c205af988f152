//! Reading the committed event log back: the log is the truth, and anything derived from it (the flow
//! table after a restart, a rebuilt projection) is obtained by feeding these events through the same
//! aggregate stage again.
//!
//! Only committed files are read (those named by a commit record whose data exists), in stream order,
//! one file in memory at a time.

use std::sync::Arc;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::edge::{EdgeError, Tx};
use crate::event::schema::{batch_to_events, SchemaError};
use crate::event::EventBatch;
use crate::sink::{CommitError, CommitLog, Dataset, Store, StoreError};

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("committed file `{key}` is missing from the store")]
    Missing { key: String },
    #[error("reading committed file `{key}`: {reason}")]
    Decode { key: String, reason: String },
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
    let records = CommitLog::all(store, Dataset::Events, node).await?;
    let mut sent = 0u64;
    let mut expected = from;
    for r in records {
        let (first, last) = (r.first.event_seq(), r.last.event_seq());
        if last < from || first >= to {
            continue;
        }
        if first > expected {
            return Err(ReplayError::Gap {
                node: node.to_string(),
                key: r.key,
                expected,
                found: first,
            });
        }
        let bytes = store
            .get(&r.key)
            .await?
            .ok_or_else(|| ReplayError::Missing { key: r.key.clone() })?;
        let decode = |e: parquet::errors::ParquetError| ReplayError::Decode {
            key: r.key.clone(),
            reason: e.to_string(),
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .map_err(decode)?
            .with_batch_size(batch.max(1))
            .build()
            .map_err(decode)?;
        for rb in reader {
            let rb = rb.map_err(|e| ReplayError::Decode {
                key: r.key.clone(),
                reason: e.to_string(),
            })?;
            let events: Vec<_> = batch_to_events(&rb)
                .map_err(|source| ReplayError::Schema {
                    key: r.key.clone(),
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
        expected = last + 1;
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
