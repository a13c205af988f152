//! Outputs of tcplake before the Delta tables (schema version 1): each file had a JSON commit record
//! `_tcplake/commits/<dataset>/<producer>/<n>.json` naming it and the stream positions it held (and,
//! after `tcplake compact`, `moved_to`: the merged file that holds its rows now). Read only: such an
//! output's event log still replays (`tcplake replay --from OLD --to NEW` writes tables).

use serde::Deserialize;

use super::{Dataset, Position, META_PREFIX};
use crate::storage::{Store, StoreError};

/// What a version-1 record says about one committed file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CommitRecord {
    pub n: u64,
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    pub first: Position,
    pub last: Position,
    #[serde(default)]
    pub moved_to: Option<String>,
}

impl CommitRecord {
    /// Where this record's rows are now: the original file, or the compacted file that holds them.
    pub fn data_key(&self) -> &str {
        self.moved_to.as_deref().unwrap_or(&self.key)
    }
}

/// Why version-1 records could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("commit record `{key}` was listed but is gone")]
    Gone { key: String },
    #[error("commit record `{key}` is unreadable")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

fn dir(dataset: Dataset) -> String {
    format!("{META_PREFIX}/commits/{}/", dataset.name())
}

/// Does the output hold version-1 records of `dataset`?
pub async fn present(store: &Store, dataset: Dataset) -> Result<bool, StoreError> {
    Ok(!store.list_dirs(&dir(dataset)).await?.is_empty())
}

/// The producers with version-1 records of `dataset`.
pub async fn producers(store: &Store, dataset: Dataset) -> Result<Vec<String>, StoreError> {
    store.list_dirs(&dir(dataset)).await
}

/// Every record of one producer, oldest first. Records whose data never arrived (the writer died
/// mid-upload: only the newest can be such) are left out.
pub async fn records(
    store: &Store,
    dataset: Dataset,
    producer: &str,
) -> Result<Vec<CommitRecord>, LegacyError> {
    let d = format!("{}{producer}/", dir(dataset));
    let mut keys: Vec<String> = store
        .list(&d)
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".json") && k.strip_prefix(&d).is_some_and(|r| !r.contains('/')))
        .collect();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let bytes = store
            .get(&k)
            .await?
            .ok_or_else(|| LegacyError::Gone { key: k.clone() })?;
        let record: CommitRecord =
            serde_json::from_slice(&bytes).map_err(|source| LegacyError::Corrupt {
                key: k.clone(),
                source,
            })?;
        out.push(record);
    }
    if let Some(last) = out.last() {
        if store.size(last.data_key()).await?.is_none() {
            out.pop();
        }
    }
    Ok(out)
}
