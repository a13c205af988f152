//! The committed event log, read back: the one reader that a restart (feeding the aggregator), a replay
//! (the recorded source) and compaction share. The log of a node is its committed event files — the
//! active files of the `events` table whose names carry the node, or, for an output of schema version
//! 1, its commit records ([`super::legacy`]) — and [`Reader`] reads them back as one stream in `seq`
//! order.

use std::collections::VecDeque;

use parquet::arrow::arrow_reader::ParquetRecordBatchReader;

use super::legacy::{self, LegacyError};
use super::names;
use super::read::{self, ReadError};
use super::table::{Table, TableError};
use super::Dataset;
use crate::event::schema::{batch_to_events, SchemaError};
use crate::event::Event;
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

/// Why the log could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadLogError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("committed file `{key}`: {source}")]
    Schema {
        key: String,
        #[source]
        source: SchemaError,
    },
    #[error("the event log of `{node}` has a gap: seq {expected} expected, {found}")]
    Gap {
        node: String,
        expected: u64,
        found: String,
    },
}

/// A node's committed events in `seq` order, each once, from a given `seq` on. A commit holds one file
/// per partition it wrote, so the files of one commit interleave in `seq` (events a little late at an
/// hour boundary went to the hour before): files whose stretches overlap are read side by side and
/// merged. A missing `seq` is an error, never a silent skip.
pub struct Reader {
    store: Store,
    node: String,
    /// Files not opened yet, by first `seq`.
    files: VecDeque<EventFile>,
    /// Files being read.
    open: Vec<Cursor>,
    next: u64,
    batch_rows: usize,
}

struct Cursor {
    key: String,
    rows: ParquetRecordBatchReader,
    buf: VecDeque<Event>,
}

impl Cursor {
    /// The cursor's next event at or after `from`, decoding more of the file as needed; `None` once
    /// the file is read.
    fn front(&mut self, from: u64) -> Result<Option<&Event>, ReadLogError> {
        loop {
            while self.buf.front().is_some_and(|e| e.seq < from) {
                self.buf.pop_front();
            }
            if !self.buf.is_empty() {
                return Ok(self.buf.front());
            }
            let Some(rb) = self.rows.next() else {
                return Ok(None);
            };
            let rb = rb.map_err(|e| read::batch_error(&self.key, e))?;
            let events = batch_to_events(&rb).map_err(|source| ReadLogError::Schema {
                key: self.key.clone(),
                source,
            })?;
            self.buf.extend(events.into_iter().map(|(_, e)| e));
        }
    }
}

impl Reader {
    /// The log of `node` in `store`, from `from_seq` on; `batch_rows` rows are decoded at a time.
    pub async fn open(
        store: &Store,
        node: &str,
        from_seq: u64,
        batch_rows: usize,
    ) -> Result<Self, ReadLogError> {
        let files = files(store, node)
            .await?
            .into_iter()
            .filter(|f| f.last_seq >= from_seq)
            .collect();
        Ok(Reader {
            store: store.clone(),
            node: node.to_string(),
            files,
            open: Vec::new(),
            next: from_seq,
            batch_rows: batch_rows.max(1),
        })
    }

    /// The `seq` the next event read will have.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Rows of the files not opened yet (an estimate of what is left to read).
    pub fn rows_left(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.rows.unwrap_or(f.last_seq - f.first_seq + 1))
            .sum()
    }

    /// Up to `max` next events, all with `seq < until`; empty at the end of the log (or at `until`).
    pub async fn next_events(
        &mut self,
        max: usize,
        until: u64,
    ) -> Result<Vec<Event>, ReadLogError> {
        let mut out = Vec::new();
        while out.len() < max && self.next < until {
            // Every file that may hold `next` is open.
            while self.files.front().is_some_and(|f| f.first_seq <= self.next) {
                let f = self.files.pop_front().expect("checked");
                let rows = read::open(&self.store, &f.key, self.batch_rows).await?;
                self.open.push(Cursor {
                    key: f.key,
                    rows,
                    buf: VecDeque::new(),
                });
            }
            let mut found = None;
            let mut lowest: Option<u64> = None;
            let mut i = 0;
            while i < self.open.len() {
                match self.open[i].front(self.next)?.map(|e| e.seq) {
                    None => {
                        self.open.swap_remove(i);
                        continue;
                    }
                    Some(seq) if seq == self.next => {
                        found = Some(i);
                        break;
                    }
                    Some(seq) => lowest = Some(lowest.map_or(seq, |l| l.min(seq))),
                }
                i += 1;
            }
            let Some(i) = found else {
                let next_file = self.files.front().map(|f| f.first_seq);
                return match (lowest, next_file) {
                    (None, None) => Ok(out),
                    (l, f) => {
                        let at = l.into_iter().chain(f).min().expect("one is some");
                        Err(ReadLogError::Gap {
                            node: self.node.clone(),
                            expected: self.next,
                            found: format!("the log goes on at {at}"),
                        })
                    }
                };
            };
            // Take the run of consecutive events this file holds from here.
            let c = &mut self.open[i];
            while out.len() < max && self.next < until {
                match c.buf.front() {
                    Some(e) if e.seq == self.next => {
                        out.push(c.buf.pop_front().expect("checked"));
                        self.next += 1;
                    }
                    _ => break,
                }
            }
        }
        Ok(out)
    }
}
