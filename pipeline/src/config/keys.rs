//! Every setting by name: its flag (clap id), its key in the TOML file, and the label errors use. One
//! table, so an error can say where a bad value came from (`TCPLAKE_WINDOW`, `--window`, or the file's
//! `aggregate.window_secs`), and the applicability check knows what each flag and key is called.

/// One setting.
#[derive(Debug, PartialEq, Eq)]
pub struct Key {
    /// How errors name it: "invalid {label} `{value}`".
    pub label: &'static str,
    /// The clap id of its flag (the `Cli` field name), if it has one.
    pub flag: Option<&'static str>,
    /// Its dotted key in the config file, if it has one.
    pub file: Option<&'static str>,
}

macro_rules! keys {
    ($($name:ident: $label:literal, $flag:expr, $file:expr;)*) => {
        $(pub const $name: Key = Key { label: $label, flag: $flag, file: $file };)*
        /// Every setting (for the applicability check and its tests).
        pub const ALL: &[&Key] = &[$(&$name),*];
    };
}

keys! {
    MODE: "mode", Some("mode"), Some("mode");
    NODE: "node name", Some("node"), Some("node");
    METRICS_ADDR: "metrics address", Some("metrics_addr"), Some("metrics_addr");
    SOURCE: "source", Some("source"), Some("capture.source");
    REPLAY_FROM: "replay source", None, Some("capture.replay_from");
    SINCE: "since", Some("since"), Some("capture.replay_since");
    UNTIL: "until", Some("until"), Some("capture.replay_until");
    EVENTS: "events", Some("events"), Some("capture.events");
    DURATION: "duration", Some("duration"), Some("capture.duration");
    PORT: "port", Some("port"), Some("capture.port");
    PID: "pid", Some("pid"), Some("capture.pid");
    CGROUP: "cgroup", Some("cgroup"), Some("capture.cgroup");
    INCLUDE_SELF: "include self", Some("include_self"), Some("capture.exclude_self");
    RING_BUFFER: "ring buffer size", None, Some("capture.ring_buffer_size");
    RTT_INTERVAL: "rtt sample interval", None, Some("capture.rtt_sample_interval");
    FLUSH_INTERVAL: "bytes flush interval", None, Some("capture.bytes_flush_interval");
    STATE_CHANGES: "state changes", None, Some("capture.state_changes");
    KUBERNETES: "kubernetes", Some("kubernetes"), Some("capture.kubernetes");
    KUBERNETES_API: "Kubernetes API", Some("kubernetes_api"), Some("capture.kubernetes_api");
    KUBERNETES_NODE: "Kubernetes node", Some("kubernetes_node"), Some("capture.kubernetes_node");
    SEED: "seed", Some("seed"), Some("capture.seed");
    START: "start time", Some("start"), Some("capture.start");
    LATE_EVERY: "late every", None, Some("capture.late_every");
    LATE_BY: "late by", None, Some("capture.late_by");
    RATE: "rate", Some("rate"), Some("capture.rate");
    BATCH_SIZE: "batch size", Some("batch_size"), Some("capture.batch_size");
    WINDOW: "window", Some("window"), Some("aggregate.window_secs");
    LATENESS: "allowed lateness", Some("allowed_lateness"), Some("aggregate.allowed_lateness_secs");
    HORIZON: "late horizon", Some("late_horizon"), Some("aggregate.late_horizon_secs");
    SHARD: "shard", Some("shard"), Some("aggregate.shard");
    OUT: "output", Some("out"), Some("sink.out");
    S3_ENDPOINT: "S3 endpoint", Some("s3_endpoint"), Some("sink.s3_endpoint");
    S3_REGION: "S3 region", Some("s3_region"), Some("sink.s3_region");
    S3_PATH_STYLE: "S3 path style", None, Some("sink.s3_path_style");
    S3_MAX_RETRY: "S3 max retry", None, Some("sink.s3_max_retry");
    S3_MULTIPART: "S3 multipart threshold", None, Some("sink.s3_multipart_threshold");
    S3_SINGLE_WRITER: "S3 single writer", None, Some("sink.s3_single_writer");
    SPOOL_DIR: "spool directory", Some("spool_dir"), Some("sink.spool_dir");
    MAX_FILE_SIZE: "max file size", Some("max_file_size"), Some("sink.max_file_size");
    MAX_FILE_AGE: "max file age", Some("max_file_age"), Some("sink.max_file_age");
    ROW_GROUP_ROWS: "row group rows", None, Some("sink.row_group_rows");
    SHARDS: "shards", Some("shards"), Some("sink.shards");
    SINK_PART: "sink part", Some("sink_part"), Some("sink.part");
    CHANNEL_CAPACITY: "channel capacity", Some("channel_capacity"), Some("edge.channel_capacity");
    HANDOFF: "hand-off store", Some("handoff"), Some("edge.handoff");
    BROKER: "broker", Some("broker"), Some("broker.url");
    BROKER_CONNECT_TIMEOUT: "broker connect timeout", None, Some("broker.connect_timeout");
    BROKER_MAX_AGE: "broker max age", None, Some("broker.max_age");
    BROKER_MAX_BYTES: "broker max bytes", None, Some("broker.max_bytes");
    BROKER_COMPRESS: "broker compress", None, Some("broker.compress");
    BROKER_ACK_WAIT: "broker ack wait", None, Some("broker.ack_wait");
    BROKER_PARTITIONS: "broker partitions", Some("broker_partitions"), Some("broker.partitions");
    BROKER_USER: "broker user", Some("broker_user"), Some("broker.user");
    BROKER_PASSWORD_FILE: "broker password file", Some("broker_password_file"), Some("broker.password_file");
    BROKER_TOKEN_FILE: "broker token file", Some("broker_token_file"), Some("broker.token_file");
    BROKER_CREDS: "broker credentials file", Some("broker_creds"), Some("broker.creds_file");
    BROKER_NKEY: "broker NKey seed file", Some("broker_nkey"), Some("broker.nkey_file");
    LOG_JSON: "log format", Some("log_json"), None;
    SUMMARY: "summary format", Some("summary"), None;
    CONFIG: "config file", Some("config"), None;
    CHECK_CONFIG: "check config", Some("check_config"), None;
}

/// The setting whose flag has clap id `id`.
pub fn by_flag(id: &str) -> Option<&'static Key> {
    ALL.iter().copied().find(|k| k.flag == Some(id))
}

/// The setting whose file key is `key`.
pub fn by_file_key(key: &str) -> Option<&'static Key> {
    ALL.iter().copied().find(|k| k.file == Some(key))
}
