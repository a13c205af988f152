//! Exactly-once across crashes on a local output directory: a run killed with SIGKILL (twice, at
//! arbitrary points) and restarted with the same command ends with exactly the rows of an undisturbed
//! run. The S3 variant (killed mid multipart upload) is in `s3.rs`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

const N: u64 = 1_000_000;

fn args(out: &Path) -> Vec<String> {
    [
        "--source",
        "synthetic",
        "--seed",
        "33",
        "--node",
        "kill",
        "--events",
        &N.to_string(),
        "--max-file-age",
        "1s",
        "--summary",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts a paced run and kills it with SIGKILL `after` its first new commit (so every kill lands
/// mid-run, after something was committed, however loaded the machine is).
fn run_and_kill(out: &Path, after: Duration) {
    let known = commits(out, "events");
    let mut child = tcplake_cmd()
        .args(args(out))
        .args(["--rate", "150000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_commit_beyond(out, "events", known, &mut child);
    std::thread::sleep(after);
    assert!(child.try_wait().unwrap().is_none(), "ended before the kill");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn killed_twice_and_restarted_writes_exactly_the_undisturbed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("crashed");
    run_and_kill(&out, Duration::from_millis(700));
    run_and_kill(&out, Duration::from_millis(300));
    let o = tcplake(
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let resumed = s["resumed_at_seq"].as_u64().unwrap();
    assert!(resumed > 0, "{s}");
    assert_eq!(s["events"].as_u64().unwrap(), N - resumed, "{s}");

    let clean = tmp.path().join("clean");
    let o = tcplake(
        &args(&clean).iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    for ds in ["events", "flows"] {
        let (a, b) = (dataset(&out, ds), dataset(&clean, ds));
        for (x, y) in [(&a, &b), (&b, &a)] {
            let diff = duckdb_int(&format!(
                "SELECT count(*) FROM (SELECT * FROM {x} EXCEPT ALL SELECT * FROM {y})"
            ));
            assert_eq!(diff, 0, "{ds}: rows in one run and not the other");
        }
    }
    assert_eq!(
        duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "events"))),
        N as i64
    );
    // Nothing half-written left, and every file the tables reference exists.
    assert!(files_under(&out.join(".staging")).is_empty());
    for ds in ["events", "flows"] {
        for path in table_files(&out, ds) {
            assert!(
                out.join(ds).join(&path).exists(),
                "{ds} references missing {path}"
            );
        }
    }
    report_fault(
        "monolith → local dir: kill -9 twice at arbitrary points, restart",
        "resumed after the last commit",
    );
}

/// A tmpfs mounted for one test (needs root, as the eBPF tests do), unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tcplake-test"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (the test must run as root)");
        SmallDisk(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The output's filesystem fills up mid-run: the run stops with one line naming the cause, every
/// committed file stays intact, and the same command rerun once there is room writes exactly the rows
/// of an undisturbed run.
#[test]
fn disk_full_stops_cleanly_and_the_rerun_completes_exactly() {
    if std::env::var_os("TCPLAKE_SKIP_EBPF_TESTS").is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("small"), "6m");
    let out = disk.0.join("out");
    // Files close at a size far below the disk's, so something is committed before the disk fills
    // whatever the machine's speed (closing on age alone raced the disk filling up).
    let small_files = |out: &Path| {
        let mut a = args(out);
        a.extend(["--max-file-size".to_string(), "512KiB".to_string()]);
        a
    };
    let argv = small_files(&out);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let o = tcplake(&argv, &[]);
    assert_one_error_line(&o, &["No space left on device"]);
    let committed = commits(&out, "events");
    assert!(
        committed > 0,
        "something was committed before the disk filled"
    );

    disk.resize("64m");
    let o = tcplake(&argv, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(s["resumed_at_seq"].as_u64().unwrap() > 0, "{s}");

    let clean = tmp.path().join("clean");
    let argv = small_files(&clean);
    let o = tcplake(&argv.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&out, &clean, "events");
    same_rows(&out, &clean, "flows");
    assert_eq!(leftovers(&out), Vec::<std::path::PathBuf>::new());
    report_fault(
        "monolith → local dir: filesystem full mid-run (6 MiB tmpfs), rerun after growing it",
        "stopped with one error line, committed files intact, rerun resumed",
    );
}

/// Sends SIGTERM (an orderly stop) and expects exit 0 within a minute.
fn terminate(mut child: std::process::Child) -> std::process::Output {
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within a minute of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_bounded().unwrap();
    assert!(
        o.status.success(),
        "SIGTERM must stop cleanly: {}",
        stderr(&o)
    );
    o
}

/// Starts `args` paced, waits for a new events commit, then stops it with SIGTERM.
fn run_and_terminate(out: &Path, args: &[String]) {
    let known = commits(out, "events");
    let mut child = tcplake_cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_commit_beyond(out, "events", known, &mut child);
    terminate(child);
}

/// `flows/` of `out` is exactly the projection of its `events/`: the same rows as a replay of the whole
/// log into a fresh output with the same settings.
fn assert_flows_are_the_projection(out: &Path, settings: &[&str]) {
    let fresh = out.with_extension("projection");
    let _ = std::fs::remove_dir_all(&fresh);
    let mut args = vec![
        "replay",
        "--from",
        out.to_str().unwrap(),
        "--to",
        fresh.to_str().unwrap(),
    ];
    args.extend_from_slice(settings);
    let o = tcplake(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(out, &fresh, "flows");
    same_rows(out, &fresh, "events");
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The case: graceful stops inside one long window, the same command rerun each time. Every
/// run's flows land in the window the next run continues, which replaces them: `flows/` stays the
/// projection of `events/`, and nothing is counted late.
#[test]
fn graceful_restarts_inside_a_window_keep_flows_the_projection_of_events() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let base = [
        "--source",
        "synthetic",
        "--seed",
        "44",
        "--node",
        "graceful",
        "--events",
        "900000",
        "--window",
        "120",
        "--max-file-age",
        "1s",
        "--summary",
        "json",
        "--out",
        o,
    ];
    let paced = [&base[..], &["--rate", "150000"]].concat();
    run_and_terminate(&out, &strings(&paced));
    run_and_terminate(&out, &strings(&paced));
    let last = tcplake(&base, &[]);
    assert!(last.status.success(), "{}", stderr(&last));
    let s: serde_json::Value = serde_json::from_str(stdout(&last).trim()).unwrap();
    assert!(s["resumed_at_seq"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["late_events"], 0, "{s}");
    assert_flows_are_the_projection(&out, &["--window", "120"]);
    // And the same as a run that was never stopped.
    let clean = tmp.path().join("clean");
    let mut args = base.to_vec();
    let at = args.iter().position(|a| *a == o).unwrap();
    let c = clean.to_str().unwrap().to_string();
    args[at] = &c;
    let o = tcplake(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&out, &clean, "flows");
    same_rows(&out, &clean, "events");
    report_fault(
        "monolith: SIGTERM twice inside one 120 s window, same command rerun",
        "flows == replay of the whole log == an unstopped run",
    );
}

/// A replay stopped with SIGTERM, and one that failed on a damaged input file (then fixed), rerun:
/// each rebuilds exactly the recorded flows.
#[test]
fn interrupted_and_failed_replays_rerun_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    synthetic_run(&live, "45", "rec", 800_000, &["--max-file-size", "256KiB"]);

    let stopped = tmp.path().join("stopped");
    // Flags of the run go before the subcommand (they are not `replay`'s own).
    let replay = |to: &Path, paced: bool| {
        let mut a = strings(&["--max-file-age", "1s"]);
        if paced {
            a.extend(strings(&["--rate", "150000"]));
        }
        a.extend(strings(&[
            "replay",
            "--from",
            live.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
        ]));
        a
    };
    run_and_terminate(&stopped, &replay(&stopped, true));
    let o = tcplake(
        &replay(&stopped, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&live, &stopped, "flows");
    same_rows(&live, &stopped, "events");

    // A damaged file in the middle of the log: the replay fails naming it, having committed what came
    // before; with the file repaired, the rerun completes the same flows.
    let victim = table_files(&live, "events")
        .into_iter()
        .map(|p| live.join("events").join(p))
        .nth(1)
        .unwrap();
    let good = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &good[..good.len() / 2]).unwrap();
    let failed = tmp.path().join("failed");
    let o = tcplake(
        &replay(&failed, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    std::fs::write(&victim, &good).unwrap();
    let o = tcplake(
        &replay(&failed, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    same_rows(&live, &failed, "flows");
    same_rows(&live, &failed, "events");
    report_fault(
        "replay: SIGTERM mid-replay, rerun; a damaged input file, repaired, rerun",
        "flows == the recorded flows",
    );
}

/// Stragglers: events later than the allowed lateness but within the late horizon are folded into
/// their windows (emitted again, rows replaced), later ones are counted and left out — the same way in
/// a run stopped and restarted as in a replay of its log.
#[test]
fn late_events_are_folded_up_to_the_horizon_and_dropped_beyond_it() {
    let tmp = tempfile::tempdir().unwrap();
    for (late_by, dropped) in [("30s", false), ("90s", true)] {
        let out = tmp.path().join(format!("late-{late_by}"));
        let cfg = tmp.path().join(format!("late-{late_by}.toml"));
        std::fs::write(
            &cfg,
            format!("[capture]\nlate_every = 997\nlate_by = \"{late_by}\"\n"),
        )
        .unwrap();
        let base = strings(&[
            "--source",
            "synthetic",
            "--seed",
            "46",
            "--node",
            "late",
            "--events",
            "900000",
            "--start",
            "2026-01-01T00:10:00Z",
            "--max-file-age",
            "1s",
            "--summary",
            "json",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let mut paced = base.clone();
        paced.extend(strings(&["--rate", "150000"]));
        run_and_terminate(&out, &paced);
        let o = tcplake(&base.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        if dropped {
            assert!(s["late_events"].as_u64().unwrap() > 0, "{s}");
        } else {
            assert_eq!(s["late_events"], 0, "{s}");
            assert!(s["windows_rewritten"].as_u64().unwrap() > 0, "{s}");
        }
        assert_flows_are_the_projection(&out, &[]);
        // Every event is in events/; flows count exactly those within the horizon.
        let in_flows = duckdb_int(&format!(
            "SELECT sum(events) FROM {}",
            dataset(&out, "flows")
        ));
        let logged = duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "events")));
        assert_eq!(logged, 900_000);
        if dropped {
            assert!(in_flows < logged, "{in_flows} of {logged}");
        } else {
            assert_eq!(in_flows, logged);
        }
    }
}

/// A resume into an output made with another projection, or another event stream, is refused with one
/// line that says which setting differs; the output is left as it was.
#[test]
fn a_resume_with_another_projection_or_stream_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    synthetic_run(&out, "47", "p", 50_000, &[]);
    let before = commits(&out, "events") + commits(&out, "flows");
    for (extra, needle) in [
        (vec!["--window", "60"], "tcplake.window_secs = 10"),
        (
            vec!["--allowed-lateness", "7"],
            "tcplake.allowed_lateness_secs = 5",
        ),
        (
            vec!["--late-horizon", "300"],
            "tcplake.late_horizon_secs = 60",
        ),
        (
            vec!["--seed", "48"],
            "events from another source than this run's (synthetic seed=48",
        ),
    ] {
        let mut args = vec![
            "--source",
            "synthetic",
            "--node",
            "p",
            "--events",
            "50000",
            "--out",
            out.to_str().unwrap(),
        ];
        if !extra.contains(&"--seed") {
            args.extend(["--seed", "47"]);
        }
        args.extend(extra.iter().copied());
        let o = tcplake(&args, &[]);
        assert_one_line_error(&o, 1, &[needle, "a new --out"]);
    }
    assert_eq!(commits(&out, "events") + commits(&out, "flows"), before);
}
