//! The TOML configuration file: the same settings as the flags, grouped by stage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Mode, SourceKind};

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
    /// The file it was read from.
    #[serde(skip)]
    pub path: Option<PathBuf>,
    /// Every key the file sets, dotted (`aggregate.window_secs`): to name where a bad value came from
    /// and to check that what the file sets applies to what runs.
    #[serde(skip)]
    pub keys: BTreeSet<String>,
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
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
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
    /// Synthetic: every `late_every`-th event arrives `late_by` late (stragglers, to exercise lateness).
    pub late_every: Option<u64>,
    pub late_by: Option<String>,
    pub rate: Option<u64>,
    pub batch_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAggregate {
    pub window_secs: Option<u64>,
    pub allowed_lateness_secs: Option<u64>,
    pub late_horizon_secs: Option<u64>,
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
    pub s3_single_writer: Option<bool>,
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
        let mut file: FileConfig = toml::from_str(text).map_err(|e| {
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
        })?;
        // It parsed into the typed form above, so it is a table of tables and values.
        if let Ok(table) = text.parse::<toml::Table>() {
            for (k, v) in &table {
                match v.as_table() {
                    Some(section) => file
                        .keys
                        .extend(section.keys().map(|sk| format!("{k}.{sk}"))),
                    None => {
                        file.keys.insert(k.clone());
                    }
                }
            }
        }
        file.path = Some(path.to_path_buf());
        Ok(file)
    }

    /// Sets `key` (dotted)?
    pub fn has(&self, key: &str) -> bool {
        self.keys.contains(key)
    }
}
