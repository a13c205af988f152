//! Decoding the kernel record ([`probe_common::TcpEvent`]) into the domain [`Event`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use probe_common as pc;

use super::{Comm, Event, EventKind, Role, TcpState};

/// Why a kernel record could not be decoded. Such records are counted and skipped, never guessed at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
    #[error("unknown TCP state {0}")]
    UnknownState(u8),
    #[error("unknown connection role {0}")]
    UnknownRole(u8),
}

/// Converts one kernel record. `boot_to_unix_us` is the offset from the kernel's boot clock to UTC
/// (µs); `seq` is the position the capture stage assigns in the node's stream.
pub fn decode(rec: &pc::TcpEvent, boot_to_unix_us: i64, seq: u64) -> Result<Event, DecodeError> {
    let (local_addr, remote_addr) = match rec.family {
        pc::FAMILY_IPV4 => (v4(&rec.saddr), v4(&rec.daddr)),
        pc::FAMILY_IPV6 => (
            IpAddr::V6(Ipv6Addr::from(rec.saddr)),
            IpAddr::V6(Ipv6Addr::from(rec.daddr)),
        ),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let state = |n: u8| TcpState::from_kernel(n).ok_or(DecodeError::UnknownState(n));
    let kind = match rec.kind {
        pc::KIND_STATE_CHANGE => EventKind::StateChange {
            old: state(rec.old_state)?,
            new: state(rec.new_state)?,
        },
        pc::KIND_RETRANSMIT => EventKind::Retransmit {
            state: state(rec.new_state)?,
        },
        pc::KIND_RTT_SAMPLE => EventKind::RttSample {
            srtt_us: rec.srtt_us,
            snd_cwnd: rec.snd_cwnd,
        },
        pc::KIND_BYTES_SENT => EventKind::BytesSent { bytes: rec.bytes },
        pc::KIND_BYTES_RECEIVED => EventKind::BytesReceived { bytes: rec.bytes },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Event {
        seq,
        // Kernel time is u64 ns since boot: far below i64::MAX µs for any real uptime.
        ts_us: boot_to_unix_us + (rec.ts_ns / 1_000) as i64,
        sock_id: rec.sock_id,
        cgroup_id: rec.cgroup_id,
        // Resolved from the id by the capture (see `capture::ebpf::cgroups`).
        cgroup: None,
        // Named by the capture when it runs with Kubernetes (see `capture::kubernetes`).
        pod: None,
        role: Some(Role::from_kernel(rec.role).ok_or(DecodeError::UnknownRole(rec.role))?),
        pid: rec.pid,
        comm: Comm::from_bytes(&rec.comm),
        local_addr,
        local_port: rec.sport,
        remote_addr,
        remote_port: rec.dport,
        kind,
    })
}

fn v4(raw: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> pc::TcpEvent {
        let mut r = pc::TcpEvent::zeroed();
        r.ts_ns = 5_000_000;
        r.family = pc::FAMILY_IPV4;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        r.sport = 40000;
        r.dport = 443;
        r.pid = 42;
        r.comm[..4].copy_from_slice(b"curl");
        r
    }

    #[test]
    fn decodes_every_kind() {
        let mut r = record();
        r.kind = pc::KIND_STATE_CHANGE;
        r.old_state = 2;
        r.new_state = 1;
        let e = decode(&r, 1_000, 7).unwrap();
        assert_eq!(e.ts_us, 6_000);
        assert_eq!(e.seq, 7);
        assert_eq!(e.local_addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.remote_addr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(e.comm.as_str(), "curl");
        assert_eq!(
            e.kind,
            EventKind::StateChange {
                old: TcpState::SynSent,
                new: TcpState::Established
            }
        );
        r.kind = pc::KIND_BYTES_RECEIVED;
        r.bytes = 99;
        assert_eq!(
            decode(&r, 0, 0).unwrap().kind,
            EventKind::BytesReceived { bytes: 99 }
        );
        r.kind = pc::KIND_RTT_SAMPLE;
        r.srtt_us = 120;
        r.snd_cwnd = 10;
        assert_eq!(
            decode(&r, 0, 0).unwrap().kind,
            EventKind::RttSample {
                srtt_us: 120,
                snd_cwnd: 10
            }
        );
    }

    #[test]
    fn decodes_ipv6() {
        let mut r = record();
        r.family = pc::FAMILY_IPV6;
        r.kind = pc::KIND_BYTES_SENT;
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        let e = decode(&r, 0, 0).unwrap();
        assert_eq!(e.local_addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        let mut r = record();
        r.kind = 99;
        assert_eq!(decode(&r, 0, 0), Err(DecodeError::UnknownKind(99)));
        r.kind = pc::KIND_STATE_CHANGE;
        r.old_state = 200;
        assert_eq!(decode(&r, 0, 0), Err(DecodeError::UnknownState(200)));
        r.family = 3;
        assert_eq!(decode(&r, 0, 0), Err(DecodeError::UnknownFamily(3)));
    }
}
