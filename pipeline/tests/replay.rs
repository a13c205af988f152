//! Event sourcing: the recorded `events/` log fed back through the pipeline (`--source replay:DIR`)
//! rebuilds the live `flows/` row for row, also when the replay is killed and rerun; with another
//! window it is a new projection of the same events.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;

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
    wait_for_commit_beyond(&replayed, "events", 0);
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
