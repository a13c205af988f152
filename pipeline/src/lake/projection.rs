//! What keeps `flows/` the projection of `events/`: a window emitted again (it gained events while
//! mutable, or a restarted run rebuilt it) replaces its earlier rows instead of adding to them.
//!
//! A producer's flows sink keeps an index of the windows its committed files hold — per `(window, node)`
//! the event count of the rows and the file — for the windows that can still change (within the late
//! horizon of the newest). An emitted window is then one of three things:
//! * **unchanged** (the table holds the same event count: the same events, since counts only grow): its
//!   rows are dropped, so a rebuild after a restart rewrites nothing it need not;
//! * **changed**: its rows are written, and the file holding its old rows is rewritten without them, in
//!   the same Delta commit that adds the new ones (readers see the old rows or the new, never both);
//! * **new**: written.
//!
//! Windows taken in since the last commit wait in the sink's open file (in memory): emitted again, they
//! replace their waiting rows there, not in the table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::event::FlowRecord;
use crate::time::Partition;

/// A window of one node: `(window_start_us, node)`.
pub type WindowKey = (i64, Arc<str>);

/// A committed file rewritten without replaced windows: its path, its replacement (if rows are left)
/// and the windows (with event counts) the replacement holds.
pub type Rewritten = (String, Option<String>, Vec<(WindowKey, u64)>);

/// The windows of a producer's committed files that can still change.
#[derive(Debug, Default)]
pub struct Projection {
    committed: BTreeMap<WindowKey, (u64, String)>,
    /// Windows taken in since the last commit (waiting in the sink's open file), with their counts.
    open: BTreeMap<WindowKey, u64>,
    /// Committed files to rewrite at the next commit, and the windows to leave out of them.
    pending: BTreeMap<String, BTreeSet<WindowKey>>,
    /// Windows older than the newest minus this are final (only used to forget them).
    horizon_us: i64,
}

/// What to do with an emission.
#[derive(Debug, PartialEq)]
pub struct Admission {
    /// The rows to write (of changed and new windows), in their order.
    pub records: Vec<FlowRecord>,
    /// Windows the table already held unchanged (their rows were dropped).
    pub unchanged: u64,
    /// Windows whose rows replace earlier ones.
    pub replaced: u64,
}

/// Event counts of an emission's windows.
fn counts(records: &[FlowRecord]) -> BTreeMap<WindowKey, u64> {
    let mut out: BTreeMap<WindowKey, u64> = BTreeMap::new();
    for r in records {
        *out.entry((r.window_start_us, Arc::clone(&r.key.node)))
            .or_default() += r.events;
    }
    out
}

impl Projection {
    pub fn new(horizon_us: i64) -> Self {
        Projection {
            horizon_us,
            ..Projection::default()
        }
    }

    /// Takes in the committed windows of one file (at startup, from the table).
    pub fn load_file(&mut self, path: &str, records: &[FlowRecord]) {
        for (k, n) in counts(records) {
            self.committed.insert(k, (n, path.to_string()));
        }
    }

    /// Decides what of an emission to write (see the module doc). Call [`Self::committed_files`] once the
    /// rows are committed.
    pub fn admit(&mut self, records: Vec<FlowRecord>) -> Admission {
        let counts = counts(&records);
        let mut unchanged = BTreeSet::new();
        let mut replaced = 0;
        for (k, n) in &counts {
            if let Some(waiting) = self.open.get_mut(k) {
                // Its rows wait in the open file: the new ones replace them there.
                *waiting = *n;
                continue;
            }
            match self.committed.get(k) {
                Some((held, _)) if held == n => {
                    unchanged.insert(k.clone());
                }
                Some((_, file)) => {
                    self.pending
                        .entry(file.clone())
                        .or_default()
                        .insert(k.clone());
                    replaced += 1;
                    self.open.insert(k.clone(), *n);
                }
                None => {
                    self.open.insert(k.clone(), *n);
                }
            }
        }
        let records = if unchanged.is_empty() {
            records
        } else {
            records
                .into_iter()
                .filter(|r| !unchanged.contains(&(r.window_start_us, Arc::clone(&r.key.node))))
                .collect()
        };
        Admission {
            records,
            unchanged: unchanged.len() as u64,
            replaced,
        }
    }

    /// The files to rewrite at the next commit, each with the windows to leave out.
    pub fn pending(&self) -> &BTreeMap<String, BTreeSet<WindowKey>> {
        &self.pending
    }

    /// After a commit: the open windows now live in `files` (path and partition: a window's rows are in
    /// the file of its partition), the rewritten files' remaining windows in their replacements
    /// (`rewritten`: old path to new path and the windows it holds).
    pub fn committed_files(&mut self, files: &[(String, Partition)], rewritten: &[Rewritten]) {
        for (old, new, kept) in rewritten {
            self.committed.retain(|_, (_, f)| f != old);
            if let Some(new) = new {
                for (k, n) in kept {
                    self.committed.insert(k.clone(), (*n, new.clone()));
                }
            }
        }
        // Each window's rows went to the file of its partition (one per partition in a commit).
        for (k, n) in std::mem::take(&mut self.open) {
            let partition = Partition::of(k.0);
            match files.iter().find(|(_, p)| *p == partition) {
                Some((path, _)) => {
                    self.committed.insert(k, (n, path.clone()));
                }
                None => {
                    // Cannot happen: the sink writes every open window in the commit's files.
                    tracing::error!(window = k.0, node = %k.1, "window committed in no file");
                    debug_assert!(false, "window {k:?} committed in no file");
                }
            }
        }
        self.pending.clear();
        // Windows past the horizon of the newest can no longer change: forget them.
        if let Some(newest) = self.committed.keys().map(|(w, _)| *w).max() {
            let oldest = newest.saturating_sub(self.horizon_us.saturating_mul(2));
            self.committed.retain(|(w, _), _| *w >= oldest);
        }
    }

    /// Is anything waiting for a commit (rows in the open file, files to rewrite)?
    pub fn has_open(&self) -> bool {
        !self.open.is_empty() || !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, FlowKey};

    fn rec(w: i64, port: u16, events: u64) -> FlowRecord {
        FlowRecord {
            window_start_us: w,
            window_end_us: w + 10,
            key: FlowKey {
                node: "n".into(),
                pid: 1,
                comm: Comm::from_bytes(b"x"),
                cgroup_id: 0,
                cgroup: None,
                pod: None,
                role: None,
                local_addr: "127.0.0.1".parse().unwrap(),
                local_port: port,
                remote_addr: "127.0.0.1".parse().unwrap(),
                remote_port: 2,
            },
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            rtt_samples: 0,
            rtt_min_us: None,
            rtt_p50_us: None,
            rtt_p99_us: None,
            rtt_max_us: None,
            connections_opened: 0,
            connections_closed: 0,
            resets: 0,
            events,
        }
    }

    #[test]
    fn unchanged_windows_are_dropped_changed_ones_replace_new_ones_append() {
        let mut p = Projection::new(1_000);
        p.load_file("a.parquet", &[rec(0, 1, 3), rec(0, 2, 1), rec(10, 1, 5)]);
        // Window 0 again with the same 4 events, window 10 with one more, window 20 new.
        let a = p.admit(vec![
            rec(0, 1, 3),
            rec(0, 2, 1),
            rec(10, 1, 6),
            rec(20, 1, 1),
        ]);
        assert_eq!((a.unchanged, a.replaced), (1, 1));
        assert_eq!(
            a.records
                .iter()
                .map(|r| r.window_start_us)
                .collect::<Vec<_>>(),
            vec![10, 20]
        );
        assert_eq!(
            p.pending()["a.parquet"],
            BTreeSet::from([(10, Arc::from("n"))])
        );
        // Window 20 again before its file is committed: it waits, replaced, in the open file.
        let a = p.admit(vec![rec(20, 1, 2)]);
        assert_eq!((a.unchanged, a.replaced, a.records.len()), (0, 0, 1));
        p.committed_files(
            &[("b.parquet".into(), Partition::of(0))],
            &[(
                "a.parquet".into(),
                Some("a2.parquet".into()),
                vec![((0, Arc::from("n")), 4)],
            )],
        );
        assert!(!p.has_open());
        let a = p.admit(vec![rec(20, 1, 3)]);
        assert_eq!((a.unchanged, a.replaced), (0, 1));
        assert!(p.pending().contains_key("b.parquet"));
        let a = p.admit(vec![rec(0, 1, 3), rec(0, 2, 1)]);
        assert_eq!(a.unchanged, 1);
    }

    /// A commit that spans an hour boundary holds one file per partition: each window is indexed to
    /// the file that holds it, so a later rewrite rewrites the right file.
    #[test]
    fn windows_of_a_commit_across_an_hour_are_indexed_to_their_own_files() {
        const HOUR: i64 = 3_600_000_000;
        let mut p = Projection::new(HOUR);
        p.admit(vec![rec(HOUR - 10, 1, 1), rec(HOUR, 1, 1)]);
        p.committed_files(
            &[
                ("h1.parquet".into(), Partition::of(HOUR)),
                ("h0.parquet".into(), Partition::of(0)),
            ],
            &[],
        );
        p.admit(vec![rec(HOUR - 10, 1, 2), rec(HOUR, 1, 2)]);
        assert_eq!(
            p.pending().keys().collect::<Vec<_>>(),
            vec!["h0.parquet", "h1.parquet"]
        );
        assert_eq!(
            p.pending()["h0.parquet"],
            BTreeSet::from([(HOUR - 10, Arc::from("n"))])
        );
    }
}
