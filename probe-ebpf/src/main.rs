//! tcplake's kernel programs.
//!
//! Five BTF tracepoints (`tp_btf`: this kernel has no kprobes and refuses fentry), each a thin
//! `#[btf_tracepoint]` fn over a `try_*` fn, all writing [`TcpEvent`]s into one ring buffer:
//!
//! | tracepoint | emits |
//! |---|---|
//! | `sock:inet_sock_set_state` | state changes; flushes byte counters on close |
//! | `tcp:tcp_retransmit_skb` | retransmits |
//! | `tcp:tcp_probe` | RTT/cwnd, at most one sample per socket per interval |
//! | `sock:sock_send_length`, `sock:sock_recv_length` | nothing directly: bytes are summed per socket and flushed periodically and on close |
//!
//! **Attribution.** pid/comm/cgroup are only trustworthy in process context, so they are recorded per
//! socket (`SOCKS`, keyed by the socket address) where the process is known: `connect` (the move to
//! `SYN_SENT`), `listen` (inherited by the sockets the listener accepts), or the first send/recv. Events
//! raised in softirq context use the socket's recorded owner, never the interrupted task.
//!
//! **Cost and portability.** A BTF tracepoint gets the raw arguments (the socket, states, lengths):
//! the kernel formats no trace record for it, and the programs read the socket fields they need with
//! direct loads the verifier checks against the kernel's types, not a helper call per field. Their
//! offsets come from the kernel's BTF at load time (a read-only global set by the loader, which the
//! verifier sees as constants), not from this build's headers.
//!
//! **Cost.** Records are submitted with `BPF_RB_NO_WAKEUP`; user space drains on a timer. A full ring
//! buffer is counted in `DROPS`, never silent.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no compare-and-swap, so core's atomics lack fetch_add there; the intrinsic lowers
// to the BPF atomic add instruction directly.
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod programs;

/// Host builds (`cargo clippy --workspace`, `cargo test --workspace`) compile an empty binary; the
/// programs are built for the BPF target by `pipeline/build.rs` and linted there with nightly clippy.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
