//! Exactly-once across crashes on a local output directory: a run killed with SIGKILL (twice, at
//! arbitrary points) and restarted with the same command ends with exactly the rows of an undisturbed
//! run. The S3 variant (killed mid multipart upload) is in `s3.rs`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

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
    wait_for_commit_beyond(out, "events", known);
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
    // Nothing half-written left, and every commit record names a file that exists.
    assert!(files_under(&out.join(".staging")).is_empty());
    for record in files_under(&out.join("_tcplake/commits")) {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        let key = r["key"].as_str().unwrap();
        assert!(
            out.join(key).exists(),
            "{} names missing {key}",
            record.display()
        );
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
