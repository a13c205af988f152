//! SIGINT/SIGTERM mid-run: everything captured so far is flushed and committed, exit status 0.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn interrupt_mid_run(signal: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let child = tcplake_cmd()
        .args([
            "--source",
            "synthetic",
            "--events",
            "100000000",
            "--rate",
            "200000",
            "--summary",
            "json",
            "--node",
            "sig",
        ])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_bounded().unwrap();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("summary printed");
    let events = s["events"].as_i64().unwrap();
    assert!(
        events > 0 && events < 100_000_000,
        "stopped early: {events}: {}",
        stdout(&o)
    );
    // Everything captured before the signal is in committed files; nothing temporary remains.
    assert_eq!(
        duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "events"))),
        events
    );
    assert_eq!(
        duckdb_int(&format!(
            "SELECT sum(events) FROM {}",
            dataset(&out, "flows")
        )),
        events - s["late_events"].as_i64().unwrap()
    );
    assert_eq!(leftovers(&out), Vec::<std::path::PathBuf>::new());
}

#[test]
fn sigint_flushes_everything_and_exits_zero() {
    interrupt_mid_run("INT");
}

#[test]
fn sigterm_flushes_everything_and_exits_zero() {
    interrupt_mid_run("TERM");
}
