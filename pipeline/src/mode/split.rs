//! Split modes: one stage per process, joined by the broker. The stage code is the monolith's; only the
//! edges differ, plus the bookkeeping that turns at-least-once delivery into exactly-once output:
//!
//! * capture continues after the last event its node published;
//! * an aggregator's last published flow batch is its checkpoint: it replays the events stream from
//!   that batch's replay point and skips the rows it already published;
//! * the sink acks a message only once the file holding its rows is committed, and skips rows a
//!   commit record says are already written (redelivery after a crash or a lost ack).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{micros, open_output, open_source, open_store, roll_policy, RunError, MAX_FLOW_BATCH};
use crate::aggregate::{self, AggregateConfig, Resume, WindowConfig};
use crate::capture::{self, CaptureConfig};
use crate::config::Settings;
use crate::edge::broker::{
    self, decode_events_msg, decode_flows_msg, flows_subject, Broker, BrokerRx, Ends,
    EVENTS_STREAM, FLOWS_STREAM,
};
use crate::edge::objects::{self, ObjectRx, ObjectTx};
use crate::edge::{memory, EdgeError, Tx};
use crate::event::{EventBatch, FlowBatch};
use crate::metrics::{BrokerMetrics, Metrics};
use crate::shutdown::Shutdown;
use crate::sink::{
    self, CommitLog, CommitOrder, Dataset, Position, RollingWriter, SinkError, SinkStats, Store,
};
use crate::summary::Summary;

/// The object store that stands in for the broker (`--handoff`), if that is the chosen edge.
async fn handoff_store(s: &Settings, metrics: &Metrics) -> Result<Option<Store>, RunError> {
    match (&s.broker, &s.handoff) {
        (None, Some(out)) => Ok(Some(open_output(out, metrics).await?)),
        _ => Ok(None),
    }
}

async fn connect(s: &Settings, metrics: &Metrics) -> Result<Broker, RunError> {
    let settings = s
        .broker
        .as_ref()
        .expect("split modes are validated to have a broker");
    Ok(Broker::connect(settings, Arc::clone(&metrics.broker)).await?)
}

fn summary(metrics: &Metrics, started: Instant, out: String) -> Summary {
    Summary::from_metrics(metrics, started.elapsed(), out)
}

/// `--mode capture`: the source's batches to `tcplake.events.<node>`.
pub async fn capture(
    s: &Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let cfg = CaptureConfig {
        batch_size: s.batch_size,
        rate: s.rate,
        duration: s.duration,
    };
    let node: Arc<str> = s.node.as_str().into();
    if let Some(store) = handoff_store(s, &metrics).await? {
        let source = open_source(s, &node, &metrics).await?;
        let output = ObjectTx::new(
            store.clone(),
            objects::events_stream(&s.node),
            Arc::clone(&metrics.handoff),
        );
        metrics.health.set_ready();
        capture::run(cfg, source, output, shutdown, &metrics.capture).await?;
        return Ok(summary(&metrics, started, store.describe()));
    }
    let broker = connect(s, &metrics).await?;
    let resume_seq = match broker.capture_progress(&s.node).await? {
        None => 0,
        Some(Some(last)) => last + 1,
        Some(None) => {
            tracing::info!(node = %s.node, "this node's event stream already ended; nothing to do");
            return Ok(summary(&metrics, started, s.broker_url()));
        }
    };
    let mut source = open_source(s, &node, &metrics).await?;
    source.resume_at(resume_seq);
    if resume_seq > 0 {
        tracing::info!(
            resume_seq,
            "continuing after the last event this node published"
        );
    }
    let output = broker.events_tx(&s.node)?;
    metrics.health.set_ready();
    capture::run(cfg, source, output, shutdown, &metrics.capture).await?;
    let mut sum = summary(&metrics, started, s.broker_url());
    sum.resumed_at_seq = resume_seq;
    Ok(sum)
}

/// `--mode aggregate`: events from the broker, this shard's flow batches to `tcplake.flows.<i>`.
pub async fn aggregate(
    s: &Settings,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let shard = s.shard;
    let windows = WindowConfig {
        window_us: micros(s.window),
        allowed_lateness_us: micros(s.allowed_lateness),
    };
    if let Some(store) = handoff_store(s, &metrics).await? {
        // Reads the hand-off objects of this process's --node (one capture node per topology).
        let input: ObjectRx<Arc<EventBatch>> = ObjectRx::new(
            store.clone(),
            objects::events_stream(&s.node),
            Arc::clone(&metrics.handoff),
        );
        let output = ObjectTx::new(
            store.clone(),
            objects::flows_stream(shard.index),
            Arc::clone(&metrics.handoff),
        );
        let cfg = AggregateConfig {
            windows,
            producer: format!("agg-{}", shard.index).into(),
            max_batch_records: MAX_FLOW_BATCH,
            resume: None,
            shard,
        };
        metrics.health.set_ready();
        aggregate::run(cfg, input, output, &metrics.aggregate)
            .await
            .map_err(RunError::Aggregate)?;
        return Ok(summary(&metrics, started, store.describe()));
    }
    let broker = connect(s, &metrics).await?;
    let resume = match broker.shard_progress(shard.index).await? {
        None => None,
        Some(None) => {
            tracing::info!(
                shard = shard.index,
                "this shard's flow stream already ended; nothing to do"
            );
            return Ok(summary(&metrics, started, s.broker_url()));
        }
        Some(Some(last)) => match (last.records.last(), last.ranks.last()) {
            (Some(r), Some(&rank)) => Some(Resume {
                point: last.replay,
                committed_through: (r.window_start_us, rank),
            }),
            _ => None,
        },
    };
    let from = resume.map_or(0, |r| r.point.from_seq);
    if resume.is_some() {
        tracing::info!(from, "rebuilding open windows from the events stream");
    }
    let input = broker.events_from(from).await?;
    let output = broker.flows_tx(shard.index);
    let cfg = AggregateConfig {
        windows,
        producer: format!("agg-{}", shard.index).into(),
        max_batch_records: MAX_FLOW_BATCH,
        resume,
        shard,
    };
    metrics.health.set_ready();
    let m = Arc::clone(&metrics);
    let mut task =
        tokio::spawn(async move { aggregate::run(cfg, input, output, &m.aggregate).await });
    tokio::select! {
        r = &mut task => {
            r.map_err(|e| RunError::Panicked(e.to_string()))?.map_err(RunError::Aggregate)?;
        }
        _ = shutdown.wait() => {
            // Open windows are not flushed half-full: a restart rebuilds them from the stream.
            task.abort();
            let _ = task.await;
            tracing::info!("stopped; open windows will be rebuilt from the events stream on restart");
        }
    }
    let mut sum = summary(&metrics, started, s.broker_url());
    sum.resumed_at_seq = from;
    Ok(sum)
}

/// Messages delivered but not yet acked, in arrival order, each with the position of its last row.
struct Unacked<K> {
    pending: VecDeque<(K, u64, Message)>,
}

impl<K: PartialOrd + Copy> Unacked<K> {
    fn new() -> Self {
        Unacked {
            pending: VecDeque::new(),
        }
    }

    /// Removes and returns the messages whose rows are all committed (`through` or before).
    fn release(&mut self, through: K, open: &mut BTreeSet<u64>) -> Vec<Message> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|(k, _, _)| *k <= through) {
            let (_, stream_seq, m) = self.pending.pop_front().expect("front exists");
            open.remove(&stream_seq);
            out.push(m);
        }
        out
    }
}

fn stream_seq(m: &Message) -> u64 {
    m.info().map(|i| i.stream_sequence).unwrap_or(0)
}

/// How far the event log is committed on the events stream: every message before the returned
/// position is in committed files (or carried nothing to write).
fn log_through(open: &BTreeSet<u64>, seen: u64) -> u64 {
    open.first().copied().unwrap_or(seen + 1)
}

/// The event-log sink of one node, fed by the router.
struct NodeSink {
    tx: memory::MemoryTx<Arc<EventBatch>>,
    /// Next `seq` not yet handed to the sink (rows before it are skipped: redelivered).
    next_seq: u64,
    /// Next `seq` not yet committed.
    committed: u64,
    /// `next_seq` is known (something was committed or received): a batch must continue there.
    started: bool,
    unacked: Unacked<u64>,
    task: JoinHandle<Result<SinkStats, SinkError>>,
}

/// `--mode sink`: the event log per node and the flows of every shard, from durable consumers.
pub async fn sink(
    s: &Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let store = open_store(s, &metrics).await?;
    if let Some(handoff) = handoff_store(s, &metrics).await? {
        return sink_from_objects(s, metrics, store, handoff, started).await;
    }
    let broker = connect(s, &metrics).await?;
    let ack_wait = s.broker.as_ref().and_then(|b| b.ack_wait).unwrap_or(
        // Messages stay unacked while their rows sit in open files: longer than a file stays open.
        s.max_file_age + Duration::from_secs(30),
    );
    let events_in = broker
        .durable(
            EVENTS_STREAM,
            "tcplake-sink-events",
            "tcplake.events.>",
            ack_wait,
            Box::new(decode_events_msg),
            Ends::AllSeenNodes,
        )
        .await?;
    let (through_tx, through_rx) = watch::channel(0u64);
    metrics.health.set_ready();
    let events = tokio::spawn(route_events(
        events_in,
        store.clone(),
        s.clone(),
        Arc::clone(&metrics),
        through_tx,
        shutdown.clone(),
    ));
    let mut flows = Vec::new();
    for i in 0..s.shards {
        let input = broker
            .durable(
                FLOWS_STREAM,
                &format!("tcplake-sink-flows-{i}"),
                &flows_subject(i),
                ack_wait,
                Box::new(decode_flows_msg),
                Ends::Marker,
            )
            .await?;
        flows.push(tokio::spawn(route_flows(
            input,
            format!("agg-{i}"),
            store.clone(),
            s.clone(),
            Arc::clone(&metrics),
            through_rx.clone(),
            shutdown.clone(),
        )));
    }
    let mut first_error = events
        .await
        .map_err(|e| RunError::Panicked(e.to_string()))
        .and_then(|r| r)
        .err();
    for f in flows {
        let r = f
            .await
            .map_err(|e| RunError::Panicked(e.to_string()))
            .and_then(|r| r);
        if let (None, Err(e)) = (&first_error, r) {
            first_error = Some(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(summary(&metrics, started, store.describe()))
}

/// The sink over the object-store hand-off: the same sink stage, reading numbered objects.
async fn sink_from_objects(
    s: &Settings,
    metrics: Arc<Metrics>,
    store: Store,
    handoff: Store,
    started: Instant,
) -> Result<Summary, RunError> {
    metrics.health.set_ready();
    let writer =
        |ds: Dataset| RollingWriter::new(ds.name(), ds.schema(), store.clone(), roll_policy(s));
    let mut tasks = Vec::new();
    let events_in: ObjectRx<Arc<EventBatch>> = ObjectRx::new(
        handoff.clone(),
        objects::events_stream(&s.node),
        Arc::clone(&metrics.handoff),
    );
    let mut log = CommitLog::recover(store.clone(), Dataset::Events, &s.node).await?;
    let (m, w) = (Arc::clone(&metrics), writer(Dataset::Events));
    tasks.push(tokio::spawn(async move {
        sink::run(
            events_in,
            w,
            &mut log,
            CommitOrder::default(),
            &m.sink_events,
        )
        .await
        .map(|_| ())
        .map_err(sink_err("events"))
    }));
    for i in 0..s.shards {
        let input: ObjectRx<FlowBatch> = ObjectRx::new(
            handoff.clone(),
            objects::flows_stream(i),
            Arc::clone(&metrics.handoff),
        );
        let mut log =
            CommitLog::recover(store.clone(), Dataset::Flows, &format!("agg-{i}")).await?;
        let (m, w) = (Arc::clone(&metrics), writer(Dataset::Flows));
        tasks.push(tokio::spawn(async move {
            sink::run(input, w, &mut log, CommitOrder::default(), &m.sink_flows)
                .await
                .map(|_| ())
                .map_err(sink_err("flows"))
        }));
    }
    for t in tasks {
        t.await.map_err(|e| RunError::Panicked(e.to_string()))??;
    }
    Ok(summary(&metrics, started, store.describe()))
}

fn sink_err(dataset: &'static str) -> impl Fn(SinkError) -> RunError {
    move |source| RunError::Sink { dataset, source }
}

fn edge_err(dataset: &'static str) -> impl Fn(EdgeError) -> RunError {
    move |e| RunError::Sink {
        dataset,
        source: SinkError::Edge(e),
    }
}

/// Reads the events stream, hands each node's batches to that node's sink, and acks messages once
/// their rows are committed.
async fn route_events(
    mut input: BrokerRx<Arc<EventBatch>>,
    store: Store,
    s: Settings,
    metrics: Arc<Metrics>,
    through: watch::Sender<u64>,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let bm: Arc<BrokerMetrics> = Arc::clone(&metrics.broker);
    let mut nodes: BTreeMap<Arc<str>, NodeSink> = BTreeMap::new();
    let (commits_tx, mut commits) = mpsc::unbounded_channel::<(Arc<str>, Position)>();
    let mut open: BTreeSet<u64> = BTreeSet::new();
    let mut seen = 0u64;
    loop {
        let delivery = tokio::select! {
            biased;
            Some((node, pos)) = commits.recv() => {
                release_node(&mut nodes, &node, pos, &mut open, &bm).await;
                through.send_replace(log_through(&open, seen));
                continue;
            }
            _ = shutdown.wait() => break,
            d = input.next() => d.map_err(edge_err("events"))?,
        };
        for m in std::mem::take(&mut input.settled) {
            seen = seen.max(stream_seq(&m));
            broker::ack(&bm, &m).await;
        }
        let Some(d) = delivery else { break };
        let sseq = stream_seq(&d.message);
        seen = seen.max(sseq);
        let batch = d.item;
        if !nodes.contains_key(&batch.node) {
            let ns = start_node_sink(&batch.node, &store, &s, &metrics, commits_tx.clone()).await?;
            nodes.insert(Arc::clone(&batch.node), ns);
        }
        let ns = nodes.get_mut(&batch.node).expect("just inserted");
        // Producers store a node's batches in seq order (see `edge::broker`): a jump ahead means
        // events are missing from the stream, and going on would lose them without a trace.
        if let Some(first) = batch.events.first().map(|e| e.seq) {
            if ns.started && first > ns.next_seq {
                return Err(edge_err("events")(EdgeError::Broker(format!(
                    "events {}..{first} of node `{}` are missing from the stream (stream sequence \
                     {sseq} starts at {first}): refusing to write past a gap",
                    ns.next_seq, batch.node
                ))));
            }
            ns.started = true;
        }
        // Rows a commit record (or an earlier delivery) already covers are skipped: redelivery.
        let fresh: Vec<_> = batch
            .events
            .iter()
            .filter(|e| e.seq >= ns.next_seq)
            .copied()
            .collect();
        let skipped = batch.events.len() - fresh.len();
        metrics.broker.redelivered_rows_skipped.add(skipped as u64);
        let Some(last) = fresh.last().map(|e| e.seq) else {
            // All seen before; ack now only if also committed, else once they are.
            let last = batch.events.last().map_or(0, |e| e.seq);
            if batch.events.is_empty() || last < ns.committed {
                broker::ack(&bm, &d.message).await;
            } else {
                ns.unacked.pending.push_back((last, sseq, d.message));
                open.insert(sseq);
            }
            through.send_replace(log_through(&open, seen));
            continue;
        };
        ns.next_seq = last + 1;
        let trimmed = if skipped == 0 {
            batch
        } else {
            Arc::new(EventBatch::new(
                Arc::clone(&batch.node),
                fresh,
                batch.clock_us,
            ))
        };
        ns.tx.send(trimmed).await.map_err(edge_err("events"))?;
        ns.unacked.pending.push_back((last, sseq, d.message));
        open.insert(sseq);
    }
    // End of input or shutdown: every node sink commits what it holds; ack as commits land.
    drop(commits_tx);
    let mut tasks = Vec::new();
    for (node, ns) in std::mem::take(&mut nodes) {
        let NodeSink {
            tx, unacked, task, ..
        } = ns;
        drop(tx);
        tasks.push((node, unacked, task));
    }
    let mut remaining: BTreeMap<Arc<str>, Unacked<u64>> = tasks
        .iter_mut()
        .map(|(n, u, _)| (Arc::clone(n), std::mem::replace(u, Unacked::new())))
        .collect();
    while let Some((node, pos)) = commits.recv().await {
        if let (Some(u), Position::Event { seq }) = (remaining.get_mut(&node), pos) {
            for m in u.release(seq, &mut open) {
                broker::ack(&bm, &m).await;
            }
        }
        through.send_replace(log_through(&open, seen));
    }
    for (_, _, task) in tasks {
        task.await
            .map_err(|e| RunError::Panicked(e.to_string()))?
            .map_err(sink_err("events"))?;
    }
    Ok(())
}

async fn release_node(
    nodes: &mut BTreeMap<Arc<str>, NodeSink>,
    node: &Arc<str>,
    pos: Position,
    open: &mut BTreeSet<u64>,
    bm: &BrokerMetrics,
) {
    if let (Some(ns), Position::Event { seq }) = (nodes.get_mut(node), pos) {
        ns.committed = ns.committed.max(seq + 1);
        for m in ns.unacked.release(seq, open) {
            broker::ack(bm, &m).await;
        }
    }
}

/// Opens one node's event-log sink: its commit log tells where it stands.
async fn start_node_sink(
    node: &Arc<str>,
    store: &Store,
    s: &Settings,
    metrics: &Arc<Metrics>,
    commits: mpsc::UnboundedSender<(Arc<str>, Position)>,
) -> Result<NodeSink, RunError> {
    let mut log = CommitLog::recover(store.clone(), Dataset::Events, node).await?;
    let next_seq = match log.last().map(|r| r.last) {
        Some(Position::Event { seq }) => seq + 1,
        _ => 0,
    };
    let (tx, rx) = memory::channel(
        "broker→events sink",
        s.channel_capacity,
        Arc::clone(&metrics.edges.events_to_sink),
    );
    let writer = RollingWriter::new(
        Dataset::Events.name(),
        Dataset::Events.schema(),
        store.clone(),
        roll_policy(s),
    );
    let (committed, watch_rx) = watch::channel(None);
    forward_commits(Arc::clone(node), watch_rx, commits);
    let m = Arc::clone(metrics);
    let task = tokio::spawn(async move {
        let order = CommitOrder {
            committed: Some(committed),
            after: None,
        };
        sink::run(rx, writer, &mut log, order, &m.sink_events).await
    });
    Ok(NodeSink {
        tx,
        next_seq,
        committed: next_seq,
        started: next_seq > 0,
        unacked: Unacked::new(),
        task,
    })
}

/// Turns a sink's "last committed row" watch into messages on a shared channel.
fn forward_commits<K: Send + Sync + Clone + 'static>(
    key: K,
    mut rx: watch::Receiver<Option<Position>>,
    tx: mpsc::UnboundedSender<(K, Position)>,
) {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let last = *rx.borrow_and_update();
            if let Some(p) = last {
                if tx.send((key.clone(), p)).is_err() {
                    return;
                }
            }
        }
    });
}

/// Reads one shard's flow stream into a flows sink, skipping rows already committed, acking messages
/// once their rows are committed.
async fn route_flows(
    mut input: BrokerRx<FlowBatch>,
    producer: String,
    store: Store,
    s: Settings,
    metrics: Arc<Metrics>,
    log_through: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let bm = Arc::clone(&metrics.broker);
    let mut log = CommitLog::recover(store.clone(), Dataset::Flows, &producer).await?;
    let mut high = match log.last().map(|r| r.last) {
        Some(Position::Flow {
            window_start_us,
            rank,
            ..
        }) => Some((window_start_us, rank)),
        _ => None,
    };
    let (mut tx, rx) = memory::channel(
        "broker→flows sink",
        s.channel_capacity,
        Arc::clone(&metrics.edges.flows_to_sink),
    );
    let writer = RollingWriter::new(
        Dataset::Flows.name(),
        Dataset::Flows.schema(),
        store.clone(),
        roll_policy(&s),
    );
    let (committed, watch_rx) = watch::channel(None);
    let (commits_tx, mut commits) = mpsc::unbounded_channel();
    forward_commits((), watch_rx, commits_tx);
    let m = Arc::clone(&metrics);
    let task = tokio::spawn(async move {
        let order = CommitOrder {
            committed: Some(committed),
            after: Some(log_through),
        };
        sink::run(rx, writer, &mut log, order, &m.sink_flows).await
    });
    let mut unacked: Unacked<(i64, u32)> = Unacked::new();
    // The last committed row: a redelivered message is acked at once only if it is not beyond it.
    let mut committed_through = high;
    let mut open = BTreeSet::new();
    let release =
        |pos: Position, unacked: &mut Unacked<(i64, u32)>, open: &mut BTreeSet<u64>| match pos {
            Position::Flow {
                window_start_us,
                rank,
                ..
            } => unacked.release((window_start_us, rank), open),
            Position::Event { .. } => Vec::new(),
        };
    loop {
        let delivery = tokio::select! {
            biased;
            Some(((), pos)) = commits.recv() => {
                if let Position::Flow { window_start_us, rank, .. } = pos {
                    committed_through = Some((window_start_us, rank));
                }
                for m in release(pos, &mut unacked, &mut open) {
                    broker::ack(&bm, &m).await;
                }
                continue;
            }
            _ = shutdown.wait() => break,
            d = input.next() => d.map_err(edge_err("flows"))?,
        };
        for m in std::mem::take(&mut input.settled) {
            broker::ack(&bm, &m).await;
        }
        let Some(d) = delivery else { break };
        let mut batch = d.item;
        let original_last = match (batch.records.last(), batch.ranks.last()) {
            (Some(r), Some(&k)) => Some((r.window_start_us, k)),
            _ => None,
        };
        let keep: Vec<bool> = batch
            .records
            .iter()
            .zip(&batch.ranks)
            .map(|(r, &k)| high.is_none_or(|h| (r.window_start_us, k) > h))
            .collect();
        let skipped = keep.iter().filter(|k| !**k).count();
        if skipped > 0 {
            metrics.broker.redelivered_rows_skipped.add(skipped as u64);
            let mut it = keep.iter();
            batch.records.retain(|_| *it.next().expect("same length"));
            let mut it = keep.iter();
            batch.ranks.retain(|_| *it.next().expect("same length"));
        }
        let last = match (batch.records.last(), batch.ranks.last()) {
            (Some(r), Some(&k)) => (r.window_start_us, k),
            _ => {
                // All seen before; ack now only if also committed, else once they are.
                match original_last {
                    Some(k) if committed_through.is_none_or(|c| k > c) => {
                        unacked
                            .pending
                            .push_back((k, stream_seq(&d.message), d.message));
                    }
                    _ => broker::ack(&bm, &d.message).await,
                }
                continue;
            }
        };
        high = Some(last);
        let sseq = stream_seq(&d.message);
        tx.send(batch).await.map_err(edge_err("flows"))?;
        unacked.pending.push_back((last, sseq, d.message));
        open.insert(sseq);
    }
    drop(tx);
    while let Some(((), pos)) = commits.recv().await {
        for m in release(pos, &mut unacked, &mut open) {
            broker::ack(&bm, &m).await;
        }
    }
    task.await
        .map_err(|e| RunError::Panicked(e.to_string()))?
        .map_err(sink_err("flows"))?;
    Ok(())
}
