//! `tcplake vacuum`: deletes the data files no version younger than the retention still needs — files
//! compaction and window rewrites removed from the tables, and files interrupted runs wrote but never
//! committed. Until then every removed file stays, so readers of older versions (time travel, a query
//! running during a compaction) keep working.

use std::time::Duration;

use serde::Serialize;

use super::table::{Table, TableError};
use super::Dataset;
use crate::storage::Store;

/// What a vacuum did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VacuumReport {
    pub dataset: &'static str,
    pub files_deleted: u64,
    pub retention_secs: u64,
}

impl std::fmt::Display for VacuumReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vacuumed {}: {} files no version of the last {} s needs deleted",
            self.dataset, self.files_deleted, self.retention_secs
        )
    }
}

/// Deletes the files of `dataset` that only versions older than `retention` need, and unreferenced
/// files older than that.
pub async fn run(
    store: &Store,
    dataset: Dataset,
    retention: Duration,
) -> Result<VacuumReport, TableError> {
    let mut report = VacuumReport {
        dataset: dataset.name(),
        retention_secs: retention.as_secs(),
        ..VacuumReport::default()
    };
    let Some(table) = Table::open(store, dataset).await? else {
        return Ok(report);
    };
    report.files_deleted = table.vacuum(retention).await?;
    Ok(report)
}
