//! The object-store hand-off (`--handoff DIR`, the seed's split design kept for `tcplake bench`): a
//! sink killed with SIGKILL mid-run and restarted writes exactly the monolith's rows (the store keeps
//! every object: the new sink reads them again and skips what its output holds), a capture restarted
//! on a stream it wrote before stops with an error instead of its data being dropped, and a new
//! hand-off location is not sunk into the output of another (its rows would be skipped as held).

use std::path::Path;
use std::process::{Child, Stdio};

use crate::common::*;

const NODE: &str = "handoff-node";

/// A service of the test; killed if the test fails before it ends (its readers poll for ever).
struct Service(Option<Child>);

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Service {
    fn output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_bounded().unwrap()
    }

    fn kill(mut self) {
        let mut c = self.0.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

fn spawn(handoff: &Path, mode: &str, extra: &[&str]) -> Service {
    let child = tcplake_cmd()
        .args(["--mode", mode, "--node", NODE, "--summary", "json"])
        .args([
            "--metrics-addr",
            "off",
            "--handoff",
            handoff.to_str().unwrap(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Service(Some(child))
}

fn finish(service: Service, what: &str) -> serde_json::Value {
    let o = service.output();
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|_| panic!("{what}: {}", stdout(&o)))
}

#[test]
fn a_sink_killed_mid_run_resumes_exactly_and_a_restarted_producer_is_refused() {
    const N: u64 = 600_000;
    let tmp = tempfile::tempdir().unwrap();
    let (handoff, out) = (tmp.path().join("handoff"), tmp.path().join("out"));
    let n = N.to_string();
    // Paced capture (about 4 s) and files closing every second, so the kill lands mid-stream.
    let source = ["--source", "synthetic", "--seed", "29", "--events", &n];
    let capture = spawn(
        &handoff,
        "capture",
        &[&source[..], &["--rate", "150000"]].concat(),
    );
    let agg0 = spawn(&handoff, "aggregate", &["--shard", "0/2"]);
    let agg1 = spawn(&handoff, "aggregate", &["--shard", "1/2"]);
    let sink_args = ["--out", out.to_str().unwrap(), "--max-file-age", "1s"];
    let mut sink = spawn(&handoff, "sink", &sink_args);
    // Killed after it has committed something, so its successor must not write those rows again.
    wait_for_commit_beyond(&out, "events", 0, sink.0.as_mut().unwrap());
    sink.kill();
    let sink = spawn(&handoff, "sink", &sink_args);
    finish(capture, "capture");
    finish(agg0, "aggregator 0");
    finish(agg1, "aggregator 1");
    let s = finish(sink, "restarted sink");
    assert!(
        s["event_rows"].as_u64().unwrap() < N,
        "the restarted sink skipped what was committed: {s}"
    );
    let mono = tmp.path().join("mono");
    synthetic_run(&mono, "29", NODE, N, &[]);
    same_rows(&out, &mono, "events");
    same_rows(&out, &mono, "flows");
    assert_eq!(
        duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "events"))),
        N as i64
    );
    assert_eq!(leftovers(&out), Vec::<std::path::PathBuf>::new());

    // A sink started again after the end finds everything committed and writes nothing.
    let again = finish(spawn(&handoff, "sink", &sink_args), "sink after the end");
    assert_eq!(
        (again["event_rows"].as_u64(), again["flow_rows"].as_u64()),
        (Some(0), Some(0))
    );

    // A capture started again on the same stream would number its objects from the first again:
    // refused at once, naming the run it would have continued.
    let other = ["--source", "synthetic", "--seed", "30", "--events", "10000"];
    let o = spawn(&handoff, "capture", &other).output();
    assert_one_error_line(
        &o,
        &[
            "_handoff/handoff-node/run already exists",
            "empty hand-off location",
        ],
    );

    // A new hand-off location (a new run, numbered from the first object again) into this output:
    // its rows are not skipped as held, the sink refuses the output.
    let fresh = tmp.path().join("handoff-2");
    let capture = spawn(&fresh, "capture", &other);
    let aggregator = spawn(&fresh, "aggregate", &["--shard", "0/1"]);
    finish(capture, "second capture");
    finish(aggregator, "second aggregator");
    let o = spawn(&fresh, "sink", &sink_args).output();
    assert_one_error_line(&o, &["another source", "object-store hand-off run"]);
    report_fault(
        "split over the object store: sink killed -9 mid-run, restarted",
        "resumed after its last commit; a restarted producer is refused",
    );
}
