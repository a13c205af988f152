//! Modes: which stages run in this process and which edges join them. Nothing else.
//!
//! The monolith wires capture -> aggregate -> sink with bounded in-memory edges; events also fan out
//! to the event-log sink. Stage code is identical in every mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::aggregate::{self, AggregateConfig, WindowConfig};
use crate::capture::ebpf::{EbpfConfig, EbpfSource};
use crate::capture::synthetic::{Synthetic, SyntheticConfig};
use crate::capture::{self, AnySource, CaptureConfig, CaptureError};
use crate::config::Output;
use crate::config::{defaults, Mode, Settings, SourceKind};
use crate::edge::tee::Tee;
use crate::edge::{memory, EdgeError};
use crate::event::{EventBatch, FlowBatch};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::s3::S3Store;
use crate::sink::{
    self, Dataset, LocalDir, RollPolicy, RollingWriter, SinkError, Store, StoreError,
};
use crate::summary::Summary;

/// Simulated event rate of the synthetic source (events per second of event time).
const SYNTHETIC_EVENTS_PER_SIM_SEC: u64 = 20_000;
/// Upper bound on flow records per batch leaving the aggregator.
const MAX_FLOW_BATCH: usize = 8_192;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("aggregate: {0}")]
    Aggregate(EdgeError),
    #[error("{dataset} sink: {source}")]
    Sink {
        dataset: &'static str,
        source: SinkError,
    },
    #[error("a pipeline task panicked: {0}")]
    Panicked(String),
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
    }
}

/// Opens the configured source (for eBPF: loads and attaches the kernel programs).
fn open_source(
    s: &Settings,
    node: &Arc<str>,
    metrics: &Arc<Metrics>,
) -> Result<AnySource, RunError> {
    Ok(match s.source {
        SourceKind::Synthetic => AnySource::Synthetic(Synthetic::new(
            Arc::clone(node),
            SyntheticConfig {
                seed: s.seed,
                total: s.events.unwrap_or(defaults::EVENTS),
                start_us: s.start_us,
                events_per_sim_sec: SYNTHETIC_EVENTS_PER_SIM_SEC,
            },
        )),
        SourceKind::Ebpf => {
            let e = &s.ebpf;
            let cfg = EbpfConfig {
                probe: probe_common::ProbeConfig {
                    filter_port: e.port.map_or(0, u32::from),
                    filter_pid: e.pid.unwrap_or(0),
                    exclude_pid: if e.exclude_self {
                        std::process::id()
                    } else {
                        0
                    },
                    _pad: 0,
                    filter_cgroup: e.cgroup_id.unwrap_or(0),
                    rtt_interval_ns: e.rtt_sample_interval.as_nanos() as u64,
                    flush_interval_ns: e.bytes_flush_interval.as_nanos() as u64,
                },
                ring_bytes: e.ring_buffer_bytes,
                max_events: s.events,
            };
            let source = EbpfSource::start(Arc::clone(node), &cfg, Arc::clone(metrics))
                .map_err(|e| RunError::Capture(e.into()))?;
            AnySource::Ebpf(Box::new(source))
        }
    })
}

/// Opens the output: checks a directory is writable, or a bucket reachable with these credentials.
async fn open_store(s: &Settings, metrics: &Metrics) -> Result<Store, StoreError> {
    Ok(match &s.out {
        Output::Local(dir) => Store::Local(LocalDir::open(dir)?),
        Output::S3(cfg) => Store::S3(S3Store::connect(cfg, Arc::clone(&metrics.s3)).await?),
    })
}

fn roll_policy(s: &Settings) -> RollPolicy {
    RollPolicy {
        max_bytes: s.max_file_bytes,
        max_age: s.max_file_age,
        row_group_rows: s.row_group_rows,
    }
}

async fn monolith(
    s: &Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let store = open_store(s, &metrics).await?;
    let node: Arc<str> = s.node.as_str().into();
    let cap = s.channel_capacity;
    let e = &metrics.edges;
    let (to_agg, agg_in) =
        memory::channel::<Arc<EventBatch>>("events→aggregate", cap, e.events_to_aggregate.clone());
    let (to_log, log_in) =
        memory::channel::<Arc<EventBatch>>("events→sink", cap, e.events_to_sink.clone());
    let (to_flows, flows_in) =
        memory::channel::<FlowBatch>("flows→sink", cap, e.flows_to_sink.clone());

    let capture_cfg = CaptureConfig {
        batch_size: s.batch_size,
        rate: s.rate,
        duration: s.duration,
    };
    let source = open_source(s, &node, &metrics)?;
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

    let agg_cfg = AggregateConfig {
        windows: WindowConfig {
            window_us: micros(s.window),
            allowed_lateness_us: micros(s.allowed_lateness),
        },
        producer: format!("{}-agg-0", s.node).into(),
        max_batch_records: MAX_FLOW_BATCH,
    };
    let m = Arc::clone(&metrics);
    let aggregate = tokio::spawn(async move {
        aggregate::run(agg_cfg, agg_in, to_flows, &m.aggregate)
            .await
            .map_err(RunError::Aggregate)
    });

    let writer =
        |ds: Dataset| RollingWriter::new(ds.name(), ds.schema(), store.clone(), roll_policy(s));
    let m = Arc::clone(&metrics);
    let events_writer = writer(Dataset::Events);
    let st = store.clone();
    let events_sink = tokio::spawn(async move {
        sink::run(log_in, events_writer, &st, &m.sink_events)
            .await
            .map_err(|source| RunError::Sink {
                dataset: "events",
                source,
            })
    });
    let m = Arc::clone(&metrics);
    let flows_writer = writer(Dataset::Flows);
    let st = store.clone();
    let flows_sink = tokio::spawn(async move {
        sink::run(flows_in, flows_writer, &st, &m.sink_flows)
            .await
            .map_err(|source| RunError::Sink {
                dataset: "flows",
                source,
            })
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
    Ok(Summary::from_metrics(
        &metrics,
        started.elapsed(),
        store.describe(),
    ))
}

async fn join<T>(h: JoinHandle<Result<T, RunError>>) -> Result<T, RunError> {
    h.await.map_err(|e| RunError::Panicked(e.to_string()))?
}

fn micros(d: Duration) -> i64 {
    d.as_micros() as i64
}
