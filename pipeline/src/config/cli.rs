//! Command-line flags (clap): every value optional, so the file and defaults can fill the gaps.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use figment::value::Value;
use serde::{Deserialize, Serialize};

use super::keys;
use super::layers::Given;
pub use super::layers::Origin;

/// How the pipeline is deployed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
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
  sink       writes both datasets (it learns the shards from their batches). Same stage code.

OUTPUT
  <out>/events/   Delta Lake table: one row per event (the source of truth)
  <out>/flows/    Delta Lake table: one row per flow per window (the projection)
  Partitioned by date and hour; every file is one Delta commit.

  Query:  duckdb -c \"LOAD delta; SELECT sum(bytes_sent) FROM delta_scan('tcplake-data/flows')\"

CONFIGURATION
  Every flag can also be set in a TOML file (--config) or an environment variable (shown per flag).
  Precedence: flag > environment > file > default. SIGINT/SIGTERM flush everything and exit 0.";

/// Command-line flags: a surface over the settings of [`super::Schema`] (each flag's key is in
/// [`super::keys`]), plus what only a command line has (subcommands, `--config`, `--check-config`).
/// Every value is optional: a flag not given leaves the setting to the layers below it.
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
    /// ebpf: Kubernetes names for pods (pod, namespace, workload, node) from the API server: on, off,
    /// or auto = on when running in a cluster (a service account is mounted) [default: auto].
    #[arg(long, env = "TCPLAKE_KUBERNETES", value_name = "auto|on|off")]
    pub kubernetes: Option<String>,
    /// ebpf: the Kubernetes API server's URL, without credentials (e.g. a `kubectl proxy`)
    /// [default: the in-cluster service account, else the kubeconfig]; implies --kubernetes on.
    #[arg(long, env = "TCPLAKE_KUBERNETES_API", value_name = "URL")]
    pub kubernetes_api: Option<String>,
    /// ebpf: the Kubernetes node whose pods are named [default: the node name, as --node sets it].
    #[arg(long, env = "TCPLAKE_KUBERNETES_NODE", value_name = "NAME")]
    pub kubernetes_node: Option<String>,
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
    /// How far behind the newest event a window waits before it is first emitted, in seconds
    /// [default: 5].
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_ALLOWED_LATENESS",
        value_name = "SECS"
    )]
    pub allowed_lateness: Option<u64>,
    /// How far behind the newest event a window still takes late events (it is then emitted again,
    /// its rows replaced), in seconds; later events are counted and left out of flows/ [default: 60].
    #[arg(long, global = true, env = "TCPLAKE_LATE_HORIZON", value_name = "SECS")]
    pub late_horizon: Option<u64>,
    /// Name of this node, stored in every row [default: the host name].
    #[arg(long, global = true, env = "TCPLAKE_NODE")]
    pub node: Option<String>,
    /// Events per batch moved between stages [default: 4096].
    #[arg(long, global = true, env = "TCPLAKE_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<usize>,
    /// Capacity of each in-memory edge, in batches [default: 16].
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_CHANNEL_CAPACITY",
        value_name = "BATCHES"
    )]
    pub channel_capacity: Option<usize>,
    /// Close a Parquet file at this size, e.g. 128MiB [default: 128MiB].
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_MAX_FILE_SIZE",
        value_name = "SIZE"
    )]
    pub max_file_size: Option<String>,
    /// Close a Parquet file after it has been open this long, e.g. 5m [default: 5m].
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_MAX_FILE_AGE",
        value_name = "DURATION"
    )]
    pub max_file_age: Option<String>,
    /// Split modes: the NATS JetStream broker, e.g. nats://127.0.0.1:4222.
    #[arg(long, env = "TCPLAKE_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// Split modes: broker user; the password comes from TCPLAKE_BROKER_PASSWORD or
    /// --broker-password-file (never a flag: command lines are visible to every user of the host).
    #[arg(long, env = "TCPLAKE_BROKER_USER", value_name = "USER")]
    pub broker_user: Option<String>,
    /// Split modes: file holding the broker password.
    #[arg(long, env = "TCPLAKE_BROKER_PASSWORD_FILE", value_name = "FILE")]
    pub broker_password_file: Option<PathBuf>,
    /// Split modes: file holding a broker token (or set TCPLAKE_BROKER_TOKEN).
    #[arg(long, env = "TCPLAKE_BROKER_TOKEN_FILE", value_name = "FILE")]
    pub broker_token_file: Option<PathBuf>,
    /// Split modes: NATS credentials file (`.creds`: user JWT + NKey seed, as nsc makes them).
    #[arg(long, env = "TCPLAKE_BROKER_CREDS", value_name = "FILE")]
    pub broker_creds: Option<PathBuf>,
    /// Split modes: file holding a user NKey seed (`SU...`).
    #[arg(long, env = "TCPLAKE_BROKER_NKEY", value_name = "FILE")]
    pub broker_nkey: Option<PathBuf>,
    /// Split modes: partition the events stream by flow key into P partitions, shared by up to P
    /// aggregators (each reads only its partitions' share; their count can change while capture
    /// runs). Fixed when the streams are created; later processes learn it from the broker
    /// [default: as the stream was created; 1 for a new one].
    #[arg(long, env = "TCPLAKE_BROKER_PARTITIONS", value_name = "P")]
    pub broker_partitions: Option<u32>,
    /// Split modes without a broker: hand batches over through this object store (a directory or
    /// s3://bucket/prefix), the seed's original design, for comparison (no crash recovery).
    #[arg(long, env = "TCPLAKE_HANDOFF", value_name = "DIR|S3_URL")]
    pub handoff: Option<PathBuf>,
    /// Aggregate mode: this aggregator's shard, I/N (0-based) [default: 0/1].
    #[arg(long, env = "TCPLAKE_SHARD", value_name = "I/N")]
    pub shard: Option<String>,
    /// Sink mode over the broker: this sink's part of the output, I/N (0-based) [default: 0/1]. Sink I
    /// writes the event logs of the nodes whose name hashes to I, and the flows of the aggregator
    /// shards S with S mod N = I. Every sink of an output must say the same N (the output records it).
    #[arg(long, env = "TCPLAKE_SINK_PART", value_name = "I/N")]
    pub sink_part: Option<String>,
    /// Obsolete, ignored with a warning: the sink learns the aggregator shards from their batches.
    #[arg(long, env = "TCPLAKE_SHARDS", value_name = "N", hide = true)]
    pub shards: Option<u32>,
    /// Serve /metrics, /healthz and /readyz here; `off` to disable [default: 127.0.0.1:9477].
    #[arg(
        long,
        global = true,
        env = "TCPLAKE_METRICS_ADDR",
        value_name = "ADDR:PORT|off"
    )]
    pub metrics_addr: Option<String>,
    /// Logs as JSON lines (one object per event) instead of text.
    #[arg(long, global = true, env = "TCPLAKE_LOG_JSON")]
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
    /// Where each value given came from (flag or environment variable), for error messages and the
    /// check that every setting given applies to what runs.
    #[arg(skip)]
    pub origins: Origins,
}

/// The origin of every flag given, by its id (the field name: `max_file_age`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    /// Reads where each argument of `matches` came from (defaults are not "given").
    fn of(cmd: &clap::Command, matches: &clap::ArgMatches) -> Self {
        let mut map = BTreeMap::new();
        let mut collect = |cmd: &clap::Command, m: &clap::ArgMatches, globals_only: bool| {
            for arg in cmd.get_arguments() {
                if globals_only && !arg.is_global_set() {
                    continue;
                }
                let id = arg.get_id().as_str();
                let origin = match m.value_source(id) {
                    Some(clap::parser::ValueSource::CommandLine) => Origin::Flag(flag_name(arg)),
                    Some(clap::parser::ValueSource::EnvVariable) => Origin::Env(
                        arg.get_env()
                            .map(|v| v.to_string_lossy().into_owned())
                            .unwrap_or_else(|| flag_name(arg)),
                    ),
                    _ => continue,
                };
                map.entry(id.to_string()).or_insert(origin);
            }
        };
        collect(cmd, matches, false);
        // Global flags given after a subcommand are recorded in the subcommand's matches.
        if let Some((name, sub)) = matches.subcommand() {
            if let Some(sc) = cmd.find_subcommand(name) {
                // The subcommand's own flags (`bench --events`) are its business, not settings.
                collect(sc, sub, true);
            }
        }
        Origins(map)
    }

    /// Where the flag with this id came from, if it was given.
    pub fn get(&self, id: &str) -> Option<&Origin> {
        self.0.get(id)
    }

    /// Every flag given, with its origin.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Origin)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

fn flag_name(arg: &clap::Arg) -> String {
    arg.get_long()
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| arg.get_id().to_string())
}

/// Why the command line could not be parsed.
#[derive(Debug)]
pub enum CliError {
    /// clap's own error (help, version, a bad flag): clap prints it.
    Clap(clap::Error),
    /// A bad value in an environment variable: one line naming the variable.
    Env(String),
}

impl Cli {
    /// Parses the process's arguments and environment (see [`Cli::try_parse_args`]).
    pub fn parse_args() -> Result<Self, CliError> {
        Self::try_parse_args(std::env::args_os())
    }

    /// Parses `args` (the first is the program name) and the `TCPLAKE_*` environment, remembering
    /// where each value came from; a bad value in an environment variable is reported by its variable
    /// (clap would name the flag, which the user never typed).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Cli::command();
        let matches = cmd.clone().try_get_matches_from(&args).map_err(|e| {
            match env_error(&cmd, &e, &args) {
                Some(line) => CliError::Env(line),
                None => CliError::Clap(e),
            }
        })?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
        cli.origins = Origins::of(&cmd, &matches);
        Ok(cli)
    }
}

/// If clap rejected a value that came from an environment variable (the flag is not on the command
/// line but its variable is set), the one line that says so.
fn env_error(cmd: &clap::Command, e: &clap::Error, args: &[OsString]) -> Option<String> {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(arg_text)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg_text.split_whitespace().next()?.strip_prefix("--")?;
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    let var = arg.get_env()?.to_string_lossy().into_owned();
    let on_command_line = args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    if on_command_line || std::env::var_os(&var).is_none() {
        return None;
    }
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => std::env::var(&var).unwrap_or_default(),
    };
    let reason = match (e.get(ContextKind::ValidValue), std::error::Error::source(e)) {
        (Some(ContextValue::Strings(valid)), _) => format!("expected one of {}", valid.join(", ")),
        (_, Some(source)) => source.to_string(),
        _ => "not a valid value".to_string(),
    };
    Some(format!(
        "invalid value `{value}` in {var} (the environment variable of --{long}): {reason}"
    ))
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
    /// Delete the files no table version younger than the retention needs (files compaction and
    /// window rewrites replaced, files of interrupted runs). Readers of older versions need them.
    Vacuum(VacuumArgs),
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
pub struct VacuumArgs {
    /// Which dataset [default: both].
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// Keep what versions younger than this need, e.g. 7d, 24h [default: 7d, Delta's default].
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<String>,
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
    /// Every setting this command line gives (flags, their environment variables, and `tcplake
    /// replay`'s flags, which are the same settings by other names), by its key in the schema.
    pub fn given(&self) -> Result<Vec<Given>, super::ConfigError> {
        let mut out = Vec::new();
        let mut put = |key: &'static keys::Key, value: Value, origin: &Origin| {
            if let Some(k) = key.file {
                out.push(Given {
                    key: k,
                    value,
                    origin: origin.clone(),
                });
            }
        };
        for (id, origin) in self.origins.iter() {
            let Some(key) = keys::by_flag(id) else {
                continue;
            };
            match id {
                "source" => {
                    if let Some(s) = &self.source {
                        put(key, serialize(key, s.kind)?, origin);
                        if let Some(from) = &s.from {
                            put(
                                &keys::REPLAY_FROM,
                                serialize(&keys::REPLAY_FROM, from)?,
                                origin,
                            );
                        }
                    }
                }
                // The flag says the opposite of the file's key, and only ever asks for inclusion
                // (`TCPLAKE_INCLUDE_SELF=false` leaves the file's choice alone).
                "include_self" => {
                    if self.include_self {
                        put(key, Value::from(false), origin);
                    }
                }
                _ => {
                    if let Some(v) = self.flag_value(id, key)? {
                        put(key, v, origin);
                    }
                }
            }
        }
        if let Some(Command::Replay(r)) = &self.command {
            let flag = |f: &str| Origin::Flag(format!("replay {f}"));
            put(
                &keys::SOURCE,
                serialize(&keys::SOURCE, SourceKind::Replay)?,
                &flag("--from"),
            );
            put(
                &keys::REPLAY_FROM,
                serialize(&keys::REPLAY_FROM, &r.from)?,
                &flag("--from"),
            );
            put(&keys::OUT, serialize(&keys::OUT, &r.to)?, &flag("--to"));
            if let Some(t) = &r.since {
                put(&keys::SINCE, Value::from(t.clone()), &flag("--since"));
            }
            if let Some(t) = &r.until {
                put(&keys::UNTIL, Value::from(t.clone()), &flag("--until"));
            }
            if let Some(w) = r.window {
                put(&keys::WINDOW, Value::from(w), &flag("--window"));
            }
        }
        Ok(out)
    }

    /// The value of the flag with clap id `id`, as a schema value.
    fn flag_value(
        &self,
        id: &str,
        key: &'static keys::Key,
    ) -> Result<Option<Value>, super::ConfigError> {
        macro_rules! fields {
            ($($f:ident),* $(,)?) => {
                match id {
                    $(stringify!($f) => self.$f.as_ref().map(|v| serialize(key, v)).transpose(),)*
                    _ => Ok(None),
                }
            };
        }
        fields!(
            mode,
            since,
            until,
            events,
            duration,
            port,
            pid,
            cgroup,
            kubernetes,
            kubernetes_api,
            kubernetes_node,
            seed,
            start,
            rate,
            out,
            s3_endpoint,
            s3_region,
            spool_dir,
            window,
            allowed_lateness,
            late_horizon,
            node,
            batch_size,
            channel_capacity,
            max_file_size,
            max_file_age,
            broker,
            broker_user,
            broker_password_file,
            broker_token_file,
            broker_creds,
            broker_nkey,
            broker_partitions,
            handoff,
            shard,
            shards,
            sink_part,
            metrics_addr,
        )
    }
}

/// A flag's value in the schema's terms (a path that is not UTF-8 cannot be one).
fn serialize<T: Serialize>(key: &'static keys::Key, v: T) -> Result<Value, super::ConfigError> {
    Value::serialize(v).map_err(|e| super::invalid(key, "(a value that is not UTF-8)", e))
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Synthetic events per capture node (each mode runs them all).
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
    pub modes: Vec<BenchMode>,
    /// Aggregator processes in split modes.
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Sink processes in split-broker, each writing its part of the output (`--sink-part J/N`).
    #[arg(long, default_value_t = 1)]
    pub sinks: u32,
    /// split-broker: partition the events stream by flow key, one partition per aggregator
    /// (`broker.partitions` = `--shards`), so each aggregator reads only its share.
    #[arg(long)]
    pub partitioned: bool,
    /// Capture nodes per run, in order: each topology runs once per count, with that many capture
    /// processes (own `--node`, seed + i, `--events` each).
    #[arg(long, value_delimiter = ',', default_value = "1", value_name = "N,...")]
    pub nodes: Vec<u32>,
    /// Where split-object-store hands batches over [default: a directory beside the report]; an
    /// `s3://BUCKET/PREFIX` goes through that store (with the global `--s3-endpoint`/`--s3-region`
    /// and the AWS credentials of the environment), and the requests counted are the ones made.
    #[arg(long, value_name = "DIR|S3_URL")]
    pub handoff: Option<String>,
    /// Price table (TOML) instead of the built-in AWS list prices.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Directory for the outputs, report.json and report.md [default: $TMPDIR/tcplake-bench].
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// Deployment topologies the bench can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// One process, in-memory hand-off.
    Monolith,
    /// Capture, aggregators and sink as separate processes joined by NATS JetStream.
    SplitBroker,
    /// The same processes handing batches over as objects in a store (the seed's original design),
    /// each object a billed PUT, polled for with GETs, and an orchestration transition.
    SplitObjectStore,
}

impl BenchMode {
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Monolith => "monolith",
            BenchMode::SplitBroker => "split-broker",
            BenchMode::SplitObjectStore => "split-object-store",
        }
    }
}
