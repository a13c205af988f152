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
    // The same rows but for what version 1 did not record: null there (not recorded), not a guess.
    same_rows_but(&new, &fresh, "events", IDENTITY_COLUMNS);
    same_rows_but(&new, &fresh, "flows", IDENTITY_COLUMNS);
    for ds in ["events", "flows"] {
        assert_eq!(
            duckdb_int(&format!(
                "SELECT count(*) FROM {} WHERE role IS NOT NULL OR cgroup_path IS NOT NULL",
                dataset(&new, ds)
            )),
            0,
            "{ds}"
        );
    }
    // The old event files' values, read as they are (unsigned types), are the same rows; `sock_id`, a
    // kernel address above 2^63, reads back as the signed 64-bit value of the same bits (compared
    // apart: DuckDB will not cast one to the other); `hour` is text in a glob, an integer in the table.
    let files = format!(
        "(SELECT * EXCLUDE (sock_id, date, hour) FROM read_parquet('{}/events/**/*.parquet'))",
        old.display()
    );
    let table = format!(
        "(SELECT * EXCLUDE (sock_id, date, hour, {}) FROM {})",
        IDENTITY_COLUMNS.join(", "),
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

/// An output a tcplake of schema version 2 wrote (`tests/fixtures/v2-output`, made by tcplake 42e5105
/// with `--source synthetic --seed 91 --node v2node --events 4000`) is appended to by this one: the tables gain the new columns in one
/// commit, the old rows read them as null (not recorded), the new rows carry them, and the output is
/// what a fresh run of this version makes but for those columns. `flows/` is still the projection of
/// `events/`: a replay rebuilds it row for row, the window that mixes both versions' events included.
#[test]
fn an_output_of_schema_2_gains_the_new_columns_and_still_replays_row_for_row() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2-output");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    copy_dir(&fixture, &out);
    synthetic_run(&out, "91", "v2node", 8_000, &[]);
    for ds in ["events", "flows"] {
        let log: Vec<String> = files_under(&out.join(ds).join("_delta_log"))
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        let adds = log.iter().filter(|c| c.contains("\"ADD COLUMN\"")).count();
        assert_eq!(adds, 1, "{ds}: one commit added the columns");
    }
    let events = dataset(&out, "events");
    let counts = duckdb(&format!(
        "SELECT role IS NULL, cgroup_path IS NULL, count(*), min(seq), max(seq) FROM {events} \
         GROUP BY ALL ORDER BY 4"
    ));
    assert_eq!(
        counts,
        duckdb("SELECT true, true, 4000, 0, 3999 UNION ALL SELECT false, false, 4000, 4000, 7999"),
        "old rows: not recorded; new rows: recorded"
    );
    let fresh = tmp.path().join("fresh");
    synthetic_run(&fresh, "91", "v2node", 8_000, &[]);
    same_rows_but(&out, &fresh, "events", IDENTITY_COLUMNS);
    // Per flow and window, the same sums (a window with events of both versions has a row for each:
    // the old events have no role or cgroup to be keyed by).
    let sums = |o: &Path| {
        duckdb(&format!(
            "SELECT window_start, pid, comm, local_addr, local_port, remote_addr, remote_port, \
             sum(bytes_sent), sum(bytes_received), sum(retransmits), sum(rtt_samples), \
             sum(connections_opened), sum(connections_closed), sum(resets), sum(events) \
             FROM {} GROUP BY ALL ORDER BY ALL",
            dataset(o, "flows")
        ))
    };
    assert_eq!(sums(&out), sums(&fresh));
    let replayed = tmp.path().join("replayed");
    let o = tcplake(
        &[
            "replay",
            "--from",
            out.to_str().unwrap(),
            "--to",
            replayed.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&out, &replayed, "events");
    same_rows(&out, &replayed, "flows");
}

fn copy_dir(from: &Path, to: &Path) {
    for f in files_under(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}
