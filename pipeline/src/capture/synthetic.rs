//! The synthetic source: a deterministic TCP workload for tests and benchmarks.
//!
//! Everything is derived from the seed and the start time, never the wall clock, so the same settings
//! always produce the same events, whatever the batch size or how fast they are consumed. The shape is
//! what a busy node sees: many short connections and a few heavy ones, Zipf-like popularity of remote
//! services, IPv4 and IPv6, full lifecycles (handshake, orderly close or reset), RTT samples and
//! occasional retransmits. Exactly `total` events are produced; connections still open at the end stay
//! open (as they would when a capture stops).

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::rng::Rng;
use crate::event::{Cgroup, Comm, Event, EventBatch, EventKind, Pod, Role, TcpState};

/// Settings of the synthetic workload.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    pub seed: u64,
    /// Events to produce, exactly.
    pub total: u64,
    /// Event time of the first event, µs since the epoch.
    pub start_us: i64,
    /// Simulated event rate: sets how fast event time advances (events per simulated second).
    pub events_per_sim_sec: u64,
}

/// A service the node talks to or serves: port, process serving it, popularity rank = list position.
const SERVICES: &[(u16, &str)] = &[
    (443, "envoy"),
    (5432, "postgres"),
    (6379, "redis-server"),
    (80, "nginx"),
    (9092, "kafka"),
    (8080, "java"),
    (53, "coredns"),
    (3306, "mysqld"),
    (9200, "elasticsearch"),
    (2379, "etcd"),
];
/// Client processes on the node.
const CLIENTS: &[&str] = &["envoy", "java", "python3", "curl", "node", "grpc-worker"];
const REMOTES_V4: usize = 200;
const REMOTES_V6: usize = 50;
/// Connections kept open at once (the generator opens new ones below this).
const TARGET_ACTIVE: usize = 400;

struct Conn {
    sock_id: u64,
    pid: u32,
    comm: Comm,
    cgroup_id: u64,
    cgroup: Cgroup,
    pod: Option<Pod>,
    local_addr: IpAddr,
    local_port: u16,
    remote_addr: IpAddr,
    remote_port: u16,
    /// Passive side (server) closes through CLOSE_WAIT/LAST_ACK.
    server: bool,
    heavy: bool,
    base_rtt_us: f64,
    /// Data events left before the connection closes.
    budget: u32,
}

/// The deterministic workload generator.
pub struct Synthetic {
    node: Arc<str>,
    rng: Rng,
    cfg: SyntheticConfig,
    emitted: u64,
    clock_us: f64,
    active: Vec<Conn>,
    next_sock: u64,
    /// Events already generated but not yet handed out (a handshake or close is several events).
    pending: VecDeque<(u64, EventKind, usize)>,
    /// Every `n`-th event this many µs late.
    late: Option<(u64, i64)>,
    /// Each process's cgroup and pod, made once.
    cgroups: Vec<(&'static str, Cgroup, Option<Pod>)>,
}

fn process_ids(comm: &str) -> (u32, u64) {
    // Stable per process name: the same comm always has the same pid/cgroup in a run.
    let h = comm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (1000 + (h % 30_000) as u32, 0x1_0000 + (h >> 48))
}

/// The cgroup a process of the workload runs in, of the shapes a node has: pods' containers
/// (systemd driver), system services, a login session.
fn process_cgroup(comm: &str) -> String {
    let h = comm.bytes().fold(0x8422_2325_cbf2_9ce4u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let hex = |n: usize, salt: u64| -> String {
        (0..n)
            .map(|i| {
                let v = (h.rotate_left((i as u32 * 7 + salt as u32) % 64) >> 3) % 16;
                char::from_digit(v as u32, 16).unwrap_or('0')
            })
            .collect()
    };
    match comm {
        "envoy" | "java" | "grpc-worker" | "node" | "python3" | "coredns" => {
            let uid = format!(
                "{}_{}_{}_{}_{}",
                hex(8, 1),
                hex(4, 2),
                hex(4, 3),
                hex(4, 4),
                hex(12, 5)
            );
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{}.scope",
                hex(64, 6)
            )
        }
        "curl" => "/user.slice/user-1000.slice/session-3.scope".into(),
        service => format!("/system.slice/{service}.service"),
    }
}

impl Synthetic {
    pub fn new(node: Arc<str>, cfg: SyntheticConfig) -> Self {
        Synthetic {
            late: None,
            node,
            rng: Rng::new(cfg.seed),
            clock_us: cfg.start_us as f64,
            next_sock: 0xffff_8880_0000_0000 | (cfg.seed & 0xffff) << 24,
            cfg,
            emitted: 0,
            active: Vec::with_capacity(TARGET_ACTIVE),
            pending: VecDeque::new(),
            cgroups: Vec::new(),
        }
    }

    /// Makes every `every`-th event (seq `every - 1`, `2 * every - 1`, ...) arrive `by_us` late: its
    /// time is that much before its neighbours' (a straggler, as a slow CPU or a clock step makes).
    pub fn with_late(mut self, every: u64, by_us: i64) -> Self {
        self.late = Some((every.max(1), by_us));
        self
    }

    /// Events left to produce.
    pub fn remaining(&self) -> u64 {
        self.cfg.total - self.emitted
    }

    /// Continues a stream another run committed up to `seq` (exclusive): the events before it are
    /// generated and dropped, so the ones after are exactly those that run would have produced.
    pub fn resume_at(&mut self, seq: u64) {
        while self.emitted < seq.min(self.cfg.total) {
            self.next_event();
        }
    }

    /// The next batch of at most `max` events, or `None` once all `total` were produced.
    pub fn next_batch(&mut self, max: usize) -> Option<EventBatch> {
        let n = (max as u64).min(self.remaining()) as usize;
        if n == 0 {
            return None;
        }
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next_event());
        }
        Some(EventBatch::new(Arc::clone(&self.node), events, None))
    }

    fn next_event(&mut self) -> Event {
        while self.pending.is_empty() {
            self.step();
        }
        let (sock_id, kind, idx) = self.pending.pop_front().expect("step queued an event");
        let mean_gap = 1e6 / self.cfg.events_per_sim_sec.max(1) as f64;
        self.clock_us += self.rng.exp(mean_gap);
        let c = &self.active[idx];
        debug_assert_eq!(c.sock_id, sock_id);
        let late = self
            .late
            .filter(|(every, _)| self.emitted % every == every - 1)
            .map_or(0, |(_, by)| by);
        let e = Event {
            seq: self.emitted,
            ts_us: self.clock_us as i64 - late,
            sock_id,
            cgroup_id: c.cgroup_id,
            cgroup: Some(c.cgroup.clone()),
            pod: c.pod.clone(),
            role: Some(if c.server { Role::Server } else { Role::Client }),
            pid: c.pid,
            comm: c.comm,
            local_addr: c.local_addr,
            local_port: c.local_port,
            remote_addr: c.remote_addr,
            remote_port: c.remote_port,
            kind,
        };
        self.emitted += 1;
        if self.pending.is_empty() && self.active[idx].budget == 0 {
            // The close sequence of this connection has been handed out entirely.
            self.active.swap_remove(idx);
        }
        e
    }

    /// Generates the next thing that happens on the node: a connection opens or one acts.
    fn step(&mut self) {
        let open = self.active.is_empty()
            || (self.active.len() < TARGET_ACTIVE && self.rng.below(100) < 12);
        if open {
            let idx = self.open_conn();
            let c = &self.active[idx];
            let (first, second) = if c.server {
                (
                    (TcpState::Listen, TcpState::SynRecv),
                    (TcpState::SynRecv, TcpState::Established),
                )
            } else {
                (
                    (TcpState::Close, TcpState::SynSent),
                    (TcpState::SynSent, TcpState::Established),
                )
            };
            let s = c.sock_id;
            for (old, new) in [first, second] {
                self.pending
                    .push_back((s, EventKind::StateChange { old, new }, idx));
            }
            return;
        }
        let idx = self.rng.below(self.active.len() as u64) as usize;
        let r = self.rng.below(1000);
        let c = &mut self.active[idx];
        let s = c.sock_id;
        let small = |rng: &mut Rng| 64 + rng.below(4_000);
        let kind = match r {
            0..=449 => EventKind::BytesSent {
                bytes: if c.heavy {
                    16_384 + self.rng.below(240_000)
                } else {
                    small(&mut self.rng)
                },
            },
            450..=799 => EventKind::BytesReceived {
                bytes: if c.heavy {
                    8_192 + self.rng.below(120_000)
                } else {
                    small(&mut self.rng)
                },
            },
            800..=989 => EventKind::RttSample {
                srtt_us: (c.base_rtt_us * (0.8 + 0.6 * self.rng.unit())) as u32,
                snd_cwnd: 10 + self.rng.below(90) as u32,
            },
            _ => EventKind::Retransmit {
                state: TcpState::Established,
            },
        };
        self.pending.push_back((s, kind, idx));
        c.budget -= 1;
        if c.budget == 0 {
            let reset = self.rng.below(100) < 5;
            let seq: &[(TcpState, TcpState)] = if reset {
                &[(TcpState::Established, TcpState::Close)]
            } else if c.server {
                &[
                    (TcpState::Established, TcpState::CloseWait),
                    (TcpState::CloseWait, TcpState::LastAck),
                    (TcpState::LastAck, TcpState::Close),
                ]
            } else {
                &[
                    (TcpState::Established, TcpState::FinWait1),
                    (TcpState::FinWait1, TcpState::FinWait2),
                    (TcpState::FinWait2, TcpState::Close),
                ]
            };
            for &(old, new) in seq {
                self.pending
                    .push_back((s, EventKind::StateChange { old, new }, idx));
            }
        }
    }

    fn open_conn(&mut self) -> usize {
        let rng = &mut self.rng;
        let (port, server_comm) = SERVICES[rng.skewed(SERVICES.len())];
        let v6 = rng.below(100) < 20;
        let (local_addr, remote_addr, remote_rank) = if v6 {
            let r = rng.skewed(REMOTES_V6);
            let remote = Ipv6Addr::new(0xfd00, 0xbeef, 0, 0, 0, 0, (r / 256) as u16, 1 + r as u16);
            (
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
                IpAddr::V6(remote),
                r,
            )
        } else {
            let r = rng.skewed(REMOTES_V4);
            let remote = Ipv4Addr::new(10, 1 + (r / 250) as u8, (r % 250) as u8, 10);
            (
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
                IpAddr::V4(remote),
                r,
            )
        };
        // A third of connections are inbound to a service this node runs.
        let server = rng.below(3) == 0;
        let ephemeral = 32_768 + rng.below(28_232) as u16;
        let comm_str = if server {
            server_comm
        } else {
            CLIENTS[rng.skewed(CLIENTS.len())]
        };
        let (local_port, remote_port) = if server {
            (port, ephemeral)
        } else {
            (ephemeral, port)
        };
        let heavy = rng.below(100) < 4;
        let budget = if heavy {
            200 + rng.below(4_000)
        } else {
            1 + rng.below(12)
        } as u32;
        let (pid, cgroup_id) = process_ids(comm_str);
        let (cgroup, pod) = match self.cgroups.iter().find(|(c, _, _)| *c == comm_str) {
            Some((_, g, p)) => (g.clone(), p.clone()),
            None => {
                let g = Cgroup::new(&process_cgroup(comm_str));
                // The pods' names, as a watch of the API server would give them.
                let p = g.pod_uid().map(|_| {
                    let workload = comm_str.replace('3', "");
                    Pod::new(
                        &format!(
                            "{workload}-6c9f8d7b5-{}",
                            g.container_id().and_then(|id| id.get(..5)).unwrap_or("x")
                        ),
                        if comm_str == "coredns" {
                            "kube-system"
                        } else {
                            "shop"
                        },
                        "Deployment",
                        &workload,
                        &self.node,
                    )
                });
                self.cgroups.push((comm_str, g.clone(), p.clone()));
                (g, p)
            }
        };
        self.next_sock += 0x100;
        self.active.push(Conn {
            sock_id: self.next_sock,
            pid,
            comm: Comm::from_bytes(comm_str.as_bytes()),
            cgroup_id,
            cgroup,
            pod,
            local_addr,
            local_port,
            remote_addr,
            remote_port,
            server,
            heavy,
            // Popular remotes are close (same zone); the tail is far away.
            base_rtt_us: 150.0 + remote_rank as f64 * 400.0,
            budget,
        });
        self.active.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(total: u64) -> SyntheticConfig {
        SyntheticConfig {
            seed: 42,
            total,
            start_us: 1_767_225_600_000_000,
            events_per_sim_sec: 20_000,
        }
    }

    fn all(batch: usize, total: u64) -> Vec<Event> {
        let mut s = Synthetic::new("n".into(), cfg(total));
        let mut out = Vec::new();
        while let Some(b) = s.next_batch(batch) {
            out.extend(b.events);
        }
        out
    }

    #[test]
    fn exactly_n_events_with_consecutive_seqs_whatever_the_batch_size() {
        let a = all(1, 5_001);
        let b = all(4096, 5_001);
        assert_eq!(a.len(), 5_001);
        assert_eq!(a, b);
        assert!(a.iter().enumerate().all(|(i, e)| e.seq == i as u64));
        assert!(
            a.windows(2).all(|w| w[0].ts_us <= w[1].ts_us),
            "event time must not go back"
        );
    }

    #[test]
    fn different_seeds_differ() {
        let mut s = Synthetic::new(
            "n".into(),
            SyntheticConfig {
                seed: 43,
                ..cfg(100)
            },
        );
        assert_ne!(s.next_batch(100).unwrap().events, all(100, 100));
    }

    #[test]
    fn workload_has_the_promised_shape() {
        let ev = all(10_000, 200_000);
        let count = |f: &dyn Fn(&EventKind) -> bool| ev.iter().filter(|e| f(&e.kind)).count();
        let opened = count(&|k| {
            matches!(
                k,
                EventKind::StateChange {
                    new: TcpState::Established,
                    ..
                }
            )
        });
        let resets = count(&|k| {
            matches!(
                k,
                EventKind::StateChange {
                    old: TcpState::Established,
                    new: TcpState::Close
                }
            )
        });
        let retx = count(&|k| matches!(k, EventKind::Retransmit { .. }));
        let rtt = count(&|k| matches!(k, EventKind::RttSample { .. }));
        let v6 = ev.iter().filter(|e| e.local_addr.is_ipv6()).count();
        assert!(opened > 5_000, "many connections: {opened}");
        assert!(resets > 100, "some resets: {resets}");
        assert!(retx > 500 && rtt > 10_000, "retransmits {retx}, rtt {rtt}");
        assert!(v6 > 10_000 && v6 < 100_000, "both families: {v6}");
        // Heavy hitters: the top 5 % of sockets by bytes carry most of the bytes.
        let mut by_sock = std::collections::HashMap::<u64, u64>::new();
        for e in &ev {
            if let EventKind::BytesSent { bytes } | EventKind::BytesReceived { bytes } = e.kind {
                *by_sock.entry(e.sock_id).or_default() += bytes;
            }
        }
        let mut v: Vec<u64> = by_sock.into_values().collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let top: u64 = v[..v.len() / 20].iter().sum();
        assert!(
            top * 2 > v.iter().sum::<u64>(),
            "top 5 % carry over half the bytes"
        );
    }
}
