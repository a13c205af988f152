//! Every metric tcplake exposes, named in one place.
//!
//! Stages count locally in their hot loops and publish here once per batch, so an atomic add is paid
//! per batch, not per event. The same values feed the end-of-run summary and the Prometheus text
//! rendering ([`Metrics::render_prometheus`]).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

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
}

/// Upper bounds (seconds) of the request-duration histogram buckets.
const DURATION_BOUNDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram of durations: a count per bucket, plus the sum and the count.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations in bucket `i` (not cumulative; `DURATION_BOUNDS.len()` is +Inf).
    buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per upper bound (`+Inf` last), sum in seconds, count.
    fn snapshot(&self) -> (Vec<(String, u64)>, f64, u64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            let le = DURATION_BOUNDS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            out.push((le, total));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (out, sum, total)
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

/// Requests to the S3 store, by type: each attempt counts (retries included), as each is billed.
#[derive(Debug, Default)]
pub struct S3Metrics {
    pub put: Counter,
    pub create_multipart: Counter,
    pub upload_part: Counter,
    pub complete_multipart: Counter,
    pub abort_multipart: Counter,
    pub head: Counter,
    pub list: Counter,
    pub get: Counter,
    pub delete: Counter,
    /// Attempts that failed transiently and were tried again.
    pub retries: Counter,
    pub bytes_uploaded: Counter,
    pub bytes_downloaded: Counter,
    /// Duration of each attempt, by request type (same order as [`S3Metrics::by_type`]).
    pub durations: [Histogram; 9],
}

impl S3Metrics {
    /// Counts one request of type `op` (the names used by the S3 store).
    pub fn count(&self, op: &str) {
        match op {
            "put" => &self.put,
            "create_multipart" => &self.create_multipart,
            "upload_part" => &self.upload_part,
            "complete_multipart" => &self.complete_multipart,
            "abort_multipart" => &self.abort_multipart,
            "head" => &self.head,
            "list" => &self.list,
            "delete" => &self.delete,
            _ => &self.get,
        }
        .add(1);
    }

    /// Records how long one attempt of `op` took.
    pub fn observe(&self, op: &str, d: std::time::Duration) {
        let i = S3_OPS.iter().position(|&o| o == op).unwrap_or(7);
        self.durations[i].observe(d);
    }

    /// (type, count) for every request type.
    pub fn by_type(&self) -> [(&'static str, u64); 9] {
        [
            ("put", self.put.get()),
            ("create_multipart", self.create_multipart.get()),
            ("upload_part", self.upload_part.get()),
            ("complete_multipart", self.complete_multipart.get()),
            ("abort_multipart", self.abort_multipart.get()),
            ("head", self.head.get()),
            ("list", self.list.get()),
            ("get", self.get.get()),
            ("delete", self.delete.get()),
        ]
    }
}

/// Request types, in the order of [`S3Metrics::by_type`] and [`S3Metrics::durations`].
const S3_OPS: [&str; 9] = [
    "put",
    "create_multipart",
    "upload_part",
    "complete_multipart",
    "abort_multipart",
    "head",
    "list",
    "get",
    "delete",
];

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

/// Builds the text exposition: each family's HELP and TYPE once, then all its samples together.
struct Exposition(String);

impl Exposition {
    fn family<V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, V)>,
    ) {
        let _ = writeln!(
            self.0,
            "# HELP tcplake_{name} {help}\n# TYPE tcplake_{name} {kind}"
        );
        for (labels, v) in samples {
            let _ = writeln!(self.0, "tcplake_{name}{labels} {v}");
        }
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "counter", help, [(String::new(), v)]);
    }
}

fn label(key: &str, value: &str) -> String {
    format!("{{{key}=\"{value}\"}}")
}

impl Metrics {
    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut x = Exposition(String::new());
        let c = &self.capture;
        x.counter("capture_events_total", "Events captured.", c.events.get());
        x.counter(
            "capture_batches_total",
            "Event batches captured.",
            c.batches.get(),
        );
        x.counter(
            "capture_kernel_drops_total",
            "Records lost in the kernel ring buffer (it was full).",
            c.kernel_drops.get(),
        );
        let a = &self.aggregate;
        x.counter(
            "aggregate_events_total",
            "Events folded into windows.",
            a.events_in.get(),
        );
        x.counter(
            "aggregate_late_events_total",
            "Events later than the late horizon (kept in events/, not in flows/).",
            a.late_events.get(),
        );
        x.counter(
            "aggregate_late_folded_total",
            "Events for a window already emitted, folded in (the window is emitted again).",
            a.late_folded.get(),
        );
        x.counter(
            "aggregate_records_total",
            "Flow records emitted.",
            a.records_out.get(),
        );
        x.counter(
            "aggregate_windows_closed_total",
            "Windows emitted for the first time.",
            a.windows_closed.get(),
        );
        x.counter(
            "aggregate_windows_rewritten_total",
            "Windows emitted again with more events (their rows replace the earlier ones).",
            a.windows_rewritten.get(),
        );
        let sinks = [("events", &self.sink_events), ("flows", &self.sink_flows)];
        for (name, help, get) in [
            (
                "sink_rows_total",
                "Rows committed.",
                (|s: &SinkMetrics| s.rows.get()) as fn(&SinkMetrics) -> u64,
            ),
            ("sink_batches_total", "Batches received.", |s| {
                s.batches.get()
            }),
            ("sink_files_total", "Files committed.", |s| s.files.get()),
            ("sink_bytes_total", "Bytes committed.", |s| s.bytes.get()),
        ] {
            x.family(
                name,
                "counter",
                help,
                sinks.map(|(ds, s)| (label("dataset", ds), get(s))),
            );
        }
        x.family(
            "delta_log_requests_total",
            "counter",
            "Requests of the Delta log to the output's store, by type (any store; on S3 also in s3_requests_total).",
            self.log.by_type().map(|(op, n)| (label("op", op), n)),
        );
        x.family(
            "s3_requests_total",
            "counter",
            "Requests to the S3 store, by type (every attempt, as billed).",
            self.s3.by_type().map(|(op, n)| (label("op", op), n)),
        );
        let mut samples = Vec::new();
        let mut sums = Vec::new();
        let mut counts = Vec::new();
        for (op, h) in S3_OPS.iter().zip(&self.s3.durations) {
            let (buckets, sum, count) = h.snapshot();
            for (le, n) in buckets {
                samples.push((format!("_bucket{{op=\"{op}\",le=\"{le}\"}}"), n.to_string()));
            }
            sums.push((format!("_sum{}", label("op", op)), sum.to_string()));
            counts.push((format!("_count{}", label("op", op)), count.to_string()));
        }
        samples.extend(sums);
        samples.extend(counts);
        x.family(
            "s3_request_duration_seconds",
            "histogram",
            "Duration of S3 request attempts, by type.",
            samples,
        );
        x.counter(
            "s3_uploaded_bytes_total",
            "Bytes uploaded to S3.",
            self.s3.bytes_uploaded.get(),
        );
        x.counter(
            "s3_downloaded_bytes_total",
            "Bytes downloaded from S3.",
            self.s3.bytes_downloaded.get(),
        );
        let b = &self.broker;
        for (name, help, v) in [
            (
                "broker_published_messages_total",
                "Messages published to the broker.",
                b.published_messages.get(),
            ),
            (
                "broker_published_bytes_total",
                "Bytes published to the broker.",
                b.published_bytes.get(),
            ),
            (
                "broker_consumed_messages_total",
                "Messages consumed from the broker.",
                b.consumed_messages.get(),
            ),
            (
                "broker_consumed_bytes_total",
                "Bytes consumed from the broker.",
                b.consumed_bytes.get(),
            ),
            ("broker_acks_total", "Messages acknowledged.", b.acks.get()),
            (
                "broker_duplicates_dropped_total",
                "Re-published messages the broker dropped as duplicates.",
                b.duplicates_dropped.get(),
            ),
            (
                "broker_consumer_reconnects_total",
                "Consumers reopened after losing the broker.",
                b.consumer_reconnects.get(),
            ),
            (
                "broker_redelivered_rows_skipped_total",
                "Rows received again (restart or redelivery) and skipped: already written.",
                b.redelivered_rows_skipped.get(),
            ),
        ] {
            x.counter(name, help, v);
        }
        let h = &self.handoff;
        x.family(
            "handoff_requests_total",
            "counter",
            "Object-store hand-off requests, by type (GETs include polls that found nothing).",
            [("put", h.puts.get()), ("get", h.gets.get())].map(|(op, n)| (label("op", op), n)),
        );
        x.family(
            "errors_total",
            "counter",
            "Errors survived, by kind: each was counted and the data kept or retried, never dropped \
             silently (fatal errors end the run with a message instead).",
            [
                ("kernel_record_undecodable", c.decode_errors.get()),
                ("s3_transient_retried", self.s3.retries.get()),
                ("broker_publish_retried", b.publish_retries.get()),
                ("broker_message_dead_lettered", b.dead_letters.get()),
            ]
            .map(|(kind, n)| (label("kind", kind), n)),
        );
        x.family(
            "edge_queue_depth",
            "gauge",
            "Batches queued on an in-process edge.",
            [
                ("events_to_aggregate", &self.edges.events_to_aggregate),
                ("events_to_sink", &self.edges.events_to_sink),
                ("flows_to_sink", &self.edges.flows_to_sink),
            ]
            .map(|(edge, g)| (label("edge", edge), g.get())),
        );
        x.family(
            "ready",
            "gauge",
            "1 when edges are connected and the output writable (as /readyz).",
            [(String::new(), u8::from(self.health.check().is_ok()))],
        );
        x.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_every_family_once_with_values() {
        let m = Metrics::default();
        m.capture.events.add(42);
        m.sink_flows.rows.add(7);
        m.edges.flows_to_sink.add(3);
        let text = m.render_prometheus();
        assert!(text.contains("tcplake_capture_events_total 42\n"), "{text}");
        assert!(
            text.contains("tcplake_sink_rows_total{dataset=\"flows\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("tcplake_edge_queue_depth{edge=\"flows_to_sink\"} 3\n"),
            "{text}"
        );
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
        m.s3.observe("put", std::time::Duration::from_millis(30));
        let text = m.render_prometheus();
        assert!(text
            .contains("tcplake_s3_request_duration_seconds_bucket{op=\"put\",le=\"0.025\"} 0\n"));
        assert!(
            text.contains("tcplake_s3_request_duration_seconds_bucket{op=\"put\",le=\"0.05\"} 1\n")
        );
        assert!(text.contains("tcplake_s3_request_duration_seconds_count{op=\"put\"} 1\n"));
    }
}
