//! Real servers the integration tests start on free loopback ports: NATS JetStream (Debian's
//! nats-server) and an S3-compatible store (s3s-fs), both installed by scripts/setup.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{duckdb, duckdb_int, free_port, wait_for_port, OutputBounded};

/// A JetStream server on a free loopback port, stopped when dropped.
pub struct Nats {
    pub child: Child,
    pub port: u16,
    pub store: tempfile::TempDir,
    /// The HTTP monitoring port, if started with one ([`Nats::start_monitored`]).
    pub monitor: Option<u16>,
}

impl Nats {
    pub fn start() -> Nats {
        Self::start_with(&[])
    }

    /// A server started with extra flags (`--user u --pass p`, `--auth token`, `-c file`).
    pub fn start_with(extra: &[&str]) -> Nats {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn_with(port, store.path(), extra);
        Nats {
            child,
            port,
            store,
            monitor: None,
        }
    }

    /// A server with its HTTP monitoring endpoint on (to read consumers' ack state).
    pub fn start_monitored() -> Nats {
        Self::start_monitored_with(&[])
    }

    /// A monitored server started with extra flags.
    pub fn start_monitored_with(extra: &[&str]) -> Nats {
        let m = free_port();
        let m_arg = m.to_string();
        let mut n = Self::start_with(&[&["-m", m_arg.as_str()][..], extra].concat());
        wait_for_port(m, "nats-server monitoring");
        n.monitor = Some(m);
        n
    }

    /// Per durable consumer whose name starts with `prefix`: (stream and where it and the consumer
    /// stand, consumer, messages delivered but not acked, messages after the consumer's ack floor),
    /// from the server's `/jsz` monitoring endpoint. A consumer that acked everything has (0, 0).
    ///
    /// The second count is the stream's last sequence minus the ack floor (each stream holds only its
    /// consumers' subjects), not the server's `num_pending`: nats-server 2.9 keeps that as a running
    /// count it admits can race with deliveries.
    pub fn consumers(&self, prefix: &str) -> Vec<(String, String, u64, u64)> {
        let mut out = Vec::new();
        for (st, c) in self.consumer_details(prefix) {
            // Where the consumer and its stream stand, for a failing assertion.
            let stream = format!(
                "{} (stream state {}; consumer delivered {}, ack floor {})",
                st["name"].as_str().unwrap_or_default(),
                st["state"],
                c["delivered"],
                c["ack_floor"]
            );
            out.push((
                stream,
                c["name"].as_str().unwrap_or_default().to_string(),
                c["num_ack_pending"].as_u64().unwrap_or(u64::MAX),
                st["state"]["last_seq"]
                    .as_u64()
                    .unwrap_or(u64::MAX)
                    .saturating_sub(c["ack_floor"]["stream_seq"].as_u64().unwrap_or_default()),
            ));
        }
        out
    }

    /// Messages the durable consumers whose name starts with `prefix` were delivered again (past
    /// their ack wait), all together.
    pub fn redelivered(&self, prefix: &str) -> u64 {
        self.consumer_details(prefix)
            .iter()
            .map(|(_, c)| c["num_redelivered"].as_u64().unwrap_or_default())
            .sum()
    }

    /// The state of stream `name` (`messages`, `bytes`, ...), from `/jsz`.
    pub fn stream_state(&self, name: &str) -> serde_json::Value {
        let v = self.jsz();
        v["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|st| st["name"] == name)
            .map(|st| st["state"].clone())
            .unwrap_or_else(|| panic!("no stream {name} on the server"))
    }

    /// (stream, consumer) of every durable consumer whose name starts with `prefix`, from `/jsz`.
    fn consumer_details(&self, prefix: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
        let v = self.jsz();
        let mut out = Vec::new();
        for a in v["account_details"].as_array().into_iter().flatten() {
            for st in a["stream_detail"].as_array().into_iter().flatten() {
                for c in st["consumer_detail"].as_array().into_iter().flatten() {
                    if c["name"].as_str().unwrap_or_default().starts_with(prefix) {
                        out.push((st.clone(), c.clone()));
                    }
                }
            }
        }
        out
    }

    /// The server's `/jsz` answer: accounts, streams and consumers.
    fn jsz(&self) -> serde_json::Value {
        use std::io::{Read, Write};
        let port = self.monitor.expect("started with Nats::start_monitored");
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(
            b"GET /jsz?accounts=true&streams=true&consumers=true HTTP/1.0\r\nHost: localhost\r\n\r\n",
        )
        .unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).expect("/jsz answers JSON")
    }

    pub fn spawn(port: u16, store: &Path) -> Child {
        Self::spawn_with(port, store, &[])
    }

    fn spawn_with(port: u16, store: &Path, extra: &[&str]) -> Child {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        // JetStream reserves each stream's max_bytes against its storage limit, which by default is
        // most of the free disk: on a full build machine, streams tcplake asks for by default (1 GiB
        // each) would be refused although the tests write megabytes. A stated limit is what the
        // reservations count against. (Tests that need a small limit pass their own `-c`.)
        let conf = store.join("limits.conf");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"-c") {
            std::fs::write(&conf, "jetstream { max_file_store: 1TB }\n").unwrap();
            args.extend(["-c".to_string(), conf.to_str().unwrap().to_string()]);
        }
        let child = Command::new(bin)
            .args(&args)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (install it with scripts/setup.sh)");
        wait_for_port(port, "nats-server");
        child
    }

    /// SIGKILL (a crash, not a clean stop), down for `down_for`, then the same port and storage.
    pub fn crash_and_restart(&mut self, down_for: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.port, self.store.path());
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const KEY: &str = "AKIATEST";
pub const SECRET: &str = "secretsecret";
pub const BUCKET: &str = "tcplake-test";

/// An s3s-fs server on a free loopback port, stopped when dropped.
pub struct S3Server {
    pub child: Child,
    pub port: u16,
    pub data: tempfile::TempDir,
}

/// Purges a stream's messages below stream sequence `below` (what retention does to old messages).
pub fn purge_below(nats: &Nats, stream: &str, below: u64) {
    let script = r#"
import socket, sys, json
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
f = s.makefile("rb")
f.readline()
s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nPING\r\n')
assert f.readline().startswith(b"PONG")
body = json.dumps({"seq": int(sys.argv[3])}).encode()
s.sendall(b"SUB _INBOX.p 1\r\nPUB $JS.API.STREAM.PURGE.%s _INBOX.p %d\r\n%s\r\n" % (sys.argv[2].encode(), len(body), body))
line = f.readline()
while line and not line.startswith(b"MSG"): line = f.readline()
assert line, "nats-server closed the connection"
reply = f.readline()
assert b'"success":true' in reply, reply
"#;
    let o = Command::new("python3")
        .args([
            "-c",
            script,
            &nats.port.to_string(),
            stream,
            &below.to_string(),
        ])
        .output_bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

pub fn s3s_fs() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = home.join("bin/s3s-fs");
    // Upstream s3s-fs decides `If-None-Match` non-atomically (two writers of one Delta table could both
    // commit a version); scripts/setup.sh builds it with a patch and leaves a stamp beside it.
    let patched = std::fs::read_dir(home.join("bin")).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("s3s-fs.patch-"))
    });
    assert!(
        installed.exists() && patched,
        "{} is missing or not the patched build: run scripts/setup.sh",
        installed.display()
    );
    installed
}

impl S3Server {
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Self::spawn(data.path(), port);
        S3Server { child, port, data }
    }

    /// Kills the server (as a crash would), waits, and starts it again on the same port and data.
    pub fn outage(&mut self, down_for: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.data.path(), self.port);
    }

    pub fn spawn(data: &Path, port: u16) -> Child {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs (install it with scripts/setup.sh)");
        wait_for_port(port, "s3s-fs");
        child
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// DuckDB with httpfs loaded from the pinned PyPI package and a secret for the test server.
pub fn duckdb_s3(server: &S3Server, sql: &str) -> i64 {
    duckdb_int(&format!("{} {sql}", duckdb_s3_setup(server)))
}

/// Rows of `sql` in DuckDB with the test server's secret (for diagnostics on a failed comparison).
pub fn duckdb_s3_rows(server: &S3Server, sql: &str) -> Vec<Vec<serde_json::Value>> {
    duckdb(&format!("{} {sql}", duckdb_s3_setup(server)))
}

fn duckdb_s3_setup(server: &S3Server) -> String {
    format!(
        "LOAD '{}'; CREATE SECRET (TYPE s3, KEY_ID '{KEY}', SECRET '{SECRET}', REGION 'us-east-1', \
         ENDPOINT '127.0.0.1:{}', URL_STYLE 'path', USE_SSL false);",
        httpfs_extension().display(),
        server.port
    )
}

pub fn httpfs_extension() -> PathBuf {
    super::duckdb_extension("httpfs")
}
