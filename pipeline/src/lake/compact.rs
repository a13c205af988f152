//! `tcplake compact`: merges the small files of closed partitions into large ones, as Delta commits that
//! remove the sources and add the merged file at once (`dataChange: false`), so every reader sees either
//! the sources or the merged file, never both and never neither. An interrupted compaction leaves at
//! most an unreferenced merged file (`tcplake vacuum` removes it); rerunning merges again.
//!
//! The unit is a run of consecutive files of one producer in one partition (within a partition a
//! producer's files follow one another in the stream, so a merged file's rows stay in stream order). A partition is **closed** for a producer once
//! that producer has written to a later partition: its newest partition is never touched, so a running
//! sink is unaffected. The removed files stay on storage until a vacuum older than the retention.

use std::collections::BTreeMap;
use std::fs::File;

use parquet::arrow::ArrowWriter;
use serde::Serialize;

use super::format::writer_properties;
use super::names;
use super::read::{self, ReadError};
use super::table::{Change, FileEntry, NewFile, Table, TableError};
use super::Dataset;
use crate::event::schema::{batch_to_events, batch_to_flows, events_to_batch, flows_to_batch};
use crate::storage::{Store, StoreError};

/// What to compact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactOptions {
    pub dataset: Dataset,
    /// Only this partition (`date=YYYY-MM-DD` or `date=YYYY-MM-DD/hour=HH`); every closed one if `None`.
    pub partition: Option<String>,
    /// Merged files grow up to about this many bytes (the sum of their sources).
    pub target_bytes: u64,
    pub row_group_rows: usize,
}

/// How far back windows of a flows table may still change (its late horizon), when it says.
fn horizon_us(table: &Table) -> i64 {
    table
        .properties()
        .ok()
        .and_then(|p| p.get(super::producer::HORIZON_PROPERTY).cloned())
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(86_400_000_000, |s| s.saturating_mul(1_000_000))
}

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub dataset: &'static str,
    /// Delta commits made (one per merged file).
    pub commits: u64,
    /// Merged files written.
    pub merged_files: u64,
    /// Files they replace (removed from the table).
    pub source_files: u64,
    pub rows: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl std::fmt::Display for CompactReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "compacted {}: {} files ({} rows, {} bytes) into {} files ({} bytes) in {} commits",
            self.dataset,
            self.source_files,
            self.rows,
            self.bytes_before,
            self.merged_files,
            self.bytes_after,
            self.commits
        )
    }
}

/// Why a compaction stopped. Nothing committed is lost: what was merged is committed, the rest not.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("`{key}`")]
    Convert {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("writing the merged file `{key}`")]
    Write {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "invalid partition `{0}`: expected date=YYYY-MM-DD or date=YYYY-MM-DD/hour=HH, as in the \
         dataset's directory names"
    )]
    Partition(String),
}

/// Checks a `--partition` value against the directory layout (and the calendar).
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

/// One merge: consecutive files of one producer in one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Merge {
    producer: String,
    sources: Vec<FileEntry>,
}

/// Plans merges over a table's files: per producer, its closed partitions (not its newest), runs of
/// consecutive files up to `target_bytes`, two files at least. With `mutable_us` (flows: the late
/// horizon), files holding windows that may still be rewritten (within it of the producer's newest)
/// are left alone too.
fn plan(files: &[FileEntry], opts: &CompactOptions, mutable_us: Option<i64>) -> Vec<Merge> {
    let mut by_producer: BTreeMap<String, Vec<(&FileEntry, names::FileName)>> = BTreeMap::new();
    for f in files {
        if let Some(n) = names::parse(f.name()) {
            by_producer
                .entry(n.producer.clone())
                .or_default()
                .push((f, n));
        }
    }
    let mut out = Vec::new();
    for (producer, mut list) in by_producer {
        // By partition, then stream order: a commit's files of different partitions interleave in
        // `seq`, but within a partition a producer's files follow one another.
        list.sort_by(|a, b| {
            (a.0.partition_dir(), a.1.first, a.1.last).cmp(&(
                b.0.partition_dir(),
                b.1.first,
                b.1.last,
            ))
        });
        let newest = list
            .iter()
            .map(|(f, _)| f.partition_dir())
            .max()
            .unwrap_or("");
        let newest_window = list.iter().map(|(_, n)| n.last).max().unwrap_or(i64::MIN);
        let mut run: Vec<FileEntry> = Vec::new();
        let mut run_bytes = 0u64;
        let flush = |run: &mut Vec<FileEntry>, out: &mut Vec<Merge>| {
            if run.len() >= 2 {
                out.push(Merge {
                    producer: producer.clone(),
                    sources: std::mem::take(run),
                });
            }
            run.clear();
        };
        for (f, name) in &list {
            let dir = f.partition_dir();
            let settled = mutable_us.is_none_or(|h| name.last.saturating_add(h) < newest_window);
            let wanted = settled
                && dir != newest
                && opts
                    .partition
                    .as_deref()
                    .is_none_or(|p| dir == p || dir.starts_with(&format!("{p}/")));
            let same_dir = run.first().is_some_and(|r| r.partition_dir() == dir);
            if !wanted || !same_dir || run_bytes + f.size > opts.target_bytes {
                flush(&mut run, &mut out);
                run_bytes = 0;
            }
            if wanted {
                run_bytes += f.size;
                run.push((*f).clone());
            }
        }
        flush(&mut run, &mut out);
    }
    out
}

/// Compacts one dataset of the output.
pub async fn run(store: &Store, opts: &CompactOptions) -> Result<CompactReport, CompactError> {
    let mut report = CompactReport {
        dataset: opts.dataset.name(),
        ..CompactReport::default()
    };
    let Some(mut table) = Table::open(store, opts.dataset).await? else {
        return Ok(report);
    };
    // The merged files are written in this build's schema: the table's must have their columns.
    table.upgrade().await?;
    let mutable_us = (opts.dataset == Dataset::Flows).then(|| horizon_us(&table));
    for m in plan(&table.files()?, opts, mutable_us) {
        let (rows, merged) = merge(store, opts, &m).await?;
        report.commits += 1;
        report.merged_files += 1;
        report.source_files += m.sources.len() as u64;
        report.rows += rows;
        report.bytes_before += m.sources.iter().map(|f| f.size).sum::<u64>();
        report.bytes_after += merged.size;
        table
            .commit(Change::Compact, vec![merged], m.sources, Vec::new())
            .await?;
    }
    Ok(report)
}

/// Writes the rows of a merge's sources, in order, as one file of the current schema (rows pass through
/// the same decoding as a replay, so files of an older version come out upgraded), and puts it in place.
async fn merge(
    store: &Store,
    opts: &CompactOptions,
    m: &Merge,
) -> Result<(u64, NewFile), CompactError> {
    let names: Vec<names::FileName> = m
        .sources
        .iter()
        .filter_map(|f| names::parse(f.name()))
        .collect();
    let first = names.iter().map(|n| n.first).min().unwrap_or(0);
    let last = names.iter().map(|n| n.last).max().unwrap_or(0);
    let dir = m.sources[0].partition_dir().to_string();
    let name = names::format(
        &m.producer,
        first,
        last,
        &format!("c{}", crate::storage::new_id()),
    );
    let rel = format!("{dir}/{name}");
    let key = format!("{}/{rel}", opts.dataset.name());
    let staged = store.staging_path(&key)?;
    let write_err = |e: Box<dyn std::error::Error + Send + Sync>| CompactError::Write {
        key: key.clone(),
        source: e,
    };
    let file = File::create(&staged).map_err(|e| write_err(e.into()))?;
    let props = writer_properties(opts.dataset.name(), opts.row_group_rows);
    let mut w = ArrowWriter::try_new(file, opts.dataset.schema(), Some(props))
        .map_err(|e| write_err(e.into()))?;
    let mut rows = 0u64;
    for src in &m.sources {
        let src_key = format!("{}/{}", opts.dataset.name(), src.path);
        let convert = |e: Box<dyn std::error::Error + Send + Sync>| CompactError::Convert {
            key: src_key.clone(),
            source: e,
        };
        for rb in read::open(store, &src_key, 65_536).await? {
            let rb = rb.map_err(|e| read::batch_error(&src_key, e))?;
            let out = match opts.dataset {
                Dataset::Events => {
                    let events = batch_to_events(&rb).map_err(|e| convert(e.into()))?;
                    let Some((node, _)) = events.first() else {
                        continue;
                    };
                    let node = node.clone();
                    let events: Vec<_> = events.into_iter().map(|(_, e)| e).collect();
                    events_to_batch(&node, &events)
                }
                Dataset::Flows => {
                    flows_to_batch(&batch_to_flows(&rb).map_err(|e| convert(e.into()))?)
                }
            }
            .map_err(|e| convert(e.into()))?;
            rows += out.num_rows() as u64;
            w.write(&out).map_err(|e| write_err(e.into()))?;
        }
    }
    let file = w.into_inner().map_err(|e| write_err(e.into()))?;
    file.sync_all().map_err(|e| write_err(e.into()))?;
    let size = file.metadata().map_err(|e| write_err(e.into()))?.len();
    drop(file);
    store.upload(&staged, &key).await?;
    let partition = &m.sources[0].partition;
    let value = |k: &str| partition.get(k).cloned().flatten().unwrap_or_default();
    let int_stats = match opts.dataset {
        Dataset::Events => vec![("seq", first, last)],
        Dataset::Flows => Vec::new(),
    };
    Ok((
        rows,
        NewFile {
            path: rel,
            size,
            rows,
            date: value("date"),
            hour: value("hour").parse().unwrap_or(0),
            int_stats,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &str, producer: &str, first: i64, last: i64, size: u64) -> FileEntry {
        FileEntry {
            path: format!("{dir}/{}", names::format(producer, first, last, "n1")),
            size,
            rows: Some(1),
            partition: BTreeMap::new(),
        }
    }

    fn opts(partition: Option<&str>, target: u64) -> CompactOptions {
        CompactOptions {
            dataset: Dataset::Events,
            partition: partition.map(str::to_string),
            target_bytes: target,
            row_group_rows: 1000,
        }
    }

    const H0: &str = "date=2026-01-01/hour=00";
    const H1: &str = "date=2026-01-01/hour=01";

    #[test]
    fn merges_consecutive_small_files_of_closed_partitions_only() {
        let files = vec![
            file(H0, "a", 0, 9, 10),
            file(H0, "a", 10, 19, 10),
            file(H0, "a", 20, 29, 10),
            file(H1, "a", 30, 39, 10),
            file(H1, "a", 40, 49, 10),
            // b's newest partition is hour 00: not closed for b.
            file(H0, "b", 0, 9, 10),
            file(H0, "b", 10, 19, 10),
        ];
        let p = plan(&files, &opts(None, 1000), None);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].producer, "a");
        assert_eq!(p[0].sources.len(), 3);
        // A target of 25 bytes: runs of two.
        let p = plan(&files, &opts(None, 25), None);
        assert_eq!(
            p.iter().map(|m| m.sources.len()).collect::<Vec<_>>(),
            vec![2]
        );
        // Only the asked partition.
        assert!(plan(&files, &opts(Some(H1), 1000), None).is_empty());
        assert_eq!(
            plan(&files, &opts(Some("date=2026-01-01"), 1000), None).len(),
            1
        );
    }

    #[test]
    fn partitions_are_checked() {
        for ok in ["date=2026-01-01", "date=2026-01-01/hour=23"] {
            validate_partition(ok).unwrap();
        }
        for bad in [
            "2026-01-01",
            "date=2026-1-1",
            "date=2026-01-01/hour=24",
            "date=2026-01-01/hour=1",
            "date=2027-13-45",
            "date=2026-02-30",
        ] {
            assert!(validate_partition(bad).is_err(), "{bad}");
        }
    }
}
