//! Configuration: command-line flags, environment variables and a TOML file, resolved once into
//! validated [`Settings`] before anything starts.
//!
//! Precedence, highest first: flag, environment variable (`TCPLAKE_*`), config file, built-in default.
//! The file is strict (`deny_unknown_fields`): a misspelt key is an error naming the key and line, not
//! a silently ignored setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// How the pipeline is deployed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Capture, aggregate and sink in one process, joined by bounded in-memory channels.
    Monolith,
    /// Only capture: publish event batches to the broker.
    Capture,
    /// Only aggregate (one shard): events from the broker in, flow batches to the broker out.
    Aggregate,
    /// Only sink: events and flow batches from the broker in, Parquet out.
    Sink,
}

impl Mode {
    pub fn is_split(self) -> bool {
        self != Mode::Monolith
    }
}

/// Where events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Live TCP telemetry from the kernel via eBPF tracepoints (needs root or CAP_BPF + CAP_PERFMON).
    Ebpf,
    /// A deterministic generated workload (from --seed, exactly --events events); needs no privileges.
    Synthetic,
    /// A recorded event log (`replay:DIR|s3://bucket/prefix`), fed through again.
    Replay,
}

/// `--source`: `ebpf`, `synthetic`, or `replay:URL`.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceArg {
    pub kind: SourceKind,
    pub from: Option<PathBuf>,
}

fn parse_source_arg(s: &str) -> Result<SourceArg, String> {
    match s {
        "ebpf" => Ok(SourceArg {
            kind: SourceKind::Ebpf,
            from: None,
        }),
        "synthetic" => Ok(SourceArg {
            kind: SourceKind::Synthetic,
            from: None,
        }),
        _ => match s.strip_prefix("replay:") {
            Some(url) if !url.is_empty() => Ok(SourceArg {
                kind: SourceKind::Replay,
                from: Some(url.into()),
            }),
            _ => Err("expected ebpf, synthetic or replay:DIR|s3://bucket/prefix".into()),
        },
    }
}

/// Form of the end-of-run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SummaryFormat {
    #[default]
    Text,
    Json,
}

const ABOUT: &str =
    "Capture TCP telemetry, aggregate it per flow and window, and write both the raw \
event log and the flow table as Parquet that DuckDB reads directly.";

const LONG_ABOUT: &str = "\
Capture TCP telemetry, aggregate it per flow and window, and write both the raw event log \
(events/) and the flow table (flows/) as Parquet that DuckDB reads directly.

SOURCES
  ebpf       live TCP telemetry from kernel tracepoints (root, or CAP_BPF + CAP_PERFMON);
             runs until SIGINT/SIGTERM or --duration.
  synthetic  a deterministic workload from --seed, exactly --events events; no privileges.
  replay:URL a recorded output's events/ (a directory or s3://bucket/prefix), fed through again:
             with the original settings it rebuilds flows/ row for row; with another --window
             it is a new projection.

MODES
  monolith   capture -> aggregate -> sink in one process; stages hand batches over bounded
             in-memory channels (a full channel makes the producer wait, nothing is dropped).
  capture    one stage per process, joined by NATS JetStream (--broker): capture publishes
  aggregate  events; each aggregator (--shard I/N) folds its share of the flows; the sink
  sink       (--shards N) writes both datasets. Same stage code as the monolith.

OUTPUT
  <out>/events/date=YYYY-MM-DD/hour=HH/*.parquet   one row per event (the source of truth)
  <out>/flows/date=YYYY-MM-DD/hour=HH/*.parquet    one row per flow per window (the projection)

  Query:  duckdb -c \"SELECT sum(bytes_sent) FROM read_parquet('tcplake-data/flows/**/*.parquet', \
hive_partitioning = true)\"

CONFIGURATION
  Every flag can also be set in a TOML file (--config) or an environment variable (shown per flag).
  Precedence: flag > environment > file > default. SIGINT/SIGTERM flush everything and exit 0.";

/// Command-line flags. Every value is optional here so the file and defaults can fill the gaps.
#[derive(Debug, Parser, Default)]
#[command(name = "tcplake", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "TCPLAKE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Deployment mode [default: monolith].
    #[arg(long, env = "TCPLAKE_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Event source: ebpf, synthetic, or replay:DIR|s3://bucket/prefix (a recorded event log)
    /// [default: ebpf].
    #[arg(long, env = "TCPLAKE_SOURCE", value_parser = parse_source_arg, value_name = "SOURCE")]
    pub source: Option<SourceArg>,
    /// Replay source: start at the first recorded event at or after this time (RFC 3339).
    #[arg(long, env = "TCPLAKE_SINCE", value_name = "TIME")]
    pub since: Option<String>,
    /// Replay source: stop at the first recorded event at or after this time (RFC 3339).
    #[arg(long, env = "TCPLAKE_UNTIL", value_name = "TIME")]
    pub until: Option<String>,
    /// Events to capture: exactly this many for synthetic [default: 1000000]; a cap for ebpf [default: none].
    #[arg(long, env = "TCPLAKE_EVENTS", value_name = "N")]
    pub events: Option<u64>,
    /// Stop capturing after this long, e.g. 30s, then flush and exit [default: run until SIGINT/SIGTERM].
    #[arg(long, env = "TCPLAKE_DURATION", value_name = "DURATION")]
    pub duration: Option<String>,
    /// ebpf: only connections with this local or remote port.
    #[arg(long, env = "TCPLAKE_PORT")]
    pub port: Option<u16>,
    /// ebpf: only connections owned by this process id.
    #[arg(long, env = "TCPLAKE_PID")]
    pub pid: Option<u32>,
    /// ebpf: only connections of tasks in this cgroup (v2 id, or a path under /sys/fs/cgroup).
    #[arg(long, env = "TCPLAKE_CGROUP", value_name = "ID_OR_PATH")]
    pub cgroup: Option<String>,
    /// ebpf: also capture tcplake's own connections (excluded by default).
    #[arg(long, env = "TCPLAKE_INCLUDE_SELF")]
    pub include_self: bool,
    /// Seed of the synthetic workload [default: 1].
    #[arg(long, env = "TCPLAKE_SEED", value_name = "S")]
    pub seed: Option<u64>,
    /// Event time of the first synthetic event, RFC 3339 [default: 2026-01-01T00:00:00Z].
    #[arg(long, env = "TCPLAKE_START", value_name = "TIME")]
    pub start: Option<String>,
    /// Pace the source to this many events per second of wall time [default: as fast as possible].
    #[arg(long, env = "TCPLAKE_RATE", value_name = "EVENTS_PER_SEC")]
    pub rate: Option<u64>,
    /// Output: a directory, or s3://bucket/prefix [default: ./tcplake-data].
    #[arg(long, global = true, env = "TCPLAKE_OUT", value_name = "DIR|S3_URL")]
    pub out: Option<PathBuf>,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9100 (path-style addressing) [default: AWS].
    #[arg(long, global = true, env = "TCPLAKE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: from the AWS configuration, else us-east-1].
    #[arg(long, global = true, env = "TCPLAKE_S3_REGION")]
    pub s3_region: Option<String>,
    /// Local directory where files wait before upload to S3 [default: $TMPDIR/tcplake-spool].
    #[arg(long, global = true, env = "TCPLAKE_SPOOL_DIR", value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Tumbling window length in seconds [default: 10].
    #[arg(long, env = "TCPLAKE_WINDOW", value_name = "SECS")]
    pub window: Option<u64>,
    /// How far behind the newest event a window stays open, in seconds [default: 5].
    #[arg(long, env = "TCPLAKE_ALLOWED_LATENESS", value_name = "SECS")]
    pub allowed_lateness: Option<u64>,
    /// Name of this node, stored in every row [default: the host name].
    #[arg(long, env = "TCPLAKE_NODE")]
    pub node: Option<String>,
    /// Events per batch moved between stages [default: 4096].
    #[arg(long, env = "TCPLAKE_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<usize>,
    /// Capacity of each in-memory edge, in batches [default: 16].
    #[arg(long, env = "TCPLAKE_CHANNEL_CAPACITY", value_name = "BATCHES")]
    pub channel_capacity: Option<usize>,
    /// Close a Parquet file at this size, e.g. 128MiB [default: 128MiB].
    #[arg(long, env = "TCPLAKE_MAX_FILE_SIZE", value_name = "SIZE")]
    pub max_file_size: Option<String>,
    /// Close a Parquet file after it has been open this long, e.g. 5m [default: 5m].
    #[arg(long, env = "TCPLAKE_MAX_FILE_AGE", value_name = "DURATION")]
    pub max_file_age: Option<String>,
    /// Split modes: the NATS JetStream broker, e.g. nats://127.0.0.1:4222.
    #[arg(long, env = "TCPLAKE_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// Split modes without a broker: hand batches over through this object store (a directory or
    /// s3://bucket/prefix), the seed's original design, for comparison (no crash recovery).
    #[arg(long, env = "TCPLAKE_HANDOFF", value_name = "DIR|S3_URL")]
    pub handoff: Option<PathBuf>,
    /// Aggregate mode: this aggregator's shard, I/N (0-based) [default: 0/1].
    #[arg(long, env = "TCPLAKE_SHARD", value_name = "I/N")]
    pub shard: Option<String>,
    /// Sink mode: how many aggregator shards publish flows [default: 1].
    #[arg(long, env = "TCPLAKE_SHARDS", value_name = "N")]
    pub shards: Option<u32>,
    /// Serve /metrics, /healthz and /readyz here; `off` to disable [default: 127.0.0.1:9477].
    #[arg(long, env = "TCPLAKE_METRICS_ADDR", value_name = "ADDR:PORT|off")]
    pub metrics_addr: Option<String>,
    /// Logs as JSON lines (one object per event) instead of text.
    #[arg(long, env = "TCPLAKE_LOG_JSON")]
    pub log_json: bool,
    /// Resolve and validate the configuration (flags, environment, file), print it, and exit: 0 when
    /// it is valid, 2 when not. Starts nothing (deployment checks, CI).
    #[arg(long, global = true)]
    pub check_config: bool,
    /// Print the end-of-run summary as text or JSON.
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_SUMMARY",
        value_enum,
        default_value_t
    )]
    pub summary: SummaryFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands (without one, tcplake runs the pipeline).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run one synthetic workload through each deployment mode as real processes; report throughput,
    /// CPU, memory, bytes across boundaries and cost per 10^9 events; fail if outputs differ.
    Bench(BenchArgs),
    /// Merge the small files of closed partitions into large ones (of --out), atomically and
    /// restartably: an interrupted run is finished by the next.
    Compact(CompactArgs),
    /// Rebuild flows/ from a recorded event log: the same as `--source replay:FROM --out TO` (other
    /// flags, such as --window, apply as usual). Restartable: a rerun continues after its last commit.
    Replay(ReplayArgs),
}

/// `tcplake compact --dataset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    Events,
    Flows,
}

impl From<DatasetArg> for crate::sink::Dataset {
    fn from(d: DatasetArg) -> Self {
        match d {
            DatasetArg::Events => crate::sink::Dataset::Events,
            DatasetArg::Flows => crate::sink::Dataset::Flows,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// Which dataset [default: both].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// Only this partition: date=YYYY-MM-DD or date=YYYY-MM-DD/hour=HH [default: every closed one].
    #[arg(long, value_name = "PARTITION")]
    pub partition: Option<String>,
    /// Size merged files grow to, e.g. 256MiB [default: --max-file-size, 128MiB].
    #[arg(long, value_name = "SIZE")]
    pub target_size: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The recorded output to read (a directory or s3://bucket/prefix).
    #[arg(long, value_name = "DIR|S3_URL")]
    pub from: PathBuf,
    /// Where the rebuilt output goes.
    #[arg(long, value_name = "DIR|S3_URL")]
    pub to: PathBuf,
    /// Start at the first recorded event at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Stop at the first recorded event at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Window length of the rebuilt projection, in seconds [default: 10, as live runs].
    #[arg(long, value_name = "SECS")]
    pub window: Option<u64>,
}

impl Cli {
    /// Folds a subcommand that is only a shorthand for flags into those flags.
    pub fn expand(mut self) -> Self {
        if let Some(Command::Replay(r)) = &self.command {
            self.source = Some(SourceArg {
                kind: SourceKind::Replay,
                from: Some(r.from.clone()),
            });
            self.out = Some(r.to.clone());
            self.since = r.since.clone().or(self.since);
            self.until = r.until.clone().or(self.until);
            self.window = r.window.or(self.window);
            self.command = None;
        }
        self
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Synthetic events per mode.
    #[arg(long, default_value_t = 5_000_000)]
    pub events: u64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Modes to run, in order; the first is the baseline.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "monolith,split-broker,split-object-store"
    )]
    pub modes: Vec<crate::bench::BenchMode>,
    /// Aggregator processes in split modes.
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Price table (TOML) instead of the built-in AWS list prices.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Directory for the outputs, report.json and report.md [default: $TMPDIR/tcplake-bench].
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// The TOML file. Same settings as the flags, grouped by stage.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub mode: Option<Mode>,
    pub node: Option<String>,
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub capture: FileCapture,
    #[serde(default)]
    pub aggregate: FileAggregate,
    #[serde(default)]
    pub sink: FileSink,
    #[serde(default)]
    pub edge: FileEdge,
    #[serde(default)]
    pub broker: FileBroker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBroker {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_age: Option<String>,
    pub max_bytes: Option<String>,
    pub compress: Option<bool>,
    pub ack_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCapture {
    pub source: Option<SourceKind>,
    /// With `source = "replay"`: the recorded output to read (`DIR` or `s3://bucket/prefix`).
    pub replay_from: Option<PathBuf>,
    /// With `source = "replay"`: RFC 3339 times bounding the replayed stretch.
    pub replay_since: Option<String>,
    pub replay_until: Option<String>,
    pub events: Option<u64>,
    pub duration: Option<String>,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub cgroup: Option<String>,
    pub exclude_self: Option<bool>,
    pub ring_buffer_size: Option<String>,
    pub rtt_sample_interval: Option<String>,
    pub bytes_flush_interval: Option<String>,
    pub seed: Option<u64>,
    pub start: Option<String>,
    pub rate: Option<u64>,
    pub batch_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAggregate {
    pub window_secs: Option<u64>,
    pub allowed_lateness_secs: Option<u64>,
    pub shard: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    pub out: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: Option<bool>,
    pub s3_max_retry: Option<String>,
    pub s3_multipart_threshold: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub max_file_size: Option<String>,
    pub max_file_age: Option<String>,
    pub row_group_rows: Option<usize>,
    pub shards: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEdge {
    pub channel_capacity: Option<usize>,
    pub handoff: Option<PathBuf>,
}

/// A configuration problem, phrased for the person who made it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file `{path}`{location}: {message}")]
    Parse {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("invalid {setting} `{value}`: {reason}")]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(setting: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Fully resolved, validated settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    pub node: String,
    /// The node name was set (flag, environment or file), not taken from the host name.
    pub node_given: bool,
    pub source: SourceKind,
    /// With the replay source: the recorded output it reads.
    pub replay_from: Option<Output>,
    /// With the replay source: which stretch of the log, by event time.
    pub replay_range: crate::capture::recorded::TimeRange,
    /// Synthetic: events to produce (exactly); ebpf: optional cap.
    pub events: Option<u64>,
    pub duration: Option<Duration>,
    pub ebpf: EbpfSettings,
    pub seed: u64,
    pub start_us: i64,
    pub rate: Option<u64>,
    pub batch_size: usize,
    pub window: Duration,
    pub allowed_lateness: Duration,
    pub out: Output,
    pub max_file_bytes: u64,
    pub max_file_age: Duration,
    pub row_group_rows: usize,
    pub channel_capacity: usize,
    pub summary: SummaryFormat,
    /// Split modes only: the broker, or else the object-store hand-off.
    pub broker: Option<crate::edge::broker::BrokerSettings>,
    pub handoff: Option<Output>,
    /// Aggregate mode: which flows this process owns.
    pub shard: crate::aggregate::Shard,
    /// Sink mode: how many aggregator shards publish flows.
    pub shards: u32,
    /// The admin endpoint (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The address was asked for (a busy port is then fatal; the default's is only a warning).
    pub metrics_addr_given: bool,
}

/// Where a run writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Local(PathBuf),
    S3(crate::sink::s3::S3Settings),
}

/// Settings of the eBPF source.
#[derive(Clone, Debug, PartialEq)]
pub struct EbpfSettings {
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub exclude_self: bool,
    pub ring_buffer_bytes: u32,
    pub rtt_sample_interval: Duration,
    pub bytes_flush_interval: Duration,
}

/// Defaults, in one place (documented in `docs/configuration.md`).
pub mod defaults {
    pub const EVENTS: u64 = 1_000_000;
    pub const SEED: u64 = 1;
    pub const START: &str = "2026-01-01T00:00:00Z";
    pub const BATCH_SIZE: usize = 4096;
    pub const WINDOW_SECS: u64 = 10;
    pub const ALLOWED_LATENESS_SECS: u64 = 5;
    pub const OUT: &str = "./tcplake-data";
    pub const MAX_FILE_SIZE: &str = "128MiB";
    pub const MAX_FILE_AGE: &str = "5m";
    pub const ROW_GROUP_ROWS: usize = 131_072;
    pub const CHANNEL_CAPACITY: usize = 16;
    pub const RING_BUFFER_SIZE: &str = "4MiB";
    pub const RTT_SAMPLE_INTERVAL: &str = "100ms";
    pub const BYTES_FLUSH_INTERVAL: &str = "1s";
    pub const S3_MAX_RETRY: &str = "10m";
    pub const BROKER_CONNECT_TIMEOUT: &str = "30s";
    pub const BROKER_MAX_AGE: &str = "24h";
    /// Per stream. JetStream reserves it on disk up front, so it must fit the broker's free space.
    pub const BROKER_MAX_BYTES: &str = "1GiB";
    pub const METRICS_ADDR: &str = "127.0.0.1:9477";
}

impl FileConfig {
    /// Reads and parses a config file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" line {line}")
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_path_buf(),
                location,
                message: e.message().replace('\n', " "),
            }
        })
    }
}

/// Parses `128MiB`, `64MB`, `1GiB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with an optional unit, e.g. 128MiB".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

fn default_node() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| if is_node_char(c) { c } else { '-' })
        .collect();
    if clean.is_empty() {
        "node".into()
    } else {
        clean
    }
}

fn is_node_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl Settings {
    /// Resolves flags + environment (already merged by clap) over the file over the defaults.
    pub fn resolve(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let out = output(cli, &file.sink)?;
        let handoff = match cli.handoff.clone().or(file.edge.handoff.clone()) {
            Some(h) => Some(output(
                &Cli {
                    out: Some(h),
                    s3_endpoint: cli.s3_endpoint.clone(),
                    s3_region: cli.s3_region.clone(),
                    spool_dir: cli.spool_dir.clone(),
                    ..Cli::default()
                },
                &file.sink,
            )?),
            None => None,
        };
        let node_given = cli.node.is_some() || file.node.is_some();
        let node = cli.node.clone().or(file.node).unwrap_or_else(default_node);
        if node.is_empty() || node.len() > 64 || !node.chars().all(is_node_char) {
            return Err(invalid(
                "node name",
                &node,
                "use 1-64 characters from A-Z a-z 0-9 . _ -",
            ));
        }
        let start = cli
            .start
            .clone()
            .or(file.capture.start.clone())
            .unwrap_or_else(|| defaults::START.into());
        let start_us = rfc3339_us("start time", &start)?;
        let window_secs = cli
            .window
            .or(file.aggregate.window_secs)
            .unwrap_or(defaults::WINDOW_SECS);
        if window_secs == 0 || window_secs > 86_400 {
            return Err(invalid(
                "window",
                window_secs,
                "must be between 1 and 86400 seconds",
            ));
        }
        let lateness = cli
            .allowed_lateness
            .or(file.aggregate.allowed_lateness_secs)
            .unwrap_or(defaults::ALLOWED_LATENESS_SECS);
        if lateness > 86_400 {
            return Err(invalid(
                "allowed lateness",
                lateness,
                "must be at most 86400 seconds",
            ));
        }
        let batch_size = cli
            .batch_size
            .or(file.capture.batch_size)
            .unwrap_or(defaults::BATCH_SIZE);
        if !(1..=1_000_000).contains(&batch_size) {
            return Err(invalid(
                "batch size",
                batch_size,
                "must be between 1 and 1000000",
            ));
        }
        let channel_capacity = cli
            .channel_capacity
            .or(file.edge.channel_capacity)
            .unwrap_or(defaults::CHANNEL_CAPACITY);
        if !(1..=65_536).contains(&channel_capacity) {
            return Err(invalid(
                "channel capacity",
                channel_capacity,
                "must be between 1 and 65536",
            ));
        }
        let size = cli
            .max_file_size
            .clone()
            .or(file.sink.max_file_size)
            .unwrap_or_else(|| defaults::MAX_FILE_SIZE.into());
        let max_file_bytes = parse_size(&size).map_err(|e| invalid("max file size", &size, e))?;
        if max_file_bytes < 1024 {
            return Err(invalid("max file size", &size, "must be at least 1KiB"));
        }
        let age = cli
            .max_file_age
            .clone()
            .or(file.sink.max_file_age)
            .unwrap_or_else(|| defaults::MAX_FILE_AGE.into());
        let max_file_age =
            humantime::parse_duration(&age).map_err(|e| invalid("max file age", &age, e))?;
        if max_file_age.is_zero() {
            return Err(invalid("max file age", &age, "must be longer than zero"));
        }
        let row_group_rows = file.sink.row_group_rows.unwrap_or(defaults::ROW_GROUP_ROWS);
        if row_group_rows == 0 {
            return Err(invalid("row_group_rows", 0, "must be at least 1"));
        }
        let duration = cli
            .duration
            .clone()
            .or(file.capture.duration.clone())
            .map(|d| {
                humantime::parse_duration(&d)
                    .map_err(|e| invalid("duration", &d, e))
                    .and_then(|v| {
                        if v.is_zero() {
                            Err(invalid("duration", &d, "must be longer than zero"))
                        } else {
                            Ok(v)
                        }
                    })
            })
            .transpose()?;
        let ebpf = ebpf_settings(cli, &file.capture)?;
        if cli.rate == Some(0) || file.capture.rate == Some(0) {
            return Err(invalid(
                "rate",
                0,
                "must be at least 1 event per second (omit it for no pacing)",
            ));
        }
        let mode = cli.mode.or(file.mode).unwrap_or(Mode::Monolith);
        let broker = broker_settings(cli, &file.broker)?;
        if mode.is_split() {
            if broker.is_none() && handoff.is_none() {
                return Err(invalid(
                    "mode",
                    format!("{mode:?}").to_lowercase(),
                    "split modes need a broker: --broker nats://HOST:PORT (or --handoff DIR|s3://...)",
                ));
            }
            if node.contains('.') {
                return Err(invalid(
                    "node name",
                    &node,
                    "split modes use the node name in broker subjects: no `.`",
                ));
            }
        }
        let shard = match cli.shard.clone().or(file.aggregate.shard.clone()) {
            Some(s) => parse_shard(&s)?,
            None => crate::aggregate::Shard::ALL,
        };
        let shards = cli.shards.or(file.sink.shards).unwrap_or(1);
        if !(1..=1024).contains(&shards) {
            return Err(invalid("shards", shards, "must be between 1 and 1024"));
        }
        let source = cli
            .source
            .as_ref()
            .map(|s| s.kind)
            .or(file.capture.source)
            .unwrap_or(SourceKind::Ebpf);
        let replay_from = match source {
            SourceKind::Replay => {
                let from = cli
                    .source
                    .as_ref()
                    .and_then(|s| s.from.clone())
                    .or(file.capture.replay_from.clone())
                    .ok_or_else(|| {
                        invalid(
                            "source",
                            "replay",
                            "name the log to read: --source replay:DIR|s3://...",
                        )
                    })?;
                Some(output(
                    &Cli {
                        out: Some(from),
                        s3_endpoint: cli.s3_endpoint.clone(),
                        s3_region: cli.s3_region.clone(),
                        spool_dir: cli.spool_dir.clone(),
                        ..Cli::default()
                    },
                    &FileSink::default(),
                )?)
            }
            _ => None,
        };
        let replay_range = replay_range(cli, &file.capture, source)?;
        let metrics_given = cli.metrics_addr.clone().or(file.metrics_addr.clone());
        let metrics_addr = match metrics_given.as_deref().unwrap_or(defaults::METRICS_ADDR) {
            "off" => None,
            a => Some(a.parse().map_err(|_| {
                invalid(
                    "metrics address",
                    a,
                    "expected IP:PORT (e.g. 127.0.0.1:9477, [::1]:9477, 0.0.0.0:9477) or off",
                )
            })?),
        };
        Ok(Settings {
            mode,
            node,
            node_given,
            source,
            replay_from,
            replay_range,
            events: cli.events.or(file.capture.events),
            duration,
            ebpf,
            seed: cli.seed.or(file.capture.seed).unwrap_or(defaults::SEED),
            start_us,
            rate: cli.rate.or(file.capture.rate),
            batch_size,
            window: Duration::from_secs(window_secs),
            allowed_lateness: Duration::from_secs(lateness),
            out,
            max_file_bytes,
            max_file_age,
            row_group_rows,
            channel_capacity,
            summary: cli.summary,
            broker,
            handoff,
            shard,
            shards,
            metrics_addr,
            metrics_addr_given: metrics_given.is_some(),
        })
    }
}

fn rfc3339_us(what: &'static str, t: &str) -> Result<i64, ConfigError> {
    Ok(humantime::parse_rfc3339(t)
        .map_err(|e| invalid(what, t, e))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| invalid(what, t, "must be after 1970"))?
        .as_micros() as i64)
}

fn replay_range(
    cli: &Cli,
    file: &FileCapture,
    source: SourceKind,
) -> Result<crate::capture::recorded::TimeRange, ConfigError> {
    let since = cli.since.clone().or(file.replay_since.clone());
    let until = cli.until.clone().or(file.replay_until.clone());
    if source != SourceKind::Replay {
        if let Some(t) = since.as_ref().or(until.as_ref()) {
            return Err(invalid(
                "since/until",
                t,
                "only a replay reads a recorded stretch: use --source replay:DIR or `tcplake replay`",
            ));
        }
    }
    let range = crate::capture::recorded::TimeRange {
        since_us: since
            .as_deref()
            .map(|t| rfc3339_us("since", t))
            .transpose()?,
        until_us: until
            .as_deref()
            .map(|t| rfc3339_us("until", t))
            .transpose()?,
    };
    if let (Some(a), Some(b)) = (range.since_us, range.until_us) {
        if a >= b {
            return Err(invalid(
                "until",
                until.unwrap_or_default(),
                "must be later than --since",
            ));
        }
    }
    Ok(range)
}

impl Settings {
    /// One line describing what would run (`--check-config`); secrets are not in it.
    pub fn describe(&self) -> String {
        let out = |o: &Output| match o {
            Output::Local(p) => p.display().to_string(),
            Output::S3(s) => format!(
                "s3://{}/{}{}",
                s.bucket,
                s.prefix,
                s.endpoint
                    .as_ref()
                    .map_or(String::new(), |e| format!(" via {e}"))
            ),
        };
        let mut parts = vec![
            format!("mode={:?}", self.mode).to_lowercase(),
            format!("node={}", self.node),
            format!("source={:?}", self.source).to_lowercase(),
            format!("out={}", out(&self.out)),
            format!("window={}s", self.window.as_secs()),
        ];
        if let Some(b) = &self.broker {
            parts.push(format!("broker={}", crate::edge::broker::redact(&b.url)));
        }
        if self.mode == Mode::Aggregate {
            parts.push(format!("shard={}/{}", self.shard.index, self.shard.count));
        }
        if self.mode == Mode::Sink {
            parts.push(format!("shards={}", self.shards));
        }
        parts.push(format!(
            "metrics={}",
            self.metrics_addr
                .map_or("off".to_string(), |a| a.to_string())
        ));
        format!("tcplake: configuration ok: {}", parts.join(" "))
    }

    /// The broker URL (split modes), for summaries.
    pub fn broker_url(&self) -> String {
        self.broker
            .as_ref()
            .map(|b| crate::edge::broker::redact(&b.url))
            .unwrap_or_default()
    }
}

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> Result<crate::aggregate::Shard, ConfigError> {
    let bad = || invalid("shard", s, "expected I/N with 0 <= I < N <= 1024, e.g. 0/2");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, count): (u32, u32) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if count == 0 || count > 1024 || index >= count {
        return Err(bad());
    }
    Ok(crate::aggregate::Shard { index, count })
}

fn broker_settings(
    cli: &Cli,
    file: &FileBroker,
) -> Result<Option<crate::edge::broker::BrokerSettings>, ConfigError> {
    let Some(url) = cli.broker.clone().or(file.url.clone()) else {
        return Ok(None);
    };
    if !url.starts_with("nats://") {
        return Err(invalid("broker", &url, "expected nats://HOST:PORT"));
    }
    let size = file
        .max_bytes
        .clone()
        .unwrap_or_else(|| defaults::BROKER_MAX_BYTES.into());
    let max_bytes = parse_size(&size).map_err(|e| invalid("broker.max_bytes", &size, e))?;
    Ok(Some(crate::edge::broker::BrokerSettings {
        url,
        connect_for: duration_setting(
            "broker.connect_timeout",
            file.connect_timeout.clone(),
            defaults::BROKER_CONNECT_TIMEOUT,
        )?,
        max_age: duration_setting(
            "broker.max_age",
            file.max_age.clone(),
            defaults::BROKER_MAX_AGE,
        )?,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        compress: file.compress.unwrap_or(true),
        ack_wait: file
            .ack_wait
            .as_ref()
            .map(|t| humantime::parse_duration(t).map_err(|e| invalid("broker.ack_wait", t, e)))
            .transpose()?,
    }))
}

fn output(cli: &Cli, file: &FileSink) -> Result<Output, ConfigError> {
    let out = cli
        .out
        .clone()
        .or(file.out.clone())
        .unwrap_or_else(|| defaults::OUT.into());
    let text = out.to_string_lossy();
    if !text.starts_with("s3://") {
        return Ok(Output::Local(out));
    }
    let (bucket, prefix) = crate::sink::s3::S3Settings::parse_url(&text).map_err(|_| {
        invalid(
            "output",
            &text,
            "expected s3://bucket[/prefix] with a valid bucket name",
        )
    })?;
    let endpoint = cli.s3_endpoint.clone().or(file.s3_endpoint.clone());
    if let Some(ep) = &endpoint {
        check_endpoint(ep)?;
    }
    Ok(Output::S3(crate::sink::s3::S3Settings {
        bucket,
        prefix,
        // S3-compatible stores mostly need path-style addressing; AWS itself prefers virtual hosts.
        path_style: file.s3_path_style.unwrap_or(endpoint.is_some()),
        endpoint,
        region: cli.s3_region.clone().or(file.s3_region.clone()),
        spool: cli
            .spool_dir
            .clone()
            .or(file.spool_dir.clone())
            .unwrap_or_else(|| std::env::temp_dir().join("tcplake-spool")),
        max_retry: duration_setting(
            "S3 max retry",
            file.s3_max_retry.clone(),
            defaults::S3_MAX_RETRY,
        )?,
        multipart_threshold: match &file.s3_multipart_threshold {
            None => crate::sink::s3::MULTIPART_THRESHOLD,
            Some(t) => {
                let v = parse_size(t).map_err(|e| invalid("sink.s3_multipart_threshold", t, e))?;
                if v < 1 << 20 {
                    return Err(invalid(
                        "sink.s3_multipart_threshold",
                        t,
                        "must be at least 1MiB",
                    ));
                }
                v
            }
        },
    }))
}

/// `http(s)://HOST[:PORT][/]`: caught here, a typo is one error line instead of ten minutes of retries.
fn check_endpoint(ep: &str) -> Result<(), ConfigError> {
    let bad = || {
        invalid(
            "S3 endpoint",
            ep,
            "expected http://HOST[:PORT] or https://HOST[:PORT]",
        )
    };
    let rest = ep
        .strip_prefix("http://")
        .or_else(|| ep.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        // Bracketed IPv6 literals contain colons of their own.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn duration_setting(
    setting: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or_else(|| default.into());
    humantime::parse_duration(&text).map_err(|e| invalid(setting, &text, e))
}

fn ebpf_settings(cli: &Cli, file: &FileCapture) -> Result<EbpfSettings, ConfigError> {
    let ring = file
        .ring_buffer_size
        .clone()
        .unwrap_or_else(|| defaults::RING_BUFFER_SIZE.into());
    let ring_bytes = parse_size(&ring).map_err(|e| invalid("ring buffer size", &ring, e))?;
    // The kernel requires a power of two that is a multiple of the page size.
    if !ring_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&ring_bytes) {
        return Err(invalid(
            "ring buffer size",
            &ring,
            "must be a power of two between 4KiB and 1GiB",
        ));
    }
    let cgroup_id = cli
        .cgroup
        .clone()
        .or(file.cgroup.clone())
        .map(|c| match c.parse::<u64>() {
            Ok(id) => Ok(id),
            // On cgroup v2 the id of a cgroup is the inode number of its directory.
            Err(_) => std::fs::metadata(&c)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|e| {
                    invalid(
                        "cgroup",
                        &c,
                        format!("not an id, and not a readable cgroup directory: {e}"),
                    )
                }),
        })
        .transpose()?;
    Ok(EbpfSettings {
        port: cli.port.or(file.port).filter(|&p| p != 0),
        pid: cli.pid.or(file.pid).filter(|&p| p != 0),
        cgroup_id,
        exclude_self: !cli.include_self && file.exclude_self.unwrap_or(true),
        ring_buffer_bytes: ring_bytes as u32,
        rtt_sample_interval: duration_setting(
            "rtt sample interval",
            file.rtt_sample_interval.clone(),
            defaults::RTT_SAMPLE_INTERVAL,
        )?,
        bytes_flush_interval: duration_setting(
            "bytes flush interval",
            file.bytes_flush_interval.clone(),
            defaults::BYTES_FLUSH_INTERVAL,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("node = \"a\"\n[aggregate]\nwindow = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml` line 3"), "{err}");
        assert!(err.contains("unknown field `window`"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn precedence_is_flag_over_file_over_default() {
        let file =
            parse("[aggregate]\nwindow_secs = 30\n[capture]\nevents = 7\nseed = 9\n").unwrap();
        let cli = Cli {
            seed: Some(3),
            node: Some("n1".into()),
            ..Cli::default()
        };
        let s = Settings::merge(&cli, file).unwrap();
        assert_eq!(s.window, Duration::from_secs(30));
        assert_eq!(s.events, Some(7));
        assert_eq!(s.source, SourceKind::Ebpf);
        assert!(s.ebpf.exclude_self);
        assert_eq!(s.ebpf.ring_buffer_bytes, 4 << 20);
        assert_eq!(s.seed, 3);
        assert_eq!(s.batch_size, defaults::BATCH_SIZE);
        assert_eq!(s.max_file_bytes, 128 << 20);
        assert_eq!(s.max_file_age, Duration::from_secs(300));
        assert_eq!(s.start_us, 1_767_225_600_000_000);
    }

    #[test]
    fn bad_values_are_named() {
        let node = || Cli {
            node: Some("n".into()),
            ..Cli::default()
        };
        let err = |cli: Cli| {
            Settings::merge(&cli, FileConfig::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err(Cli {
            window: Some(0),
            ..node()
        })
        .contains("invalid window `0`"));
        assert!(err(Cli {
            max_file_size: Some("12 parsecs".into()),
            ..node()
        })
        .contains("max file size"));
        assert!(err(Cli {
            node: Some("a/b".into()),
            ..Cli::default()
        })
        .contains("node name `a/b`"));
        assert!(err(Cli {
            start: Some("yesterday".into()),
            ..node()
        })
        .contains("start time"));
        assert!(err(Cli {
            rate: Some(0),
            ..node()
        })
        .contains("rate"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 lightyears").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn s3_endpoints_are_checked_before_anything_runs() {
        for ok in [
            "http://127.0.0.1:9000",
            "https://s3.eu-west-1.amazonaws.com",
            "http://minio.local:9000/",
            "http://[::1]:9000",
        ] {
            check_endpoint(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "127.0.0.1:9000",
            "ht!tp://x",
            "http://bad host",
            "http://",
            "http://h:0",
            "http://h:99999",
            "ftp://h",
        ] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("expected http://HOST[:PORT]"), "{bad}: {e}");
        }
    }
}
