//! What live capture costs the traffic it watches (a benchmark, not a test; needs root and
//! `scripts/setup.sh bench`).
//!
//! `cargo bench --bench ebpf_overhead` runs off-the-shelf programs on loopback — nginx answering a tiny
//! response to `ab` opening a new connection per request (connection churn, the worst case for a
//! per-connection probe), and `iperf3` streaming one connection (bulk transfer) — in four phases that
//! alternate within each round (their order rotates from round to round):
//!
//! - **none**: nothing attached;
//! - **floor**: bpftrace attached to the same five tracepoints, doing nothing but count — what merely
//!   attaching costs;
//! - **tcplake**: `tcplake --source ebpf` capturing everything into a local output;
//! - **lifecycle**: the same with `capture.state_changes = "lifecycle"` (the state changes flows count).
//!
//! It reports each phase's throughput (median over rounds) as a ratio of the no-probe phase, each
//! tcplake phase's loss as a multiple of the floor's, and for each on churn: each program's invocations and run time
//! per connection (the kernel's BPF statistics), the tcplake process's CPU per connection (decode,
//! aggregate, Parquet), events and event-log bytes per connection, and ring-buffer drops.
//!
//! Settings: `TCPLAKE_BENCH_SECS` (seconds per phase, default 5), `TCPLAKE_BENCH_ROUNDS` (default 3),
//! `TCPLAKE_BENCH_CONCURRENCY` (ab's concurrent connections, default 16).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROGRAMS: [&str; 5] = [
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_probe",
    "sock_send_length",
    "sock_recv_length",
];

/// The floor: the same tracepoints, a count each.
const FLOOR: &str = "tracepoint:sock:inet_sock_set_state, tracepoint:tcp:tcp_retransmit_skb, \
    tracepoint:tcp:tcp_probe, tracepoint:sock:sock_send_length, tracepoint:sock:sock_recv_length \
    { @[probe] = count(); }";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "{tool} is missing: run scripts/setup.sh bench");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process stopped (SIGTERM) and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// nginx on loopback answering `ok` to every request, no logging.
fn nginx(dir: &Path, port: u16) -> Guard {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; \
               client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; \
               fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi; \
               server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .args(["-p", dir.to_str().unwrap(), "-c", conf.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (scripts/setup.sh bench)");
    wait_listening(port);
    Guard(child)
}

fn iperf_server(port: u16) -> Guard {
    let child = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (scripts/setup.sh bench)");
    wait_listening(port);
    Guard(child)
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (requests per second, completed requests) from `ab`, a new connection per request.
fn churn(port: u16, secs: u64, concurrency: u64) -> (f64, u64) {
    let o = Command::new("ab")
        .args([
            "-q",
            "-r",
            "-t",
            &secs.to_string(),
            "-n",
            "100000000",
            "-c",
            &concurrency.to_string(),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .expect("ab (scripts/setup.sh bench)");
    let text = String::from_utf8_lossy(&o.stdout);
    let value = |key: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l[key.len()..].split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("ab printed no `{key}`: {text}"))
    };
    (
        value("Requests per second:"),
        value("Complete requests:") as u64,
    )
}

/// Gbit/s through one `iperf3` connection.
fn bulk(port: u16, secs: u64) -> f64 {
    let o = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 result")
        / 1e9
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    None,
    Floor,
    Tcplake,
    /// tcplake with `capture.state_changes = "lifecycle"`.
    Lifecycle,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::None => "nothing attached",
            Phase::Floor => "bpftrace counting (the floor)",
            Phase::Tcplake => "tcplake --source ebpf",
            Phase::Lifecycle => "tcplake, state_changes = lifecycle",
        }
    }

    fn captures(self) -> bool {
        matches!(self, Phase::Tcplake | Phase::Lifecycle)
    }
}

/// bpftrace attached, or tcplake capturing.
enum Attached {
    None,
    /// Held only to keep bpftrace attached until the phase ends (dropping it stops bpftrace).
    Floor(#[allow(dead_code)] Guard),
    Tcplake(Capture),
}

fn attach(phase: Phase, out: &Path) -> Attached {
    match phase {
        Phase::None => Attached::None,
        Phase::Floor => {
            let mut child = Command::new("bpftrace")
                .args(["-e", FLOOR])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("bpftrace (scripts/setup.sh bench)");
            let mut lines = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.starts_with("Attaching") {
                line.clear();
                assert!(
                    lines.read_line(&mut line).unwrap() > 0,
                    "bpftrace did not attach"
                );
            }
            // The line is printed before the probes are attached: give them a moment.
            std::thread::sleep(Duration::from_millis(500));
            std::thread::spawn(move || for _ in lines.lines() {});
            Attached::Floor(Guard(child))
        }
        Phase::Tcplake => Attached::Tcplake(Capture::start(out, false)),
        Phase::Lifecycle => Attached::Tcplake(Capture::start(out, true)),
    }
}

struct Capture(Child);

impl Capture {
    fn start(out: &Path, lifecycle: bool) -> Capture {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcplake"));
        if lifecycle {
            std::fs::create_dir_all(out).unwrap();
            let conf = out.join("lifecycle.toml");
            std::fs::write(&conf, "[capture]\nstate_changes = \"lifecycle\"\n").unwrap();
            cmd.arg("--config").arg(conf);
        }
        let mut child = cmd
            .args([
                "--source",
                "ebpf",
                "--summary",
                "json",
                "--metrics-addr",
                "127.0.0.1:0",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("eBPF programs attached") {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "tcplake did not attach (run as root)"
            );
        }
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in err.lines() {});
        Capture(child)
    }

    /// CPU seconds the capture process has used so far (user + system).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        // Fields after the parenthesised command name, from `state`: utime and stime are the 12th
        // and 13th (tpgid may be -1, so count every field, not only the numeric ones).
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (field(11) + field(12)) as f64 / ticks
    }

    fn stop(self) -> serde_json::Value {
        let pid = self.0.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let out = self.0.wait_with_output().unwrap();
        serde_json::from_slice(&out.stdout).expect("summary")
    }
}

/// (program, invocations, run time ns) of tcplake's programs, from the kernel's BPF statistics.
fn program_stats() -> Vec<(&'static str, u64, u64)> {
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        let name = info.name_as_str().unwrap_or_default().to_string();
        // The kernel keeps the first 15 bytes of a program name.
        if let Some(p) = PROGRAMS
            .iter()
            .find(|p| p.starts_with(&name) && !name.is_empty())
        {
            out.push((*p, info.run_count(), info.run_time().as_nanos() as u64));
        }
    }
    out
}

/// Bytes of Parquet data files under `dir` (not the Delta log).
fn data_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p: PathBuf = e.path();
            if p.is_dir() {
                if !p.ends_with("_delta_log") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "parquet") {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What tcplake cost while it watched the churn workload.
#[derive(Default)]
struct CaptureCost {
    connections: u64,
    cpu_secs: f64,
    events: u64,
    drops: u64,
    event_bytes: u64,
    programs: Vec<(&'static str, u64, u64)>,
}

fn main() {
    let secs = env_num("TCPLAKE_BENCH_SECS", 5);
    let rounds = env_num("TCPLAKE_BENCH_ROUNDS", 3);
    let concurrency = env_num("TCPLAKE_BENCH_CONCURRENCY", 16);
    for tool in ["nginx", "ab", "iperf3", "bpftrace"] {
        need(tool);
    }
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| {
            eprintln!("BPF statistics unavailable ({e}); per-program cost will be missing")
        })
        .ok();
    let tmp = tempfile::tempdir().unwrap();
    let (web, bulk_port) = (free_port(), free_port());
    let web_dir = tmp.path().join("nginx");
    std::fs::create_dir_all(&web_dir).unwrap();
    let _nginx = nginx(&web_dir, web);
    let _iperf = iperf_server(bulk_port);
    // Warm up (page cache, nginx workers, TIME_WAIT reuse), unmeasured.
    churn(web, 1, concurrency);

    let phases = [Phase::None, Phase::Floor, Phase::Tcplake, Phase::Lifecycle];
    let n = phases.len();
    let mut churn_rates: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut bulk_rates: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut costs: Vec<CaptureCost> = (0..n).map(|_| CaptureCost::default()).collect();
    for round in 0..rounds as usize {
        for k in 0..n {
            let i = (round + k) % n;
            let phase = phases[i];
            let cost = &mut costs[i];
            let out = tmp.path().join(format!("round-{round}-{i}"));
            let attached = attach(phase, &out);
            let before = program_stats();
            let cpu0 = match &attached {
                Attached::Tcplake(c) => c.cpu_secs(),
                _ => 0.0,
            };
            let (rate, done) = churn(web, secs, concurrency);
            if let Attached::Tcplake(c) = &attached {
                cost.cpu_secs += c.cpu_secs() - cpu0;
                cost.connections += done;
                for (name, runs, ns) in program_stats() {
                    let (r0, n0) = before
                        .iter()
                        .find(|(n, ..)| *n == name)
                        .map(|(_, r, n)| (*r, *n))
                        .unwrap_or((0, 0));
                    match cost.programs.iter_mut().find(|(n, ..)| *n == name) {
                        Some(e) => {
                            e.1 += runs - r0;
                            e.2 += ns - n0;
                        }
                        None => cost.programs.push((name, runs - r0, ns - n0)),
                    }
                }
            }
            churn_rates[i].push(rate);
            // Events and bytes are taken over the churn phase alone: bulk runs under a second capture.
            let attached = match attached {
                Attached::Tcplake(c) => {
                    let s = c.stop();
                    cost.events += s["events"].as_u64().unwrap_or(0);
                    cost.drops += s["kernel_drops"].as_u64().unwrap_or(0);
                    cost.event_bytes += data_bytes(&out.join("events"));
                    let bulk_out = tmp.path().join(format!("bulk-{round}-{i}"));
                    Attached::Tcplake(Capture::start(&bulk_out, phase == Phase::Lifecycle))
                }
                other => other,
            };
            bulk_rates[i].push(bulk(bulk_port, secs));
            if let Attached::Tcplake(c) = attached {
                cost.drops += c.stop()["kernel_drops"].as_u64().unwrap_or(0);
            }
            eprintln!(
                "round {round}: {:<36} churn {rate:>8.0} req/s  bulk {:>6.2} Gbit/s",
                phase.name(),
                bulk_rates[i].last().unwrap()
            );
        }
    }

    let churn_mid: Vec<f64> = churn_rates.into_iter().map(median).collect();
    let bulk_mid: Vec<f64> = bulk_rates.into_iter().map(median).collect();
    println!(
        "## Live capture overhead ({rounds} rounds x {secs} s per phase, phases alternating)\n\n\
         Connection churn: nginx answering `ok` to `ab -c {concurrency}` (a new connection per request). \
         Bulk: one `iperf3` connection. Loopback, medians.\n"
    );
    println!("| phase | churn req/s | vs none | loss | bulk Gbit/s | vs none |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, p) in phases.iter().enumerate() {
        let (c, b) = (churn_mid[i] / churn_mid[0], bulk_mid[i] / bulk_mid[0]);
        println!(
            "| {} | {:.0} | {c:.3} | {:.1} % | {:.2} | {b:.3} |",
            p.name(),
            churn_mid[i],
            (1.0 - c) * 100.0,
            bulk_mid[i]
        );
    }
    let floor_loss = 1.0 - churn_mid[1] / churn_mid[0];
    println!();
    for (i, p) in phases.iter().enumerate().filter(|(_, p)| p.captures()) {
        let loss = 1.0 - churn_mid[i] / churn_mid[0];
        if floor_loss > 0.0 {
            println!(
                "{}: churn loss {:.2}x the floor's ({:.1} % vs {:.1} %).",
                p.name(),
                loss / floor_loss,
                loss * 100.0,
                floor_loss * 100.0
            );
        } else {
            println!(
                "{}: the floor lost nothing measurable ({:.1} %); this phase's loss: {:.1} %.",
                p.name(),
                floor_loss * 100.0,
                loss * 100.0
            );
        }
    }
    for (i, p) in phases.iter().enumerate().filter(|(_, p)| p.captures()) {
        let cost = &costs[i];
        let conns = cost.connections.max(1) as f64;
        println!(
            "\nPer connection under {} (both ends of each connection are captured): {:.1} events, \
             {:.0} bytes of event Parquet, {:.1} µs of tcplake CPU (decode, aggregate, Parquet); \
             ring-buffer drops: {}.\n",
            p.name(),
            cost.events as f64 / conns,
            cost.event_bytes as f64 / conns,
            cost.cpu_secs * 1e6 / conns,
            cost.drops
        );
        if !cost.programs.is_empty() {
            println!("| program | runs per connection | mean run time | BPF ns per connection |");
            println!("|---|---:|---:|---:|");
            let mut total = 0.0;
            for (name, runs, ns) in &cost.programs {
                let mean = if *runs > 0 {
                    *ns as f64 / *runs as f64
                } else {
                    0.0
                };
                total += *ns as f64 / conns;
                println!(
                    "| {name} | {:.1} | {mean:.0} ns | {:.0} |",
                    *runs as f64 / conns,
                    *ns as f64 / conns
                );
            }
            println!("| all | | | {total:.0} |");
        }
    }
}
