//! Split deployment against a real NATS JetStream server (Debian's nats-server, installed by
//! scripts/setup.sh, started here on a free loopback port): capture, two aggregators and a sink as
//! separate processes write exactly the rows a monolith writes from the same seed, also when each
//! service is killed with SIGKILL mid-run and restarted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

/// The broker settings of every process of a run, with `more` lines: a short ack wait (a restarted
/// sink gets the messages its killed predecessor held sooner) and small streams (JetStream reserves
/// their size on disk up front).
fn config_with(more: &str) -> String {
    format!("[broker]\nack_wait = \"3s\"\nmax_bytes = \"256MiB\"\n{more}")
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
        let config = tmp.join("split.toml");
        std::fs::write(&config, config_with("")).unwrap();
        Run {
            seed,
            events,
            broker: nats.url(),
            out: tmp.join("split-out"),
            config,
        }
    }

    /// The flags of one service: the workload goes to capture, the output to the sink (a service
    /// refuses settings that do nothing for it).
    fn args(&self, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--mode",
            mode,
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
        match mode {
            "capture" => {
                a.extend(["--source", "synthetic", "--seed", self.seed].map(String::from));
                a.extend(["--events".into(), self.events.to_string()]);
            }
            "sink" => a.extend(["--out".into(), self.out.to_str().unwrap().into()]),
            _ => {}
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Every process of the run asks for `partitions` partitions (the first creates the streams so).
    fn partitioned(&self, partitions: u32) {
        std::fs::write(
            &self.config,
            config_with(&format!("partitions = {partitions}\n")),
        )
        .unwrap();
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
    let o: Output = child.wait_bounded().unwrap();
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
    let nats = Nats::start_monitored();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "17", N);
    let capture = run.spawn("capture", &[]);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let sink = run.spawn("sink", &[]);
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
    // The sink released every delivery's ack once its rows were committed: nothing is left for the
    // broker to deliver again, on either stream.
    let consumers = nats.consumers("tcplake-sink-");
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    for (stream, name, unacked, beyond_ack_floor) in consumers {
        assert_eq!((unacked, beyond_ack_floor), (0, 0), "{stream}/{name}");
    }
}

#[test]
fn each_service_killed_mid_run_and_restarted_still_writes_the_monolith_rows() {
    const N: u64 = 1_200_000;
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "23", N);
    // Paced capture (about 8 s) and files closing every second, so every kill lands mid-stream.
    let paced = ["--rate", "150000"];
    let sink_args = ["--max-file-age", "1s"];
    let pause = || std::thread::sleep(Duration::from_millis(1_500));

    let capture = run.spawn("capture", &paced);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let mut sink = run.spawn("sink", &sink_args);
    pause();
    kill(capture);
    let capture = run.spawn("capture", &paced);
    pause();
    kill(agg0);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    // The sink is killed after it has committed something, so its successor must resume.
    wait_for_commit_beyond(&run.out, "events", 0, &mut sink);
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

/// Every message cut into pieces (a server with a 4 KiB max_payload: headers count against it too)
/// and an aggregator killed with SIGKILL again and again while it publishes them: a restarted
/// aggregator rebuilds from the checkpoint its last piece carries (the one before a half-published
/// emission: `aggregate::tests::resuming_after_a_half_published_emission_rebuilds_it_whole` shows
/// the rows the one after it lost). The output equals the monolith's.
#[test]
fn an_aggregator_killed_while_publishing_an_emission_in_pieces_loses_no_rows() {
    const N: u64 = 600_000;
    let tmp = tempfile::tempdir().unwrap();
    let nats = Nats::start_with(&["-c", &small_payload_conf(tmp.path())]);
    let run = Run::new(&nats, tmp.path(), "71", N);
    // One-second windows closing at once, late events two seconds late and a three-second horizon:
    // emissions every second of event time, many re-emitting windows in the pass that lets them go.
    let late = "[capture]\nlate_every = 97\nlate_by = \"2s\"\n";
    let windows = [
        "--window",
        "1",
        "--allowed-lateness",
        "0",
        "--late-horizon",
        "3",
    ];
    let capture_conf = tmp.path().join("capture.toml");
    let broker_conf = std::fs::read_to_string(&run.config).unwrap();
    std::fs::write(&capture_conf, format!("{broker_conf}{late}")).unwrap();
    let mono_conf = tmp.path().join("mono.toml");
    std::fs::write(&mono_conf, late).unwrap();

    let mut args = run.args("capture", &["--rate", "100000"]);
    let i = args.iter().position(|a| a == "--config").unwrap() + 1;
    args[i] = capture_conf.to_str().unwrap().into();
    let capture = tcplake_cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let aggregator =
        |shard: &str| run.spawn("aggregate", &[&["--shard", shard][..], &windows].concat());
    let mut agg0 = aggregator("0/2");
    let agg1 = aggregator("1/2");
    let sink = run.spawn("sink", &["--max-file-age", "1s"]);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        kill(agg0);
        agg0 = aggregator("0/2");
    }
    finish(capture, "capture");
    finish(agg0, "aggregator 0");
    finish(agg1, "aggregator 1");
    finish(sink, "sink");
    let mono = tmp.path().join("mono");
    synthetic_run(
        &mono,
        "71",
        "split-node",
        N,
        &[&["--config", mono_conf.to_str().unwrap()][..], &windows].concat(),
    );
    same_rows(&run.out, &mono, "events");
    same_rows(&run.out, &mono, "flows");
}

/// A nats-server configuration (in `dir`) with a 4 KiB max_payload: every batch is cut into pieces.
fn small_payload_conf(dir: &Path) -> String {
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    conf.to_str().unwrap().to_string()
}

/// A capture process of another node (its own name and seed) into the same run's broker.
fn spawn_capture(run: &Run, node: &str, seed: &str, extra: &[&str]) -> Child {
    let mut args = run.args("capture", extra);
    let at = |flag: &str, args: &[String]| args.iter().position(|a| a == flag).unwrap() + 1;
    let i = at("--node", &args);
    args[i] = node.into();
    let i = at("--seed", &args);
    args[i] = seed.into();
    tcplake_cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// One capture process per (node, seed), with `extra` flags.
fn spawn_captures(run: &Run, nodes: &[(&str, &str)], extra: &[&str]) -> Vec<Child> {
    nodes
        .iter()
        .map(|(n, seed)| spawn_capture(run, n, seed, extra))
        .collect()
}

/// Waits for every node's capture, both aggregators and both sink parts to finish with success.
fn finish_tier(captures: Vec<Child>, nodes: &[(&str, &str)], aggs: [Child; 2], parts: [Child; 2]) {
    for (c, (n, _)) in captures.into_iter().zip(nodes) {
        finish(c, n);
    }
    for (i, a) in aggs.into_iter().enumerate() {
        finish(a, &format!("aggregator {i}"));
    }
    for (i, p) in parts.into_iter().enumerate() {
        finish(p, &format!("sink part {i}"));
    }
}

/// Every sink consumer released every delivery's ack (nothing is left for the broker to deliver
/// again) and the output holds nothing but committed files; returns the consumers' names.
fn assert_drained(nats: &Nats, out: &Path) -> Vec<String> {
    let consumers = nats.consumers("tcplake-sink-");
    for (stream, name, unacked, beyond_ack_floor) in &consumers {
        assert_eq!((*unacked, *beyond_ack_floor), (0, 0), "{stream}/{name}");
    }
    assert_eq!(leftovers(out), Vec::<PathBuf>::new());
    consumers.into_iter().map(|c| c.1).collect()
}

/// Several capture nodes into one tier (two aggregators, one sink): the output is the union of each
/// node's own monolith run, row for row, also when one capture, one aggregator and the sink are each
/// killed with SIGKILL mid-run and restarted.
#[test]
fn three_capture_nodes_into_one_tier_write_the_union_of_their_monolith_rows() {
    const N: u64 = 300_000;
    let nats = Nats::start_monitored();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "41", N);
    let nodes = [("node-a", "41"), ("node-b", "42"), ("node-c", "43")];
    // Paced (about 3 s each) so every kill lands mid-stream; every node publishes before the
    // aggregators start (they finish once every node they saw has ended).
    let paced = ["--rate", "100000"];
    let mut captures = spawn_captures(&run, &nodes, &paced);
    let sink_args = ["--max-file-age", "1s"];
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let mut sink = run.spawn("sink", &sink_args);
    std::thread::sleep(Duration::from_millis(1_000));
    kill(captures.remove(1));
    captures.insert(1, spawn_capture(&run, "node-b", "42", &paced));
    kill(agg1);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    wait_for_commit_beyond(&run.out, "events", 0, &mut sink);
    kill(sink);
    let sink = run.spawn("sink", &sink_args);
    for (c, (n, _)) in captures.into_iter().zip(nodes) {
        let s = finish(c, n);
        assert!(s["events"].as_u64().unwrap() > 0, "{n}: {s}");
    }
    finish(agg0, "aggregator 0");
    finish(agg1, "aggregator 1");
    finish(sink, "sink");
    assert_union_of_monoliths(&run.out, tmp.path(), &nodes, N, &[]);
    assert_drained(&nats, &run.out);
    report_fault(
        "split: 3 capture nodes; one capture, an aggregator and the sink killed -9 mid-run",
        "output == the union of the nodes' monolith runs",
    );
}

/// `out` holds exactly the union of each node's own monolith run, with `extra` flags (both datasets,
/// both ways).
fn assert_union_of_monoliths(
    out: &Path,
    tmp: &Path,
    nodes: &[(&str, &str)],
    events: u64,
    extra: &[&str],
) {
    let mut union = Vec::new();
    for (n, seed) in nodes {
        let mono = tmp.join(format!("mono-{n}"));
        synthetic_run(&mono, seed, n, events, extra);
        union.push(mono);
    }
    for ds in ["events", "flows"] {
        let all = union
            .iter()
            .map(|m| format!("SELECT * FROM {}", dataset(m, ds)))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let split = format!("SELECT * FROM {}", dataset(out, ds));
        for (p, q) in [(&split, &all), (&all, &split)] {
            let diff = duckdb_int(&format!("SELECT count(*) FROM (({p}) EXCEPT ALL ({q}))"));
            assert_eq!(
                diff, 0,
                "{ds}: the split output differs from the nodes' monolith runs"
            );
        }
    }
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(DISTINCT node) FROM {}",
            dataset(out, "flows")
        )),
        nodes.len() as i64
    );
}

/// Sharded sinks: two sink processes each write their part of one output (part 1 the event logs of
/// node-a and node-c and shard 1's flows, part 0 node-b's and shard 0's). Together they write the
/// union of the nodes' monolith runs, row for row, also when part 1 is killed with SIGKILL mid-run
/// and restarted (part 0's flows, which count node-a's and node-c's events, wait for part 1 to commit
/// them). A sink that says another part count is refused in one line. Every message is cut into
/// pieces (a 4 KiB max_payload): a part takes an emission's checkpoint from its last piece.
#[test]
fn two_sink_parts_write_one_output_exactly_also_when_one_is_killed() {
    const N: u64 = 300_000;
    let tmp = tempfile::tempdir().unwrap();
    let nats = Nats::start_monitored_with(&["-c", &small_payload_conf(tmp.path())]);
    let run = Run::new(&nats, tmp.path(), "51", N);
    let nodes = [("node-a", "51"), ("node-b", "52"), ("node-c", "53")];
    let paced = ["--rate", "100000"];
    let captures = spawn_captures(&run, &nodes, &paced);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let part = |p: &'static str| run.spawn("sink", &["--max-file-age", "1s", "--sink-part", p]);
    let part0 = part("0/2");
    let mut part1 = part("1/2");
    wait_for_commit_beyond(&run.out, "events", 2, &mut part1);
    kill(part1);
    // Another count for the same output: refused, naming both.
    let o = run
        .spawn("sink", &["--sink-part", "0/3"])
        .wait_bounded()
        .unwrap();
    assert!(!o.status.success());
    let line = assert_one_error_line(
        &o,
        &["written by 2 sink part(s)", "part 0/3", "--sink-part"],
    );
    assert!(line.contains("_tcplake/sink-parts.json"), "{line}");
    // So is a sink of the whole output.
    let o = run.spawn("sink", &[]).wait_bounded().unwrap();
    assert_one_error_line(
        &o,
        &["written by 2 sink part(s)", "writes the whole output"],
    );
    let part1 = part("1/2");
    finish_tier(captures, &nodes, [agg0, agg1], [part0, part1]);
    assert_union_of_monoliths(&run.out, tmp.path(), &nodes, N, &[]);
    let names = assert_drained(&nats, &run.out);
    assert!(
        names.iter().any(|n| n.ends_with("-p0of2")) && names.iter().any(|n| n.ends_with("-p1of2")),
        "each part reads on its own consumers: {names:?}"
    );
    report_fault(
        "split: 3 nodes, 2 aggregators, 2 sink parts; sink part 1 killed -9 mid-run",
        "output == the union of the nodes' monolith runs",
    );
}

/// A sink part whose flows count events another part writes, stopped with SIGTERM while that part is
/// not running, with no new flows coming (the aggregators stopped) and its held flows delivered to it
/// again (past the ack wait): it exits 0 having committed and acknowledged none of them. Once the
/// aggregators are back and both parts run, the output is exact.
#[test]
fn a_sink_part_stopped_while_its_flows_wait_for_another_part_commits_and_acks_none_of_them() {
    const N: u64 = 200_000;
    let nats = Nats::start_monitored();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "61", N);
    // node-a's log is part 1's, node-b's part 0's.
    let nodes = [("node-a", "61"), ("node-b", "62")];
    // Paced (about 10 s each): the captures still publish when part 0 is stopped.
    let paced = ["--rate", "20000"];
    let captures = spawn_captures(&run, &nodes, &paced);
    // One-second windows, emitted as soon as they end: flows reach the sinks while capture runs.
    let windows = ["--window", "1", "--allowed-lateness", "0"];
    let agg0 = run.spawn("aggregate", &[&["--shard", "0/2"][..], &windows].concat());
    let agg1 = run.spawn("aggregate", &[&["--shard", "1/2"][..], &windows].concat());
    let part = |p: &'static str| run.spawn("sink", &["--max-file-age", "1s", "--sink-part", p]);
    let mut part0 = part("0/2");
    wait_for_commit_beyond(&run.out, "events", 0, &mut part0);
    let term = |c: &Child| {
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    for a in [agg0, agg1] {
        term(&a);
        let o = a.wait_bounded().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Past the ack wait (3 s), what part 0 holds is delivered to it again: wait until it has been.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while nats.redelivered("tcplake-sink-flows-") == 0 {
        assert!(part0.try_wait().unwrap().is_none(), "part 0 exited");
        assert!(
            std::time::Instant::now() < deadline,
            "no flows redelivered within a minute"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(commits(&run.out, "flows"), 0, "flows wait for node-a's log");
    term(&part0);
    let o = part0.wait_bounded().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("they stay uncommitted and are delivered again"),
        "{}",
        stderr(&o)
    );
    assert_eq!(commits(&run.out, "flows"), 0);
    let agg0 = run.spawn("aggregate", &[&["--shard", "0/2"][..], &windows].concat());
    let agg1 = run.spawn("aggregate", &[&["--shard", "1/2"][..], &windows].concat());
    let (part0, part1) = (part("0/2"), part("1/2"));
    finish_tier(captures, &nodes, [agg0, agg1], [part0, part1]);
    assert_union_of_monoliths(&run.out, tmp.path(), &nodes, N, &windows);
    assert_drained(&nats, &run.out);
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
    let mut sink = run.spawn("sink", &["--max-file-age", "1s"]);
    wait_for_commit_beyond(&run.out, "events", 0, &mut sink);
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

    // A broker without room for the streams: named with the setting to change, not a hang or a
    // server error code.
    let small = tmp.path().join("small.conf");
    std::fs::write(&small, "jetstream { max_file_store: 64MB }\n").unwrap();
    let cramped = Nats::start_with(&["-c", small.to_str().unwrap()]);
    let cramped_run = Run::new(&cramped, tmp.path(), "5", 10);
    let o = cramped_run.spawn("capture", &[]).wait_bounded().unwrap();
    assert_one_error_line(
        &o,
        &[
            "cannot reserve 256 MiB",
            "broker.max_bytes",
            "max_file_store",
        ],
    );
    drop(cramped);

    // Garbage on the events subject: counted, dead-lettered, and the good messages still arrive.
    let nats = Nats::start();
    let run = Run::new(&nats, tmp.path(), "5", 50_000);
    let garbage = Command::new("python3")
        .args(["-c", PUBLISH_GARBAGE, &nats.port.to_string()])
        .output_bounded()
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
import socket, sys, json
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
f = s.makefile("rb")
def reply():
    # The MSG line, then its payload; a closed connection or a silent server is an error, not a hang.
    while True:
        line = f.readline()
        if not line: sys.exit("nats-server closed the connection")
        if line.startswith(b"MSG"): return f.readline()
f.readline()  # INFO
s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nPING\r\n')
assert f.readline().startswith(b"PONG")
# Small, as tcplake's own test streams: JetStream reserves max_bytes on disk up front and refuses a
# stream the disk cannot hold, and without the stream the publish below is never answered.
cfg = json.dumps({"name": "TCPLAKE_EVENTS", "subjects": ["tcplake.events.>"], "retention": "limits",
  "discard": "new", "storage": "file", "max_age": 86400 * 10**9, "max_bytes": 256 << 20,
  "duplicate_window": 120 * 10**9, "num_replicas": 1}).encode()
s.sendall(b"SUB _INBOX.t 1\r\nPUB $JS.API.STREAM.CREATE.TCPLAKE_EVENTS _INBOX.t %d\r\n%s\r\n" % (len(cfg), cfg))
r = reply()
assert b'"error"' not in r, r
body = b"this is not a tcplake batch"
s.sendall(b"PUB tcplake.events.intruder _INBOX.t %d\r\n%s\r\n" % (len(body), body))
r = reply()
assert b'"error"' not in r, r
"#;

/// Every process's summary and logs, for the secret checks.
fn all_output(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[test]
fn aggregators_that_disagree_on_the_shard_count_stop_the_sink() {
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "8", 60_000);
    let capture = run.spawn("capture", &[]);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/3"]);
    let sink = run.spawn("sink", &[]);
    finish(capture, "capture");
    finish(agg0, "aggregator 0/2");
    finish(agg1, "aggregator 1/3");
    let o = sink.wait_bounded().unwrap();
    assert_one_error_line(&o, &["disagree on how many shards", "--shard I/N"]);
}

/// One flows table holds one projection: aggregators that make flows with other window settings stop
/// the sink, the table records the settings the sink learned from the aggregators, and a later run
/// (split or monolith) with other settings is refused rather than mixing windows of two lengths.
#[test]
fn the_sink_learns_the_window_settings_from_the_aggregators_and_holds_the_table_to_them() {
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "8", 60_000);
    let capture = run.spawn("capture", &[]);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2", "--window", "5"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let sink = run.spawn("sink", &[]);
    finish(capture, "capture");
    finish(agg0, "aggregator 0 (5 s windows)");
    finish(agg1, "aggregator 1 (10 s windows)");
    let o = sink.wait_bounded().unwrap();
    assert_one_error_line(
        &o,
        &[
            "different settings",
            "window 5 s",
            "window 10 s",
            "same window",
        ],
    );

    // Agreeing aggregators: the table records what they used (no sink setting says it).
    let nats = Nats::start();
    std::fs::create_dir_all(tmp.path().join("second")).unwrap();
    let run = Run::new(&nats, &tmp.path().join("second"), "8", 60_000);
    let capture = run.spawn("capture", &[]);
    let aggs = ["0/2", "1/2"].map(|s| run.spawn("aggregate", &["--shard", s, "--window", "5"]));
    let sink = run.spawn("sink", &[]);
    finish(capture, "capture");
    for a in aggs {
        finish(a, "aggregator");
    }
    finish(sink, "sink");
    let windows = duckdb(&format!(
        "SELECT DISTINCT epoch(window_end) - epoch(window_start) FROM {}",
        dataset(&run.out, "flows")
    ));
    assert_eq!(windows, vec![vec![serde_json::json!(5.0)]]);
    // A monolith continuing this output with the default 10 s windows is refused: the table says 5.
    let o = tcplake(
        &[
            "--source",
            "synthetic",
            "--seed",
            "9",
            "--node",
            "other-node",
            "--events",
            "1000",
            "--out",
            run.out.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_error_line(&o, &["tcplake.window_secs = 5", "asks for 10"]);
}

#[test]
fn a_sink_for_a_new_output_reads_the_streams_from_their_start() {
    const N: u64 = 600_000;
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = Run::new(&nats, tmp.path(), "31", N);
    let sink_to = |out: &Path, extra: &[&str]| {
        let mut a = run.args("sink", extra);
        let i = a.iter().position(|x| x == "--out").unwrap();
        a[i + 1] = out.to_str().unwrap().into();
        tcplake_cmd()
            .args(a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The issue's case: a sink killed mid-run, restarted with another --out.
    let first = tmp.path().join("first");
    let capture = run.spawn("capture", &["--rate", "150000"]);
    let agg = run.spawn("aggregate", &[]);
    let mut sink = sink_to(&first, &["--max-file-age", "1s"]);
    wait_for_commit_beyond(&first, "events", 0, &mut sink);
    kill(sink);
    let second = tmp.path().join("second");
    let sink = sink_to(&second, &[]);
    finish(capture, "capture");
    finish(agg, "aggregator");
    let s = finish(sink, "sink to a new output");
    assert_eq!(
        s["event_rows"], N,
        "the new output got the whole stream: {s}"
    );
    assert_same_rows_as_monolith(&second, tmp.path(), "31", N);

    // Two sinks at once, each to its own output: each gets everything.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (sa, sb) = (sink_to(&a, &[]), sink_to(&b, &[]));
    finish(sa, "sink a");
    finish(sb, "sink b");
    same_rows(&a, &second, "events");
    same_rows(&a, &second, "flows");
    same_rows(&b, &second, "events");
    same_rows(&b, &second, "flows");

    // A sink restarted once everything was written ends at once (it used to wait forever).
    let started = std::time::Instant::now();
    let s = finish(sink_to(&second, &[]), "sink restarted after the end");
    assert_eq!(s["event_rows"], 0, "{s}");
    assert!(started.elapsed() < Duration::from_secs(60));

    // A new output whose beginning the stream no longer holds is refused, not silently partial.
    purge_below(&nats, "TCPLAKE_EVENTS", 5);
    let late = tmp.path().join("late");
    let o = sink_to(&late, &[]).wait_bounded().unwrap();
    assert_one_error_line(&o, &["holds no events of node `split-node`", "retention"]);
    // Said at once also while the flows it waits for have not come yet: a failing route stops the
    // other instead of leaving the sink up, ready and silent, until it is signalled.
    purge_below(&nats, "TCPLAKE_FLOWS", 1 << 40);
    let o = wait_within(
        sink_to(&tmp.path().join("later"), &[]),
        Duration::from_secs(60),
        "a sink whose event route failed",
    )
    .unwrap();
    assert_one_error_line(&o, &["holds no events of node `split-node`", "retention"]);
    report_fault(
        "split: sink killed -9, restarted with a new --out; two sinks at once; stream purged",
        "new outputs got every row, a truncated stream is refused",
    );
}

/// Writes a NATS server config with one NKey user and returns (config path, seed file).
fn nkey_server_config(dir: &Path) -> (PathBuf, PathBuf) {
    let kp = nkeys::KeyPair::new_user();
    let conf = dir.join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            // The storage limit Nats::start_with states when it writes the config (see there).
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\njetstream {{ max_file_store: 1TB }}\n",
            kp.public_key()
        ),
    )
    .unwrap();
    let seed = dir.join("user.nk");
    std::fs::write(&seed, format!("{}\n", kp.seed().unwrap())).unwrap();
    (conf, seed)
}

#[test]
fn broker_credentials_are_sent_every_way_and_never_logged() {
    const PASS: &str = "p4ss-w0rd:with@signs";
    const TOKEN: &str = "t0ken-very-secret-123";
    let tmp = tempfile::tempdir().unwrap();
    let secret_file = |name: &str, v: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("{v}\n")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let pass_file = secret_file("pass", PASS);
    let token_file = secret_file("token", TOKEN);
    let config = tmp.path().join("c.toml");
    std::fs::write(
        &config,
        "[broker]\nmax_bytes = \"256MiB\"\nconnect_timeout = \"2s\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();

    // User and password: in the URL (percent-encoded), from the environment, from a file.
    let nats = Nats::start_with(&["--user", "alice", "--pass", PASS]);
    let host = format!("127.0.0.1:{}", nats.port);
    let encoded = PASS.replace(':', "%3A").replace('@', "%40");
    let out = tmp.path().join("out");
    let base = |mode: &str| -> Vec<String> {
        [
            "--mode",
            mode,
            "--node",
            "split-node",
            "--summary",
            "json",
            "--config",
            &config,
        ]
        .map(String::from)
        .to_vec()
    };
    let spawn = |args: Vec<String>, envs: &[(&str, &str)]| {
        tcplake_cmd()
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut cap = base("capture");
    cap.extend(["--source", "synthetic", "--seed", "4", "--events", "30000"].map(String::from));
    cap.extend(["--broker".into(), format!("nats://alice:{encoded}@{host}")]);
    let mut agg = base("aggregate");
    agg.extend(["--broker".into(), format!("nats://{host}")]);
    let mut sink = base("sink");
    sink.extend([
        "--broker".into(),
        format!("nats://{host}"),
        "--out".into(),
        out.to_str().unwrap().into(),
    ]);
    sink.extend([
        "--broker-user".into(),
        "alice".into(),
        "--broker-password-file".into(),
        pass_file,
    ]);
    let c = spawn(cap, &[("RUST_LOG", "trace")]);
    let a = spawn(
        agg,
        &[
            ("TCPLAKE_BROKER_USER", "alice"),
            ("TCPLAKE_BROKER_PASSWORD", PASS),
            ("RUST_LOG", "debug"),
        ],
    );
    let s = spawn(sink, &[("RUST_LOG", "trace")]);
    for (child, what) in [(c, "capture"), (a, "aggregator"), (s, "sink")] {
        let o = child.wait_bounded().unwrap();
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        let text = all_output(&o);
        for secret in [PASS, encoded.as_str()] {
            assert!(!text.contains(secret), "{what} logged the password");
        }
    }
    assert_same_rows_as_monolith(&out, tmp.path(), "4", 30_000);

    // At every log level, with the password in the URL: never in the output.
    for level in ["error", "warn", "info", "debug", "trace"] {
        let o = tcplake(
            &[
                "--mode",
                "capture",
                "--source",
                "synthetic",
                "--events",
                "1000",
                "--node",
                level,
                "--summary",
                "json",
                "--broker",
                &format!("nats://alice:{encoded}@{host}"),
            ],
            &[("RUST_LOG", level)],
        );
        assert!(o.status.success(), "{level}: {}", stderr(&o));
        let text = all_output(&o);
        assert!(
            !text.contains(PASS) && !text.contains(&encoded),
            "{level}: the password was logged"
        );
    }

    // A wrong password: one line at once, naming the credentials, not a missing JetStream.
    let started = std::time::Instant::now();
    let o = tcplake(
        &[
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--broker",
            &format!("nats://alice:wrong-pass-x@{host}"),
        ],
        &[("RUST_LOG", "trace")],
    );
    let line = assert_one_error_line_with_logs(&o, &["refused tcplake's credentials"]);
    assert!(
        !line.contains("JetStream") && !all_output(&o).contains("wrong-pass-x"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(nats);

    // A token: in the URL, from the environment, from a file.
    let nats = Nats::start_with(&["--auth", TOKEN]);
    let host = format!("127.0.0.1:{}", nats.port);
    for (how, url, envs, flags) in [
        ("url", format!("nats://{TOKEN}@{host}"), vec![], vec![]),
        (
            "env",
            format!("nats://{host}"),
            vec![("TCPLAKE_BROKER_TOKEN", TOKEN)],
            vec![],
        ),
        (
            "file",
            format!("nats://{host}"),
            vec![],
            vec!["--broker-token-file", token_file.as_str()],
        ),
    ] {
        let mut args = vec![
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--events",
            "1000",
            "--node",
            how,
            "--summary",
            "json",
        ];
        args.extend(["--broker", url.as_str()]);
        args.extend(flags);
        let mut envs = envs;
        envs.push(("RUST_LOG", "trace"));
        let o = tcplake(&args, &envs);
        assert!(o.status.success(), "token via {how}: {}", stderr(&o));
        assert!(
            !all_output(&o).contains(TOKEN),
            "token via {how} was logged"
        );
    }
    drop(nats);

    // An NKey seed file.
    let (conf, seed) = nkey_server_config(tmp.path());
    let seed_text = std::fs::read_to_string(&seed).unwrap();
    let nats = Nats::start_with(&["-c", conf.to_str().unwrap()]);
    let o = tcplake(
        &[
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--events",
            "1000",
            "--summary",
            "json",
            "--broker",
            &nats.url(),
            "--broker-nkey",
            seed.to_str().unwrap(),
        ],
        &[("RUST_LOG", "trace")],
    );
    assert!(o.status.success(), "nkey: {}", stderr(&o));
    assert!(
        !all_output(&o).contains(seed_text.trim()),
        "the NKey seed was logged"
    );
    // Without it, the same server refuses at once.
    let o = tcplake(
        &[
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--broker",
            &nats.url(),
        ],
        &[],
    );
    assert_one_error_line(&o, &["refused tcplake's credentials"]);
    // Two ways at once are a configuration error.
    let o = tcplake(
        &[
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--broker",
            &format!("nats://{TOKEN}@{host}"),
            "--broker-nkey",
            seed.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(&o, 2, &["given more than one way"]);
    assert!(!stderr(&o).contains(TOKEN));
}

/// The error line of a run that logged at a verbose level: exactly one `tcplake: error:` line.
fn assert_one_error_line_with_logs(o: &Output, needles: &[&str]) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let err = stderr(o);
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("tcplake: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    for n in needles {
        assert!(errors[0].contains(n), "`{n}` not in: {}", errors[0]);
    }
    errors[0].to_string()
}

#[test]
fn a_full_stream_makes_capture_stop_promptly_on_sigterm_saying_what_was_not_published() {
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("c.toml");
    std::fs::write(
        &config,
        "[broker]\nmax_bytes = \"8MiB\"\ncompress = false\n",
    )
    .unwrap();
    let mut child = tcplake_cmd()
        .args([
            "--mode",
            "capture",
            "--source",
            "synthetic",
            "--events",
            "5000000",
            "--broker",
            &nats.url(),
            "--config",
            config.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (on the log, not the clock) until publishing has started failing.
    let stderr_pipe = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr_pipe)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("publish failed; retrying") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the stream fills up");
    let stopped = std::time::Instant::now();
    // SIGTERM: an orderly stop, which gives up on the refused batch.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "took {:?}",
        stopped.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("tcplake: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    for n in [
        "stopped while publishing",
        "the stream is full",
        "were not published",
    ] {
        assert!(errors[0].contains(n), "`{n}` not in {}", errors[0]);
    }
}

/// Partitioned streams (`broker.partitions = 2`, one config for every process): each aggregator
/// reads only its partition, and the output is still the union of the nodes' monolith runs, row for
/// row, with one capture and one aggregator killed with SIGKILL mid-run and restarted. Every message
/// is cut into pieces (a 4 KiB max_payload), shares included. A process that asks for another
/// partition count, and more aggregators than partitions, are refused in one line each.
#[test]
fn partitioned_streams_give_each_aggregator_its_share_and_stay_exact_through_kills() {
    const N: u64 = 300_000;
    let tmp = tempfile::tempdir().unwrap();
    let nats = Nats::start_monitored_with(&["-c", &small_payload_conf(tmp.path())]);
    let run = Run::new(&nats, tmp.path(), "71", N);
    run.partitioned(2);
    let nodes = [("node-a", "71"), ("node-b", "72"), ("node-c", "73")];
    let paced = ["--rate", "100000"];
    let mut captures = spawn_captures(&run, &nodes, &paced);
    let agg0 = run.spawn("aggregate", &["--shard", "0/2"]);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    let mut sink = run.spawn("sink", &["--max-file-age", "1s"]);
    wait_for_commit_beyond(&run.out, "events", 0, &mut sink);
    kill(captures.remove(1));
    captures.insert(1, spawn_capture(&run, "node-b", "72", &paced));
    kill(agg1);
    let agg1 = run.spawn("aggregate", &["--shard", "1/2"]);
    // The stream records 2: a process asking for 3 is refused, as is a third aggregator.
    let o = run
        .spawn("aggregate", &["--shard", "0/2", "--broker-partitions", "3"])
        .wait_bounded()
        .unwrap();
    assert_one_error_line(&o, &["asks for 3 partitions", "was created with 2"]);
    let o = run
        .spawn("aggregate", &["--shard", "2/3"])
        .wait_bounded()
        .unwrap();
    assert_one_error_line(&o, &["shard 2 of 3", "cut into 2 partitions"]);
    for (c, (n, _)) in captures.into_iter().zip(nodes) {
        finish(c, n);
    }
    let a0 = finish(agg0, "aggregator 0");
    finish(agg1, "aggregator 1");
    finish(sink, "sink");
    assert_union_of_monoliths(&run.out, tmp.path(), &nodes, N, &[]);
    assert_drained(&nats, &run.out);
    // Aggregator 0 (never killed) read its partition only: about half of what the node logs take.
    let consumed = a0["broker"]["consumed_bytes"].as_u64().unwrap();
    let log = nats.stream_state("TCPLAKE_EVENTS")["bytes"]
        .as_u64()
        .unwrap();
    let parts = nats.stream_state("TCPLAKE_PARTS")["bytes"]
        .as_u64()
        .unwrap();
    assert!(
        consumed > parts / 4 && consumed < log * 3 / 4,
        "aggregator 0 consumed {consumed} B; node logs {log} B, partitions {parts} B"
    );
    report_fault(
        "split, partitioned streams: 3 nodes, 2 aggregators; a capture and an aggregator killed -9",
        "output == the union of the nodes' monolith runs; each aggregator read its partition only",
    );
}

/// Elastic aggregators: over a stream of 6 partitions the tier goes from 2 aggregators to 3 and back
/// to 2 while capture runs, each change made the way a rollout makes it (the new processes start while
/// the old ones still run; the old ones are stopped, one killed -9). Each aggregator takes the
/// partitions k with k mod N = I, claiming each on its flows subject, so one aggregator at a time
/// emits a partition's flows and the next continues from exactly where the last stopped. An old
/// aggregator whose every partition was claimed away says so and waits to be stopped. The output
/// equals the monolith's, row for row.
#[test]
fn the_aggregator_count_changes_2_3_2_while_capture_runs_and_the_output_stays_exact() {
    const N: u64 = 600_000;
    let tmp = tempfile::tempdir().unwrap();
    // 4 KiB messages: emissions go out in pieces, so claims land between pieces too.
    let nats = Nats::start_monitored_with(&["-c", &small_payload_conf(tmp.path())]);
    let run = Run::new(&nats, tmp.path(), "91", N);
    run.partitioned(6);
    // About 40 s of capture, one-second windows: flows are committed while the tier changes.
    let mut capture = run.spawn("capture", &["--rate", "15000"]);
    let windows = ["--window", "1", "--allowed-lateness", "0"];
    let agg = |i: &str| run.spawn("aggregate", &[&["--shard", i][..], &windows].concat());
    let mut sink = run.spawn("sink", &["--max-file-age", "1s"]);
    let mut claims = Claims::new(&nats);
    // Each change is complete once the new aggregators claimed their partitions, with capture
    // still running (else this machine is too slow for the test to say anything).
    let claimed = |claims: &mut Claims, by: &[(&Child, &[u32])], capture: &mut Child| {
        for (c, parts) in by {
            claims.wait_for(c.id(), parts);
        }
        if let Some(status) = capture.try_wait().unwrap() {
            panic!(
                "capture ended ({status}) before the aggregators changed: too slow a machine for \
                 this test, or capture failed"
            );
        }
    };
    let stop = |c: Child, what: &str| {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let o = c.wait_bounded().unwrap();
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        stderr(&o)
    };

    // 2 aggregators: 0/2 has partitions 0, 2, 4; 1/2 has 1, 3, 5.
    let a0 = agg("0/2");
    let a1 = agg("1/2");
    claimed(
        &mut claims,
        &[(&a0, &[0, 2, 4]), (&a1, &[1, 3, 5])],
        &mut capture,
    );
    wait_for_commit_beyond(&run.out, "flows", 0, &mut sink);
    // 2 -> 3. 2/3 takes 2 and 5 from the running two; then 0/2 is stopped and 0/3 (0, 3) and
    // 1/3 (1, 4) start: 1/2 has lost all three of its partitions.
    let b2 = agg("2/3");
    claimed(&mut claims, &[(&b2, &[2, 5])], &mut capture);
    stop(a0, "aggregator 0/2");
    let b0 = agg("0/3");
    let b1 = agg("1/3");
    claimed(&mut claims, &[(&b0, &[0, 3]), (&b1, &[1, 4])], &mut capture);
    // 3 -> 2, with a kill -9: 2/3 is stopped, 1/3 killed, and 0/2 and 1/2 start again; 0/3 loses
    // both of its partitions.
    stop(b2, "aggregator 2/3");
    kill(b1);
    let c0 = agg("0/2");
    let c1 = agg("1/2");
    claimed(
        &mut claims,
        &[(&c0, &[0, 2, 4]), (&c1, &[1, 3, 5])],
        &mut capture,
    );
    finish(capture, "capture");
    finish(c0, "aggregator 0/2");
    finish(c1, "aggregator 1/2");
    finish(sink, "sink");
    // The aggregators all of whose partitions were claimed wait to be stopped, having said so.
    for (c, i) in [(a1, "1/2"), (b0, "0/3")] {
        let said = stop(c, &format!("aggregator {i}"));
        assert!(
            said.contains(&format!(
                "every shard of this aggregator was claimed by another aggregator (--shard {i})"
            )),
            "{i}: {said}"
        );
    }
    assert_union_of_monoliths(&run.out, tmp.path(), &[("split-node", "91")], N, &windows);
    assert_drained(&nats, &run.out);
    report_fault(
        "split, 6 partitions: aggregators 2 -> 3 -> 2 while capture runs (one killed -9)",
        "output == the monolith's; each partition emitted by one aggregator at a time",
    );
}

/// The claims on the flows stream (`Tcplake-Claim`), read as they are published.
struct Claims {
    rt: tokio::runtime::Runtime,
    stream: async_nats::jetstream::stream::Stream,
    next: u64,
    /// (partition, claimant's pid)
    seen: Vec<(u32, u32)>,
}

impl Claims {
    fn new(nats: &Nats) -> Claims {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stream = rt.block_on(async {
            let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                match js.get_stream("TCPLAKE_FLOWS").await {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "no flows stream: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Claims {
            rt,
            stream,
            next: 1,
            seen: Vec::new(),
        }
    }

    /// Waits (up to a minute) until process `pid` has claimed every partition of `parts`.
    fn wait_for(&mut self, pid: u32, parts: &[u32]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !parts.iter().all(|p| self.seen.contains(&(*p, pid))) {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} did not claim partitions {parts:?} within a minute: {:?}",
                self.seen
            );
            // A request that fails (a busy server) is made again at the next poll.
            let (next, seen) = self.rt.block_on(async {
                use async_nats::jetstream::stream::RawMessageErrorKind;
                let mut next = self.next;
                let mut seen = Vec::new();
                let Ok(info) = self.stream.get_info().await else {
                    return (next, seen);
                };
                while next <= info.state.last_sequence {
                    match self.stream.get_raw_message(next).await {
                        Ok(m) => {
                            if let Some(owner) = m.headers.get("Tcplake-Claim") {
                                // "I/N pid PID at TS"
                                let part = m.subject.as_str().rsplit('.').next().unwrap();
                                let pid = owner.as_str().split(' ').nth(2).unwrap();
                                seen.push((part.parse().unwrap(), pid.parse().unwrap()));
                            }
                        }
                        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                        Err(_) => break,
                    }
                    next += 1;
                }
                (next, seen)
            });
            self.next = next;
            self.seen.extend(seen);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The claim protocol against a real server, driven through the library: a claim resumes from the
/// shard's last flow message (also when the last message is an earlier claim), the aggregator before
/// it is refused at its next publish (also one claimed away before it published anything, and one
/// publishing the very emission the new owner published first), and an ended shard is not claimed.
#[test]
fn a_shard_claim_resumes_from_the_last_flow_message_and_fences_the_aggregator_before() {
    use pipeline::edge::broker::{Broker, Claimed};
    use pipeline::edge::{EdgeError, StreamFault, Tx};
    use pipeline::event::{FlowBatch, ReplayPoint};
    let nats = Nats::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let broker = Broker::connect(&two_partitions(&nats), Default::default())
            .await
            .unwrap();
        let (_stop, shutdown) = pipeline::shutdown::channel();
        let batch = |seq: u64| FlowBatch {
            producer: "agg-1".into(),
            seq,
            records: Vec::new(),
            first_row: 0,
            total_rows: 0,
            replay: ReplayPoint {
                from_seq: 100 + seq,
                ..Default::default()
            },
            replay_before: None,
            shard_count: 2,
            windows: None,
        };
        let claim = |owner: &'static str| {
            let broker = broker.clone();
            async move {
                match broker.claim_shard(1, 2, owner).await.unwrap() {
                    Claimed::From { last, claim } => {
                        (last.map(|l| (l.seq, l.replay.from_seq)), claim)
                    }
                    Claimed::Ended => panic!("{owner}: the shard has not ended"),
                }
            }
        };
        let refused = |e: EdgeError| {
            assert!(
                matches!(e, EdgeError::Stream(StreamFault::Foreign { .. })),
                "{e}"
            )
        };
        // Nothing published yet: nothing to resume from.
        let (last, a_claim) = claim("a").await;
        assert_eq!(last, None);
        let mut a = broker.flows_tx(1, 2, shutdown.clone()).after_claim(a_claim);
        a.send(batch(0)).await.unwrap();
        a.send(batch(1)).await.unwrap();
        // b resumes from a's last batch; a is refused from then on.
        let (last, b_claim) = claim("b").await;
        assert_eq!(last, Some((1, 101)));
        refused(a.send(batch(2)).await.unwrap_err());
        // c claims before b published: it too resumes from a's last batch, and b is refused at once.
        let (last, c_claim) = claim("c").await;
        assert_eq!(last, Some((1, 101)));
        assert!(c_claim > b_claim);
        let mut b = broker.flows_tx(1, 2, shutdown.clone()).after_claim(b_claim);
        refused(b.send(batch(2)).await.unwrap_err());
        let mut c = broker.flows_tx(1, 2, shutdown.clone()).after_claim(c_claim);
        c.send(batch(2)).await.unwrap();
        // d publishes the emission c would publish next first: c's, the same emission with the same
        // rows, is still refused (the server's duplicate detection does not take it for d's).
        let (last, d_claim) = claim("d").await;
        assert_eq!(last, Some((2, 102)));
        let mut d = broker.flows_tx(1, 2, shutdown.clone()).after_claim(d_claim);
        d.send(batch(3)).await.unwrap();
        refused(c.send(batch(3)).await.unwrap_err());
        d.send(batch(4)).await.unwrap();
        // A claim published by hand without a usable checkpoint is refused, naming the message.
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let mut h = async_nats::HeaderMap::new();
        h.insert("Tcplake-Claim", "by hand");
        h.insert("Tcplake-Checkpoint", "x");
        let seq = js
            .publish_with_headers("tcplake.flows.0", h, Vec::new().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence;
        let e = broker
            .claim_shard(0, 2, "g")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("nats stream rmm TCPLAKE_FLOWS {seq}")) && e.contains("`x`"),
            "{e}"
        );
        // A shard whose flows ended is not claimed.
        let (_, e_claim) = claim("e").await;
        let mut e = broker.flows_tx(1, 2, shutdown.clone()).after_claim(e_claim);
        e.close(true).await.unwrap();
        assert!(matches!(
            broker.claim_shard(1, 2, "f").await.unwrap(),
            Claimed::Ended
        ));
    });
}

/// A capture that died between a node message and its shares (partition 1 lacks the share, partition
/// 0 holds the first piece of one cut in two): the next capture of the node cuts that message again for
/// what each partition lacks (and ends the partitions of an ended node), so each partition holds every
/// event of the node's log once, each with the node's watermark. Driven through the library against
/// a real server: no process can be killed at exactly those points.
#[test]
fn a_capture_that_died_between_a_node_message_and_its_shares_is_repaired_by_the_next() {
    use pipeline::edge::broker::{Broker, BrokerSettings};
    use pipeline::edge::{partitioned, wire, Rx, Tx};
    use pipeline::event::partition::partition_of;
    let nats = Nats::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let settings = two_partitions(&nats);
        let broker = Broker::connect(&settings, Default::default())
            .await
            .unwrap();
        assert_eq!(broker.partitions(), 2);
        let (_stop, shutdown) = pipeline::shutdown::channel();
        let mut src = synthetic_node_n(5, 3_000);
        let (a, b) = (
            src.next_batch(1_000).unwrap(),
            src.next_batch(2_000).unwrap(),
        );
        let mut tx = broker
            .events_tx("n", 0, "src".into(), shutdown.clone())
            .unwrap();
        tx.send(std::sync::Arc::new(a)).await.unwrap();
        // Batch b reaches the node's log only, as from a capture killed right after.
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let publish = |headers: &[(&str, &str)], body: Vec<u8>| {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, *v);
            }
            let js = js.clone();
            async move {
                js.publish_with_headers("tcplake.events.n", h, body.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        };
        let a_seq = js
            .get_stream("TCPLAKE_EVENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
        publish(
            &[("Nats-Msg-Id", "n-1000"), ("Tcplake-Next-Seq", "3000")],
            wire::encode_events(&b, true),
        )
        .await;
        // Partition 0 got the first piece of its share of b (a piece that does not complete a share
        // points at the node message before it, and says which one it is a piece of: b's, the next).
        let mut max_ts = i64::MIN;
        let share = pipeline::event::partition::split(&b, 2, &mut max_ts).swap_remove(0);
        let marks = share.watermarks.clone().unwrap();
        let mid = share.events.len() / 2;
        let mut piece =
            pipeline::event::EventBatch::new("n".into(), share.events[..mid].to_vec(), None);
        piece.watermarks = Some(std::sync::Arc::new(
            pipeline::event::partition::Watermarks {
                before: marks.before[..mid].to_vec(),
                after: marks.before[mid],
                next_seq: share.events[mid].seq,
            },
        ));
        let mut h = async_nats::HeaderMap::new();
        h.insert("Tcplake-From", a_seq.to_string().as_str());
        h.insert("Tcplake-Piece-Of", (a_seq + 1).to_string().as_str());
        js.publish_with_headers(
            "tcplake.part.0.n",
            h,
            wire::encode_partition(&piece, true).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let repair = || partitioned::repair(&broker, "n", shutdown.clone());
        assert_eq!(
            repair().await.unwrap(),
            2,
            "both partitions lacked (some of) batch b"
        );
        assert_eq!(repair().await.unwrap(), 0, "nothing left to repair");
        // The node ended (its capture died before ending the partitions): they are ended too.
        publish(
            &[("Nats-Msg-Id", "n-end"), ("Tcplake-End", "1")],
            Vec::new(),
        )
        .await;
        assert_eq!(repair().await.unwrap(), 0);
        let mut seqs = Vec::new();
        for p in 0..2 {
            let mut rx = broker.partition_from(p, 0).await.unwrap();
            let mut last = 0;
            while let Some(share) = rx.recv().await.unwrap() {
                let marks = share
                    .watermarks
                    .clone()
                    .expect("a share carries watermarks");
                assert_eq!(marks.before.len(), share.events.len());
                for e in &share.events {
                    assert_eq!(partition_of("n", e, 2), p);
                    assert!(e.seq >= last, "in node order");
                    last = e.seq;
                    seqs.push(e.seq);
                }
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..3_000).collect::<Vec<u64>>(), "every event once");
        // The count recorded in the stream's description, edited away (by hand, by an older
        // tcplake): refused, rather than read as unpartitioned.
        let mut config = js
            .get_stream("TCPLAKE_EVENTS")
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        config.description = None;
        js.update_stream(config).await.unwrap();
        let e = Broker::connect(
            &BrokerSettings {
                partitions: None,
                ..settings
            },
            Default::default(),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("does not say how many partitions"),
            "{e}"
        );
    });
}

/// A node whose messages left the events stream (purged, or aged out a moment before its shares) and
/// whose next capture numbers its events from 0 again, killed between its first node message and the
/// shares: the repair cuts that message whole. (What a partition's last complete share held, under the
/// old numbering, says nothing about the new messages: only a piece of a share limits what is cut.)
#[test]
fn a_repair_after_the_node_numbering_restarted_cuts_the_new_messages_whole() {
    use pipeline::edge::broker::Broker;
    use pipeline::edge::{partitioned, wire, Rx, Tx};
    let nats = Nats::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let settings = two_partitions(&nats);
        let broker = Broker::connect(&settings, Default::default())
            .await
            .unwrap();
        let (_stop, shutdown) = pipeline::shutdown::channel();
        let batch = |seed: u64, n: usize| synthetic_node_n(seed, n as u64).next_batch(n).unwrap();
        let mut tx = broker
            .events_tx("n", 0, "src".into(), shutdown.clone())
            .unwrap();
        tx.send(std::sync::Arc::new(batch(5, 3_000))).await.unwrap();
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.get_stream("TCPLAKE_EVENTS")
            .await
            .unwrap()
            .purge()
            .filter("tcplake.events.n")
            .await
            .unwrap();
        // The new run's first message (seqs 0..1000 again), its shares never published.
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "n-new-0");
        js.publish_with_headers(
            "tcplake.events.n",
            h,
            wire::encode_events(&batch(6, 1_000), true).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        assert_eq!(
            partitioned::repair(&broker, "n", shutdown.clone())
                .await
                .unwrap(),
            2
        );
        // Each partition: its share of the old 3 000 and of the new 1 000, nothing dropped.
        let mut total = 0;
        for p in 0..2 {
            let mut rx = broker.partition_from(p, 0).await.unwrap();
            let want = 2; // the old share and the repaired one
            for _ in 0..want {
                total += rx.recv().await.unwrap().unwrap().events.len();
            }
        }
        assert_eq!(total, 4_000);
    });
}

/// A broker on `nats` whose events stream is cut into two partitions (the library-driven tests).
fn two_partitions(nats: &Nats) -> pipeline::edge::broker::BrokerSettings {
    pipeline::edge::broker::BrokerSettings {
        url: nats.url(),
        auth: pipeline::edge::broker::BrokerAuth::None,
        connect_for: Duration::from_secs(10),
        max_age: Duration::from_secs(3600),
        max_bytes: 64 << 20,
        compress: true,
        ack_wait: None,
        partitions: Some(2),
    }
}

/// Node `n`'s synthetic events: `total` of them, from `seed`.
fn synthetic_node_n(seed: u64, total: u64) -> pipeline::capture::synthetic::Synthetic {
    pipeline::capture::synthetic::Synthetic::new(
        "n".into(),
        pipeline::capture::synthetic::SyntheticConfig {
            seed,
            total,
            start_us: 1_700_000_000_000_000,
            events_per_sim_sec: 1_000,
        },
    )
}
