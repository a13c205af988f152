//! Modes: which stages run in this process and which edges join them. Nothing else.
//!
//! The monolith wires capture -> aggregate -> sink with bounded in-memory edges; events also fan out
//! to the event-log sink. The split modes ([`split`]) run one stage each, joined by the broker. Stage
//! code is identical in every mode.

mod split;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinHandle;

use crate::aggregate::{self, AggregateConfig, Resume, WindowConfig};
use crate::capture::ebpf::{EbpfConfig, EbpfSource};
use crate::capture::kubernetes::KubernetesConfig;
use crate::capture::synthetic::{Synthetic, SyntheticConfig};
use crate::capture::{self, AnySource, CaptureConfig, CaptureError};
use crate::config::Output;
use crate::config::{defaults, Mode, Settings, SourceKind, StateChanges};
use crate::edge::tee::Tee;
use crate::edge::{memory, Ack, EdgeError, Finalized, Finalizing};
use crate::event::{EventBatch, FlowBatch};
use crate::lake::producer::{flows_properties, Properties, SOURCE_PROPERTY};
use crate::metrics::Metrics;
use crate::replay::{self, ReplayError};
use crate::shutdown::Shutdown;
use crate::sink::{
    self, CommitError, CommitLog, CommitOrder, Dataset, LocalDir, Position, RollPolicy,
    RollingWriter, SinkError, Store, StoreError,
};
use crate::storage::s3::S3Store;
use crate::summary::Summary;

/// Simulated event rate of the synthetic source (events per second of event time).
const SYNTHETIC_EVENTS_PER_SIM_SEC: u64 = 20_000;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] crate::edge::broker::BrokerError),
    #[error("reading the last commit: {0}")]
    Recover(#[from] CommitError),
    #[error("replaying the event log after a restart: {0}")]
    Replay(#[from] ReplayError),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("aggregate: {0}")]
    Aggregate(#[source] EdgeError),
    #[error("{dataset} sink: {source}")]
    Sink {
        dataset: &'static str,
        source: SinkError,
    },
    #[error(transparent)]
    Part(#[from] crate::sink::part::PartError),
    #[error("a pipeline task failed")]
    Panicked(#[source] tokio::task::JoinError),
}

impl RunError {
    /// A closed edge is a consequence of another stage failing, never the root cause.
    fn is_consequence(&self) -> bool {
        matches!(
            self,
            RunError::Capture(CaptureError::Edge(EdgeError::Closed(_)))
                | RunError::Aggregate(EdgeError::Closed(_))
                | RunError::Sink {
                    source: SinkError::Edge(EdgeError::Closed(_)),
                    ..
                }
        )
    }
}

/// Runs the configured mode to completion (source exhausted or shutdown) and returns the summary.
pub async fn run(
    settings: &Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, RunError> {
    match settings.mode {
        Mode::Monolith => monolith(settings, metrics, shutdown).await,
        Mode::Capture => split::capture(settings, metrics, shutdown).await,
        Mode::Aggregate => split::aggregate(settings, metrics, shutdown).await,
        Mode::Sink => split::sink(settings, metrics, shutdown).await,
    }
}

/// Opens the configured source (for eBPF: loads and attaches the kernel programs; for a replay: finds
/// the recorded log, whose node name the run then takes).
async fn open_source(
    s: &Settings,
    node: &Arc<str>,
    metrics: &Arc<Metrics>,
) -> Result<AnySource, RunError> {
    Ok(match s.source {
        SourceKind::Replay => {
            let from = s.replay_from.as_ref().expect("validated: replay has a log");
            let store = open_existing(from, metrics, Access::ReadOnly)
                .await
                .map_err(|e| match e {
                    OpenError::Missing(dir) => RunError::Capture(CaptureError::ReplayNoLog {
                        store: dir,
                        why: ": the directory does not exist",
                    }),
                    OpenError::Store(e) => e.into(),
                })?;
            let explicit = (s.node_given).then_some(s.node.as_str());
            let rec =
                crate::capture::recorded::Recorded::open(store, explicit, s.replay_range).await?;
            AnySource::Recorded(Box::new(rec))
        }
        SourceKind::Synthetic => {
            let mut source = Synthetic::new(
                Arc::clone(node),
                SyntheticConfig {
                    seed: s.seed,
                    total: s.events.unwrap_or(defaults::EVENTS),
                    start_us: s.start_us,
                    events_per_sim_sec: SYNTHETIC_EVENTS_PER_SIM_SEC,
                },
            );
            if let Some((every, by)) = s.synthetic_late {
                source = source.with_late(every, micros(by));
            }
            AnySource::Synthetic(source)
        }
        SourceKind::Ebpf => {
            let e = &s.ebpf;
            let cfg = EbpfConfig {
                port: e.port,
                pid: e.pid,
                cgroup_id: e.cgroup_id,
                exclude_self: e.exclude_self,
                rtt_interval: e.rtt_sample_interval,
                flush_interval: e.bytes_flush_interval,
                lifecycle_only: e.state_changes == StateChanges::Lifecycle,
                ring_bytes: e.ring_buffer_bytes,
                max_events: s.events,
                kubernetes: e.kubernetes.as_ref().map(|k| KubernetesConfig {
                    api: k.api.clone(),
                    node: k.node.clone().unwrap_or_else(|| node.to_string()),
                }),
            };
            let source = EbpfSource::start(Arc::clone(node), &cfg, Arc::clone(metrics))
                .map_err(|e| RunError::Capture(e.into()))?;
            AnySource::Ebpf(Box::new(source))
        }
    })
}

/// Opens the output: checks a directory is writable, or a bucket reachable with these credentials.
async fn open_store(s: &Settings, metrics: &Metrics) -> Result<Store, StoreError> {
    open_output(&s.out, metrics).await
}

/// Opening an output that must already exist failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0} does not exist")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a command does with an existing output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Only reads it (a replay's source): nothing is written, cleaned up or aborted there.
    ReadOnly,
    /// Reworks it (compaction).
    ReadWrite,
}

/// Opens an output to read or rework (replay, compact): unlike a run's output, a local directory must
/// exist already, so a mistyped path is an error rather than a new, empty directory.
pub async fn open_existing(
    out: &Output,
    metrics: &Metrics,
    access: Access,
) -> Result<Store, OpenError> {
    if let Output::Local(dir) = out {
        if !dir.exists() {
            return Err(OpenError::Missing(dir.display().to_string()));
        }
        if access == Access::ReadOnly {
            return Ok(Store::Local(LocalDir::open_read_only(dir)?)
                .counting_log_requests(Arc::clone(&metrics.log)));
        }
        if !dir.is_dir() {
            return Err(StoreError::NotADirectory(dir.clone()).into());
        }
    }
    Ok(match (out, access) {
        (Output::S3(cfg), Access::ReadOnly) => {
            Store::S3(S3Store::connect_read_only(cfg, Arc::clone(&metrics.s3)).await?)
                .counting_log_requests(Arc::clone(&metrics.log))
        }
        _ => open_output(out, metrics).await?,
    })
}

async fn open_output(out: &Output, metrics: &Metrics) -> Result<Store, StoreError> {
    let store = match out {
        Output::Local(dir) => Store::Local(LocalDir::open(dir)?),
        Output::S3(cfg) => Store::S3(S3Store::connect(cfg, Arc::clone(&metrics.s3)).await?),
    };
    Ok(store.counting_log_requests(Arc::clone(&metrics.log)))
}

fn roll_policy(s: &Settings) -> RollPolicy {
    // A process that captures live shares its machine with the traffic it watches: it encodes on one
    // thread, never taking a second core from the workload. Replays, synthetic runs and the sink
    // service use every core they may.
    let live = s.mode == Mode::Monolith && s.source == SourceKind::Ebpf;
    RollPolicy {
        max_bytes: s.max_file_bytes,
        max_age: s.max_file_age,
        row_group_rows: s.row_group_rows,
        encode_threads: if live {
            1
        } else {
            crate::sink::encoder::threads()
        },
    }
}

/// The window settings of the aggregate stage.
fn window_config(s: &Settings) -> WindowConfig {
    WindowConfig {
        window_us: micros(s.window),
        allowed_lateness_us: micros(s.allowed_lateness),
        horizon_us: micros(s.late_horizon),
    }
}

/// The properties the tables of a monolith's output are created with and must agree with on a resume:
/// what the projection is made of, and which event stream the log holds.
fn table_properties(s: &Settings, source: &str) -> (Properties, Properties) {
    let events = Properties::from([(SOURCE_PROPERTY.to_string(), source.to_string())]);
    (events, flows_properties(&window_config(s)))
}

/// Which event stream a run records: the same source settings continue the same stream; others would
/// mix two streams in one log.
fn source_identity(s: &Settings, source: &AnySource) -> String {
    match source {
        AnySource::Synthetic(_) => format!(
            "synthetic seed={} start_us={} late={:?}",
            s.seed, s.start_us, s.synthetic_late
        ),
        AnySource::Ebpf(_) => {
            let e = &s.ebpf;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "any".into());
            let mut id = format!(
                "ebpf port={} pid={} cgroup={}",
                opt(e.port.map(|p| p.to_string())),
                opt(e.pid.map(|p| p.to_string())),
                opt(e.cgroup_id.map(|c| c.to_string()))
            );
            // Lifecycle-only logs hold fewer state changes per connection (and flows count fewer
            // `events`): one log records one setting. Outputs of the default keep their identity.
            if e.state_changes == StateChanges::Lifecycle {
                id.push_str(" state_changes=lifecycle");
            }
            id
        }
        AnySource::Recorded(r) => {
            let t = |v: Option<i64>| v.map_or("-".to_string(), |t| t.to_string());
            format!(
                "replay of {} since_us={} until_us={}",
                r.origin(),
                t(s.replay_range.since_us),
                t(s.replay_range.until_us)
            )
        }
    }
}

/// Where a restarted run picks up, from the tables' own progress records.
struct Restart {
    events_log: CommitLog,
    flows_log: CommitLog,
    /// Next event `seq`: everything before it is in the committed log.
    resume_seq: u64,
    /// How the aggregator rebuilds what it held at the last committed emission.
    aggregate: Option<Resume>,
}

impl Restart {
    async fn read(
        store: &Store,
        node: &str,
        producer: &str,
        (events_props, flows_props): (Properties, Properties),
    ) -> Result<Self, CommitError> {
        let events_log =
            CommitLog::recover(store.clone(), Dataset::Events, node, &events_props).await?;
        let flows_log =
            CommitLog::recover(store.clone(), Dataset::Flows, producer, &flows_props).await?;
        let resume_seq = match events_log.last() {
            Some(Position::Event { seq }) => seq + 1,
            _ => 0,
        };
        let aggregate = match (flows_log.last(), flows_log.replay_point(&[node]).await?) {
            (Some(Position::Flow { emission, .. }), Some(point)) => Some(Resume {
                point,
                next_emission: emission + 1,
            }),
            _ => None,
        };
        Ok(Restart {
            events_log,
            flows_log,
            resume_seq,
            aggregate,
        })
    }
}

async fn monolith(
    s: &Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let store = open_store(s, &metrics).await?;
    // Every output carries its identity from its first run (a replay of it, wherever it was copied to,
    // names the recorded stream by it).
    crate::lake::output_id(&store).await?;
    // Opened before any stage starts: a source that cannot start must not make the aggregator flush.
    let mut source = open_source(s, &s.node.as_str().into(), &metrics).await?;
    let node: Arc<str> = match &source {
        AnySource::Recorded(r) => Arc::clone(r.node()),
        _ => s.node.as_str().into(),
    };
    let producer = format!("{node}-agg-0");
    let identity = source_identity(s, &source);
    let restart = Restart::read(&store, &node, &producer, table_properties(s, &identity)).await?;
    let Restart {
        mut events_log,
        mut flows_log,
        resume_seq,
        aggregate: agg_resume,
    } = restart;
    let replay_from = agg_resume.as_ref().map_or(0, |r| r.point.from_seq);
    source.resume_at(resume_seq);
    if resume_seq > 0 {
        tracing::info!(
            resume_seq,
            replay_from,
            "resuming after the last commit: replaying the event log into the aggregator"
        );
    }
    let cap = s.channel_capacity;
    let e = &metrics.edges;
    let (mut to_agg, agg_in) =
        memory::channel::<Arc<EventBatch>>("events→aggregate", cap, e.events_to_aggregate.clone());
    let (to_log, log_in) =
        memory::channel::<Finalized<Arc<EventBatch>>>("events→sink", cap, e.events_to_sink.clone());
    // The event log's sink releases a batch's ack once the batch is committed: that is how far the
    // flows sink may commit (in one process the events edge's positions are the events' `seq`s).
    let (log_through, after) = tokio::sync::watch::channel(resume_seq);
    let log_through = Arc::new(log_through);
    let to_log = Finalizing::new(to_log, move |b: &Arc<EventBatch>| {
        let (through, end) = (Arc::clone(&log_through), b.position.end);
        Ack::new(end, move || {
            async move {
                through.send_if_modified(|t| std::mem::replace(t, (*t).max(end)) < end);
            }
            .boxed()
        })
    });
    let (to_flows, flows_in) =
        memory::channel::<FlowBatch>("flows→sink", cap, e.flows_to_sink.clone());

    let agg_cfg = AggregateConfig {
        windows: window_config(s),
        producer: producer.as_str().into(),
        resume: agg_resume,
        shard: aggregate::Shard::ALL,
    };
    let m = Arc::clone(&metrics);
    let aggregate = tokio::spawn(async move {
        aggregate::run(agg_cfg, agg_in, to_flows, &m.aggregate)
            .await
            .map_err(RunError::Aggregate)
    });

    let writer = |ds: Dataset| RollingWriter::new(ds, store.clone(), roll_policy(s));
    let m = Arc::clone(&metrics);
    let events_writer = writer(Dataset::Events);
    let st = store.clone();
    let events_order = CommitOrder::default();
    let events_sink = tokio::spawn(async move {
        let _store = st;
        sink::run(
            log_in,
            events_writer,
            &mut events_log,
            events_order,
            &m.sink_events,
        )
        .await
        .map_err(|source| RunError::Sink {
            dataset: "events",
            source,
        })
    });
    let m = Arc::clone(&metrics);
    let flows_writer = writer(Dataset::Flows);
    let st = store.clone();
    let flows_order = CommitOrder {
        after: Some(after),
        table: None,
    };
    let policy = roll_policy(s);
    let flows_sink = tokio::spawn(async move {
        let _store = st;
        sink::run_flows(
            flows_in,
            flows_writer,
            &mut flows_log,
            flows_order,
            policy,
            &m.sink_flows,
        )
        .await
        .map_err(|source| RunError::Sink {
            dataset: "flows",
            source,
        })
    });

    // The aggregator first sees the committed events it needs again, then live ones.
    let replayed = match replay::feed(
        &store,
        &node,
        replay_from,
        resume_seq,
        s.batch_size,
        &mut to_agg,
    )
    .await
    {
        Ok(n) => n,
        Err(e) => {
            // Stop the aggregator before its input ends: ending it would flush half-rebuilt windows.
            aggregate.abort();
            let _ = aggregate.await;
            return Err(e.into());
        }
    };
    let capture_cfg = CaptureConfig {
        batch_size: s.batch_size,
        rate: s.rate,
        duration: s.duration,
    };

    // Output writable, source attached, stages about to run.
    metrics.health.set_ready();
    let m = Arc::clone(&metrics);
    let capture = tokio::spawn(async move {
        capture::run(
            capture_cfg,
            source,
            Tee::new(to_agg, to_log),
            shutdown,
            &m.capture,
        )
        .await
        .map_err(RunError::from)
    });

    let (c, a, ev, fl) = tokio::join!(
        join(capture),
        join(aggregate),
        join(events_sink),
        join(flows_sink)
    );
    // Report the root cause: a stage that failed, not the neighbours that then saw a closed edge.
    let results = [c.map(|_| ()), a.map(|_| ()), ev.map(|_| ()), fl.map(|_| ())];
    let mut errors: Vec<RunError> = results.into_iter().filter_map(Result::err).collect();
    errors.sort_by_key(RunError::is_consequence);
    if let Some(first) = errors.into_iter().next() {
        return Err(first);
    }
    let mut summary = Summary::from_metrics(&metrics, started.elapsed(), store.describe());
    summary.resumed_at_seq = resume_seq;
    summary.replayed_events = replayed;
    Ok(summary)
}

async fn join<T>(h: JoinHandle<Result<T, RunError>>) -> Result<T, RunError> {
    h.await.map_err(RunError::Panicked)?
}

fn micros(d: Duration) -> i64 {
    d.as_micros() as i64
}
