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
    /// Events whose window had already closed: left out of `flows/`, kept in `events/`.
    pub late_events: Counter,
    pub records_out: Counter,
    pub windows_closed: Counter,
}

/// Sink counters for one dataset.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub rows: Counter,
    pub batches: Counter,
    pub files: Counter,
    pub bytes: Counter,
    /// Capture-to-commit latency per batch, µs (events: when the rows became durable).
    pub latency_us: std::sync::Mutex<crate::aggregate::sketch::RttSketch>,
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
    pub broker: Arc<BrokerMetrics>,
    pub handoff: Arc<HandoffMetrics>,
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, labels: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP tcplake_{name} {help}\n# TYPE tcplake_{name} counter"
            );
            let _ = writeln!(out, "tcplake_{name}{labels} {v}");
        };
        let c = &self.capture;
        counter(
            "capture_events_total",
            "Events captured.",
            "",
            c.events.get(),
        );
        counter(
            "capture_batches_total",
            "Event batches captured.",
            "",
            c.batches.get(),
        );
        counter(
            "capture_decode_errors_total",
            "Kernel records skipped as undecodable.",
            "",
            c.decode_errors.get(),
        );
        counter(
            "capture_kernel_drops_total",
            "Records lost in the kernel ring buffer.",
            "",
            c.kernel_drops.get(),
        );
        let a = &self.aggregate;
        counter(
            "aggregate_events_total",
            "Events folded into windows.",
            "",
            a.events_in.get(),
        );
        counter(
            "aggregate_late_events_total",
            "Events past the watermark (kept in events/, not in flows/).",
            "",
            a.late_events.get(),
        );
        counter(
            "aggregate_records_total",
            "Flow records emitted.",
            "",
            a.records_out.get(),
        );
        counter(
            "aggregate_windows_closed_total",
            "Windows closed.",
            "",
            a.windows_closed.get(),
        );
        for (ds, s) in [("events", &self.sink_events), ("flows", &self.sink_flows)] {
            let l = format!("{{dataset=\"{ds}\"}}");
            counter("sink_rows_total", "Rows written.", &l, s.rows.get());
            counter("sink_files_total", "Files committed.", &l, s.files.get());
            counter("sink_bytes_total", "Bytes committed.", &l, s.bytes.get());
        }
        for (op, n) in self.s3.by_type() {
            counter(
                "s3_requests_total",
                "Requests to the S3 store, by type.",
                &format!("{{op=\"{op}\"}}"),
                n,
            );
        }
        counter(
            "s3_retries_total",
            "S3 attempts retried after a transient failure.",
            "",
            self.s3.retries.get(),
        );
        counter(
            "s3_uploaded_bytes_total",
            "Bytes uploaded to S3.",
            "",
            self.s3.bytes_uploaded.get(),
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
                "broker_publish_retries_total",
                "Publishes retried.",
                b.publish_retries.get(),
            ),
            (
                "broker_duplicates_dropped_total",
                "Re-published messages the broker dropped as duplicates.",
                b.duplicates_dropped.get(),
            ),
            (
                "broker_dead_letters_total",
                "Undecodable messages moved to the dead-letter stream.",
                b.dead_letters.get(),
            ),
            (
                "broker_redelivered_rows_skipped_total",
                "Rows received again and skipped (already written).",
                b.redelivered_rows_skipped.get(),
            ),
        ] {
            counter(name, help, "", v);
        }
        for (edge, g) in [
            ("events_to_aggregate", &self.edges.events_to_aggregate),
            ("events_to_sink", &self.edges.events_to_sink),
            ("flows_to_sink", &self.edges.flows_to_sink),
        ] {
            let _ = writeln!(
                out,
                "# HELP tcplake_edge_queue_depth Batches queued on an edge.\n# TYPE tcplake_edge_queue_depth gauge\ntcplake_edge_queue_depth{{edge=\"{edge}\"}} {}",
                g.get()
            );
        }
        out
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
            assert!(value.parse::<i64>().is_ok(), "{line}");
        }
    }
}
