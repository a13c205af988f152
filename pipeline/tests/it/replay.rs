//! Event sourcing: the recorded `events/` log fed back through the pipeline (`--source replay:DIR`)
//! rebuilds the live `flows/` row for row, also when the replay is killed and rerun; with another
//! window it is a new projection of the same events.

use std::path::Path;
use std::process::Stdio;

use crate::common::*;

const N: u64 = 600_000;

#[test]
fn replaying_the_log_rebuilds_the_flows_even_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    synthetic_run(&live, "41", "rec", N, &["--max-file-size", "2MiB"]);
    let source = format!("replay:{}", live.display());

    // A replay killed mid-run, then run again with the same command.
    let replayed = tmp.path().join("replayed");
    let args = |paced: bool| {
        let mut a = vec![
            "--source".to_string(),
            source.clone(),
            "--out".into(),
            replayed.display().to_string(),
            "--max-file-age".into(),
            "1s".into(),
            "--summary".into(),
            "json".into(),
        ];
        if paced {
            a.extend(["--rate".into(), "150000".into()]);
        }
        a
    };
    let mut child = tcplake_cmd()
        .args(args(true))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_commit_beyond(&replayed, "events", 0, &mut child);
    assert!(child.try_wait().unwrap().is_none(), "ended before the kill");
    child.kill().unwrap();
    child.wait().unwrap();
    let o = tcplake(
        &args(false).iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(s["resumed_at_seq"].as_u64().unwrap() > 0, "{s}");
    same_rows(&live, &replayed, "flows");
    same_rows(&live, &replayed, "events");
    assert_eq!(leftovers(&replayed), Vec::<std::path::PathBuf>::new());

    // Another window size: a new projection of the same events, with the same totals (through the
    // `replay` subcommand, the shorthand for --source replay:FROM --out TO).
    let coarse = tmp.path().join("coarse");
    let o = tcplake(
        &[
            "--window",
            "30",
            "replay",
            "--from",
            live.to_str().unwrap(),
            "--to",
            coarse.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let total = |dir: &Path, col: &str| {
        duckdb_int(&format!("SELECT sum({col}) FROM {}", dataset(dir, "flows")))
    };
    for col in [
        "bytes_sent",
        "bytes_received",
        "events",
        "connections_opened",
    ] {
        assert_eq!(total(&coarse, col), total(&live, col), "{col}");
    }
    let windows = |dir: &Path| {
        duckdb_int(&format!(
            "SELECT count(DISTINCT window_start) FROM {}",
            dataset(dir, "flows")
        ))
    };
    assert!(windows(&coarse) < windows(&live));

    // A replay of something that is not a tcplake output says so, and creates nothing.
    let missing = tmp.path().join("no-such-dir");
    let o = tcplake(
        &[
            "--source",
            &format!("replay:{}", missing.display()),
            "--out",
            coarse.to_str().unwrap(),
        ],
        &[],
    );
    // A missing directory is a configuration error (--check-config finds it too).
    assert_one_line_error(&o, 2, &["no such directory"]);
    assert!(!missing.exists());
    // A directory that holds no tcplake output.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = tcplake(
        &[
            "--source",
            &format!("replay:{}", empty.display()),
            "--out",
            coarse.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no committed event log"),
        "{}",
        stderr(&o)
    );
    assert_eq!(files_under(&empty), Vec::<std::path::PathBuf>::new());
}

/// A read-only bind mount of a directory, undone when dropped (mounting needs root, as the eBPF
/// tests do).
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn of(src: &Path, at: &Path) -> ReadOnlyMount {
        std::fs::create_dir_all(at).unwrap();
        let mount = |args: &[&str]| {
            let ok = std::process::Command::new("mount")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount {args:?} (the test must run as root)");
        };
        mount(&["--bind", src.to_str().unwrap(), at.to_str().unwrap()]);
        let m = ReadOnlyMount(at.to_path_buf());
        mount(&["-o", "remount,bind,ro", at.to_str().unwrap()]);
        m
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A replay only reads its source: an archive on a read-only mount replays like any other.
#[test]
fn a_read_only_archive_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    synthetic_run(&live, "12", "ro", 50_000, &[]);
    let archive = tmp.path().join("archive");
    let _ro = ReadOnlyMount::of(&live, &archive);
    assert!(
        std::fs::write(archive.join("probe"), b"x").is_err(),
        "the mount is read-only"
    );
    let rebuilt = tmp.path().join("rebuilt");
    let o = tcplake(
        &[
            "replay",
            "--from",
            archive.to_str().unwrap(),
            "--to",
            rebuilt.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&live, &rebuilt, "flows");
    same_rows(&live, &rebuilt, "events");
}

/// An output written before the Delta tables (schema version 1: Parquet files with unsigned columns and
/// `_tcplake/commits` records) is not appended to — one line says to replay it — and replays into
/// tables that hold the same rows as a fresh run of the same workload. The fixture
/// (`tests/fixtures/v1-output`) was made by tcplake 076568a with `--source synthetic --seed 90 --node
/// legacy` and `--events 3000`, then the same with `--events 6000`: the second run resumed inside the
/// first run's window and, as that version did, counted its 3000 events late, so the old `flows/`
/// lacks them. The replay folds them in.
#[test]
fn an_output_of_schema_1_is_refused_for_appending_and_replays_into_tables() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-output");
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    copy_dir(&fixture, &old);
    let o = tcplake(
        &[
            "--source",
            "synthetic",
            "--seed",
            "90",
            "--node",
            "legacy",
            "--events",
            "6000",
            "--out",
            old.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(&o, 1, &["before the Delta tables", "tcplake replay --from"]);
    assert!(
        !old.join("events/_delta_log").exists(),
        "nothing written into the old output"
    );

    let new = tmp.path().join("new");
    let o = tcplake(
        &[
            "replay",
            "--from",
            old.to_str().unwrap(),
            "--to",
            new.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fresh = tmp.path().join("fresh");
    synthetic_run(&fresh, "90", "legacy", 6_000, &[]);
    same_rows(&new, &fresh, "events");
    same_rows(&new, &fresh, "flows");
    // The old event files' values, read as they are (unsigned types), are the same rows; `sock_id`, a
    // kernel address above 2^63, reads back as the signed 64-bit value of the same bits (compared
    // apart: DuckDB will not cast one to the other); `hour` is text in a glob, an integer in the table.
    let files = format!(
        "(SELECT * EXCLUDE (sock_id, date, hour) FROM read_parquet('{}/events/**/*.parquet'))",
        old.display()
    );
    let table = format!(
        "(SELECT * EXCLUDE (sock_id, date, hour) FROM {})",
        dataset(&new, "events")
    );
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(DISTINCT sock_id) FROM read_parquet('{}/events/**/*.parquet')",
            old.display()
        )),
        duckdb_int(&format!(
            "SELECT count(DISTINCT sock_id) FROM {}",
            dataset(&new, "events")
        ))
    );
    for (p, q) in [(&files, &table), (&table, &files)] {
        let diff = duckdb_int(&format!(
            "SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})"
        ));
        assert_eq!(
            diff, 0,
            "the version 1 events differ from the replayed ones"
        );
    }
    let counted = |from: String| duckdb_int(&format!("SELECT sum(events) FROM {from}"));
    assert_eq!(
        counted(format!(
            "read_parquet('{}/flows/**/*.parquet')",
            old.display()
        )),
        3000
    );
    assert_eq!(counted(dataset(&new, "flows")), 6000);
}

fn copy_dir(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}
