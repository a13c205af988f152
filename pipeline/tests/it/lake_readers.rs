//! What tcplake commits is what every lake engine reads. One output holding all that a table can hold
//! beside its current rows — files of windows rewritten when stragglers were folded in (removed from
//! the table, still on disk until a vacuum) and a file a crashed run left behind — read by
//! DuckDB (`delta_scan`), delta-rs (the `deltalake` Python package), Polars (`read_delta`) and Spark:
//! each must give exactly the totals of the events tcplake reported, while a glob over the Parquet
//! files, which ignores the Delta log, must not. (Compaction's removed files: tests/it/compact.rs.)

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// [event rows, sum(bytes) of events, flow rows, sum(events) of flows, bytes of flows] per engine.
fn other_engines(out: &Path) -> serde_json::Map<String, serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/readers.py");
    let python = std::env::var("TCPLAKE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(python)
        .args([script, out.to_str().unwrap(), "deltalake,polars,spark"])
        .output_bounded()
        .expect("python3 with deltalake, polars and pyspark (scripts/setup.sh)");
    assert!(o.status.success(), "{}", stderr(&o));
    let last = stdout(&o).lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

fn totals_in_duckdb(from: impl Fn(&str) -> String) -> Vec<i64> {
    let row = duckdb(&format!(
        "SELECT (SELECT count(*) FROM {e}), (SELECT coalesce(sum(bytes), 0) FROM {e}),
                (SELECT count(*) FROM {f}), (SELECT sum(events) FROM {f}),
                (SELECT sum(bytes_sent + bytes_received) FROM {f})",
        e = from("events"),
        f = from("flows"),
    ));
    row[0]
        .iter()
        .map(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .unwrap()
        })
        .collect()
}

/// The Delta log of `dataset` removed files (they stay on disk until a vacuum).
fn removes(out: &Path, dataset: &str) -> usize {
    files_under(&out.join(dataset).join("_delta_log"))
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .matches("\"remove\"")
                .count()
        })
        .sum()
}

#[test]
fn every_lake_engine_reads_exactly_the_committed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Stragglers 30 s late (within the late horizon), paced so that the windows they belong to were
    // committed a few seconds before (a file a second): the table rewrites those windows.
    let cfg = tmp.path().join("late.toml");
    std::fs::write(&cfg, "[capture]\nlate_every = 499\nlate_by = \"30s\"\n").unwrap();
    let o = synthetic_run(
        &out,
        "61",
        "readers",
        600_000,
        &[
            "--start",
            "2026-01-01T00:10:00Z",
            "--rate",
            "100000",
            "--max-file-age",
            "1s",
            "--summary",
            "json",
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(s["windows_rewritten"].as_u64().unwrap() > 0, "{s}");
    assert!(
        removes(&out, "flows") > 0,
        "the output must hold removed files for this test to mean anything"
    );
    // A crashed run's leftover: a data file no commit references.
    let committed = table_files(&out, "flows");
    let first = out.join("flows").join(&committed[0]);
    std::fs::copy(&first, first.with_file_name("crashed-run-leftover.parquet")).unwrap();

    let events = s["events"].as_i64().unwrap();
    let late = s["late_events"].as_i64().unwrap();
    let duck = totals_in_duckdb(|ds| dataset(&out, ds));
    assert_eq!(duck[0], events, "event rows");
    assert_eq!(duck[3], events - late, "events counted in flows");
    assert_eq!(duck[1], duck[4], "bytes in events and flows");
    let engines = other_engines(&out);
    assert_eq!(engines.len(), 3, "{engines:?}");
    for (engine, got) in &engines {
        let got: Vec<i64> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(got, duck, "{engine} disagrees with DuckDB's delta_scan");
    }
    // Globbing the files sees what the table does not hold.
    let glob = totals_in_duckdb(|ds| {
        format!(
            "read_parquet('{}/{ds}/**/*.parquet', hive_partitioning = true)",
            out.display()
        )
    });
    assert!(
        glob[2] > duck[2] && glob[4] > duck[4],
        "a glob must see the removed files and the leftover: {glob:?} vs {duck:?}"
    );
}
