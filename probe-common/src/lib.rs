//! The one event record shared by the kernel programs (`probe-ebpf`) and user space (`pipeline`).
//!
//! The layout is `#[repr(C)]` with explicit padding and no `bool` (a `Pod` type must have no implicit
//! padding bytes, and the verifier rejects reads of uninitialised stack). Its size is asserted at compile
//! time so a field added on one side without the other breaks the build, not the data.
//!
//! Every kind of TCP telemetry travels in the same record; [`TcpEvent::kind`] says which fields carry
//! meaning:
//!
//! | kind | meaningful fields |
//! |---|---|
//! | [`KIND_STATE_CHANGE`] | `old_state`, `new_state` |
//! | [`KIND_RETRANSMIT`] | `new_state` (socket state at the retransmit) |
//! | [`KIND_RTT_SAMPLE`] | `srtt_us`, `snd_cwnd` |
//! | [`KIND_BYTES_SENT`], [`KIND_BYTES_RECEIVED`] | `bytes` |
#![no_std]

/// TCP state change seen by `sock:inet_sock_set_state`.
pub const KIND_STATE_CHANGE: u16 = 1;
/// A segment retransmitted (`tcp:tcp_retransmit_skb`).
pub const KIND_RETRANSMIT: u16 = 2;
/// Smoothed RTT and congestion window sample (`tcp:tcp_probe`).
pub const KIND_RTT_SAMPLE: u16 = 3;
/// Bytes handed to the socket by the application since the previous record for this socket.
pub const KIND_BYTES_SENT: u16 = 4;
/// Bytes read from the socket by the application since the previous record for this socket.
pub const KIND_BYTES_RECEIVED: u16 = 5;

/// `AF_INET`.
pub const FAMILY_IPV4: u16 = 2;
/// `AF_INET6`.
pub const FAMILY_IPV6: u16 = 10;

/// The socket's start was not seen (it predates the capture).
pub const ROLE_UNKNOWN: u8 = 0;
/// The socket connected (`connect`: it went to `SYN_SENT`).
pub const ROLE_CLIENT: u8 = 1;
/// The socket was accepted on a listener (born in `SYN_RECV`).
pub const ROLE_SERVER: u8 = 2;

/// Length of the kernel's `task->comm`.
pub const COMM_LEN: usize = 16;

/// One TCP telemetry record, as written by the kernel into the ring buffer.
///
/// Addresses are in network byte order; an IPv4 address occupies the first 4 bytes of its 16-byte
/// field and the rest is zero. Ports are in host byte order. Timestamps are `bpf_ktime_get_boot_ns`
/// (nanoseconds since boot, counting suspend); user space converts them to UTC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    /// Nanoseconds since boot.
    pub ts_ns: u64,
    /// Kernel address of the socket: identifies one connection for its lifetime.
    pub sock_id: u64,
    /// cgroup v2 id of the task that owns the socket (joins flows to containers/pods).
    pub cgroup_id: u64,
    /// Byte count for the bytes kinds.
    pub bytes: u64,
    /// Local address (network byte order).
    pub saddr: [u8; 16],
    /// Remote address (network byte order).
    pub daddr: [u8; 16],
    /// Process id (thread group id) of the owning task.
    pub pid: u32,
    /// Smoothed RTT in microseconds (RTT samples).
    pub srtt_us: u32,
    /// Congestion window in segments (RTT samples).
    pub snd_cwnd: u32,
    /// Local port (host byte order).
    pub sport: u16,
    /// Remote port (host byte order).
    pub dport: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u16,
    /// One of the `KIND_*` constants.
    pub kind: u16,
    /// TCP state before the change (kernel numbering, `TCP_ESTABLISHED` = 1 ...).
    pub old_state: u8,
    /// TCP state after the change.
    pub new_state: u8,
    /// [`ROLE_CLIENT`], [`ROLE_SERVER`] or [`ROLE_UNKNOWN`].
    pub role: u8,
    /// Explicit padding: always zero.
    pub _pad: u8,
    /// `task->comm` of the owning task, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Size of [`TcpEvent`] in bytes; checked at compile time on both sides.
pub const TCP_EVENT_SIZE: usize = 104;

const _: () = assert!(core::mem::size_of::<TcpEvent>() == TCP_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<TcpEvent>() == 8);

impl TcpEvent {
    /// An all-zero record, the starting point the kernel programs fill in.
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            sock_id: 0,
            cgroup_id: 0,
            bytes: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            pid: 0,
            srtt_us: 0,
            snd_cwnd: 0,
            sport: 0,
            dport: 0,
            family: 0,
            kind: 0,
            old_state: 0,
            new_state: 0,
            role: ROLE_UNKNOWN,
            _pad: 0,
            comm: [0; COMM_LEN],
        }
    }
}

/// Longest cgroup path a [`CgroupRecord`] carries whole (a Kubernetes container's is ~190 bytes).
pub const CGROUP_PATH_LEN: usize = 512;

/// A cgroup created (`cgroup:cgroup_mkdir`) in the cgroup v2 hierarchy: its id and path, sent as it is
/// made, so events of a cgroup removed before user space reads them still resolve to its path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupRecord {
    /// The cgroup's id (the `cgroup_id` of events).
    pub id: u64,
    /// Bytes of the path read, without its NUL; [`CGROUP_PATH_UNREAD`] if it could not be read. A
    /// path of `CGROUP_PATH_LEN - 1` bytes or more may have been cut.
    pub len: u32,
    /// Explicit padding: always zero.
    pub _pad: u32,
    /// The path from the hierarchy's root (`/system.slice/nginx.service`), NUL padded.
    pub path: [u8; CGROUP_PATH_LEN],
}

/// Size of [`CgroupRecord`] in bytes.
pub const CGROUP_RECORD_SIZE: usize = 16 + CGROUP_PATH_LEN;

const _: () = assert!(core::mem::size_of::<CgroupRecord>() == CGROUP_RECORD_SIZE);

/// [`CgroupRecord::len`] of a path the kernel could not read.
pub const CGROUP_PATH_UNREAD: u32 = u32::MAX;

/// Where the fields `cgroup_mkdir(struct cgroup *cgrp, const char *path)` follows sit on this kernel
/// (byte offsets, from its BTF, like [`SockOffsets`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    /// `cgroup.kn` (`struct kernfs_node *`).
    pub kn: u32,
    /// `kernfs_node.id` (u64): the cgroup's id.
    pub kn_id: u32,
    /// `cgroup.root` (`struct cgroup_root *`).
    pub root: u32,
    /// `cgroup_root.hierarchy_id` (int): 0 for the cgroup v2 hierarchy.
    pub hierarchy_id: u32,
    /// 1 when the loader found all of the above (else the program records nothing).
    pub valid: u32,
}

/// Where the fields the programs read sit in the running kernel's `struct sock` / `struct tcp_sock`
/// (byte offsets from the socket pointer a BTF tracepoint passes), and what its tracepoints pass.
///
/// Looked up in the kernel's BTF at load time and handed to the programs as a read-only global: the
/// verifier treats its values as constants, so a program reads `sk + offset` directly (no helper call),
/// and one object runs on kernels whose layouts differ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `__sk_common.skc_family` (u16).
    pub family: u32,
    /// `__sk_common.skc_state` (u8).
    pub state: u32,
    /// `__sk_common.skc_num`: local port, host order (u16).
    pub num: u32,
    /// `__sk_common.skc_dport`: remote port, network order (u16).
    pub dport: u32,
    /// `__sk_common.skc_rcv_saddr` (IPv4, 4 bytes).
    pub rcv_saddr: u32,
    /// `__sk_common.skc_daddr` (IPv4, 4 bytes).
    pub daddr: u32,
    /// `__sk_common.skc_v6_rcv_saddr` (16 bytes).
    pub v6_rcv_saddr: u32,
    /// `__sk_common.skc_v6_daddr` (16 bytes).
    pub v6_daddr: u32,
    /// `sk_protocol` (u16).
    pub protocol: u32,
    /// `tcp_sock.srtt_us` (u32, smoothed RTT in 1/8 µs).
    pub srtt_us: u32,
    /// `tcp_sock.snd_cwnd` (u32).
    pub snd_cwnd: u32,
    /// 1 if `tcp_retransmit_skb` passes the transmit result (`err`, kernels >= 6.9) as a third argument.
    pub retransmit_has_err: u32,
}

/// Run-time settings of the programs, set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Only connections with this local or remote port (0 = all).
    pub filter_port: u32,
    /// Only connections owned by this process (0 = all).
    pub filter_pid: u32,
    /// Connections owned by this process are ignored (tcplake's own S3/broker traffic; 0 = none).
    pub exclude_pid: u32,
    /// 1: only state changes into `SYN_SENT`, `ESTABLISHED` and `CLOSE` are recorded (the ones flows
    /// count: attempts, opens, closes and resets, with the true previous state); the closing
    /// handshake's intermediate states are not. 0: every state change.
    pub lifecycle_only: u32,
    /// Only connections owned by a task in this cgroup (0 = all).
    pub filter_cgroup: u64,
    /// At most one RTT sample per socket per this many nanoseconds.
    pub rtt_interval_ns: u64,
    /// Byte counters are flushed per socket at most this often (and always on close).
    pub flush_interval_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], made only of integers, with no implicit padding (checked below).
    unsafe impl aya::Pod for super::TcpEvent {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::CgroupRecord {}
    unsafe impl aya::Pod for super::CgroupOffsets {}
}

const _: () = assert!(core::mem::size_of::<SockOffsets>() == 12 * 4);
const _: () = assert!(core::mem::size_of::<ProbeConfig>() == 16 + 24);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// The offsets are part of the kernel/user contract: pin them.
    #[test]
    fn layout_is_stable() {
        assert_eq!(offset_of!(TcpEvent, ts_ns), 0);
        assert_eq!(offset_of!(TcpEvent, saddr), 32);
        assert_eq!(offset_of!(TcpEvent, daddr), 48);
        assert_eq!(offset_of!(TcpEvent, pid), 64);
        assert_eq!(offset_of!(TcpEvent, sport), 76);
        assert_eq!(offset_of!(TcpEvent, kind), 82);
        assert_eq!(offset_of!(TcpEvent, old_state), 84);
        assert_eq!(offset_of!(TcpEvent, role), 86);
        assert_eq!(offset_of!(TcpEvent, _pad), 87);
        assert_eq!(offset_of!(TcpEvent, comm), 88);
    }
}
