//! How far each node's event log is committed to an output, read from the events table's commit
//! records (`tcplake/events/<node>/seq`). A sharded sink commits flows that count events other sinks
//! write: it waits here until the table holds them, so no committed flow row ever counts an event
//! the log does not hold, whichever process writes the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::producer::{app_id, CommitError};
use super::{Dataset, Table};
use crate::shutdown::Shutdown;
use crate::storage::Store;

/// How often the table is read again while waiting: at first (a part's log commits come a few per
/// second at most), and at most (a long wait reads the log less often: on S3 each read is requests).
const POLL: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(2);
/// How long a wait goes on once the process is stopping: parts stopped together (a rollout, a script)
/// commit their event logs as they stop, and the flows that count them can follow.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long a wait goes on before it is said (and again after each as long).
const SAY_AFTER: Duration = Duration::from_secs(30);

/// The events table of one output, read as needed.
pub struct EventsCommitted {
    store: Store,
    table: Option<Table>,
    /// Once it fires, a wait gives up (the rows wait for the next run: see [`Self::wait`]).
    stop: Shutdown,
    /// A wait gave up: every later one does too (committing later rows would skip the earlier).
    gave_up: bool,
    /// How long a wait goes on once stopping ([`STOP_GRACE`]).
    grace: Duration,
    /// Per node, the `seq` after the last event committed (as last read).
    next: BTreeMap<Arc<str>, u64>,
}

impl std::fmt::Debug for EventsCommitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsCommitted")
            .field("store", &self.store.describe())
            .field("next", &self.next)
            .finish()
    }
}

impl EventsCommitted {
    pub fn new(store: Store, stop: Shutdown) -> Self {
        EventsCommitted {
            store,
            table: None,
            stop,
            gave_up: false,
            grace: STOP_GRACE,
            next: BTreeMap::new(),
        }
    }

    /// Returns `true` once every node's log in `need` (node, `seq` after its last event counted) is
    /// committed that far; `false` if the process has been stopping for [`STOP_GRACE`] first (the
    /// other part may be stopped for good: the caller leaves the rows uncommitted and unacknowledged,
    /// and the edge delivers them again), and from then on. A wait longer than [`SAY_AFTER`] is
    /// logged, naming the node: the part that writes its log may not be running.
    pub async fn wait(&mut self, need: &[(Arc<str>, u64)]) -> Result<bool, CommitError> {
        if self.gave_up {
            return Ok(false);
        }
        let started = Instant::now();
        let mut said = started;
        let mut poll = POLL;
        let mut stopping: Option<Instant> = None;
        loop {
            let behind = |next: &BTreeMap<Arc<str>, u64>| {
                need.iter()
                    .find(|(n, s)| next.get(n).copied().unwrap_or(0) < *s)
                    .cloned()
            };
            let Some((node, seq)) = behind(&self.next) else {
                return Ok(true);
            };
            self.read(need).await?;
            if behind(&self.next).is_none() {
                return Ok(true);
            }
            if self.stop.is_triggered() {
                let since = *stopping.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.grace {
                    self.gave_up = true;
                    return Ok(false);
                }
            }
            if said.elapsed() >= SAY_AFTER {
                said = Instant::now();
                tracing::warn!(
                    node = %node,
                    needed = seq,
                    committed = self.next.get(&node).copied().unwrap_or(0),
                    waited_secs = started.elapsed().as_secs(),
                    "flows wait for this node's event log to be committed (by the sink part that \
                     writes it): is that sink running?"
                );
            }
            if stopping.is_some() {
                tokio::time::sleep(POLL).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = self.stop.wait() => {}
                }
                poll = (poll * 2).min(POLL_MAX);
            }
        }
    }

    /// Reads the newest version of the table and the committed position of every node in `need`.
    async fn read(&mut self, need: &[(Arc<str>, u64)]) -> Result<(), CommitError> {
        match &mut self.table {
            Some(t) => t.refresh().await?,
            None => match Table::open(&self.store, Dataset::Events).await? {
                Some(t) => self.table = Some(t),
                None => return Ok(()), // no event committed anywhere yet
            },
        }
        let table = self.table.as_ref().expect("opened above");
        for (node, _) in need {
            let app = format!("{}/seq", app_id(Dataset::Events, node));
            if let Some(seq) = table.app_version(&app).await? {
                self.next.insert(Arc::clone(node), seq as u64 + 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{memory, Finalized, Tx};
    use crate::event::{Event, EventBatch, EventKind};
    use crate::sink::{self, CommitLog, CommitOrder, RollPolicy, RollingWriter};
    use crate::storage::LocalDir;

    /// Commits node `n`'s events `seqs` to the output, as an event-log sink does.
    async fn commit_events(store: &Store, seqs: std::ops::Range<u64>) {
        let mut log = CommitLog::recover(store.clone(), Dataset::Events, "n", &Default::default())
            .await
            .unwrap();
        let (mut tx, rx) = memory::channel("test", 4, Default::default());
        let events = seqs
            .map(|s| Event::sample(s, s as i64, EventKind::BytesSent { bytes: 1 }))
            .collect();
        let batch = Arc::new(EventBatch::new("n".into(), events, None));
        tx.send(Finalized {
            item: Some(batch),
            acks: Vec::new(),
        })
        .await
        .unwrap();
        drop(tx);
        let policy = RollPolicy {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
            row_group_rows: 1024,
            encode_threads: 1,
        };
        let writer = RollingWriter::new(Dataset::Events, store.clone(), policy);
        let m = Default::default();
        sink::run(rx, writer, &mut log, CommitOrder::default(), &m)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_wait_ends_once_the_table_holds_the_log_and_gives_up_for_good_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Local(LocalDir::open(dir.path()).unwrap());
        let (trigger, stop) = crate::shutdown::channel();
        let mut committed = EventsCommitted::new(store.clone(), stop);
        let need = vec![(Arc::<str>::from("n"), 10)];
        // No events table yet: the wait goes on until the log is committed that far.
        let waiter = tokio::spawn(async move {
            let done = committed.wait(&need).await.unwrap();
            (done, committed)
        });
        commit_events(&store, 0..6).await;
        tokio::time::sleep(POLL * 2).await;
        assert!(!waiter.is_finished(), "events 6..10 are not committed yet");
        commit_events(&store, 6..10).await;
        let (done, mut committed) = waiter.await.unwrap();
        assert!(done);
        assert_eq!(committed.next.get("n"), Some(&10));
        // Stopping while the log is behind: given up once the grace is over, and for good (a later group committed while an
        // earlier one was not would be skipped on restart).
        trigger.trigger();
        committed.grace = POLL;
        assert!(!committed.wait(&[("n".into(), 11)]).await.unwrap());
        assert!(!committed.wait(&[("n".into(), 5)]).await.unwrap());
    }
}
