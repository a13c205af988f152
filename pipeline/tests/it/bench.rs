//! `tcplake bench` end to end on a small workload: every topology runs as real processes (a real
//! nats-server for split-broker), the outputs are checked to be identical, and the report holds every
//! figure with a cost breakdown. (Numbers are not asserted: performance is what the bench reports.)

use crate::common::*;

#[test]
fn bench_runs_every_mode_checks_outputs_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let o = tcplake(
        &[
            "bench",
            "--events",
            "120000",
            "--seed",
            "3",
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    for mode in ["monolith", "split-broker", "split-object-store"] {
        assert!(table.contains(&format!("| {mode} |")), "{table}");
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["identical_flows"], true);
    let modes = r["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 3);
    let rows = modes[0]["flow_rows"].as_u64().unwrap();
    assert!(rows > 0);
    for m in modes {
        assert_eq!(m["flow_rows"].as_u64().unwrap(), rows, "{m}");
        let c = &m["cost_per_billion_events"];
        let parts: f64 = ["compute", "s3_requests", "broker", "orchestration"]
            .iter()
            .map(|k| c[*k].as_f64().unwrap())
            .sum();
        assert!((parts - c["total"].as_f64().unwrap()).abs() < 1e-9, "{c}");
        assert!(m["cpu_seconds"].as_f64().unwrap() > 0.0);
    }
    // What crossed the boundaries is where the split designs differ.
    assert_eq!(modes[0]["boundary_bytes"], 0);
    assert!(modes[1]["broker_messages"].as_u64().unwrap() > 0);
    assert!(modes[2]["handoff_puts"].as_u64().unwrap() >= 120_000 / 4096);
    let svg = std::fs::read_to_string(report.join("report.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("split-object-store"),
        "{svg}"
    );
    // Capture-to-durable latency is measured in every mode.
    for m in modes {
        assert!(m["latency_p99_ms"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("identical `flows/` rows: true"));
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
