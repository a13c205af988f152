//! The S3 sink against a real S3-compatible server (s3s-fs on loopback, installed by scripts/setup.sh),
//! read back with DuckDB's httpfs straight from the bucket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn run_to(out: &str, endpoint: &str, secret: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--source",
        "synthetic",
        "--seed",
        "5",
        "--node",
        "s3-node",
        "--summary",
        "json",
        "--out",
        out,
        "--s3-endpoint",
        endpoint,
        "--s3-region",
        "us-east-1",
    ];
    args.extend_from_slice(extra);
    tcplake(
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", KEY),
            ("AWS_SECRET_ACCESS_KEY", secret),
        ],
    )
}

/// What a run wrote under `prefix` in the bucket, read by DuckDB, equals a local run of the same seed
/// (made here): exactly `n` distinct events, flow rows identical both ways, bytes conserved.
fn assert_bucket_matches_local_run(
    server: &S3Server,
    prefix: &str,
    tmp: &Path,
    seed: &str,
    node: &str,
    n: i64,
) {
    let local = tmp.join("local");
    synthetic_run(&local, seed, node, n as u64, &[]);
    let local = local.as_path();
    let remote = |ds: &str| format!("delta_scan('s3://{BUCKET}/{prefix}/{ds}')");
    let (events, flows, local_flows) = (remote("events"), remote("flows"), dataset(local, "flows"));
    let q = |sql: String| duckdb_s3(server, &sql);
    assert_eq!(q(format!("SELECT count(*) FROM {events}")), n);
    assert_eq!(q(format!("SELECT count(DISTINCT seq) FROM {events}")), n);
    for (a, b) in [(&flows, &local_flows), (&local_flows, &flows)] {
        assert_eq!(
            q(format!(
                "SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})"
            )),
            0
        );
    }
    assert_eq!(
        q(format!("SELECT count(*) FROM {flows}")),
        duckdb_int(&format!("SELECT count(*) FROM {local_flows}"))
    );
    assert_eq!(
        q(format!("SELECT sum(bytes) FROM {events}")),
        duckdb_int(&format!(
            "SELECT sum(bytes_sent + bytes_received) FROM {local_flows}"
        ))
    );
}

#[test]
fn monolith_to_s3_reads_back_identical_to_local() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    // 1.5 M events: the event file passes the multipart threshold, the flow file goes up in one PUT.
    let o = run_to(
        &format!("s3://{BUCKET}/runs/a"),
        &server.endpoint(),
        SECRET,
        &[
            "--events",
            "1500000",
            "--spool-dir",
            spool.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(s["out"], format!("s3://{BUCKET}/runs/a"));
    let req = &s["s3_requests"];
    assert!(
        req["upload_part"].as_u64().unwrap() >= 2,
        "multipart used: {s}"
    );
    // One file per dataset: the event file in parts, the flow file in one PUT; each table created
    // (version 0) and committed to (version 1) with one conditional PUT of its log entry; the output's
    // id; and the startup probe that the store honours conditional writes (two PUTs and a DELETE).
    // The Delta log's reads (LIST of `_delta_log/`, GET of its entries) are counted like every request.
    assert_eq!(req["complete_multipart"], 1, "{s}");
    assert_eq!(req["put"], 1 + 4 + 1 + 2, "{s}");
    assert_eq!(req["delete"], 1, "{s}");
    // The log's share, counted on its own too: the four conditional PUTs of its versions.
    assert_eq!(s["delta_log_requests"]["put"], 4, "{s}");
    assert_eq!(req["head"], 1, "{s}");
    for op in ["list", "get"] {
        let n = req[op].as_u64().unwrap();
        assert!(n > 0 && n < 100, "{op}: {s}");
    }
    assert_eq!(s["files"], 2, "{s}");
    // The spool holds nothing once everything is committed.
    assert_eq!(files_under(&spool), Vec::<PathBuf>::new());

    assert_bucket_matches_local_run(&server, "runs/a", tmp.path(), "5", "s3-node", 1_500_000);
}

#[test]
fn wrong_credentials_and_missing_bucket_fail_with_one_clear_line() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let spool = spool.to_str().unwrap();
    let o = run_to(
        &format!("s3://{BUCKET}/x"),
        &server.endpoint(),
        "wrong-secret",
        &["--events", "10", "--spool-dir", spool],
    );
    assert_one_line_error(&o, 1, &["denied", "credentials", BUCKET]);
    let o = run_to(
        "s3://no-such-bucket/x",
        &server.endpoint(),
        SECRET,
        &["--events", "10", "--spool-dir", spool],
    );
    assert_one_line_error(&o, 1, &["bucket `no-such-bucket` does not exist"]);
    assert_eq!(files_under(Path::new(spool)), Vec::<PathBuf>::new());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The store disappears for 30 s mid-run: tcplake retries, holds memory flat while capture waits on the
/// full edges, and completes with every row in the bucket once the store is back.
#[test]
fn store_outage_mid_run_is_ridden_out_with_nothing_lost() {
    const N: u64 = 600_000;
    let mut server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let n = N.to_string();
    let child = tcplake_cmd()
        .args([
            "--source",
            "synthetic",
            "--seed",
            "9",
            "--node",
            "outage",
            "--events",
            &n,
        ])
        .args([
            "--rate",
            "40000",
            "--max-file-age",
            "1s",
            "--summary",
            "json",
        ])
        .args([
            "--out",
            &format!("s3://{BUCKET}/outage"),
            "--s3-endpoint",
            &server.endpoint(),
        ])
        .args([
            "--s3-region",
            "us-east-1",
            "--spool-dir",
            spool.to_str().unwrap(),
        ])
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let pid = child.id();
    let rss_before = rss_kib(pid);
    let stop_sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = std::sync::Arc::clone(&stop_sampling);
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        })
    };
    server.outage(Duration::from_secs(60));
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let o = child.wait_bounded().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(
        s["s3_retries"].as_u64().unwrap() > 0,
        "the outage was noticed: {s}"
    );
    assert!(
        peak < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {peak} KiB during the outage"
    );
    // Nothing lost: every event is in the bucket, and the flows match a local run of the same seed.
    assert_bucket_matches_local_run(&server, "outage", tmp.path(), "9", "outage", N as i64);
    report_fault(
        "monolith → S3: S3 server down 60 s mid-run",
        "ridden out with retries, memory bounded",
    );
}

/// Files s3s-fs keeps for multipart uploads in progress (`.upload-<id>.json`, `.upload_id-<id>.part-N`).
fn multipart_leftovers(server: &S3Server) -> Vec<String> {
    std::fs::read_dir(server.data.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect()
}

#[test]
fn kill_9_mid_upload_then_restart_loses_and_duplicates_nothing() {
    // 15 s at the paced rate; event files of ~2 M events (> 16 MiB: multipart) close every 5 s.
    const N: u64 = 6_000_000;
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let n = N.to_string();
    let out = format!("s3://{BUCKET}/crash");
    let endpoint = server.endpoint();
    // Every event file goes up in parts, however fast this machine is today (file sizes follow the
    // rate the run reaches before --max-file-age closes them).
    let config = tmp.path().join("multipart.toml");
    std::fs::write(&config, "[sink]\ns3_multipart_threshold = \"1MiB\"\n").unwrap();
    let args = |paced: Option<u64>| {
        let mut a: Vec<String> = [
            "--source",
            "synthetic",
            "--seed",
            "21",
            "--node",
            "crash",
            "--events",
            &n,
            "--max-file-age",
            "4s",
            "--summary",
            "json",
            "--out",
            &out,
            "--s3-endpoint",
            &endpoint,
            "--s3-region",
            "us-east-1",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(rate) = paced {
            a.extend(["--rate".into(), rate.to_string()]);
        }
        a
    };
    // Wait until flows have been committed, then until an event file is going up in parts; kill -9.
    // On a loaded machine the poller can miss every upload of a run: then the attempt is discarded
    // and repeated, slower (more time per upload), instead of failing on timing.
    let bucket = server.data.path().join(BUCKET).join("crash");
    let mut killed = false;
    for rate in [400_000u64, 150_000, 50_000] {
        let mut child = tcplake_cmd()
            .args(args(Some(rate)))
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut flows_seen = false;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "run {rate}/s never finished");
            flows_seen = flows_seen
                || files_under(&bucket.join("flows"))
                    .iter()
                    .any(|p| p.extension().is_some_and(|e| e == "parquet"));
            // An upload under way on the server, and journalled by tcplake (which it does right
            // after the server answers; a kill inside that gap is the documented limitation).
            let journalled = files_under(&spool.join(".uploads"))
                .iter()
                .any(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"));
            if flows_seen && journalled && !multipart_leftovers(&server).is_empty() {
                child.kill().unwrap();
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.wait().unwrap();
        if killed {
            break;
        }
        eprintln!("run at {rate} events/s ended before an upload was caught; again, slower");
        let _ = std::fs::remove_dir_all(&bucket);
        let _ = std::fs::remove_dir_all(&spool);
    }
    assert!(killed, "never caught a multipart upload in progress");
    assert!(
        !multipart_leftovers(&server).is_empty(),
        "killed mid-upload"
    );

    let o = tcplake(
        &args(None).iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            ("AWS_ACCESS_KEY_ID", KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let resumed = s["resumed_at_seq"].as_u64().unwrap();
    assert!(
        resumed > 0 && resumed < N,
        "resumed after the last commit: {s}"
    );
    assert_eq!(s["events"].as_u64().unwrap(), N - resumed, "{s}");
    assert!(
        s["replayed_events"].as_u64().unwrap() > 0,
        "open windows rebuilt from the log: {s}"
    );
    assert!(
        multipart_leftovers(&server).is_empty(),
        "{:?}",
        multipart_leftovers(&server)
    );
    assert!(files_under(&spool).is_empty(), "{:?}", files_under(&spool));

    assert_bucket_matches_local_run(&server, "crash", tmp.path(), "21", "crash", N as i64);
    report_fault(
        "monolith → S3: kill -9 mid multipart upload, restart",
        "resumed after the last commit, no upload left open",
    );
}

/// Loopback connections for about three seconds.
const TRAFFIC: &str = "
import socket, threading, time
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(64)
def serve():
    while True:
        c, _ = srv.accept(); c.recv(100); c.close()
threading.Thread(target=serve, daemon=True).start()
for _ in range(30):
    s = socket.create_connection(srv.getsockname()); s.sendall(b'x' * 100); s.close(); time.sleep(0.1)
";

/// Live capture writing to S3 does not capture its own uploads (`--exclude-self`, the default), while
/// the store's side of the same connections is captured; `--include-self` captures both. Needs root.
#[test]
fn live_capture_excludes_its_own_s3_traffic_unless_asked() {
    if std::env::var_os("TCPLAKE_SKIP_EBPF_TESTS").is_some() {
        return;
    }
    let server = S3Server::start();
    let s3s_pid = server.child.id();
    let tmp = tempfile::tempdir().unwrap();
    for (run, include_self) in [("excluded", false), ("included", true)] {
        let out = format!("s3://{BUCKET}/self-{run}");
        let mut args = vec![
            "--source",
            "ebpf",
            "--duration",
            "6s",
            "--max-file-age",
            "1s",
        ];
        args.extend(["--summary", "json", "--out", &out, "--s3-endpoint"]);
        let endpoint = server.endpoint();
        args.push(&endpoint);
        let spool = tmp.path().join(run);
        args.extend([
            "--s3-region",
            "us-east-1",
            "--spool-dir",
            spool.to_str().unwrap(),
        ]);
        if include_self {
            args.push("--include-self");
        }
        let child = tcplake_cmd()
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tcplake_pid = child.id();
        // Some traffic to capture, so files fill and upload (every second) while capture runs.
        std::thread::sleep(Duration::from_secs(1));
        let traffic = Command::new("python3")
            .args(["-c", TRAFFIC])
            .status()
            .unwrap();
        assert!(traffic.success());
        let o = child.wait_bounded().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let events = format!("delta_scan('s3://{BUCKET}/self-{run}/events')");
        let port = server.port;
        let own = duckdb_s3(
            &server,
            &format!("SELECT count(*) FROM {events} WHERE pid = {tcplake_pid}"),
        );
        let store_side = duckdb_s3(
            &server,
            &format!("SELECT count(*) FROM {events} WHERE pid = {s3s_pid} AND local_port = {port}"),
        );
        assert!(
            store_side > 0,
            "{run}: the uploads were seen from the store's side"
        );
        if include_self {
            assert!(own > 0, "--include-self captures tcplake's own connections");
        } else {
            assert_eq!(own, 0, "tcplake captured its own S3 traffic");
        }
    }
}

/// `tcplake compact` then `tcplake vacuum` on a bucket: the merged upload and the Delta commit that
/// swaps it for its sources (a conditional PUT), then the sources deleted, all through the S3 API; the
/// table still holds every row, and a replay of it rebuilds its flows.
#[test]
fn compaction_in_a_bucket_keeps_every_row() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("s3://{BUCKET}/compacted");
    let n = 200_000i64;
    let args = [
        "--events",
        "200000",
        "--start",
        "2026-01-01T00:59:55Z",
        "--max-file-size",
        "16KiB",
    ];
    let o = run_to(&out, &server.endpoint(), SECRET, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let hour0 = server
        .data
        .path()
        .join(BUCKET)
        .join("compacted/events/date=2026-01-01/hour=00");
    let parquet = || {
        files_under(&hour0)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
    };
    assert!(parquet() > 5);
    let creds = [
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ];
    // tcplake with the test server's endpoint and credentials.
    let with_s3 = |args: &[&str]| {
        let endpoint = server.endpoint();
        let mut a = args.to_vec();
        a.extend(["--s3-endpoint", &endpoint, "--s3-region", "us-east-1"]);
        tcplake(&a, &creds)
    };
    let o = with_s3(&["compact", "--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("into 1 files"), "{}", stdout(&o));
    // The sources stay in the bucket for readers of older versions until a vacuum.
    let o = with_s3(&["vacuum", "--out", &out, "--retention", "0s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(parquet(), 1);
    let events = format!("delta_scan('s3://{BUCKET}/compacted/events')");
    assert_eq!(
        duckdb_s3(&server, &format!("SELECT count(*) FROM {events}")),
        n
    );
    assert_eq!(
        duckdb_s3(
            &server,
            &format!("SELECT count(DISTINCT seq) FROM {events}")
        ),
        n
    );

    let rebuilt = tmp.path().join("rebuilt");
    let o = with_s3(&["replay", "--from", &out, "--to", rebuilt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        format!("delta_scan('s3://{BUCKET}/compacted/flows')"),
        format!("delta_scan('{}/flows')", rebuilt.display()),
    );
    for (p, q) in [(&a, &b), (&b, &a)] {
        assert_eq!(
            duckdb_s3(
                &server,
                &format!("SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})")
            ),
            0
        );
    }
}

/// A command with no AWS credentials anywhere: no variables, no profile files (HOME is empty).
fn without_aws_credentials(cmd: &mut Command, home: &Path) {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("none"));
}

/// Wrong endpoints and missing credentials are each one line within seconds: not half a minute of
/// retries, not a debug dump, not a misleading "bucket does not exist".
#[test]
fn missing_credentials_tls_mismatch_and_a_non_s3_server_are_named_at_once() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let out = format!("s3://{BUCKET}/p");
    let args = |endpoint: &str| -> Vec<String> {
        [
            "--source",
            "synthetic",
            "--events",
            "100",
            "--out",
            &out,
            "--s3-endpoint",
            endpoint,
            "--spool-dir",
            spool.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let timed = |mut cmd: Command| {
        let started = Instant::now();
        let o = cmd.output_bounded().unwrap();
        (o, started.elapsed())
    };

    let mut cmd = tcplake_cmd();
    cmd.args(args(&server.endpoint()));
    without_aws_credentials(&mut cmd, tmp.path());
    let (o, took) = timed(cmd);
    assert_one_line_error(&o, 1, &["no AWS credentials found", "AWS_ACCESS_KEY_ID"]);
    assert!(took < Duration::from_secs(20), "took {took:?}");

    let with_keys = |cmd: &mut Command| {
        cmd.env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET);
    };
    let mut cmd = tcplake_cmd();
    cmd.args(args(&format!("https://127.0.0.1:{}", server.port)));
    with_keys(&mut cmd);
    let (o, took) = timed(cmd);
    assert_one_line_error(&o, 1, &["TLS with https://127.0.0.1:", "use http://"]);
    assert!(took < Duration::from_secs(20), "took {took:?}");

    // A web server that is not S3 (Python's, serving an empty directory).
    let port = free_port();
    let mut web = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "python http.server");
    let mut cmd = tcplake_cmd();
    cmd.args(args(&format!("http://127.0.0.1:{port}")));
    with_keys(&mut cmd);
    let (o, took) = timed(cmd);
    let _ = web.kill();
    let _ = web.wait();
    assert_one_line_error(
        &o,
        1,
        &["does not answer like an S3 store", "--s3-endpoint"],
    );
    assert!(!stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// The AWS secret key and session token never reach the output, at any log level (the SDK's own trace
/// output included).
#[test]
fn aws_secrets_never_reach_any_log_level() {
    const TOKEN: &str = "FQoGZXIvYXdzEJr-planted-session-token-7f3a";
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    for level in ["error", "warn", "info", "debug", "trace"] {
        let out = format!("s3://{BUCKET}/level-{level}");
        let o = tcplake(
            &[
                "--source",
                "synthetic",
                "--events",
                "2000",
                "--out",
                &out,
                "--s3-endpoint",
                &server.endpoint(),
                "--spool-dir",
                spool.to_str().unwrap(),
                "--summary",
                "json",
            ],
            &[
                ("AWS_ACCESS_KEY_ID", KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET),
                ("AWS_SESSION_TOKEN", TOKEN),
                ("RUST_LOG", level),
            ],
        );
        assert!(o.status.success(), "{level}: {}", stderr(&o));
        let all = format!("{}{}", stdout(&o), stderr(&o));
        if level == "trace" {
            assert!(
                all.len() > 10_000,
                "trace logs something: {} bytes",
                all.len()
            );
        }
        assert!(!all.contains(SECRET), "{level}: the secret key was logged");
        assert!(
            !all.contains(TOKEN),
            "{level}: the session token was logged"
        );
    }
}

/// Two runs writing to one bucket at once, sharing the default spool directory: neither aborts the
/// other's multipart uploads (each only cleans up after processes that are gone).
#[test]
fn concurrent_runs_sharing_a_spool_directory_leave_each_other_alone() {
    const N: u64 = 3_000_000;
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("shared-spool");
    let config = tmp.path().join("multipart.toml");
    std::fs::write(&config, "[sink]\ns3_multipart_threshold = \"1MiB\"\n").unwrap();
    let args = |node: &str, events: u64, rate: &str| -> Vec<String> {
        let out = format!("s3://{BUCKET}/{node}");
        [
            "--source",
            "synthetic",
            "--seed",
            "9",
            "--node",
            node,
            "--events",
            &events.to_string(),
            "--rate",
            rate,
            "--max-file-age",
            "3s",
            "--summary",
            "json",
            "--out",
            &out,
            "--s3-endpoint",
            &server.endpoint(),
            "--spool-dir",
            spool.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let keys = [
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ];
    let long = tcplake_cmd()
        .args(args("long", N, "300000"))
        .envs(keys)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let journal = spool.join(".uploads");
    let uploading = || {
        files_under(&journal)
            .iter()
            .any(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
    };
    // Short runs start (and clean up their spool) while the long run has uploads under way.
    let mut overlapped = 0;
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !uploading() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        overlapped += usize::from(uploading());
        let short = args(&format!("short{i}"), 200_000, "2000000");
        let o = tcplake(&short.iter().map(String::as_str).collect::<Vec<_>>(), &keys);
        assert!(o.status.success(), "short run {i}: {}", stderr(&o));
    }
    assert!(overlapped > 0, "no short run started during an upload");
    let o = long.wait_bounded().unwrap();
    assert!(o.status.success(), "the long run: {}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(s["event_rows"], N, "{s}");
    assert!(
        multipart_leftovers(&server).is_empty(),
        "{:?}",
        multipart_leftovers(&server)
    );
}

/// Two nodes write one output in the bucket at the same time (two writers on each Delta table), and
/// one of them is stopped gracefully twice inside a 120 s window and rerun: each node's rows are
/// exactly those of a run of its own that was never stopped, and `flows/` is the projection of
/// `events/` (a replay of the bucket's log into a local directory gives the same rows).
#[test]
fn two_nodes_on_one_bucket_output_with_graceful_restarts_keep_every_node_exact() {
    const N: &str = "600000";
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("s3://{BUCKET}/shared");
    let endpoint = server.endpoint();
    let bucket = server.data.path().join(BUCKET).join("shared");
    let args = |seed: &str, node: &str, paced: bool| {
        let mut a = vec![
            "--source",
            "synthetic",
            "--seed",
            seed,
            "--node",
            node,
            "--events",
            N,
            "--window",
            "120",
            "--max-file-age",
            "1s",
            "--summary",
            "json",
            "--out",
            &out,
            "--s3-endpoint",
            &endpoint,
            "--s3-region",
            "us-east-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
        a.extend([
            "--spool-dir".into(),
            tmp.path().join(node).display().to_string(),
        ]);
        if paced {
            a.extend(["--rate".into(), "100000".into()]);
        }
        a
    };
    let spawn = |a: Vec<String>| {
        tcplake_cmd()
            .args(a)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both nodes start at once: each may be the one that creates the output.
    let other = spawn(args("72", "node-b", true));
    // Node-a's own events commits (node-b commits to the same log).
    let commits_of_a = || {
        files_under(&bucket.join("events").join("_delta_log"))
            .iter()
            .filter(|p| {
                std::fs::read_to_string(p)
                    .is_ok_and(|t| t.contains("\"appId\":\"tcplake/events/node-a\""))
            })
            .count()
    };
    for _ in 0..2 {
        let known = commits_of_a();
        let mut child = spawn(args("71", "node-a", true));
        let deadline = Instant::now() + Duration::from_secs(60);
        while commits_of_a() <= known {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let o = child.wait_bounded().unwrap();
                panic!(
                    "no node-a commit within a minute ({}): {}",
                    o.status,
                    stderr(&o)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let o = child.wait_bounded().unwrap();
        assert!(o.status.success(), "SIGTERM stops cleanly: {}", stderr(&o));
    }
    let last = spawn(args("71", "node-a", false)).wait_bounded().unwrap();
    assert!(last.status.success(), "{}", stderr(&last));
    let s: serde_json::Value = serde_json::from_str(stdout(&last).trim()).unwrap();
    assert!(s["resumed_at_seq"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["late_events"], 0, "{s}");
    let o = other.wait_bounded().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Each node against a run of its own that was never stopped.
    let remote = |ds: &str| format!("delta_scan('s3://{BUCKET}/shared/{ds}')");
    for (seed, node) in [("71", "node-a"), ("72", "node-b")] {
        let alone = tmp.path().join(format!("alone-{node}"));
        synthetic_run(&alone, seed, node, N.parse().unwrap(), &["--window", "120"]);
        for ds in ["events", "flows"] {
            let (mine, theirs) = (
                format!("(SELECT * FROM {} WHERE node = '{node}')", remote(ds)),
                dataset(&alone, ds),
            );
            let diff = |p: &str, q: &str, what: &str| {
                duckdb_s3_rows(
                    &server,
                    &format!(
                        "SELECT {what} FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q}) t"
                    ),
                )
            };
            let (extra, missing) = (
                diff(&mine, &theirs, "count(*)"),
                diff(&theirs, &mine, "count(*)"),
            );
            if extra[0][0] != 0 || missing[0][0] != 0 {
                // Keep what the nodes wrote for a post-mortem and show a sample of the difference.
                let kept =
                    std::env::temp_dir().join(format!("tcplake-two-nodes-{}", std::process::id()));
                let _ = Command::new("cp")
                    .arg("-a")
                    .arg(&bucket)
                    .arg(&kept)
                    .status();
                let _ = Command::new("cp")
                    .arg("-a")
                    .arg(tmp.path())
                    .arg(kept.join("local"))
                    .status();
                let sample =
                    |p: &str, q: &str| diff(p, q, "t.*").into_iter().take(8).collect::<Vec<_>>();
                panic!(
                    "{node} {ds}: rows differ from its undisturbed run: {} only in the bucket {:?}, \
                     {} only in the undisturbed run {:?}; the bucket and the local runs are kept in {}",
                    extra[0][0],
                    sample(&mine, &theirs),
                    missing[0][0],
                    sample(&theirs, &mine),
                    kept.display()
                );
            }
        }
    }
    // And the bucket's flows are the projection of its log, node by node.
    for node in ["node-a", "node-b"] {
        let replayed = tmp.path().join(format!("replayed-{node}"));
        let o = tcplake(
            // Settings after the subcommand, as users write them.
            &[
                "replay",
                "--from",
                &out,
                "--to",
                replayed.to_str().unwrap(),
                "--window",
                "120",
                "--node",
                node,
                "--s3-endpoint",
                &endpoint,
                "--s3-region",
                "us-east-1",
            ],
            &[
                ("AWS_ACCESS_KEY_ID", KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let mine = format!("(SELECT * FROM {} WHERE node = '{node}')", remote("flows"));
        let rebuilt = dataset(&replayed, "flows");
        for (p, q) in [(&mine, &rebuilt), (&rebuilt, &mine)] {
            let diff = duckdb_s3(
                &server,
                &format!("SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})"),
            );
            assert_eq!(diff, 0, "{node}: flows are not the projection of the log");
        }
    }
    report_fault(
        "monolith → S3: two nodes on one output at once, one SIGTERMed twice inside a 120 s window",
        "each node == its undisturbed run, flows == replay of the bucket's log",
    );
}
