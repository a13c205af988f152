//! Bad input: one clear error line naming the problem, a non-zero exit, nothing half-written.

mod common;

use common::*;

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
