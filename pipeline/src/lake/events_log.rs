//! The committed event log, read back: the one reader that a restart (feeding the aggregator), a replay
//! (the recorded source) and compaction share. The log of a node is its committed event files in `seq`
//! order — the active files of the `events` table whose names carry the node, or, for an output of
//! schema version 1, its commit records ([`super::legacy`]).

use super::legacy::{self, LegacyError};
use super::names;
use super::table::{Table, TableError};
use super::Dataset;
use crate::storage::{Store, StoreError};

/// One committed file of a node's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFile {
    /// Key of the data in the store (`events/date=…/hour=…/name.parquet`).
    pub key: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Rows, where the table says.
    pub rows: Option<u64>,
}

/// Why the log could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Legacy(#[from] LegacyError),
}

/// The nodes whose event logs the output holds, sorted.
pub async fn nodes(store: &Store) -> Result<Vec<String>, LogError> {
    match Table::open(store, Dataset::Events).await? {
        Some(t) => {
            let mut nodes: Vec<String> = t
                .files()?
                .iter()
                .filter_map(|f| names::parse(f.name()).map(|n| n.producer))
                .collect();
            nodes.sort();
            nodes.dedup();
            Ok(nodes)
        }
        None => Ok(legacy::producers(store, Dataset::Events).await?),
    }
}

/// The committed files of `node`'s log, in `seq` order (files merged by compaction appear once).
pub async fn files(store: &Store, node: &str) -> Result<Vec<EventFile>, LogError> {
    match Table::open(store, Dataset::Events).await? {
        Some(t) => Ok(table_files(&t, node)?),
        None => {
            let mut out: Vec<EventFile> = Vec::new();
            for r in legacy::records(store, Dataset::Events, node).await? {
                let (first, last) = (r.first.event_seq(), r.last.event_seq());
                match out.last_mut() {
                    // Records merged by compaction share one file: it is listed once.
                    Some(prev) if prev.key == r.data_key() => prev.last_seq = last,
                    _ => out.push(EventFile {
                        key: r.data_key().to_string(),
                        first_seq: first,
                        last_seq: last,
                        rows: None,
                    }),
                }
            }
            Ok(out)
        }
    }
}

/// The files of `node` in a table snapshot, in `seq` order.
pub fn table_files(t: &Table, node: &str) -> Result<Vec<EventFile>, TableError> {
    let mut out: Vec<EventFile> = t
        .files()?
        .into_iter()
        .filter_map(|f| {
            let n = names::parse(f.name())?;
            (n.producer == node).then(|| EventFile {
                key: format!("{}/{}", Dataset::Events.name(), f.path),
                first_seq: n.first as u64,
                last_seq: n.last as u64,
                rows: f.rows,
            })
        })
        .collect();
    out.sort_by_key(|f| f.first_seq);
    Ok(out)
}
