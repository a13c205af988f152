//! One Delta Lake table of the output (`events/` or `flows/`), through delta-rs: created on first use
//! with its schema, partition columns (`date`, `hour`) and tcplake's table properties; read as a
//! snapshot (active files, application-transaction versions); changed by commits — data files added,
//! replaced ones removed, and tcplake's progress recorded as application transactions, all in one Delta
//! commit, which delta-rs makes with optimistic concurrency (a conditional PUT of the next version,
//! retried against concurrent writers).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{
    Action, Add, DataType, MetadataExt, PrimitiveType, Remove, StructField, StructType, Transaction,
};
use deltalake_core::logstore::{default_logstore, LogStoreRef, StorageConfig};
use deltalake_core::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableError, ObjectStore};
use object_store::local::LocalFileSystem;

use super::objects::{Counted, S3Objects};
use crate::lake::Dataset;
use crate::storage::{Store, StoreError};

/// Why a table could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{dataset} table: {source}")]
    Delta {
        dataset: &'static str,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{dataset} table at {location}: {reason}")]
    Location {
        dataset: &'static str,
        location: String,
        reason: String,
    },
    #[error(
        "{dataset} table: another writer's commits replaced this one's in the Delta log again and \
         again (last at version {version}): the object store does not decide conditional writes \
         atomically; write outputs several writers share to one that does (S3, MinIO, R2)"
    )]
    Overwritten { dataset: &'static str, version: i64 },
    #[error(
        "{dataset} table: another writer committed as `{app_id}` (is a second tcplake running with the \
         same node name and output?)"
    )]
    Fenced {
        dataset: &'static str,
        app_id: String,
    },
}

/// A data file as the table lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the table root (`date=2026-01-01/hour=00/name.parquet`).
    pub path: String,
    pub size: u64,
    pub rows: Option<u64>,
    pub partition: BTreeMap<String, Option<String>>,
}

impl FileEntry {
    /// The file's name (its last path segment).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// `date=YYYY-MM-DD/hour=HH`, the directory it lives in.
    pub fn partition_dir(&self) -> &str {
        self.path.rsplit_once('/').map_or("", |(d, _)| d)
    }
}

/// A data file to add: already written under `path` (relative to the table root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFile {
    pub path: String,
    pub size: u64,
    pub rows: u64,
    /// `date` and `hour` partition values.
    pub date: String,
    pub hour: u32,
    /// Integer column statistics (`seq`) for readers that skip files.
    pub int_stats: Vec<(&'static str, i64, i64)>,
}

/// What kind of change a commit is (the Delta operation it records).
#[derive(Clone, Debug)]
pub enum Change {
    /// A producer's stream: new rows, and rows that replace removed ones (window rewrites).
    Stream { producer: String, n: i64 },
    /// Compaction: the same rows in fewer files (no data change).
    Compact,
}

/// The partition columns every table has, in the order of the paths.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];

/// An open table.
pub struct Table {
    dataset: Dataset,
    table: DeltaTable,
    location: String,
    /// Read back each stream commit's log entry (see [`Table::commit`]): on object stores, where a
    /// store that decides conditional writes non-atomically can let another writer overwrite it.
    check_commits: bool,
    /// The last stream commit made through this handle, until its log entry has been read back.
    unverified: Option<Unverified>,
}

/// A stream commit not yet read back: what it did, to do it again if another writer's overwrote it.
#[derive(Clone, Debug)]
struct Unverified {
    version: i64,
    operation: DeltaOperation,
    actions: Vec<Action>,
    txns: Vec<(String, i64)>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("dataset", &self.dataset.name())
            .field("location", &self.location)
            .finish()
    }
}

/// The delta-rs log store of `dataset` in `store`: object_store's file system store for a directory,
/// tcplake's own S3 client for a bucket.
fn log_store(store: &Store, dataset: Dataset) -> Result<(LogStoreRef, String), TableError> {
    let bad = |location: String, reason: String| TableError::Location {
        dataset: dataset.name(),
        location,
        reason,
    };
    match store {
        Store::Local(d) => {
            let root = d.root().join(dataset.name());
            let shown = root.display().to_string();
            std::fs::create_dir_all(&root).map_err(|e| bad(shown.clone(), e.to_string()))?;
            let abs =
                std::fs::canonicalize(&root).map_err(|e| bad(shown.clone(), e.to_string()))?;
            let url = url::Url::from_directory_path(&abs)
                .map_err(|()| bad(shown.clone(), "not an absolute path".into()))?;
            let prefixed: Arc<dyn ObjectStore> = Arc::new(Counted::new(
                Arc::new(
                    LocalFileSystem::new_with_prefix(&abs)
                        .map_err(|e| bad(shown.clone(), e.to_string()))?,
                ),
                store.log_requests(),
            ));
            let root_store: Arc<dyn ObjectStore> = Arc::new(Counted::new(
                Arc::new(LocalFileSystem::new()),
                store.log_requests(),
            ));
            Ok((
                default_logstore(prefixed, root_store, &url, &StorageConfig::default()),
                shown,
            ))
        }
        Store::S3(s) => {
            let shown = format!("{}/{}", s.url().trim_end_matches('/'), dataset.name());
            let url = url::Url::parse(&format!("{shown}/"))
                .map_err(|e| bad(shown.clone(), e.to_string()))?;
            // delta-rs addresses the table's objects relative to its root; the kernel addresses
            // them by the path of the table's URL, from the bucket's root.
            let prefixed: Arc<dyn ObjectStore> = Arc::new(Counted::new(
                Arc::new(S3Objects::new(s.clone(), dataset.name())),
                store.log_requests(),
            ));
            let root: Arc<dyn ObjectStore> = Arc::new(Counted::new(
                Arc::new(S3Objects::new(s.at_bucket_root(), "")),
                store.log_requests(),
            ));
            Ok((
                default_logstore(prefixed, root, &url, &StorageConfig::default()),
                shown,
            ))
        }
    }
}

/// The Delta schema of a dataset: its Parquet columns, then the partition columns.
fn delta_columns(dataset: Dataset) -> Vec<StructField> {
    use arrow::datatypes::{DataType as A, TimeUnit};
    let mut cols: Vec<StructField> = dataset
        .schema()
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                A::Timestamp(TimeUnit::Microsecond, Some(_)) => PrimitiveType::Timestamp,
                A::Int64 => PrimitiveType::Long,
                A::Int32 => PrimitiveType::Integer,
                A::Utf8 => PrimitiveType::String,
                other => unreachable!("tcplake's schemas use no {other} columns"),
            };
            StructField::new(f.name(), DataType::Primitive(t), f.is_nullable())
        })
        .collect();
    cols.push(StructField::new(
        "date",
        DataType::Primitive(PrimitiveType::Date),
        false,
    ));
    cols.push(StructField::new(
        "hour",
        DataType::Primitive(PrimitiveType::Integer),
        false,
    ));
    cols
}

/// The columns of the dataset's schema that `table` lacks (a table an older tcplake made).
fn missing_columns(
    table: &DeltaTable,
    dataset: Dataset,
) -> Result<Vec<StructField>, DeltaTableError> {
    let schema = table.snapshot()?.schema();
    Ok(delta_columns(dataset)
        .into_iter()
        .filter(|f| !schema.contains(f.name()))
        .collect())
}

/// Brings a table an older tcplake made up to this build's schema: the columns a later schema
/// version added (nullable, so the rows already there read them as null) are added to the table's
/// schema in one commit (a Delta `ADD COLUMN`), before any file that has them is committed: readers
/// take a table's columns from its schema, not from its files. The commit writes the schema in this
/// build's column order, the one a new table has (the partition columns last), so `SELECT *` reads an
/// upgraded table and a new one alike; Delta matches files' columns by name. Two writers doing it at
/// once: one adds, the other finds them there.
async fn evolve(table: DeltaTable, dataset: Dataset) -> Result<DeltaTable, TableError> {
    let delta = |source| TableError::Delta {
        dataset: dataset.name(),
        source: Box::new(source),
    };
    let missing = missing_columns(&table, dataset).map_err(delta)?;
    if missing.is_empty() {
        return Ok(table);
    }
    if let Some(f) = missing.iter().find(|f| !f.is_nullable()) {
        return Err(TableError::Location {
            dataset: dataset.name(),
            location: table.table_url().to_string(),
            reason: format!(
                "the table has no column `{}`, which every tcplake version writes: it is not a \
                 tcplake table",
                f.name()
            ),
        });
    }
    let names: Vec<String> = missing.iter().map(|f| f.name().to_string()).collect();
    let log_store = table.log_store();
    let committed = async {
        let snapshot = table.snapshot()?;
        let schema = StructType::try_new(delta_columns(dataset))?;
        let metadata = snapshot.metadata().clone().with_schema(&schema)?;
        CommitBuilder::default()
            .with_actions(vec![Action::Metadata(metadata)])
            .build(
                Some(snapshot),
                Arc::clone(&log_store),
                DeltaOperation::AddColumn { fields: missing },
            )
            .await
    }
    .await;
    let mut fresh = DeltaTable::new(log_store);
    fresh.load().await.map_err(delta)?;
    match committed {
        Ok(_) => {
            tracing::info!(
                dataset = dataset.name(),
                columns = names.join(","),
                "added the columns of schema version {} to the table",
                crate::event::schema::SCHEMA_VERSION
            );
            Ok(fresh)
        }
        // Another writer added them first.
        Err(_) if missing_columns(&fresh, dataset).map_err(delta)?.is_empty() => Ok(fresh),
        Err(e) => Err(delta(e)),
    }
}

impl Table {
    /// Opens the dataset's table in `store`, creating it (schema, partitioning, `properties`) if there
    /// is none yet. Two processes creating it at once are fine: one creates, both open it.
    pub async fn open_or_create(
        store: &Store,
        dataset: Dataset,
        properties: &BTreeMap<String, String>,
    ) -> Result<Self, TableError> {
        let (log_store, location) = log_store(store, dataset)?;
        let delta = |source| TableError::Delta {
            dataset: dataset.name(),
            source: Box::new(source),
        };
        let exists = log_store.is_delta_table_location().await.map_err(delta)?;
        if !exists {
            let created = deltalake_core::operations::create::CreateBuilder::new()
                .with_log_store(Arc::clone(&log_store))
                .with_table_name(dataset.name())
                .with_columns(delta_columns(dataset))
                .with_partition_columns(PARTITION_COLUMNS)
                .with_configuration(properties.iter().map(|(k, v)| (k.clone(), Some(v.clone()))))
                .with_save_mode(SaveMode::Ignore)
                // tcplake's own properties (`tcplake.*`) are not Delta's: keep them as they are.
                .with_raise_if_key_not_exists(false)
                .await;
            match created {
                Ok(_) => {}
                // Another process created it first: open theirs.
                Err(e) if log_store.is_delta_table_location().await.unwrap_or(false) => {
                    tracing::debug!(error = %e, "table created concurrently");
                }
                Err(e) => return Err(delta(e)),
            }
        }
        let mut table = DeltaTable::new(log_store);
        table.load().await.map_err(delta)?;
        let table = evolve(table, dataset).await?;
        Ok(Table {
            dataset,
            table,
            location,
            check_commits: matches!(store, Store::S3(_)),
            unverified: None,
        })
    }

    /// Brings a table opened with [`Self::open`] up to this build's schema before writing to it
    /// (see `evolve`).
    pub async fn upgrade(&mut self) -> Result<(), TableError> {
        let placeholder = DeltaTable::new(self.table.log_store());
        let table = std::mem::replace(&mut self.table, placeholder);
        self.table = evolve(table, self.dataset).await?;
        Ok(())
    }

    /// Opens an existing table to read; `None` if the output has none.
    pub async fn open(store: &Store, dataset: Dataset) -> Result<Option<Self>, TableError> {
        let (log_store, location) = log_store(store, dataset)?;
        let delta = |source| TableError::Delta {
            dataset: dataset.name(),
            source: Box::new(source),
        };
        if !log_store.is_delta_table_location().await.map_err(delta)? {
            return Ok(None);
        }
        let mut table = DeltaTable::new(log_store);
        table.load().await.map_err(delta)?;
        Ok(Some(Table {
            dataset,
            table,
            location,
            check_commits: matches!(store, Store::S3(_)),
            unverified: None,
        }))
    }

    fn err(&self) -> impl Fn(DeltaTableError) -> TableError + '_ {
        move |source| TableError::Delta {
            dataset: self.dataset.name(),
            source: Box::new(source),
        }
    }

    /// Reads the newest version of the table.
    pub async fn refresh(&mut self) -> Result<(), TableError> {
        let dataset = self.dataset.name();
        self.table
            .update_state()
            .await
            .map_err(|source| TableError::Delta {
                dataset,
                source: Box::new(source),
            })
    }

    /// Where the table lives (for messages).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The table version read.
    pub fn version(&self) -> i64 {
        self.table.version().map_or(-1, |v| v as i64)
    }

    /// The table's properties (`tcplake.*` keys describe the projection it holds).
    pub fn properties(&self) -> Result<HashMap<String, String>, TableError> {
        let snapshot = self.table.snapshot().map_err(self.err())?;
        Ok(snapshot.metadata().configuration().clone())
    }

    /// The version the application `app_id` last committed, if any.
    pub async fn app_version(&self, app_id: &str) -> Result<Option<i64>, TableError> {
        let snapshot = self.table.snapshot().map_err(self.err())?;
        snapshot
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await
            .map_err(self.err())
    }

    /// Every file of the current snapshot.
    pub fn files(&self) -> Result<Vec<FileEntry>, TableError> {
        let snapshot = self.table.snapshot().map_err(self.err())?;
        let mut out: Vec<FileEntry> = snapshot
            .log_data()
            .iter()
            .map(|f| FileEntry {
                path: percent_decode(&f.path()),
                size: f.size().max(0) as u64,
                rows: f.num_records().map(|n| n as u64),
                partition: f
                    .partition_values_map()
                    .into_iter()
                    .collect::<BTreeMap<_, _>>(),
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Deletes files only versions older than `retention` need, and unreferenced ones that old.
    /// Returns how many were deleted.
    pub async fn vacuum(&self, retention: std::time::Duration) -> Result<u64, TableError> {
        let dataset = self.dataset.name();
        let mut ops = DeltaTable::new(self.table.log_store());
        ops.state = self.table.state.clone();
        let (_, metrics) = ops
            .vacuum()
            .with_retention_period(
                chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
            )
            // The user chose the retention: Delta's 7-day floor guards readers of old versions, and
            // the documentation says what a shorter one means for them.
            .with_enforce_retention_duration(false)
            .with_mode(deltalake_core::operations::vacuum::VacuumMode::Full)
            .await
            .map_err(|source| TableError::Delta {
                dataset,
                source: Box::new(source),
            })?;
        Ok(metrics.files_deleted.len() as u64)
    }

    /// Commits `adds` and `removes` with the application versions `txns`, in one Delta commit. Returns
    /// the table version it became. A commit whose answer was lost and which in fact landed is
    /// recognised by its application version (`txns[0]`), not redone.
    pub async fn commit(
        &mut self,
        change: Change,
        adds: Vec<NewFile>,
        removes: Vec<FileEntry>,
        txns: Vec<(String, i64)>,
    ) -> Result<i64, TableError> {
        let now = crate::time::now_us() / 1000;
        let data_change = matches!(change, Change::Stream { .. });
        let mut actions: Vec<Action> = Vec::with_capacity(adds.len() + removes.len());
        for f in &adds {
            actions.push(Action::Add(add_action(f, now, data_change)));
        }
        for f in &removes {
            actions.push(Action::Remove(Remove {
                path: percent_encode_path(&f.path),
                data_change,
                deletion_timestamp: Some(now),
                extended_file_metadata: Some(true),
                partition_values: Some(f.partition.clone().into_iter().collect()),
                size: Some(f.size as i64),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
            }));
        }
        let operation = match &change {
            Change::Stream { producer, n } => DeltaOperation::StreamingUpdate {
                output_mode: OutputMode::Append,
                query_id: producer.clone(),
                epoch_id: *n,
            },
            Change::Compact => DeltaOperation::Optimize {
                predicate: None,
                target_size: 0,
            },
        };
        let mut txns = txns;
        if data_change {
            if let Some(lost) = self.overwritten().await? {
                merge_lost(lost, &mut actions, &mut txns);
            }
        }
        self.commit_actions(operation, actions, txns, data_change)
            .await
    }

    /// Reads back the last stream commit's log entry and, if another writer's commit overwrote it,
    /// commits it again. A run calls this after its last commit (earlier ones are read back by the
    /// commit after them).
    pub async fn verify_last(&mut self) -> Result<(), TableError> {
        for _ in 0..CONFLICT_RETRIES {
            let Some(lost) = self.overwritten().await? else {
                return Ok(());
            };
            self.commit_actions(lost.operation, lost.actions, lost.txns, true)
                .await?;
        }
        match self.unverified.take() {
            None => Ok(()),
            Some(last) => Err(TableError::Overwritten {
                dataset: self.dataset.name(),
                version: last.version,
            }),
        }
    }

    /// The last stream commit, if its log entry (read back now) is another writer's: a store that
    /// checks `If-None-Match` and then writes, non-atomically, lets two writers both "win" a version,
    /// and the later write replaces the earlier. S3, MinIO and R2 decide atomically and never get here.
    async fn overwritten(&mut self) -> Result<Option<Unverified>, TableError> {
        let Some(last) = &self.unverified else {
            return Ok(None);
        };
        let Some((app, n)) = last.txns.first().cloned() else {
            self.unverified = None;
            return Ok(None);
        };
        let version = last.version;
        let entry = self
            .table
            .log_store()
            .read_commit_entry(version as u64)
            .await
            .map_err(self.err())?;
        // An entry that is gone was cleaned up with the log's history: long since read by others.
        if entry.is_none_or(|entry| records_txn(&entry, &app, n)) {
            self.unverified = None;
            return Ok(None);
        }
        let Some(last) = self.unverified.take() else {
            return Ok(None);
        };
        tracing::warn!(
            dataset = self.dataset.name(),
            version,
            app,
            "another writer's commit replaced this one's in the Delta log (the object store decided \
             a conditional write non-atomically): committing it again; use a store that decides \
             them atomically for outputs several writers share"
        );
        // The snapshot this handle kept includes the commit that is not there: read the log anew.
        let mut fresh = DeltaTable::new(self.table.log_store());
        fresh.load().await.map_err(self.err())?;
        self.table = fresh;
        Ok(Some(last))
    }

    /// Commits `actions` with the application versions `txns` (the first names the commit: see
    /// [`Self::commit`]); a stream commit is read back later.
    async fn commit_actions(
        &mut self,
        operation: DeltaOperation,
        actions: Vec<Action>,
        txns: Vec<(String, i64)>,
        stream: bool,
    ) -> Result<i64, TableError> {
        let now = crate::time::now_us() / 1000;
        let props = CommitProperties::default().with_application_transactions(
            txns.iter()
                .map(|(app, v)| Transaction::new_with_last_update(app, *v, Some(now)))
                .collect(),
        );
        let removes: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove(r) => Some(percent_decode(&r.path)),
                _ => None,
            })
            .collect();
        let mut attempt = 0;
        loop {
            let result = {
                let snapshot = self.table.snapshot().map_err(self.err())?;
                CommitBuilder::from(props.clone())
                    .with_actions(actions.clone())
                    .build(Some(snapshot), self.table.log_store(), operation.clone())
                    .await
            };
            let e = match result {
                Ok(done) => {
                    let version = done.version() as i64;
                    self.table.state = Some(done.snapshot());
                    self.landed(stream, version, operation, actions, txns);
                    return Ok(version);
                }
                Err(e) => e,
            };
            // Did it land after all (a lost answer, retried into a conflict with itself)?
            self.refresh().await?;
            if let Some((app, v)) = txns.first() {
                let found = self.app_version(app).await?;
                if found == Some(*v) {
                    // Found in the log just read: read back already (and its version is not known
                    // here, other writers may have committed after it).
                    tracing::debug!(app, v, "commit had landed; its answer was lost");
                    return Ok(self.version());
                }
                if is_conflict(&e) && found.is_some_and(|found| found >= *v) {
                    return Err(TableError::Fenced {
                        dataset: self.dataset.name(),
                        app_id: app.clone(),
                    });
                }
            }
            // delta-rs checks a commit as if it had read every file of its snapshot, so another
            // writer's window rewrite (files removed) fails a concurrent append. tcplake's commits read
            // nothing of other producers': against the newer version the same commit is still right,
            // as long as the files it removes are still there (nobody else removes a producer's files).
            if is_conflict(&e) && attempt < CONFLICT_RETRIES && self.holds_all(&removes)? {
                attempt += 1;
                tracing::debug!(
                    dataset = self.dataset.name(),
                    attempt,
                    error = %e,
                    "commit conflicted with another writer's; trying again on the new version"
                );
                continue;
            }
            return Err(TableError::Delta {
                dataset: self.dataset.name(),
                source: Box::new(e),
            });
        }
    }

    /// Remembers a stream commit that landed as `version`, to read it back (on object stores).
    fn landed(
        &mut self,
        stream: bool,
        version: i64,
        operation: DeltaOperation,
        actions: Vec<Action>,
        txns: Vec<(String, i64)>,
    ) {
        if stream && self.check_commits {
            self.unverified = Some(Unverified {
                version,
                operation,
                actions,
                txns,
            });
        }
    }

    /// Every file of `paths` is still part of the table.
    fn holds_all(&self, paths: &[String]) -> Result<bool, TableError> {
        if paths.is_empty() {
            return Ok(true);
        }
        let current: std::collections::HashSet<String> =
            self.files()?.into_iter().map(|f| f.path).collect();
        Ok(paths.iter().all(|p| current.contains(p)))
    }

    /// Reads every stream commit back (tests: the local store's conditional writes are atomic).
    #[cfg(test)]
    fn check_commits(&mut self) {
        self.check_commits = true;
    }
}

/// Does a Delta log entry record application version `n` of `app`?
fn records_txn(entry: &[u8], app: &str, n: i64) -> bool {
    entry.split(|b| *b == b'\n').any(|line| {
        serde_json::from_slice::<serde_json::Value>(line).is_ok_and(|v| {
            v["txn"]["appId"].as_str() == Some(app) && v["txn"]["version"].as_i64() == Some(n)
        })
    })
}

/// Folds a commit another writer overwrote into the next one: its files and removals, and the progress
/// it recorded where the next one records none. A file it added that the next one removes (a window
/// rewritten again) is neither added nor removed.
fn merge_lost(lost: Unverified, actions: &mut Vec<Action>, txns: &mut Vec<(String, i64)>) {
    let added: std::collections::HashSet<&str> = lost
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Add(add) => Some(add.path.as_str()),
            _ => None,
        })
        .collect();
    let cancelled: std::collections::HashSet<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(r) if added.contains(r.path.as_str()) => Some(r.path.clone()),
            _ => None,
        })
        .collect();
    let mut merged: Vec<Action> = lost
        .actions
        .iter()
        .filter(|a| !matches!(a, Action::Add(add) if cancelled.contains(&add.path)))
        .cloned()
        .collect();
    merged.extend(
        actions
            .drain(..)
            .filter(|a| !matches!(a, Action::Remove(r) if cancelled.contains(&r.path))),
    );
    *actions = merged;
    for (app, v) in lost.txns {
        if !txns.iter().any(|(a, _)| *a == app) {
            txns.push((app, v));
        }
    }
}

/// How often a commit that conflicted with other writers' is tried again on the newer version
/// (delta-rs already retries each attempt against the commits that raced it).
const CONFLICT_RETRIES: u32 = 10;

/// A commit lost to another writer's (as opposed to a failing store).
fn is_conflict(e: &DeltaTableError) -> bool {
    use deltalake_core::kernel::transaction::TransactionError;
    matches!(
        e,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_)
                | TransactionError::MaxCommitAttempts(_)
                | TransactionError::VersionAlreadyExists(_),
        } | DeltaTableError::VersionAlreadyExists(_)
    )
}

fn add_action(f: &NewFile, now_ms: i64, data_change: bool) -> Add {
    let mut min = serde_json::Map::new();
    let mut max = serde_json::Map::new();
    let mut nulls = serde_json::Map::new();
    for (col, lo, hi) in &f.int_stats {
        min.insert(col.to_string(), (*lo).into());
        max.insert(col.to_string(), (*hi).into());
        nulls.insert(col.to_string(), 0.into());
    }
    let stats = serde_json::json!({
        "numRecords": f.rows,
        "minValues": min,
        "maxValues": max,
        "nullCount": nulls,
    });
    Add {
        path: percent_encode_path(&f.path),
        partition_values: HashMap::from([
            ("date".to_string(), Some(f.date.clone())),
            ("hour".to_string(), Some(f.hour.to_string())),
        ]),
        size: f.size as i64,
        modification_time: now_ms,
        data_change,
        stats: Some(stats.to_string()),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}

/// Delta paths are URIs: `=` and `/` stay, other reserved characters are escaped. tcplake's names use
/// only `[A-Za-z0-9._=/-]`, so this is the identity for them; it guards the rest.
fn percent_encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b'=') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalDir;

    fn file(name: &str) -> NewFile {
        NewFile {
            path: format!("date=2026-01-01/hour=0/{name}.parquet"),
            size: 100,
            rows: 1,
            date: "2026-01-01".into(),
            hour: 0,
            int_stats: Vec::new(),
        }
    }

    fn stream(n: i64) -> Change {
        Change::Stream {
            producer: "a".into(),
            n,
        }
    }

    const APP: &str = "tcplake/events/a";

    /// What a store deciding `If-None-Match` non-atomically lets happen: another writer's commit
    /// replaces the log entry of `version` after this writer's was written.
    fn overwrite(dir: &std::path::Path, version: i64, other: &str) {
        let entry = format!(
            "{{\"add\":{{\"path\":\"date=2026-01-01/hour=0/{other}.parquet\",\"partitionValues\":\
             {{\"date\":\"2026-01-01\",\"hour\":\"0\"}},\"size\":100,\"modificationTime\":1,\
             \"dataChange\":true}}}}\n{{\"txn\":{{\"appId\":\"tcplake/events/b\",\"version\":1}}}}\n"
        );
        let path = dir.join(format!("events/_delta_log/{version:020}.json"));
        std::fs::write(path, entry).unwrap();
    }

    fn names(t: &Table) -> Vec<String> {
        let mut v: Vec<String> = t
            .files()
            .unwrap()
            .into_iter()
            .map(|f| f.name().trim_end_matches(".parquet").to_string())
            .collect();
        v.sort();
        v
    }

    /// A table an older tcplake made (schema version 2: no who-is-talking columns) gains the new
    /// columns when a writer opens it, keeping its rows, files and properties; the same table opened
    /// again (or by a second writer) is left as it is.
    #[tokio::test]
    async fn a_table_of_an_older_schema_gains_the_new_columns_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let (log_store, _) = log_store(&store, Dataset::Flows).unwrap();
        // Schema version 2: none of the who-is-talking columns, which come last before `date`, `hour`.
        let all = delta_columns(Dataset::Flows);
        let first_new = all.iter().position(|f| f.name() == "role").unwrap();
        let new: Vec<String> = all[first_new..all.len() - 2]
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(new.len(), 10, "{new:?}");
        let old_columns: Vec<StructField> = all
            .iter()
            .filter(|f| !new.contains(f.name()))
            .cloned()
            .collect();
        deltalake_core::operations::create::CreateBuilder::new()
            .with_log_store(Arc::clone(&log_store))
            .with_table_name("flows")
            .with_columns(old_columns)
            .with_partition_columns(PARTITION_COLUMNS)
            .with_configuration([("tcplake.window_secs".to_string(), Some("10".to_string()))])
            .with_raise_if_key_not_exists(false)
            .await
            .unwrap();
        let props = BTreeMap::from([("tcplake.window_secs".to_string(), "10".to_string())]);
        let mut t = Table::open_or_create(&store, Dataset::Flows, &props)
            .await
            .unwrap();
        t.commit(stream(1), vec![file("a1")], vec![], vec![(APP.into(), 1)])
            .await
            .unwrap();
        let schema = t.table.snapshot().unwrap().schema();
        for name in &new {
            let f = schema.field(name).unwrap_or_else(|| panic!("{name} added"));
            assert!(f.is_nullable());
        }
        // In the order a new table has: `SELECT *` reads both alike.
        let order: Vec<&String> = schema.fields().map(|f| f.name()).collect();
        let want: Vec<&String> = all.iter().map(|f| f.name()).collect();
        assert_eq!(order, want);
        let version = t.version();
        let again = Table::open_or_create(&store, Dataset::Flows, &props)
            .await
            .unwrap();
        assert_eq!(again.version(), version, "nothing more to add");
        assert_eq!(names(&again), ["a1"]);
        assert_eq!(
            again.properties().unwrap().get("tcplake.window_secs"),
            Some(&"10".to_string())
        );
        assert!(missing_columns(&again.table, Dataset::Flows)
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_commit_another_writer_overwrote_is_committed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let mut t = Table::open_or_create(&store, Dataset::Events, &BTreeMap::new())
            .await
            .unwrap();
        t.check_commits();
        let v1 = t
            .commit(stream(1), vec![file("a1")], vec![], vec![(APP.into(), 1)])
            .await
            .unwrap();
        overwrite(dir.path(), v1, "b1");
        // The next commit reads the first back, finds another writer's entry, and carries it along.
        t.commit(stream(2), vec![file("a2")], vec![], vec![(APP.into(), 2)])
            .await
            .unwrap();
        let reread = Table::open(&store, Dataset::Events).await.unwrap().unwrap();
        assert_eq!(names(&reread), ["a1", "a2", "b1"]);
        assert_eq!(reread.app_version(APP).await.unwrap(), Some(2));

        // The last commit of a run is read back when the run ends. A file the lost commit added and
        // the next one replaces (a window rewritten again) ends up neither added nor removed.
        let v3 = t
            .commit(stream(3), vec![file("a3")], vec![], vec![(APP.into(), 3)])
            .await
            .unwrap();
        overwrite(dir.path(), v3, "b2");
        let a3 = FileEntry {
            path: file("a3").path,
            size: 100,
            rows: Some(1),
            partition: BTreeMap::from([
                ("date".to_string(), Some("2026-01-01".to_string())),
                ("hour".to_string(), Some("0".to_string())),
            ]),
        };
        t.commit(stream(4), vec![file("a4")], vec![a3], vec![(APP.into(), 4)])
            .await
            .unwrap();
        let v5 = t
            .commit(stream(5), vec![file("a5")], vec![], vec![(APP.into(), 5)])
            .await
            .unwrap();
        overwrite(dir.path(), v5, "b3");
        t.verify_last().await.unwrap();
        t.verify_last().await.unwrap();
        let reread = Table::open(&store, Dataset::Events).await.unwrap().unwrap();
        assert_eq!(names(&reread), ["a1", "a2", "a4", "a5", "b1", "b2", "b3"]);
        assert_eq!(reread.app_version(APP).await.unwrap(), Some(5));
    }
}
