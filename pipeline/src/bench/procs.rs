//! The processes a bench runs, and what they cost: CPU from `wait4` and peak memory from each
//! process's own summary (`VmHWM`) for tcplake's children, both from `/proc` for the broker (which is
//! stopped rather than exiting on its own).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::BenchError;

/// A finished process and what it used.
#[derive(Clone, Debug)]
pub struct Measured {
    pub role: String,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    /// Its `--summary json` (null for the broker).
    pub summary: serde_json::Value,
}

/// A started process; one dropped before [`Running::finish`] is killed (a bench that failed leaves
/// nothing running).
pub struct Running {
    role: String,
    child: Child,
    reaped: bool,
    /// Reads the process's stderr from the start (however much it logs, it never blocks on a full
    /// pipe while the bench waits for another process).
    stderr: Option<JoinHandle<String>>,
}

/// The last `keep` bytes of what `r` yields until it ends (at a character boundary).
fn tail_of(mut r: impl Read, keep: usize) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn spawn(exe: &Path, role: &str, args: &[String]) -> Result<Running, BenchError> {
    let mut cmd = Command::new(exe);
    // Each process gets exactly the settings of its role: none leak in from the bench's environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TCPLAKE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        // Several processes per mode on one host: none serves metrics (the bench reads rusage).
        .env("TCPLAKE_METRICS_ADDR", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Process(format!("starting {role}: {e}")))?;
    let stderr = child
        .stderr
        .take()
        .map(|e| std::thread::spawn(move || tail_of(e, 64 * 1024)));
    Ok(Running {
        role: role.to_string(),
        child,
        reaped: false,
        stderr,
    })
}

fn seconds(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

impl Running {
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Has it exited? (It stays unreaped: [`Running::finish`] still reads its resource usage.)
    pub fn exited(&self) -> bool {
        // SAFETY: an all-zero siginfo is valid; waitid with WNOWAIT only looks at our own child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (a zero pid means no state change yet).
        r == 0 && unsafe { info.si_pid() } != 0
    }

    /// Waits for the exit and reads its resource usage and summary.
    pub fn finish(mut self) -> Result<Measured, BenchError> {
        let mut out = String::new();
        // The summary is one line on stdout, read to its end (stderr has a reader of its own).
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let (r, wait_error) = loop {
            // SAFETY: pid is our child, not yet waited for; the pointers are valid.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            let e = std::io::Error::last_os_error();
            if r != -1 || e.kind() != std::io::ErrorKind::Interrupted {
                break (r, e);
            }
        };
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        // Reaped (or not ours to wait for): never signalled again, its pid may be reused.
        self.reaped = true;
        if r != pid {
            return Err(BenchError::Process(format!(
                "waiting for {}: {wait_error}",
                self.role
            )));
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(BenchError::Process(format!(
                "{} failed: {}",
                self.role,
                err.lines()
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("no message")
            )));
        }
        let summary: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| {
            BenchError::Process(format!("{} printed no JSON summary: {e}", self.role))
        })?;
        // The process's own figure: `ru_maxrss` starts at this (bench) process's peak, which the
        // kernel carries across the child's `exec`, and so grows with every run the bench has read.
        let own = summary["peak_rss_mib"].as_f64();
        Ok(Measured {
            role: std::mem::take(&mut self.role),
            cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // ru_maxrss is in KiB on Linux.
            peak_rss_mib: own.unwrap_or(usage.ru_maxrss as f64 / 1024.0),
            summary,
        })
    }
}

/// A nats-server with JetStream on a free loopback port and a fresh store.
pub struct NatsServer {
    child: Child,
    port: u16,
}

fn nats_binary() -> PathBuf {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    pub fn start(store: &Path) -> Result<Self, BenchError> {
        let _ = std::fs::remove_dir_all(store);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| BenchError::Process(format!("finding a free port: {e}")))?
            .port();
        // JetStream reserves each stream's max_bytes against its storage limit, by default most of
        // the free disk: a stated limit lets the bench run on a nearly full disk (it writes far less
        // than the streams' limits). The store itself is this run's own, removed above.
        std::fs::create_dir_all(store)
            .map_err(|e| BenchError::Process(format!("creating {}: {e}", store.display())))?;
        let conf = store.join("limits.conf");
        std::fs::write(&conf, "jetstream { max_file_store: 1TB }\n")
            .map_err(|e| BenchError::Process(format!("writing {}: {e}", conf.display())))?;
        let child = Command::new(nats_binary())
            .arg("-c")
            .arg(&conf)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                BenchError::Process(format!(
                    "starting nats-server (apt-get install nats-server): {e}"
                ))
            })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(BenchError::Process("nats-server did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(NatsServer { child, port })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Reads its CPU time and peak memory from /proc, then stops it.
    pub fn stop(mut self, _wall: Duration) -> Result<Measured, BenchError> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the `(comm)`: utime and stime are the 12th and 13th of those.
        let after = stat.rsplit(')').next().unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let cpu_seconds = (tick(11) + tick(12)) / ticks;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let peak_mib = pipeline::summary::vm_hwm_mib(&status).unwrap_or(0.0);
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(Measured {
            role: "nats-server".into(),
            cpu_seconds,
            peak_rss_mib: peak_mib,
            summary: serde_json::Value::Null,
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `N CPUs, model, memory, kernel` for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Waits until the broker's events stream holds messages of `nodes` capture nodes (one subject each),
/// or every capture has exited (a failed one is reported when it is finished).
pub fn wait_for_streams(url: &str, nodes: u32, captures: &[Running]) -> Result<(), BenchError> {
    let fail =
        |what: String| BenchError::Process(format!("waiting for every node to publish: {what}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    rt.block_on(async {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(mut stream) = js.get_stream(pipeline::edge::broker::EVENTS_STREAM).await {
                if let Ok(info) = stream.info().await {
                    if info.state.subjects_count >= u64::from(nodes) {
                        return Ok(());
                    }
                }
            }
            // All ended and some never published: they failed, which finishing them reports.
            if captures.iter().all(Running::exited) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "fewer than {nodes} nodes published within 120 s ({})",
                    captures
                        .iter()
                        .map(Running::role)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}
