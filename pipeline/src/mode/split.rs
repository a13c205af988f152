//! Split modes: one stage per process, joined by the broker. The stage code is the monolith's; only the
//! edges differ, plus the bookkeeping that turns at-least-once delivery into exactly-once output:
//!
//! * capture continues after the last event its node published;
//! * an aggregator's last published flow batch is its checkpoint: it replays the events stream from
//!   that batch's replay point and skips the rows it already published;
//! * the sink hands each delivery's ack ([`crate::edge::Ack`]) to the sink stage with its rows, which
//!   releases it once the file holding them is committed, and skips rows a commit record says are
//!   already written (redelivery after a crash or a lost ack). No broker type is known here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{open_output, open_source, open_store, roll_policy, window_config, RunError};
use crate::aggregate::{self, AggregateConfig, Resume};
use crate::capture::{self, AnySource, CaptureConfig};
use crate::config::Settings;
use crate::edge::broker::{
    decode_events_msg, decode_flows_msg, Broker, BrokerRx, Claimed, Ends, NodeProgress,
    EVENTS_STREAM, FLOWS_STREAM,
};
use crate::edge::objects::{self, ObjectRx, ObjectTx};
use crate::edge::{check_windows, memory, Ack, EdgeError, Finalized, StreamFault, Tx};
use crate::event::flow::WindowConfig;
use crate::event::{EventBatch, FlowBatch};
use crate::lake::producer::{flows_properties, Properties, SOURCE_PROPERTY};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::{
    self, CommitLog, CommitOrder, Dataset, Position, RollingWriter, SinkError, SinkStats, Store,
};
use crate::summary::{HandsOver, Summary};

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

/// The summary of a capture or an aggregator, which hand over to `to` and write no output.
fn handed_over(stage: HandsOver, metrics: &Metrics, started: Instant, to: String) -> Summary {
    Summary {
        hands_over: Some(stage),
        ..summary(metrics, started, to)
    }
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
        let identity = super::source_identity(s, &source);
        objects::start_run(&store, &s.node, &identity, &metrics.handoff)
            .await
            .map_err(edge_err("events"))?;
        let output = ObjectTx::new(
            store.clone(),
            objects::events_stream(&s.node),
            Arc::clone(&metrics.handoff),
        );
        metrics.health.set_ready();
        capture::run(cfg, source, output, shutdown, &metrics.capture).await?;
        return Ok(handed_over(
            HandsOver::Capture,
            &metrics,
            started,
            store.describe(),
        ));
    }
    let broker = connect(s, &metrics).await?;
    // Before the node's progress is read: partitions missing a share of its last messages get it.
    let repaired = crate::edge::partitioned::repair(&broker, &s.node, shutdown.clone())
        .await
        .map_err(edge_err("events"))?;
    if repaired > 0 {
        tracing::info!(
            repaired,
            "published the partition shares of node messages an earlier capture had not"
        );
    }
    let (progress, run_started) = match broker.capture_progress(&s.node).await? {
        NodeProgress::Ended => {
            tracing::info!(node = %s.node, "this node's event stream already ended; nothing to do");
            return Ok(handed_over(
                HandsOver::Capture,
                &metrics,
                started,
                s.broker_url(),
            ));
        }
        NodeProgress::Next {
            next,
            run_start,
            source,
        } => (Some((next, source)), !run_start),
        NodeProgress::Nothing => (None, false),
    };
    let mut source = open_source(s, &node, &metrics).await?;
    // The settings that decide what is recorded: a restart with others would continue the node's
    // stream with another kind of events (the monolith checks the same against its table).
    let identity = super::source_identity(s, &source);
    let stream = format!("{:016x}", crate::lake::producer::source_hash(&identity));
    let progress = match progress {
        Some((_, Some(held))) if held != stream => {
            return Err(crate::edge::broker::BrokerError::SourceChanged {
                node: s.node.clone(),
                run: identity,
            }
            .into())
        }
        Some((next, _)) => Some(next),
        None => None,
    };
    let resume_seq = match progress {
        Some(next) => {
            tracing::info!(
                resume_seq = next,
                "continuing after the last event this node published"
            );
            next
        }
        None => {
            let first = run_start_seq(&source);
            tracing::info!(
                first_seq = first,
                "nothing of this node on the stream: a new run, numbered from {first}"
            );
            first
        }
    };
    source.resume_at(resume_seq);
    let mut output = broker.events_tx(&s.node, resume_seq, stream, shutdown.clone())?;
    // A new run, or one whose earlier process sent no rows: its first rows are marked as a run's.
    if !run_started {
        output = output.starting_run();
    }
    metrics.health.set_ready();
    capture::run(cfg, source, output, shutdown, &metrics.capture).await?;
    let mut sum = handed_over(HandsOver::Capture, &metrics, started, s.broker_url());
    sum.resumed_at_seq = progress.unwrap_or(0);
    Ok(sum)
}

/// Where a capture run numbers its events when the stream holds nothing of its node: a first run, or
/// one after retention (`broker.max_age`) or a purge removed the node's messages. A source that
/// regenerates its events from their `seq` (synthetic, a replay) starts at 0: what the output already
/// holds comes again, and the sink skips it as redelivered. Live events are new whatever their number,
/// and starting at 0 again would have the sink take them for the ones it committed under those
/// numbers and drop them: they are numbered from the current time in nanoseconds instead, above
/// anything an earlier run can have used (it would have had to average more than a billion events a
/// second; in microseconds a node averaging a million, a busy load balancer, could have overtaken the
/// clock), and the run's first message says so, so the sink takes the jump for a new run, not a gap.
/// (`seq` is a signed 64-bit column: nanoseconds since 1970 fit until 2262.)
fn run_start_seq(source: &AnySource) -> u64 {
    match source {
        AnySource::Ebpf(_) => chrono::Utc::now()
            .timestamp_nanos_opt()
            .and_then(|ns| u64::try_from(ns).ok())
            .unwrap_or(0),
        AnySource::Synthetic(_) | AnySource::Recorded(_) => 0,
    }
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
        // Reads the hand-off objects of this process's --node: over this edge every node has a pipeline.
        let input: ObjectRx<Arc<EventBatch>> = ObjectRx::new(
            store.clone(),
            objects::events_stream(&s.node),
            Arc::clone(&metrics.handoff),
        );
        let output = ObjectTx::new(
            store.clone(),
            objects::flows_stream(&s.node, shard.index),
            Arc::clone(&metrics.handoff),
        );
        let cfg = AggregateConfig {
            windows,
            producer: objects::flows_producer(&s.node, shard.index).into(),
            resume: None,
            shard,
        };
        metrics.health.set_ready();
        aggregate::run(cfg, input, output, &metrics.aggregate)
            .await
            .map_err(RunError::Aggregate)?;
        return Ok(handed_over(
            HandsOver::Aggregate,
            &metrics,
            started,
            store.describe(),
        ));
    }
    let broker = connect(s, &metrics).await?;
    let partitions = broker.partitions();
    // Partitioned, the flows are sharded by partition, and the N aggregators share the partitions
    // (k with k mod N = I): N can change from one run of the tier to the next, even while capture
    // runs, as each partition is claimed by one aggregator at a time. Unpartitioned, each of the N
    // aggregators is one shard.
    let (shards, owned): (u32, Vec<u32>) = if partitions > 1 {
        if shard.count > partitions {
            return Err(crate::edge::broker::BrokerError::ShardsNotPartitions {
                index: shard.index,
                count: shard.count,
                partitions,
            }
            .into());
        }
        let owned = (0..partitions)
            .filter(|k| k % shard.count == shard.index)
            .collect();
        (partitions, owned)
    } else {
        (shard.count, vec![shard.index])
    };
    // Who claims the shards: unique per process, so two processes told the same --shard are told
    // apart on the subjects.
    let owner = format!(
        "{}/{} pid {} at {}",
        shard.index,
        shard.count,
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let tier = Arc::new(Tier {
        broker,
        partitions,
        windows,
        owner,
        shutdown: shutdown.clone(),
        metrics: Arc::clone(&metrics),
        owned: owned.len(),
        opened: AtomicU64::new(0),
        from: AtomicU64::new(u64::MAX),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for k in owned.iter().copied() {
        let shard = aggregate::Shard {
            index: k,
            count: shards,
        };
        tasks.spawn(run_shard(Arc::clone(&tier), shard));
    }
    let mut claimed_away = 0;
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => break,
                Some(r) => {
                    if let ShardEnd::ClaimedAway = r.map_err(RunError::Panicked)?? {
                        claimed_away += 1;
                    }
                }
            },
            _ = shutdown.wait() => {
                // Open windows are not flushed half-full: a restart rebuilds them from the stream.
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                tracing::info!("stopped; open windows will be rebuilt from the events stream on restart");
                break;
            }
        }
    }
    if claimed_away == owned.len() && !shutdown.is_triggered() {
        // Exiting would have a supervisor restart it with the same --shard, and it would claim its
        // shards back from the aggregators that took them, and so on: it waits to be stopped instead.
        let why = "every shard of this aggregator was claimed by another aggregator";
        tracing::warn!(
            "{why} (--shard {}/{}): the tier was resized, or another process runs with the same \
             --shard; nothing is lost, and this one waits to be stopped",
            shard.index,
            shard.count
        );
        metrics.health.set_not_ready(why);
        shutdown.wait().await;
    }
    let mut sum = handed_over(HandsOver::Aggregate, &metrics, started, s.broker_url());
    sum.resumed_at_seq = match tier.from.load(Ordering::Relaxed) {
        u64::MAX => 0,
        from => from,
    };
    Ok(sum)
}

/// What the shards of one aggregator process share, and how far they have started: the process is
/// ready once every one reads its input.
struct Tier {
    broker: Broker,
    partitions: u32,
    windows: WindowConfig,
    /// Who claims the shards (see `aggregate`).
    owner: String,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    owned: usize,
    opened: AtomicU64,
    /// The lowest stream position a shard rebuilds from.
    from: AtomicU64,
}

impl Tier {
    /// One more shard reads its input from stream position `from` (`None`: it has nothing to do).
    fn opened(&self, from: Option<u64>) {
        if let Some(from) = from {
            self.from.fetch_min(from, Ordering::Relaxed);
        }
        if self.opened.fetch_add(1, Ordering::AcqRel) + 1 == self.owned as u64 {
            self.metrics.health.set_ready();
        }
    }
}

/// How one shard's aggregation ended.
enum ShardEnd {
    /// Its input ended (or it had ended before).
    Done,
    /// Another aggregator claimed the shard (the tier was resized): it continues the shard.
    ClaimedAway,
}

/// Claims `shard`'s flows, rebuilds what it held from the events (its partition, when partitioned)
/// and aggregates until the input ends or another aggregator claims the shard.
async fn run_shard(tier: Arc<Tier>, shard: aggregate::Shard) -> Result<ShardEnd, RunError> {
    let (broker, partitions, k) = (&tier.broker, tier.partitions, shard.index);
    let (last, claim) = match broker.claim_shard(k, shard.count, &tier.owner).await? {
        Claimed::Ended => {
            tracing::info!(
                shard = k,
                "this shard's flow stream already ended; nothing to do"
            );
            tier.opened(None);
            return Ok(ShardEnd::Done);
        }
        Claimed::From { last, claim } => (last, claim),
    };
    // The last piece published before the claim: its replay point rebuilds what the shard held then,
    // and the emissions go on being numbered after it (a half-published one is superseded).
    let resume = last.map(|last| Resume {
        point: last.replay,
        next_emission: last.seq + 1,
    });
    // A rebuild from the stream's start (the checkpoint before an aggregator's first emission) starts
    // at 1, so that retention having removed the start is noticed as for any other replay point.
    let from = resume.as_ref().map_or(0, |r| r.point.from_seq.max(1));
    if resume.is_some() {
        match partitions {
            1 => tracing::info!(
                from,
                shard = k,
                "rebuilding open windows from the events stream"
            ),
            _ => tracing::info!(
                from,
                partition = k,
                "rebuilding open windows from this shard's partition"
            ),
        }
    }
    // Partitioned, the shard reads its partition only; positions are on the partitions stream.
    let input = match partitions {
        1 => broker.events_from(from).await?,
        _ => broker.partition_from(k, from).await?,
    };
    tier.opened(Some(from));
    let output = broker
        .flows_tx(k, shard.count, tier.shutdown.clone())
        .after_claim(claim);
    let cfg = AggregateConfig {
        windows: tier.windows,
        producer: format!("agg-{k}").into(),
        resume,
        shard,
    };
    match aggregate::run(cfg, input, output, &tier.metrics.aggregate).await {
        Ok(_) => Ok(ShardEnd::Done),
        Err(EdgeError::Stream(StreamFault::Foreign { seq, .. })) => {
            tracing::warn!(
                shard = k,
                seq,
                "another aggregator claimed this shard (the tier was resized or restarted); leaving \
                 it to that one"
            );
            Ok(ShardEnd::ClaimedAway)
        }
        Err(e) => Err(RunError::Aggregate(e)),
    }
}

/// Which deliveries of the events stream are not yet committed, and so how far the event log is
/// committed on the stream: every message before [`LogProgress::through`] is in committed files (or
/// carried nothing to write). The flows sink waits for it.
struct LogProgress {
    open: std::sync::Mutex<BTreeSet<u64>>,
    seen: AtomicU64,
    through: watch::Sender<u64>,
}

impl LogProgress {
    /// Messages before `start` were committed by an earlier run of the consumer.
    fn new(start: u64) -> (Arc<Self>, watch::Receiver<u64>) {
        let (through, rx) = watch::channel(start);
        let p = LogProgress {
            open: Default::default(),
            seen: AtomicU64::new(start.saturating_sub(1)),
            through,
        };
        (Arc::new(p), rx)
    }

    fn saw(&self, position: u64) {
        self.seen.fetch_max(position, Ordering::SeqCst);
    }

    /// Publishes the committed position (it only grows: a redelivery of committed rows is no news).
    fn publish(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let t = open
            .first()
            .copied()
            .unwrap_or(self.seen.load(Ordering::SeqCst) + 1);
        self.through
            .send_if_modified(|v| std::mem::replace(v, (*v).max(t)) < t);
    }

    /// The ack of an events delivery, which also counts the delivery committed once released.
    fn track(self: &Arc<Self>, ack: Ack) -> Ack {
        let position = ack.position();
        {
            // Open before seen, under the lock `publish` reads both with: a release racing this never
            // computes a position past the delivery from `seen` alone.
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.insert(position);
            self.saw(position);
        }
        let this = Arc::clone(self);
        Ack::new(position, move || {
            async move {
                this.open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&position);
                this.publish();
                ack.release().await;
            }
            .boxed()
        })
    }
}

/// The event-log sink of one node, fed by the router.
struct NodeSink {
    tx: memory::MemoryTx<Finalized<Arc<EventBatch>>>,
    /// Next `seq` not yet handed to the sink (rows before it are skipped: redelivered).
    next_seq: u64,
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
    let part = s.sink_part;
    crate::sink::part::claim(&store, part).await?;
    let broker = connect(s, &metrics).await?;
    let ack_wait = s.broker.as_ref().and_then(|b| b.ack_wait).unwrap_or(
        // Messages stay unacked while their rows sit in open files: longer than a file stays open.
        s.max_file_age + Duration::from_secs(30),
    );
    let mut events_in = broker
        .durable(
            EVENTS_STREAM,
            &format!("tcplake-sink-events-{output_id}{}", part.suffix()),
            "tcplake.events.>",
            ack_wait,
            Box::new(decode_events_msg),
            Ends::AllSeenNodes,
        )
        .await?;
    let mut flows_in = broker
        .durable(
            FLOWS_STREAM,
            &format!("tcplake-sink-flows-{output_id}{}", part.suffix()),
            "tcplake.flows.>",
            ack_wait,
            Box::new(decode_flows_msg),
            Ends::AllShards,
        )
        .await?;
    if !part.is_all() {
        events_in.keep_only(move |n| part.owns_node(n), move |i| part.owns_shard(i));
        flows_in.keep_only(move |n| part.owns_node(n), move |i| part.owns_shard(i));
        tracing::info!(
            part = %format_args!("{}/{}", part.index, part.count),
            "writing the event logs of the nodes and the flows of the shards of this sink part"
        );
    }
    // Everything before the consumer's start was committed by an earlier run of this sink.
    let (progress, through_rx) = LogProgress::new(events_in.start_seq());
    metrics.health.set_ready();
    // A route that fails stops the other (which commits what it holds), so the sink exits with the
    // error at once instead of sitting there, ready and silent, until it is signalled.
    let (stop, stopped) = crate::shutdown::channel();
    let forward = {
        let (stop, mut shutdown) = (stop.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.wait().await;
            stop.trigger();
        })
    };
    let events = spawn_route(
        route_events(
            events_in,
            store.clone(),
            s.clone(),
            Arc::clone(&metrics),
            progress,
            stopped.clone(),
        ),
        stop.clone(),
    );
    // One sink writes the event log itself and follows its commits in memory; a sharded one reads
    // them from the table (other parts write some of the nodes' logs).
    // Partitioned, flows name positions on the partitions stream, not on the events stream this
    // sink follows: they wait for the table too.
    let log_committed = match part.is_all() && broker.partitions() == 1 {
        true => LogCommitted::Here(through_rx),
        false => LogCommitted::Table(stopped.clone()),
    };
    let flows = spawn_route(
        route_flows(
            flows_in,
            store.clone(),
            s.clone(),
            Arc::clone(&metrics),
            log_committed,
            stopped,
        ),
        stop.clone(),
    );
    let mut first_error = None;
    for task in [events, flows] {
        let r = task.await.map_err(RunError::Panicked).and_then(|r| r);
        if let (None, Err(e)) = (&first_error, r) {
            first_error = Some(e);
        }
    }
    forward.abort();
    // Also after an error: the acks released before it are for committed rows.
    broker.settle().await;
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(summary(&metrics, started, store.describe()))
}

/// Spawns one of the sink's routes; if it fails or panics it fires `stop`, so the other route commits
/// what it holds and ends.
fn spawn_route<F>(route: F, stop: crate::shutdown::Trigger) -> JoinHandle<Result<(), RunError>>
where
    F: std::future::Future<Output = Result<(), RunError>> + Send + 'static,
{
    // Fires unless disarmed: on an error, and on a panic (the future is dropped while unwinding).
    struct StopUnlessOk(Option<crate::shutdown::Trigger>);
    impl Drop for StopUnlessOk {
        fn drop(&mut self) {
            if let Some(t) = self.0.take() {
                t.trigger();
            }
        }
    }
    tokio::spawn(async move {
        let mut guard = StopUnlessOk(Some(stop));
        let r = route.await;
        if r.is_ok() {
            guard.0 = None;
        }
        r
    })
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
    let writer = |ds: Dataset| RollingWriter::new(ds, store.clone(), roll_policy(s));
    let mut tasks = tokio::task::JoinSet::new();
    // Every commit records the hand-off run it came from: an output continued from another run (a
    // new hand-off location numbers its objects and events from the first again) is refused rather
    // than its rows skipped as already held.
    let run = objects::run_of(&handoff, &s.node, &metrics.handoff)
        .await
        .map_err(edge_err("events"))?;
    let source = Properties::from([(
        SOURCE_PROPERTY.to_string(),
        format!("object-store hand-off run {run}"),
    )]);
    let mut log = CommitLog::recover(store.clone(), Dataset::Events, &s.node, &source).await?;
    // The store keeps every object: a restarted sink reads the streams again from the first and
    // skips what its output holds.
    let next_seq = next_event_seq(&log);
    if next_seq > 0 {
        tracing::info!(
            node = %s.node,
            next_seq,
            "resuming: the hand-off's events up to the last committed one are skipped"
        );
    }
    let (events_in, events_committed) = objects::CommittedEvents::new(
        ObjectRx::new(
            handoff.clone(),
            objects::events_stream(&s.node),
            Arc::clone(&metrics.handoff),
        ),
        next_seq,
    );
    let (m, w) = (Arc::clone(&metrics), writer(Dataset::Events));
    tasks.spawn(async move {
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
    });
    let (shards, first) = objects::shard_count(&handoff, &s.node, &metrics.handoff)
        .await
        .map_err(edge_err("flows"))?;
    // What shard 0's first batch says its rows were made with: the table and every shard are held
    // to it (or, if it said nothing, to what the first shard that does says).
    let mut props = first
        .as_ref()
        .map(|(_, w)| flows_properties(w))
        .unwrap_or_default();
    props.extend(source);
    let windows = Arc::new(std::sync::Mutex::new(first));
    for i in 0..shards {
        let mut log = CommitLog::recover(
            store.clone(),
            Dataset::Flows,
            &objects::flows_producer(&s.node, i),
            &props,
        )
        .await?;
        let input = objects::CommittedFlows::new(
            ObjectRx::new(
                handoff.clone(),
                objects::flows_stream(&s.node, i),
                Arc::clone(&metrics.handoff),
            ),
            last_emission(&log),
            Arc::clone(&windows),
        );
        let (m, w) = (Arc::clone(&metrics), writer(Dataset::Flows));
        let policy = roll_policy(s);
        // Flows are committed only once the events they count are (as in every other mode).
        let order = CommitOrder {
            after: Some(events_committed.clone()),
            table: None,
        };
        tasks.spawn(async move {
            sink::run_flows(input, w, &mut log, order, policy, &m.sink_flows)
                .await
                .map(|_| ())
                .map_err(sink_err("flows"))
        });
    }
    // The first failure stops the sink at once (the others may wait for ever on a live capture).
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(RunError::Panicked).and_then(|r| r) {
            tasks.abort_all();
            return Err(e);
        }
    }
    Ok(summary(&metrics, started, store.describe()))
}

/// The `seq` after the last event of a node's log committed to the output (0: none yet).
fn next_event_seq(log: &CommitLog) -> u64 {
    match log.last() {
        Some(Position::Event { seq }) => seq + 1,
        _ => 0,
    }
}

/// The last emission of a flows producer committed to the output, if any.
fn last_emission(log: &CommitLog) -> Option<u64> {
    match log.last() {
        Some(Position::Flow { emission, .. }) => Some(emission),
        _ => None,
    }
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

/// Reads the events stream and hands each node's batches, with their acks, to that node's sink, which
/// releases them once their rows are committed.
async fn route_events(
    mut input: BrokerRx<Arc<EventBatch>>,
    store: Store,
    s: Settings,
    metrics: Arc<Metrics>,
    progress: Arc<LogProgress>,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let mut nodes: BTreeMap<Arc<str>, NodeSink> = BTreeMap::new();
    loop {
        let delivery = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            d = input.next() => d.map_err(edge_err("events"))?,
        };
        for ack in std::mem::take(&mut input.settled) {
            progress.saw(ack.position());
            ack.release().await;
        }
        progress.publish();
        let Some(d) = delivery else { break };
        let sseq = d.ack.position();
        let run_start = d.run_start;
        let ack = progress.track(d.ack);
        let batch = d.item;
        if !nodes.contains_key(&batch.node) {
            let ns = start_node_sink(&batch.node, &store, &s, &metrics).await?;
            nodes.insert(Arc::clone(&batch.node), ns);
        }
        let ns = nodes.get_mut(&batch.node).expect("just inserted");
        // Producers store a node's batches in seq order (see `edge::broker`): a jump ahead means
        // events are missing from the stream, and going on would lose them without a trace.
        if let Some(first) = batch.events.first().map(|e| e.seq) {
            if first > ns.next_seq && run_start {
                // A live capture started a run with nothing of its node left on the stream: it
                // numbers its events from the clock (see `run_start_seq`). Whether the broker removed
                // messages of the earlier run before this sink took them cannot be told here: said.
                if ns.next_seq > 0 {
                    tracing::warn!(
                        node = %batch.node,
                        first,
                        committed_before = ns.next_seq,
                        "a new capture run of this node after rows of it were committed here: \
                         events it published between those and the broker losing its messages, if \
                         any, are missing from this output (this cannot be told here)"
                    );
                } else {
                    tracing::info!(node = %batch.node, first, "a new capture run of this node");
                }
            } else if run_start && first < ns.next_seq {
                // A redelivered first message of a run (the sink stopped before it acked it), or a
                // new run numbered below what was committed (its clock went back): the overlap is
                // skipped either way, and which one it was cannot be told here, so it is said.
                tracing::warn!(
                    node = %batch.node,
                    first,
                    committed_before = ns.next_seq,
                    "a capture run's first message starts below what this sink committed of the node: \
                     its rows up to there are skipped as redelivered (right for a redelivery, and for a \
                     synthetic or replayed source, which regenerates the same events; for a live \
                     capture whose clock went back before it started a new run, they are new events, \
                     lost)"
                );
            } else if first > ns.next_seq {
                let fault = if ns.next_seq == 0 {
                    StreamFault::Retained {
                        node: batch.node.to_string(),
                        first,
                        stream_seq: sseq,
                    }
                } else {
                    StreamFault::EventGap {
                        node: batch.node.to_string(),
                        next: ns.next_seq,
                        first,
                        stream_seq: sseq,
                    }
                };
                return Err(edge_err("events")(fault.into()));
            }
        }
        // Rows a commit (or an earlier delivery) already covers are skipped: redelivery.
        let (skipped, fresh) = batch.unheld(ns.next_seq);
        metrics.broker.redelivered_rows_skipped.add(skipped as u64);
        let Some(fresh) = fresh else {
            // All handed over before: the sink releases the ack once those rows are committed.
            let acks = Finalized::acks(vec![ack]);
            ns.tx.send(acks).await.map_err(edge_err("events"))?;
            continue;
        };
        ns.next_seq = fresh.events.last().map_or(ns.next_seq, |e| e.seq + 1);
        ns.tx
            .send(Finalized::new(fresh, ack))
            .await
            .map_err(edge_err("events"))?;
    }
    // End of input or shutdown: every node sink commits what it holds and releases its acks.
    let mut tasks = Vec::new();
    for (_, ns) in std::mem::take(&mut nodes) {
        drop(ns.tx);
        tasks.push(ns.task);
    }
    for task in tasks {
        task.await
            .map_err(RunError::Panicked)?
            .map_err(sink_err("events"))?;
    }
    Ok(())
}

/// Opens one node's event-log sink: its commit log tells where it stands.
async fn start_node_sink(
    node: &Arc<str>,
    store: &Store,
    s: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<NodeSink, RunError> {
    let mut log =
        CommitLog::recover(store.clone(), Dataset::Events, node, &Default::default()).await?;
    let next_seq = next_event_seq(&log);
    let (tx, rx) = memory::channel(
        "broker→events sink",
        s.channel_capacity,
        Arc::clone(&metrics.edges.events_to_sink),
    );
    let writer = RollingWriter::new(Dataset::Events, store.clone(), roll_policy(s));
    let m = Arc::clone(metrics);
    let task = tokio::spawn(async move {
        sink::run(rx, writer, &mut log, CommitOrder::default(), &m.sink_events).await
    });
    Ok(NodeSink { tx, next_seq, task })
}

/// The flows sink of one aggregator shard, fed by the router.
struct ShardSink {
    tx: memory::MemoryTx<Finalized<FlowBatch>>,
    /// Emissions up to this one were handed to the sink whole (or committed before this run).
    done: Option<u64>,
    /// Pieces of the emission being put back together (the broker carries large ones in pieces),
    /// and their acks.
    partial: Option<FlowBatch>,
    piece_acks: Vec<Ack>,
    task: JoinHandle<Result<SinkStats, SinkError>>,
}

/// Reads every shard's flows (one consumer on `tcplake.flows.>`) into one flows sink per producer:
/// puts emissions cut into pieces back together, skips emissions already handed over or committed
/// (redeliveries), and hands each emission over with the acks of its pieces. The shard count comes
/// from the batches: aggregators that disagree on it stop the sink with an error naming them.
async fn route_flows(
    mut input: BrokerRx<FlowBatch>,
    store: Store,
    s: Settings,
    metrics: Arc<Metrics>,
    log_committed: LogCommitted,
    mut shutdown: Shutdown,
) -> Result<(), RunError> {
    let mut shards: BTreeMap<Arc<str>, ShardSink> = BTreeMap::new();
    // (producer, count) of the first batch that said how many shards there are.
    let mut count: Option<(Arc<str>, u32)> = None;
    // (producer, settings) of the first batch that said what its rows were made with.
    let mut windows: Option<(Arc<str>, WindowConfig)> = None;
    loop {
        let delivery = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            d = input.next() => d.map_err(edge_err("flows"))?,
        };
        for ack in std::mem::take(&mut input.settled) {
            ack.release().await;
        }
        let Some(d) = delivery else { break };
        let piece = d.item;
        check_shard_count(&mut count, &piece).map_err(edge_err("flows"))?;
        check_windows(&mut windows, &piece).map_err(|f| edge_err("flows")(f.into()))?;
        let producer = Arc::clone(&piece.producer);
        if !shards.contains_key(&producer) {
            let sh = start_shard_sink(
                &producer,
                piece.windows.as_ref(),
                &store,
                &s,
                &metrics,
                log_committed.order(&store),
            )
            .await?;
            shards.insert(Arc::clone(&producer), sh);
        }
        let sh = shards.get_mut(&producer).expect("just inserted");
        let sseq = d.ack.position();
        let emission = piece.seq;
        if sh.done.is_some_and(|done| emission <= done) {
            // Delivered again (a redelivery, or an aggregator re-publishing after a restart): the
            // sink releases the ack once that emission is committed.
            metrics
                .broker
                .redelivered_rows_skipped
                .add(piece.records.len() as u64);
            let acks = Finalized::acks(vec![d.ack]);
            if !hand_over(&mut sh.tx, acks, &shutdown).await? {
                break;
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
            sh.piece_acks.push(d.ack);
            continue;
        }
        if piece.first_row as usize > next_row {
            return Err(edge_err("flows")(
                StreamFault::FlowGap {
                    emission,
                    producer: producer.to_string(),
                    next: next_row,
                    first: piece.first_row as usize,
                    stream_seq: sseq,
                }
                .into(),
            ));
        }
        // An emission a restarted aggregator abandoned half-published is superseded by its rebuild
        // (its pieces' acks go with the rebuild's).
        let mut whole = match sh.partial.take() {
            Some(mut p) if p.seq == emission => {
                p.records.extend(piece.records);
                // The piece that completes the emission carries its replay point (see
                // `edge::broker`: the others carry the one before it).
                p.replay = piece.replay;
                p
            }
            _ => piece,
        };
        sh.piece_acks.push(d.ack);
        if whole.completes() {
            // Only emissions handed over need it (older ones the output holds are skipped above), and
            // only whole: pieces before the last carry the checkpoint before the emission.
            if matches!(log_committed, LogCommitted::Table(_))
                && whole.replay.events_through.is_empty()
                && !whole.records.is_empty()
            {
                return Err(edge_err("flows")(
                    StreamFault::NoEventsThrough {
                        producer: whole.producer.to_string(),
                        emission,
                    }
                    .into(),
                ));
            }
            whole.first_row = 0;
            sh.done = Some(emission);
            let acks = std::mem::take(&mut sh.piece_acks);
            let item = Finalized {
                item: Some(whole),
                acks,
            };
            if !hand_over(&mut sh.tx, item, &shutdown).await? {
                break;
            }
        } else {
            sh.partial = Some(whole);
        }
    }
    // End of input or shutdown: every shard's sink commits what it holds and releases its acks (a
    // half-received emission's are not: it is delivered again).
    let mut tasks = Vec::new();
    for (_, sh) in std::mem::take(&mut shards) {
        drop(sh.tx);
        tasks.push(sh.task);
    }
    for task in tasks {
        task.await
            .map_err(RunError::Panicked)?
            .map_err(sink_err("flows"))?;
    }
    Ok(())
}

/// Hands an emission (or acks) to a shard's flows sink; `false` if that sink has ended because the
/// process is stopping (a sink part that gave up waiting for another part's event log, see
/// [`sink::run_flows`]): what it did not take is delivered again.
async fn hand_over(
    tx: &mut memory::MemoryTx<Finalized<FlowBatch>>,
    item: Finalized<FlowBatch>,
    shutdown: &Shutdown,
) -> Result<bool, RunError> {
    match tx.send(item).await {
        Ok(()) => Ok(true),
        Err(_) if shutdown.is_triggered() => Ok(false),
        Err(e) => Err(edge_err("flows")(e)),
    }
}

/// How a flows sink over the broker learns that the events its rows count are committed.
enum LogCommitted {
    /// This process writes the whole event log: its committed position on the events stream.
    Here(watch::Receiver<u64>),
    /// Sink parts write it: the events table's commit records (given up when the sink stops).
    Table(Shutdown),
}

impl LogCommitted {
    fn order(&self, store: &Store) -> CommitOrder {
        match self {
            LogCommitted::Here(through) => CommitOrder {
                after: Some(through.clone()),
                table: None,
            },
            LogCommitted::Table(stop) => CommitOrder {
                after: None,
                table: Some(crate::lake::committed::EventsCommitted::new(
                    store.clone(),
                    stop.clone(),
                )),
            },
        }
    }
}

/// Every aggregator must say the same shard count (`--shard I/N`), and its index must be below it.
fn check_shard_count(count: &mut Option<(Arc<str>, u32)>, b: &FlowBatch) -> Result<(), EdgeError> {
    if b.shard_count == 0 {
        return Ok(()); // a message of an older build, which did not say
    }
    match count {
        Some((first, n)) if *n != b.shard_count => Err(StreamFault::ShardsDisagree {
            this: format!("`{}` runs", b.producer),
            n: b.shard_count,
            earlier: format!("`{first}`"),
            known: *n,
        }
        .into()),
        Some(_) => Ok(()),
        None => {
            *count = Some((Arc::clone(&b.producer), b.shard_count));
            Ok(())
        }
    }
}

/// Opens one shard's flows sink: its commit log tells where it stands. The table is created with, or
/// must hold, the settings the aggregator made its rows with (unknown for batches of older builds).
async fn start_shard_sink(
    producer: &Arc<str>,
    windows: Option<&WindowConfig>,
    store: &Store,
    s: &Settings,
    metrics: &Arc<Metrics>,
    order: CommitOrder,
) -> Result<ShardSink, RunError> {
    let props = windows.map(flows_properties).unwrap_or_default();
    let mut log = CommitLog::recover(store.clone(), Dataset::Flows, producer, &props).await?;
    let done = last_emission(&log);
    let (tx, rx) = memory::channel(
        "broker→flows sink",
        s.channel_capacity,
        Arc::clone(&metrics.edges.flows_to_sink),
    );
    let writer = RollingWriter::new(Dataset::Flows, store.clone(), roll_policy(s));
    let m = Arc::clone(metrics);
    let policy = roll_policy(s);
    let task = tokio::spawn(async move {
        sink::run_flows(rx, writer, &mut log, order, policy, &m.sink_flows).await
    });
    Ok(ShardSink {
        tx,
        done,
        partial: None,
        piece_acks: Vec::new(),
        task,
    })
}
