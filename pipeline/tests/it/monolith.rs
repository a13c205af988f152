//! End to end: the real binary in monolith mode, its output read back with DuckDB.

use std::path::Path;

use crate::common::*;

const N: u64 = 200_000;
// Five seconds before an hour boundary, so the output spans two Hive partitions.
const START: &str = "2026-01-01T00:59:55Z";

fn run_monolith(out: &Path, extra: &[&str], envs: &[(&str, &str)]) -> serde_json::Value {
    let n = N.to_string();
    let mut args = vec![
        "--mode",
        "monolith",
        "--source",
        "synthetic",
        "--events",
        &n,
        "--seed",
        "7",
        "--start",
        START,
        "--node",
        "test-node",
        "--out",
        out.to_str().unwrap(),
        "--summary",
        "json",
    ];
    args.extend_from_slice(extra);
    let o = tcplake(&args, envs);
    assert!(o.status.success(), "tcplake failed: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).expect("summary is JSON")
}

#[test]
fn same_seed_gives_identical_flows_whatever_the_batching_and_totals_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let sa = run_monolith(&a, &[], &[]);
    // Different batch size (through the environment), a one-batch channel and tiny files.
    let sb = run_monolith(
        &b,
        &["--channel-capacity", "1", "--max-file-size", "256KiB"],
        &[("TCPLAKE_BATCH_SIZE", "333")],
    );
    assert_eq!(sa["events"], N);
    assert_eq!(sa["event_rows"], N);
    assert_eq!(sa["late_events"], 0);
    assert_eq!(sb["event_rows"], N);
    assert_eq!(sb["flows"], sa["flows"]);

    let (ea, fa, fb) = (
        dataset(&a, "events"),
        dataset(&a, "flows"),
        dataset(&b, "flows"),
    );
    // events/ holds exactly N rows, one per seq, in both runs.
    assert_eq!(duckdb_int(&format!("SELECT count(*) FROM {ea}")), N as i64);
    assert_eq!(
        duckdb_int(&format!("SELECT count(DISTINCT seq) FROM {ea}")),
        N as i64
    );
    assert_eq!(
        duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&b, "events"))),
        N as i64
    );
    // Bytes are conserved from the log to the projection; so is every event.
    let log_bytes = duckdb_int(&format!("SELECT sum(bytes) FROM {ea}"));
    let flow_bytes = duckdb_int(&format!(
        "SELECT sum(bytes_sent + bytes_received) FROM {fa}"
    ));
    assert!(log_bytes > 0);
    assert_eq!(log_bytes, flow_bytes);
    assert_eq!(
        duckdb_int(&format!("SELECT sum(events) FROM {fa}")),
        N as i64
    );
    let opened = duckdb_int(&format!(
        "SELECT count(*) FROM {ea} WHERE kind = 'state_change' AND new_state = 'ESTABLISHED'"
    ));
    assert_eq!(
        duckdb_int(&format!("SELECT sum(connections_opened) FROM {fa}")),
        opened
    );
    // Identical flow rows in both runs (as sets and counts).
    let flows = duckdb_int(&format!("SELECT count(*) FROM {fa}"));
    assert!(flows > 1_000, "{flows} flows");
    assert_eq!(duckdb_int(&format!("SELECT count(*) FROM {fb}")), flows);
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM (SELECT * FROM {fa} EXCEPT ALL SELECT * FROM {fb})"
        )),
        0
    );
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM (SELECT * FROM {fb} EXCEPT ALL SELECT * FROM {fa})"
        )),
        0
    );
    // Partitioned by date and hour (the paths stay `date=…/hour=…`), typed columns to every reader.
    let hours = duckdb(&format!(
        "SELECT DISTINCT date::VARCHAR, hour, typeof(date), typeof(hour) FROM {ea} ORDER BY 2"
    ));
    let expected: Vec<Vec<serde_json::Value>> = vec![
        vec![
            "2026-01-01".into(),
            0.into(),
            "DATE".into(),
            "INTEGER".into(),
        ],
        vec![
            "2026-01-01".into(),
            1.into(),
            "DATE".into(),
            "INTEGER".into(),
        ],
    ];
    assert_eq!(hours, expected);
    // Timestamps are microsecond UTC.
    let ts_type = duckdb(&format!(
        "SELECT typeof(window_start), typeof(ts) FROM {fa}, {ea} LIMIT 1"
    ));
    assert_eq!(
        ts_type[0],
        vec![serde_json::Value::from("TIMESTAMP WITH TIME ZONE"); 2]
    );

    // Files hold many batches and windows: run A is one file per dataset and hour, a dataset's two
    // hours in one Delta commit (files open together are committed together), and nothing else (no
    // temporary files left).
    let data = |dir: &Path| -> Vec<_> {
        files_under(dir)
            .into_iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == "parquet")
                    && !p.to_string_lossy().contains("_delta_log")
            })
            .collect()
    };
    let files_a = data(&a);
    assert_eq!(leftovers(&a), Vec::<std::path::PathBuf>::new());
    assert_eq!(files_a.len(), 4, "{files_a:?}");
    assert_eq!(sa["files"], 4);
    assert_eq!(commits(&a, "events"), 1);
    assert_eq!(commits(&a, "flows"), 1);
    // Run B rolled files at 256 KiB, and still wrote the same rows.
    assert!(data(&b).len() > 4);
    assert_eq!(leftovers(&b), Vec::<std::path::PathBuf>::new());
}

#[test]
fn config_file_and_environment_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tcplake.toml");
    let out = tmp.path().join("out");
    std::fs::write(
        &cfg,
        format!(
            "node = \"from-file\"\n[capture]\nsource = \"synthetic\"\nevents = 5000\nseed = 3\n[aggregate]\nwindow_secs = 1\n[sink]\nout = \"{}\"\n",
            out.display()
        ),
    )
    .unwrap();
    let o = tcplake(
        &["--config", cfg.to_str().unwrap(), "--summary", "json"],
        &[("TCPLAKE_EVENTS", "7000")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // The environment wins over the file; the file over the defaults.
    assert_eq!(s["events"], 7000);
    let nodes = duckdb(&format!(
        "SELECT DISTINCT node FROM {}",
        dataset(&out, "events")
    ));
    assert_eq!(nodes, vec![vec![serde_json::Value::from("from-file")]]);
    let widths = duckdb_int(&format!(
        "SELECT max(epoch(window_end) - epoch(window_start)) FROM {}",
        dataset(&out, "flows")
    ));
    assert_eq!(widths, 1);
}

/// Two nodes writing one output directory at the same time: both commit to the same two Delta tables,
/// racing for every log version, and one of them rewrites windows (stragglers folded in: its commits
/// remove files) while the other appends — delta-rs would fail such an append, as if it had read the
/// removed file. Each node's rows are exactly those of a run of its own.
#[test]
fn two_nodes_writing_one_output_at_once_each_hold_exactly_their_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    let late = tmp.path().join("late.toml");
    std::fs::write(&late, "[capture]\nlate_every = 499\nlate_by = \"30s\"\n").unwrap();
    let args = |seed: &'static str, node: &'static str, out: &Path| -> Vec<String> {
        let mut a: Vec<String> = [
            "--source",
            "synthetic",
            "--seed",
            seed,
            "--node",
            node,
            "--events",
            "500000",
            // A file a second from each: many commits, so the two writers race for versions often.
            "--rate",
            "100000",
            "--max-file-age",
            "1s",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if node == "node-a" {
            a.extend(["--config".to_string(), late.display().to_string()]);
        }
        a
    };
    let writers: Vec<_> = [("81", "node-a"), ("82", "node-b")]
        .iter()
        .map(|(seed, node)| {
            tcplake_cmd()
                .args(args(seed, node, &shared))
                .args(["--summary", "json"])
                .env("RUST_LOG", "pipeline::lake=debug")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut conflicts = 0;
    for w in writers {
        let o = w.wait_bounded().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        conflicts += stderr(&o).matches("commit conflicted").count();
    }
    eprintln!("commits tried again after a conflict: {conflicts}");
    let rewrites = files_under(&shared.join("flows").join("_delta_log"))
        .iter()
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"remove\"")))
        .count();
    assert!(rewrites > 0, "node-a rewrote windows while node-b appended");
    for (seed, node) in [("81", "node-a"), ("82", "node-b")] {
        let alone = tmp.path().join(node);
        let o = tcplake_cmd()
            .args(args(seed, node, &alone))
            .output_bounded()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        for ds in ["events", "flows"] {
            let mine = format!(
                "(SELECT * FROM {} WHERE node = '{node}')",
                dataset(&shared, ds)
            );
            let theirs = dataset(&alone, ds);
            for (p, q) in [(&mine, &theirs), (&theirs, &mine)] {
                let diff = duckdb_int(&format!(
                    "SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})"
                ));
                assert_eq!(diff, 0, "{node} {ds}: rows differ from its run alone");
            }
        }
    }
    assert!(leftovers(&shared).is_empty(), "{:?}", leftovers(&shared));
}
