//! Every metric tcplake exposes, named in one place.
//!
//! Stages count locally in their hot loops and publish here once per batch, so an atomic add is paid
//! per batch, not per event. The same values feed the end-of-run summary and, on each scrape, the
//! OpenMetrics text that prometheus-client encodes ([`Metrics::render_prometheus`]): every family is
//! named and described here, the exposition format is the crate's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (queue depths).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: i64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of the request-duration histogram buckets.
const DURATION_BOUNDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations (prometheus-client's, with [`DURATION_BOUNDS`]).
#[derive(Debug, Clone)]
pub struct Histogram(PromHistogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(PromHistogram::new(DURATION_BOUNDS))
    }
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Capture stage counters.
#[derive(Debug, Default)]
pub struct CaptureMetrics {
    pub events: Counter,
    pub batches: Counter,
    /// Kernel records that could not be decoded (skipped, each counted).
    pub decode_errors: Counter,
    /// Records the kernel could not queue because the ring buffer was full.
    pub kernel_drops: Counter,
    /// New cgroups the kernel could not tell user space of (their ring buffer was full): their events
    /// are resolved by id instead, if the cgroup still exists.
    pub cgroup_records_dropped: Counter,
    /// Cgroup ids that resolved to no path: their events carry no cgroup path.
    pub cgroups_unresolved: Counter,
}

/// Kubernetes names (live capture with `--kubernetes`).
#[derive(Debug, Default)]
pub struct KubernetesMetrics {
    /// A pod uid looked up (once per cgroup, and again when the pods changed).
    pub lookups: Counter,
    /// Lookups that found no pod on the node: those events have no Kubernetes names.
    pub misses: Counter,
    /// Failures of the pod watch (each retried with backoff).
    pub watch_errors: Counter,
    /// Pods of the node known now.
    pub pods: Gauge,
}

/// Aggregate stage counters.
#[derive(Debug, Default)]
pub struct AggregateMetrics {
    pub events_in: Counter,
    /// Events later than the late horizon: left out of `flows/`, kept in `events/`.
    pub late_events: Counter,
    /// Events for a window already emitted, folded in: the window is emitted again.
    pub late_folded: Counter,
    pub records_out: Counter,
    pub windows_closed: Counter,
    /// Windows emitted again (their rows replace the earlier ones).
    pub windows_rewritten: Counter,
}

/// Sink counters for one dataset.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub rows: Counter,
    pub batches: Counter,
    pub files: Counter,
    pub bytes: Counter,
    /// Capture-to-commit latency per batch, µs (events: when the rows became durable).
    pub latency_us: std::sync::Mutex<crate::sketch::RttSketch>,
}

impl SinkMetrics {
    /// Adds latency samples (µs), once per committed file.
    pub fn record_latencies(&self, samples: impl Iterator<Item = i64>) {
        let mut sketch = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        for v in samples {
            sketch.insert(v.clamp(0, i64::from(u32::MAX)) as u32);
        }
    }

    /// (p50, p99) in milliseconds, if any batch was committed.
    pub fn latency_ms(&self) -> Option<(f64, f64)> {
        let sketch = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        Some((
            f64::from(sketch.quantile(0.50)?) / 1000.0,
            f64::from(sketch.quantile(0.99)?) / 1000.0,
        ))
    }
}

/// An S3 request type, as counted and billed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Op {
    Put,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    Head,
    List,
    Get,
    Delete,
    /// An operation tcplake does not make today: still counted, never dropped.
    Other,
}

impl S3Op {
    /// Every type, in the order of [`S3Metrics::by_type`].
    pub const ALL: [S3Op; 10] = [
        S3Op::Put,
        S3Op::CreateMultipart,
        S3Op::UploadPart,
        S3Op::CompleteMultipart,
        S3Op::AbortMultipart,
        S3Op::Head,
        S3Op::List,
        S3Op::Get,
        S3Op::Delete,
        S3Op::Other,
    ];

    /// The label in metrics and summaries.
    pub fn name(self) -> &'static str {
        match self {
            S3Op::Put => "put",
            S3Op::CreateMultipart => "create_multipart",
            S3Op::UploadPart => "upload_part",
            S3Op::CompleteMultipart => "complete_multipart",
            S3Op::AbortMultipart => "abort_multipart",
            S3Op::Head => "head",
            S3Op::List => "list",
            S3Op::Get => "get",
            S3Op::Delete => "delete",
            S3Op::Other => "other",
        }
    }

    /// The type of an S3 API operation, by its name (`PutObject`).
    pub fn of_operation(name: &str) -> S3Op {
        match name {
            "PutObject" => S3Op::Put,
            "CreateMultipartUpload" => S3Op::CreateMultipart,
            "UploadPart" => S3Op::UploadPart,
            "CompleteMultipartUpload" => S3Op::CompleteMultipart,
            "AbortMultipartUpload" => S3Op::AbortMultipart,
            "HeadObject" | "HeadBucket" => S3Op::Head,
            "ListObjectsV2" | "ListObjects" | "ListMultipartUploads" | "ListParts" => S3Op::List,
            "GetObject" => S3Op::Get,
            "DeleteObject" | "DeleteObjects" => S3Op::Delete,
            _ => S3Op::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Requests to the S3 store, by type: each attempt counts (retries included), as each is billed.
#[derive(Debug, Default)]
pub struct S3Metrics {
    requests: [Counter; S3Op::ALL.len()],
    /// Attempts that failed transiently and were tried again.
    pub retries: Counter,
    pub bytes_uploaded: Counter,
    pub bytes_downloaded: Counter,
    /// Duration of each attempt, by request type.
    durations: [Histogram; S3Op::ALL.len()],
}

impl S3Metrics {
    /// Counts one attempt of a request of type `op`.
    pub fn count(&self, op: S3Op) {
        self.requests[op.index()].add(1);
    }

    /// Records how long one attempt of `op` took.
    pub fn observe(&self, op: S3Op, d: std::time::Duration) {
        self.durations[op.index()].observe(d);
    }

    /// Attempts of one request type so far.
    pub fn requests(&self, op: S3Op) -> u64 {
        self.requests[op.index()].get()
    }

    /// (type, count) for every request type.
    pub fn by_type(&self) -> [(&'static str, u64); S3Op::ALL.len()] {
        S3Op::ALL.map(|op| (op.name(), self.requests(op)))
    }
}

/// Requests the Delta log made to the output's store (table snapshots, commits, checkpoints), by type.
/// Counted for every store — on S3 they are also part of [`S3Metrics`] — so a run into a local
/// directory says what the same tables would cost in S3 requests (`tcplake bench` prices them).
#[derive(Debug, Default)]
pub struct LogMetrics {
    pub put: Counter,
    pub get: Counter,
    pub head: Counter,
    pub list: Counter,
    pub delete: Counter,
    pub copy: Counter,
}

impl LogMetrics {
    /// (type, count) for every request type.
    pub fn by_type(&self) -> [(&'static str, u64); 6] {
        [
            ("put", self.put.get()),
            ("get", self.get.get()),
            ("head", self.head.get()),
            ("list", self.list.get()),
            ("delete", self.delete.get()),
            ("copy", self.copy.get()),
        ]
    }
}

/// Traffic on the broker edges of this process (split modes).
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    pub published_messages: Counter,
    pub published_bytes: Counter,
    pub consumed_messages: Counter,
    pub consumed_bytes: Counter,
    /// Messages of producers another sink part writes, acked unread.
    pub not_kept_messages: Counter,
    pub acks: Counter,
    /// Publishes retried (full stream, server restarting, ack lost).
    pub publish_retries: Counter,
    /// Re-published messages the server recognised by id and dropped.
    pub duplicates_dropped: Counter,
    /// Undecodable messages moved to the dead-letter stream.
    pub dead_letters: Counter,
    /// Rows received again after a restart or redelivery and skipped (already written).
    pub redelivered_rows_skipped: Counter,
    /// Consumers reopened after losing the broker.
    pub consumer_reconnects: Counter,
}

/// Requests of the object-store hand-off edge, counted as S3 would bill them (whatever the store).
#[derive(Debug, Default)]
pub struct HandoffMetrics {
    pub puts: Counter,
    /// GETs, including those that found nothing yet (polls).
    pub gets: Counter,
    pub misses: Counter,
    pub bytes_written: Counter,
    pub bytes_read: Counter,
    /// Rows a restarted sink read again and skipped: its output held them already.
    pub rows_skipped: Counter,
}

/// Queue depth (in batches) of each in-process edge.
#[derive(Debug, Default)]
pub struct EdgeMetrics {
    pub events_to_aggregate: Arc<Gauge>,
    pub events_to_sink: Arc<Gauge>,
    pub flows_to_sink: Arc<Gauge>,
}

/// All metrics of one tcplake process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub capture: CaptureMetrics,
    pub kubernetes: KubernetesMetrics,
    pub aggregate: AggregateMetrics,
    pub sink_events: SinkMetrics,
    pub sink_flows: SinkMetrics,
    pub edges: EdgeMetrics,
    pub s3: Arc<S3Metrics>,
    pub log: Arc<LogMetrics>,
    pub broker: Arc<BrokerMetrics>,
    pub handoff: Arc<HandoffMetrics>,
    /// Readiness, for `/readyz`.
    pub health: crate::health::Health,
}

/// One label set: (name, value) pairs.
type Labels = Vec<(&'static str, &'static str)>;

/// The values of one metric family at a scrape.
#[derive(Debug)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    Histogram(Vec<(Labels, PromHistogram)>),
}

/// One family: its name (without the `tcplake_` prefix and a counter's `_total`), help and unit.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    samples: Samples,
}

impl Family {
    fn counter(name: &'static str, help: &'static str, v: u64) -> Family {
        Self::counters(name, help, [(vec![], v)])
    }

    fn counters(
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Family {
        Family {
            name,
            help,
            unit: None,
            samples: Samples::Counter(samples.into_iter().collect()),
        }
    }

    fn gauges(
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> Family {
        Family {
            name,
            help,
            unit: None,
            samples: Samples::Gauge(samples.into_iter().collect()),
        }
    }
}

/// The families of one scrape, encoded by prometheus-client as a collector.
#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram(_) => MetricType::Histogram,
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), kind)?;
            match &f.samples {
                Samples::Counter(samples) => {
                    for (labels, v) in samples {
                        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
                    }
                }
                Samples::Gauge(samples) => {
                    for (labels, v) in samples {
                        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
                    }
                }
                Samples::Histogram(samples) => {
                    for (labels, h) in samples {
                        h.encode(family.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn by<const N: usize, V>(
    key: &'static str,
    values: [(&'static str, V); N],
) -> impl Iterator<Item = (Labels, V)> {
    values.into_iter().map(move |(k, v)| (vec![(key, k)], v))
}

impl Metrics {
    /// The OpenMetrics text exposition (served as `application/openmetrics-text; version=1.0.0`).
    pub fn render_prometheus(&self) -> String {
        let mut registry = Registry::with_prefix("tcplake");
        registry.register_collector(Box::new(Scrape(self.families())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Every family with its values now.
    fn families(&self) -> Vec<Family> {
        let (c, a, b, h) = (&self.capture, &self.aggregate, &self.broker, &self.handoff);
        let sinks = |get: fn(&SinkMetrics) -> u64| {
            by(
                "dataset",
                [
                    ("events", get(&self.sink_events)),
                    ("flows", get(&self.sink_flows)),
                ],
            )
        };
        let durations = S3Op::ALL
            .iter()
            .map(|op| {
                (
                    vec![("op", op.name())],
                    self.s3.durations[op.index()].0.clone(),
                )
            })
            .collect();
        vec![
            Family::counter("capture_events", "Events captured", c.events.get()),
            Family::counter("capture_batches", "Event batches captured", c.batches.get()),
            Family::counter(
                "capture_kernel_drops",
                "Records lost in the kernel ring buffer (it was full)",
                c.kernel_drops.get(),
            ),
            Family::counter(
                "capture_cgroup_records_dropped",
                "New cgroups the kernel could not report (their ring buffer was full); resolved by id",
                c.cgroup_records_dropped.get(),
            ),
            Family::counter(
                "capture_cgroups_unresolved",
                "Cgroup ids that resolved to no path: their events carry no cgroup path",
                c.cgroups_unresolved.get(),
            ),
            Family::counter(
                "kubernetes_pod_lookups",
                "Pod uids looked up in the node's pods (once per cgroup, again after changes)",
                self.kubernetes.lookups.get(),
            ),
            Family::counter(
                "kubernetes_pod_misses",
                "Lookups that found no pod on the node: those events have no Kubernetes names",
                self.kubernetes.misses.get(),
            ),
            Family::counter(
                "kubernetes_watch_errors",
                "Failures of the pod watch (each retried with backoff)",
                self.kubernetes.watch_errors.get(),
            ),
            Family::gauges(
                "kubernetes_pods",
                "Pods of the node the watch knows",
                [(vec![], self.kubernetes.pods.get())],
            ),
            Family::counter(
                "aggregate_events",
                "Events folded into windows",
                a.events_in.get(),
            ),
            Family::counter(
                "aggregate_late_events",
                "Events later than the late horizon (kept in events/, not in flows/)",
                a.late_events.get(),
            ),
            Family::counter(
                "aggregate_late_folded",
                "Events for a window already emitted, folded in (the window is emitted again)",
                a.late_folded.get(),
            ),
            Family::counter(
                "aggregate_records",
                "Flow records emitted",
                a.records_out.get(),
            ),
            Family::counter(
                "aggregate_windows_closed",
                "Windows emitted for the first time",
                a.windows_closed.get(),
            ),
            Family::counter(
                "aggregate_windows_rewritten",
                "Windows emitted again with more events (their rows replace the earlier ones)",
                a.windows_rewritten.get(),
            ),
            Family::counters("sink_rows", "Rows committed", sinks(|s| s.rows.get())),
            Family::counters(
                "sink_batches",
                "Batches received",
                sinks(|s| s.batches.get()),
            ),
            Family::counters("sink_files", "Files committed", sinks(|s| s.files.get())),
            Family::counters("sink_bytes", "Bytes committed", sinks(|s| s.bytes.get())),
            Family::counters(
                "delta_log_requests",
                "Requests of the Delta log to the output's store, by type (any store; on S3 also \
                 in s3_requests_total)",
                by("op", self.log.by_type()),
            ),
            Family::counters(
                "s3_requests",
                "Requests to the S3 store, by type (every attempt, as billed)",
                by("op", self.s3.by_type()),
            ),
            Family {
                name: "s3_request_duration",
                help: "Duration of S3 request attempts, by type",
                unit: Some(Unit::Seconds),
                samples: Samples::Histogram(durations),
            },
            Family::counter(
                "s3_uploaded_bytes",
                "Bytes uploaded to S3",
                self.s3.bytes_uploaded.get(),
            ),
            Family::counter(
                "s3_downloaded_bytes",
                "Bytes downloaded from S3",
                self.s3.bytes_downloaded.get(),
            ),
            Family::counter(
                "broker_published_messages",
                "Messages published to the broker",
                b.published_messages.get(),
            ),
            Family::counter(
                "broker_published_bytes",
                "Bytes published to the broker",
                b.published_bytes.get(),
            ),
            Family::counter(
                "broker_consumed_messages",
                "Messages consumed from the broker",
                b.consumed_messages.get(),
            ),
            Family::counter(
                "broker_consumed_bytes",
                "Bytes consumed from the broker",
                b.consumed_bytes.get(),
            ),
            Family::counter(
                "broker_not_kept_messages",
                "Messages of producers another sink part writes, acknowledged unread",
                b.not_kept_messages.get(),
            ),
            Family::counter("broker_acks", "Messages acknowledged", b.acks.get()),
            Family::counter(
                "broker_duplicates_dropped",
                "Re-published messages the broker dropped as duplicates",
                b.duplicates_dropped.get(),
            ),
            Family::counter(
                "broker_consumer_reconnects",
                "Consumers reopened after losing the broker",
                b.consumer_reconnects.get(),
            ),
            Family::counter(
                "broker_redelivered_rows_skipped",
                "Rows received again (restart or redelivery) and skipped: already written",
                b.redelivered_rows_skipped.get(),
            ),
            Family::counters(
                "handoff_requests",
                "Object-store hand-off requests, by type (GETs include polls that found nothing)",
                by("op", [("put", h.puts.get()), ("get", h.gets.get())]),
            ),
            Family::counter(
                "handoff_rows_skipped",
                "Hand-off rows a restarted sink read again and skipped: already written",
                h.rows_skipped.get(),
            ),
            Family::counters(
                "errors",
                "Errors survived, by kind: each was counted and the data kept or retried, never \
                 dropped silently (fatal errors end the run with a message instead)",
                by(
                    "kind",
                    [
                        ("kernel_record_undecodable", c.decode_errors.get()),
                        ("s3_transient_retried", self.s3.retries.get()),
                        ("broker_publish_retried", b.publish_retries.get()),
                        ("broker_message_dead_lettered", b.dead_letters.get()),
                    ],
                ),
            ),
            Family::gauges(
                "edge_queue_depth",
                "Batches queued on an in-process edge",
                by(
                    "edge",
                    [
                        ("events_to_aggregate", self.edges.events_to_aggregate.get()),
                        ("events_to_sink", self.edges.events_to_sink.get()),
                        ("flows_to_sink", self.edges.flows_to_sink.get()),
                    ],
                ),
            ),
            Family::gauges(
                "ready",
                "1 when edges are connected and the output writable (as /readyz)",
                [(vec![], i64::from(self.health.check().is_ok()))],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_text_names_every_family_once_with_values() {
        let m = Metrics::default();
        m.capture.events.add(42);
        m.sink_flows.rows.add(7);
        m.edges.flows_to_sink.add(3);
        m.s3.observe(S3Op::Put, std::time::Duration::from_millis(30));
        let text = m.render_prometheus();
        for sample in [
            "tcplake_capture_events_total 42\n",
            "tcplake_sink_rows_total{dataset=\"flows\"} 7\n",
            "tcplake_edge_queue_depth{edge=\"flows_to_sink\"} 3\n",
            "tcplake_s3_request_duration_seconds_bucket{le=\"0.025\",op=\"put\"} 0\n",
            "tcplake_s3_request_duration_seconds_bucket{le=\"0.05\",op=\"put\"} 1\n",
            "tcplake_s3_request_duration_seconds_count{op=\"put\"} 1\n",
            "# TYPE tcplake_s3_request_duration_seconds histogram\n",
        ] {
            assert!(text.contains(sample), "{sample} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Every sample line is `name{labels} value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        // Each family is described once, and its samples follow it without interruption.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "HELP twice: {current}");
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&current), "{line} outside {current}");
            }
        }
        assert_eq!(seen.len(), m.families().len());
    }
}
