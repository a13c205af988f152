//! Least privilege, tested: live capture runs without root's other powers, as documented in
//! docs/operations.md, and the modes that do not touch the kernel run as an unprivileged user.
//!
//! - uid `nobody` with exactly CAP_BPF and CAP_PERFMON captures real loopback traffic (BTF
//!   tracepoints need no tracefs, and kernel BTF is world-readable);
//! - without CAP_BPF or CAP_PERFMON it stops with an error naming them;
//! - uid 0 whose bounding set holds only CAP_BPF and CAP_PERFMON captures (no CAP_SYS_ADMIN needed);
//! - synthetic runs, replay and compact work as `nobody` with no capabilities.
//!
//! Privileges are dropped with util-linux `setpriv`, so the test itself must start as root (as CI does).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const NOBODY: &str = "65534";

/// A copy of the binary and an output directory that `nobody` can reach (tempdirs are 0700).
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_tcplake"), dir.path().join("tcplake")).unwrap();
        Sandbox { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `setpriv` args: run as `uid` with exactly `caps` (inheritable, ambient and bounding sets).
    fn command(&self, uid: &str, caps: &[&str]) -> Command {
        let set = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("setpriv");
        if uid != "0" {
            cmd.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
        }
        cmd.args([
            format!("--inh-caps={set}"),
            format!("--ambient-caps={set}"),
            format!("--bounding-set={set}"),
            "--".into(),
        ]);
        cmd.arg(self.path("tcplake"));
        for (k, _) in std::env::vars() {
            if k.starts_with("TCPLAKE_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }
}

fn skipped() -> bool {
    if std::env::var_os("TCPLAKE_SKIP_EBPF_TESTS").is_some() {
        return true;
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privilege tests drop root's powers and must start as root (TCPLAKE_SKIP_EBPF_TESTS=1 skips)"
    );
    false
}

/// Live capture of `connections` loopback connections to a fresh port, as `uid` with `caps`.
fn capture(sb: &Sandbox, name: &str, uid: &str, caps: &[&str], connections: usize) -> Output {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let admin = free_port();
    let out = sb.path(name);
    let mut child = sb
        .command(uid, caps)
        .args(["--source", "ebpf", "--port", &port.to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{admin}")])
        .args(["--summary", "json", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    // Ready = programs attached; a capture that cannot attach exits instead.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_bounded().unwrap();
        }
        let ready = TcpStream::connect(("127.0.0.1", admin))
            .and_then(|mut s| {
                s.write_all(b"GET /readyz HTTP/1.1\r\n\r\n")?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "capture never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"world").unwrap();
        }
    });
    for _ in 0..connections {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
    }
    server.join().unwrap();
    // Let the last close reach the ring buffer, then stop the run as an operator would.
    std::thread::sleep(Duration::from_secs(1));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait_bounded().unwrap()
}

fn opened_connections(out: &Path) -> i64 {
    duckdb_int(&format!(
        "SELECT sum(connections_opened) FROM {}",
        dataset(out, "flows")
    ))
}

#[test]
fn capture_needs_only_bpf_and_perfmon() {
    if skipped() {
        return;
    }
    let sb = Sandbox::new();
    // Both ends of each loopback connection are seen: 2 openings per connection.
    let o = capture(&sb, "nobody", NOBODY, &["bpf", "perfmon"], 5);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(opened_connections(&sb.path("nobody")), 10);
    // Who is talking needs nothing more: the cgroup hierarchy is world-readable, and new cgroups
    // come from a BTF tracepoint like the rest.
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM {} WHERE cgroup_path IS NULL OR role IS NULL OR role = 'unknown'",
            dataset(&sb.path("nobody"), "events")
        )),
        0
    );
    let owner = std::fs::metadata(sb.path("nobody")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), 65534);

    let o = capture(&sb, "root-uid", "0", &["bpf", "perfmon"], 3);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(opened_connections(&sb.path("root-uid")), 6);

    let o = capture(&sb, "no-bpf", NOBODY, &["perfmon"], 0);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("CAP_BPF"), "{}", stderr(&o));
    let o = capture(&sb, "no-perfmon", NOBODY, &["bpf"], 0);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("CAP_PERFMON"), "{}", stderr(&o));
}

#[test]
fn everything_but_live_capture_runs_unprivileged() {
    if skipped() {
        return;
    }
    let sb = Sandbox::new();
    let (rec, rebuilt) = (sb.path("rec"), sb.path("rebuilt"));
    let run = |args: &[&str]| {
        let o = sb.command(NOBODY, &[]).args(args).output_bounded().unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    run(&[
        "--source",
        "synthetic",
        "--events",
        "100000",
        "--metrics-addr",
        "127.0.0.1:0",
        "--out",
        rec.to_str().unwrap(),
    ]);
    run(&[
        "replay",
        "--from",
        rec.to_str().unwrap(),
        "--to",
        rebuilt.to_str().unwrap(),
    ]);
    run(&["compact", "--out", rebuilt.to_str().unwrap()]);
    same_rows(&rec, &rebuilt, "flows");
}
