//! One producer's commits to one table (a node's event log, an aggregator's flows): each sealed file
//! is one Delta commit that adds it and records the producer's progress as application transactions —
//! `tcplake/<dataset>/<producer>` at its commit number (the kafka-delta-ingest pattern), and the stream
//! position of its last row field by field (`…/seq`; a flow row's emission and the input it had
//! consumed, `…/emission` and `…/through_seq`) and, for flows, the replay point. A
//! restart reads them back from the table itself: there is no side record to disagree with it.
//!
//! A file is written under a name no committed file has (it carries the commit number), then committed;
//! a crash in between leaves an unreferenced file that the next attempt replaces and `tcplake vacuum`
//! removes. A second writer with the same producer name is fenced by the table (its commit loses the
//! application-transaction race).
//!
//! A flows producer also keeps its [`Projection`]: windows emitted again replace their rows, in the
//! same commit that adds the new ones. Its replay point (where the aggregator rebuilds from) is
//! recorded with each commit, so a restarted monolith rebuilds exactly what the table needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use parquet::arrow::ArrowWriter;

use super::format::writer_properties;
use super::names;
use super::projection::{Admission, Projection, Rewritten, WindowKey};
use super::read::{self, ReadError};
use super::table::{Change, FileEntry, NewFile, Table, TableError};
use super::{Dataset, Position};
use crate::event::schema::{batch_to_flows, flows_to_batch};
use crate::event::{FlowRecord, ReplayPoint};
use crate::storage::{Store, StoreError};
use crate::time::Partition;

/// Why a commit or recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("`{key}` is unreadable")]
    Corrupt {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "`{key}` holds older rows of a window being replaced, but is no longer in the table (is \
         another process rewriting this producer's files?)"
    )]
    Vanished { key: String },
    #[error("writing `{key}`")]
    Write {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(
        "{location} holds a projection made with {key} = {table} (set when it was created); this run \
         asks for {run}: write to a new --out, or run with the same setting"
    )]
    Projection {
        location: String,
        key: String,
        table: String,
        run: String,
    },
    #[error(
        "{location} holds `{producer}`'s events from another source than this run's ({run}): its \
         seed, start time, capture filters, recorded state changes or replayed output differ; write to \
         a new --out, or run with the settings that recorded it"
    )]
    Stream {
        location: String,
        producer: String,
        run: String,
    },
    #[error(
        "{0} was written by an older tcplake (schema version 1: `_tcplake/commits`), before the Delta \
         tables: replay it into a new output (tcplake replay --from OLD --to NEW)"
    )]
    OldLayout(String),
    #[error(
        "the {dataset} table records progress of `{producer}` it cannot read ({reason}): was it written \
         by a newer tcplake?"
    )]
    Progress {
        dataset: &'static str,
        producer: String,
        reason: String,
    },
}

/// A sealed Parquet file waiting in staging, and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedFile {
    pub staged: PathBuf,
    pub partition: Partition,
    pub rows: u64,
    pub bytes: u64,
    /// Stream positions of the first and last rows.
    pub first: Position,
    pub last: Position,
    /// Flows: the replay point of the last emission the file holds.
    pub replay: Option<ReplayPoint>,
    /// Smallest and largest partition time of its rows (flows: window starts).
    pub ts_range: (i64, i64),
}

/// Properties a table is created with that a resumed run must agree with: what the projection is made
/// of (window, lateness, horizon) and where the events came from (the source's identity).
pub type Properties = BTreeMap<String, String>;

/// The commits of one producer to one table.
#[derive(Debug)]
pub struct CommitLog {
    store: Store,
    table: Table,
    dataset: Dataset,
    producer: String,
    next_n: i64,
    last: Option<Position>,
    /// Flows: the windows this producer's files hold that can still change.
    projection: Option<Projection>,
    /// The identity of the event stream this producer records (hashed), kept with every commit.
    source: Option<i64>,
}

/// The property naming the event stream a run records (`synthetic seed=1 …`, `ebpf port=443 …`).
pub const SOURCE_PROPERTY: &str = "tcplake.source";

/// A stable 63-bit hash of a source's identity (FNV-1a), as Delta keeps versions: integers.
pub(crate) fn source_hash(s: &str) -> i64 {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h >> 1) as i64
}

/// The table property that holds the late horizon (seconds): how far back windows still change.
pub const HORIZON_PROPERTY: &str = "tcplake.late_horizon_secs";

/// The properties a `flows/` table is created with and checked against: what its projection is made
/// of. The monolith takes them from its settings, a sink from the aggregators' batches.
pub fn flows_properties(w: &crate::event::flow::WindowConfig) -> Properties {
    let [window, lateness, horizon] = w.secs().map(|s| s.to_string());
    Properties::from([
        ("tcplake.window_secs".to_string(), window),
        ("tcplake.allowed_lateness_secs".to_string(), lateness),
        (HORIZON_PROPERTY.to_string(), horizon),
    ])
}

/// Application id of a producer's commit number.
pub fn app_id(dataset: Dataset, producer: &str) -> String {
    format!("tcplake/{}/{producer}", dataset.name())
}

/// The position of a row as application versions (all integers, as Delta keeps them).
fn position_fields(p: Position) -> Vec<(&'static str, i64)> {
    match p {
        Position::Event { seq } => vec![("seq", seq as i64)],
        Position::Flow {
            emission,
            through_seq,
        } => vec![
            ("emission", emission as i64),
            ("through_seq", through_seq as i64),
        ],
    }
}

impl CommitLog {
    /// The producer's progress in the dataset's table (which is created if the output has none, with
    /// `props`; if it exists, its properties must agree with them).
    pub async fn recover(
        store: Store,
        dataset: Dataset,
        producer: &str,
        props: &Properties,
    ) -> Result<Self, CommitError> {
        if Table::open(&store, dataset).await?.is_none()
            && super::legacy::present(&store, dataset).await?
        {
            return Err(CommitError::OldLayout(store.describe()));
        }
        // The event stream's identity belongs to the producer (one table holds many nodes' logs);
        // the projection's settings to the table.
        let mut props = props.clone();
        let source = props.remove(SOURCE_PROPERTY);
        let props = &props;
        let table = Table::open_or_create(&store, dataset, props).await?;
        let held = table.properties()?;
        for (k, v) in props {
            if let Some(t) = held.get(k) {
                if t != v {
                    return Err(CommitError::Projection {
                        location: table.location().to_string(),
                        key: k.clone(),
                        table: t.clone(),
                        run: v.clone(),
                    });
                }
            }
        }
        let app = app_id(dataset, producer);
        let n = table.app_version(&app).await?;
        if let (Some(source), Some(_)) = (&source, n) {
            let held = table.app_version(&format!("{app}/source")).await?;
            if held.is_some_and(|h| h != source_hash(source)) {
                return Err(CommitError::Stream {
                    location: table.location().to_string(),
                    producer: producer.to_string(),
                    run: source.clone(),
                });
            }
        }
        let last = match n {
            None => None,
            Some(_) => Some(Self::read_position(&table, dataset, producer).await?),
        };
        let projection = match dataset {
            Dataset::Flows => {
                let horizon_us = held
                    .get(HORIZON_PROPERTY)
                    .or(props.get(HORIZON_PROPERTY))
                    .and_then(|v| v.parse::<i64>().ok())
                    .map_or(3_600_000_000, |s| s.saturating_mul(1_000_000));
                Some(load_projection(&store, &table, producer, horizon_us).await?)
            }
            Dataset::Events => None,
        };
        Ok(CommitLog {
            store,
            table,
            dataset,
            producer: producer.to_string(),
            next_n: n.unwrap_or(0) + 1,
            last,
            projection,
            source: source.map(|s| source_hash(&s)),
        })
    }

    /// The replay point recorded with the producer's last commit (flows), for `nodes`.
    pub async fn replay_point(&self, nodes: &[&str]) -> Result<Option<ReplayPoint>, CommitError> {
        if self.last.is_none() {
            return Ok(None);
        }
        let app = app_id(self.dataset, &self.producer);
        let app = app.as_str();
        let get = |field: String| async move {
            self.table
                .app_version(&format!("{app}/{field}"))
                .await
                .map_err(CommitError::from)
        };
        let (Some(from), Some(through)) = (
            get("replay_from_seq".into()).await?,
            get("replay_through_seq".into()).await?,
        ) else {
            return Ok(None);
        };
        let mut max_ts = Vec::new();
        for node in nodes {
            if let Some(ts) = get(format!("max_ts/{node}")).await? {
                max_ts.push((Arc::<str>::from(*node), ts));
            }
        }
        Ok(Some(ReplayPoint {
            from_seq: from as u64,
            through_seq: through as u64,
            max_ts,
            events_through: Vec::new(),
        }))
    }

    async fn read_position(
        table: &Table,
        dataset: Dataset,
        producer: &str,
    ) -> Result<Position, CommitError> {
        let app = app_id(dataset, producer);
        let get = |field: &'static str| {
            let app = format!("{app}/{field}");
            async move {
                table
                    .app_version(&app)
                    .await?
                    .ok_or_else(|| CommitError::Progress {
                        dataset: dataset.name(),
                        producer: producer.to_string(),
                        reason: format!("`{app}` is missing"),
                    })
            }
        };
        Ok(match dataset {
            Dataset::Events => Position::Event {
                seq: get("seq").await? as u64,
            },
            Dataset::Flows => Position::Flow {
                emission: get("emission").await? as u64,
                through_seq: get("through_seq").await? as u64,
            },
        })
    }

    /// The position of the last row committed, if any.
    pub fn last(&self) -> Option<Position> {
        self.last
    }

    /// The table this log commits to.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Do rows or rewrites wait for the next commit?
    pub fn has_open(&self) -> bool {
        self.projection.as_ref().is_some_and(Projection::has_open)
    }

    /// Decides what of a flow emission to write (see [`Projection`]). Events pass whole.
    pub fn admit(&mut self, records: Vec<FlowRecord>) -> Admission {
        match &mut self.projection {
            Some(p) => p.admit(records),
            None => Admission {
                records,
                unchanged: 0,
                replaced: 0,
            },
        }
    }

    /// Moves sealed files (one per partition, together every row since the last commit) into the table
    /// and commits them in one commit, with this producer's new progress `last` (and, for flows, the
    /// rewrites of files whose windows they replace). Returns the files' keys in the store.
    pub async fn commit(
        &mut self,
        files: &[StagedFile],
        last: Position,
    ) -> Result<Vec<String>, CommitError> {
        let n = self.next_n;
        let bound = |p: Position| match p {
            Position::Event { seq } => seq as i64,
            Position::Flow { .. } => 0,
        };
        let mut adds = Vec::with_capacity(files.len());
        let mut keys = Vec::with_capacity(files.len());
        let mut placed = Vec::with_capacity(files.len());
        for f in files {
            let (first, last) = match self.dataset {
                Dataset::Flows => f.ts_range,
                Dataset::Events => (bound(f.first), bound(f.last)),
            };
            let name = names::format(&self.producer, first, last, &format!("n{n}"));
            let rel = format!("{}/{name}", f.partition.path());
            let key = format!("{}/{rel}", self.dataset.name());
            self.store.upload(&f.staged, &key).await?;
            let int_stats = match (self.dataset, f.first, f.last) {
                (Dataset::Events, Position::Event { seq: a }, Position::Event { seq: b }) => {
                    vec![("seq", a as i64, b as i64)]
                }
                _ => Vec::new(),
            };
            adds.push(NewFile {
                path: rel.clone(),
                size: f.bytes,
                rows: f.rows,
                date: f.partition.date(),
                hour: f.partition.hour,
                int_stats,
            });
            placed.push((rel, f.partition.clone()));
            keys.push(key);
        }
        let (removes, rewritten) = self.rewrite_pending(n, &mut adds).await?;
        let app = app_id(self.dataset, &self.producer);
        let mut txns = vec![(app.clone(), n)];
        if let Some(h) = self.source {
            txns.push((format!("{app}/source"), h));
        }
        txns.extend(
            position_fields(last)
                .into_iter()
                .map(|(field, v)| (format!("{app}/{field}"), v)),
        );
        // The replay point of the last emission the files hold (all carry the same, or none).
        if let Some(r) = files.iter().rev().find_map(|f| f.replay.as_ref()) {
            txns.push((format!("{app}/replay_from_seq"), r.from_seq as i64));
            txns.push((format!("{app}/replay_through_seq"), r.through_seq as i64));
            for (node, ts) in &r.max_ts {
                txns.push((format!("{app}/max_ts/{node}"), *ts));
            }
        }
        self.table
            .commit(
                Change::Stream {
                    producer: self.producer.clone(),
                    n,
                },
                adds,
                removes,
                txns,
            )
            .await?;
        if let Some(p) = &mut self.projection {
            p.committed_files(&placed, &rewritten);
        }
        self.next_n += 1;
        self.last = Some(last);
        Ok(keys)
    }

    /// After the last commit of a run: reads it back and, if another writer's commit replaced it in the
    /// log (a store deciding conditional writes non-atomically), commits it again.
    pub async fn finish(&mut self) -> Result<(), CommitError> {
        Ok(self.table.verify_last().await?)
    }

    /// Rewrites the committed files holding older versions of windows the new file replaces: each
    /// without those windows (or removed, if nothing else is left). Adds the rewritten files to `adds`;
    /// returns the files to remove and, per rewritten file, its replacement and the windows it keeps.
    async fn rewrite_pending(
        &mut self,
        n: i64,
        adds: &mut Vec<NewFile>,
    ) -> Result<Rewrites, CommitError> {
        let Some(p) = &self.projection else {
            return Ok((Vec::new(), Vec::new()));
        };
        let pending: Vec<(String, BTreeSet<WindowKey>)> = p
            .pending()
            .iter()
            .map(|(f, w)| (f.clone(), w.clone()))
            .collect();
        if pending.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let files: BTreeMap<String, FileEntry> = self
            .table
            .files()?
            .into_iter()
            .map(|f| (f.path.clone(), f))
            .collect();
        let mut removes = Vec::new();
        let mut rewritten = Vec::new();
        for (i, (path, drop)) in pending.into_iter().enumerate() {
            let Some(entry) = files.get(&path) else {
                // Compaction leaves mutable windows alone, so this is another writer's doing: stop
                // rather than leave the old rows beside the new.
                return Err(CommitError::Vanished {
                    key: format!("{}/{path}", self.dataset.name()),
                });
            };
            let key = format!("{}/{path}", self.dataset.name());
            let mut kept: Vec<FlowRecord> = Vec::new();
            for rb in read::open(&self.store, &key, 65_536).await? {
                let rb = rb.map_err(|e| read::batch_error(&key, e))?;
                let rows = batch_to_flows(&rb).map_err(|e| CommitError::Corrupt {
                    key: key.clone(),
                    source: e.into(),
                })?;
                kept.extend(
                    rows.into_iter()
                        .filter(|r| !drop.contains(&(r.window_start_us, Arc::clone(&r.key.node)))),
                );
            }
            let counts = window_counts(&kept);
            let replacement = if kept.is_empty() {
                None
            } else {
                let (lo, hi) = (
                    kept.iter().map(|r| r.window_start_us).min().unwrap_or(0),
                    kept.iter().map(|r| r.window_start_us).max().unwrap_or(0),
                );
                let name = names::format(&self.producer, lo, hi, &format!("n{n}r{i}"));
                let rel = format!("{}/{name}", entry.partition_dir());
                let size = self.write_flows(&rel, &kept).await?;
                let value = |k: &str| {
                    entry
                        .partition
                        .get(k)
                        .cloned()
                        .flatten()
                        .unwrap_or_default()
                };
                adds.push(NewFile {
                    path: rel.clone(),
                    size,
                    rows: kept.len() as u64,
                    date: value("date"),
                    hour: value("hour").parse().unwrap_or(0),
                    int_stats: Vec::new(),
                });
                Some(rel)
            };
            removes.push(entry.clone());
            rewritten.push((path, replacement, counts));
        }
        Ok((removes, rewritten))
    }

    /// Writes flow rows as a file `rel` of the table (staged, then moved into place). Returns its size.
    async fn write_flows(&self, rel: &str, rows: &[FlowRecord]) -> Result<u64, CommitError> {
        let key = format!("{}/{rel}", self.dataset.name());
        let staged = self.store.staging_path(&key)?;
        let write = |e: Box<dyn std::error::Error + Send + Sync>| CommitError::Write {
            key: key.clone(),
            source: e,
        };
        let size = crate::blocking::run(|| {
            let batch = flows_to_batch(rows).map_err(|e| write(e.into()))?;
            let file = File::create(&staged).map_err(|e| write(e.into()))?;
            let props = writer_properties(self.dataset.name(), 131_072);
            let mut w = ArrowWriter::try_new(file, self.dataset.schema(), Some(props))
                .map_err(|e| write(e.into()))?;
            w.write(&batch).map_err(|e| write(e.into()))?;
            let file = w.into_inner().map_err(|e| write(e.into()))?;
            file.sync_all().map_err(|e| write(e.into()))?;
            Ok::<_, CommitError>(file.metadata().map_err(|e| write(e.into()))?.len())
        })?;
        self.store.upload(&staged, &key).await?;
        Ok(size)
    }
}

/// Files to remove, and per rewritten file: its replacement (if rows are left) and the windows it keeps.
type Rewrites = (Vec<FileEntry>, Vec<Rewritten>);

fn window_counts(rows: &[FlowRecord]) -> Vec<(WindowKey, u64)> {
    let mut m: BTreeMap<WindowKey, u64> = BTreeMap::new();
    for r in rows {
        *m.entry((r.window_start_us, Arc::clone(&r.key.node)))
            .or_default() += r.events;
    }
    m.into_iter().collect()
}

/// The producer's files that can still change (within twice the horizon of its newest window), read
/// into a projection index.
async fn load_projection(
    store: &Store,
    table: &Table,
    producer: &str,
    horizon_us: i64,
) -> Result<Projection, CommitError> {
    let mut p = Projection::new(horizon_us);
    let mine: Vec<(FileEntry, names::FileName)> = table
        .files()?
        .into_iter()
        .filter_map(|f| {
            let n = names::parse(f.name())?;
            (n.producer == producer).then_some((f, n))
        })
        .collect();
    let Some(newest) = mine.iter().map(|(_, n)| n.last).max() else {
        return Ok(p);
    };
    let oldest = newest.saturating_sub(horizon_us.saturating_mul(2));
    for (f, n) in mine.into_iter().filter(|(_, n)| n.last >= oldest) {
        let key = format!("{}/{}", Dataset::Flows.name(), f.path);
        let mut rows = Vec::new();
        for rb in read::open(store, &key, 65_536).await? {
            let rb = rb.map_err(|e| read::batch_error(&key, e))?;
            rows.extend(batch_to_flows(&rb).map_err(|e| CommitError::Corrupt {
                key: key.clone(),
                source: e.into(),
            })?);
        }
        let _ = n;
        p.load_file(&f.path, &rows);
    }
    Ok(p)
}
