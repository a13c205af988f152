//! The programs themselves (compiled for the BPF target only); see the crate docs.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use probe_common::{
    CgroupOffsets, CgroupRecord, ProbeConfig, SockOffsets, TcpEvent, CGROUP_PATH_UNREAD, COMM_LEN,
    FAMILY_IPV4, FAMILY_IPV6, KIND_BYTES_RECEIVED, KIND_BYTES_SENT, KIND_RETRANSMIT,
    KIND_RTT_SAMPLE, KIND_STATE_CHANGE, ROLE_CLIENT, ROLE_SERVER,
};

const IPPROTO_TCP: u16 = 6;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_NOEXIST: u64 = 1;
const MSG_PEEK: i32 = 2;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

#[unsafe(no_mangle)]
static SOCK: SockOffsets = unsafe { core::mem::zeroed() };
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = unsafe { core::mem::zeroed() };
#[unsafe(no_mangle)]
static CGROUP: CgroupOffsets = unsafe { core::mem::zeroed() };

/// Reads a global the loader filled in. Volatile, so the compiler cannot fold the build-time zeros in.
/// (Plain statics rather than `aya_ebpf::Global`: the generic wrapper's name is not valid BTF.)
#[inline(always)]
fn load<T: Copy>(global: &T) -> T {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(global) }
}

/// Every record for user space. Its size is set by the loader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);
/// Per-socket state: owner, 4-tuple, pending byte counts, sampling clocks.
#[map]
static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65_536, 0);
/// Owner of each listening port, inherited by the connections accepted on it.
#[map]
static LISTENERS: HashMap<u32, Owner> = HashMap::with_max_entries(4_096, 0);
/// Records lost because a ring buffer was full (one counter per CPU): slot 0 events, slot 1 cgroups.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
/// Cgroups created in the cgroup v2 hierarchy, as they are made (rare: a small buffer of its own, so
/// a burst of TCP events never crowds them out).
#[map]
static CGROUPS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Owner {
    pid: u32,
    _pad: u32,
    cgroup_id: u64,
    comm: [u8; COMM_LEN],
}

#[repr(C)]
struct SockInfo {
    /// Bytes written since the last flush (updated atomically: several CPUs may touch one socket).
    bytes_sent: u64,
    /// Bytes read since the last flush.
    bytes_recv: u64,
    last_flush_ns: u64,
    last_rtt_ns: u64,
    /// Time of a `CLOSE -> SYN_SENT` not yet emitted: `connect` sets the state before it picks the
    /// local port, so that record waits until the 4-tuple is complete.
    pending_connect_ns: u64,
    owner: Owner,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    family: u16,
    has_owner: u8,
    has_tuple: u8,
    /// `ROLE_*`: set where the socket's start is seen.
    role: u8,
}

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> u32 {
    let _ = try_cgroup_mkdir(&ctx);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let _ = try_retransmit(&ctx);
    0
}

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe(ctx: BtfTracePointContext) -> u32 {
    let _ = try_probe(&ctx);
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> u32 {
    let _ = try_length(&ctx, KIND_BYTES_SENT);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> u32 {
    let _ = try_length(&ctx, KIND_BYTES_RECEIVED);
    0
}

/// A field of the socket a tracepoint passed, read directly: the verifier knows `sk`'s BTF type and
/// the offset (a constant from `SOCK`), and checks the access against the kernel's `struct sock`.
/// Volatile, so each read stays one load of exactly the field's size.
#[inline(always)]
fn field<T: Copy>(sk: *const u8, offset: u32) -> T {
    // SAFETY: `sk` is the tracepoint's socket (a kernel pointer the JIT reads fault-safely), `offset`
    // a field of it on this kernel (from its BTF, checked by the verifier).
    unsafe { core::ptr::read_volatile(sk.add(offset as usize).cast::<T>()) }
}

/// A 16-byte address field, as two loads.
#[inline(always)]
fn field16(sk: *const u8, offset: u32) -> [u8; 16] {
    let lo: u64 = field(sk, offset);
    let hi: u64 = field(sk, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_ne_bytes());
    out[8..].copy_from_slice(&hi.to_ne_bytes());
    out
}

fn current_owner() -> Owner {
    Owner {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        // SAFETY: plain helper call without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}

/// The state of socket `sk`, created empty on first sight.
#[inline(always)]
fn sock_info(sk: u64) -> Option<*mut SockInfo> {
    if let Some(p) = SOCKS.get_ptr_mut(sk) {
        return Some(p);
    }
    // SAFETY: SockInfo is plain integers; all-zero is its empty state.
    let empty: SockInfo = unsafe { core::mem::zeroed() };
    // Another CPU may win the race to insert: fine, use whichever entry exists.
    let _ = SOCKS.insert(sk, &empty, BPF_NOEXIST);
    SOCKS.get_ptr_mut(sk)
}

/// Reads the socket's 4-tuple once it is bound (addresses and ports never change after that).
#[inline(always)]
fn read_tuple(sk: *const u8, info: &mut SockInfo) {
    let o = load(&SOCK);
    let sport: u16 = field(sk, o.num);
    if sport == 0 {
        // Not bound yet (connect in progress): keep what we have.
        return;
    }
    let family: u16 = field(sk, o.family);
    if family == FAMILY_IPV4 {
        let s: u32 = field(sk, o.rcv_saddr);
        let d: u32 = field(sk, o.daddr);
        info.saddr = [0; 16];
        info.daddr = [0; 16];
        info.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        info.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    } else if family == FAMILY_IPV6 {
        info.saddr = field16(sk, o.v6_rcv_saddr);
        info.daddr = field16(sk, o.v6_daddr);
    } else {
        return;
    }
    info.family = family;
    info.sport = sport;
    info.dport = u16::from_be(field(sk, o.dport));
    info.has_tuple = 1;
}

fn passes_filters(cfg: &ProbeConfig, info: &SockInfo) -> bool {
    let pid = info.owner.pid;
    if cfg.exclude_pid != 0 && pid == cfg.exclude_pid {
        return false;
    }
    if cfg.filter_pid != 0 && pid != cfg.filter_pid {
        return false;
    }
    if cfg.filter_cgroup != 0 && info.owner.cgroup_id != cfg.filter_cgroup {
        return false;
    }
    let port = cfg.filter_port;
    port == 0 || u32::from(info.sport) == port || u32::from(info.dport) == port
}

/// One record into the ring buffer, or one more drop counted.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit(
    info: &SockInfo,
    sk: u64,
    ts_ns: u64,
    kind: u16,
    old_state: u8,
    new_state: u8,
    bytes: u64,
    srtt_us: u32,
    snd_cwnd: u32,
) {
    if info.has_tuple == 0 || !passes_filters(&load(&CONFIG), info) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<TcpEvent>(0) else {
        count_drop(0);
        return;
    };
    entry.write(TcpEvent {
        ts_ns,
        sock_id: sk,
        cgroup_id: info.owner.cgroup_id,
        bytes,
        saddr: info.saddr,
        daddr: info.daddr,
        pid: info.owner.pid,
        srtt_us,
        snd_cwnd,
        sport: info.sport,
        dport: info.dport,
        family: info.family,
        kind,
        old_state,
        new_state,
        role: info.role,
        _pad: 0,
        comm: info.owner.comm,
    });
    entry.submit(BPF_RB_NO_WAKEUP);
}

fn count_drop(slot: u32) {
    if let Some(d) = DROPS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *d += 1 };
    }
}

/// `*ptr += v` as one BPF atomic instruction (several CPUs may update one socket's counters).
#[inline(always)]
fn atomic_add(ptr: *mut u64, v: u64) {
    // SAFETY: callers pass an aligned u64 inside a live map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, v) };
}

/// Emits and resets the socket's pending byte counts.
#[inline(always)]
fn flush(info: *mut SockInfo, sk: u64, now: u64) {
    // SAFETY: `info` points into a map value; counters are only changed with atomic adds.
    let (sent_ptr, recv_ptr) =
        unsafe { (&raw mut (*info).bytes_sent, &raw mut (*info).bytes_recv) };
    for (ptr, kind) in [(sent_ptr, KIND_BYTES_SENT), (recv_ptr, KIND_BYTES_RECEIVED)] {
        // SAFETY: aligned u64 inside a live map value.
        let n = unsafe { core::ptr::read_volatile(ptr) };
        if n > 0 {
            // Subtract what is emitted rather than storing 0: bytes added meanwhile are kept.
            atomic_add(ptr, n.wrapping_neg());
            // SAFETY: as above.
            emit(unsafe { &*info }, sk, now, kind, 0, 0, n, 0, 0);
        }
    }
    // SAFETY: as above.
    unsafe { (*info).last_flush_ns = now };
}

fn try_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let o = load(&SOCK);
    // inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)
    let sk: *const u8 = ctx.arg(0);
    if field::<u16>(sk, o.protocol) != IPPROTO_TCP {
        return Ok(());
    }
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if new == TCP_LISTEN {
        // listen() runs in the owning process: remember it for the connections it will accept.
        let _ = LISTENERS.insert(u32::from(field::<u16>(sk, o.num)), current_owner(), 0);
        return Ok(());
    }
    if old == TCP_LISTEN {
        let port = u32::from(field::<u16>(sk, o.num));
        if new != TCP_SYN_RECV {
            // The listener itself closes.
            let _ = LISTENERS.remove(port);
            return Ok(());
        }
        // A connection accepted on the listener is born: the kernel clones the listener (state
        // included) and sets the clone to SYN_RECV. It inherits the listener's owner here, before any
        // data; its addresses are not all set yet, so its tuple is read at its next change. The birth
        // is not a transition of the connection: nothing is recorded.
        let info = unsafe { &mut *sock_info(sk as u64).ok_or(0)? };
        info.role = ROLE_SERVER;
        // SAFETY: map value read.
        if let Some(l) = unsafe { LISTENERS.get(port) } {
            info.owner = *l;
            info.has_owner = 1;
        }
        return Ok(());
    }
    let id = sk as u64;
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let info_ptr = sock_info(id).ok_or(0)?;
    // SAFETY: map value pointer, valid for this program run.
    let info = unsafe { &mut *info_ptr };
    if info.has_tuple == 0 {
        read_tuple(sk, info);
    }
    if info.role == 0 {
        // The start of a socket born before tcplake saw its listener, or of a connect.
        if new == TCP_SYN_SENT {
            info.role = ROLE_CLIENT;
        } else if old == TCP_SYN_RECV {
            info.role = ROLE_SERVER;
        }
    }
    if info.has_owner == 0 {
        if new == TCP_SYN_SENT {
            info.owner = current_owner();
            info.has_owner = 1;
        } else if new == TCP_SYN_RECV || old == TCP_SYN_RECV {
            // SAFETY: map value read.
            if let Some(l) = unsafe { LISTENERS.get(u32::from(info.sport)) } {
                info.owner = *l;
                info.has_owner = 1;
            }
        }
    }
    if new == TCP_SYN_SENT && info.has_tuple == 0 {
        info.pending_connect_ns = now;
        return Ok(());
    }
    if info.pending_connect_ns != 0 {
        let ts = info.pending_connect_ns;
        info.pending_connect_ns = 0;
        emit(
            info,
            id,
            ts,
            KIND_STATE_CHANGE,
            TCP_CLOSE as u8,
            TCP_SYN_SENT as u8,
            0,
            0,
            0,
        );
    }
    if new == TCP_CLOSE {
        flush(info_ptr, id, now);
    }
    let lifecycle = new == TCP_SYN_SENT || new == TCP_ESTABLISHED || new == TCP_CLOSE;
    if lifecycle || load(&CONFIG).lifecycle_only == 0 {
        emit(
            info,
            id,
            now,
            KIND_STATE_CHANGE,
            old as u8,
            new as u8,
            0,
            0,
            0,
        );
    }
    if new == TCP_CLOSE {
        let _ = SOCKS.remove(id);
    }
    Ok(())
}

fn try_retransmit(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let o = load(&SOCK);
    // tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb[, int err])
    if o.retransmit_has_err != 0 && ctx.arg::<i32>(2) != 0 {
        // The attempt failed (e.g. the device queue was busy): nothing went on the wire.
        return Ok(());
    }
    let sk: *const u8 = ctx.arg(0);
    let id = sk as u64;
    let state: u8 = field(sk, o.state);
    let info = unsafe { &mut *sock_info(id).ok_or(0)? };
    if info.has_tuple == 0 {
        read_tuple(sk, info);
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    emit(info, id, now, KIND_RETRANSMIT, 0, state, 0, 0, 0);
    Ok(())
}

fn try_probe(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let o = load(&SOCK);
    // tcp_probe(struct sock *sk, const struct sk_buff *skb)
    let sk: *const u8 = ctx.arg(0);
    let id = sk as u64;
    let info_ptr = sock_info(id).ok_or(0)?;
    // SAFETY: map value pointer, valid for this program run.
    let info = unsafe { &mut *info_ptr };
    if info.has_tuple == 0 {
        read_tuple(sk, info);
    }
    let cfg = load(&CONFIG);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now.wrapping_sub(info.last_rtt_ns) >= cfg.rtt_interval_ns {
        info.last_rtt_ns = now;
        // `tcp_sock` fields lie beyond `struct sock`, which is all the verifier lets `sk` reach
        // directly: read them with the helper (once per sample, not per segment).
        // SAFETY: the helper checks the access.
        let srtt = unsafe { bpf_probe_read_kernel(sk.add(o.srtt_us as usize).cast::<u32>()) }?;
        let cwnd = unsafe { bpf_probe_read_kernel(sk.add(o.snd_cwnd as usize).cast::<u32>()) }?;
        // The smoothed RTT is kept in 1/8 µs (what the `tcp_probe` record reports as `srtt`).
        emit(info, id, now, KIND_RTT_SAMPLE, 0, 0, 0, srtt >> 3, cwnd);
    }
    if now.wrapping_sub(info.last_flush_ns) >= cfg.flush_interval_ns {
        flush(info_ptr, id, now);
    }
    Ok(())
}

fn try_length(ctx: &BtfTracePointContext, kind: u16) -> Result<(), i32> {
    let o = load(&SOCK);
    // sock_{send,recv}_length(struct sock *sk, int ret, int flags)
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return Ok(());
    }
    let family: u16 = field(sk, o.family);
    if field::<u16>(sk, o.protocol) != IPPROTO_TCP
        || (family != FAMILY_IPV4 && family != FAMILY_IPV6)
    {
        return Ok(());
    }
    if kind == KIND_BYTES_RECEIVED && ctx.arg::<i32>(2) & MSG_PEEK != 0 {
        // A peek leaves the data in the socket: it is counted when actually read.
        return Ok(());
    }
    let id = sk as u64;
    let info_ptr = sock_info(id).ok_or(0)?;
    // SAFETY: map value pointer, valid for this program run.
    let info = unsafe { &mut *info_ptr };
    if info.has_owner == 0 {
        // send/recv run in the calling process: the first one names a socket we did not see open.
        info.owner = current_owner();
        info.has_owner = 1;
    }
    let counter = if kind == KIND_BYTES_SENT {
        &raw mut info.bytes_sent
    } else {
        &raw mut info.bytes_recv
    };
    atomic_add(counter, ret as u64);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if info.has_tuple != 0
        && now.wrapping_sub(info.last_flush_ns) >= load(&CONFIG).flush_interval_ns
    {
        flush(info_ptr, id, now);
    }
    Ok(())
}

/// Sends a new cgroup's id and path (`cgroup_mkdir(struct cgroup *cgrp, const char *path)`; `path` is
/// the cgroup's full path in its hierarchy).
fn try_cgroup_mkdir(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let o = load(&CGROUP);
    if o.valid == 0 {
        return Ok(());
    }
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // SAFETY: kernel pointers read with the helper, which checks every access; offsets from BTF.
    let (hierarchy, id) = unsafe {
        let root: *const u8 = bpf_probe_read_kernel(cgrp.add(o.root as usize).cast())?;
        let hierarchy: i32 = bpf_probe_read_kernel(root.add(o.hierarchy_id as usize).cast())?;
        let kn: *const u8 = bpf_probe_read_kernel(cgrp.add(o.kn as usize).cast())?;
        let id: u64 = bpf_probe_read_kernel(kn.add(o.kn_id as usize).cast())?;
        (hierarchy, id)
    };
    if hierarchy != 0 {
        // A cgroup v1 hierarchy: events carry cgroup v2 ids only.
        return Ok(());
    }
    let Some(mut entry) = CGROUPS.reserve::<CgroupRecord>(0) else {
        count_drop(1);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` is the reserved entry; the helper checks the read of `path`.
    unsafe {
        (*rec).id = id;
        (*rec)._pad = 0;
        (*rec).len = match bpf_probe_read_kernel_str_bytes(path, &mut (*rec).path) {
            Ok(read) => read.len() as u32,
            Err(_) => CGROUP_PATH_UNREAD,
        };
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
