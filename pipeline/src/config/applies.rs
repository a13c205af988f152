//! Every setting given must do something: a flag, environment variable or file key that this run would
//! ignore (`--port` with the synthetic source, `--broker` in the monolith, `--handoff` beside
//! `--broker`) is an error naming it and why, not a silently dropped wish.
//!
//! Flags and environment variables are checked always. The file is checked by section: one file may
//! configure every service of a split deployment, so a section of a stage this process does not run
//! (`[sink]` in a capture process) is fine, but within the sections of the stages it runs every key must
//! apply (`capture.port` with the synthetic source is an error).

use super::keys::{self, Key};
use super::layers::{Layers, Origin};
use super::{Cli, ConfigError, Mode, Output, Settings, SourceKind};

/// What the command line asks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// The pipeline (any mode), including `tcplake replay`.
    Pipeline,
    Compact,
    Vacuum,
    Bench,
}

impl Run {
    pub fn of(cli: &Cli) -> Self {
        match cli.command {
            Some(super::Command::Compact(_)) => Run::Compact,
            Some(super::Command::Vacuum(_)) => Run::Vacuum,
            Some(super::Command::Bench(_)) => Run::Bench,
            _ => Run::Pipeline,
        }
    }
}

/// What runs here, as far as applicability goes.
struct Ctx {
    run: Run,
    mode: Mode,
    source: SourceKind,
    s3_used: bool,
    broker: bool,
}

impl Ctx {
    fn stage(&self, modes: &[Mode]) -> bool {
        self.run == Run::Pipeline && modes.contains(&self.mode)
    }
    fn captures(&self) -> bool {
        self.stage(&[Mode::Monolith, Mode::Capture])
    }
    fn aggregates(&self) -> bool {
        self.stage(&[Mode::Monolith, Mode::Aggregate])
    }
    fn sinks(&self) -> bool {
        self.stage(&[Mode::Monolith, Mode::Sink])
    }
    fn what(&self) -> String {
        match self.run {
            Run::Compact => "`tcplake compact`".into(),
            Run::Vacuum => "`tcplake vacuum`".into(),
            Run::Bench => "`tcplake bench` (it starts its own processes)".into(),
            Run::Pipeline => format!("--mode {}", mode_name(self.mode)),
        }
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Monolith => "monolith",
        Mode::Capture => "capture",
        Mode::Aggregate => "aggregate",
        Mode::Sink => "sink",
    }
}

fn source_name(s: SourceKind) -> &'static str {
    match s {
        SourceKind::Ebpf => "ebpf",
        SourceKind::Synthetic => "synthetic",
        SourceKind::Replay => "replay",
    }
}

/// Why `key` does nothing in this run (`None`: it applies).
fn not_applicable(key: &Key, c: &Ctx) -> Option<String> {
    let k = |other: &Key| std::ptr::eq(key, other) || key == other;
    let needs_capture =
        |what: &str| (!c.captures()).then(|| format!("{what}; {} runs no capture", c.what()));
    let pipeline_only =
        || (c.run != Run::Pipeline).then(|| format!("it does nothing in {}", c.what()));
    // The S3 endpoint and region are the bench's too: they reach its `--handoff s3://...`.
    let bench_own = [
        &keys::LOG_JSON,
        &keys::CHECK_CONFIG,
        &keys::S3_ENDPOINT,
        &keys::S3_REGION,
    ];
    if c.run == Run::Bench && !bench_own.iter().any(|o| k(o)) {
        return Some(
            "`tcplake bench` starts its own processes with their own settings: use its flags \
             (tcplake bench --help)"
                .into(),
        );
    }
    if [
        &keys::SOURCE,
        &keys::DURATION,
        &keys::RATE,
        &keys::BATCH_SIZE,
    ]
    .iter()
    .any(|x| k(x))
    {
        return needs_capture("it drives capture");
    }
    if k(&keys::EVENTS) {
        return needs_capture("it sizes capture").or_else(|| {
            (c.source == SourceKind::Replay).then(|| {
                "a replay feeds its whole recorded stretch: bound it with --since/--until".into()
            })
        });
    }
    if [
        &keys::PORT,
        &keys::PID,
        &keys::CGROUP,
        &keys::INCLUDE_SELF,
        &keys::RING_BUFFER,
        &keys::RTT_INTERVAL,
        &keys::FLUSH_INTERVAL,
        &keys::STATE_CHANGES,
        &keys::KUBERNETES,
        &keys::KUBERNETES_API,
        &keys::KUBERNETES_NODE,
    ]
    .iter()
    .any(|x| k(x))
    {
        return needs_capture("it tunes live eBPF capture").or_else(|| {
            (c.source != SourceKind::Ebpf).then(|| {
                format!(
                    "it tunes live eBPF capture (--source ebpf), and this run's source is {}",
                    source_name(c.source)
                )
            })
        });
    }
    if k(&keys::SEED) || k(&keys::START) || k(&keys::LATE_EVERY) || k(&keys::LATE_BY) {
        return needs_capture("it shapes the synthetic workload").or_else(|| {
            (c.source != SourceKind::Synthetic).then(|| {
                format!(
                    "it shapes the synthetic workload (--source synthetic), and this run's source is {}",
                    source_name(c.source)
                )
            })
        });
    }
    if k(&keys::SINCE) || k(&keys::UNTIL) || k(&keys::REPLAY_FROM) {
        return needs_capture("it selects what a replay reads").or_else(|| {
            (c.source != SourceKind::Replay).then(|| {
                "only a replay reads a recorded stretch: use --source replay:DIR or `tcplake replay`"
                    .into()
            })
        });
    }
    if k(&keys::WINDOW) || k(&keys::LATENESS) || k(&keys::HORIZON) {
        return (!c.aggregates())
            .then(|| format!("it shapes aggregation; {} runs no aggregator", c.what()));
    }
    if k(&keys::SHARD) {
        return (!c.stage(&[Mode::Aggregate]))
            .then(|| format!("only --mode aggregate has a shard; this is {}", c.what()));
    }
    if k(&keys::SINK_PART) {
        return (!c.stage(&[Mode::Sink]) || !c.broker).then(|| {
            format!(
                "only --mode sink over the broker writes a part of the output; this is {}",
                c.what()
            )
        });
    }
    if k(&keys::OUT) {
        return (!(c.sinks() || matches!(c.run, Run::Compact | Run::Vacuum))).then(|| {
            format!(
                "it shapes the output; {} writes none (the sink does)",
                c.what()
            )
        });
    }
    if k(&keys::MAX_FILE_SIZE) || k(&keys::ROW_GROUP_ROWS) {
        return (!(c.sinks() || c.run == Run::Compact)).then(|| {
            format!(
                "it shapes the output; {} writes none (the sink does)",
                c.what()
            )
        });
    }
    if k(&keys::MAX_FILE_AGE) {
        return (!c.sinks()).then(|| format!("it rolls output files; {} writes none", c.what()));
    }
    if [
        &keys::S3_ENDPOINT,
        &keys::S3_REGION,
        &keys::S3_PATH_STYLE,
        &keys::S3_MAX_RETRY,
        &keys::S3_MULTIPART,
        &keys::S3_SINGLE_WRITER,
        &keys::SPOOL_DIR,
    ]
    .iter()
    .any(|x| k(x))
    {
        return (!c.s3_used)
            .then(|| "it applies to s3:// locations, and this run uses none".to_string());
    }
    if k(&keys::HANDOFF) {
        return pipeline_only()
            .or_else(|| {
                (c.mode == Mode::Monolith)
                    .then(|| "the monolith joins its stages in memory: there is no hand-off".into())
            })
            .or_else(|| {
                c.broker.then(|| {
                    "--broker joins the services already: choose the broker or the hand-off store"
                        .into()
                })
            });
    }
    if k(&keys::BROKER_ACK_WAIT) {
        return (!c.stage(&[Mode::Sink]))
            .then(|| format!("only the sink acknowledges messages; this is {}", c.what()));
    }
    if k(&keys::BROKER)
        || k(&keys::BROKER_CONNECT_TIMEOUT)
        || k(&keys::BROKER_MAX_AGE)
        || k(&keys::BROKER_MAX_BYTES)
        || k(&keys::BROKER_COMPRESS)
        || k(&keys::BROKER_PARTITIONS)
        || k(&keys::BROKER_USER)
        || k(&keys::BROKER_PASSWORD_FILE)
        || k(&keys::BROKER_TOKEN_FILE)
        || k(&keys::BROKER_CREDS)
        || k(&keys::BROKER_NKEY)
    {
        return pipeline_only().or_else(|| {
            (c.mode == Mode::Monolith)
                .then(|| "the monolith joins its stages in memory: there is no broker".into())
        });
    }
    if k(&keys::MODE) || k(&keys::CHANNEL_CAPACITY) || k(&keys::NODE) {
        return pipeline_only();
    }
    if k(&keys::CONFIG) || k(&keys::SUMMARY) {
        return (c.run == Run::Bench).then(|| format!("it does nothing in {}", c.what()));
    }
    None
}

/// `tcplake bench --handoff s3://...`: the S3 settings reach the bench's object-store hand-off.
fn bench_handoff_on_s3(cli: &Cli) -> bool {
    matches!(&cli.command, Some(super::Command::Bench(b))
        if matches!(b.handoff.as_deref().map(super::location), Some(Ok(super::Location::S3 { .. }))))
}

/// Checks every flag, environment variable and (relevant) file key given.
pub(super) fn check(cli: &Cli, layers: &Layers, s: &Settings) -> Result<(), ConfigError> {
    let run = Run::of(cli);
    let is_s3 = |o: &Output| matches!(o, Output::S3(_));
    let ctx = Ctx {
        run,
        mode: s.mode,
        source: s.source,
        s3_used: (ctx_writes(run, s.mode) && is_s3(&s.out))
            || s.handoff.as_ref().is_some_and(is_s3)
            || s.replay_from.as_ref().is_some_and(is_s3)
            || bench_handoff_on_s3(cli),
        broker: s.broker.is_some(),
    };
    for (id, origin) in cli.origins.iter() {
        if id == "shards" {
            tracing::warn!(
                "{origin} is no longer needed and is ignored: the sink learns how many aggregator \
                 shards there are from their batches"
            );
            continue;
        }
        if id == "metrics_addr"
            && run != Run::Pipeline
            && cli.metrics_addr.as_deref() == Some("off")
        {
            continue;
        }
        let key = keys::by_flag(id).or(match id {
            "metrics_addr" => Some(&keys::METRICS_ADDR),
            _ => None,
        });
        let reason = match key {
            Some(key) => not_applicable(key, &ctx),
            None => None,
        };
        let reason = reason.or_else(|| {
            (id == "metrics_addr" && run != Run::Pipeline)
                .then(|| format!("{} serves no metrics", ctx.what()))
        });
        if let Some(reason) = reason {
            return Err(ConfigError::NotApplicable {
                what: origin.to_string(),
                reason,
            });
        }
    }
    // `tcplake replay`'s own flags are settings under other names: layers of their own, checked like
    // any flag.
    for (key, origin) in layers.set_keys() {
        let Origin::Flag(flag) = &origin else {
            continue;
        };
        if !flag.starts_with("replay ") {
            continue;
        }
        if let Some(reason) = not_applicable(key, &ctx) {
            return Err(ConfigError::NotApplicable {
                what: flag.clone(),
                reason,
            });
        }
    }
    let path = layers.file().map_or("the config file".to_string(), |f| {
        format!("`{}`", f.path.display())
    });
    for key_name in layers.file_keys() {
        let section = key_name.split_once('.').map(|(s, _)| s);
        let checked = match section {
            Some("capture") => ctx.captures(),
            Some("aggregate") => ctx.aggregates(),
            Some("sink") => ctx.sinks() || run == Run::Compact,
            // Edges and top-level keys: shared by the services of a deployment.
            _ => false,
        };
        if key_name == "sink.shards" {
            tracing::warn!(
                "{path}: sink.shards is no longer needed and is ignored: the sink learns how many \
                 aggregator shards there are from their batches"
            );
            continue;
        }
        if !checked {
            continue;
        }
        let Some(key) = keys::by_file_key(key_name) else {
            continue;
        };
        if let Some(reason) = not_applicable(key, &ctx) {
            return Err(ConfigError::NotApplicable {
                what: format!("{path} key `{key_name}`"),
                reason,
            });
        }
    }
    Ok(())
}

/// Does a run of this kind write `--out`?
fn ctx_writes(run: Run, mode: Mode) -> bool {
    matches!(run, Run::Compact | Run::Vacuum)
        || (run == Run::Pipeline && matches!(mode, Mode::Monolith | Mode::Sink))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_rule_that_can_fire_or_applies_everywhere() {
        // A new key must be considered here: list the ones that apply to every run on purpose.
        let everywhere = ["log format", "check config", "metrics address"];
        let contexts: Vec<Ctx> = [Run::Pipeline, Run::Compact, Run::Vacuum, Run::Bench]
            .into_iter()
            .flat_map(|run| {
                [Mode::Monolith, Mode::Capture, Mode::Aggregate, Mode::Sink]
                    .into_iter()
                    .flat_map(move |mode| {
                        [SourceKind::Ebpf, SourceKind::Synthetic, SourceKind::Replay]
                            .into_iter()
                            .map(move |source| Ctx {
                                run,
                                mode,
                                source,
                                s3_used: false,
                                broker: true,
                            })
                    })
            })
            .collect();
        for key in keys::ALL {
            if everywhere.contains(&key.label) || key.label == "shards" {
                continue;
            }
            assert!(
                contexts.iter().any(|c| not_applicable(key, c).is_some()),
                "{} applies everywhere: add a rule or list it",
                key.label
            );
        }
    }
}
