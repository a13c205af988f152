//! Commit records: how a reader or a restart tells committed files from leftovers.
//!
//! Each sink (one dataset, one producer) writes its files in stream order, and before each data file a
//! small JSON record `_tcplake/commits/<dataset>/<producer>/<n>.json` naming it and the stream positions
//! it holds. A file is **committed** when its record exists and its data object exists; because records
//! are numbered and written one at a time, only the newest record can lack its data (a crash mid-upload).
//!
//! Protocol for file `n`: (1) create record `n` if absent (`If-None-Match: *`, or an atomic link on a
//! local directory); (2) create the data object. At startup, [`CommitLog::recover`] reads the newest
//! record; if its data is missing the record is deleted, so the file is redone or dropped. Correctness
//! with a single writer does not rest on conditional writes: a store that ignores them simply lets a
//! retried write overwrite identical bytes. Where they are honoured they also fence a second writer
//! with the same producer name ([`CommitError::Fenced`]).

use serde::{Deserialize, Serialize};

use super::store::{Store, StoreError};
use super::Dataset;

/// Prefix of everything tcplake keeps beside the datasets.
pub const META_PREFIX: &str = "_tcplake";

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
                reason: e.to_string(),
            })?;
        match v["id"].as_str() {
            Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Ok(id.to_string())
            }
            _ => Err(CommitError::Corrupt {
                key: OUTPUT_ID_KEY.into(),
                reason: "no valid `id`".into(),
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
            reason: "written but not found".into(),
        })?;
    read(bytes)
}

/// 16 random hex digits (from the kernel's generator; the clock and pid when it cannot be read).
fn new_id() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        Ok(u) => u.trim().replace('-', "").chars().take(16).collect(),
        Err(_) => format!(
            "{:08x}{:08x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ),
    }
}

/// Where a row sits in its stream, as recorded at a file's first and last rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    /// An event: its `seq` in the node's stream.
    Event { seq: u64 },
    /// A flow record: its window and rank within that window's sorted rows, plus where the aggregator
    /// must replay the event log from (and with which watermark) to emit it and everything after again.
    Flow {
        window_start_us: i64,
        rank: u32,
        replay_from_seq: u64,
        replay_watermark_us: i64,
        /// Events consumed (next `seq`) when the row was emitted: the log must hold them before the row
        /// is committed, so flows never count an event the log lacks.
        through_seq: u64,
        /// Emitted by the final flush at the end of the input (see `ReplayPoint::closing`).
        #[serde(default)]
        closing: bool,
    },
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

/// What a record says about one committed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRecord {
    /// Position of this record in the producer's sequence (0, 1, 2, ...).
    pub n: u64,
    /// Key of the data object (relative to the store root or prefix).
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    pub first: Position,
    pub last: Position,
    /// Set by `tcplake compact`: the rows now live in this larger file (with neighbouring records'
    /// rows), and `key` is gone. Readers use [`CommitRecord::data_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

impl CommitRecord {
    /// Where this record's rows are now: the original file, or the compacted file that holds them.
    pub fn data_key(&self) -> &str {
        self.moved_to.as_deref().unwrap_or(&self.key)
    }
}

/// Why a commit or recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "commit record `{key}` was written by another writer: is a second tcplake running with the same \
         node name and output?"
    )]
    Fenced { key: String },
    #[error("commit record `{key}` is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("data object `{key}` already exists with {found} bytes, expected {expected}")]
    Conflict {
        key: String,
        found: u64,
        expected: u64,
    },
}

/// The commit records of one dataset from one producer.
#[derive(Debug)]
pub struct CommitLog {
    store: Store,
    dir: String,
    next_n: u64,
    last: Option<CommitRecord>,
}

impl CommitLog {
    /// Directory (key prefix ending in `/`) of one producer's records.
    pub fn dir(dataset: Dataset, producer: &str) -> String {
        format!("{META_PREFIX}/commits/{}/{producer}/", dataset.name())
    }

    fn record_key(&self, n: u64) -> String {
        Self::key_of(&self.dir, n)
    }

    /// Key of record `n` in the records directory `dir`.
    pub fn key_of(dir: &str, n: u64) -> String {
        format!("{dir}{n:012}.json")
    }

    /// Reads the newest record; removes it if its data never arrived (the writer died mid-upload).
    pub async fn recover(
        store: Store,
        dataset: Dataset,
        producer: &str,
    ) -> Result<Self, CommitError> {
        let dir = Self::dir(dataset, producer);
        let mut keys = store.list(&dir).await?;
        keys.retain(|k| k.ends_with(".json"));
        keys.sort();
        let mut log = CommitLog {
            store,
            dir,
            next_n: 0,
            last: None,
        };
        while let Some(key) = keys.pop() {
            let record = log.read(&key).await?;
            if log.store.size(record.data_key()).await?.is_some() {
                log.next_n = record.n + 1;
                log.last = Some(record);
                break;
            }
            tracing::info!(record = %key, data = %record.key, "removing the record of a file that was never uploaded");
            log.store.delete(&key).await?;
        }
        Ok(log)
    }

    async fn read(&self, key: &str) -> Result<CommitRecord, CommitError> {
        Self::read_record(&self.store, key).await
    }

    /// The record stored under `key` (a path from [`CommitLog::key_of`]).
    pub async fn read_record(store: &Store, key: &str) -> Result<CommitRecord, CommitError> {
        let corrupt = |reason: String| CommitError::Corrupt {
            key: key.to_string(),
            reason,
        };
        let bytes = store
            .get(key)
            .await?
            .ok_or_else(|| corrupt("listed but gone".into()))?;
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// The newest committed file, if any.
    pub fn last(&self) -> Option<&CommitRecord> {
        self.last.as_ref()
    }

    /// Every record, oldest first (for readers and replay).
    pub async fn all(
        store: &Store,
        dataset: Dataset,
        producer: &str,
    ) -> Result<Vec<CommitRecord>, CommitError> {
        let log = CommitLog {
            store: store.clone(),
            dir: Self::dir(dataset, producer),
            next_n: 0,
            last: None,
        };
        let mut keys = store.list(&log.dir).await?;
        keys.retain(|k| k.ends_with(".json"));
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(log.read(&k).await?);
        }
        Ok(out)
    }

    /// Commits one sealed file: the record first, then the data.
    pub async fn commit(
        &mut self,
        staged: &std::path::Path,
        key: &str,
        rows: u64,
        bytes: u64,
        first: Position,
        last: Position,
    ) -> Result<(), CommitError> {
        let record = CommitRecord {
            n: self.next_n,
            key: key.to_string(),
            rows,
            bytes,
            first,
            last,
            moved_to: None,
        };
        let rkey = self.record_key(record.n);
        let body = serde_json::to_vec_pretty(&record).expect("a record always serializes");
        if !self.store.put_if_absent(&rkey, &body).await? {
            // Ours from an attempt whose answer was lost, or another writer's.
            match self.store.get(&rkey).await? {
                Some(existing) if existing == body => {}
                _ => return Err(CommitError::Fenced { key: rkey }),
            }
        }
        if !self.store.commit(staged, key).await? {
            let found = self.store.size(key).await?.unwrap_or(0);
            if found != bytes {
                return Err(CommitError::Conflict {
                    key: key.to_string(),
                    found,
                    expected: bytes,
                });
            }
        }
        self.next_n += 1;
        self.last = Some(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::LocalDir;

    fn stage(store: &Store, key: &str, body: &[u8]) -> std::path::PathBuf {
        let p = store.staging_path(key).unwrap();
        std::fs::write(&p, body).unwrap();
        p
    }

    #[tokio::test]
    async fn records_then_data_and_recovery_drops_a_record_without_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let mut log = CommitLog::recover(store.clone(), Dataset::Events, "n1")
            .await
            .unwrap();
        assert!(log.last().is_none());
        let ev = |seq| Position::Event { seq };
        for (i, key) in ["events/a.parquet", "events/b.parquet"].iter().enumerate() {
            let staged = stage(&store, key, b"12345");
            let i = i as u64;
            log.commit(&staged, key, 10, 5, ev(i * 10), ev(i * 10 + 9))
                .await
                .unwrap();
        }
        let log = CommitLog::recover(store.clone(), Dataset::Events, "n1")
            .await
            .unwrap();
        assert_eq!(log.last().unwrap().n, 1);
        assert_eq!(log.last().unwrap().last, ev(19));

        // A writer died after record 2 and before its data: recovery forgets record 2.
        let orphan = CommitRecord {
            n: 2,
            key: "events/c.parquet".into(),
            rows: 1,
            bytes: 1,
            first: ev(20),
            last: ev(20),
            moved_to: None,
        };
        let rkey = CommitLog::key_of(&CommitLog::dir(Dataset::Events, "n1"), 2);
        assert!(store
            .put_if_absent(&rkey, &serde_json::to_vec(&orphan).unwrap())
            .await
            .unwrap());
        let mut log = CommitLog::recover(store.clone(), Dataset::Events, "n1")
            .await
            .unwrap();
        assert_eq!(log.last().unwrap().n, 1);
        assert_eq!(store.get(&rkey).await.unwrap(), None);
        // ... and the redo takes its place.
        let staged = stage(&store, "events/c2.parquet", b"xy");
        log.commit(&staged, "events/c2.parquet", 2, 2, ev(20), ev(21))
            .await
            .unwrap();
        let all = CommitLog::all(&store, Dataset::Events, "n1").await.unwrap();
        assert_eq!(all.iter().map(|r| r.n).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(all[2].key, "events/c2.parquet");
    }

    #[tokio::test]
    async fn a_second_writer_with_the_same_name_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let mut a = CommitLog::recover(store.clone(), Dataset::Flows, "agg")
            .await
            .unwrap();
        let mut b = CommitLog::recover(store.clone(), Dataset::Flows, "agg")
            .await
            .unwrap();
        let p = Position::Event { seq: 0 };
        let s = stage(&store, "flows/a.parquet", b"a");
        a.commit(&s, "flows/a.parquet", 1, 1, p, p).await.unwrap();
        let s = stage(&store, "flows/b.parquet", b"b");
        let err = b
            .commit(&s, "flows/b.parquet", 1, 1, p, p)
            .await
            .unwrap_err();
        assert!(matches!(err, CommitError::Fenced { .. }), "{err}");
    }
}
