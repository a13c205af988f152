//! Configuration: one schema of settings ([`Schema`]), given in layers — built-in defaults < a TOML
//! file < environment variables (`TCPLAKE_*`) < flags — stacked by [`layers`] and validated once into
//! [`Settings`] before anything starts; subcommands' own options are resolved here too ([`Task`]).
//!
//! The file is strict (`deny_unknown_fields`): a misspelt key is an error naming the key and line, not
//! a silently ignored setting. An invalid value is named with where it came from.

mod applies;
mod broker;
mod cli;
pub mod keys;
pub mod layers;
mod schema;
mod task;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use applies::Run;
pub use broker::{max_message_bytes, PASSWORD_ENV, TOKEN_ENV};
pub use cli::*;
use keys::Key;
use layers::Layers;
pub use schema::*;
pub use task::Task;
pub use values::{
    duration_within, location, parse_size, redact_url, rfc3339_us, size_within, Location,
};

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
    /// `origin` names where the value came from (` (from TCPLAKE_WINDOW)`), once known.
    #[error("invalid {} `{value}`{origin}: {reason}", key.label)]
    Invalid {
        key: &'static Key,
        value: String,
        reason: String,
        origin: String,
    },
    #[error("{what} has no effect here: {reason}")]
    NotApplicable { what: String, reason: String },
    /// `compact --partition` names no partition of the layout.
    #[error(transparent)]
    Partition(#[from] crate::lake::compact::CompactError),
    /// A layer holds a value of the wrong type for its key (each layer is typed on its own, so this
    /// means a bug; the value itself is not shown: it could hold credentials).
    #[error("{origin}: `{key}` has a value of the wrong type")]
    Layer { origin: String, key: String },
    /// A subcommand's own option (`compact --target-size`).
    #[error("invalid {what} `{value}`: {reason}")]
    Arg {
        what: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(key: &'static Key, value: impl std::fmt::Display, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
        origin: String::new(),
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
    /// Synthetic: every n-th event this late (`capture.late_every`, `capture.late_by`).
    pub synthetic_late: Option<(u64, Duration)>,
    pub rate: Option<u64>,
    pub batch_size: usize,
    pub window: Duration,
    pub allowed_lateness: Duration,
    /// How far behind the newest event a window still takes late events.
    pub late_horizon: Duration,
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
    /// Sink mode: which part of the output this process writes.
    pub sink_part: crate::sink::part::SinkPart,
    /// The admin endpoint (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The address was asked for (a busy port is then fatal; the default's is only a warning).
    pub metrics_addr_given: bool,
    /// What runs: the pipeline, or a subcommand with its options.
    pub task: Task,
}

/// Where a run writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Local(PathBuf),
    S3(crate::storage::s3::S3Settings),
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
    pub state_changes: StateChanges,
    /// Kubernetes names: `None` when off (or `auto` outside a cluster).
    pub kubernetes: Option<KubernetesSettings>,
}

/// Where live capture finds Kubernetes names (`capture.kubernetes*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// The API server's URL; `None`: the in-cluster service account, else the kubeconfig.
    pub api: Option<String>,
    /// The node whose pods are named; `None`: the run's node name.
    pub node: Option<String>,
}

/// Is this process in a Kubernetes pod with a service account (what `kubernetes = "auto"` asks)?
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
}

fn kubernetes_settings(file: &Capture) -> Result<Option<KubernetesSettings>, ConfigError> {
    let mode = required(&file.kubernetes, &keys::KUBERNETES)?;
    let on = match mode.as_str() {
        "on" => true,
        "off" => false,
        "auto" => file.kubernetes_api.is_some() || in_cluster(),
        _ => {
            return Err(invalid(
                &keys::KUBERNETES,
                &mode,
                "expected auto, on or off",
            ))
        }
    };
    if let Some(url) = &file.kubernetes_api {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                &keys::KUBERNETES_API,
                url,
                "expected an http:// or https:// URL",
            ));
        }
        if url.contains('@') {
            return Err(invalid(
                &keys::KUBERNETES_API,
                "(a URL with credentials: not shown)",
                "credentials come from the service account or the kubeconfig, not the URL",
            ));
        }
    }
    Ok(on.then(|| KubernetesSettings {
        api: file.kubernetes_api.clone(),
        node: file.kubernetes_node.clone().filter(|n| !n.is_empty()),
    }))
}

/// Which TCP state changes live capture records (`capture.state_changes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChanges {
    /// Every one the kernel makes (the default).
    All,
    /// Only those into `SYN_SENT`, `ESTABLISHED` and `CLOSE`: what `flows/` counts (attempts, opens,
    /// closes, resets), each with its true previous state. The closing handshake's intermediate
    /// states (`FIN_WAIT1`, `FIN_WAIT2`, `CLOSE_WAIT`, `LAST_ACK`, `CLOSING`) are not in `events/`;
    /// `flows/` is the same but for its `events` column. About a quarter fewer events per
    /// connection.
    Lifecycle,
}

impl StateChanges {
    fn parse(v: &str) -> Result<Self, String> {
        match v {
            "all" => Ok(StateChanges::All),
            "lifecycle" => Ok(StateChanges::Lifecycle),
            _ => Err("expected `all` or `lifecycle`".into()),
        }
    }
}

/// Defaults, in one place (documented in `docs/configuration.md`).
pub mod defaults {
    pub const EVENTS: u64 = 1_000_000;
    pub const SEED: u64 = 1;
    pub const START: &str = "2026-01-01T00:00:00Z";
    pub const BATCH_SIZE: usize = 4096;
    pub const WINDOW_SECS: u64 = 10;
    pub const ALLOWED_LATENESS_SECS: u64 = 5;
    pub const LATE_HORIZON_SECS: u64 = 60;
    pub const OUT: &str = "./tcplake-data";
    pub const MAX_FILE_SIZE: &str = "128MiB";
    pub const MAX_FILE_AGE: &str = "5m";
    pub const ROW_GROUP_ROWS: usize = 131_072;
    pub const CHANNEL_CAPACITY: usize = 16;
    pub const RING_BUFFER_SIZE: &str = "4MiB";
    pub const RTT_SAMPLE_INTERVAL: &str = "100ms";
    pub const BYTES_FLUSH_INTERVAL: &str = "1s";
    pub const STATE_CHANGES: &str = "all";
    pub const KUBERNETES: &str = "auto";
    pub const S3_MAX_RETRY: &str = "10m";
    pub const BROKER_CONNECT_TIMEOUT: &str = "30s";
    pub const BROKER_MAX_AGE: &str = "24h";
    /// Per stream. JetStream reserves it on disk up front, so it must fit the broker's free space.
    pub const BROKER_MAX_BYTES: &str = "1GiB";
    pub const METRICS_ADDR: &str = "127.0.0.1:9477";
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

/// Bounds of the duration settings (each is checked: an absurd value is an error, not an overflow).
mod bounds {
    use std::time::Duration;
    pub const SECOND: Duration = Duration::from_secs(1);
    pub const DAY: Duration = Duration::from_secs(86_400);
    /// `--duration`: up to a century.
    pub const RUN_FOR: Duration = Duration::from_secs(100 * 365 * 86_400);
    /// `--max-file-age`: a day (the sink's broker acknowledgements wait as long as a file is open).
    pub const FILE_AGE: Duration = DAY;
    /// Kernel-side intervals.
    pub const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(1);
    pub const PROBE_INTERVAL_MAX: Duration = Duration::from_secs(3600);
    /// Largest output file: S3 allows 10 000 parts of tcplake's 8 MiB.
    pub const FILE_SIZE_MAX: u64 = 64 << 30;
}

/// S3 settings shared by every `s3://` location of a run (output, hand-off store, replayed log).
struct S3Common {
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    spool: PathBuf,
    max_retry: Duration,
    multipart_threshold: u64,
    single_writer: bool,
}

impl S3Common {
    fn of(file: &Sink) -> Result<Self, ConfigError> {
        let endpoint = file.s3_endpoint.clone();
        if let Some(ep) = &endpoint {
            values::check_endpoint(ep)
                .map_err(|r| invalid(&keys::S3_ENDPOINT, redact_url(ep), r))?;
        }
        let retry = required(&file.s3_max_retry, &keys::S3_MAX_RETRY)?;
        let max_retry = duration_within(&retry, Duration::ZERO, bounds::DAY)
            .map_err(|e| invalid(&keys::S3_MAX_RETRY, &retry, e))?;
        let multipart_threshold = match &file.s3_multipart_threshold {
            None => crate::storage::s3::MULTIPART_THRESHOLD,
            Some(t) => {
                size_within(t, 1 << 20, 5 << 30).map_err(|e| invalid(&keys::S3_MULTIPART, t, e))?
            }
        };
        Ok(S3Common {
            endpoint,
            region: file.s3_region.clone(),
            path_style: file.s3_path_style,
            spool: file
                .spool_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("tcplake-spool")),
            max_retry,
            multipart_threshold,
            single_writer: file.s3_single_writer.unwrap_or(false),
        })
    }

    /// The output `text` names (a directory or `s3://bucket/prefix`). A local path that exists must be
    /// a directory: a file there is a mistake the run would only find later.
    fn output(&self, key: &'static Key, text: &std::ffi::OsStr) -> Result<Output, ConfigError> {
        let shown = text.to_string_lossy();
        match values::location(&shown).map_err(|r| invalid(key, redact_url(&shown), r))? {
            values::Location::Dir(d) if d.exists() && !d.is_dir() => {
                Err(invalid(key, d.display(), "is a file, not a directory"))
            }
            values::Location::Dir(d) => Ok(Output::Local(d)),
            values::Location::S3 { bucket, prefix } => {
                Ok(Output::S3(crate::storage::s3::S3Settings {
                    bucket,
                    prefix,
                    // S3-compatible stores mostly need path-style addressing; AWS prefers virtual hosts.
                    path_style: self.path_style.unwrap_or(self.endpoint.is_some()),
                    endpoint: self.endpoint.clone(),
                    region: self.region.clone(),
                    spool: self.spool.clone(),
                    max_retry: self.max_retry,
                    multipart_threshold: self.multipart_threshold,
                    single_writer: self.single_writer,
                }))
            }
        }
    }
}

impl Settings {
    /// Stacks the layers (defaults < the `--config` file < environment < flags), validates every
    /// value once, and checks that every setting given applies to what runs.
    pub fn resolve(cli: &Cli) -> Result<Self, ConfigError> {
        let file = cli.config.as_deref().map(ConfigFile::load).transpose()?;
        Self::resolve_with(cli, file)
    }

    /// [`Settings::resolve`] with the config file already read (or none).
    pub fn resolve_with(cli: &Cli, file: Option<ConfigFile>) -> Result<Self, ConfigError> {
        let layers = Layers::new(file, cli.given()?)?;
        let settings = Self::validate(cli, &layers).map_err(|e| layers.locate(e))?;
        applies::check(cli, &layers, &settings)?;
        Ok(settings)
    }

    /// Settings from the stacked layers, every value checked; errors name the setting.
    fn validate(cli: &Cli, layers: &Layers) -> Result<Self, ConfigError> {
        let raw = layers.schema()?;
        let run = Run::of(cli);
        let s3 = S3Common::of(&raw.sink)?;
        let out_text = required(&raw.sink.out, &keys::OUT)?;
        let out = s3.output(&keys::OUT, out_text.as_os_str())?;
        let handoff = match &raw.edge.handoff {
            Some(h) => Some(s3.output(&keys::HANDOFF, h.as_os_str())?),
            None => None,
        };
        let node_given = layers.is_set(&keys::NODE);
        let node = raw.node.clone().unwrap_or_else(default_node);
        if node.is_empty() || node.len() > 64 || !node.chars().all(is_node_char) {
            return Err(invalid(
                &keys::NODE,
                &node,
                "use 1-64 characters from A-Z a-z 0-9 . _ -",
            ));
        }
        let start = required(&raw.capture.start, &keys::START)?;
        let start_us = rfc3339_us(&start).map_err(|e| invalid(&keys::START, &start, e))?;
        let window_secs = required(&raw.aggregate.window_secs, &keys::WINDOW)?;
        if window_secs == 0 || window_secs > 86_400 {
            return Err(invalid(
                &keys::WINDOW,
                window_secs,
                "must be between 1 and 86400 seconds",
            ));
        }
        let lateness = required(&raw.aggregate.allowed_lateness_secs, &keys::LATENESS)?;
        if lateness > 86_400 {
            return Err(invalid(
                &keys::LATENESS,
                lateness,
                "must be at most 86400 seconds",
            ));
        }
        // The horizon's default follows the lateness: a window never stops taking events before it
        // is first emitted.
        let horizon = raw
            .aggregate
            .late_horizon_secs
            .unwrap_or(defaults::LATE_HORIZON_SECS.max(lateness));
        if horizon < lateness || horizon > 7 * 86_400 {
            return Err(invalid(
                &keys::HORIZON,
                horizon,
                format!(
                    "must be between the allowed lateness ({lateness} s) and 604800 seconds (7 days)"
                ),
            ));
        }
        let batch_size = required(&raw.capture.batch_size, &keys::BATCH_SIZE)?;
        if !(1..=1_000_000).contains(&batch_size) {
            return Err(invalid(
                &keys::BATCH_SIZE,
                batch_size,
                "must be between 1 and 1000000",
            ));
        }
        let channel_capacity = required(&raw.edge.channel_capacity, &keys::CHANNEL_CAPACITY)?;
        if !(1..=65_536).contains(&channel_capacity) {
            return Err(invalid(
                &keys::CHANNEL_CAPACITY,
                channel_capacity,
                "must be between 1 and 65536",
            ));
        }
        let size = required(&raw.sink.max_file_size, &keys::MAX_FILE_SIZE)?;
        let max_file_bytes = size_within(&size, 1 << 10, bounds::FILE_SIZE_MAX)
            .map_err(|e| invalid(&keys::MAX_FILE_SIZE, &size, e))?;
        let age = required(&raw.sink.max_file_age, &keys::MAX_FILE_AGE)?;
        let max_file_age = duration_within(&age, bounds::SECOND, bounds::FILE_AGE)
            .map_err(|e| invalid(&keys::MAX_FILE_AGE, &age, e))?;
        let row_group_rows = required(&raw.sink.row_group_rows, &keys::ROW_GROUP_ROWS)?;
        if !(1..=16 << 20).contains(&row_group_rows) {
            return Err(invalid(
                &keys::ROW_GROUP_ROWS,
                row_group_rows,
                "must be between 1 and 16777216",
            ));
        }
        let duration = raw
            .capture
            .duration
            .as_ref()
            .map(|d| {
                duration_within(d, Duration::from_millis(1), bounds::RUN_FOR)
                    .map_err(|e| invalid(&keys::DURATION, d, e))
            })
            .transpose()?;
        let ebpf = ebpf_settings(&raw.capture)?;
        let synthetic_late = match (raw.capture.late_every, &raw.capture.late_by) {
            (None, None) => None,
            (Some(0), _) => return Err(invalid(&keys::LATE_EVERY, 0, "must be at least 1")),
            (Some(every), Some(by)) => Some((
                every,
                duration_within(by, Duration::ZERO, bounds::DAY)
                    .map_err(|e| invalid(&keys::LATE_BY, by, e))?,
            )),
            (Some(every), None) => {
                return Err(invalid(
                    &keys::LATE_EVERY,
                    every,
                    "needs capture.late_by too",
                ))
            }
            (None, Some(by)) => {
                return Err(invalid(&keys::LATE_BY, by, "needs capture.late_every too"))
            }
        };
        if raw.capture.rate == Some(0) {
            return Err(invalid(
                &keys::RATE,
                0,
                "must be at least 1 event per second (omit it for no pacing)",
            ));
        }
        let mode = required(&raw.mode, &keys::MODE)?;
        let broker = broker::settings(&raw.broker, batch_size)?;
        if mode.is_split() {
            if broker.is_none() && handoff.is_none() {
                return Err(invalid(
                    &keys::MODE,
                    format!("{mode:?}").to_lowercase(),
                    "split modes need a broker: --broker nats://HOST:PORT (or --handoff DIR|s3://...)",
                ));
            }
            if node.contains('.') {
                return Err(invalid(
                    &keys::NODE,
                    &node,
                    "split modes use the node name in broker subjects: no `.`",
                ));
            }
        }
        let shard = match &raw.aggregate.shard {
            Some(s) => {
                let (index, count) = parse_i_of_n(&keys::SHARD, s)?;
                crate::aggregate::Shard { index, count }
            }
            None => crate::aggregate::Shard::ALL,
        };
        let sink_part = match &raw.sink.part {
            Some(s) => {
                let (index, count) = parse_i_of_n(&keys::SINK_PART, s)?;
                crate::sink::part::SinkPart { index, count }
            }
            None => crate::sink::part::SinkPart::ALL,
        };
        let source = required(&raw.capture.source, &keys::SOURCE)?;
        let replay_from = match source {
            SourceKind::Replay => {
                let from = raw.capture.replay_from.clone().ok_or_else(|| {
                    invalid(
                        &keys::SOURCE,
                        "replay",
                        "name the log to read: --source replay:DIR|s3://...",
                    )
                })?;
                let from = s3.output(&keys::SOURCE, from.as_os_str())?;
                if let Output::Local(dir) = &from {
                    if !dir.exists() {
                        return Err(invalid(
                            &keys::SOURCE,
                            format!("replay:{}", dir.display()),
                            "no such directory: name a recorded output (its events/ is replayed)",
                        ));
                    }
                }
                if run == Run::Pipeline && same_place(&from, &out) {
                    return Err(invalid(
                        &keys::OUT,
                        describe_output(&out),
                        "is the recorded log being replayed: a replay writes a new output (replay \
                         --to NEW), it never rewrites its source",
                    ));
                }
                Some(from)
            }
            _ => None,
        };
        let replay_range = replay_range(&raw.capture)?;
        let metrics = required(&raw.metrics_addr, &keys::METRICS_ADDR)?;
        let metrics_addr = match metrics.as_str() {
            "off" => None,
            a => Some(a.parse().map_err(|_| {
                invalid(
                    &keys::METRICS_ADDR,
                    a,
                    "expected IP:PORT (e.g. 127.0.0.1:9477, [::1]:9477, 0.0.0.0:9477) or off",
                )
            })?),
        };
        let task = Task::of(cli, max_file_bytes, row_group_rows)?;
        Ok(Settings {
            mode,
            node,
            node_given,
            source,
            replay_from,
            replay_range,
            events: raw.capture.events,
            duration,
            ebpf,
            seed: required(&raw.capture.seed, &keys::SEED)?,
            start_us,
            synthetic_late,
            rate: raw.capture.rate,
            batch_size,
            window: Duration::from_secs(window_secs),
            allowed_lateness: Duration::from_secs(lateness),
            late_horizon: Duration::from_secs(horizon),
            out,
            max_file_bytes,
            max_file_age,
            row_group_rows,
            channel_capacity,
            summary: cli.summary,
            broker,
            handoff,
            shard,
            sink_part,
            metrics_addr,
            metrics_addr_given: layers.is_set(&keys::METRICS_ADDR),
            task,
        })
    }
}

/// A setting the defaults layer always fills (`None` would mean the defaults lost a key: say which
/// rather than panic).
fn required<T: Clone>(v: &Option<T>, key: &'static Key) -> Result<T, ConfigError> {
    v.clone()
        .ok_or_else(|| invalid(key, "(none)", "has no value and no default"))
}

/// Do two outputs name the same place (the same directory, or the same bucket and prefix)?
fn same_place(a: &Output, b: &Output) -> bool {
    match (a, b) {
        (Output::Local(x), Output::Local(y)) => {
            let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            canon(x) == canon(y)
        }
        (Output::S3(x), Output::S3(y)) => {
            x.bucket == y.bucket && x.prefix == y.prefix && x.endpoint == y.endpoint
        }
        _ => false,
    }
}

fn describe_output(o: &Output) -> String {
    match o {
        Output::Local(p) => p.display().to_string(),
        Output::S3(s) => format!(
            "s3://{}/{}{}",
            s.bucket,
            s.prefix,
            s.endpoint
                .as_ref()
                .map_or(String::new(), |e| format!(" via {e}"))
        ),
    }
}

fn replay_range(file: &Capture) -> Result<crate::capture::recorded::TimeRange, ConfigError> {
    let since = file.replay_since.clone();
    let until = file.replay_until.clone();
    let time = |key: &'static Key, t: &str| rfc3339_us(t).map_err(|e| invalid(key, t, e));
    let range = crate::capture::recorded::TimeRange {
        since_us: since
            .as_deref()
            .map(|t| time(&keys::SINCE, t))
            .transpose()?,
        until_us: until
            .as_deref()
            .map(|t| time(&keys::UNTIL, t))
            .transpose()?,
    };
    if let (Some(a), Some(b)) = (range.since_us, range.until_us) {
        if a >= b {
            return Err(invalid(
                &keys::UNTIL,
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
        let mut parts = vec![
            format!("mode={:?}", self.mode).to_lowercase(),
            format!("node={}", self.node),
            format!("source={:?}", self.source).to_lowercase(),
            format!("out={}", describe_output(&self.out)),
            format!("window={}s", self.window.as_secs()),
        ];
        if let Some(b) = &self.broker {
            parts.push(format!("broker={}", b.url));
            parts.push(format!("broker_auth={}", b.auth.kind()));
        }
        if let Some(h) = &self.handoff {
            parts.push(format!("handoff={}", describe_output(h)));
        }
        if self.mode == Mode::Aggregate {
            parts.push(format!("shard={}/{}", self.shard.index, self.shard.count));
        }
        if self.mode == Mode::Sink && self.sink_part.count > 1 {
            parts.push(format!(
                "sink_part={}/{}",
                self.sink_part.index, self.sink_part.count
            ));
        }
        parts.push(format!(
            "metrics={}",
            self.metrics_addr
                .map_or("off".to_string(), |a| a.to_string())
        ));
        format!("tcplake: configuration ok: {}", parts.join(" "))
    }

    /// The broker URL (split modes), for summaries: it never carries credentials.
    pub fn broker_url(&self) -> String {
        self.broker
            .as_ref()
            .map(|b| b.url.clone())
            .unwrap_or_default()
    }
}

/// `I/N` with `I < N` (a shard, a sink part).
fn parse_i_of_n(key: &'static keys::Key, s: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || invalid(key, s, "expected I/N with 0 <= I < N <= 1024, e.g. 0/2");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, count): (u32, u32) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if count == 0 || count > 1024 || index >= count {
        return Err(bad());
    }
    Ok((index, count))
}

fn ebpf_settings(file: &Capture) -> Result<EbpfSettings, ConfigError> {
    let ring = required(&file.ring_buffer_size, &keys::RING_BUFFER)?;
    let ring_bytes = parse_size(&ring).map_err(|e| invalid(&keys::RING_BUFFER, &ring, e))?;
    // The kernel requires a power of two that is a multiple of the page size.
    if !ring_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&ring_bytes) {
        return Err(invalid(
            &keys::RING_BUFFER,
            &ring,
            "must be a power of two between 4KiB and 1GiB",
        ));
    }
    let cgroup_id = file
        .cgroup
        .clone()
        .map(|c| match c.parse::<u64>() {
            Ok(id) => Ok(id),
            // On cgroup v2 the id of a cgroup is the inode number of its directory.
            Err(_) => std::fs::metadata(&c)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|e| {
                    invalid(
                        &keys::CGROUP,
                        &c,
                        format!("not an id, and not a readable cgroup directory: {e}"),
                    )
                }),
        })
        .transpose()?;
    let interval = |key: &'static Key, v: &Option<String>| {
        let text = required(v, key)?;
        duration_within(
            &text,
            bounds::PROBE_INTERVAL_MIN,
            bounds::PROBE_INTERVAL_MAX,
        )
        .map_err(|e| invalid(key, &text, e))
    };
    Ok(EbpfSettings {
        port: file.port.filter(|&p| p != 0),
        pid: file.pid.filter(|&p| p != 0),
        cgroup_id,
        exclude_self: required(&file.exclude_self, &keys::INCLUDE_SELF)?,
        ring_buffer_bytes: ring_bytes as u32,
        rtt_sample_interval: interval(&keys::RTT_INTERVAL, &file.rtt_sample_interval)?,
        bytes_flush_interval: interval(&keys::FLUSH_INTERVAL, &file.bytes_flush_interval)?,
        kubernetes: kubernetes_settings(file)?,
        state_changes: {
            let text = required(&file.state_changes, &keys::STATE_CHANGES)?;
            StateChanges::parse(&text).map_err(|e| invalid(&keys::STATE_CHANGES, &text, e))?
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("t.toml"), text)
    }

    /// Settings from flags (and a file's text), as the binary resolves them.
    fn resolve(args: &[&str], file: Option<&str>) -> Result<Settings, ConfigError> {
        let cli = Cli::try_parse_args(std::iter::once("tcplake").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e:?}"));
        Settings::resolve_with(&cli, file.map(|t| parse(t).unwrap()))
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
    fn state_changes_are_all_by_default_and_lifecycle_on_request() {
        let s = resolve(&["--source", "ebpf"], None).unwrap();
        assert_eq!(s.ebpf.state_changes, StateChanges::All);
        let s = resolve(
            &["--source", "ebpf"],
            Some("[capture]\nstate_changes = \"lifecycle\"\n"),
        )
        .unwrap();
        assert_eq!(s.ebpf.state_changes, StateChanges::Lifecycle);
        let err = resolve(
            &["--source", "ebpf"],
            Some("[capture]\nstate_changes = \"some\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("capture.state_changes") && err.contains("`all` or `lifecycle`"),
            "{err}"
        );
    }

    #[test]
    fn precedence_is_flag_over_file_over_default() {
        let s = resolve(
            &["--seed", "3", "--node", "n1", "--source", "synthetic"],
            Some("[aggregate]\nwindow_secs = 30\n[capture]\nevents = 7\nseed = 9\n"),
        )
        .unwrap();
        assert_eq!(s.window, Duration::from_secs(30));
        assert_eq!(s.events, Some(7));
        assert_eq!(s.source, SourceKind::Synthetic);
        assert!(s.ebpf.exclude_self);
        assert_eq!(s.ebpf.ring_buffer_bytes, 4 << 20);
        assert_eq!(s.seed, 3);
        assert_eq!(s.batch_size, defaults::BATCH_SIZE);
        assert_eq!(s.max_file_bytes, 128 << 20);
        assert_eq!(s.max_file_age, Duration::from_secs(300));
        assert_eq!(s.start_us, 1_767_225_600_000_000);
        assert_eq!(s.task, Task::Pipeline);
        // Defaults that follow other settings: the horizon is at least the lateness.
        let s = resolve(&["--node", "n", "--allowed-lateness", "90"], None).unwrap();
        assert_eq!(s.late_horizon, Duration::from_secs(90));
    }

    #[test]
    fn every_layer_is_named_in_errors_and_the_highest_wins() {
        let file = Some("[aggregate]\nwindow_secs = 0\n");
        let err = resolve(&["--node", "n"], file).unwrap_err().to_string();
        assert!(
            err.contains("invalid window `0` (from `t.toml` key `aggregate.window_secs`)"),
            "{err}"
        );
        let err = resolve(&["--node", "n", "--window", "0"], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(from --window)"), "{err}");
        // A flag over a bad file value: the file's value is never used, so it is no error.
        let s = resolve(&["--node", "n", "--window", "7"], file).unwrap();
        assert_eq!(s.window, Duration::from_secs(7));
        // `tcplake replay`'s flags are settings by other names, named as typed.
        let tmp = std::env::temp_dir();
        let from = tmp.to_str().unwrap();
        let err = resolve(
            &[
                "--node", "n", "replay", "--from", from, "--to", "/x", "--window", "0",
            ],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("(from replay --window)"), "{err}");
        let s = resolve(
            &["--node", "n", "replay", "--from", from, "--to", "/x"],
            None,
        )
        .unwrap();
        assert_eq!(s.source, SourceKind::Replay);
        assert_eq!(s.out, Output::Local("/x".into()));
        // ... and checked like any flag: a capture process writes no output.
        let err = resolve(
            &[
                "--node",
                "n",
                "--mode",
                "capture",
                "--broker",
                "nats://h:1",
                "replay",
                "--from",
                from,
                "--to",
                "/x",
            ],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("replay --to has no effect here"), "{err}");
        // --include-self is the file's capture.exclude_self, inverted.
        let s = resolve(
            &["--node", "n", "--include-self"],
            Some("[capture]\nexclude_self = true\n"),
        )
        .unwrap();
        assert!(!s.ebpf.exclude_self);
    }

    #[test]
    fn subcommand_options_are_resolved_with_the_settings() {
        let s = resolve(&["compact", "--target-size", "1MiB"], None).unwrap();
        match s.task {
            Task::Compact(o) => {
                assert_eq!(o.len(), 2);
                assert_eq!(o[0].target_bytes, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
        let err = resolve(&["compact", "--partition", "x"], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid partition `x`"), "{err}");
        assert_eq!(err.matches("invalid partition").count(), 1, "{err}");
        let s = resolve(&["vacuum"], None).unwrap();
        assert_eq!(
            s.task,
            Task::Vacuum {
                datasets: vec![crate::lake::Dataset::Events, crate::lake::Dataset::Flows],
                retention: Duration::from_secs(7 * 86_400)
            }
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = |args: &[&str]| resolve(args, None).unwrap_err().to_string();
        assert!(err(&["--node", "n", "--window", "0"]).contains("invalid window `0`"));
        assert!(err(&["--node", "n", "--max-file-size", "12 parsecs"]).contains("max file size"));
        assert!(err(&["--node", "a/b"]).contains("node name `a/b`"));
        assert!(err(&["--node", "n", "--start", "yesterday"]).contains("start time"));
        assert!(err(&["--node", "n", "--source", "synthetic", "--rate", "0"]).contains("rate"));
        assert!(err(&["--node", "n", "--kubernetes", "maybe"]).contains("invalid kubernetes"));
        let secret = err(&[
            "--node",
            "n",
            "--kubernetes-api",
            "https://admin:hunter2@api:6443",
        ]);
        assert!(secret.contains("Kubernetes API"), "{secret}");
        assert!(
            !secret.contains("hunter2"),
            "no credentials in errors: {secret}"
        );
        assert!(err(&["--node", "n", "--kubernetes-api", "api:6443"]).contains("http://"));
        // Live capture only: a synthetic run is told its setting does nothing.
        assert!(
            err(&["--node", "n", "--source", "synthetic", "--kubernetes", "on"])
                .contains("tunes live eBPF capture")
        );
    }

    #[test]
    fn kubernetes_names_follow_the_flags_or_the_cluster() {
        let k = |args: &[&str]| resolve(args, None).unwrap().ebpf.kubernetes;
        // Outside a cluster, `auto` is off.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert_eq!(k(&["--node", "n"]), None);
        }
        assert_eq!(
            k(&["--node", "n", "--kubernetes-api", "http://127.0.0.1:8001"]),
            Some(KubernetesSettings {
                api: Some("http://127.0.0.1:8001".into()),
                node: None
            })
        );
        assert_eq!(
            k(&[
                "--node",
                "n",
                "--kubernetes",
                "on",
                "--kubernetes-node",
                "k1"
            ]),
            Some(KubernetesSettings {
                api: None,
                node: Some("k1".into())
            })
        );
        assert_eq!(
            k(&[
                "--node",
                "n",
                "--kubernetes",
                "off",
                "--kubernetes-api",
                "http://x"
            ]),
            None
        );
    }

    /// Thousands of random flag combinations through parsing and resolution: an error or settings,
    /// never a panic (the binary-level property test in tests/it/bad_input.rs also runs what passes).
    #[test]
    fn random_flag_combinations_resolve_or_fail_without_panicking() {
        let pool: &[(&str, &[&str])] = &[
            (
                "--source",
                &["synthetic", "ebpf", "replay:/nonexistent", "replay:", "x"],
            ),
            ("--events", &["0", "1", "18446744073709551615", "-1"]),
            (
                "--duration",
                &["1s", "0s", "18446744073709551615s", "300000000000y", "1ns"],
            ),
            (
                "--max-file-age",
                &["1s", "1000y", "18446744073709551615s", ""],
            ),
            (
                "--max-file-size",
                &["0", "1KiB", "18446744073709551615GiB", "64GiB"],
            ),
            ("--window", &["0", "1", "86400", "4294967296"]),
            ("--allowed-lateness", &["0", "86401"]),
            (
                "--start",
                &["0000-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "x"],
            ),
            ("--mode", &["monolith", "capture", "aggregate", "sink"]),
            (
                "--broker",
                &["nats://u:p@h:1", "nats://", "nats://h:0", "tls://h"],
            ),
            ("--handoff", &["/tmp", "s3://bkt/x", "S3://x"]),
            ("--shard", &["0/1", "1/0", "5/2", "x"]),
            ("--sink-part", &["1/1", "0/0", "3/2", "y"]),
            ("--out", &["s3://bkt/p", "S3://b", "s3:/b", "/tmp/x", ""]),
            (
                "--s3-endpoint",
                &["http://h:1", "http://u:p@h", "https://[::1]:9"],
            ),
            ("--metrics-addr", &["off", "0.0.0.0:0", "[::1]:1", "x"]),
            ("--rate", &["0", "1", "18446744073709551615"]),
            ("--batch-size", &["0", "1", "1000000", "1000001"]),
            ("--node", &["a", "", "a.b", &"x".repeat(65)]),
            ("--since", &["2026-01-01T00:00:00Z", "x"]),
            ("--until", &["2025-01-01T00:00:00Z"]),
            ("--port", &["0", "80"]),
            ("--cgroup", &["1", "/nonexistent"]),
        ];
        let mut x = 0x1234_5678_9abc_def0_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut args = vec!["tcplake".to_string()];
            if next() % 4 == 0 {
                args.push(["compact", "bench", "replay"][(next() % 3) as usize].into());
            }
            for _ in 0..next() % 6 {
                let (flag, values) = pool[(next() % pool.len() as u64) as usize];
                args.push(flag.into());
                args.push(values[(next() % values.len() as u64) as usize].into());
            }
            if let Ok(cli) = Cli::try_parse_args(&args) {
                let _ = Settings::resolve(&cli);
            }
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
