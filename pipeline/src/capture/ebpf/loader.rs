//! Loads the embedded kernel object, hands it this kernel's tracepoint layouts and the filters, and
//! attaches the programs. Failures say what is wrong and how to fix it.

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use probe_common::ProbeConfig;

use super::tracefs::{self, Format, FormatError};

/// The kernel programs, built by `pipeline/build.rs` from `probe-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcplake-probe"));

/// (program, tracepoint category, tracepoint name)
const PROGRAMS: [(&str, &str, &str); 5] = [
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
    ("tcp_probe", "tcp", "tcp_probe"),
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
];

/// Why the probe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this tcplake was built without its eBPF programs (AYA_BUILD_SKIP); rebuild without it, or use --source synthetic")]
    NotBuilt,
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{0}")]
    Denied(String),
    #[error("loading eBPF programs: {0}")]
    Load(String),
    #[error("attaching to tracepoint {tracepoint}: {reason}")]
    Attach { tracepoint: String, reason: String },
}

/// A loaded, attached probe: the ring buffer to drain and the drop counters to read.
pub struct Probe {
    /// Keeps the programs attached; dropping it detaches them.
    _ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    drops: PerCpuArray<MapData, u64>,
}

impl Probe {
    /// Records lost in the kernel because the ring buffer was full, summed over CPUs.
    pub fn drops(&self) -> u64 {
        self.drops
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// Explains a permission failure: the usual causes here are privileges and kernel lockdown.
fn denied(what: &str, err: &dyn std::fmt::Display) -> LoadError {
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    let lockdown = lockdown
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .unwrap_or("")
        .trim_matches(['[', ']']);
    let hint = if unsafe { libc::geteuid() } != 0 {
        "run as root, or grant the binary CAP_BPF and CAP_PERFMON (setcap cap_bpf,cap_perfmon+ep tcplake)"
    } else if matches!(lockdown, "integrity" | "confidentiality") {
        "the kernel is locked down; tracepoints are allowed in integrity mode, so check that the \
         BPF LSM or a seccomp profile is not blocking bpf()"
    } else {
        "check that the process has CAP_BPF and CAP_PERFMON and that bpf() is not blocked by seccomp"
    };
    LoadError::Denied(format!(
        "{what}: {err}: permission denied; {hint}; --source synthetic needs no privileges"
    ))
}

fn is_permission(e: &dyn std::error::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

/// Loads and attaches every program.
pub fn load(config: &ProbeConfig, ring_bytes: u32) -> Result<Probe, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NotBuilt);
    }
    let root = tracefs::tracefs_root()?;
    let set_state = tracefs::set_state(&Format::read(&root, "sock", "inet_sock_set_state")?)?;
    let retransmit = tracefs::retransmit(&Format::read(&root, "tcp", "tcp_retransmit_skb")?)?;
    let probe = tracefs::probe(&Format::read(&root, "tcp", "tcp_probe")?)?;
    let send = tracefs::length(&Format::read(&root, "sock", "sock_send_length")?)?;
    let recv = tracefs::length(&Format::read(&root, "sock", "sock_recv_length")?)?;
    if send != recv {
        return Err(LoadError::Load(
            "sock_send_length and sock_recv_length differ in layout on this kernel".into(),
        ));
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("SET_STATE", &set_state, true)
        .override_global("RETRANSMIT", &retransmit, true)
        .override_global("PROBE", &probe, true)
        .override_global("LENGTH", &send, true)
        .override_global("CONFIG", config, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
        .map_err(|e| {
            if is_permission(&e) {
                denied("loading eBPF maps and programs", &chain(&e))
            } else {
                LoadError::Load(chain(&e))
            }
        })?;
    for (prog, category, name) in PROGRAMS {
        let tracepoint = format!("{category}:{name}");
        let attach_err = |reason: String| LoadError::Attach {
            tracepoint: tracepoint.clone(),
            reason,
        };
        let program: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| attach_err(format!("program `{prog}` missing from the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_err(chain(&e)))?;
        program.load().map_err(|e| {
            if is_permission(&e) {
                denied(&format!("loading program {prog}"), &chain(&e))
            } else {
                attach_err(chain(&e))
            }
        })?;
        program
            .attach(category, name)
            .map_err(|e| attach_err(chain(&e)))?;
    }
    let ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| LoadError::Load("map EVENTS missing".into()))?,
    )
    .map_err(|e| LoadError::Load(chain(&e)))?;
    let drops = PerCpuArray::try_from(
        ebpf.take_map("DROPS")
            .ok_or_else(|| LoadError::Load("map DROPS missing".into()))?,
    )
    .map_err(|e| LoadError::Load(chain(&e)))?;
    tracing::info!(ring_bytes, "eBPF programs attached to 5 tracepoints");
    Ok(Probe {
        _ebpf: ebpf,
        ring,
        drops,
    })
}
