//! Split deployment against a real NATS JetStream server (Debian's nats-server, installed by
//! scripts/setup.sh, started here on a free loopback port): capture, two aggregators and a sink as
//! separate processes write exactly the rows a monolith writes from the same seed, also when each
//! service is killed with SIGKILL mid-run and restarted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A JetStream server on a free loopback port, stopped when dropped.
struct Nats {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, store.path());
        Nats { child, port, store }
    }

    fn spawn(port: u16, store: &Path) -> Child {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (install it with scripts/setup.sh)");
        wait_for_port(port, "nats-server");
        child
    }

    /// SIGKILL (a crash, not a clean stop), down for `down_for`, then the same port and storage.
    fn crash_and_restart(&mut self, down_for: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.port, self.store.path());
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same workload for every process of a run.
struct Run {
    seed: &'static str,
    events: u64,
    broker: String,
    out: PathBuf,
    config: PathBuf,
}

impl Run {
    fn new(nats: &Nats, tmp: &Path, seed: &'static str, events: u64) -> Run {
        // Short ack wait: a restarted sink gets the messages its killed predecessor held sooner.
        let config = tmp.join("split.toml");
        // Small streams: JetStream reserves their size on disk up front.
        std::fs::write(
            &config,
            "[broker]\nack_wait = \"3s\"\nmax_bytes = \"256MiB\"\n",
        )
        .unwrap();
        Run {
            seed,
            events,
            broker: nats.url(),
            out: tmp.join("split-out"),
            config,
        }
    }

    fn args(&self, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--mode",
            mode,
            "--source",
            "synthetic",
            "--seed",
            self.seed,
            "--node",
            "split-node",
            "--summary",
            "json",
            "--broker",
            &self.broker,
            "--config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.config.to_str().unwrap().into());
        a.extend(["--events".into(), self.events.to_string()]);
        a.extend(["--out".into(), self.out.to_str().unwrap().into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn spawn(&self, mode: &str, extra: &[&str]) -> Child {
        tcplake_cmd()
            .args(self.args(mode, extra))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn finish(child: Child, what: &str) -> serde_json::Value {
    let o: Output = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|_| panic!("{what}: {}", stdout(&o)))
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The split output holds exactly the monolith's rows, both datasets, both ways.
fn assert_same_rows_as_monolith(split: &Path, tmp: &Path, seed: &str, events: u64) {
    let mono = tmp.join("mono");
    synthetic_run(&mono, seed, "split-node", events, &[]);
    same_rows(split, &mono, "events");
    same_rows(split, &mono, "flows");
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM {}",
            dataset(split, "events")
        )),
        events as i64
    );
    assert_eq!(leftovers(split), Vec::<PathBuf>::new());
}

#[test]
fn one_capture_two_aggregators_one_sink_write_exactly_the_monolith_rows() {
    const N: u64 = 400_000;
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "17", N);
    let capture = run.spawn("capture", &[]);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let sink = run.spawn("sink", &["--shards", "2"]);
    let c = finish(capture, "capture");
    let a0 = finish(agg0, "aggregator 0");
    let a1 = finish(agg1, "aggregator 1");
    let s = finish(sink, "sink");
    assert_eq!(c["events"], N);
    // The shards split the flows between them, and together account for every one.
    let (f0, f1) = (a0["flows"].as_u64().unwrap(), a1["flows"].as_u64().unwrap());
    assert!(f0 > 0 && f1 > 0, "{a0} {a1}");
    assert_eq!(s["flow_rows"].as_u64().unwrap(), f0 + f1);
    assert_eq!(s["event_rows"], N);
    assert_same_rows_as_monolith(&run.out, tmp.path(), "17", N);
}

#[test]
fn each_service_killed_mid_run_and_restarted_still_writes_the_monolith_rows() {
    const N: u64 = 1_200_000;
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "23", N);
    // Paced capture (about 8 s) and files closing every second, so every kill lands mid-stream.
    let paced = ["--rate", "150000"];
    let sink_args = ["--shards", "2", "--max-file-age", "1s"];
    let pause = || std::thread::sleep(Duration::from_millis(1_500));

    let capture = run.spawn("capture", &paced);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let sink = run.spawn("sink", &sink_args);
    pause();
    kill(capture);
    let capture = run.spawn("capture", &paced);
    pause();
    kill(agg0);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    // The sink is killed after it has committed something, so its successor must resume.
    wait_for_commit_beyond(&run.out, "events", 0);
    kill(sink);
    let sink = run.spawn("sink", &sink_args);
    pause();
    kill(agg1);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);

    let c = finish(capture, "capture");
    assert!(
        c["resumed_at_seq"].as_u64().unwrap() > 0,
        "capture resumed: {c}"
    );
    finish(agg0, "aggregator 0");
    finish(agg1, "aggregator 1");
    let s = finish(sink, "sink");
    assert!(
        s["event_rows"].as_u64().unwrap() < N,
        "the restarted sink resumed: {s}"
    );
    assert_same_rows_as_monolith(&run.out, tmp.path(), "23", N);
    report_fault(
        "split: capture, aggregator 0, sink, aggregator 1 each killed -9 mid-run and restarted",
        "each resumed from its checkpoint",
    );
}

#[test]
fn broker_crashed_and_restarted_mid_run_loses_and_duplicates_nothing() {
    const N: u64 = 1_200_000;
    let mut nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "29", N);
    let paced = ["--rate", "150000"];
    let capture = run.spawn("capture", &paced);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let sink = run.spawn("sink", &["--shards", "2", "--max-file-age", "1s"]);
    wait_for_commit_beyond(&run.out, "events", 0);
    nats.crash_and_restart(Duration::from_secs(3));
    let c = finish(capture, "capture");
    let a0 = finish(agg0, "aggregator 0");
    let a1 = finish(agg1, "aggregator 1");
    finish(sink, "sink");
    assert_eq!(c["events"], N);
    // The aggregators' ordered consumers died with the server and were reopened where they stopped
    // (the capture's publishes and the sink's durable consumer may simply have waited for it).
    for (what, v) in [("aggregator 0", &a0), ("aggregator 1", &a1)] {
        assert!(
            v["broker"]["consumer_reconnects"].as_u64().unwrap() > 0,
            "{what}: {v}"
        );
    }
    assert_same_rows_as_monolith(&run.out, tmp.path(), "29", N);
    report_fault(
        "split: nats-server killed -9 mid-run, restarted after 3 s",
        "every service rode it out",
    );
}

#[test]
fn broker_unreachable_and_bad_messages_are_reported_clearly() {
    // Nothing listens on this port: after retrying briefly, one line naming the broker and the fix.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(&config, "[broker]\nconnect_timeout = \"1s\"\n").unwrap();
    let o = tcplake(
        &[
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--broker",
            &format!("nats://127.0.0.1:{port}"),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    // Retries are logged as warnings; the failure itself is one line.
    assert_one_error_line(&o, &["cannot reach the broker", "nats-server"]);

    // A split mode without a broker is a configuration error.
    let o = tcplake(&["--mode", "sink"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--broker"), "{}", stderr(&o));

    // Garbage on the events subject: counted, dead-lettered, and the good messages still arrive.
    let nats = Nats::start();
    let run = Run::new(&nats, tmp.path(), "5", 50_000);
    let garbage = Command::new("python3")
        .args(["-c", PUBLISH_GARBAGE, &nats.port.to_string()])
        .output()
        .unwrap();
    assert!(
        garbage.status.success(),
        "{}",
        String::from_utf8_lossy(&garbage.stderr)
    );
    let capture = run.spawn("capture", &[]);
    let agg = run.spawn("aggregate", &[]);
    let sink = run.spawn("sink", &[]);
    finish(capture, "capture");
    let a = finish(agg, "aggregator");
    let s = finish(sink, "sink");
    assert_eq!(s["event_rows"], 50_000, "{s}");
    assert_eq!(a["dead_letters"], 1, "{a}");
    assert_eq!(s["dead_letters"], 1, "{s}");
    assert_same_rows_as_monolith(&run.out, tmp.path(), "5", 50_000);
}

/// Publishes one undecodable message on the events subject (raw NATS protocol, so the test needs no
/// client library); the streams are created by tcplake, so first make the stream exist the same way.
const PUBLISH_GARBAGE: &str = r#"
import socket, sys, time, json
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nPING\r\n')
assert f.readline().startswith(b"PONG")
cfg = json.dumps({"name": "TCPLAKE_EVENTS", "subjects": ["tcplake.events.>"], "retention": "limits",
  "discard": "new", "storage": "file", "max_age": 86400 * 10**9, "max_bytes": 8 << 30,
  "duplicate_window": 120 * 10**9, "num_replicas": 1}).encode()
s.sendall(b"SUB _INBOX.t 1\r\nPUB $JS.API.STREAM.CREATE.TCPLAKE_EVENTS _INBOX.t %d\r\n%s\r\n" % (len(cfg), cfg))
while not f.readline().startswith(b"MSG"): pass
f.readline()
body = b"this is not a tcplake batch"
s.sendall(b"PUB tcplake.events.intruder _INBOX.t %d\r\n%s\r\n" % (len(body), body))
while not f.readline().startswith(b"MSG"): pass
f.readline()
"#;
