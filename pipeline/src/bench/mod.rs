//! `tcplake bench`: the same synthetic workload through each deployment topology, as real separate
//! processes, measured and priced on one run.
//!
//! Per mode it records wall time, events/s, CPU-seconds and peak memory of every process (from
//! `wait4`, and from `/proc` for the broker), bytes and messages crossing process boundaries, and S3
//! requests; [`cost`] turns those counts into dollars per 10⁹ events. Every mode's `flows/` rows are
//! compared with the first mode's: a bench whose modes disagree fails.

pub mod cost;
mod procs;

/// Settings of `tcplake bench` from its flags.
pub fn config(args: &pipeline::config::BenchArgs) -> Result<BenchConfig, String> {
    let prices = match &args.prices {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read price table `{}`: {e}", p.display()))?;
            Prices::parse(&text).map_err(|e| format!("price table `{}`: {e}", p.display()))?
        }
        None => Prices::builtin(),
    };
    if args.events == 0 {
        return Err("--events must be at least 1".into());
    }
    if !(1..=64).contains(&args.shards) {
        return Err("--shards must be between 1 and 64".into());
    }
    let dir = args
        .report
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("tcplake-bench"));
    Ok(BenchConfig {
        events: args.events,
        seed: args.seed,
        modes: args.modes.clone(),
        shards: args.shards,
        prices,
        dir,
        exe: std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    })
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use cost::{cost_per_billion, Cost, Prices, Usage};
use pipeline::event::schema::batch_to_flows;
use pipeline::event::FlowRecord;
use procs::{Measured, NatsServer};

pub use pipeline::config::BenchMode;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub events: u64,
    pub seed: u64,
    pub modes: Vec<BenchMode>,
    /// Aggregator processes in the split modes.
    pub shards: u32,
    pub prices: Prices,
    /// Where outputs and the report go.
    pub dir: PathBuf,
    /// The `tcplake` binary to run (this one).
    pub exe: PathBuf,
}

/// Why the bench failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Process(String),
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "modes disagree: {mode} wrote {found} flow rows that differ from {baseline}'s ({expected} rows): \
         the bench measures nothing if the outputs are not the same"
    )]
    Mismatch {
        mode: &'static str,
        baseline: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("writing the report to {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One process of a mode's run.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub role: String,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
}

/// Everything measured for one mode.
#[derive(Clone, Debug, Serialize)]
pub struct ModeReport {
    pub mode: BenchMode,
    pub wall_seconds: f64,
    pub events_per_sec: f64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_million_events: f64,
    pub peak_rss_mib: f64,
    pub processes: Vec<ProcessReport>,
    /// Bytes that crossed a process boundary (to and from the broker or the hand-off store).
    pub boundary_bytes: u64,
    pub broker_messages: u64,
    /// Hand-off objects written, and GETs (polls included) issued for them.
    pub handoff_puts: u64,
    pub handoff_gets: u64,
    pub flow_rows: u64,
    pub files: u64,
    /// Capture-to-durable latency of event batches (the sink's figures), ms.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub usage: Usage,
    pub cost_per_billion_events: Cost,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub events: u64,
    pub seed: u64,
    pub machine: String,
    pub prices_source: String,
    pub modes: Vec<ModeReport>,
    /// Every mode wrote the same `flows/` rows as the first.
    pub identical_flows: bool,
}

/// Runs every mode, checks their outputs agree, and returns the measurements.
pub fn run(cfg: &BenchConfig) -> Result<Report, BenchError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| BenchError::Report {
        path: cfg.dir.clone(),
        source,
    })?;
    let mut modes = Vec::new();
    let mut baseline: Option<(BenchMode, Vec<FlowRecord>)> = None;
    for (i, &mode) in cfg.modes.iter().enumerate() {
        eprintln!(
            "bench: [{}/{}] {} ({} events)...",
            i + 1,
            cfg.modes.len(),
            mode.name(),
            cfg.events
        );
        let out = cfg.dir.join(mode.name());
        let _ = std::fs::remove_dir_all(&out);
        let report = match mode {
            BenchMode::Monolith => monolith(cfg, &out)?,
            BenchMode::SplitBroker => split_broker(cfg, &out)?,
            BenchMode::SplitObjectStore => split_object_store(cfg, &out)?,
        };
        let rows = read_flows(&out)?;
        match &baseline {
            None => baseline = Some((mode, rows)),
            Some((base, expected)) => same_rows(*base, expected, mode, &rows)?,
        }
        eprintln!(
            "bench: [{}/{}] {}: {:.1} s, {:.0} events/s, {:.2} CPU-s",
            i + 1,
            cfg.modes.len(),
            mode.name(),
            report.wall_seconds,
            report.events_per_sec,
            report.cpu_seconds
        );
        modes.push(report);
    }
    Ok(Report {
        events: cfg.events,
        seed: cfg.seed,
        machine: procs::machine(),
        prices_source: cfg.prices.source.clone(),
        modes,
        identical_flows: true,
    })
}

/// Flags every process of a topology takes.
fn base_args() -> Vec<String> {
    ["--node", "bench", "--summary", "json"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// What the capturing process takes: the workload.
fn source_args(cfg: &BenchConfig) -> Vec<String> {
    vec![
        "--source".into(),
        "synthetic".into(),
        "--seed".into(),
        cfg.seed.to_string(),
        "--events".into(),
        cfg.events.to_string(),
    ]
}

/// What the writing process takes: the output.
fn out_args(out: &Path) -> Vec<String> {
    vec!["--out".into(), out.display().to_string()]
}

fn monolith(cfg: &BenchConfig, out: &Path) -> Result<ModeReport, BenchError> {
    let started = Instant::now();
    let mut args = base_args();
    args.extend(source_args(cfg));
    args.extend(out_args(out));
    args.extend(["--mode".into(), "monolith".into()]);
    let p = procs::spawn(&cfg.exe, "monolith", &args)?.finish()?;
    Ok(mode_report(
        cfg,
        BenchMode::Monolith,
        started.elapsed(),
        vec![p],
        None,
    ))
}

fn split_broker(cfg: &BenchConfig, out: &Path) -> Result<ModeReport, BenchError> {
    let nats = NatsServer::start(&cfg.dir.join("nats-store"))?;
    let started = Instant::now();
    let done = split_processes(cfg, out, &["--broker".into(), nats.url()])?;
    let wall = started.elapsed();
    let broker = nats.stop(wall)?;
    Ok(mode_report(
        cfg,
        BenchMode::SplitBroker,
        wall,
        done,
        Some(broker),
    ))
}

fn split_object_store(cfg: &BenchConfig, out: &Path) -> Result<ModeReport, BenchError> {
    let store = cfg.dir.join("handoff-store");
    let _ = std::fs::remove_dir_all(&store);
    let started = Instant::now();
    let done = split_processes(cfg, out, &["--handoff".into(), store.display().to_string()])?;
    let wall = started.elapsed();
    Ok(mode_report(
        cfg,
        BenchMode::SplitObjectStore,
        wall,
        done,
        None,
    ))
}

/// Capture, `shards` aggregators and a sink, joined by the edge `edge_args` selects.
fn split_processes(
    cfg: &BenchConfig,
    out: &Path,
    edge_args: &[String],
) -> Result<Vec<Measured>, BenchError> {
    let base = |mode: &str| {
        let mut a = base_args();
        a.extend(["--mode".into(), mode.into()]);
        a.extend(edge_args.iter().cloned());
        a
    };
    let mut a = base("capture");
    a.extend(source_args(cfg));
    let capture = procs::spawn(&cfg.exe, "capture", &a)?;
    let mut aggs = Vec::new();
    for i in 0..cfg.shards {
        let mut a = base("aggregate");
        a.extend(["--shard".into(), format!("{i}/{}", cfg.shards)]);
        let role = format!("aggregate {i}/{}", cfg.shards);
        aggs.push(procs::spawn(&cfg.exe, &role, &a)?);
    }
    let mut a = base("sink");
    a.extend(out_args(out));
    let sink = procs::spawn(&cfg.exe, "sink", &a)?;
    let mut done = vec![capture.finish()?];
    for agg in aggs {
        done.push(agg.finish()?);
    }
    done.push(sink.finish()?);
    Ok(done)
}

fn mode_report(
    cfg: &BenchConfig,
    mode: BenchMode,
    wall: Duration,
    procs: Vec<Measured>,
    broker: Option<Measured>,
) -> ModeReport {
    let secs = wall.as_secs_f64();
    let all: Vec<&Measured> = procs.iter().chain(broker.iter()).collect();
    let cpu: f64 = all.iter().map(|p| p.cpu_seconds).sum();
    let peak: f64 = all.iter().map(|p| p.peak_rss_mib).sum();
    let field = |p: &Measured, path: &[&str]| -> u64 {
        let mut v = &p.summary;
        for k in path {
            v = &v[*k];
        }
        v.as_u64().unwrap_or(0)
    };
    let sum = |path: &[&str]| procs.iter().map(|p| field(p, path)).sum::<u64>();
    let published = sum(&["broker", "published_bytes"]) + sum(&["handoff", "bytes_written"]);
    let consumed = sum(&["broker", "consumed_bytes"]) + sum(&["handoff", "bytes_read"]);
    let handoff_puts = sum(&["handoff", "puts"]);
    let messages = sum(&["broker", "published_messages"]) + sum(&["broker", "consumed_messages"]);
    let files = sum(&["files"]);
    // Store requests by type, as if the output were on S3: a process writing to S3 counted all of
    // them; one writing to a directory counted its Delta log's, to which each data file adds a PUT.
    let requests = |ops: &[&str]| -> u64 {
        let mut n = 0;
        for p in &procs {
            let on_s3 = p.summary["s3_requests"].is_object();
            let by = if on_s3 {
                "s3_requests"
            } else {
                "delta_log_requests"
            };
            n += ops.iter().map(|op| field(p, &[by, op])).sum::<u64>();
            if !on_s3 && ops.contains(&"put") {
                n += field(p, &["files"]);
            }
        }
        n
    };
    let usage = Usage {
        events: cfg.events,
        cpu_seconds: cpu,
        gb_seconds: all.iter().map(|p| p.peak_rss_mib / 1024.0 * secs).sum(),
        // The output is priced as if written to S3: one PUT per data file, plus the Delta log's own
        // requests as counted (commits, snapshot LISTs and GETs, checkpoints).
        // (Multipart requests are PUT-class too; an aborted upload is a free DELETE.)
        s3_writes: requests(&[
            "put",
            "list",
            "copy",
            "create_multipart",
            "upload_part",
            "complete_multipart",
            "other",
        ]) + handoff_puts,
        s3_reads: requests(&["get", "head"]) + sum(&["handoff", "gets"]),
        broker_requests: messages,
        // Every object handed from one stage to the next is one orchestrated step.
        handoffs: handoff_puts,
    };
    let cost = cost_per_billion(&usage, &cfg.prices);
    ModeReport {
        mode,
        wall_seconds: secs,
        events_per_sec: cfg.events as f64 / secs.max(1e-9),
        cpu_seconds: cpu,
        cpu_seconds_per_million_events: cpu / (cfg.events as f64 / 1e6).max(1e-9),
        peak_rss_mib: peak,
        processes: all
            .iter()
            .map(|p| ProcessReport {
                role: p.role.clone(),
                cpu_seconds: p.cpu_seconds,
                peak_rss_mib: p.peak_rss_mib,
            })
            .collect(),
        boundary_bytes: published + consumed,
        broker_messages: messages,
        handoff_puts,
        handoff_gets: sum(&["handoff", "gets"]),
        flow_rows: sum(&["flow_rows"]),
        latency_p50_ms: procs
            .iter()
            .filter_map(|p| p.summary["latency_p50_ms"].as_f64())
            .fold(0.0, f64::max),
        latency_p99_ms: procs
            .iter()
            .filter_map(|p| p.summary["latency_p99_ms"].as_f64())
            .fold(0.0, f64::max),
        files,
        usage,
        cost_per_billion_events: cost,
    }
}

/// A mode's rows must equal the baseline's, or the bench fails.
fn same_rows(
    baseline: BenchMode,
    expected: &[FlowRecord],
    mode: BenchMode,
    rows: &[FlowRecord],
) -> Result<(), BenchError> {
    if rows == expected {
        return Ok(());
    }
    Err(BenchError::Mismatch {
        mode: mode.name(),
        baseline: baseline.name(),
        found: rows.len(),
        expected: expected.len(),
    })
}

/// Every flow row under `dir`, sorted (file names differ between modes; rows must not).
/// Every row of the `flows` table of the output at `out` (its current snapshot), sorted.
pub fn read_flows(out: &Path) -> Result<Vec<FlowRecord>, BenchError> {
    let err = |reason: String| BenchError::Read {
        path: out.join("flows"),
        reason,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut rows = rt.block_on(async {
        let store = pipeline::storage::Store::Local(
            pipeline::storage::LocalDir::open_read_only(out).map_err(|e| err(e.to_string()))?,
        );
        let Some(table) = pipeline::lake::Table::open(&store, pipeline::lake::Dataset::Flows)
            .await
            .map_err(|e| err(e.to_string()))?
        else {
            return Ok(Vec::new());
        };
        let mut rows = Vec::new();
        for f in table.files().map_err(|e| err(e.to_string()))? {
            let key = format!("flows/{}", f.path);
            for batch in pipeline::lake::read::open(&store, &key, 65_536)
                .await
                .map_err(|e| err(e.to_string()))?
            {
                let batch = batch.map_err(|e| err(e.to_string()))?;
                rows.extend(batch_to_flows(&batch).map_err(|e| err(e.to_string()))?);
            }
        }
        Ok::<_, BenchError>(rows)
    })?;
    rows.sort_by(|a, b| (a.window_start_us, &a.key).cmp(&(b.window_start_us, &b.key)));
    Ok(rows)
}

impl Report {
    /// The terminal table (also the heart of the Markdown report).
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "| mode | wall s | events/s | CPU s | CPU s / M events | peak RSS MiB | boundary MiB | broker msgs | hand-off PUT/GET | latency p50/p99 ms | $ / 10^9 events (compute + S3 + broker + orchestration) |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for m in &self.modes {
            let c = &m.cost_per_billion_events;
            s.push_str(&format!(
                "| {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {} | {}/{} | {:.0}/{:.0} | **{:.2}** = {:.2} + {:.2} + {:.2} + {:.2} |\n",
                m.mode.name(),
                m.wall_seconds,
                m.events_per_sec,
                m.cpu_seconds,
                m.cpu_seconds_per_million_events,
                m.peak_rss_mib,
                m.boundary_bytes as f64 / (1 << 20) as f64,
                m.broker_messages,
                m.handoff_puts,
                m.handoff_gets,
                m.latency_p50_ms,
                m.latency_p99_ms,
                c.total,
                c.compute,
                c.s3_requests,
                c.broker,
                c.orchestration
            ));
        }
        if let (Some(base), true) = (self.modes.first(), self.modes.len() > 1) {
            for m in &self.modes[1..] {
                s.push_str(&format!(
                    "\n{} vs {}: {:.2}x the CPU per event, {:.2}x the cost per event, {:.2}x the throughput",
                    m.mode.name(),
                    base.mode.name(),
                    m.cpu_seconds / base.cpu_seconds.max(1e-9),
                    m.cost_per_billion_events.total / base.cost_per_billion_events.total.max(1e-12),
                    m.events_per_sec / base.events_per_sec.max(1e-9),
                ));
            }
            s.push('\n');
        }
        s
    }

    pub fn markdown(&self) -> String {
        format!(
            "# tcplake bench\n\n{} synthetic events (seed {}), every mode as real processes on {}.\n\
             Every mode wrote identical `flows/` rows: {}.\n\nPrices: {}.\n\n{}\n![throughput and cost](report.svg)\n",
            self.events,
            self.seed,
            self.machine,
            self.identical_flows,
            self.prices_source,
            self.table()
        )
    }

    /// A bar chart of throughput and cost per mode (plain SVG, viewable anywhere).
    pub fn svg(&self) -> String {
        let (w, bar_h, gap, left) = (760.0_f64, 26.0_f64, 10.0_f64, 170.0_f64);
        let n = self.modes.len() as f64;
        let panel_h = 40.0 + n * (bar_h + gap);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
            panel_h * 2.0 + 20.0
        );
        type Value = fn(&ModeReport) -> f64;
        let panels: [(&str, Value, &str); 2] = [
            (
                "Throughput (events/s, higher is better)",
                |m| m.events_per_sec,
                "#4878a8",
            ),
            (
                "Cost ($ per 10^9 events, lower is better)",
                |m| m.cost_per_billion_events.total,
                "#c0504d",
            ),
        ];
        for (p, (title, value, colour)) in panels.iter().enumerate() {
            let top = p as f64 * (panel_h + 20.0);
            let max = self
                .modes
                .iter()
                .map(value)
                .fold(0.0_f64, f64::max)
                .max(1e-12);
            s.push_str(&format!(
                "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{title}</text>\n",
                top + 22.0
            ));
            for (i, m) in self.modes.iter().enumerate() {
                let y = top + 36.0 + i as f64 * (bar_h + gap);
                let v = value(m);
                let len = (w - left - 120.0) * v / max;
                s.push_str(&format!(
                    "<text x=\"10\" y=\"{}\">{}</text><rect x=\"{left}\" y=\"{y}\" width=\"{len:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>\n",
                    y + 18.0,
                    m.mode.name(),
                    left + len + 6.0,
                    y + 18.0,
                    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
                ));
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// Writes `report.json`, `report.md` and `report.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), BenchError> {
        let w = |name: &str, body: String| {
            let path = dir.join(name);
            std::fs::write(&path, body).map_err(|source| BenchError::Report { path, source })
        };
        w(
            "report.json",
            serde_json::to_string_pretty(self).expect("a report serializes"),
        )?;
        w("report.md", self.markdown())?;
        w("report.svg", self.svg())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_synthetic(dir: &Path, seed: u64, events: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (seed, events, out) = (seed.to_string(), events.to_string(), dir.to_str().unwrap());
        let args = [
            "tcplake",
            "--source",
            "synthetic",
            "--seed",
            &seed,
            "--events",
            &events,
            "--out",
            out,
            "--node",
            "bench",
        ];
        let cli = pipeline::config::Cli::try_parse_args(args).unwrap();
        let s = pipeline::config::Settings::resolve(&cli).unwrap();
        let (_t, l) = pipeline::shutdown::channel();
        rt.block_on(pipeline::mode::run(&s, Default::default(), l))
            .unwrap();
    }

    #[test]
    fn identical_outputs_compare_equal_and_a_broken_one_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        run_synthetic(&a, 4, 30_000);
        run_synthetic(&b, 4, 30_000);
        // A "broken mode": the same workload with one event fewer.
        run_synthetic(&c, 4, 29_999);
        let (ra, rb, rc) = (
            read_flows(&a).unwrap(),
            read_flows(&b).unwrap(),
            read_flows(&c).unwrap(),
        );
        assert!(!ra.is_empty());
        let (m, s) = (BenchMode::Monolith, BenchMode::SplitBroker);
        same_rows(m, &ra, s, &rb).unwrap();
        let err = same_rows(m, &ra, s, &rc).unwrap_err();
        assert!(err.to_string().contains("modes disagree"), "{err}");
        // One changed value in one row is caught too.
        let mut tampered = rb.clone();
        tampered[7].bytes_sent += 1;
        assert!(same_rows(m, &ra, s, &tampered).is_err());
    }
}
