//! `tcplake compact`: merges the small committed files of closed partitions into large ones.
//!
//! The unit is a run of consecutive commit records of one producer in one partition (files hold
//! contiguous stretches of the stream, so merging neighbours keeps every reader's order). A partition
//! is **closed** for a producer once that producer has committed a file of a later partition; the
//! producer's newest record is never touched, so a running or restarting sink is unaffected.
//!
//! Each merge is made safe to interrupt by a plan written before anything else:
//! 1. the plan `_tcplake/compactions/<dataset>/<producer>/<first n>.json` (records, sources, target);
//! 2. the merged file, written aside and made visible atomically (rows in stream order, current schema);
//! 3. each source's commit record gains `moved_to` (readers follow it: [`CommitRecord::data_key`]);
//! 4. the source files are deleted; 5. the plan is deleted.
//!
//! A rerun first finishes every plan it finds (steps 2-5 are idempotent; step 2 is skipped once the
//! merged file exists, and until step 4 every source still exists), then plans new merges. Rows are
//! never lost or doubled in the commit log's view; a reader that globs the directory instead can see
//! the merged file and its sources side by side for the moment between steps 2 and 4.

use std::fs::File;

use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};

use crate::event::schema::{batch_to_events, batch_to_flows, events_to_batch, flows_to_batch};
use crate::sink::commit::META_PREFIX;
use crate::sink::read::{self, ReadError};
use crate::sink::rolling::writer_properties;
use crate::sink::{CommitError, CommitLog, CommitRecord, Dataset, Store, StoreError};

/// What to compact.
#[derive(Clone, Debug)]
pub struct CompactOptions {
    pub dataset: Dataset,
    /// Only this partition (`date=YYYY-MM-DD` or `date=YYYY-MM-DD/hour=HH`); every closed one if `None`.
    pub partition: Option<String>,
    /// Merged files grow up to about this many bytes (the sum of their sources).
    pub target_bytes: u64,
    pub row_group_rows: usize,
}

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub dataset: &'static str,
    /// Plans of an interrupted earlier run, finished first.
    pub resumed: u64,
    /// Merged files written.
    pub merged_files: u64,
    /// Files they replace (deleted).
    pub source_files: u64,
    pub rows: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl std::fmt::Display for CompactReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "compacted {}: {} files ({} rows, {} bytes) into {} files ({} bytes); {} interrupted \
             merges finished",
            self.dataset,
            self.source_files,
            self.rows,
            self.bytes_before,
            self.merged_files,
            self.bytes_after,
            self.resumed
        )
    }
}

/// Why a compaction stopped. Nothing committed is lost: rerunning finishes the interrupted merge.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("`{key}`: {reason}")]
    Convert { key: String, reason: String },
    #[error("writing the merged file `{key}`: {reason}")]
    Write { key: String, reason: String },
    #[error("compaction plan `{key}` is unreadable: {reason}")]
    Plan { key: String, reason: String },
    #[error(
        "invalid partition `{0}`: expected date=YYYY-MM-DD or date=YYYY-MM-DD/hour=HH, as in the \
         dataset's directory names"
    )]
    Partition(String),
}

/// One merge, written down before it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    producer: String,
    /// Commit records whose rows move (consecutive `n`).
    records: Vec<u64>,
    /// Their data files, in stream order (several records may already share one).
    sources: Vec<String>,
    into: String,
}

/// Checks a `--partition` value against the directory layout.
pub fn validate_partition(p: &str) -> Result<(), CompactError> {
    let bad = || CompactError::Partition(p.to_string());
    let (date, hour) = match p.split_once('/') {
        Some((d, h)) => (d, Some(h)),
        None => (p, None),
    };
    let d = date.strip_prefix("date=").ok_or_else(bad)?;
    let b = d.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' || !digits(0..4) || !digits(5..7) {
        return Err(bad());
    }
    // A real calendar date (no month 13, no February 30).
    if !digits(8..10) || humantime::parse_rfc3339(&format!("{d}T00:00:00Z")).is_err() {
        return Err(bad());
    }
    if let Some(h) = hour {
        let h = h.strip_prefix("hour=").ok_or_else(bad)?;
        if h.len() != 2 || !h.bytes().all(|c| c.is_ascii_digit()) || h > "23" {
            return Err(bad());
        }
    }
    Ok(())
}

fn plans_dir(dataset: Dataset) -> String {
    format!("{META_PREFIX}/compactions/{}/", dataset.name())
}

/// `events/date=.../hour=..` of a data key.
fn partition_dir(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(d, _)| d)
}

/// Finishes interrupted merges, then merges the small files of closed partitions.
pub async fn run(store: &Store, opts: &CompactOptions) -> Result<CompactReport, CompactError> {
    if let Some(p) = &opts.partition {
        validate_partition(p)?;
    }
    let mut report = CompactReport {
        dataset: opts.dataset.name(),
        ..CompactReport::default()
    };
    let plans = plans_dir(opts.dataset);
    for producer in store.list_dirs(&plans).await? {
        for key in store.list(&format!("{plans}{producer}/")).await? {
            let body = store.get(&key).await?.ok_or_else(|| CompactError::Plan {
                key: key.clone(),
                reason: "listed but gone".into(),
            })?;
            let plan: Plan = serde_json::from_slice(&body).map_err(|e| CompactError::Plan {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            tracing::info!(plan = %key, "finishing an interrupted merge");
            execute(store, opts, &key, &plan, &mut report).await?;
            report.resumed += 1;
        }
    }
    let commits = format!("{META_PREFIX}/commits/{}/", opts.dataset.name());
    for producer in store.list_dirs(&commits).await? {
        let records = CommitLog::all(store, opts.dataset, &producer).await?;
        for plan in plan_merges(&producer, &records, opts) {
            let key = format!("{plans}{producer}/{:012}.json", plan.records[0]);
            let body = serde_json::to_vec_pretty(&plan).expect("a plan always serializes");
            store.replace(&key, &body).await?;
            execute(store, opts, &key, &plan, &mut report).await?;
        }
    }
    Ok(report)
}

/// The merges worth doing in one producer's records (oldest first).
fn plan_merges(producer: &str, records: &[CommitRecord], opts: &CompactOptions) -> Vec<Plan> {
    let Some(newest) = records.last() else {
        return Vec::new();
    };
    let open = partition_dir(newest.data_key());
    let wanted = |dir: &str| {
        dir != open
            && opts.partition.as_ref().is_none_or(|p| {
                let want = format!("{}/{p}", opts.dataset.name());
                dir == want || dir.starts_with(&format!("{want}/"))
            })
    };
    // Files (records sharing a data key count once), in stream order, without the newest record.
    let mut files: Vec<(&str, Vec<u64>, u64)> = Vec::new();
    for r in &records[..records.len() - 1] {
        match files.last_mut() {
            Some((k, ns, bytes)) if *k == r.data_key() => {
                ns.push(r.n);
                *bytes += r.bytes;
            }
            _ => files.push((r.data_key(), vec![r.n], r.bytes)),
        }
    }
    let mut plans = Vec::new();
    let mut run: Vec<&(&str, Vec<u64>, u64)> = Vec::new();
    let mut run_bytes = 0u64;
    let flush = |run: &mut Vec<&(&str, Vec<u64>, u64)>, plans: &mut Vec<Plan>| {
        if run.len() >= 2 {
            let records: Vec<u64> = run.iter().flat_map(|f| f.1.iter().copied()).collect();
            let (first, last) = (records[0], records[records.len() - 1]);
            plans.push(Plan {
                producer: producer.to_string(),
                into: format!(
                    "{}/{producer}-compacted-{first:012}-{last:012}.parquet",
                    partition_dir(run[0].0)
                ),
                sources: run.iter().map(|f| f.0.to_string()).collect(),
                records,
            });
        }
        run.clear();
    };
    for f in &files {
        let dir = partition_dir(f.0);
        // A file that cannot join ends the run: merged records must stay consecutive.
        let eligible = wanted(dir) && f.2 < opts.target_bytes;
        let joins = eligible
            && run.last().is_some_and(|p| partition_dir(p.0) == dir)
            && run_bytes + f.2 <= opts.target_bytes;
        if !joins {
            flush(&mut run, &mut plans);
            run_bytes = 0;
        }
        if eligible {
            run.push(f);
            run_bytes += f.2;
        }
    }
    flush(&mut run, &mut plans);
    plans
}

/// Steps 2-5 of a merge (idempotent).
async fn execute(
    store: &Store,
    opts: &CompactOptions,
    plan_key: &str,
    plan: &Plan,
    report: &mut CompactReport,
) -> Result<(), CompactError> {
    let dir = CommitLog::dir(opts.dataset, &plan.producer);
    let mut rows = 0;
    let mut bytes_before = 0;
    for n in &plan.records {
        let r = CommitLog::read_record(store, &CommitLog::key_of(&dir, *n)).await?;
        rows += r.rows;
        bytes_before += r.bytes;
    }
    if store.size(&plan.into).await?.is_none() {
        let staged = store.staging_path(&plan.into)?;
        let merged = merge(store, opts, &plan.sources, &staged).await;
        if let Err(e) = merged {
            store.discard(&staged);
            return Err(e);
        }
        store.commit(&staged, &plan.into).await?;
    }
    for n in &plan.records {
        let key = CommitLog::key_of(&dir, *n);
        let mut r = CommitLog::read_record(store, &key).await?;
        if r.moved_to.as_deref() != Some(plan.into.as_str()) {
            r.moved_to = Some(plan.into.clone());
            let body = serde_json::to_vec_pretty(&r).expect("a record always serializes");
            store.replace(&key, &body).await?;
        }
    }
    for source in &plan.sources {
        store.delete(source).await?;
    }
    store.delete(plan_key).await?;
    report.merged_files += 1;
    report.source_files += plan.sources.len() as u64;
    report.rows += rows;
    report.bytes_before += bytes_before;
    report.bytes_after += store.size(&plan.into).await?.unwrap_or(0);
    tracing::info!(into = %plan.into, sources = plan.sources.len(), rows, "merged");
    Ok(())
}

/// Writes the rows of `sources`, in order, to `staged` in the current schema. Rows pass through the
/// same decoding as a replay, so a file of an older schema version comes out upgraded.
async fn merge(
    store: &Store,
    opts: &CompactOptions,
    sources: &[String],
    staged: &std::path::Path,
) -> Result<(), CompactError> {
    let write_err = |e: &dyn std::fmt::Display| CompactError::Write {
        key: staged.display().to_string(),
        reason: e.to_string(),
    };
    let file = File::create(staged).map_err(|e| write_err(&e))?;
    let props = writer_properties(opts.dataset.name(), opts.row_group_rows);
    let mut w = ArrowWriter::try_new(file, opts.dataset.schema(), Some(props))
        .map_err(|e| write_err(&e))?;
    for key in sources {
        let convert = |reason: String| CompactError::Convert {
            key: key.clone(),
            reason,
        };
        for rb in read::open(store, key, 65_536).await? {
            let rb = rb.map_err(|e| read::batch_error(key, e))?;
            let out = match opts.dataset {
                Dataset::Events => {
                    let events = batch_to_events(&rb).map_err(|e| convert(e.to_string()))?;
                    let Some((node, _)) = events.first() else {
                        continue;
                    };
                    let node = node.clone();
                    let events: Vec<_> = events.into_iter().map(|(_, e)| e).collect();
                    events_to_batch(&node, &events)
                }
                Dataset::Flows => {
                    flows_to_batch(&batch_to_flows(&rb).map_err(|e| convert(e.to_string()))?)
                }
            }
            .map_err(|e| convert(e.to_string()))?;
            w.write(&out).map_err(|e| write_err(&e))?;
        }
    }
    let file = w.into_inner().map_err(|e| write_err(&e))?;
    file.sync_all().map_err(|e| write_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Position;

    fn rec(n: u64, key: &str, bytes: u64) -> CommitRecord {
        CommitRecord {
            n,
            key: key.into(),
            rows: 10,
            bytes,
            first: Position::Event { seq: n * 10 },
            last: Position::Event { seq: n * 10 + 9 },
            moved_to: None,
        }
    }

    fn opts(partition: Option<&str>, target: u64) -> CompactOptions {
        CompactOptions {
            dataset: Dataset::Events,
            partition: partition.map(Into::into),
            target_bytes: target,
            row_group_rows: 1000,
        }
    }

    const H0: &str = "events/date=2026-01-01/hour=00";
    const H1: &str = "events/date=2026-01-01/hour=01";

    #[test]
    fn merges_consecutive_small_files_of_closed_partitions_only() {
        let records = vec![
            rec(0, &format!("{H0}/a.parquet"), 100),
            rec(1, &format!("{H0}/b.parquet"), 100),
            rec(2, &format!("{H0}/c.parquet"), 100),
            rec(3, &format!("{H0}/big.parquet"), 1000),
            rec(4, &format!("{H0}/d.parquet"), 100),
            rec(5, &format!("{H1}/e.parquet"), 100),
            rec(6, &format!("{H1}/f.parquet"), 100),
        ];
        let plans = plan_merges("n", &records, &opts(None, 250));
        // a+b (c would pass 250), then c alone and d alone are left; hour=01 is open (newest record).
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].records, vec![0, 1]);
        assert_eq!(
            plans[0].into,
            format!("{H0}/n-compacted-000000000000-000000000001.parquet")
        );
        let plans = plan_merges("n", &records, &opts(None, 10_000));
        // The big file is under the target too: one merge of the whole closed hour.
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].records, vec![0, 1, 2, 3, 4]);
        // A partition filter that matches nothing closed.
        assert!(plan_merges("n", &records, &opts(Some("date=2026-01-02"), 10_000)).is_empty());
        assert_eq!(
            plan_merges(
                "n",
                &records,
                &opts(Some("date=2026-01-01/hour=00"), 10_000)
            )
            .len(),
            1
        );
    }

    #[test]
    fn a_merged_file_counts_once_and_grows_by_neighbours() {
        let m = format!("{H0}/n-compacted-000000000000-000000000001.parquet");
        let mut records = vec![
            rec(0, &format!("{H0}/a.parquet"), 100),
            rec(1, &format!("{H0}/b.parquet"), 100),
            rec(2, &format!("{H0}/c.parquet"), 100),
            rec(3, &format!("{H1}/d.parquet"), 100),
        ];
        records[0].moved_to = Some(m.clone());
        records[1].moved_to = Some(m.clone());
        let plans = plan_merges("n", &records, &opts(None, 1000));
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].records, vec![0, 1, 2]);
        assert_eq!(plans[0].sources, vec![m, format!("{H0}/c.parquet")]);
        // Nothing left to do once everything closed is one file.
        records[2].moved_to = Some("x".into());
        records[0].moved_to = Some("x".into());
        records[1].moved_to = Some("x".into());
        assert!(plan_merges("n", &records, &opts(None, 1000)).is_empty());
    }

    #[test]
    fn partitions_are_checked() {
        for ok in ["date=2026-01-01", "date=2026-01-01/hour=23"] {
            validate_partition(ok).unwrap();
        }
        for bad in [
            "2026-01-01",
            "date=2026-1-01",
            "date=2026-01-01/hour=24",
            "date=2026-01-01/hour=3",
            "date=2026-01-01/",
            "hour=01",
        ] {
            assert!(validate_partition(bad).is_err(), "{bad}");
        }
    }
}
