//! Configuration: command-line flags, environment variables and a TOML file, resolved once into
//! validated [`Settings`] before anything starts.
//!
//! Precedence, highest first: flag, environment variable (`TCPLAKE_*`), config file, built-in default.
//! The file is strict (`deny_unknown_fields`): a misspelt key is an error naming the key and line, not
//! a silently ignored setting.

mod applies;
mod broker;
mod cli;
mod file;
pub mod keys;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use applies::Run;
pub use broker::{max_message_bytes, PASSWORD_ENV, TOKEN_ENV};
pub use cli::*;
pub use file::*;
use keys::Key;
pub use values::{duration_within, parse_size, redact_url, rfc3339_us, size_within};

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
}

fn invalid(key: &'static Key, value: impl std::fmt::Display, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
        origin: String::new(),
    }
}

impl ConfigError {
    /// Names where an invalid value came from: the flag, its environment variable, or the file key.
    fn locate(self, cli: &Cli, file: &FileConfig) -> Self {
        match self {
            ConfigError::Invalid {
                key,
                value,
                reason,
                origin,
            } if origin.is_empty() => {
                let from = key
                    .flag
                    .and_then(|id| cli.origins.get(id))
                    .map(|o| format!(" (from {o})"))
                    .or_else(|| {
                        let k = key.file.filter(|k| file.has(k))?;
                        let path = file.path.as_ref()?;
                        Some(format!(" (from `{}` key `{k}`)", path.display()))
                    })
                    .unwrap_or_default();
                ConfigError::Invalid {
                    key,
                    value,
                    reason,
                    origin: from,
                }
            }
            other => other,
        }
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
    /// The admin endpoint (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The address was asked for (a busy port is then fatal; the default's is only a warning).
    pub metrics_addr_given: bool,
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
    fn of(cli: &Cli, file: &FileSink) -> Result<Self, ConfigError> {
        let endpoint = cli.s3_endpoint.clone().or(file.s3_endpoint.clone());
        if let Some(ep) = &endpoint {
            values::check_endpoint(ep)
                .map_err(|r| invalid(&keys::S3_ENDPOINT, redact_url(ep), r))?;
        }
        let retry = file
            .s3_max_retry
            .clone()
            .unwrap_or_else(|| defaults::S3_MAX_RETRY.into());
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
            region: cli.s3_region.clone().or(file.s3_region.clone()),
            path_style: file.s3_path_style,
            spool: cli
                .spool_dir
                .clone()
                .or(file.spool_dir.clone())
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
    /// Resolves flags + environment (already merged by clap) over the file over the defaults, and
    /// checks that every setting given applies to what runs.
    pub fn resolve(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let settings = Self::merge(cli, &file)?;
        applies::check(cli, &file, &settings)?;
        Ok(settings)
    }

    /// Layers flags + environment over the file over the defaults and validates every value; errors
    /// name where the bad value came from.
    pub fn merge(cli: &Cli, file: &FileConfig) -> Result<Self, ConfigError> {
        Self::merge_layers(cli, file).map_err(|e| e.locate(cli, file))
    }

    fn merge_layers(cli: &Cli, file: &FileConfig) -> Result<Self, ConfigError> {
        let s3 = S3Common::of(cli, &file.sink)?;
        let out_text = cli
            .out
            .clone()
            .or(file.sink.out.clone())
            .unwrap_or_else(|| defaults::OUT.into());
        let out = s3.output(&keys::OUT, out_text.as_os_str())?;
        let handoff = match cli.handoff.clone().or(file.edge.handoff.clone()) {
            Some(h) => Some(s3.output(&keys::HANDOFF, h.as_os_str())?),
            None => None,
        };
        let node_given = cli.node.is_some() || file.node.is_some();
        let node = cli
            .node
            .clone()
            .or(file.node.clone())
            .unwrap_or_else(default_node);
        if node.is_empty() || node.len() > 64 || !node.chars().all(is_node_char) {
            return Err(invalid(
                &keys::NODE,
                &node,
                "use 1-64 characters from A-Z a-z 0-9 . _ -",
            ));
        }
        let start = cli
            .start
            .clone()
            .or(file.capture.start.clone())
            .unwrap_or_else(|| defaults::START.into());
        let start_us = rfc3339_us(&start).map_err(|e| invalid(&keys::START, &start, e))?;
        let window_secs = cli
            .window
            .or(file.aggregate.window_secs)
            .unwrap_or(defaults::WINDOW_SECS);
        if window_secs == 0 || window_secs > 86_400 {
            return Err(invalid(
                &keys::WINDOW,
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
                &keys::LATENESS,
                lateness,
                "must be at most 86400 seconds",
            ));
        }
        let horizon = cli
            .late_horizon
            .or(file.aggregate.late_horizon_secs)
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
        let batch_size = cli
            .batch_size
            .or(file.capture.batch_size)
            .unwrap_or(defaults::BATCH_SIZE);
        if !(1..=1_000_000).contains(&batch_size) {
            return Err(invalid(
                &keys::BATCH_SIZE,
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
                &keys::CHANNEL_CAPACITY,
                channel_capacity,
                "must be between 1 and 65536",
            ));
        }
        let size = cli
            .max_file_size
            .clone()
            .or(file.sink.max_file_size.clone())
            .unwrap_or_else(|| defaults::MAX_FILE_SIZE.into());
        let max_file_bytes = size_within(&size, 1 << 10, bounds::FILE_SIZE_MAX)
            .map_err(|e| invalid(&keys::MAX_FILE_SIZE, &size, e))?;
        let age = cli
            .max_file_age
            .clone()
            .or(file.sink.max_file_age.clone())
            .unwrap_or_else(|| defaults::MAX_FILE_AGE.into());
        let max_file_age = duration_within(&age, bounds::SECOND, bounds::FILE_AGE)
            .map_err(|e| invalid(&keys::MAX_FILE_AGE, &age, e))?;
        let row_group_rows = file.sink.row_group_rows.unwrap_or(defaults::ROW_GROUP_ROWS);
        if !(1..=16 << 20).contains(&row_group_rows) {
            return Err(invalid(
                &keys::ROW_GROUP_ROWS,
                row_group_rows,
                "must be between 1 and 16777216",
            ));
        }
        let duration = cli
            .duration
            .clone()
            .or(file.capture.duration.clone())
            .map(|d| {
                duration_within(&d, Duration::from_millis(1), bounds::RUN_FOR)
                    .map_err(|e| invalid(&keys::DURATION, &d, e))
            })
            .transpose()?;
        let ebpf = ebpf_settings(cli, &file.capture)?;
        let synthetic_late = match (file.capture.late_every, &file.capture.late_by) {
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
        if cli.rate == Some(0) || (cli.rate.is_none() && file.capture.rate == Some(0)) {
            return Err(invalid(
                &keys::RATE,
                0,
                "must be at least 1 event per second (omit it for no pacing)",
            ));
        }
        let mode = cli.mode.or(file.mode).unwrap_or(Mode::Monolith);
        let broker = broker::settings(cli, &file.broker, batch_size)?;
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
        let shard = match cli.shard.clone().or(file.aggregate.shard.clone()) {
            Some(s) => parse_shard(&s)?,
            None => crate::aggregate::Shard::ALL,
        };
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
                if Run::of(cli) == Run::Pipeline && same_place(&from, &out) {
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
        let replay_range = replay_range(cli, &file.capture)?;
        let metrics_given = cli.metrics_addr.clone().or(file.metrics_addr.clone());
        let metrics_addr = match metrics_given.as_deref().unwrap_or(defaults::METRICS_ADDR) {
            "off" => None,
            a => Some(a.parse().map_err(|_| {
                invalid(
                    &keys::METRICS_ADDR,
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
            synthetic_late,
            rate: cli.rate.or(file.capture.rate),
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
            metrics_addr,
            metrics_addr_given: metrics_given.is_some(),
        })
    }
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

fn replay_range(
    cli: &Cli,
    file: &FileCapture,
) -> Result<crate::capture::recorded::TimeRange, ConfigError> {
    let since = cli.since.clone().or(file.replay_since.clone());
    let until = cli.until.clone().or(file.replay_until.clone());
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

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> Result<crate::aggregate::Shard, ConfigError> {
    let bad = || {
        invalid(
            &keys::SHARD,
            s,
            "expected I/N with 0 <= I < N <= 1024, e.g. 0/2",
        )
    };
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

fn ebpf_settings(cli: &Cli, file: &FileCapture) -> Result<EbpfSettings, ConfigError> {
    let ring = file
        .ring_buffer_size
        .clone()
        .unwrap_or_else(|| defaults::RING_BUFFER_SIZE.into());
    let ring_bytes = parse_size(&ring).map_err(|e| invalid(&keys::RING_BUFFER, &ring, e))?;
    // The kernel requires a power of two that is a multiple of the page size.
    if !ring_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&ring_bytes) {
        return Err(invalid(
            &keys::RING_BUFFER,
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
                        &keys::CGROUP,
                        &c,
                        format!("not an id, and not a readable cgroup directory: {e}"),
                    )
                }),
        })
        .transpose()?;
    let interval = |key: &'static Key, v: &Option<String>, default: &str| {
        let text = v.clone().unwrap_or_else(|| default.into());
        duration_within(
            &text,
            bounds::PROBE_INTERVAL_MIN,
            bounds::PROBE_INTERVAL_MAX,
        )
        .map_err(|e| invalid(key, &text, e))
    };
    Ok(EbpfSettings {
        port: cli.port.or(file.port).filter(|&p| p != 0),
        pid: cli.pid.or(file.pid).filter(|&p| p != 0),
        cgroup_id,
        exclude_self: !cli.include_self && file.exclude_self.unwrap_or(true),
        ring_buffer_bytes: ring_bytes as u32,
        rtt_sample_interval: interval(
            &keys::RTT_INTERVAL,
            &file.rtt_sample_interval,
            defaults::RTT_SAMPLE_INTERVAL,
        )?,
        bytes_flush_interval: interval(
            &keys::FLUSH_INTERVAL,
            &file.bytes_flush_interval,
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
        let s = Settings::merge(&cli, &file).unwrap();
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
            Settings::merge(&cli, &FileConfig::default())
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
