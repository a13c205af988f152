//! Parquet files that stay open across many batches and windows and close on size or age. Many windows
//! per file, never a file per batch: small files are what make data lakes slow and expensive to query.
//!
//! Files of several partitions may be open at once (events a little out of time order at an hour
//! boundary land in the hour before without closing the hour being written), and they are always sealed
//! together, as one **group** that is committed in one commit: a commit then holds every row written
//! since the one before, a contiguous stretch of the stream, which is what lets a restart resume from
//! the last commit (`lake::producer`). A group is sealed when a file reaches the size limit, the oldest
//! file the age limit, or a row arrives for a partition beyond [`MAX_OPEN_PARTITIONS`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::file::properties::WriterProperties;

use super::encoder::Encoder;
use super::parquet_file::ParquetFile;
use crate::lake::format::writer_properties;
use crate::lake::{Dataset, Position};
use crate::storage::{Store, StoreError};
use crate::time::Partition;

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing Parquet file `{path}`: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("syncing `{path}`: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// When an open file is closed and committed.
#[derive(Clone, Copy, Debug)]
pub struct RollPolicy {
    /// Close once the file (written plus buffered) reaches this many bytes.
    pub max_bytes: u64,
    /// Close once the file has been open this long.
    pub max_age: Duration,
    /// Rows per Parquet row group (bounds the memory a file holds before flushing).
    pub row_group_rows: usize,
    /// More than 1: a batch's columns are built and encoded on the encoder threads (see
    /// [`super::encoder`]); 1: on the calling thread.
    pub encode_threads: usize,
}

/// At most this many partitions have a file open; a row for another seals them all first. Stragglers
/// reach back an hour or two at most; more open files would only hold more memory.
pub const MAX_OPEN_PARTITIONS: usize = 3;

/// Files sealed together, to be committed together, in one commit (never empty).
pub type Group = Vec<SealedFile>;

/// A complete, fsynced Parquet file under its temporary name, ready for [`Store::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedFile {
    /// A name for it while it is staged (`<dataset>/date=.../hour=../<stem>.parquet`); the lake names it
    /// for good when it commits it.
    pub key: String,
    pub partition: Partition,
    /// Where it is now.
    pub staged: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    /// Stream positions of the first and last rows.
    pub first: Position,
    pub last: Position,
    /// When capture sent each batch with rows in this file (for end-to-end latency).
    pub sent_at_us: Vec<i64>,
    /// Smallest and largest partition time of its rows (flows: window starts).
    pub ts_range: (i64, i64),
    /// Flows: the replay point of the last emission it holds.
    pub replay: Option<crate::event::ReplayPoint>,
}

struct OpenFile {
    key: String,
    partition: Partition,
    staged: PathBuf,
    writer: ParquetFile,
    opened: Instant,
    rows: u64,
    first: Position,
    last: Position,
    sent_at_us: Vec<i64>,
    ts_range: (i64, i64),
    replay: Option<crate::event::ReplayPoint>,
}

/// Rows for one partition, with what the sink knows about them.
pub struct Chunk<'a> {
    pub partition: Partition,
    pub batch: &'a RecordBatch,
    /// Stream positions of the first and last rows.
    pub span: (Position, Position),
    /// Smallest and largest partition time of the rows.
    pub ts_range: (i64, i64),
    /// When capture sent the rows on (events).
    pub sent_at_us: Option<i64>,
    /// Flows: the replay point that comes with the rows.
    pub replay: Option<&'a crate::event::ReplayPoint>,
}

/// One dataset's open files, keyed by partition.
pub struct RollingWriter {
    dataset: &'static str,
    schema: SchemaRef,
    /// What the sink's batches hold ([`Dataset::batch_schema`]).
    batches: SchemaRef,
    store: Store,
    policy: RollPolicy,
    props: WriterProperties,
    open: BTreeMap<Partition, OpenFile>,
}

impl RollingWriter {
    pub fn new(dataset: Dataset, store: Store, policy: RollPolicy) -> Self {
        let props = writer_properties(dataset.name(), policy.row_group_rows);
        RollingWriter {
            dataset: dataset.name(),
            schema: dataset.schema(),
            batches: dataset.batch_schema(),
            store,
            policy,
            props,
            open: BTreeMap::new(),
        }
    }

    /// Appends `batch` (rows at stream positions `first..=last`) to the open file of `partition`,
    /// opening one named `stem` if there is none. Returns the groups sealed: every open file, before a
    /// file for one partition too many is opened, and after one reaches its size.
    pub fn write(
        &mut self,
        chunk: Chunk<'_>,
        stem: impl FnOnce() -> String,
    ) -> Result<Vec<Group>, WriteError> {
        let Chunk {
            partition,
            batch,
            span: (first, last),
            ts_range,
            sent_at_us,
            replay,
        } = chunk;
        let mut sealed = Vec::new();
        if !self.open.contains_key(&partition) {
            if self.open.len() >= MAX_OPEN_PARTITIONS {
                sealed.extend(self.seal_all()?);
            }
            let file = self.create(&partition, &stem(), first)?;
            self.open.insert(partition.clone(), file);
        }
        let file = self.open.get_mut(&partition).expect("just inserted");
        if let Err(source) = file.writer.write(batch) {
            let path = file.staged.clone();
            self.abandon(&partition);
            return Err(WriteError::Parquet { path, source });
        }
        file.rows += batch.num_rows() as u64;
        file.last = last;
        file.sent_at_us.extend(sent_at_us);
        file.ts_range = (
            file.ts_range.0.min(ts_range.0),
            file.ts_range.1.max(ts_range.1),
        );
        if let Some(r) = replay {
            file.replay = Some(r.clone());
        }
        if file.writer.size() >= self.policy.max_bytes {
            sealed.extend(self.seal_all()?);
        }
        Ok(sealed)
    }

    /// Where this writer's batches are built and encoded, column by column.
    pub fn encoder(&self) -> Encoder {
        Encoder::new(self.policy.encode_threads)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// No file is open.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
    }

    /// Seals the open files if the oldest has been open longer than the age limit.
    pub fn roll_aged(&mut self, now: Instant) -> Result<Option<Group>, WriteError> {
        let aged = self
            .open
            .values()
            .any(|f| now.duration_since(f.opened) >= self.policy.max_age);
        if aged {
            self.seal_all()
        } else {
            Ok(None)
        }
    }

    /// Seals every open file, as one group (end of input, shutdown, a roll); `None` if none is open.
    pub fn seal_all(&mut self) -> Result<Option<Group>, WriteError> {
        let all: Vec<Partition> = self.open.keys().cloned().collect();
        let mut group = Vec::with_capacity(all.len());
        for p in &all {
            match self.close(p) {
                Ok(f) => group.push(f),
                Err(e) => {
                    // The group is committed whole or not at all: drop what was sealed of it.
                    for f in group {
                        self.store.discard(&f.staged);
                    }
                    return Err(e);
                }
            }
        }
        Ok((!group.is_empty()).then_some(group))
    }

    fn create(
        &self,
        partition: &Partition,
        stem: &str,
        first: Position,
    ) -> Result<OpenFile, WriteError> {
        let key = format!("{}/{}/{stem}.parquet", self.dataset, partition.path());
        let staged = self.store.staging_path(&key)?;
        let parquet_err = |source| WriteError::Parquet {
            path: staged.clone(),
            source,
        };
        let file = File::create(&staged).map_err(|e| parquet_err(e.into()))?;
        let writer = ParquetFile::try_new(
            file,
            self.schema.clone(),
            &self.batches,
            self.props.clone(),
            self.encoder(),
        )
        .map_err(|e| {
            self.store.discard(&staged);
            parquet_err(e)
        })?;
        Ok(OpenFile {
            key,
            partition: partition.clone(),
            staged,
            writer,
            opened: Instant::now(),
            rows: 0,
            first,
            last: first,
            sent_at_us: Vec::new(),
            ts_range: (i64::MAX, i64::MIN),
            replay: None,
        })
    }

    fn close(&mut self, partition: &Partition) -> Result<SealedFile, WriteError> {
        let f = self
            .open
            .remove(partition)
            .expect("closing a file that is open");
        let OpenFile {
            key,
            partition,
            staged,
            writer,
            rows,
            first,
            last,
            sent_at_us,
            ts_range,
            replay,
            ..
        } = f;
        let seal = || -> Result<u64, WriteError> {
            let file = writer.finish().map_err(|source| WriteError::Parquet {
                path: staged.clone(),
                source,
            })?;
            file.sync_all().map_err(|source| WriteError::Sync {
                path: staged.clone(),
                source,
            })?;
            Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
        };
        match seal() {
            Ok(bytes) => Ok(SealedFile {
                key,
                partition,
                staged,
                rows,
                bytes,
                first,
                last,
                sent_at_us,
                ts_range,
                replay,
            }),
            Err(e) => {
                self.store.discard(&staged);
                Err(e)
            }
        }
    }

    fn abandon(&mut self, partition: &Partition) {
        if let Some(f) = self.open.remove(partition) {
            self.store.discard(&f.staged);
        }
    }
}

impl Drop for RollingWriter {
    /// Files still open here were never committed (an error stopped the stage): remove their temporary
    /// names so nothing half-written is left behind.
    fn drop(&mut self) {
        for (_, f) in std::mem::take(&mut self.open) {
            self.store.discard(&f.staged);
        }
    }
}
