//! Names the process behind events the kernel could only see from softirq context.
//!
//! The kernel programs record a socket's owner (pid, comm, cgroup) wherever it is known in process
//! context: `connect`, `listen` (inherited by the connections the listener accepts), or the first
//! send/recv. A connection accepted on a listener that predates tcplake, or a socket opened before it,
//! has no known owner until its process next sends or receives, so its first events arrive with pid 0
//! ("unknown"). Rather than guess from whatever task was interrupted, this stage holds a socket's
//! unattributed events until its owner shows up, then releases them with the owner filled in. Events
//! whose socket closes, or stays unowned for the hold time, are released unattributed (pid 0,
//! empty comm): late-bound, never dropped.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::event::{Cgroup, Comm, Event, EventKind, TcpState};

/// Upper bound on events held at once; past it everything held is released (memory stays bounded).
const MAX_HELD_EVENTS: usize = 65_536;
/// Upper bound on remembered owners; sockets whose close was never seen would otherwise accumulate.
const MAX_OWNERS: usize = 262_144;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    pid: u32,
    comm: Comm,
    cgroup_id: u64,
    cgroup: Option<Cgroup>,
}

struct Held {
    since: Instant,
    events: Vec<Event>,
}

/// Per-socket owner memory and the events waiting for one.
pub struct Attribution {
    hold: Duration,
    owners: FxHashMap<u64, Owner>,
    held: FxHashMap<u64, Held>,
    held_events: usize,
}

fn closes(e: &Event) -> bool {
    matches!(
        e.kind,
        EventKind::StateChange {
            new: TcpState::Close,
            ..
        }
    )
}

impl Attribution {
    pub fn new(hold: Duration) -> Self {
        Attribution {
            hold,
            owners: FxHashMap::default(),
            held: FxHashMap::default(),
            held_events: 0,
        }
    }

    /// Events currently waiting for an owner.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held_events
    }

    /// Takes one decoded event; appends to `out` whatever can be released now, in order.
    pub fn push(&mut self, mut e: Event, now: Instant, out: &mut Vec<Event>) {
        if e.pid != 0 {
            let owner = Owner {
                pid: e.pid,
                comm: e.comm,
                cgroup_id: e.cgroup_id,
                cgroup: e.cgroup.clone(),
            };
            if self.owners.len() >= MAX_OWNERS {
                self.owners.clear();
            }
            if let Some(h) = self.held.remove(&e.sock_id) {
                self.held_events -= h.events.len();
                out.extend(h.events.into_iter().map(|mut w| {
                    apply(&mut w, &owner);
                    w
                }));
            }
            // Already known (the usual case: every event of an owned socket names it): no copy.
            if self.owners.get(&e.sock_id) != Some(&owner) {
                self.owners.insert(e.sock_id, owner);
            }
        } else if let Some(owner) = self.owners.get(&e.sock_id) {
            apply(&mut e, owner);
        } else if !closes(&e) {
            let h = self.held.entry(e.sock_id).or_insert_with(|| Held {
                since: now,
                events: Vec::new(),
            });
            h.events.push(e);
            self.held_events += 1;
            if self.held_events > MAX_HELD_EVENTS {
                self.release_all(out);
            }
            return;
        } else if let Some(h) = self.held.remove(&e.sock_id) {
            // Closed without ever showing its owner: release what waited, unattributed.
            self.held_events -= h.events.len();
            out.extend(h.events);
        }
        let sock = e.sock_id;
        let close = closes(&e);
        out.push(e);
        if close {
            self.owners.remove(&sock);
        }
    }

    /// Releases, unattributed, the events of sockets that waited longer than the hold time.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Event>) {
        if self.held.is_empty() {
            return;
        }
        let hold = self.hold;
        let mut expired: Vec<(u64, Held)> = Vec::new();
        self.held.retain(|&sock, h| {
            if now.duration_since(h.since) >= hold {
                expired.push((
                    sock,
                    std::mem::replace(
                        h,
                        Held {
                            since: now,
                            events: Vec::new(),
                        },
                    ),
                ));
                false
            } else {
                true
            }
        });
        // Release in arrival order, as if nothing had waited.
        expired.sort_by_key(|(_, h)| h.events.first().map(|e| e.seq));
        for (_, h) in expired {
            self.held_events -= h.events.len();
            out.extend(h.events);
        }
    }

    /// Releases everything held (capture is stopping).
    pub fn release_all(&mut self, out: &mut Vec<Event>) {
        let mut all: Vec<Held> = self.held.drain().map(|(_, h)| h).collect();
        all.sort_by_key(|h| h.events.first().map(|e| e.seq));
        for h in all {
            out.extend(h.events);
        }
        self.held_events = 0;
    }
}

fn apply(e: &mut Event, o: &Owner) {
    e.pid = o.pid;
    e.comm = o.comm;
    e.cgroup_id = o.cgroup_id;
    e.cgroup.clone_from(&o.cgroup);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, sock: u64, pid: u32, kind: EventKind) -> Event {
        Event {
            seq,
            ts_us: seq as i64,
            sock_id: sock,
            cgroup_id: u64::from(pid) * 10,
            cgroup: None,
            pod: None,
            role: Some(crate::event::Role::Server),
            pid,
            comm: Comm::from_bytes(if pid == 0 { b"" } else { b"server" }),
            local_addr: "127.0.0.1".parse().unwrap(),
            local_port: 80,
            remote_addr: "127.0.0.1".parse().unwrap(),
            remote_port: 5000,
            kind,
        }
    }

    const OPEN: EventKind = EventKind::StateChange {
        old: TcpState::SynRecv,
        new: TcpState::Established,
    };
    const CLOSE: EventKind = EventKind::StateChange {
        old: TcpState::LastAck,
        new: TcpState::Close,
    };
    const RECV: EventKind = EventKind::BytesReceived { bytes: 10 };

    #[test]
    fn softirq_events_wait_for_the_owner_and_take_it() {
        let t = Instant::now();
        let mut a = Attribution::new(Duration::from_secs(1));
        let mut out = Vec::new();
        a.push(ev(0, 1, 0, OPEN), t, &mut out);
        assert!(out.is_empty());
        assert_eq!(a.held(), 1);
        a.push(ev(1, 1, 42, RECV), t, &mut out);
        a.push(ev(2, 1, 0, CLOSE), t, &mut out);
        let owners: Vec<(u64, u32, u64)> =
            out.iter().map(|e| (e.seq, e.pid, e.cgroup_id)).collect();
        assert_eq!(owners, vec![(0, 42, 420), (1, 42, 420), (2, 42, 420)]);
        assert_eq!(out[0].comm.as_str(), "server");
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn unowned_sockets_are_released_on_close_or_timeout_never_dropped() {
        let t = Instant::now();
        let mut a = Attribution::new(Duration::from_secs(1));
        let mut out = Vec::new();
        a.push(ev(0, 1, 0, OPEN), t, &mut out);
        a.push(ev(1, 1, 0, CLOSE), t, &mut out);
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1]);
        out.clear();
        a.push(ev(2, 2, 0, OPEN), t, &mut out);
        a.expire(t + Duration::from_millis(500), &mut out);
        assert!(out.is_empty());
        a.expire(t + Duration::from_secs(1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].pid, 0);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn owner_is_forgotten_after_close() {
        let t = Instant::now();
        let mut a = Attribution::new(Duration::from_secs(1));
        let mut out = Vec::new();
        a.push(ev(0, 1, 42, RECV), t, &mut out);
        a.push(ev(1, 1, 0, CLOSE), t, &mut out);
        assert_eq!(out[1].pid, 42);
        // The kernel reuses socket addresses: a new connection must not inherit the old owner.
        a.push(ev(2, 1, 0, OPEN), t, &mut out);
        assert_eq!(out.len(), 2);
        a.release_all(&mut out);
        assert_eq!(out[2].pid, 0);
    }
}
