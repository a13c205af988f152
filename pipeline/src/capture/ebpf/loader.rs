//! Loads the embedded kernel object, hands it this kernel's socket layout (from its BTF) and the
//! filters, and attaches the programs to their BTF tracepoints. Failures say what is wrong and how to
//! fix it.

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Ebpf, EbpfLoader};
use probe_common::{CgroupOffsets, ProbeConfig, SockOffsets};

use super::btf::{Btf, BtfError};

/// The kernel programs, built by `pipeline/build.rs` from `probe-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcplake-probe"));

/// (program, tracepoint category, tracepoint name); each program has its tracepoint's name.
const PROGRAMS: [(&str, &str); 6] = [
    ("inet_sock_set_state", "sock"),
    ("tcp_retransmit_skb", "tcp"),
    ("tcp_probe", "tcp"),
    ("sock_send_length", "sock"),
    ("sock_recv_length", "sock"),
    // Reports new cgroups (their ring buffer, CGROUPS); records nothing if its offsets were not found.
    ("cgroup_mkdir", "cgroup"),
];

/// Why the probe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this tcplake was built without its eBPF programs (AYA_BUILD_SKIP); rebuild without it, or use --source synthetic")]
    NotBuilt,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("{what}: {source}: permission denied; {hint}; --source synthetic needs no privileges")]
    Denied {
        what: String,
        hint: &'static str,
        #[source]
        source: Cause,
    },
    #[error("loading eBPF programs")]
    Load(#[source] Cause),
    #[error("the eBPF object has no {0}: this build is broken")]
    Missing(String),
    #[error("tracepoint {name} passes {n} arguments on this kernel, tcplake needs {need}")]
    Args {
        name: &'static str,
        n: usize,
        need: usize,
    },
    #[error("attaching to tracepoint {tracepoint}")]
    Attach {
        tracepoint: String,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// The error of aya or the kernel under tcplake's own.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A loaded, attached probe: the ring buffers to drain and the drop counters to read.
pub struct Probe {
    /// Keeps the programs attached; dropping it detaches them.
    _ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    /// New cgroups' ids and paths; `None` where the kernel's BTF lacks what `cgroup_mkdir` reads.
    pub cgroups: Option<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
}

impl Probe {
    /// Records lost in the kernel because the ring buffer was full, summed over CPUs.
    pub fn drops(&self) -> u64 {
        self.drops_at(0)
    }

    /// New cgroups the kernel could not report because their ring buffer was full.
    pub fn cgroup_drops(&self) -> u64 {
        self.drops_at(1)
    }

    fn drops_at(&self, slot: u32) -> u64 {
        self.drops
            .get(&slot, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// Where `cgroup_mkdir`'s program finds a cgroup's id and hierarchy on this kernel; `valid: 0` (the
/// program then records nothing) if the kernel's BTF lacks one of them.
fn cgroup_offsets(btf: &Btf) -> CgroupOffsets {
    let found = (|| -> Result<CgroupOffsets, BtfError> {
        if btf.tracepoint_args("cgroup_mkdir")? < 2 {
            return Err(BtfError::Malformed(
                "cgroup_mkdir passes fewer than 2 arguments",
            ));
        }
        Ok(CgroupOffsets {
            kn: btf.field("cgroup", "kn")?.0,
            kn_id: btf.field("kernfs_node", "id")?.0,
            root: btf.field("cgroup", "root")?.0,
            hierarchy_id: btf.field("cgroup_root", "hierarchy_id")?.0,
            valid: 1,
        })
    })();
    found.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cgroups made after start resolve only while they exist (the kernel's cgroup_mkdir is not usable)");
        CgroupOffsets::default()
    })
}

/// Explains a permission failure: the usual causes here are privileges and kernel lockdown.
fn denied(what: &str, source: Cause) -> LoadError {
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
    LoadError::Denied {
        what: what.to_string(),
        hint,
        source,
    }
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

/// Where the programs find what they read on this kernel.
fn sock_offsets(btf: &Btf) -> Result<SockOffsets, LoadError> {
    let common = |f: &str| {
        btf.field("sock", &format!("__sk_common.{f}"))
            .map(|(o, _)| o)
    };
    let offsets = SockOffsets {
        family: common("skc_family")?,
        state: common("skc_state")?,
        num: common("skc_num")?,
        dport: common("skc_dport")?,
        rcv_saddr: common("skc_rcv_saddr")?,
        daddr: common("skc_daddr")?,
        v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        v6_daddr: common("skc_v6_daddr")?,
        protocol: btf.field("sock", "sk_protocol")?.0,
        srtt_us: btf.field("tcp_sock", "srtt_us")?.0,
        snd_cwnd: btf.field("tcp_sock", "snd_cwnd")?.0,
        retransmit_has_err: u32::from(btf.tracepoint_args("tcp_retransmit_skb")? >= 3),
    };
    // The arguments the programs read must be there (their types are checked by the verifier).
    for (name, args) in [
        ("inet_sock_set_state", 3),
        ("tcp_probe", 2),
        ("sock_send_length", 3),
        ("sock_recv_length", 3),
    ] {
        let n = btf.tracepoint_args(name)?;
        if n < args {
            return Err(LoadError::Args {
                name,
                n,
                need: args,
            });
        }
    }
    Ok(offsets)
}

/// Loads and attaches every program.
pub fn load(config: &ProbeConfig, ring_bytes: u32) -> Result<Probe, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NotBuilt);
    }
    let btf = Btf::from_sys_fs()?;
    let offsets = sock_offsets(&btf)?;
    let cgroup = cgroup_offsets(&btf);
    // aya's own copy of the kernel types, which BTF programs are loaded against.
    let kernel_types = aya::Btf::from_sys_fs().map_err(|e| LoadError::Load(e.into()))?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&kernel_types))
        .override_global("SOCK", &offsets, true)
        .override_global("CONFIG", config, true)
        .override_global("CGROUP", &cgroup, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
        .map_err(|e| {
            if is_permission(&e) {
                denied("loading eBPF maps and programs", e.into())
            } else {
                LoadError::Load(e.into())
            }
        })?;
    for (prog, category) in PROGRAMS {
        if prog == "cgroup_mkdir" && cgroup.valid == 0 {
            // Its kernel lacks what it reads (warned above): capture goes on without it.
            continue;
        }
        let tracepoint = format!("{category}:{prog}");
        let attach_err = |source| LoadError::Attach {
            tracepoint: tracepoint.clone(),
            source,
        };
        let program: &mut BtfTracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| LoadError::Missing(format!("program `{prog}`")))?
            .try_into()
            .map_err(attach_err)?;
        program.load(prog, &kernel_types).map_err(|e| {
            if is_permission(&e) {
                denied(&format!("loading program {prog}"), e.into())
            } else {
                attach_err(e)
            }
        })?;
        program.attach().map_err(attach_err)?;
    }
    let cgroups = (cgroup.valid == 1)
        .then(|| ebpf.take_map("CGROUPS"))
        .flatten()
        .map(RingBuf::try_from)
        .transpose()
        .map_err(|e| LoadError::Load(e.into()))?;
    let ring = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| LoadError::Missing("map EVENTS".into()))?,
    )
    .map_err(|e| LoadError::Load(e.into()))?;
    let drops = PerCpuArray::try_from(
        ebpf.take_map("DROPS")
            .ok_or_else(|| LoadError::Missing("map DROPS".into()))?,
    )
    .map_err(|e| LoadError::Load(e.into()))?;
    tracing::info!(
        ring_bytes,
        cgroup_mkdir = cgroups.is_some(),
        "eBPF programs attached to 6 tracepoints (BTF)"
    );
    Ok(Probe {
        _ebpf: ebpf,
        ring,
        cgroups,
        drops,
    })
}
