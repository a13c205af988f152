//! The admin endpoint of a running tcplake: `/metrics` parses as OpenMetrics text (checked with the
//! Prometheus Python client's OpenMetrics parser) and its counters grow; `/readyz` turns ready once
//! the stages run; SIGTERM then stops the run in bounded time with everything committed. A busy or
//! malformed address is a clear error; `--log-json` logs one JSON object per line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// `GET path` on loopback: (status code, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Sample values by series, parsed by `prometheus_client.openmetrics.parser` (fails on malformed
/// exposition).
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_bounded().unwrap();
    assert!(
        o.status.success(),
        "not valid OpenMetrics text (install prometheus-client with scripts/setup.sh): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn metrics_readiness_and_a_bounded_graceful_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = tcplake_cmd()
        .args([
            "--source",
            "synthetic",
            "--events",
            "50000000",
            "--rate",
            "100000",
            "--max-file-age",
            "1s",
            "--summary",
            "json",
            "--out",
            out.to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match get(port, "/readyz") {
            Some((200, body)) => {
                assert_eq!(body, "ready\n");
                break;
            }
            Some((503, body)) => assert!(body.starts_with("not ready: "), "{body}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(port, "/healthz").unwrap(), (200, "ok\n".to_string()));
    assert_eq!(get(port, "/nope").unwrap().0, 404);

    let (code, first) = get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let first = parse_prometheus(&first);
    wait_for_commit_beyond(&out, "events", 1, &mut child);
    let second = parse_prometheus(&get(port, "/metrics").unwrap().1);
    let events = "tcplake_capture_events_total{}";
    assert!(second[events] > first[events], "{first:?} {second:?}");
    assert!(second["tcplake_sink_files_total{dataset=events}"] >= 1.0);
    assert_eq!(second["tcplake_ready{}"], 1.0);
    for series in [
        "tcplake_capture_kernel_drops_total{}",
        "tcplake_aggregate_late_events_total{}",
        "tcplake_edge_queue_depth{edge=events_to_sink}",
        "tcplake_s3_requests_total{op=put}",
        "tcplake_s3_request_duration_seconds_bucket{le=+Inf,op=put}",
        "tcplake_errors_total{kind=broker_message_dead_lettered}",
    ] {
        assert!(second.contains_key(series), "{series} missing: {second:?}");
    }

    // SIGTERM: the paced run (8 minutes of events) stops at once, drains, commits, exits 0.
    let stop = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_bounded().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stop.elapsed() < Duration::from_secs(30),
        "shutdown took {:?}",
        stop.elapsed()
    );
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let captured = summary["events"].as_i64().unwrap();
    assert!(captured > 0 && captured < 50_000_000);
    assert_eq!(
        duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "events"))),
        captured
    );
    assert_eq!(
        duckdb_int(&format!(
            "SELECT sum(events) FROM {}",
            dataset(&out, "flows")
        )) + summary["late_events"].as_i64().unwrap(),
        captured
    );
    assert_eq!(leftovers(&out), Vec::<std::path::PathBuf>::new());
    assert!(
        get(port, "/healthz").is_none(),
        "endpoint outlived the process"
    );
}

#[test]
fn busy_or_malformed_addresses_and_json_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let run = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut args = vec![
            "--source",
            "synthetic",
            "--events",
            "20000",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        tcplake(&args, envs)
    };
    let o = run(&["--metrics-addr", &addr], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("metrics address {addr} is in use")),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "a run that could not start wrote output");
    let o = run(&["--metrics-addr", "localhost"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected IP:PORT"), "{}", stderr(&o));
    assert!(!out.exists());

    let o = run(
        &["--log-json", "--metrics-addr", "127.0.0.1:0"],
        &[("RUST_LOG", "info")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<&str> = std::str::from_utf8(&o.stderr).unwrap().lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}
