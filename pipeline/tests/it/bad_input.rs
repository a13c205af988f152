//! Bad input: one clear error line naming the problem, a non-zero exit, nothing half-written.

use crate::common::*;

#[test]
fn unknown_config_key_is_named_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[capture]\nevents = 10\n[sink]\noutput = \"x\"\n").unwrap();
    let out = tmp.path().join("out");
    let o = tcplake(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(&o, 2, &["bad.toml", "line 4", "unknown field `output`"]);
    assert!(!out.exists(), "nothing may be written on a config error");
}

#[test]
fn bad_values_are_rejected_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--window", "0"], "invalid window `0`"),
        (
            vec!["--max-file-size", "lots"],
            "invalid max file size `lots`",
        ),
        (
            vec!["--max-file-age", "soon"],
            "invalid max file age `soon`",
        ),
        (
            vec!["--start", "2026-13-01T00:00:00Z"],
            "invalid start time",
        ),
        (vec!["--node", "a b"], "invalid node name `a b`"),
    ] {
        let mut all = args.clone();
        all.extend(["--out", out_s]);
        let o = tcplake(&all, &[]);
        assert_one_line_error(&o, 2, &[needle]);
    }
    // Values clap itself rejects (not a number) also fail with exit 2 and name the flag.
    let o = tcplake(&["--events", "many", "--out", out_s], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).lines().next().unwrap().contains("--events"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn missing_config_file_is_named() {
    let o = tcplake(&["--config", "/nonexistent/tcplake.toml"], &[]);
    assert_one_line_error(
        &o,
        2,
        &["cannot read config file `/nonexistent/tcplake.toml`"],
    );
}

#[test]
fn unwritable_output_directory_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a directory is needed: fails even for root.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("data");
    let o = tcplake(
        &[
            "--source",
            "synthetic",
            "--events",
            "1000",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(
        &o,
        1,
        &["cannot write to output directory", "not-a-dir/data"],
    );
    assert_eq!(files_under(tmp.path()), vec![blocker]);
}

/// Settings that would do nothing, values that would overflow, and outputs that are not what they look
/// like: each is one line naming the problem (and where the value came from), exit 2, nothing written.
#[test]
fn misconfigurations_are_refused_with_one_line_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let file_s = file.to_str().unwrap();
    let cfg = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let tiny_stream = cfg("tiny.toml", "[broker]\nmax_bytes = \"1KiB\"\n");
    let port_in_file = cfg("port.toml", "[capture]\nport = 443\n");
    let synthetic = ["--source", "synthetic", "--out", out_s];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // An S3 URL that is not quite one must not become a local directory named `S3:`.
        (
            vec!["--out", "S3://bkt/p"],
            vec!["invalid output `S3://bkt/p`", "lowercase"],
        ),
        (
            vec!["--out", "s3:/bkt/p"],
            vec!["invalid output `s3:/bkt/p`", "s3://bucket"],
        ),
        (
            vec!["--out", "gs://bkt/p"],
            vec!["`gs:` is not a supported store"],
        ),
        // A late horizon shorter than the allowed lateness: windows would close before they are written.
        (
            [
                &synthetic[..],
                &["--allowed-lateness", "30", "--late-horizon", "10"],
            ]
            .concat(),
            vec!["--late-horizon", "between the allowed lateness (30 s)"],
        ),
        // Settings the run would ignore.
        (
            [&synthetic[..], &["--port", "80"]].concat(),
            vec!["--port has no effect here", "synthetic"],
        ),
        (
            [&synthetic[..], &["--pid", "1"]].concat(),
            vec!["--pid has no effect here"],
        ),
        (
            [&synthetic[..], &["--cgroup", "1"]].concat(),
            vec!["--cgroup has no effect here"],
        ),
        (
            [&synthetic[..], &["--broker", "nats://127.0.0.1:4222"]].concat(),
            vec!["--broker has no effect here", "monolith"],
        ),
        (
            vec![
                "--mode",
                "capture",
                "--source",
                "synthetic",
                "--broker",
                "nats://h:4222",
                "--handoff",
                out_s,
            ],
            vec![
                "--handoff has no effect here",
                "choose the broker or the hand-off",
            ],
        ),
        (
            vec![
                "--mode",
                "aggregate",
                "--broker",
                "nats://h:4222",
                "--events",
                "5",
            ],
            vec!["--events has no effect here", "runs no capture"],
        ),
        (
            vec![
                "--mode",
                "capture",
                "--broker",
                "nats://h:4222",
                "--source",
                "synthetic",
                "--out",
                out_s,
            ],
            vec!["--out has no effect here"],
        ),
        (
            [&synthetic[..], &["--s3-endpoint", "http://127.0.0.1:9"]].concat(),
            vec!["--s3-endpoint has no effect here", "s3://"],
        ),
        (
            [&synthetic[..], &["--config", &port_in_file]].concat(),
            vec!["key `capture.port` has no effect here"],
        ),
        // Values that would overflow at run time.
        (
            [&synthetic[..], &["--duration", "18446744073709551615s"]].concat(),
            vec!["invalid duration"],
        ),
        (
            [&synthetic[..], &["--duration", "300000000000y"]].concat(),
            vec!["invalid duration", "must be between"],
        ),
        (
            [&synthetic[..], &["--max-file-age", "1000y"]].concat(),
            vec!["invalid max file age", "must be between"],
        ),
        (
            vec![
                "--mode",
                "sink",
                "--broker",
                "nats://h:4222",
                "--out",
                out_s,
                "--max-file-age",
                "18446744073709551615s",
            ],
            vec!["invalid max file age"],
        ),
        (
            vec![
                "--mode",
                "capture",
                "--source",
                "synthetic",
                "--broker",
                "nats://h:4222",
                "--config",
                &tiny_stream,
            ],
            vec![
                "invalid broker max bytes `1KiB`",
                "tiny.toml",
                "broker.max_bytes",
                "at least",
            ],
        ),
        // Credentials belong in the credential chain, and are not echoed.
        (
            [
                &["--out", "s3://bkt/p"][..],
                &["--s3-endpoint", "http://user:hunter2pw@127.0.0.1:9000"],
            ]
            .concat(),
            vec![
                "invalid S3 endpoint `http://***@127.0.0.1:9000`",
                "credential chain",
            ],
        ),
        // An output that is a file.
        (
            vec!["--source", "synthetic", "--out", file_s],
            vec!["is a file, not a directory"],
        ),
        (
            vec!["compact", "--out", file_s],
            vec!["is a file, not a directory"],
        ),
        // compact: a date that does not exist, a size of nothing.
        (
            vec!["compact", "--out", out_s, "--partition", "date=2027-13-45"],
            vec!["invalid partition `date=2027-13-45`"],
        ),
        (
            vec!["compact", "--out", out_s, "--target-size", "0"],
            vec!["invalid target size `0`"],
        ),
        (
            vec!["--window", "5", "compact", "--out", out_s],
            vec!["--window has no effect here", "compact"],
        ),
        (
            vec!["bench", "--out", out_s],
            vec!["--out has no effect here", "bench"],
        ),
    ];
    for (args, needles) in cases {
        for check in [true, false] {
            let mut all = args.clone();
            if check {
                all.push("--check-config");
            }
            let o = tcplake(&all, &[]);
            assert!(
                !stderr(&o).contains("hunter2pw"),
                "{all:?} echoed a secret: {}",
                stderr(&o)
            );
            assert_eq!(o.status.code(), Some(2), "{all:?}: {}", stderr(&o));
            assert_one_line_error(&o, 2, &needles);
        }
    }
    assert!(
        !out.exists(),
        "nothing may be written on a configuration error"
    );
    assert!(!std::path::Path::new("S3:").exists() && !std::path::Path::new("s3:").exists());
}

/// A bad value in an environment variable is named by the variable the user set, not by a flag they
/// never typed; a bad file value by its file and key.
#[test]
fn errors_name_where_the_value_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let o = tcplake(&["--out", out_s], &[("TCPLAKE_EVENTS", "many")]);
    assert_one_line_error(
        &o,
        2,
        &["invalid value `many` in TCPLAKE_EVENTS", "--events"],
    );
    let o = tcplake(&["--out", out_s], &[("TCPLAKE_MODE", "sideways")]);
    assert_one_line_error(&o, 2, &["TCPLAKE_MODE", "expected one of"]);
    let o = tcplake(
        &["--source", "synthetic", "--out", out_s],
        &[("TCPLAKE_WINDOW", "0")],
    );
    assert_one_line_error(&o, 2, &["invalid window `0` (from TCPLAKE_WINDOW)"]);
    let o = tcplake(
        &["--out", out_s, "--source", "synthetic"],
        &[("TCPLAKE_PORT", "443")],
    );
    assert_one_line_error(&o, 2, &["TCPLAKE_PORT has no effect here"]);
    let cfg = tmp.path().join("w.toml");
    std::fs::write(&cfg, "[aggregate]\nwindow_secs = 0\n").unwrap();
    let o = tcplake(
        &[
            "--source",
            "synthetic",
            "--out",
            out_s,
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_line_error(
        &o,
        2,
        &[
            "invalid window `0` (from `",
            "w.toml` key `aggregate.window_secs`)",
        ],
    );
    let o = tcplake(
        &["--source", "synthetic", "--out", out_s, "--window", "0"],
        &[],
    );
    assert_one_line_error(&o, 2, &["invalid window `0` (from --window)"]);
    assert!(!out.exists());
}

/// `tcplake replay` only reads its source and never writes into it.
#[test]
fn replay_into_its_own_source_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("rec");
    synthetic_run(&rec, "3", "n", 20_000, &[]);
    let before = files_under(&rec);
    let rec_s = rec.to_str().unwrap();
    let same = format!("{rec_s}/./");
    for extra in [vec![], vec!["--window", "60"]] {
        for to in [rec_s, same.as_str()] {
            let mut args = vec!["replay", "--from", rec_s, "--to", to];
            args.extend(extra.iter().copied());
            let o = tcplake(&args, &[]);
            assert_one_line_error(
                &o,
                2,
                &[
                    "is the recorded log being replayed",
                    "never rewrites its source",
                ],
            );
        }
    }
    assert_eq!(files_under(&rec), before);
}

/// The metrics endpoint says where it listens when the system chose the port, and warns when it
/// listens on every interface.
#[test]
fn the_metrics_endpoint_shows_a_chosen_port_and_warns_on_every_interface() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = |addr: &str| {
        tcplake(
            &[
                "--source",
                "synthetic",
                "--events",
                "1000",
                "--out",
                out.to_str().unwrap(),
            ],
            &[("TCPLAKE_METRICS_ADDR", addr)],
        )
    };
    let o = run("127.0.0.1:0");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.contains("a port the system chose"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("127.0.0.1:") && !line.contains("127.0.0.1:0 "),
        "{line}"
    );
    let o = run("0.0.0.0:0");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("listens on every interface"),
        "{}",
        stderr(&o)
    );
}

/// A small deterministic generator (xorshift): the same cases on every run, and another seed through
/// `TCPLAKE_PROPTEST_SEED` to explore.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Random combinations of flags and values (good, bad and absurd): no combination panics, every
/// refusal is exit 2 with one line, and every combination `--check-config` accepts also runs to
/// completion (no configuration error surfaces only at run time).
#[test]
fn random_flag_combinations_never_panic_and_check_config_predicts_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("rec");
    synthetic_run(&rec, "2", "n", 3_000, &[]);
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let replay = format!("replay:{}", rec.display());
    let missing = format!("replay:{}", tmp.path().join("missing").display());
    let file_s = file.to_str().unwrap().to_string();
    let pool: Vec<(&str, Vec<&str>)> = vec![
        (
            "--source",
            vec!["synthetic", "synthetic", &replay, &missing],
        ),
        ("--events", vec!["1", "3000", "0", "many"]),
        ("--seed", vec!["1", "42", "-1"]),
        (
            "--start",
            vec![
                "2026-01-01T00:00:00Z",
                "1969-12-31T00:00:00Z",
                "yesterday",
                "9999-12-31T23:00:00Z",
            ],
        ),
        ("--window", vec!["1", "10", "0", "86400", "86401"]),
        ("--allowed-lateness", vec!["0", "5", "100000"]),
        ("--batch-size", vec!["1", "4096", "0", "2000000"]),
        ("--channel-capacity", vec!["1", "16", "0"]),
        (
            "--max-file-size",
            vec!["1KiB", "128MiB", "0", "100GiB", "lots"],
        ),
        (
            "--max-file-age",
            vec!["1s", "5m", "0s", "1000y", "18446744073709551615s"],
        ),
        (
            "--duration",
            vec!["2s", "0s", "18446744073709551615s", "300000000000y"],
        ),
        ("--rate", vec!["1000000", "0"]),
        ("--node", vec!["n1", "a b", "x.y", ""]),
        ("--port", vec!["80"]),
        ("--pid", vec!["1"]),
        ("--since", vec!["2026-01-01T00:00:00Z", "soon"]),
        ("--until", vec!["2030-01-01T00:00:00Z"]),
        ("--summary", vec!["json", "text", "xml"]),
        ("--metrics-addr", vec!["off", "127.0.0.1:0", "nowhere"]),
        ("--out", vec!["S3://x/y", "s3:/x", &file_s, "s3://ab"]),
        ("--mode", vec!["monolith", "sink", "upside-down"]),
        ("--include-self", vec![]),
        ("--s3-endpoint", vec!["http://127.0.0.1:9", "nope"]),
        ("--broker", vec!["nats://127.0.0.1:4222"]),
        ("--shard", vec!["0/2", "3/2"]),
    ];
    let seed = std::env::var("TCPLAKE_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    let mut rng = Rng(seed);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..120 {
        let out = tmp.path().join(format!("o{case}"));
        let mut args: Vec<String> = vec![
            "--source".into(),
            "synthetic".into(),
            "--events".into(),
            "3000".into(),
        ];
        let mut has_out = false;
        for _ in 0..(rng.next() % 5) {
            let (flag, values) = &pool[(rng.next() % pool.len() as u64) as usize];
            args.push(flag.to_string());
            if !values.is_empty() {
                args.push(rng.pick(values).to_string());
            }
            has_out |= *flag == "--out";
        }
        if !has_out {
            args.extend(["--out".into(), out.to_str().unwrap().into()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut check = argv.clone();
        check.push("--check-config");
        let c = tcplake(&check, &[]);
        let err = stderr(&c);
        assert!(
            !err.contains("panicked"),
            "seed {seed} case {case} {args:?}: {err}"
        );
        match c.status.code() {
            Some(0) => {
                accepted += 1;
                let o = run_with_timeout(&argv, std::time::Duration::from_secs(120));
                assert!(
                    o.status.success(),
                    "seed {seed} case {case}: --check-config accepted {args:?} but the run failed: {}",
                    stderr(&o)
                );
            }
            Some(2) => {
                refused += 1;
                let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
                // clap prints usage after its own errors; tcplake's are one line.
                if lines[0].starts_with("tcplake: error:") {
                    assert_eq!(lines.len(), 1, "seed {seed} case {case} {args:?}: {err}");
                } else {
                    assert!(
                        lines[0].starts_with("error:"),
                        "seed {seed} case {case} {args:?}: {err}"
                    );
                }
            }
            other => panic!("seed {seed} case {case} {args:?}: exit {other:?}: {err}"),
        }
    }
    // The generator explores both sides.
    assert!(
        accepted >= 10 && refused >= 10,
        "accepted {accepted}, refused {refused}"
    );
}

/// Runs tcplake, killing it (and failing) if it has not finished within `limit`.
fn run_with_timeout(args: &[&str], limit: std::time::Duration) -> std::process::Output {
    let mut child = tcplake_cmd()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let o = child.wait_bounded().unwrap();
            panic!("{args:?} did not finish within {limit:?}: {}", stderr(&o));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_bounded().unwrap()
}
