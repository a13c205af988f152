//! `tcplake compact` keeps every row and every query's answer — a reader running during it always sees
//! the same totals, and a compaction killed mid-way leaves the tables as they were or compacted; a
//! replay reads a compacted log; `tcplake vacuum` then removes the replaced files; `--since/--until`
//! replay one contiguous stretch of the log; files of a newer schema version are refused by name.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

const N: u64 = 600_000;
/// Synthetic time runs at 20 000 events/s: this run spans 30 s across the 01:00 boundary, so hour=00
/// is closed (its producer has moved on) and hour=01 stays open.
const START: &str = "2026-01-01T00:59:45Z";

/// A live run with small files (about one per batch); windows settle 5 s after the newest event, so
/// the flows of the closed hour may be compacted.
fn record(out: &Path) {
    synthetic_run(
        out,
        "7",
        "n1",
        N,
        &[
            "--start",
            START,
            "--max-file-size",
            "16KiB",
            "--late-horizon",
            "5",
        ],
    );
}

/// `tcplake replay --from FROM --to TO [extra]`.
fn replay(from: &Path, to: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "replay",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tcplake(&args, &[])
}

fn compact(out: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "compact",
        "--out",
        out.to_str().unwrap(),
        "--summary",
        "json",
    ];
    args.extend_from_slice(extra);
    let o = tcplake(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Parquet files on disk in one partition directory (`events/date=…/hour=…`).
fn parquet_files(out: &Path, partition: &str) -> usize {
    files_under(&out.join(partition))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .count()
}

/// Files of one partition (`events/date=…/hour=…`) the table's current version holds.
fn table_files_in(out: &Path, partition: &str) -> usize {
    let (ds, dir) = partition.split_once('/').unwrap();
    table_files(out, ds)
        .iter()
        .filter(|p| p.starts_with(&format!("{dir}/")))
        .count()
}

/// Rows and bytes of both tables, as a reader sees them now.
fn totals(out: &Path) -> Vec<Vec<serde_json::Value>> {
    duckdb(&format!(
        "SELECT (SELECT count(*) FROM {e}), (SELECT sum(bytes) FROM {e}), \
         (SELECT count(*) FROM {f}), (SELECT sum(events) FROM {f})",
        e = dataset(out, "events"),
        f = dataset(out, "flows")
    ))
}

fn vacuum(out: &Path) {
    let o = tcplake(
        &[
            "vacuum",
            "--out",
            out.to_str().unwrap(),
            "--retention",
            "0s",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A few of the cookbook's questions (docs/queries.md), answered in full.
fn answers(out: &Path) -> Vec<Vec<serde_json::Value>> {
    let flows = dataset(out, "flows");
    let events = dataset(out, "events");
    let mut all = Vec::new();
    for q in [
        format!(
            "SELECT remote_addr, remote_port, sum(bytes_sent + bytes_received) AS b FROM {flows} \
             GROUP BY ALL ORDER BY b DESC, remote_addr, remote_port LIMIT 10"
        ),
        format!(
            "SELECT comm, sum(connections_opened), sum(connections_closed), sum(retransmits) \
             FROM {flows} GROUP BY ALL ORDER BY ALL"
        ),
        format!(
            "SELECT window_start, count(*), sum(events) FROM {flows} GROUP BY ALL ORDER BY ALL"
        ),
        format!("SELECT hour, kind, count(*), max(seq) FROM {events} GROUP BY ALL ORDER BY ALL"),
    ] {
        all.extend(duckdb(&q));
    }
    all
}

fn copy_dir(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

#[test]
fn compaction_keeps_every_row_and_answer_even_when_killed_and_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, out) = (tmp.path().join("reference"), tmp.path().join("out"));
    record(&reference);
    copy_dir(&reference, &out);
    let before = answers(&out);
    let want = totals(&out);
    let closed = [
        "events/date=2026-01-01/hour=00",
        "flows/date=2026-01-01/hour=00",
    ];
    let open = "events/date=2026-01-01/hour=01";
    assert!(table_files_in(&out, closed[0]) > 20);
    let open_files = table_files_in(&out, open);

    // A reader running during the compaction always sees the same totals: every commit swaps the
    // merged file for its sources at once.
    let mut child = tcplake_cmd()
        .args([
            "compact",
            "--out",
            out.to_str().unwrap(),
            "--summary",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = 0;
    while child.try_wait().unwrap().is_none() {
        assert_eq!(
            totals(&out),
            want,
            "a reader saw other totals during compaction"
        );
        seen += 1;
    }
    let o = child.wait_bounded().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let reports: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    eprintln!("{seen} reads during the compaction");
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!(reports[0]["dataset"], "events");
    assert_eq!(reports[0]["merged_files"], 1, "{reports:?}");
    assert!(reports[0]["source_files"].as_u64().unwrap() > 20);
    for p in closed {
        assert_eq!(table_files_in(&out, p), 1, "{p}");
    }
    assert_eq!(
        table_files_in(&out, open),
        open_files,
        "the open hour is left alone"
    );
    same_rows(&reference, &out, "events");
    same_rows(&reference, &out, "flows");
    assert_eq!(answers(&out), before);
    assert_eq!(totals(&out), want);
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
    // The sources stay on disk (older versions need them) until a vacuum removes them.
    assert!(parquet_files(&out, closed[0]) > 20);
    vacuum(&out);
    for p in closed {
        assert_eq!(parquet_files(&out, p), 1, "{p}");
    }
    assert_eq!(totals(&out), want);
    // Idempotent: nothing left to merge.
    let again = compact(&out, &[]);
    assert!(again.iter().all(|r| r["merged_files"] == 0), "{again:?}");

    // The compacted log replays to the same flows.
    let replayed = tmp.path().join("replayed");
    let o = replay(&out, &replayed, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&reference, &replayed, "flows");
    same_rows(&reference, &replayed, "events");

    // Killed at any point, then rerun: the tables are as before or compacted, never half; the rerun
    // compacts the rest, and a vacuum removes what the killed run wrote and never committed.
    let killed = tmp.path().join("killed");
    for delay_ms in [0u64, 30, 120, 400] {
        let _ = std::fs::remove_dir_all(&killed);
        copy_dir(&reference, &killed);
        let mut child = tcplake_cmd()
            .args(["compact", "--out", killed.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        assert_eq!(totals(&killed), want, "killed after {delay_ms} ms");
        compact(&killed, &[]);
        vacuum(&killed);
        for p in closed {
            assert_eq!(table_files_in(&killed, p), 1, "{p}");
            assert_eq!(parquet_files(&killed, p), 1, "{p}");
        }
        same_rows(&reference, &killed, "events");
        same_rows(&reference, &killed, "flows");
        assert_eq!(answers(&killed), before);
        assert_eq!(leftovers(&killed), Vec::<PathBuf>::new());
    }
    report_fault(
        "tcplake compact: kill -9 at 0/30/120/400 ms, rerun, vacuum; readers during it",
        "tables as before or compacted, never half; readers saw constant totals",
    );
}

#[test]
fn replay_since_until_and_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    record(&live);
    let (since, until) = ("2026-01-01T00:59:50Z", "2026-01-01T01:00:05Z");
    let part = tmp.path().join("part");
    let o = replay(&live, &part, &["--since", since, "--until", until]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Exactly the contiguous run of seq from the first event at/after --since to before the first
    // event at/after --until.
    let events = dataset(&live, "events");
    let first = |t: &str| {
        duckdb_int(&format!(
            "SELECT min(seq) FROM {events} WHERE ts >= TIMESTAMPTZ '{t}'"
        ))
    };
    let (s0, s1) = (first(since), first(until));
    assert!(0 < s0 && s0 < s1 && (s1 as u64) < N);
    let stretch =
        format!("(SELECT * EXCLUDE (date, hour) FROM {events} WHERE seq >= {s0} AND seq < {s1})");
    let got = format!(
        "(SELECT * EXCLUDE (date, hour) FROM {})",
        dataset(&part, "events")
    );
    for (p, q) in [(&stretch, &got), (&got, &stretch)] {
        assert_eq!(
            duckdb_int(&format!("SELECT count(*) FROM ({p} EXCEPT ALL {q})")),
            0
        );
    }
    assert_eq!(
        duckdb_int(&format!(
            "SELECT sum(events) FROM {}",
            dataset(&part, "flows")
        )),
        s1 - s0
    );

    // Requests that cannot be right: one clear line, exit code, nothing created.
    let nowhere = tmp.path().join("nowhere");
    let cases: [(&[&str], i32, &str); 4] = [
        (
            &[
                "replay",
                "--from",
                live.to_str().unwrap(),
                "--to",
                nowhere.to_str().unwrap(),
                "--since",
                until,
                "--until",
                since,
            ],
            2,
            "must be later than --since",
        ),
        (
            &[
                "--source",
                "synthetic",
                "--since",
                since,
                "--out",
                nowhere.to_str().unwrap(),
            ],
            2,
            "only a replay reads a recorded stretch",
        ),
        (
            &[
                "compact",
                "--out",
                live.to_str().unwrap(),
                "--partition",
                "2026-01-01",
            ],
            2,
            "expected date=YYYY-MM-DD",
        ),
        (
            &["compact", "--out", nowhere.to_str().unwrap()],
            1,
            "does not exist",
        ),
    ];
    for (args, code, msg) in cases {
        let o = tcplake(args, &[]);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
        assert!(!nowhere.exists(), "{args:?} created its output");
    }

    // A committed file that is damaged (truncated: a bad disk, a partial copy) is refused by name.
    let damaged = tmp.path().join("damaged");
    copy_dir(&live, &damaged);
    let data_file = |p: &PathBuf| {
        p.extension().is_some_and(|e| e == "parquet") && !p.to_string_lossy().contains("_delta_log")
    };
    let victim = files_under(&damaged.join("events"))
        .into_iter()
        .find(data_file)
        .unwrap();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let o = replay(&damaged, &nowhere, &[]);
    assert_eq!(o.status.code(), Some(1));
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr(&o).contains("reading committed file") && stderr(&o).contains(name),
        "{}",
        stderr(&o)
    );

    // A file of a newer schema version (written by a future tcplake) is refused by name, not misread.
    let victim = files_under(&live.join("events"))
        .into_iter()
        .find(data_file)
        .unwrap();
    let rewritten = victim.with_extension("v2");
    duckdb(&format!(
        "COPY (SELECT * FROM read_parquet('{}')) TO '{}' (FORMAT parquet, \
         KV_METADATA {{'tcplake.schema_version': '4'}})",
        victim.display(),
        rewritten.display()
    ));
    std::fs::rename(&rewritten, &victim).unwrap();
    let o = replay(&live, &tmp.path().join("newer"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("has schema version 4; this tcplake reads versions up to 3"),
        "{}",
        stderr(&o)
    );
}
