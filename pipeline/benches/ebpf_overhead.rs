//! What live capture costs the traffic it watches (a benchmark, not a test; needs root).
//!
//! `cargo bench --bench ebpf_overhead` runs two loopback workloads — connection churn (connect, 64-byte
//! request and reply, close) and bulk transfer (one connection streaming 64 KiB writes) — alternately
//! with no probe and with `tcplake --source ebpf` capturing everything, several rounds in one run, and
//! reports throughput with the probe as a ratio of throughput without it. With kernel BPF statistics on,
//! it also reports each program's invocations and mean run time, and the ring-buffer drops of every
//! attached phase (the churn phase is the highest connection rate this machine reaches).
//!
//! Settings: `TCPLAKE_BENCH_SECS` (seconds per phase, default 3), `TCPLAKE_BENCH_ROUNDS` (default 3).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROGRAMS: [&str; 5] = [
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tcp_probe",
    "sock_send_length",
    "sock_recv_length",
];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A loopback server: churn connections get a 64-byte reply; bulk connections are drained.
fn server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = vec![0u8; 64 * 1024];
                let Ok(n) = conn.read(&mut buf) else { return };
                if n == 64 && buf[0] == b'c' {
                    let _ = conn.write_all(&[b'r'; 64]);
                    return;
                }
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// Connections completed per second by `threads` clients.
fn churn(port: u16, secs: u64, threads: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut reply = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    if s.write_all(&[b'c'; 64]).is_ok() && s.read_exact(&mut reply).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// MiB per second through one connection.
fn bulk(port: u16, secs: u64) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let chunk = vec![b'b'; 64 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        s.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    sent as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

struct Capture(Child);

impl Capture {
    fn start(out: &std::path::Path) -> Capture {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcplake"))
            .args([
                "--source",
                "ebpf",
                "--summary",
                "json",
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

/// (invocations, total run time ns) per program, from the kernel's BPF statistics.
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let secs = env_num("TCPLAKE_BENCH_SECS", 3);
    let rounds = env_num("TCPLAKE_BENCH_ROUNDS", 3);
    let threads = 2;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| eprintln!("BPF statistics unavailable ({e}); per-event cost will be missing"))
        .ok();
    let port = server();
    let tmp = tempfile::tempdir().unwrap();
    let (mut churn_ratio, mut bulk_ratio) = (Vec::new(), Vec::new());
    let (mut churn_rates, mut bulk_rates) = (Vec::new(), Vec::new());
    let mut per_program: Vec<(&str, u64, u64)> = Vec::new();
    let (mut events, mut drops) = (0u64, 0u64);
    let (mut capture_cpu, mut attached_secs) = (0.0, 0.0);
    for round in 0..rounds {
        let c0 = churn(port, secs, threads);
        let b0 = bulk(port, secs);
        let cap = Capture::start(&tmp.path().join(format!("round-{round}")));
        let (cpu0, t0) = (cap.cpu_secs(), Instant::now());
        let c1 = churn(port, secs, threads);
        let b1 = bulk(port, secs);
        capture_cpu += cap.cpu_secs() - cpu0;
        attached_secs += t0.elapsed().as_secs_f64();
        for (name, runs, ns) in program_stats() {
            match per_program.iter_mut().find(|(n, ..)| *n == name) {
                Some(e) => {
                    e.1 += runs;
                    e.2 += ns;
                }
                None => per_program.push((name, runs, ns)),
            }
        }
        let summary = cap.stop();
        events += summary["events"].as_u64().unwrap_or(0);
        drops += summary["kernel_drops"].as_u64().unwrap_or(0);
        eprintln!(
            "round {round}: churn {c0:.0} -> {c1:.0} conn/s, bulk {b0:.0} -> {b1:.0} MiB/s, {} events, {} drops",
            summary["events"], summary["kernel_drops"]
        );
        churn_ratio.push(c1 / c0);
        bulk_ratio.push(b1 / b0);
        churn_rates.push((c0, c1));
        bulk_rates.push((b0, b1));
    }
    let loss = |r: f64| (1.0 - r) * 100.0;
    let (cr, br) = (median(churn_ratio), median(bulk_ratio));
    println!("## eBPF capture overhead ({rounds} rounds x {secs} s per phase, {threads} churn clients)\n");
    println!("| workload | without probe | with probe | with / without | throughput loss |");
    println!("|---|---|---|---|---|");
    let mid = |v: &[(f64, f64)]| {
        (
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect()),
        )
    };
    let (c0, c1) = mid(&churn_rates);
    let (b0, b1) = mid(&bulk_rates);
    println!(
        "| connection churn | {c0:.0} conn/s | {c1:.0} conn/s | {cr:.3} | {:.1} % |",
        loss(cr)
    );
    println!(
        "| bulk transfer | {b0:.0} MiB/s | {b1:.0} MiB/s | {br:.3} | {:.1} % |",
        loss(br)
    );
    println!("\nEvents captured while attached: {events}; ring-buffer drops: {drops}.");
    println!(
        "The tcplake process (decode, aggregate, Parquet) used {:.0} % of one core while attached.\n",
        capture_cpu / attached_secs * 100.0
    );
    if !per_program.is_empty() {
        println!("| program | invocations | mean run time | share of one core while attached |");
        println!("|---|---|---|---|");
        for (name, runs, ns) in &per_program {
            let mean = if *runs > 0 {
                *ns as f64 / *runs as f64
            } else {
                0.0
            };
            let share = *ns as f64 / 1e9 / attached_secs * 100.0;
            println!("| {name} | {runs} | {mean:.0} ns | {share:.1} % |");
        }
    }
}
