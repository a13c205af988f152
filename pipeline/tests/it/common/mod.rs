//! Helpers shared by the integration tests: run the real binary, query its output with DuckDB.

#![allow(dead_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod servers;
#[allow(unused_imports)]
pub use servers::*;

/// The `tcplake` binary built for this test run, as a command with a clean environment: no settings
/// from the developer's shell, and no metrics endpoint (tests run side by side; tests/it/admin.rs
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
    cmd.output_bounded().expect("run tcplake")
}

/// The longest any process a test starts may run. A hung process is killed and fails its test with
/// what it printed, instead of stalling the whole suite until CI's own limit, which reports nothing
/// about the cause. Generous: the slowest process here (the S3 outage run) needs about 90 s.
pub const PROCESS_LIMIT: Duration = Duration::from_secs(480);

/// [`Command::output`] bounded by [`PROCESS_LIMIT`].
pub trait OutputBounded {
    fn output_bounded(&mut self) -> std::io::Result<Output>;
}

impl OutputBounded for Command {
    fn output_bounded(&mut self) -> std::io::Result<Output> {
        let what: String = format!("{self:?}").chars().take(300).collect();
        let child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        wait_within(child, PROCESS_LIMIT, &what)
    }
}

/// [`Child::wait_with_output`] bounded by [`PROCESS_LIMIT`].
pub trait WaitBounded {
    fn wait_bounded(self) -> std::io::Result<Output>;
}

impl WaitBounded for Child {
    fn wait_bounded(self) -> std::io::Result<Output> {
        let what = format!("process {}", self.id());
        wait_within(self, PROCESS_LIMIT, &what)
    }
}

/// Waits for `child` at most `limit`; past it, kills the process and panics with its output.
pub fn wait_within(mut child: Child, limit: Duration, what: &str) -> std::io::Result<Output> {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    drop(child.stdin.take());
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + limit;
    let killed = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status: child.wait()?,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if killed {
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        panic!(
            "{what} still ran after {} s and was killed\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
            limit.as_secs(),
            tail(&output.stdout),
            tail(&output.stderr)
        );
    }
    Ok(output)
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

/// The path of a DuckDB extension installed from PyPI (`duckdb-extension-<name>`, pinned to DuckDB's
/// version by scripts/setup.sh): DuckDB's own download is not reachable here, so it is loaded by path.
pub fn duckdb_extension(name: &str) -> std::path::PathBuf {
    let code = format!(
        "import duckdb_extension_{name} as m, os, glob; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'extensions', '*', '{name}.duckdb_extension'))[0])"
    );
    let out = Command::new(python())
        .args(["-c", &code])
        .output_bounded()
        .expect("python3");
    assert!(
        out.status.success(),
        "duckdb-extension-{name} missing: run scripts/setup.sh"
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs `sql` in DuckDB (the Python package, as users run it, with the Delta extension loaded) and
/// returns the rows as JSON values.
pub fn duckdb(sql: &str) -> Vec<Vec<serde_json::Value>> {
    static DELTA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let delta = DELTA.get_or_init(|| duckdb_extension("delta"));
    let script = r#"
import duckdb, json, sys
# No progress bar: it goes to stdout, which carries the JSON answer.
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
con.execute("LOAD '" + sys.argv[2] + "'")
rel = con.sql(sys.argv[1])
rows = rel.fetchall() if rel is not None else []  # statements such as COPY return no relation
print(json.dumps([list(r) for r in rows], default=str))
"#;
    let out = Command::new(python())
        .args(["-c", script, sql, delta.to_str().unwrap()])
        .output_bounded()
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

/// One dataset (a Delta table) of an output directory, as DuckDB reads it: `delta_scan(...)` sees
/// exactly the committed rows of the current version.
pub fn dataset(out: &Path, name: &str) -> String {
    format!("delta_scan('{}/{name}')", out.display())
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
    same_rows_but(a, b, ds, &[]);
}

/// The columns of schema version 3 (who is talking), which older outputs did not record.
pub const IDENTITY_COLUMNS: &[&str] = &pipeline::event::schema::IDENTITY_FIELDS;

/// [`same_rows`] over every column but `except`.
pub fn same_rows_but(a: &Path, b: &Path, ds: &str, except: &[&str]) {
    let (x, y) = (dataset(a, ds), dataset(b, ds));
    // By name, in one order: a table an older tcplake made has the later columns at its end.
    let mut names: Vec<String> = duckdb(&format!("DESCRIBE SELECT * FROM {x}"))
        .into_iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .filter(|c| !except.contains(&c.as_str()))
        .collect();
    names.sort();
    let cols = names.join(", ");
    for (p, q) in [(&x, &y), (&y, &x)] {
        let diff = duckdb_int(&format!(
            "SELECT count(*) FROM (SELECT {cols} FROM {p} EXCEPT ALL SELECT {cols} FROM {q})"
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

/// Files under an output directory that are neither table files (data `*.parquet` and the Delta log of
/// `events/` and `flows/`) nor tcplake's own records (`_tcplake/**/*.json`): temporary files a run left
/// behind. Empty after any run that ended.
pub fn leftovers(out: &Path) -> Vec<std::path::PathBuf> {
    files_under(out)
        .into_iter()
        .filter(|p| {
            let ext = |e: &str| p.extension().is_some_and(|x| x == e);
            let meta = p.starts_with(out.join("_tcplake"));
            let table = ["events", "flows"].iter().any(|t| {
                p.starts_with(out.join(t).join("_delta_log"))
                    || (p.starts_with(out.join(t)) && ext("parquet"))
            });
            !((meta && ext("json")) || table)
        })
        .collect()
}

/// The data files the current version of a table of an output references (paths relative to the
/// table), as the deltalake Python package (delta-rs) lists them.
pub fn table_files(out: &Path, dataset: &str) -> Vec<String> {
    let script = r#"
import sys, json, deltalake, pyarrow
adds = deltalake.DeltaTable(sys.argv[1]).get_add_actions(flatten=True)
print(json.dumps(pyarrow.table(adds).column("path").to_pylist()))
"#;
    let o = Command::new(python())
        .args(["-c", script, out.join(dataset).to_str().unwrap()])
        .output_bounded()
        .expect("python3 with deltalake (scripts/setup.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Commits of `dataset` under an output directory that added data (Delta log entries with an `add`).
pub fn commits(out: &Path, dataset: &str) -> usize {
    let log = out.join(dataset).join("_delta_log");
    let Ok(entries) = std::fs::read_dir(&log) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter(|e| {
            std::fs::read_to_string(e.path())
                .map(|t| t.contains("\"add\""))
                .unwrap_or(false)
        })
        .count()
}

/// Waits (up to a minute) until `dataset` has more than `known` commits, written by `writer`: a kill
/// after this lands after a commit whatever the machine's load, which fixed sleeps cannot promise. A
/// writer that exits first fails the wait at once, with what it printed.
pub fn wait_for_commit_beyond(out: &Path, dataset: &str, known: usize, writer: &mut Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while commits(out, dataset) <= known {
        if let Some(status) = writer.try_wait().unwrap() {
            // It may have committed just before exiting.
            if commits(out, dataset) > known {
                return;
            }
            let mut said = String::new();
            if let Some(mut e) = writer.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut said);
            }
            panic!(
                "the writer of {} exited ({status}) before a new {dataset} commit: {said}",
                out.display()
            );
        }
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
