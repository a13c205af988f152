//! The processes a bench runs, and what they cost: CPU and peak memory from `wait4` for tcplake's own
//! children, from `/proc` for the broker (which is stopped rather than exiting on its own).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    let child = cmd
        .args(args)
        // Several processes per mode on one host: none serves metrics (the bench reads rusage).
        .env("TCPLAKE_METRICS_ADDR", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Process(format!("starting {role}: {e}")))?;
    Ok(Running {
        role: role.to_string(),
        child,
        reaped: false,
    })
}

fn seconds(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

impl Running {
    /// Waits for the exit and reads its resource usage and summary.
    pub fn finish(mut self) -> Result<Measured, BenchError> {
        let mut out = String::new();
        let mut err = String::new();
        // The summary is one line and errors are few: reading before the wait cannot deadlock.
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our child, not yet waited for; the pointers are valid.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        // Reaped (or not ours to wait for): never signalled again, its pid may be reused.
        self.reaped = true;
        if r != pid {
            return Err(BenchError::Process(format!(
                "waiting for {}: {}",
                self.role,
                std::io::Error::last_os_error()
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
        let peak_kib = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(Measured {
            role: "nats-server".into(),
            cpu_seconds,
            peak_rss_mib: peak_kib / 1024.0,
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
