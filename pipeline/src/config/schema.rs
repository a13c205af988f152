//! The one configuration schema: every setting by its dotted key (`aggregate.window_secs`), grouped
//! by stage. The config file is written in it; flags and environment variables are a surface over it
//! (their keys are in [`super::keys`]); the built-in defaults are a value of it ([`Schema::defaults`]).
//! [`super::layers`] stacks them, and the result is validated once into [`super::Settings`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{defaults, ConfigError, Mode, SourceKind};

/// Every setting. A value is `None` where nothing set it and it has no plain default (its default
/// depends on other settings, or there is none).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    pub mode: Option<Mode>,
    pub node: Option<String>,
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub capture: Capture,
    #[serde(default)]
    pub aggregate: Aggregate,
    #[serde(default)]
    pub sink: Sink,
    #[serde(default)]
    pub edge: Edge,
    #[serde(default)]
    pub broker: Broker,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_age: Option<String>,
    pub max_bytes: Option<String>,
    pub compress: Option<bool>,
    pub ack_wait: Option<String>,
    pub partitions: Option<u32>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
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
    /// `auto`, `on` or `off`.
    pub kubernetes: Option<String>,
    pub kubernetes_api: Option<String>,
    pub kubernetes_node: Option<String>,
    pub exclude_self: Option<bool>,
    pub ring_buffer_size: Option<String>,
    pub rtt_sample_interval: Option<String>,
    pub bytes_flush_interval: Option<String>,
    /// `all` or `lifecycle`.
    pub state_changes: Option<String>,
    pub seed: Option<u64>,
    pub start: Option<String>,
    /// Synthetic: every `late_every`-th event arrives `late_by` late (stragglers, to exercise lateness).
    pub late_every: Option<u64>,
    pub late_by: Option<String>,
    pub rate: Option<u64>,
    pub batch_size: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    pub window_secs: Option<u64>,
    pub allowed_lateness_secs: Option<u64>,
    pub late_horizon_secs: Option<u64>,
    pub shard: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    pub out: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: Option<bool>,
    pub s3_max_retry: Option<String>,
    pub s3_multipart_threshold: Option<String>,
    pub s3_single_writer: Option<bool>,
    pub spool_dir: Option<PathBuf>,
    pub max_file_size: Option<String>,
    pub max_file_age: Option<String>,
    pub row_group_rows: Option<usize>,
    pub shards: Option<u32>,
    pub part: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub channel_capacity: Option<usize>,
    pub handoff: Option<PathBuf>,
}

impl Schema {
    /// The built-in defaults: the lowest layer. Settings whose default depends on others (the late
    /// horizon, the event count, the node name) are left to validation.
    pub fn defaults() -> Schema {
        let s = |v: &str| Some(v.to_string());
        Schema {
            mode: Some(Mode::Monolith),
            node: None,
            metrics_addr: s(defaults::METRICS_ADDR),
            capture: Capture {
                source: Some(SourceKind::Ebpf),
                exclude_self: Some(true),
                ring_buffer_size: s(defaults::RING_BUFFER_SIZE),
                rtt_sample_interval: s(defaults::RTT_SAMPLE_INTERVAL),
                bytes_flush_interval: s(defaults::BYTES_FLUSH_INTERVAL),
                state_changes: s(defaults::STATE_CHANGES),
                kubernetes: s(defaults::KUBERNETES),
                seed: Some(defaults::SEED),
                start: s(defaults::START),
                batch_size: Some(defaults::BATCH_SIZE),
                ..Capture::default()
            },
            aggregate: Aggregate {
                window_secs: Some(defaults::WINDOW_SECS),
                allowed_lateness_secs: Some(defaults::ALLOWED_LATENESS_SECS),
                ..Aggregate::default()
            },
            sink: Sink {
                out: Some(defaults::OUT.into()),
                s3_max_retry: s(defaults::S3_MAX_RETRY),
                s3_single_writer: Some(false),
                max_file_size: s(defaults::MAX_FILE_SIZE),
                max_file_age: s(defaults::MAX_FILE_AGE),
                row_group_rows: Some(defaults::ROW_GROUP_ROWS),
                ..Sink::default()
            },
            edge: Edge {
                channel_capacity: Some(defaults::CHANNEL_CAPACITY),
                handoff: None,
            },
            broker: Broker {
                connect_timeout: s(defaults::BROKER_CONNECT_TIMEOUT),
                max_age: s(defaults::BROKER_MAX_AGE),
                max_bytes: s(defaults::BROKER_MAX_BYTES),
                compress: Some(true),
                ..Broker::default()
            },
        }
    }
}

/// A config file, checked against the schema: what it sets, as written.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// The file's tables and values (only what it sets: the layer above the defaults).
    pub table: toml::Table,
    /// Every key the file sets, dotted (`aggregate.window_secs`).
    pub keys: BTreeSet<String>,
}

impl ConfigFile {
    /// Reads and checks a config file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text` against the schema (a misspelt key or a wrong type is an error naming the key and
    /// line, not a silently ignored setting).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_error = |e: toml::de::Error| {
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
        };
        let _: Schema = toml::from_str(text).map_err(parse_error)?;
        let table: toml::Table = text.parse().map_err(parse_error)?;
        let mut keys = BTreeSet::new();
        for (k, v) in &table {
            match v.as_table() {
                Some(section) => keys.extend(section.keys().map(|sk| format!("{k}.{sk}"))),
                None => {
                    keys.insert(k.clone());
                }
            }
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            table,
            keys,
        })
    }
}
