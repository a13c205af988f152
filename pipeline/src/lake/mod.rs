//! The lake: tcplake's table format. The output holds two Delta Lake tables — `events/` (the log, the
//! source of truth) and `flows/` (its projection) — partitioned by `date` and `hour`, written through
//! delta-rs, so every engine that reads Delta sees exactly the committed rows, atomically.
//!
//! This module owns what a table is made of and how it changes: file names ([`names`]), one
//! producer's commits with its progress recorded as Delta application transactions ([`producer`]),
//! reading the committed event log back — the one reader restart, replay, the recorded source and
//! compaction share ([`events_log`]) — and compaction as remove + add in one commit ([`compact`]). It
//! knows nothing of stages or edges; where bytes go is [`crate::storage`]'s business.
//!
//! Outputs written before the tables (schema version 1: `_tcplake/commits` records) are still read
//! ([`legacy`]), so old event logs replay.

pub mod committed;
pub mod compact;
pub mod events_log;
pub mod format;
pub mod legacy;
pub mod names;
pub mod objects;
pub mod producer;
pub mod projection;
pub mod read;
pub mod table;
pub mod vacuum;

use arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};

use crate::event::schema::{events_file_batch_schema, events_schema, flows_schema};
use crate::storage::{new_id, Store, StoreError};
pub use producer::{CommitError, CommitLog};
pub use table::{FileEntry, NewFile, Table, TableError};

/// Prefix of what tcplake keeps beside the tables.
pub const META_PREFIX: &str = "_tcplake";

/// The two datasets tcplake writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// The raw event log: the source of truth.
    Events,
    /// Per-flow, per-window records: a projection of the log.
    Flows,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Events => "events",
            Dataset::Flows => "flows",
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            Dataset::Events => events_schema(),
            Dataset::Flows => flows_schema(),
        }
    }

    /// The schema of the record batches the sink writes into this dataset's files of [`Self::schema`]
    /// (the same Parquet columns; some built as dictionaries, see [`events_file_batch_schema`]).
    pub fn batch_schema(self) -> SchemaRef {
        match self {
            Dataset::Events => events_file_batch_schema(),
            Dataset::Flows => flows_schema(),
        }
    }
}

/// Where a row sits in its stream, as recorded at a file's first and last rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// An event: its `seq` in the node's stream.
    Event { seq: u64 },
    /// A flow record: the emission it belongs to, and the input the aggregator had consumed when it made
    /// it — the log must hold those events before the row is committed, so flows never count an event
    /// the log lacks.
    Flow { emission: u64, through_seq: u64 },
}

impl Position {
    /// The position on the events edge: an event's `seq`, or what a flow row had consumed.
    pub fn event_seq(self) -> u64 {
        match self {
            Position::Event { seq } => seq,
            Position::Flow { through_seq, .. } => through_seq,
        }
    }
}

/// Key of the output's identity record.
const OUTPUT_ID_KEY: &str = "_tcplake/output.json";

/// The output's identity: a random id stored in `_tcplake/output.json` when the output is first
/// written. Things that must belong to one output (a sink's broker consumers) are named after it, so a
/// new output is never mistaken for an old one.
pub async fn output_id(store: &Store) -> Result<String, CommitError> {
    let read = |bytes: Vec<u8>| -> Result<String, CommitError> {
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CommitError::Corrupt {
                key: OUTPUT_ID_KEY.into(),
                source: e.into(),
            })?;
        match v["id"].as_str() {
            Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Ok(id.to_string())
            }
            _ => Err(CommitError::Corrupt {
                key: OUTPUT_ID_KEY.into(),
                source: "no valid `id`".into(),
            }),
        }
    };
    if let Some(bytes) = store.get(OUTPUT_ID_KEY).await? {
        return read(bytes);
    }
    let id = new_id();
    let body = serde_json::to_vec_pretty(&serde_json::json!({ "id": id }))
        .expect("a small object serializes");
    // Two first writers race: the one whose record landed wins, and both read it back.
    store.put_if_absent(OUTPUT_ID_KEY, &body).await?;
    let bytes = store
        .get(OUTPUT_ID_KEY)
        .await?
        .ok_or_else(|| CommitError::Corrupt {
            key: OUTPUT_ID_KEY.into(),
            source: "written but not found".into(),
        })?;
    read(bytes)
}

/// The output's identity if it has one (read only: a replayed archive is never written).
pub async fn read_output_id(store: &Store) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(OUTPUT_ID_KEY)
        .await?
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["id"].as_str().map(str::to_string)))
}
