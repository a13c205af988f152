//! What a command line asks to run, with the subcommand's own options checked: resolved here, with the
//! settings, so a bad `--target-size` or `--retention` fails before anything starts, like any setting.

use std::time::Duration;

use super::{duration_within, size_within, Cli, Command, ConfigError};
use crate::lake::compact::{validate_partition, CompactOptions};
use crate::lake::Dataset;

/// What runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// The pipeline in its mode (also `tcplake replay`, which is the pipeline with a replay source).
    Pipeline,
    /// `tcplake compact`: one merge plan per dataset.
    Compact(Vec<CompactOptions>),
    /// `tcplake vacuum`.
    Vacuum {
        datasets: Vec<Dataset>,
        retention: Duration,
    },
    /// `tcplake bench`: the harness resolves its own options (it lives in the binary).
    Bench,
}

/// Delta Lake's own default retention for vacuum.
const VACUUM_RETENTION: &str = "7d";

impl Task {
    pub(super) fn of(
        cli: &Cli,
        max_file_bytes: u64,
        row_group_rows: usize,
    ) -> Result<Self, ConfigError> {
        let datasets = |d: Option<super::DatasetArg>| match d {
            Some(d) => vec![d.into()],
            None => vec![Dataset::Events, Dataset::Flows],
        };
        Ok(match &cli.command {
            None | Some(Command::Replay(_)) => Task::Pipeline,
            Some(Command::Bench(_)) => Task::Bench,
            Some(Command::Compact(args)) => {
                let target_bytes = match &args.target_size {
                    Some(t) => size_within(t, 1 << 10, 64 << 30).map_err(|e| ConfigError::Arg {
                        what: "target size",
                        value: t.clone(),
                        reason: e.to_string(),
                    })?,
                    None => max_file_bytes,
                };
                if let Some(p) = &args.partition {
                    validate_partition(p)?;
                }
                Task::Compact(
                    datasets(args.dataset)
                        .into_iter()
                        .map(|dataset| CompactOptions {
                            dataset,
                            partition: args.partition.clone(),
                            target_bytes,
                            row_group_rows,
                        })
                        .collect(),
                )
            }
            Some(Command::Vacuum(args)) => {
                let text = args.retention.as_deref().unwrap_or(VACUUM_RETENTION);
                let retention =
                    duration_within(text, Duration::ZERO, Duration::from_secs(10 * 365 * 86_400))
                        .map_err(|e| ConfigError::Arg {
                        what: "retention",
                        value: text.to_string(),
                        reason: e.to_string(),
                    })?;
                Task::Vacuum {
                    datasets: datasets(args.dataset),
                    retention,
                }
            }
        })
    }
}
