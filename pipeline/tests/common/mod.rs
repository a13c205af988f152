//! Helpers shared by the integration tests: run the real binary, query its output with DuckDB.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub mod servers;
#[allow(unused_imports)]
pub use servers::*;

/// The `tcplake` binary built for this test run, as a command with a clean environment: no settings
/// from the developer's shell, and no metrics endpoint (tests run side by side; tests/admin.rs
/// covers the endpoint).
pub fn tcplake_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcplake"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TCPLAKE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("TCPLAKE_METRICS_ADDR", "off");
    cmd
}

/// Runs the `tcplake` binary built for this test run.
pub fn tcplake(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = tcplake_cmd();
    cmd.args(args);
    cmd.envs(envs.iter().copied());
    cmd.output().expect("run tcplake")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The Python interpreter that has the `duckdb` package (installed by `scripts/setup.sh`).
fn python() -> String {
    std::env::var("TCPLAKE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `sql` in DuckDB (the Python package, as users run it) and returns the rows as JSON values.
pub fn duckdb(sql: &str) -> Vec<Vec<serde_json::Value>> {
    let script = r#"
import duckdb, json, sys
# No progress bar: it goes to stdout, which carries the JSON answer.
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
rel = con.sql(sys.argv[1])
rows = rel.fetchall() if rel is not None else []  # statements such as COPY return no relation
print(json.dumps([list(r) for r in rows], default=str))
"#;
    let out = Command::new(python())
        .args(["-c", script, sql])
        .output()
        .expect("run python3 (install the test dependencies with scripts/setup.sh)");
    assert!(
        out.status.success(),
        "duckdb query failed: {sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("duckdb output is JSON")
}

/// A single integer result.
pub fn duckdb_int(sql: &str) -> i64 {
    let rows = duckdb(sql);
    let v = &rows[0][0];
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .or_else(|| v.as_f64().map(|f| f as i64))
        .unwrap_or_else(|| panic!("not an integer: {v} from {sql}"))
}

/// `read_parquet(...)` over one dataset of an output directory, Hive partitioning on.
pub fn dataset(out: &Path, name: &str) -> String {
    format!(
        "read_parquet('{}/{name}/**/*.parquet', hive_partitioning = true)",
        out.display()
    )
}

/// A synthetic monolith run of `events` events from `seed` as node `node` into `out`, plus `extra`
/// flags; it must succeed (the reference run most tests compare against).
pub fn synthetic_run(out: &Path, seed: &str, node: &str, events: u64, extra: &[&str]) -> Output {
    let events = events.to_string();
    let mut args = vec![
        "--source",
        "synthetic",
        "--seed",
        seed,
        "--node",
        node,
        "--events",
        &events,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = tcplake(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Both outputs hold the same rows of `ds`, as multisets (EXCEPT ALL both ways).
pub fn same_rows(a: &Path, b: &Path, ds: &str) {
    let (x, y) = (dataset(a, ds), dataset(b, ds));
    for (p, q) in [(&x, &y), (&y, &x)] {
        let diff = duckdb_int(&format!(
            "SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})"
        ));
        assert_eq!(diff, 0, "{ds}: rows in one output and not the other");
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Files under an output directory that are neither data (`*.parquet` in a dataset) nor commit records
/// (`_tcplake/**/*.json`): temporary files a run left behind. Empty after any run that ended.
pub fn leftovers(out: &Path) -> Vec<std::path::PathBuf> {
    files_under(out)
        .into_iter()
        .filter(|p| {
            let ext = |e: &str| p.extension().is_some_and(|x| x == e);
            let meta = p.starts_with(out.join("_tcplake"));
            !((meta && ext("json"))
                || (!meta && ext("parquet") && !p.starts_with(out.join(".staging"))))
        })
        .collect()
}

/// Number of committed files of `dataset` under an output directory: records whose data exists (a
/// record is written before its data, so a record alone is not yet a commit).
pub fn commits(out: &Path, dataset: &str) -> usize {
    files_under(&out.join("_tcplake/commits").join(dataset))
        .iter()
        .filter(|r| {
            std::fs::read(r)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    // A compacted record's rows live in the file it was moved to.
                    let key = v["moved_to"].as_str().or(v["key"].as_str())?;
                    Some(out.join(key).exists())
                })
                .unwrap_or(false)
        })
        .count()
}

/// Waits (up to a minute) until `dataset` has more than `known` commit records: a kill after this
/// lands after a commit whatever the machine's load, which fixed sleeps cannot promise.
pub fn wait_for_commit_beyond(out: &Path, dataset: &str, known: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while commits(out, dataset) <= known {
        assert!(
            std::time::Instant::now() < deadline,
            "no new {dataset} commit under {} within a minute",
            out.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A loopback port nothing listens on (for a server a test starts, or one it expects to be absent).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits up to 20 s until a server accepts connections on `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Records a fault scenario that passed, for the table `scripts/test.sh` prints after the tests
/// (one line per fault: what was done, and what the output showed afterwards).
pub fn report_fault(fault: &str, result: &str) {
    use std::io::Write;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-report.tsv");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(
        f,
        "{fault}\t{result}; 0 rows lost, 0 duplicated (== fault-free run)"
    )
    .unwrap();
}

/// The run exited with `code` and printed exactly one line, an error naming every needle (and its
/// cause once, not once per layer that passed it on).
pub fn assert_one_line_error(o: &std::process::Output, code: i32, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(code), "stderr: {}", stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {}", lines[0]);
    }
    // A cause is stated once, not repeated by every layer that passed it on.
    assert!(
        lines[0].matches("(os error").count() <= 1,
        "repeated cause: {}",
        lines[0]
    );
}

/// The run exited with status 1 and one `tcplake: error:` line naming every needle; warnings logged
/// before it (retries) are allowed. Returns that line.
pub fn assert_one_error_line(o: &std::process::Output, needles: &[&str]) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let err = stderr(o);
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("tcplake: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    for n in needles {
        assert!(errors[0].contains(n), "`{n}` not in: {err}");
    }
    errors[0].to_string()
}
