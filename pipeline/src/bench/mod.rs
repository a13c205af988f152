//! `tcplake bench`: the same synthetic workload through each deployment topology, as real separate
//! processes, measured and priced on one run.
//!
//! Per mode and capture-node count it records wall time, events/s, CPU-seconds (`wait4`) and peak
//! memory (each process's own `VmHWM`; `/proc` for the broker) of every process, bytes and messages
//! crossing process boundaries, and S3 requests; [`cost`] turns those counts into dollars per 10⁹
//! events. At each node count every mode's `flows/` rows are compared with the first mode's: a bench
//! whose modes disagree fails.

pub mod cost;
mod procs;

/// The global S3 flags, which reach an `s3://` hand-off.
#[derive(Clone, Debug, Default)]
pub struct S3Flags {
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

/// Settings of `tcplake bench` from its flags.
pub fn config(args: &pipeline::config::BenchArgs, s3: S3Flags) -> Result<BenchConfig, String> {
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
    if !(1..=64).contains(&args.sinks) {
        return Err("--sinks must be between 1 and 64".into());
    }
    if args.nodes.is_empty() || args.nodes.iter().any(|n| !(1..=64).contains(n)) {
        return Err("--nodes takes counts between 1 and 64 (for example --nodes 1,2,4,8)".into());
    }
    let most = args.nodes.iter().copied().max().unwrap_or(1);
    if args.events.checked_mul(u64::from(most)).is_none() {
        return Err(format!(
            "--events {} x {most} nodes is more events than a run can count",
            args.events
        ));
    }
    if args.handoff.is_some() && !args.modes.contains(&BenchMode::SplitObjectStore) {
        return Err(
            "--handoff is where split-object-store hands over, and --modes leaves it out".into(),
        );
    }
    let dir = args
        .report
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("tcplake-bench"));
    let handoff = match args.handoff.as_deref().map(pipeline::config::location) {
        Some(Err(e)) => {
            return Err(format!(
                "invalid hand-off store `{}`: {e}",
                args.handoff.as_deref().unwrap_or_default()
            ))
        }
        Some(Ok(Location::S3 { bucket, prefix })) => Handoff::S3 { bucket, prefix, s3 },
        other => {
            if s3.endpoint.is_some() || s3.region.is_some() {
                return Err(
                    "--s3-endpoint/--s3-region apply to an S3 hand-off: give --handoff s3://BUCKET/PREFIX"
                        .into(),
                );
            }
            match other {
                Some(Ok(Location::Dir(d))) => Handoff::Dir(d),
                _ => Handoff::Dir(dir.join("handoff-store")),
            }
        }
    };
    Ok(BenchConfig {
        events: args.events,
        seed: args.seed,
        modes: args.modes.clone(),
        shards: args.shards,
        sinks: args.sinks,
        partitioned: args.partitioned,
        nodes: args.nodes.clone(),
        handoff,
        prices,
        dir,
        exe: std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    })
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use cost::{cost_per_billion, Cost, Prices, Usage};
use pipeline::config::Location;
use pipeline::event::schema::batch_to_flows;
use pipeline::event::FlowRecord;
use procs::{Measured, NatsServer};

pub use pipeline::config::BenchMode;

/// Where split-object-store hands batches over.
#[derive(Clone, Debug)]
pub enum Handoff {
    /// A local directory (requests are counted by the edge and priced as if S3).
    Dir(PathBuf),
    /// An S3-compatible store: every request counted is one made.
    S3 {
        bucket: String,
        prefix: String,
        s3: S3Flags,
    },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Synthetic events per capture node.
    pub events: u64,
    pub seed: u64,
    pub modes: Vec<BenchMode>,
    /// Aggregator processes in the split modes.
    pub shards: u32,
    /// Sink processes over the broker, each writing its part of the output (`--sink-part`).
    pub sinks: u32,
    /// split-broker: the events stream partitioned, one partition per aggregator.
    pub partitioned: bool,
    /// Capture-node counts: every mode runs once per count.
    pub nodes: Vec<u32>,
    pub handoff: Handoff,
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

/// Everything measured for one mode at one node count.
#[derive(Clone, Debug, Serialize)]
pub struct ModeReport {
    pub mode: BenchMode,
    /// Capture processes (nodes) in this run.
    pub nodes: u32,
    /// Events the capture processes captured: `nodes` x the events per node.
    pub events: u64,
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
    /// The hand-off went through an S3-compatible store: its requests in `usage` were made, not
    /// modelled.
    pub handoff_on_s3: bool,
    pub flow_rows: u64,
    pub files: u64,
    /// Capture-to-durable latency of event batches, ms: the sinks' figures (with several sinks or
    /// monoliths, the worst process's percentile, not one over the whole run).
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub usage: Usage,
    pub cost_per_billion_events: Cost,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Synthetic events per capture node.
    pub events: u64,
    pub seed: u64,
    /// The node counts run, in order.
    pub nodes: Vec<u32>,
    pub machine: String,
    pub prices_source: String,
    /// Aggregator processes in the split modes, and sinks over the broker.
    pub shards: u32,
    pub sinks: u32,
    /// split-broker ran on a partitioned events stream (one partition per aggregator).
    pub partitioned: bool,
    /// One entry per (mode, node count), node counts in order and modes in order within each.
    pub modes: Vec<ModeReport>,
    /// At every node count, every mode wrote the same `flows/` rows as the first.
    pub identical_flows: bool,
}

/// Runs every mode at every node count, checks the outputs of each count agree, and returns the
/// measurements.
pub fn run(cfg: &BenchConfig) -> Result<Report, BenchError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| BenchError::Report {
        path: cfg.dir.clone(),
        source,
    })?;
    let mut modes = Vec::new();
    let runs = cfg.nodes.len() * cfg.modes.len();
    let mut done = 0;
    for &nodes in &cfg.nodes {
        let mut baseline: Option<(BenchMode, Vec<FlowRecord>)> = None;
        for &mode in &cfg.modes {
            done += 1;
            eprintln!(
                "bench: [{done}/{runs}] {} with {nodes} node(s) ({} events each)...",
                mode.name(),
                cfg.events
            );
            let run = Run {
                cfg,
                nodes,
                started_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis()),
            };
            let out = cfg.dir.join(format!("{}-{nodes}", mode.name()));
            let _ = std::fs::remove_dir_all(&out);
            let report = match mode {
                BenchMode::Monolith => run.monolith(&out)?,
                BenchMode::SplitBroker => run.split_broker(&out)?,
                BenchMode::SplitObjectStore => run.split_object_store(&out)?,
            };
            let rows = read_flows(&out)?;
            match &baseline {
                None => baseline = Some((mode, rows)),
                Some((base, expected)) => same_rows(*base, expected, mode, &rows)?,
            }
            eprintln!(
                "bench: [{done}/{runs}] {} with {nodes} node(s): {:.1} s, {:.0} events/s, {:.2} CPU-s",
                mode.name(),
                report.wall_seconds,
                report.events_per_sec,
                report.cpu_seconds
            );
            modes.push(report);
        }
    }
    Ok(Report {
        events: cfg.events,
        seed: cfg.seed,
        nodes: cfg.nodes.clone(),
        machine: procs::machine(),
        prices_source: cfg.prices.source.clone(),
        shards: cfg.shards,
        sinks: cfg.sinks,
        partitioned: cfg.partitioned && cfg.shards > 1,
        modes,
        identical_flows: true,
    })
}

/// One topology at one node count.
struct Run<'a> {
    cfg: &'a BenchConfig,
    nodes: u32,
    /// When it started (ms since the epoch): names its own hand-off location.
    started_ms: u128,
}

/// Capture node `i`'s name: its streams, its event-log producer, its flow rows.
fn node_name(i: u32) -> String {
    format!("bench-{i}")
}

/// Flags every process of a topology takes.
fn base_args(node: &str) -> Vec<String> {
    vec![
        "--node".into(),
        node.into(),
        "--summary".into(),
        "json".into(),
    ]
}

/// What to write: the output.
fn out_args(out: &Path) -> Vec<String> {
    vec!["--out".into(), out.display().to_string()]
}

impl Run<'_> {
    /// What capture node `i` takes: its share of the workload (its own seed).
    fn source_args(&self, i: u32) -> Vec<String> {
        vec![
            "--source".into(),
            "synthetic".into(),
            "--seed".into(),
            self.cfg.seed.wrapping_add(u64::from(i)).to_string(),
            "--events".into(),
            self.cfg.events.to_string(),
        ]
    }

    /// One monolith per node, all writing the one output.
    fn monolith(&self, out: &Path) -> Result<ModeReport, BenchError> {
        let started = Instant::now();
        let mut running = Vec::new();
        for i in 0..self.nodes {
            let mut args = base_args(&node_name(i));
            args.extend(self.source_args(i));
            args.extend(out_args(out));
            args.extend(["--mode".into(), "monolith".into()]);
            running.push(procs::spawn(
                &self.cfg.exe,
                &self.tier_role("monolith".into(), Some(&node_name(i))),
                &args,
            )?);
        }
        let done = finish_all(running)?;
        Ok(self.report(BenchMode::Monolith, started.elapsed(), done, None))
    }

    /// Every node's capture into one broker, one tier of aggregators, one sink.
    fn split_broker(&self, out: &Path) -> Result<ModeReport, BenchError> {
        let nats = NatsServer::start(&self.cfg.dir.join("nats-store"))?;
        // Streams large enough for the whole run (at most 64 bytes per event; the default 1 GiB
        // would refuse publishes past ~50 M events and stall the captures).
        let conf = self.cfg.dir.join("broker.toml");
        let mib = (self.cfg.events * u64::from(self.nodes) * 64 / (1 << 20)).max(1024);
        let partitions = match self.cfg.partitioned {
            true => format!("partitions = {}\n", self.cfg.shards),
            false => String::new(),
        };
        std::fs::write(
            &conf,
            format!("[broker]\nmax_bytes = \"{mib}MiB\"\n{partitions}"),
        )
        .map_err(|source| BenchError::Report {
            path: conf.clone(),
            source,
        })?;
        let edge = [
            "--broker".to_string(),
            nats.url(),
            "--config".into(),
            conf.display().to_string(),
        ];
        let started = Instant::now();
        let mut running = Vec::new();
        for i in 0..self.nodes {
            running.push(self.capture(i, &edge)?);
        }
        // A finite run ends for a consumer once every node it has seen has ended: the aggregators and
        // the sink start once every node has published, or one whose first batch came late would be
        // missed.
        procs::wait_for_streams(&nats.url(), self.nodes, &running)?;
        // One tier of aggregators and of sinks serves every node.
        running.extend(self.aggregators(None, &edge)?);
        let sinks = self.cfg.sinks;
        for j in 0..sinks {
            let part = (sinks > 1).then_some((j, sinks));
            running.push(self.sink(None, out, &edge, part)?);
        }
        let done = finish_all(running)?;
        let wall = started.elapsed();
        let broker = nats.stop(wall)?;
        Ok(self.report(BenchMode::SplitBroker, wall, done, Some(broker)))
    }

    /// The object-store design: every node's own capture, aggregators and sink, handing over through
    /// the store.
    fn split_object_store(&self, out: &Path) -> Result<ModeReport, BenchError> {
        let (edge, own_dir) = self.handoff_args();
        let started = Instant::now();
        let mut running = Vec::new();
        for i in 0..self.nodes {
            let node = node_name(i);
            running.push(self.capture(i, &edge)?);
            running.extend(self.aggregators(Some(&node), &edge)?);
            running.push(self.sink(Some(&node), out, &edge, None)?);
        }
        let done = finish_all(running);
        match own_dir {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            None => eprintln!("bench: the hand-off objects are left under {}", edge[1]),
        }
        Ok(self.report(BenchMode::SplitObjectStore, started.elapsed(), done?, None))
    }

    /// A fresh hand-off location for this run and the flags that reach it (`--handoff LOCATION`
    /// first), and the directory to remove afterwards when it is a local one.
    fn handoff_args(&self) -> (Vec<String>, Option<PathBuf>) {
        match &self.cfg.handoff {
            Handoff::Dir(dir) => {
                // A directory of its own per run, inside the one given (never emptied: it may hold
                // anything), removed when the run is over.
                let own = dir.join(self.run_name());
                (
                    vec!["--handoff".into(), own.display().to_string()],
                    Some(own),
                )
            }
            Handoff::S3 { bucket, prefix, s3 } => {
                // A prefix of its own per run: a bench never reads another run's objects. (The bench
                // has no S3 client to remove them with: the prefix is printed.)
                let run = self.run_name();
                let key = if prefix.is_empty() {
                    run
                } else {
                    format!("{prefix}/{run}")
                };
                let mut a = vec!["--handoff".into(), format!("s3://{bucket}/{key}")];
                if let Some(e) = &s3.endpoint {
                    a.extend(["--s3-endpoint".into(), e.clone()]);
                }
                if let Some(r) = &s3.region {
                    a.extend(["--s3-region".into(), r.clone()]);
                }
                (a, None)
            }
        }
    }

    /// `run-<unix ms>-<nodes>n`: unique per run of a topology.
    fn run_name(&self) -> String {
        format!("run-{}-{}n", self.started_ms, self.nodes)
    }

    fn split_args(node: &str, mode: &str, edge: &[String]) -> Vec<String> {
        let mut a = base_args(node);
        a.extend(["--mode".into(), mode.into()]);
        a.extend(edge.iter().cloned());
        a
    }

    fn capture(&self, i: u32, edge: &[String]) -> Result<procs::Running, BenchError> {
        let mut a = Self::split_args(&node_name(i), "capture", edge);
        a.extend(self.source_args(i));
        procs::spawn(
            &self.cfg.exe,
            &self.tier_role("capture".into(), Some(&node_name(i))),
            &a,
        )
    }

    /// The aggregators of one node's pipeline (`Some(node)`), or of the tier serving every node.
    fn aggregators(
        &self,
        node: Option<&str>,
        edge: &[String],
    ) -> Result<Vec<procs::Running>, BenchError> {
        let shards = self.cfg.shards;
        let mut out = Vec::new();
        for i in 0..shards {
            let mut a = Self::split_args(&self.tier_node(node), "aggregate", edge);
            a.extend(["--shard".into(), format!("{i}/{shards}")]);
            let role = self.tier_role(format!("aggregate {i}/{shards}"), node);
            out.push(procs::spawn(&self.cfg.exe, &role, &a)?);
        }
        Ok(out)
    }

    /// The sink of one node's pipeline (`Some(node)`), or one serving every node: all of the output,
    /// or its `part` (J, N).
    fn sink(
        &self,
        node: Option<&str>,
        out: &Path,
        edge: &[String],
        part: Option<(u32, u32)>,
    ) -> Result<procs::Running, BenchError> {
        let mut a = Self::split_args(&self.tier_node(node), "sink", edge);
        a.extend(out_args(out));
        let what = match part {
            Some((j, n)) => {
                a.extend(["--sink-part".into(), format!("{j}/{n}")]);
                format!("sink {j}/{n}")
            }
            None => "sink".into(),
        };
        procs::spawn(&self.cfg.exe, &self.tier_role(what, node), &a)
    }

    /// The `--node` of a process serving `node` (or every node: its own name then only labels its
    /// logs).
    fn tier_node(&self, node: Option<&str>) -> String {
        node.map_or_else(|| node_name(0), str::to_string)
    }

    /// A role, named after its node when it serves one node of several.
    fn tier_role(&self, what: String, node: Option<&str>) -> String {
        match node {
            Some(n) if self.nodes > 1 => format!("{what} {n}"),
            _ => what,
        }
    }

    fn report(
        &self,
        mode: BenchMode,
        wall: Duration,
        procs: Vec<Measured>,
        broker: Option<Measured>,
    ) -> ModeReport {
        let handoff_on_s3 =
            mode == BenchMode::SplitObjectStore && matches!(self.cfg.handoff, Handoff::S3 { .. });
        mode_report(
            self.cfg,
            mode,
            self.nodes,
            handoff_on_s3,
            wall,
            procs,
            broker,
        )
    }
}

/// Waits for every process, in order; after a failure the rest are killed (dropped), not waited for:
/// they may be waiting for what the failed one would have sent.
fn finish_all(running: Vec<procs::Running>) -> Result<Vec<Measured>, BenchError> {
    running.into_iter().map(procs::Running::finish).collect()
}

fn mode_report(
    cfg: &BenchConfig,
    mode: BenchMode,
    nodes: u32,
    handoff_on_s3: bool,
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
    // What the capture stages say they captured (each node's `--events`, if none was lost).
    let events = sum(&["events"]);
    let published = sum(&["broker", "published_bytes"]) + sum(&["handoff", "bytes_written"]);
    let consumed = sum(&["broker", "consumed_bytes"]) + sum(&["handoff", "bytes_read"]);
    let handoff_puts = sum(&["handoff", "puts"]);
    let messages = sum(&["broker", "published_messages"]) + sum(&["broker", "consumed_messages"]);
    let files = sum(&["files"]);
    // The output's requests by type, as if it were on S3 (the bench writes it to a directory): its
    // Delta log's as counted, and a PUT per data file.
    let output_requests = |ops: &[&str]| -> u64 {
        let mut n = 0;
        for op in ops {
            n += sum(&["delta_log_requests", op]);
        }
        if ops.contains(&"put") {
            n += files;
        }
        n
    };
    // The hand-off's: made on S3 (every request of those processes' S3 client), or counted by the
    // edge on a directory (each object one PUT, each poll one GET).
    let on_s3 = |ops: &[&str]| -> u64 { ops.iter().map(|op| sum(&["s3_requests", op])).sum() };
    const WRITES: [&str; 7] = [
        "put",
        "list",
        "copy",
        "create_multipart",
        "upload_part",
        "complete_multipart",
        "other",
    ];
    const READS: [&str; 2] = ["get", "head"];
    let (handoff_writes, handoff_reads) = if handoff_on_s3 {
        (on_s3(&WRITES), on_s3(&READS))
    } else {
        (handoff_puts, sum(&["handoff", "gets"]))
    };
    let usage = Usage {
        events,
        cpu_seconds: cpu,
        gb_seconds: all.iter().map(|p| p.peak_rss_mib / 1024.0 * secs).sum(),
        // (Multipart requests are PUT-class too; an aborted upload is a free DELETE.)
        s3_writes: output_requests(&WRITES) + handoff_writes,
        s3_reads: output_requests(&READS) + handoff_reads,
        broker_requests: messages,
        // Every object handed from one stage to the next is one orchestrated step.
        handoffs: handoff_puts,
    };
    let cost = cost_per_billion(&usage, &cfg.prices);
    ModeReport {
        mode,
        nodes,
        events,
        wall_seconds: secs,
        events_per_sec: events as f64 / secs.max(1e-9),
        cpu_seconds: cpu,
        cpu_seconds_per_million_events: cpu / (events as f64 / 1e6).max(1e-9),
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
        handoff_on_s3,
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
            "| mode | nodes | wall s | events/s | CPU s | CPU s / M events | peak RSS MiB | boundary MiB | broker msgs | hand-off PUT/GET | latency p50/p99 ms | $ / 10^9 events (compute + S3 + broker + orchestration) |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for m in &self.modes {
            let c = &m.cost_per_billion_events;
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {} | {}/{}{} | {:.0}/{:.0} | **{:.2}** = {:.2} + {:.2} + {:.2} + {:.2} |\n",
                m.mode.name(),
                m.nodes,
                m.wall_seconds,
                m.events_per_sec,
                m.cpu_seconds,
                m.cpu_seconds_per_million_events,
                m.peak_rss_mib,
                m.boundary_bytes as f64 / (1 << 20) as f64,
                m.broker_messages,
                m.handoff_puts,
                m.handoff_gets,
                if m.handoff_on_s3 { " (S3)" } else { "" },
                m.latency_p50_ms,
                m.latency_p99_ms,
                c.total,
                c.compute,
                c.s3_requests,
                c.broker,
                c.orchestration
            ));
        }
        let mut lines = Vec::new();
        for &n in &self.nodes {
            let at: Vec<&ModeReport> = self.modes.iter().filter(|m| m.nodes == n).collect();
            let Some((base, rest)) = at.split_first() else {
                continue;
            };
            for m in rest {
                lines.push(format!(
                    "{} vs {} ({n} node(s)): {:.2}x the CPU per event, {:.2}x the cost per event, {:.2}x the throughput",
                    m.mode.name(),
                    base.mode.name(),
                    m.cpu_seconds_per_million_events / base.cpu_seconds_per_million_events.max(1e-9),
                    m.cost_per_billion_events.total / base.cost_per_billion_events.total.max(1e-12),
                    m.events_per_sec / base.events_per_sec.max(1e-9),
                ));
            }
        }
        if self.nodes.len() > 1 {
            for mode in self.mode_order() {
                let runs: Vec<&ModeReport> = self.modes.iter().filter(|m| m.mode == mode).collect();
                let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
                    continue;
                };
                let per = |f: fn(&ModeReport) -> f64| {
                    runs.iter()
                        .map(|m| format!("{:.2}", f(m)))
                        .collect::<Vec<_>>()
                        .join(" / ")
                };
                lines.push(format!(
                    "{} at {} nodes: CPU s per M events {} ({:.2}x from {} to {} nodes), $ per 10^9 events {}",
                    mode.name(),
                    runs.iter().map(|m| m.nodes.to_string()).collect::<Vec<_>>().join(" / "),
                    per(|m| m.cpu_seconds_per_million_events),
                    last.cpu_seconds_per_million_events / first.cpu_seconds_per_million_events.max(1e-9),
                    first.nodes,
                    last.nodes,
                    per(|m| m.cost_per_billion_events.total),
                ));
            }
        }
        if !lines.is_empty() {
            s.push('\n');
            s.push_str(&lines.join("\n"));
            s.push('\n');
        }
        s
    }

    /// The modes run, in their order.
    fn mode_order(&self) -> Vec<BenchMode> {
        let mut modes = Vec::new();
        for m in &self.modes {
            if !modes.contains(&m.mode) {
                modes.push(m.mode);
            }
        }
        modes
    }

    pub fn markdown(&self) -> String {
        format!(
            "# tcplake bench\n\n{} synthetic events per capture node (seed {} + node index), {} node(s), \
             every mode as real processes on {}; split modes with {} aggregator(s){}, {} sink(s) \
             over the broker.\n\
             At every node count, every mode wrote identical `flows/` rows: {}.\n\nPrices: {}.\n\n{}\n![throughput and cost](report.svg)\n",
            self.events,
            self.seed,
            self.nodes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.machine,
            self.shards,
            if self.partitioned {
                " on a partitioned stream"
            } else {
                ""
            },
            self.sinks,
            self.identical_flows,
            self.prices_source,
            self.table()
        )
    }

    /// Bar charts of throughput and cost per run and, with several node counts, cost against nodes
    /// per topology (plain SVG, viewable anywhere).
    pub fn svg(&self) -> String {
        let (w, bar_h, gap, left) = (760.0_f64, 26.0_f64, 10.0_f64, 200.0_f64);
        let n = self.modes.len() as f64;
        let panel_h = 40.0 + n * (bar_h + gap);
        let scaling = self.nodes.len() > 1;
        let line_h = 300.0;
        let height = panel_h * 2.0 + 20.0 + if scaling { line_h + 20.0 } else { 0.0 };
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
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
                let label = if scaling {
                    format!("{}, {} node(s)", m.mode.name(), m.nodes)
                } else {
                    m.mode.name().to_string()
                };
                s.push_str(&format!(
                    "<text x=\"10\" y=\"{}\">{label}</text><rect x=\"{left}\" y=\"{y}\" width=\"{len:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>\n",
                    y + 18.0,
                    left + len + 6.0,
                    y + 18.0,
                    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
                ));
            }
        }
        if scaling {
            s.push_str(&self.scaling_svg(2.0 * (panel_h + 20.0), w, line_h));
        }
        s.push_str("</svg>\n");
        s
    }

    /// Cost per 10^9 events against the node count, one line per topology (nodes on a log scale).
    fn scaling_svg(&self, top: f64, w: f64, h: f64) -> String {
        let colours = ["#4878a8", "#c0504d", "#9bbb59", "#8064a2"];
        let (left, right, plot_top, plot_bottom) = (70.0, w - 190.0, top + 40.0, top + h - 40.0);
        let max = self
            .modes
            .iter()
            .map(|m| m.cost_per_billion_events.total)
            .fold(0.0_f64, f64::max)
            .max(1e-12);
        let (lo, hi) = (
            f64::from(*self.nodes.iter().min().unwrap_or(&1)).log2(),
            f64::from(*self.nodes.iter().max().unwrap_or(&1)).log2(),
        );
        let x = |nodes: u32| {
            let t = if hi > lo {
                (f64::from(nodes).log2() - lo) / (hi - lo)
            } else {
                0.5
            };
            left + t * (right - left)
        };
        let y = |v: f64| plot_bottom - (plot_bottom - plot_top) * v / max;
        let mut s = format!(
            "<text x=\"10\" y=\"{}\" font-weight=\"bold\">Cost against capture nodes ($ per 10^9 events, lower is better)</text>\n\
             <line x1=\"{left}\" y1=\"{plot_bottom}\" x2=\"{right}\" y2=\"{plot_bottom}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{plot_top}\" x2=\"{left}\" y2=\"{plot_bottom}\" stroke=\"black\"/>\n\
             <text x=\"10\" y=\"{:.1}\">{max:.2}</text><text x=\"10\" y=\"{plot_bottom}\">0</text>\n",
            top + 22.0,
            plot_top + 4.0
        );
        let mut nodes = self.nodes.clone();
        nodes.sort_unstable();
        nodes.dedup();
        for n in nodes {
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>\n",
                x(n),
                plot_bottom + 18.0
            ));
        }
        for (i, mode) in self.mode_order().into_iter().enumerate() {
            let colour = colours[i % colours.len()];
            let mut runs: Vec<&ModeReport> = self.modes.iter().filter(|m| m.mode == mode).collect();
            runs.sort_by_key(|m| m.nodes);
            let points: Vec<String> = runs
                .iter()
                .map(|m| {
                    format!(
                        "{:.1},{:.1}",
                        x(m.nodes),
                        y(m.cost_per_billion_events.total)
                    )
                })
                .collect();
            s.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n",
                points.join(" ")
            ));
            for m in &runs {
                s.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n",
                    x(m.nodes),
                    y(m.cost_per_billion_events.total)
                ));
            }
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}</text>\n",
                right + 12.0,
                plot_top + 16.0 + 18.0 * i as f64,
                mode.name()
            ));
        }
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
