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

use super::{open_output, open_source, open_store, roll_policy, window_config, RunError};
use crate::aggregate::{self, AggregateConfig, Resume};
use crate::capture::{self, CaptureConfig};
use crate::config::Settings;
use crate::edge::broker::{
    self, decode_events_msg, decode_flows_msg, Broker, BrokerRx, Ends, EVENTS_STREAM, FLOWS_STREAM,
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
    let output = broker.events_tx(&s.node, shutdown.clone())?;
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
    let windows = window_config(s);
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
        // The last piece published: its replay point rebuilds what the shard held then, and the
        // emissions go on being numbered after it (a half-published one is superseded).
        Some(Some(last)) => Some(Resume {
            point: last.replay,
            next_emission: last.seq + 1,
        }),
    };
    let from = resume.as_ref().map_or(0, |r| r.point.from_seq);
    if resume.is_some() {
        tracing::info!(from, "rebuilding open windows from the events stream");
    }
    let input = broker.events_from(from).await?;
    let output = broker.flows_tx(shard, shutdown.clone());
    let cfg = AggregateConfig {
        windows,
        producer: format!("agg-{}", shard.index).into(),
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
    unacked: Unacked<u64>,
    task: JoinHandle<Result<SinkStats, SinkError>>,
}

/// `--mode sink`: the event log per node and the flows of every shard, from durable consumers.
///
/// The consumers are named after the output (its id in `_tcplake/output.json`): a sink writing a new
/// output reads the streams from their start, and two sinks writing two outputs each get everything.
/// How many aggregator shards there are is learned from their batches and end markers, never set.
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
    let output_id = crate::lake::output_id(&store).await?;
    let broker = connect(s, &metrics).await?;
    let ack_wait = s.broker.as_ref().and_then(|b| b.ack_wait).unwrap_or(
        // Messages stay unacked while their rows sit in open files: longer than a file stays open.
        s.max_file_age + Duration::from_secs(30),
    );
    let events_in = broker
        .durable(
            EVENTS_STREAM,
            &format!("tcplake-sink-events-{output_id}"),
            "tcplake.events.>",
            ack_wait,
            Box::new(decode_events_msg),
            Ends::AllSeenNodes,
        )
        .await?;
    let flows_in = broker
        .durable(
            FLOWS_STREAM,
            &format!("tcplake-sink-flows-{output_id}"),
            "tcplake.flows.>",
            ack_wait,
            Box::new(decode_flows_msg),
            Ends::AllShards,
        )
        .await?;
    // Everything before the consumer's start was committed by an earlier run of this sink.
    let (through_tx, through_rx) = watch::channel(events_in.start_seq());
    metrics.health.set_ready();
    let events = tokio::spawn(route_events(
        events_in,
        store.clone(),
        s.clone(),
        Arc::clone(&metrics),
        through_tx,
        shutdown.clone(),
    ));
    let flows = tokio::spawn(route_flows(
        flows_in,
        store.clone(),
        s.clone(),
        Arc::clone(&metrics),
        through_rx,
        shutdown.clone(),
    ));
    let mut first_error = None;
    for task in [events, flows] {
        let r = task
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
    let mut log =
        CommitLog::recover(store.clone(), Dataset::Events, &s.node, &Default::default()).await?;
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
    let shards = objects::shard_count(&handoff, &metrics.handoff)
        .await
        .map_err(edge_err("flows"))?;
    for i in 0..shards {
        let input: ObjectRx<FlowBatch> = ObjectRx::new(
            handoff.clone(),
            objects::flows_stream(i),
            Arc::clone(&metrics.handoff),
        );
        let mut log = CommitLog::recover(
            store.clone(),
            Dataset::Flows,
            &format!("agg-{i}"),
            &Default::default(),
        )
        .await?;
        let (m, w) = (Arc::clone(&metrics), writer(Dataset::Flows));
        let policy = roll_policy(s);
        tasks.push(tokio::spawn(async move {
            sink::run_flows(
                input,
                w,
                &mut log,
                CommitOrder::default(),
                policy,
                &m.sink_flows,
            )
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
    // Messages before the consumer's start were committed by an earlier run of this sink.
    let mut seen = input.start_seq().saturating_sub(1);
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
            if first > ns.next_seq {
                let why = if ns.next_seq == 0 {
                    format!(
                        "this output holds no events of node `{}` yet, but the first of them the \
                         stream still delivers is seq {first} (stream sequence {sseq}): events \
                         0..{first} were removed by the stream's retention, so this output cannot \
                         hold the node's log from its start (write to the output that holds them, \
                         or replay that output into a new one)",
                        batch.node
                    )
                } else {
                    format!(
                        "events {}..{first} of node `{}` are missing from this sink's deliveries \
                         (stream sequence {sseq} starts at {first}): refusing to write past a gap; \
                         is a second sink consuming for the same output? (it takes a share of the \
                         messages: run one sink per output)",
                        ns.next_seq, batch.node
                    )
                };
                return Err(edge_err("events")(EdgeError::Broker(why)));
            }
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
    let mut log =
        CommitLog::recover(store.clone(), Dataset::Events, node, &Default::default()).await?;
    let next_seq = match log.last() {
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

/// The flows sink of one aggregator shard, fed by the router.
struct ShardSink {
    tx: memory::MemoryTx<FlowBatch>,
    /// Emissions up to this one were handed to the sink whole (or committed before this run).
    done: Option<u64>,
    /// The last emission committed.
    committed: Option<u64>,
    /// Pieces of the emission being put back together (the broker carries large ones in pieces).
    partial: Option<FlowBatch>,
    unacked: Unacked<u64>,
    task: JoinHandle<Result<SinkStats, SinkError>>,
}

/// Reads every shard's flows (one consumer on `tcplake.flows.>`) into one flows sink per producer:
/// puts emissions cut into pieces back together, skips emissions already handed over or committed
/// (redeliveries), and acks messages once their emission is committed. The shard count comes from the
/// batches: aggregators that disagree on it stop the sink with an error naming them.
async fn route_flows(
    mut input: BrokerRx<FlowBatch>,
    store: Store,
    s: Settings,
    metrics: Arc<Metrics>,
    log_through: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let bm = Arc::clone(&metrics.broker);
    let mut shards: BTreeMap<Arc<str>, ShardSink> = BTreeMap::new();
    // (producer, count) of the first batch that said how many shards there are.
    let mut count: Option<(Arc<str>, u32)> = None;
    let (commits_tx, mut commits) = mpsc::unbounded_channel::<(Arc<str>, Position)>();
    let mut open = BTreeSet::new();
    loop {
        let delivery = tokio::select! {
            biased;
            Some((producer, pos)) = commits.recv() => {
                if let (Some(sh), Position::Flow { emission, .. }) = (shards.get_mut(&producer), pos) {
                    sh.committed = Some(emission);
                    for m in sh.unacked.release(emission, &mut open) {
                        broker::ack(&bm, &m).await;
                    }
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
        let piece = d.item;
        check_shard_count(&mut count, &piece).map_err(edge_err("flows"))?;
        let producer = Arc::clone(&piece.producer);
        if !shards.contains_key(&producer) {
            let sh = start_shard_sink(
                &producer,
                &store,
                &s,
                &metrics,
                log_through.clone(),
                commits_tx.clone(),
            )
            .await?;
            shards.insert(Arc::clone(&producer), sh);
        }
        let sh = shards.get_mut(&producer).expect("just inserted");
        let sseq = stream_seq(&d.message);
        let emission = piece.seq;
        let keep =
            |sh: &mut ShardSink, m: async_nats::jetstream::Message, open: &mut BTreeSet<u64>| {
                sh.unacked.pending.push_back((emission, sseq, m));
                open.insert(sseq);
            };
        if sh.done.is_some_and(|done| emission <= done) {
            // Delivered again (a redelivery, or an aggregator re-publishing after a restart).
            metrics
                .broker
                .redelivered_rows_skipped
                .add(piece.records.len() as u64);
            if sh.committed.is_some_and(|c| emission <= c) {
                broker::ack(&bm, &d.message).await;
            } else {
                keep(sh, d.message, &mut open);
            }
            continue;
        }
        let next_row = sh
            .partial
            .as_ref()
            .filter(|p| p.seq == emission)
            .map_or(0, |p| p.first_row as usize + p.records.len());
        if (piece.first_row as usize) < next_row {
            // A piece received before: redelivered.
            metrics
                .broker
                .redelivered_rows_skipped
                .add(piece.records.len() as u64);
            keep(sh, d.message, &mut open);
            continue;
        }
        if piece.first_row as usize > next_row {
            return Err(edge_err("flows")(EdgeError::Broker(format!(
                "emission {emission} of `{producer}`: rows {next_row}..{} are missing from the stream \
                 (stream sequence {sseq}): refusing to write past a gap",
                piece.first_row
            ))));
        }
        // An emission a restarted aggregator abandoned half-published is superseded by its rebuild.
        let mut whole = match sh.partial.take() {
            Some(mut p) if p.seq == emission => {
                p.records.extend(piece.records);
                p
            }
            _ => piece,
        };
        keep(sh, d.message, &mut open);
        if whole.completes() {
            whole.first_row = 0;
            sh.done = Some(emission);
            sh.tx.send(whole).await.map_err(edge_err("flows"))?;
        } else {
            sh.partial = Some(whole);
        }
    }
    // End of input or shutdown: every shard's sink commits what it holds; ack as commits land.
    drop(commits_tx);
    let mut tasks = Vec::new();
    let mut remaining: BTreeMap<Arc<str>, Unacked<u64>> = BTreeMap::new();
    for (producer, sh) in std::mem::take(&mut shards) {
        drop(sh.tx);
        remaining.insert(Arc::clone(&producer), sh.unacked);
        tasks.push(sh.task);
    }
    while let Some((producer, pos)) = commits.recv().await {
        if let (Some(u), Position::Flow { emission, .. }) = (remaining.get_mut(&producer), pos) {
            for m in u.release(emission, &mut open) {
                broker::ack(&bm, &m).await;
            }
        }
    }
    for task in tasks {
        task.await
            .map_err(|e| RunError::Panicked(e.to_string()))?
            .map_err(sink_err("flows"))?;
    }
    Ok(())
}

/// Every aggregator must say the same shard count (`--shard I/N`), and its index must be below it.
fn check_shard_count(count: &mut Option<(Arc<str>, u32)>, b: &FlowBatch) -> Result<(), EdgeError> {
    if b.shard_count == 0 {
        return Ok(()); // a message of an older build, which did not say
    }
    match count {
        Some((first, n)) if *n != b.shard_count => Err(EdgeError::Broker(format!(
            "the aggregators disagree on how many shards there are: `{first}` runs as one of {n}, \
             `{}` as one of {}; every aggregator of a deployment must run with the same N in --shard I/N",
            b.producer, b.shard_count
        ))),
        Some(_) => Ok(()),
        None => {
            *count = Some((Arc::clone(&b.producer), b.shard_count));
            Ok(())
        }
    }
}

/// Opens one shard's flows sink: its commit log tells where it stands.
async fn start_shard_sink(
    producer: &Arc<str>,
    store: &Store,
    s: &Settings,
    metrics: &Arc<Metrics>,
    log_through: watch::Receiver<u64>,
    commits: mpsc::UnboundedSender<(Arc<str>, Position)>,
) -> Result<ShardSink, RunError> {
    let mut log =
        CommitLog::recover(store.clone(), Dataset::Flows, producer, &Default::default()).await?;
    let committed = match log.last() {
        Some(Position::Flow { emission, .. }) => Some(emission),
        _ => None,
    };
    let (tx, rx) = memory::channel(
        "broker→flows sink",
        s.channel_capacity,
        Arc::clone(&metrics.edges.flows_to_sink),
    );
    let writer = RollingWriter::new(
        Dataset::Flows.name(),
        Dataset::Flows.schema(),
        store.clone(),
        roll_policy(s),
    );
    let (committed_tx, watch_rx) = watch::channel(None);
    forward_commits(Arc::clone(producer), watch_rx, commits);
    let m = Arc::clone(metrics);
    let policy = roll_policy(s);
    let task = tokio::spawn(async move {
        let order = CommitOrder {
            committed: Some(committed_tx),
            after: Some(log_through),
        };
        sink::run_flows(rx, writer, &mut log, order, policy, &m.sink_flows).await
    });
    Ok(ShardSink {
        tx,
        done: committed,
        committed,
        partial: None,
        unacked: Unacked::new(),
        task,
    })
}
