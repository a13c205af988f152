//! `tcplake bench` end to end on a small workload: every topology runs as real processes (a real
//! nats-server for split-broker, a real S3-compatible server for an S3 hand-off) at one and two
//! capture nodes, the outputs are checked to be identical, and the report holds every figure with a
//! cost breakdown. (Numbers are not asserted: performance is what the bench reports.)

use crate::common::*;

#[test]
fn bench_runs_every_mode_at_each_node_count_checks_outputs_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    // A hand-off directory of the user's: the bench works in a directory of its own inside it.
    let handoff = tmp.path().join("handoff");
    std::fs::create_dir(&handoff).unwrap();
    std::fs::write(handoff.join("keep.txt"), "mine").unwrap();
    let o = tcplake(
        &[
            "bench",
            "--events",
            "80000",
            "--seed",
            "3",
            "--nodes",
            "1,2",
            "--sinks",
            "2",
            // The split-broker runs on a partitioned stream: its flows must still be the monolith's.
            "--partitioned",
            "--handoff",
            handoff.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files_under(&handoff), vec![handoff.join("keep.txt")]);
    let table = stdout(&o);
    for mode in ["monolith", "split-broker", "split-object-store"] {
        for n in [1, 2] {
            assert!(table.contains(&format!("| {mode} | {n} |")), "{table}");
        }
        assert!(
            table.contains(&format!("{mode} at 1 / 2 nodes: CPU s per M events")),
            "{table}"
        );
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["identical_flows"], true);
    assert_eq!(r["nodes"], serde_json::json!([1, 2]));
    assert_eq!(
        (&r["shards"], &r["partitioned"]),
        (&serde_json::json!(2), &serde_json::json!(true))
    );
    let modes = r["modes"].as_array().unwrap();
    // One entry per (mode, nodes): node counts in order, modes in order within each.
    let runs: Vec<(String, u64)> = modes
        .iter()
        .map(|m| {
            (
                m["mode"].as_str().unwrap().to_string(),
                m["nodes"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [1, 2]
        .iter()
        .flat_map(|&n| {
            ["monolith", "split-broker", "split-object-store"]
                .iter()
                .map(move |m| (m.to_string(), n))
        })
        .collect();
    assert_eq!(runs, expected);
    let rows = |n: u64| {
        modes[if n == 1 { 0 } else { 3 }]["flow_rows"]
            .as_u64()
            .unwrap()
    };
    // A second node (its own seed) adds flows of its own.
    assert!(rows(1) > 0 && rows(2) > rows(1), "{} {}", rows(1), rows(2));
    for m in modes {
        let n = m["nodes"].as_u64().unwrap();
        assert_eq!(m["flow_rows"].as_u64().unwrap(), rows(n), "{m}");
        assert_eq!(m["events"].as_u64().unwrap(), 80_000 * n, "{m}");
        let c = &m["cost_per_billion_events"];
        let parts: f64 = ["compute", "s3_requests", "broker", "orchestration"]
            .iter()
            .map(|k| c[*k].as_f64().unwrap())
            .sum();
        assert!((parts - c["total"].as_f64().unwrap()).abs() < 1e-9, "{c}");
        assert!(m["cpu_seconds"].as_f64().unwrap() > 0.0);
        // Capture-to-durable latency is measured in every run.
        assert!(m["latency_p99_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert_eq!(m["handoff_on_s3"], false, "{m}");
        // Every process of the run is measured: one monolith per node; per node a capture and, over
        // the object store, its own two aggregators and sink; over the broker one tier of two
        // aggregators and two sink parts (`--sinks 2`), and the broker.
        let processes = m["processes"].as_array().unwrap();
        let expected = match m["mode"].as_str().unwrap() {
            "monolith" => n,
            "split-broker" => n + 2 + 2 + 1,
            _ => n * 4,
        };
        assert_eq!(processes.len() as u64, expected, "{m}");
        if m["mode"] == "split-broker" {
            let roles: Vec<&str> = processes
                .iter()
                .filter_map(|p| p["role"].as_str())
                .collect();
            assert!(
                roles.contains(&"sink 0/2") && roles.contains(&"sink 1/2"),
                "{roles:?}"
            );
        }
    }
    // What crossed the boundaries is where the split designs differ.
    assert_eq!(modes[0]["boundary_bytes"], 0);
    assert!(modes[1]["broker_messages"].as_u64().unwrap() > 0);
    assert!(modes[2]["handoff_puts"].as_u64().unwrap() >= 80_000 / 4096);
    assert!(
        modes[5]["handoff_puts"].as_u64().unwrap() > modes[2]["handoff_puts"].as_u64().unwrap()
    );
    let svg = std::fs::read_to_string(report.join("report.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("split-object-store, 2 node(s)")
            && svg.contains("Cost against capture nodes")
            && svg.matches("<polyline").count() == 3,
        "{svg}"
    );
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("every mode wrote identical `flows/` rows: true"));
}

/// `--handoff s3://...`: the object-store topology hands over through a real S3-compatible server,
/// and what the report counts is what was stored there.
#[test]
fn bench_hands_over_through_s3_and_counts_the_requests_made() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let endpoint = server.endpoint();
    let handoff = format!("s3://{BUCKET}/bench");
    let o = tcplake(
        &[
            "bench",
            "--events",
            "50000",
            "--nodes",
            "2",
            "--modes",
            "monolith,split-object-store",
            "--handoff",
            &handoff,
            "--s3-endpoint",
            &endpoint,
            "--s3-region",
            "us-east-1",
            "--report",
            report.to_str().unwrap(),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["identical_flows"], true);
    let m = &r["modes"][1];
    assert_eq!(m["mode"], "split-object-store");
    assert_eq!(m["handoff_on_s3"], true);
    // Every object the edge counted is in the bucket, under each node's own streams (and each node's
    // run marker, which its capture writes first).
    let objects: Vec<String> = files_under(&server.data.path().join(BUCKET).join("bench"))
        .into_iter()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.ends_with(".tlw") || p.ends_with("/run"))
        .collect();
    assert_eq!(
        objects.len() as u64,
        m["handoff_puts"].as_u64().unwrap(),
        "{objects:?}"
    );
    for node in ["bench-0", "bench-1"] {
        for stream in ["events", "flows/0", "flows/1"] {
            let part = format!("/_handoff/{node}/{stream}/");
            assert!(
                objects.iter().any(|p| p.contains(&part)),
                "{part}: {objects:?}"
            );
        }
    }
    // The requests priced include the ones made: at least a PUT per object and a GET per poll.
    let usage = &m["usage"];
    assert!(usage["s3_writes"].as_u64().unwrap() >= m["handoff_puts"].as_u64().unwrap());
    assert!(usage["s3_reads"].as_u64().unwrap() >= m["handoff_gets"].as_u64().unwrap());
    assert!(stdout(&o).contains("(S3)"), "{}", stdout(&o));
}

#[test]
fn bench_flags_that_cannot_work_are_refused() {
    for (args, needle) in [
        (&["bench", "--nodes", "0"][..], "--nodes"),
        (
            &["bench", "--s3-endpoint", "http://127.0.0.1:9"][..],
            "s3://",
        ),
        (&["bench", "--handoff", "s3:///x"][..], "valid bucket name"),
        (
            &["bench", "--modes", "monolith", "--handoff", "/tmp"][..],
            "--modes leaves it out",
        ),
    ] {
        let o = tcplake(args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(needle) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_bad_price_table_is_refused_with_the_key_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prices = tmp.path().join("p.toml");
    std::fs::write(&prices, "source = \"x\"\n[compute]\nvcpu_hours = 1\n").unwrap();
    let o = tcplake(&["bench", "--prices", prices.to_str().unwrap()], &[]);
    // A configuration error: the documented exit status 2, like every other.
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("vcpu_hours") && err.contains("p.toml"),
        "{err}"
    );
}
