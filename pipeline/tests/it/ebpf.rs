//! Live capture on real loopback traffic (needs root: it loads eBPF programs; CI runs as root).
//!
//! A server and a client process move exactly known byte counts over a port chosen for the test; some
//! connections end with RST. tcplake captures with `--port`, then DuckDB checks the flow table against
//! what the peers did, including which processes did it. A second test drops packets with nftables in a
//! network namespace of its own and checks retransmits against the namespace's kernel counters.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::*;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tcp_peer.py");

fn require_root() {
    if std::env::var_os("TCPLAKE_SKIP_EBPF_TESTS").is_some() {
        return;
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "eBPF tests load kernel programs and need root (set TCPLAKE_SKIP_EBPF_TESTS=1 to skip them)"
    );
}

fn skipped() -> bool {
    std::env::var_os("TCPLAKE_SKIP_EBPF_TESTS").is_some()
}

/// A free port below the kernel's ephemeral range, a different one on each call: the capture filters
/// on it, and the other tests running in this process open connections whose local ports come from
/// that range, so none of their traffic can match the filter.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        low > 11_000,
        "ephemeral ports start at {low}: no room below them"
    );
    let span = low - 10_000;
    let seed = (std::process::id() % u32::from(span)) as u16;
    loop {
        let i = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(i < span, "no free port below the ephemeral range");
        let port = 10_000 + seed.wrapping_add(i) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The flags of a monolith capturing connections on `port` into `out`.
fn monolith_args(out: &Path, port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "--source",
        "ebpf",
        "--port",
        &port,
        "--window",
        "60",
        "--node",
        "ebpf-test",
        "--summary",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// A running `tcplake --source ebpf`, attached and ready.
struct Capture {
    /// Taken by [`Capture::stop`]; killed when dropped before (a failing test leaves no probes
    /// attached, nor a process holding its cgroups).
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    /// What it logged before it had attached.
    startup: Vec<String>,
    /// The port it filters on, and the network namespace the peers run in (if not this one).
    port: u16,
    netns: Option<String>,
}

impl Capture {
    /// A monolith capturing connections on `port` into `out`.
    fn start(out: &Path, port: u16, extra: &[&str]) -> Capture {
        let mut args = monolith_args(out, port);
        args.extend(extra.iter().map(|a| a.to_string()));
        Capture::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `tcplake ARGS` (an ebpf source), once it has attached its programs.
    fn spawn(args: &[&str]) -> Capture {
        Capture::spawn_with(tcplake_cmd(), args)
    }

    /// `cmd ARGS`, a command that execs `tcplake ARGS` (an ebpf source), once it has attached.
    fn spawn_with(mut cmd: Command, args: &[&str]) -> Capture {
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcplake");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut startup = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("eBPF programs attached") => break,
                Ok(line) if line.contains("error") => panic!("tcplake failed to start: {line}"),
                Ok(line) => startup.push(line),
                Err(e) => panic!("tcplake did not attach its probes: {e}"),
            }
        }
        let port = args
            .iter()
            .position(|a| *a == "--port")
            .and_then(|i| args.get(i + 1))
            .and_then(|p| p.parse().ok())
            .expect("an ebpf test capture filters on a --port");
        Capture {
            child: Some(child),
            stderr: rx,
            startup,
            port,
            netns: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGINT once every state change of the port's connections has happened, then the end-of-run
    /// summary (a stopping capture drains the ring buffer and sends all it holds).
    fn stop(mut self) -> serde_json::Value {
        let (port, netns) = (self.port, self.netns.clone());
        let settled =
            std::panic::catch_unwind(move || wait_for_sockets_settled(port, netns.as_deref()));
        if let Err(e) = settled {
            // Not left running with its probes attached (see Drop).
            std::panic::resume_unwind(e);
        }
        let ok = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let child = self.child.take().expect("stopped once");
        let o = child.wait_bounded().unwrap();
        let errors: Vec<String> = self
            .stderr
            .try_iter()
            .filter(|l| l.contains("ERROR") || l.contains("error:"))
            .collect();
        assert!(
            o.status.success(),
            "tcplake exited with {}: {errors:?}",
            o.status
        );
        serde_json::from_str(stdout(&o).trim()).expect("summary is JSON")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (up to 30 s) until no socket on `port` is in a state that will still change: nothing but
/// TIME_WAIT is left (a socket enters it with its last state change), so the kernel has reported
/// every state change of the test's connections. Under packet loss a closing handshake takes several
/// retransmission timeouts; a fixed pause could stop the capture before it.
fn wait_for_sockets_settled(port: u16, netns: Option<&str>) {
    const TIME_WAIT: &str = "06";
    let suffix = format!(":{port:04X}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "cat"]);
                c
            }
            None => Command::new("cat"),
        };
        let o = cmd
            .args(["/proc/net/tcp", "/proc/net/tcp6"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        // An empty answer (a failed `ip netns exec`) must not pass for "settled".
        assert!(
            o.status.success() && text.contains("local_address"),
            "reading the socket tables: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let open: Vec<&str> = text
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3
                    && (f[1].ends_with(&suffix) || f[2].ends_with(&suffix))
                    && f[3] != TIME_WAIT
            })
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sockets on port {port} still changing state after 30 s: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peer(netns: Option<&str>, args: &[String]) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    cmd.arg(PEER)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 peer")
}

fn wait_for_line(child: &mut Child, want: &str) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "peer exited before {want}"
        );
        if line.trim() == want {
            return out;
        }
    }
}

fn finish(mut child: Child) {
    let status = child.wait().unwrap();
    assert!(status.success(), "peer failed: {status}");
}

/// A peer's arguments (tests/support/tcp_peer.py); `rsts` only for the client.
fn peer_args(role: &str, port: u16, conns: u64, req: u64, resp: u64, rsts: u64) -> Vec<String> {
    let mut v = vec![
        role.to_string(),
        port.to_string(),
        conns.to_string(),
        req.to_string(),
        resp.to_string(),
    ];
    if role == "client" {
        v.push(rsts.to_string());
    }
    v
}

/// The cgroup v2 path of process `pid` (`0::/path` in /proc/PID/cgroup).
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from))
        .expect("the process is in the cgroup v2 hierarchy")
}

/// The cgroup2 mount point, read from /proc/mounts (hybrid hosts mount it under a subdirectory).
fn cgroup2_mount() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .expect("a cgroup2 hierarchy is mounted")
}

/// Cgroup directories made for a test, removed (innermost first) when it ends.
struct Cgroups {
    mount: std::path::PathBuf,
    made: Vec<std::path::PathBuf>,
}

impl Cgroups {
    /// Makes `path` (from the hierarchy's root) and any parent it lacks; returns its directory.
    fn make(&mut self, path: &str) -> std::path::PathBuf {
        let mut dir = self.mount.clone();
        for part in path.trim_start_matches('/').split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
                self.made.push(dir.clone());
            }
        }
        dir
    }

    /// Removes `dir` (its processes exited and were reaped): the kernel may report it busy for a
    /// moment after the last one left, so this waits (up to 10 s) until it is not.
    fn remove(&mut self, dir: &Path) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = std::fs::remove_dir(dir) {
            assert!(
                std::time::Instant::now() < deadline,
                "cannot remove {}: {e}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.made.retain(|d| d != dir);
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // As in `remove`: busy for a moment after the last process left (up to 5 s each).
        for d in self.made.iter().rev() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(d).is_err()
                && d.exists()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A peer started inside cgroup directory `cgroup` (it moves itself in before it execs).
fn peer_in(cgroup: &Path, args: &[String]) -> Child {
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec python3 \"$@\"",
        cgroup.display()
    );
    Command::new("sh")
        .args(["-c", &script, "sh", PEER])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 peer")
}

/// A DuckDB integer (JSON number, or a string for HUGEINT sums).
fn num(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| v.as_str().unwrap().parse().unwrap())
}

#[test]
fn loopback_connections_bytes_resets_and_owners_are_exact() {
    require_root();
    if skipped() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (states, _) = exact_loopback(tmp.path(), None);
    // Every state change is recorded: the closing handshake's too.
    for s in ["FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK"] {
        assert!(states.iter().any(|x| x == s), "{s} in {states:?}");
    }
}

/// A server that accepts and closes without moving a byte is still named as the connections' owner:
/// they inherit the listener's owner when they are born, not at their first send or receive.
#[test]
fn accepted_connections_are_owned_by_the_listener_before_any_data() {
    require_root();
    if skipped() {
        return;
    }
    const CONNS: u64 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let capture = Capture::start(tmp.path(), port, &[]);
    let args = |role: &str| peer_args(role, port, CONNS, 0, 0, 0);
    let mut server = peer(None, &args("server"));
    let _server_out = wait_for_line(&mut server, "READY");
    let server_pid = server.id();
    finish(peer(None, &args("client")));
    finish(server);
    let summary = capture.stop();
    assert_eq!(summary["kernel_drops"], 0, "{summary}");
    let flows = dataset(tmp.path(), "flows");
    let rows = duckdb(&format!(
        "SELECT pid, comm, sum(connections_opened), sum(bytes_sent + bytes_received) FROM {flows} \
         WHERE local_port = {port} GROUP BY ALL"
    ));
    assert_eq!(rows.len(), 1, "one owner on the server side: {rows:?}");
    assert_eq!(
        (num(&rows[0][0]), rows[0][1].as_str().unwrap()),
        (u64::from(server_pid), "tl-server"),
        "{rows:?}"
    );
    assert_eq!((num(&rows[0][2]), num(&rows[0][3])), (CONNS, 0), "{rows:?}");
}

/// A capture that sees only a cgroup namespace's view of the hierarchy (a container run without the
/// host's /sys/fs/cgroup) cannot read the paths of cgroups that exist before it starts: walked there,
/// they would read relative to its own cgroup, which would be `/`, the host's root. It says so in one
/// warning and leaves those paths empty, never wrong; a cgroup made after it started is still named in
/// full, from the kernel's report.
#[test]
fn a_capture_seeing_a_cgroup_namespace_says_so_and_records_no_wrong_path() {
    require_root();
    if skipped() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let root = format!("/tcplake-test-{}-{port}-ns.slice", std::process::id());
    let mount = cgroup2_mount();
    let mut cgroups = Cgroups {
        mount: mount.clone(),
        made: Vec::new(),
    };
    let capture_dir = cgroups.make(&format!("{root}/capture.scope"));
    // Inside the namespace's view: walked there, its path would read `/early.service`.
    let early_dir = cgroups.make(&format!("{root}/capture.scope/early.service"));
    // Into a cgroup of its own, then a cgroup namespace rooted there with that view mounted over the
    // host's (in a mount namespace of its own: the host's mount is untouched), then tcplake.
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec unshare --cgroup --mount sh -c \
         'umount \"$0\" && mount -t cgroup2 none \"$0\" && exec \"$@\"' '{}' \"$@\"",
        capture_dir.display(),
        mount.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh", env!("CARGO_BIN_EXE_tcplake")])
        .env("TCPLAKE_METRICS_ADDR", "off");
    let args = monolith_args(tmp.path(), port);
    let capture = Capture::spawn_with(cmd, &args.iter().map(String::as_str).collect::<Vec<_>>());
    // Said once, when the hierarchy is first read (just after the programs are attached).
    let warning = "is a cgroup namespace's view";
    let mut seen = capture.startup.clone();
    while !seen.iter().any(|l| l.contains(warning)) {
        match capture.stderr.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no warning that paths cannot be read: {seen:?}"),
        }
    }

    let mut server = peer_in(&early_dir, &peer_args("server", port, 2, 100, 200, 0));
    let _server_out = wait_for_line(&mut server, "READY");
    let late_cg = format!("{root}/late.scope");
    let late_dir = cgroups.make(&late_cg);
    finish(peer_in(
        &late_dir,
        &peer_args("client", port, 2, 100, 200, 0),
    ));
    finish(server);
    seen.extend(capture.stderr.try_iter());
    let summary = capture.stop();
    assert_eq!(summary["kernel_drops"], 0, "{summary}");
    assert_eq!(
        seen.iter().filter(|l| l.contains(warning)).count(),
        1,
        "{seen:?}"
    );

    let events = dataset(tmp.path(), "events");
    let rows = duckdb(&format!(
        "SELECT comm, coalesce(cgroup_path, '<null>'), count(*) FROM {events} GROUP BY ALL ORDER BY 1"
    ));
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("tl-client".to_string(), late_cg),
            ("tl-server".to_string(), "<null>".to_string()),
        ],
        "{rows:?}"
    );
}

/// Who is talking, on both sides of every connection: a server in a systemd service's cgroup, a client
/// in a Kubernetes container's (the kubelet's systemd-driver layout, made after capture started), and
/// a client whose cgroup was made and removed while the capture was stopped, so that only the kernel's
/// report of the cgroup's creation can name it. Every event and flow row carries its role and the
/// cgroup's path, container id, pod uid and systemd unit.
#[test]
fn container_pod_and_unit_are_named_on_both_sides_even_for_a_removed_cgroup() {
    require_root();
    if skipped() {
        return;
    }
    const UID: &str = "0c7a8f2e-5b1d-4d3e-9f60-1a2b3c4d5e6f";
    const ID: &str = "4f1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcdef";
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // Under a root of the test's own, so nothing of the host's is touched.
    let root = format!("/tcplake-test-{}-{port}.slice", std::process::id());
    let server_cg = format!("{root}/system.slice/tl-web.service");
    let pod = format!(
        "{root}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        UID.replace('-', "_")
    );
    let container_cg = format!("{pod}/cri-containerd-{ID}.scope");
    let gone_cg = format!("{root}/system.slice/tl-job.scope");
    let mut cgroups = Cgroups {
        mount: cgroup2_mount(),
        made: Vec::new(),
    };
    let server_dir = cgroups.make(&server_cg);

    let capture = Capture::start(tmp.path(), port, &[]);
    let mut server = peer_in(&server_dir, &peer_args("server", port, 5, 100, 200, 0));
    let _server_out = wait_for_line(&mut server, "READY");
    // Made after the capture started.
    let container_dir = cgroups.make(&container_cg);
    finish(peer_in(
        &container_dir,
        &peer_args("client", port, 3, 100, 200, 0),
    ));
    // Made, used and removed while the capture is stopped: when it reads these events, the cgroup no
    // longer exists to be looked up.
    let pid = capture.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let gone_dir = cgroups.make(&gone_cg);
    finish(peer_in(
        &gone_dir,
        &peer_args("client", port, 2, 100, 200, 0),
    ));
    cgroups.remove(&gone_dir);
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    finish(server);
    let summary = capture.stop();
    assert_eq!(summary["kernel_drops"], 0, "{summary}");

    let events = dataset(tmp.path(), "events");
    let flows = dataset(tmp.path(), "flows");
    let expected = [
        // (side, cgroup, role, container_id, pod_uid, systemd_unit, connections)
        (
            "local_port",
            &server_cg,
            "server",
            "",
            "",
            "tl-web.service",
            5,
        ),
        ("remote_port", &container_cg, "client", ID, UID, "", 3),
        ("remote_port", &gone_cg, "client", "", "", "tl-job.scope", 2),
    ];
    let rows = duckdb(&format!(
        "SELECT CASE WHEN local_port = {port} THEN 'local_port' ELSE 'remote_port' END, cgroup_path, \
         role, coalesce(container_id, ''), coalesce(pod_uid, ''), coalesce(systemd_unit, ''), \
         sum(connections_opened) FROM {flows} GROUP BY ALL ORDER BY 1, 7 DESC"
    ));
    let got: Vec<(String, String, String, String, String, String, u64)> = rows
        .iter()
        .map(|r| {
            let s = |i: usize| r[i].as_str().unwrap_or("<null>").to_string();
            (s(0), s(1), s(2), s(3), s(4), s(5), num(&r[6]))
        })
        .collect();
    let want: Vec<(String, String, String, String, String, String, u64)> = expected
        .iter()
        .map(|(a, b, c, d, e, f, n)| {
            let t = |s: &str| s.to_string();
            (t(a), t(b), t(c), t(d), t(e), t(f), *n)
        })
        .collect();
    assert_eq!(got, want);
    // Every event names them too: none without a path or a role.
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM {events} WHERE cgroup_path IS NULL OR role IS NULL OR role = 'unknown'"
        )),
        0
    );
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(DISTINCT (cgroup_path, role, container_id, pod_uid, systemd_unit)) FROM {events}"
        )),
        3
    );
}

/// The admin endpoint's `/metrics` text (empty if it does not answer yet).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

const FAKE_KUBE_API: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/fake_kube_api.py"
);

/// A pod of the node `node` as the API server lists it.
fn kube_pod(
    uid: &str,
    name: &str,
    namespace: &str,
    node: &str,
    owner: serde_json::Value,
) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    if owner["kind"] == "ReplicaSet" {
        let hash = owner["name"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .to_string();
        labels.insert("pod-template-hash".into(), hash.into());
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels,
                     "ownerReferences": [owner]},
        "spec": {"nodeName": node, "containers": [{"name": "main"}]}
    })
}

/// Kubernetes names from the API server's watch of the node's pods, on both sides of connections
/// between two pods' containers: one pod listed when capture starts (a Deployment's), one that the
/// watch adds later (a Job's). No cluster exists here: `tests/support/fake_kube_api.py` serves the
/// list and watch requests kube-runtime makes, with these pods, and a pod of another node that the
/// node's field selector must leave out.
#[test]
fn kubernetes_names_of_listed_and_watched_pods_are_on_every_row() {
    require_root();
    if skipped() {
        return;
    }
    const WEB_UID: &str = "6f1d2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
    const JOB_UID: &str = "7a2e3b4c-5d6e-4f70-9b0c-1d2e3f4a5b6c";
    const OTHER_UID: &str = "8b3f4c5d-6e7f-4081-a0c1-2e3f4a5b6c7d";
    const ID_WEB: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const ID_JOB: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = format!("kube-node-{port}");
    let rs = serde_json::json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": "web-5d8f7c9b4", "uid": "rs-1", "controller": true});
    let job = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
        "name": "backup-29000000", "uid": "job-1", "controller": true});
    let pods = serde_json::json!({
        "initial": [
            kube_pod(WEB_UID, "web-5d8f7c9b4-x2x9q", "shop", &node, rs.clone()),
            kube_pod(OTHER_UID, "web-5d8f7c9b4-zzzzz", "shop", "another-node", rs),
        ],
        "later": [kube_pod(JOB_UID, "backup-29000000-k7j2m", "ops", &node, job)],
    });
    let pods_file = tmp.path().join("pods.json");
    std::fs::write(&pods_file, pods.to_string()).unwrap();
    let mut api = Command::new("python3")
        .args([FAKE_KUBE_API, pods_file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the fake API server");
    let mut api_out = BufReader::new(api.stdout.take().unwrap());
    let mut line = String::new();
    api_out.read_line(&mut line).unwrap();
    let api_port = line
        .trim()
        .strip_prefix("READY ")
        .expect("READY <port>")
        .to_string();
    let (requests_tx, requests) = mpsc::channel();
    std::thread::spawn(move || {
        for l in api_out.lines().map_while(Result::ok) {
            let _ = requests_tx.send(l);
        }
    });

    let root = format!("/tcplake-test-{}-{port}.slice", std::process::id());
    let container = |uid: &str, id: &str| {
        format!(
            "{root}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        )
    };
    let mut cgroups = Cgroups {
        mount: cgroup2_mount(),
        made: Vec::new(),
    };
    let web_dir = cgroups.make(&container(WEB_UID, ID_WEB));
    let job_dir = cgroups.make(&container(JOB_UID, ID_JOB));
    let api_url = format!("http://127.0.0.1:{api_port}");
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let capture = Capture::start(
        tmp.path(),
        port,
        &[
            "--kubernetes-api",
            &api_url,
            "--kubernetes-node",
            &node,
            "--metrics-addr",
            &admin_addr,
        ],
    );
    // The list (the Deployment's pod), then the watch that adds the Job's: both known to capture.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !scrape(admin).contains("\ntcplake_kubernetes_pods 2\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "the node's 2 pods not known within 30 s: {:?}",
            requests.try_iter().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen: Vec<String> = requests.try_iter().collect();
    assert!(
        seen.iter()
            .all(|l| l.contains(&format!("spec.nodeName%3D{node}"))
                || l.contains(&format!("spec.nodeName={node}"))),
        "only this node's pods are asked for: {seen:?}"
    );
    let mut server = peer_in(&web_dir, &peer_args("server", port, 2, 100, 200, 0));
    let _server_out = wait_for_line(&mut server, "READY");
    finish(peer_in(
        &job_dir,
        &peer_args("client", port, 2, 100, 200, 0),
    ));
    finish(server);
    let summary = capture.stop();
    let _ = api.kill();
    let _ = api.wait();
    assert_eq!(summary["kernel_drops"], 0, "{summary}");

    let flows = dataset(tmp.path(), "flows");
    let rows = duckdb(&format!(
        "SELECT role, pod_uid, pod_name, pod_namespace, workload_kind, workload_name, k8s_node, \
         sum(connections_opened) FROM {flows} GROUP BY ALL ORDER BY 1"
    ));
    let want = serde_json::json!([
        [
            "client",
            JOB_UID,
            "backup-29000000-k7j2m",
            "ops",
            "Job",
            "backup-29000000",
            node,
            2
        ],
        [
            "server",
            WEB_UID,
            "web-5d8f7c9b4-x2x9q",
            "shop",
            "Deployment",
            "web",
            node,
            2
        ],
    ]);
    let got: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|mut r| {
            r[7] = serde_json::json!(num(&r[7]));
            serde_json::Value::Array(r)
        })
        .collect();
    assert_eq!(serde_json::Value::Array(got), want);
    let events = dataset(tmp.path(), "events");
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM {events} WHERE pod_name IS NULL"
        )),
        0,
        "every event of the pods is named"
    );
}

/// `capture.state_changes = "lifecycle"`: the closing handshake's intermediate states are not
/// recorded, and `flows/` counts exactly the same opens, closes, resets, bytes and owners.
#[test]
fn lifecycle_state_changes_keep_flows_exact_with_fewer_events() {
    require_root();
    if skipped() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tcplake.toml");
    std::fs::write(&config, "[capture]\nstate_changes = \"lifecycle\"\n").unwrap();
    let out = tmp.path().join("out");
    let (states, port) = exact_loopback(&out, Some(&config));
    let mut expected = vec!["CLOSE", "ESTABLISHED", "SYN_SENT"];
    expected.sort_unstable();
    assert_eq!(states, expected, "only lifecycle states recorded");

    // A restart on the same output with every state change recorded would mix two kinds of log (and
    // change what flows' `events` counts mid-table): refused, naming the setting, nothing written.
    let files = |d: &str| files_under(&out.join(d)).len();
    let before = (files("events"), files("flows"));
    let mut args = monolith_args(&out, port);
    // Were it let through, it would end by itself, and fail below.
    args.extend(["--duration".into(), "5s".into()]);
    let resumed = tcplake(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_one_line_error(
        &resumed,
        1,
        &[
            "another source than this run's (ebpf port=",
            "recorded state changes",
        ],
    );
    assert_eq!((files("events"), files("flows")), before, "nothing written");
}

/// Loopback connections between two Python peers, captured live: `flows/` must count them exactly
/// on both sides. Returns the distinct `new_state`s of the recorded state changes, sorted, and the
/// port the capture was filtered on.
fn exact_loopback(out: &Path, config: Option<&Path>) -> (Vec<String>, u16) {
    const CONNS: u64 = 12;
    const RSTS: u64 = 4;
    const REQ: u64 = 70_000;
    const RESP: u64 = 30_000;
    let port = free_port();
    let extra: Vec<&str> = match config {
        Some(c) => vec!["--config", c.to_str().unwrap()],
        None => Vec::new(),
    };
    let capture = Capture::start(out, port, &extra);

    let args = |role: &str| peer_args(role, port, CONNS, REQ, RESP, RSTS);
    let mut server = peer(None, &args("server"));
    let _server_out = wait_for_line(&mut server, "READY");
    let server_pid = server.id();
    let client = peer(None, &args("client"));
    let client_pid = client.id();
    finish(client);
    finish(server);
    let summary = capture.stop();
    assert_eq!(summary["kernel_drops"], 0, "{summary}");
    assert_eq!(summary["decode_errors"], 0, "{summary}");

    let flows = dataset(out, "flows");
    let side = |filter: &str| {
        duckdb(&format!(
            "SELECT count(DISTINCT (pid, comm)), min(pid), min(comm), sum(connections_opened), \
             sum(connections_closed), sum(resets), sum(bytes_sent), sum(bytes_received), sum(rtt_samples), \
             string_agg(DISTINCT role), string_agg(DISTINCT cgroup_path) \
             FROM {flows} WHERE {filter}"
        ))
        .remove(0)
    };
    // Both peers run in the test's own cgroup.
    let own_cgroup = cgroup_of(std::process::id());
    // Client side: connections to the server's port.
    let c = side(&format!("remote_port = {port}"));
    assert_eq!(num(&c[0]), 1, "one owner for the client side: {c:?}");
    assert_eq!(
        (num(&c[1]), c[2].as_str().unwrap()),
        (u64::from(client_pid), "tl-client")
    );
    assert_eq!(num(&c[3]), CONNS, "client connections_opened");
    assert_eq!(num(&c[4]), CONNS, "client connections_closed");
    assert_eq!(num(&c[5]), RSTS, "client resets");
    assert_eq!(num(&c[6]), CONNS * REQ, "client bytes_sent");
    assert_eq!(num(&c[7]), CONNS * RESP, "client bytes_received");
    assert_eq!(
        (c[9].as_str(), c[10].as_str()),
        (Some("client"), Some(&*own_cgroup))
    );
    // Server side: connections accepted on the port.
    let s = side(&format!("local_port = {port}"));
    assert_eq!(num(&s[0]), 1, "one owner for the server side: {s:?}");
    assert_eq!(
        (num(&s[1]), s[2].as_str().unwrap()),
        (u64::from(server_pid), "tl-server")
    );
    assert_eq!(num(&s[3]), CONNS, "server connections_opened");
    assert_eq!(num(&s[4]), CONNS, "server connections_closed");
    assert_eq!(num(&s[5]), RSTS, "server resets");
    assert_eq!(num(&s[6]), CONNS * RESP, "server bytes_sent");
    assert_eq!(num(&s[7]), CONNS * REQ, "server bytes_received");
    assert_eq!(
        (s[9].as_str(), s[10].as_str()),
        (Some("server"), Some(&*own_cgroup))
    );
    assert!(num(&c[8]) + num(&s[8]) > 0, "RTT samples were taken");
    // The event log agrees with the projection, and nothing else was captured.
    let events = dataset(out, "events");
    assert_eq!(
        duckdb_int(&format!(
            "SELECT count(*) FROM {events} WHERE local_port <> {port} AND remote_port <> {port}"
        )),
        0
    );
    assert_eq!(
        duckdb_int(&format!("SELECT sum(bytes) FROM {events}")) as u64,
        CONNS * (REQ + RESP) * 2
    );
    // flows/ is the projection of events/: its `events` column counts every event row.
    assert_eq!(
        duckdb_int(&format!("SELECT sum(events) FROM {flows}")),
        duckdb_int(&format!("SELECT count(*) FROM {events}"))
    );
    let states = duckdb(&format!(
        "SELECT DISTINCT new_state FROM {events} WHERE kind = 'state_change' ORDER BY 1"
    ))
    .into_iter()
    .map(|r| r[0].as_str().unwrap().to_string())
    .collect();
    (states, port)
}

/// A network namespace made for one test, removed when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("tlrt-{}", std::process::id());
        let run = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().unwrap().success();
            assert!(ok, "ip {args:?} failed");
        };
        run(&["netns", "add", &name]);
        let ns = Netns(name);
        run(&["-n", &ns.0, "link", "set", "lo", "up"]);
        // An Ethernet-sized MTU: many segments per transfer, like a real network.
        run(&["-n", &ns.0, "link", "set", "lo", "mtu", "1500"]);
        // No 64 KiB GSO super-packets either: one packet is one segment, as on a wire.
        run(&["-n", &ns.0, "link", "set", "lo", "gso_max_size", "1500"]);
        run(&["-n", &ns.0, "link", "set", "lo", "gso_max_segs", "1"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output_bounded()
            .unwrap()
    }

    /// A counter from the namespace's own /proc/net/snmp.
    fn tcp_counter(&self, name: &str) -> u64 {
        let snmp = String::from_utf8(self.exec(&["cat", "/proc/net/snmp"]).stdout).unwrap();
        let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let names: Vec<&str> = tcp[0].split_whitespace().collect();
        let values: Vec<&str> = tcp[1].split_whitespace().collect();
        let i = names
            .iter()
            .position(|n| *n == name)
            .expect("counter exists");
        values[i].parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn retransmits_under_packet_loss_are_counted() {
    require_root();
    if skipped() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let ns = Netns::new();
    // Drop every tenth client->server packet on arrival (deterministic, so the test cannot get lucky).
    // Dropping on input, not output: a packet refused on output is reported back to TCP as a local
    // failure and simply sent again, which the kernel does not count as a retransmission.
    let rules = format!(
        "add table inet tl\n\
         add chain inet tl in {{ type filter hook input priority 0; }}\n\
         add rule inet tl in tcp dport {port} numgen inc mod 10 == 0 drop\n"
    );
    let rules_file = tmp.path().join("loss.nft");
    std::fs::write(&rules_file, rules).unwrap();
    let o = ns.exec(&["nft", "-f", rules_file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let mut capture = Capture::start(&tmp.path().join("out"), port, &[]);
    capture.netns = Some(ns.0.clone());
    let before = ns.tcp_counter("RetransSegs");
    let p = port.to_string();
    let mut server = peer(
        Some(&ns.0),
        &[
            "server".into(),
            p.clone(),
            "2".into(),
            "1000000".into(),
            "1000".into(),
        ],
    );
    let _server_out = wait_for_line(&mut server, "READY");
    let client = peer(
        Some(&ns.0),
        &[
            "client".into(),
            p,
            "2".into(),
            "1000000".into(),
            "1000".into(),
            "0".into(),
        ],
    );
    finish(client);
    finish(server);
    let summary = capture.stop();
    // Read once the closing handshakes are over, so a FIN retransmitted after the peers exited is in
    // both counts.
    let kernel_retrans = ns.tcp_counter("RetransSegs") - before;
    assert_eq!(summary["kernel_drops"], 0);

    let flows = dataset(&tmp.path().join("out"), "flows");
    let counted = duckdb_int(&format!("SELECT sum(retransmits) FROM {flows}")) as u64;
    eprintln!("retransmits: tcplake {counted}, kernel RetransSegs {kernel_retrans}");
    assert!(kernel_retrans > 0, "the loss rule caused no retransmits");
    // One tracepoint hit per retransmitted packet, and with GSO off in the namespace a packet is one
    // segment: the counts agree, give or take a retransmit racing the end of the capture.
    assert!(
        counted <= kernel_retrans && counted * 10 >= kernel_retrans * 9,
        "counted {counted} retransmits, the kernel counted {kernel_retrans} segments"
    );
    // Bytes are still exact despite the loss.
    assert_eq!(
        duckdb_int(&format!("SELECT sum(bytes_sent) FROM {flows}")),
        2 * (1_000_000 + 1_000)
    );
}

/// Without privileges, live capture fails with one line that names the cause and the fix, and the
/// synthetic source still works.
#[test]
fn unprivileged_live_capture_fails_clearly_and_synthetic_still_runs() {
    require_root();
    if skipped() {
        return;
    }
    // A copy of the binary where the unprivileged user can reach it (the checkout may be under /root).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let bin = dir.join("tcplake");
    std::fs::copy(env!("CARGO_BIN_EXE_tcplake"), &bin).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&bin)
            .args(args)
            .output_bounded()
            .expect("run setpriv (util-linux)")
    };
    let out = dir.join("out");
    let o = as_nobody(&["--source", "ebpf", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("CAP_BPF") && err.contains("--source synthetic"),
        "{err}"
    );

    let o = as_nobody(&[
        "--source",
        "synthetic",
        "--events",
        "5000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("5000 events"), "{}", stdout(&o));
}

/// Split deployment, live capture, restarts: every run's events end up in `events/`.
/// - Idle between connections, the capture sends heartbeats; restarted after one, it continues its
///   node's numbering (it once took the heartbeat for the end of the stream and exited, capturing
///   nothing, exit 0).
/// - Restarted after the broker lost its node's messages (retention by `broker.max_age` on a quiet
///   node, a purge, a broker back with empty storage), it starts a new run. Its events are new:
///   numbered from 0 again, the sink took them for the ones it had committed under those numbers and
///   dropped them, exit 0.
/// - Restarted with other settings, it is refused (it would have continued the node's stream).
#[test]
fn a_live_split_capture_restarted_idle_or_on_an_emptied_stream_loses_nothing() {
    require_root();
    if skipped() {
        return;
    }
    const CONNS: u64 = 6;
    let nats = Nats::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = tmp.path().join("split.toml");
    std::fs::write(&config, "[broker]\nmax_bytes = \"64MiB\"\n").unwrap();
    let (url, config, out_s) = (
        nats.url(),
        config.to_str().unwrap().to_string(),
        out.to_str().unwrap().to_string(),
    );
    // The sink's log goes to a file: read on a failure, never filling a pipe.
    let sink_log = tmp.path().join("sink.log");
    let mut sink = tcplake_cmd()
        .args(["--mode", "sink", "--node", "live", "--broker", &url])
        .args(["--config", &config, "--summary", "json"])
        .args(["--out", &out_s, "--max-file-age", "1s"])
        .env("RUST_LOG", "pipeline=info,tcplake=info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&sink_log).unwrap())
        .spawn()
        .unwrap();
    let port = free_port();
    let port_s = port.to_string();
    let capture_args = [
        "--mode",
        "capture",
        "--source",
        "ebpf",
        "--port",
        &port_s,
        "--node",
        "live",
        "--broker",
        &url,
        "--config",
        &config,
        "--summary",
        "json",
    ];
    let traffic = || {
        let args = |role: &str| peer_args(role, port, CONNS, 1_000, 1_000, 0);
        let mut server = peer(None, &args("server"));
        let _server_out = wait_for_line(&mut server, "READY");
        finish(peer(None, &args("client")));
        finish(server);
    };
    let events = dataset(&out, "events");
    let n_of = |sql: &str| duckdb_int(sql) as u64;
    let committed = |sink: &mut Child, want: u64| {
        // Files close after a second; wait for the rows, not for a time.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while commits(&out, "events") == 0 {
            assert!(
                sink.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline,
                "no events commit; the sink said:\n{}",
                std::fs::read_to_string(&sink_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let n = duckdb_int(&format!("SELECT count(*) FROM {events}")) as u64;
            if n == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "events/ holds {n} rows, not the {want} captured; the sink said:\n{}",
                std::fs::read_to_string(&sink_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let first = Capture::spawn(&capture_args);
    traffic();
    // Idle between connections: the capture sends heartbeats (its clock, no rows; at most one a
    // second, after rows held up to a second for attribution) meanwhile, which the broker once took
    // for duplicates of one another and of the run's first batch.
    std::thread::sleep(Duration::from_secs(3));
    traffic();
    // Stopped while idle, heartbeat periods after its last events: its last message is a heartbeat.
    std::thread::sleep(Duration::from_secs(3));
    let mut total = num(&first.stop()["events"]);
    assert!(total >= 2 * CONNS * 2 * 4, "{total} events");
    committed(&mut sink, total);

    // Restarted on the same stream: it continues the numbering (a heartbeat last on the stream was
    // once taken for the end of the node's stream: the capture exited at once, capturing nothing).
    let next = n_of(&format!("SELECT max(seq) + 1 FROM {events}"));
    let second = Capture::spawn(&capture_args);
    traffic();
    let summary = second.stop();
    assert_eq!(num(&summary["resumed_at_seq"]), next, "{summary}");
    total += num(&summary["events"]);
    committed(&mut sink, total);

    // Restarted with other settings (another port filter), it would continue the node's stream
    // with another kind of events: refused, naming the setting, before publishing anything.
    let other_port = free_port().to_string();
    let mut other: Vec<&str> = capture_args.to_vec();
    let i = other.iter().position(|a| *a == "--port").unwrap() + 1;
    other[i] = &other_port;
    // Were it let through, it would end by itself, and fail below.
    other.extend(["--duration", "5s"]);
    let o = tcplake(&other, &[]);
    assert_one_error_line(&o, &["captured with other settings", "--node"]);
    assert_eq!(n_of(&format!("SELECT count(*) FROM {events}")), total);

    // The broker loses the node's messages (everything was committed: nothing is lost here).
    purge_below(&nats, "TCPLAKE_EVENTS", 1 << 40);
    let third = Capture::spawn(&capture_args);
    traffic();
    total += num(&third.stop()["events"]);
    committed(&mut sink, total);
    Command::new("kill")
        .args(["-INT", &sink.id().to_string()])
        .status()
        .unwrap();
    let o = sink.wait_bounded().unwrap();
    assert!(o.status.success(), "sink: {}", stderr(&o));

    // Three runs (four rounds of connections), each connection on both sides, and no seq twice.
    assert_eq!(
        n_of(&format!(
            "SELECT count(*) FROM {events} WHERE kind = 'state_change' AND new_state = 'ESTABLISHED'"
        )),
        4 * CONNS * 2
    );
    assert_eq!(
        n_of(&format!("SELECT count(DISTINCT seq) FROM {events}")),
        total
    );
    // Live runs are numbered from the clock in nanoseconds (after 2001-09-09 they exceed 10^18), so
    // no run, however busy, overtakes the number a later run starts from.
    assert_eq!(
        n_of(&format!(
            "SELECT count(*) FROM {events} WHERE seq < 1000000000000000000"
        )),
        0
    );
}
