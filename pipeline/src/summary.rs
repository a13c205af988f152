//! The end-of-run summary: what was captured, projected and written, and how fast.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::metrics::Metrics;

/// Figures printed when a run ends (text for people, JSON for scripts and `tcplake bench`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    /// Events this process captured (0 in an aggregator or a sink: see `events_handled`).
    pub events: u64,
    /// Events this process worked on: captured, else aggregated, else written to the event log.
    /// `events_per_sec` is of these, so an aggregator or a sink does not report 0 events/s.
    pub events_handled: u64,
    /// Records the kernel could not queue (ring buffer full).
    pub kernel_drops: u64,
    /// Kernel records skipped because they could not be decoded.
    pub decode_errors: u64,
    /// Events later than the late horizon (in `events/` only).
    pub late_events: u64,
    /// Events folded into windows already emitted (emitted again).
    pub late_folded: u64,
    /// Windows emitted again with more events.
    pub windows_rewritten: u64,
    pub flows: u64,
    pub windows: u64,
    pub event_rows: u64,
    pub flow_rows: u64,
    pub files: u64,
    pub bytes: u64,
    /// First event `seq` of this run: where the committed log of an earlier run ended (0 if none).
    pub resumed_at_seq: u64,
    /// Committed events fed to the aggregator again to rebuild the windows open at the last commit.
    pub replayed_events: u64,
    /// Capture-to-durable latency of event batches (median, 99th percentile), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    /// `DIR` or `s3://bucket/prefix`.
    pub out: String,
    /// Peak resident memory of this process (`VmHWM`), MiB: its own address space's, unlike a
    /// parent's `wait4` figure, which also holds the parent's own peak from before the `exec`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// Requests to S3 by type (absent when the process used no S3 store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_requests: Option<BTreeMap<&'static str, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_retries: Option<u64>,
    /// Requests of the Delta log to the output's store, by type (any store; on S3 also counted in
    /// `s3_requests`).
    pub delta_log_requests: BTreeMap<&'static str, u64>,
    /// Undecodable broker messages moved to the dead-letter stream.
    pub dead_letters: u64,
    /// Broker traffic of this process (split modes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerSummary>,
    /// Object-store hand-off traffic of this process (split modes over `--handoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffSummary>,
    /// The stage of a split mode that writes no output (`out` is where it hands over): its text
    /// says what it did, not "wrote 0 files".
    #[serde(skip)]
    pub hands_over: Option<HandsOver>,
}

/// Requests and bytes of the object-store hand-off edge.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HandoffSummary {
    pub puts: u64,
    pub gets: u64,
    pub misses: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
}

/// What crossed the broker boundary from or to this process.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BrokerSummary {
    pub published_messages: u64,
    pub published_bytes: u64,
    pub consumed_messages: u64,
    pub consumed_bytes: u64,
    pub acks: u64,
    pub publish_retries: u64,
    /// Consumers reopened after losing the broker.
    pub consumer_reconnects: u64,
    pub redelivered_rows_skipped: u64,
}

impl Summary {
    pub fn from_metrics(m: &Metrics, elapsed: Duration, out: String) -> Self {
        // Also a process whose S3 traffic is not its output's (an S3 hand-off, an S3 replay source).
        let s3 = out.starts_with("s3://") || m.s3.by_type().iter().any(|&(_, n)| n > 0);
        let secs = elapsed.as_secs_f64();
        let events = m.capture.events.get();
        let handled = [
            events,
            m.aggregate.events_in.get(),
            m.sink_events.rows.get(),
        ]
        .into_iter()
        .find(|&n| n > 0)
        .unwrap_or(0);
        Summary {
            events,
            events_handled: handled,
            kernel_drops: m.capture.kernel_drops.get(),
            decode_errors: m.capture.decode_errors.get(),
            late_events: m.aggregate.late_events.get(),
            late_folded: m.aggregate.late_folded.get(),
            windows_rewritten: m.aggregate.windows_rewritten.get(),
            flows: m.aggregate.records_out.get(),
            windows: m.aggregate.windows_closed.get(),
            event_rows: m.sink_events.rows.get(),
            flow_rows: m.sink_flows.rows.get(),
            files: m.sink_events.files.get() + m.sink_flows.files.get(),
            bytes: m.sink_events.bytes.get() + m.sink_flows.bytes.get(),
            resumed_at_seq: 0,
            replayed_events: 0,
            latency_p50_ms: m.sink_events.latency_ms().map(|l| l.0),
            latency_p99_ms: m.sink_events.latency_ms().map(|l| l.1),
            elapsed_secs: secs,
            events_per_sec: if secs > 0.0 {
                handled as f64 / secs
            } else {
                0.0
            },
            out,
            peak_rss_mib: peak_rss_mib(),
            s3_requests: s3.then(|| m.s3.by_type().into_iter().collect()),
            s3_retries: s3.then(|| m.s3.retries.get()),
            delta_log_requests: m.log.by_type().into_iter().collect(),
            dead_letters: m.broker.dead_letters.get(),
            broker: {
                let b = &m.broker;
                let used =
                    b.published_messages.get() + b.consumed_messages.get() + b.acks.get() > 0;
                used.then(|| BrokerSummary {
                    published_messages: b.published_messages.get(),
                    published_bytes: b.published_bytes.get(),
                    consumed_messages: b.consumed_messages.get(),
                    consumed_bytes: b.consumed_bytes.get(),
                    acks: b.acks.get(),
                    publish_retries: b.publish_retries.get(),
                    consumer_reconnects: b.consumer_reconnects.get(),
                    redelivered_rows_skipped: b.redelivered_rows_skipped.get(),
                })
            },
            handoff: {
                let h = &m.handoff;
                (h.puts.get() + h.gets.get() > 0).then(|| HandoffSummary {
                    puts: h.puts.get(),
                    gets: h.gets.get(),
                    misses: h.misses.get(),
                    bytes_written: h.bytes_written.get(),
                    bytes_read: h.bytes_read.get(),
                })
            },
            hands_over: None,
        }
    }
}

/// A stage that hands over to the next instead of writing an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandsOver {
    Capture,
    Aggregate,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A sink alone neither captures nor aggregates: its line is the one of what it wrote.
        let sink_only = self.events == 0 && self.flows == 0 && self.event_rows + self.flow_rows > 0;
        // A capture of a split mode aggregates nothing either: its line is the one of what it took.
        if self.hands_over == Some(HandsOver::Capture) {
            writeln!(
                f,
                "tcplake: {} events captured and handed over",
                self.events
            )?;
        } else if !sink_only {
            writeln!(
                f,
                "tcplake: {} events -> {} flow records in {} windows ({} later than the late \
                 horizon, kept in events/ only)",
                self.events_handled, self.flows, self.windows, self.late_events
            )?;
        }
        if self.windows_rewritten > 0 {
            writeln!(
                f,
                "tcplake: {} windows emitted again with {} later events (their rows replaced)",
                self.windows_rewritten, self.late_folded
            )?;
        }
        if self.kernel_drops > 0 || self.decode_errors > 0 {
            writeln!(
                f,
                "tcplake: {} records dropped in the kernel (ring buffer full), {} undecodable records skipped",
                self.kernel_drops, self.decode_errors
            )?;
        }
        if self.hands_over.is_none() {
            writeln!(
                f,
                "tcplake: wrote {} files, {:.1} MiB to {} ({} event rows, {} flow rows)",
                self.files,
                self.bytes as f64 / (1 << 20) as f64,
                self.out,
                self.event_rows,
                self.flow_rows
            )?;
        }
        if let Some(reqs) = &self.s3_requests {
            let list: Vec<String> = reqs
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(op, n)| format!("{op} {n}"))
                .collect();
            writeln!(
                f,
                "tcplake: S3 requests: {} ({} retried)",
                list.join(", "),
                self.s3_retries.unwrap_or(0)
            )?;
        }
        let log: Vec<String> = self
            .delta_log_requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        if !log.is_empty() {
            writeln!(f, "tcplake: Delta log requests: {}", log.join(", "))?;
        }
        if let Some(b) = &self.broker {
            writeln!(
                f,
                "tcplake: broker: published {} messages ({:.1} MiB), consumed {} ({:.1} MiB), {} dead-lettered",
                b.published_messages,
                b.published_bytes as f64 / (1 << 20) as f64,
                b.consumed_messages,
                b.consumed_bytes as f64 / (1 << 20) as f64,
                self.dead_letters
            )?;
        }
        write!(
            f,
            "tcplake: {:.2} s elapsed, {:.0} events/s",
            self.elapsed_secs, self.events_per_sec
        )
    }
}

/// `VmHWM` of this process from `/proc/self/status`, MiB (`None` where there is no such file).
fn peak_rss_mib() -> Option<f64> {
    vm_hwm_mib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Peak resident memory (`VmHWM`) in a `/proc/<pid>/status` text, MiB.
pub fn vm_hwm_mib(status: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
