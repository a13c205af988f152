//! The eBPF source: live TCP telemetry from the kernel programs in `probe-ebpf`.
//!
//! The kernel writes records into one ring buffer without waking us; this source drains it on a short
//! timer, decodes records into [`Event`]s with consecutive `seq` numbers, and cuts a batch when it is
//! full or [`BATCH_LATENCY`] has passed. Every batch carries the capture clock so windows close even
//! when no traffic flows. Undecodable records and kernel-side drops are counted, never ignored. Each
//! event's cgroup id is resolved to the cgroup's path ([`cgroups`]).

mod attribution;
pub mod btf;
pub mod cgroups;
pub mod loader;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use probe_common::{CgroupRecord, ProbeConfig, TcpEvent, CGROUP_RECORD_SIZE, TCP_EVENT_SIZE};

use crate::capture::kubernetes::{self, KubernetesConfig, PodDirectory, PodLookup};
use crate::event::kernel::decode;
use crate::event::{Event, EventBatch};
use crate::metrics::CaptureMetrics;
pub use loader::LoadError;

/// How often the ring buffer is drained.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest an event waits in user space before its batch is sent.
const BATCH_LATENCY: Duration = Duration::from_millis(200);
/// Longest capture holds its first batches at start (draining the kernel meanwhile) for the node's
/// pods to be listed, so its first events carry their names; past it, names come with the list.
const PODS_LISTED_WAIT: Duration = Duration::from_secs(5);
/// Longest a softirq-only event waits for its socket's owner (see [`attribution`]).
const ATTRIBUTION_HOLD: Duration = Duration::from_secs(1);

/// Settings of the eBPF source.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// Only connections with this local or remote port.
    pub port: Option<u16>,
    /// Only sockets of this process.
    pub pid: Option<u32>,
    /// Only sockets of processes in this cgroup (v2 id).
    pub cgroup_id: Option<u64>,
    /// Leave this process's own connections out (its uploads, its broker).
    pub exclude_self: bool,
    /// Least time between two RTT samples of a socket.
    pub rtt_interval: Duration,
    /// How long a socket's byte counts fold in the kernel before they are sent.
    pub flush_interval: Duration,
    /// Record only the state changes flows count (into `SYN_SENT`, `ESTABLISHED`, `CLOSE`).
    pub lifecycle_only: bool,
    pub ring_bytes: u32,
    /// Stop once this many events were captured (unbounded when `None`).
    pub max_events: Option<u64>,
    /// Name the pods of events with Kubernetes names from this API server.
    pub kubernetes: Option<KubernetesConfig>,
}

impl EbpfConfig {
    /// What the kernel programs read (`probe_common::ProbeConfig`, its layout shared with them).
    fn probe(&self) -> ProbeConfig {
        ProbeConfig {
            filter_port: self.port.map_or(0, u32::from),
            filter_pid: self.pid.unwrap_or(0),
            exclude_pid: if self.exclude_self {
                std::process::id()
            } else {
                0
            },
            lifecycle_only: u32::from(self.lifecycle_only),
            filter_cgroup: self.cgroup_id.unwrap_or(0),
            rtt_interval_ns: self.rtt_interval.as_nanos() as u64,
            flush_interval_ns: self.flush_interval.as_nanos() as u64,
        }
    }
}

/// Live capture from the kernel.
pub struct EbpfSource {
    probe: loader::Probe,
    node: Arc<str>,
    seq: u64,
    /// Arrival order of decoded records (provisional `seq` while attribution may hold them).
    arrivals: u64,
    attribution: attribution::Attribution,
    cgroups: cgroups::Resolver,
    /// Records read from the ring buffer, before they are decoded (a buffer kept between drains).
    records: Vec<TcpEvent>,
    /// Kubernetes names, when asked for: the watch's directory, and this source's cached lookups.
    pods: Option<Pods>,
    boot_to_unix_us: i64,
    pending: Vec<Event>,
    remaining: Option<u64>,
    metrics: Arc<crate::metrics::Metrics>,
    reported_drops: u64,
    reported_cgroup_drops: u64,
    last_cut: Instant,
    poll: tokio::time::Interval,
}

/// The pod watch of a source: stopped when the source is dropped.
struct Pods {
    dir: Arc<PodDirectory>,
    lookup: PodLookup,
    started: Instant,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Pods {
    /// Starts the watch of `cfg.node`'s pods in the background.
    fn start(cfg: KubernetesConfig, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let dir = Arc::new(PodDirectory::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let watched = Arc::clone(&dir);
        tokio::spawn(async move {
            match kubernetes::client(&cfg).await {
                Ok(client) => kubernetes::watch(client, cfg, watched, metrics, stopped).await,
                Err(e) => tracing::warn!(
                    error = %crate::storage::s3_requests::error_chain(&e),
                    "no Kubernetes names: events are written without them"
                ),
            }
        });
        Pods {
            lookup: PodLookup::new(Arc::clone(&dir)),
            dir,
            started: Instant::now(),
            _stop: stop,
        }
    }

    /// Batches may be cut: the pods were listed, or waiting for them has taken long enough.
    fn ready(&self) -> bool {
        self.dir.is_listed() || self.started.elapsed() >= PODS_LISTED_WAIT
    }

    /// Names the pods of `events` whose cgroup is a pod's.
    fn name(&mut self, events: &mut [Event], metrics: &crate::metrics::Metrics) {
        for e in events {
            if let Some(uid) = e.cgroup.as_ref().and_then(|c| c.pod_uid()) {
                e.pod = self.lookup.get(e.cgroup_id, uid, metrics);
            }
        }
    }
}

fn clock_us(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1_000
}

fn now_unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl EbpfSource {
    /// Loads and attaches the probe. Must be called inside a tokio runtime.
    pub fn start(
        node: Arc<str>,
        cfg: &EbpfConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, LoadError> {
        let probe = loader::load(&cfg.probe(), cfg.ring_bytes)?;
        // After the programs are attached: a cgroup made from now on is reported by the kernel.
        let cgroups = cgroups::Resolver::of_this_host();
        let pods = cfg
            .kubernetes
            .clone()
            .map(|k| Pods::start(k, Arc::clone(&metrics)));
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(EbpfSource {
            probe,
            node,
            seq: 0,
            arrivals: 0,
            attribution: attribution::Attribution::new(ATTRIBUTION_HOLD),
            cgroups,
            records: Vec::new(),
            pods,
            // Kernel timestamps count from boot (including suspend): shift them onto UTC once.
            boot_to_unix_us: clock_us(libc::CLOCK_REALTIME) - clock_us(libc::CLOCK_BOOTTIME),
            pending: Vec::new(),
            remaining: cfg.max_events,
            metrics,
            reported_drops: 0,
            reported_cgroup_drops: 0,
            last_cut: Instant::now(),
            poll,
        })
    }

    /// Numbers events from `seq` on: the stream continues where the last committed one ended.
    pub fn resume_at(&mut self, seq: u64) {
        self.seq = seq;
    }

    /// Learns the cgroups made since the last drain: before the events, which may be theirs.
    fn drain_cgroups(&mut self) {
        let Some(ring) = self.probe.cgroups.as_mut() else {
            return;
        };
        while let Some(item) = ring.next() {
            if item.len() < CGROUP_RECORD_SIZE {
                continue;
            }
            // SAFETY: at least CGROUP_RECORD_SIZE bytes of plain integers.
            let rec: CgroupRecord = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match cgroups::record_path(&rec) {
                Some(path) => self.cgroups.learn(rec.id, path),
                // Cut or unreadable: the id is looked up in the kernel when an event names it.
                None => tracing::debug!(id = rec.id, len = rec.len, "cgroup path not usable"),
            }
        }
    }

    fn drain(&mut self, max: usize) {
        let mut decode_errors = 0;
        let now = Instant::now();
        let first_new = self.pending.len();
        // The records first, then the cgroups made meanwhile: a cgroup is reported before any event
        // of it is written, so every cgroup these records name is then known.
        let mut records = std::mem::take(&mut self.records);
        let mut room = max.saturating_sub(self.pending.len());
        if let Some(r) = self.remaining {
            room = room.min(usize::try_from(r).unwrap_or(usize::MAX));
        }
        while records.len() < room {
            let Some(item) = self.probe.ring.next() else {
                break;
            };
            if item.len() < TCP_EVENT_SIZE {
                decode_errors += 1;
                continue;
            }
            // SAFETY: at least TCP_EVENT_SIZE bytes; TcpEvent is plain integers (any bit pattern is valid).
            records.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        self.drain_cgroups();
        self.cgroups.maintain(now);
        for rec in records.drain(..) {
            match decode(&rec, self.boot_to_unix_us, self.arrivals) {
                Ok(mut e) => {
                    e.cgroup = self.cgroups.resolve(e.cgroup_id);
                    self.arrivals += 1;
                    if let Some(r) = self.remaining.as_mut() {
                        *r -= 1;
                    }
                    self.attribution.push(e, now, &mut self.pending);
                }
                Err(err) => {
                    if decode_errors == 0 {
                        tracing::warn!(error = %err, "skipping an undecodable kernel record (counted)");
                    }
                    decode_errors += 1;
                }
            }
        }
        self.records = records;
        if decode_errors > 0 {
            self.capture_metrics().decode_errors.add(decode_errors);
        }
        let unresolved = self.cgroups.take_unresolved();
        if unresolved > 0 {
            self.capture_metrics().cgroups_unresolved.add(unresolved);
        }
        self.attribution.expire(now, &mut self.pending);
        if self.remaining == Some(0) {
            // Nothing more will come to claim held events.
            self.attribution.release_all(&mut self.pending);
        }
        self.number_from(first_new);
    }

    /// Final stream positions, in the order events leave this source.
    fn number_from(&mut self, start: usize) {
        for e in &mut self.pending[start..] {
            e.seq = self.seq;
            self.seq += 1;
        }
    }

    /// The events gathered so far, as the next batch: their pods named now, as late as possible.
    fn cut(&mut self) -> EventBatch {
        let mut events = std::mem::take(&mut self.pending);
        if let Some(pods) = self.pods.as_mut() {
            pods.name(&mut events, &self.metrics);
        }
        EventBatch::new(Arc::clone(&self.node), events, Some(now_unix_us()))
    }

    fn capture_metrics(&self) -> &CaptureMetrics {
        &self.metrics.capture
    }

    fn publish_drops(&mut self) {
        let cgroup_drops = self.probe.cgroup_drops();
        if cgroup_drops > self.reported_cgroup_drops {
            if self.reported_cgroup_drops == 0 {
                tracing::warn!("the kernel's cgroup ring buffer overflowed: new cgroups are looked up by id instead (see capture_cgroup_records_dropped)");
            }
            self.capture_metrics()
                .cgroup_records_dropped
                .add(cgroup_drops - self.reported_cgroup_drops);
            self.reported_cgroup_drops = cgroup_drops;
        }
        let drops = self.probe.drops();
        if drops > self.reported_drops {
            if self.reported_drops == 0 {
                tracing::warn!("the kernel ring buffer overflowed: records are being dropped (see kernel_drops)");
            }
            self.capture_metrics()
                .kernel_drops
                .add(drops - self.reported_drops);
            self.reported_drops = drops;
        }
    }

    /// Everything still in the ring buffer or gathered but not yet sent (capture is stopping).
    pub fn finish(&mut self) -> Option<EventBatch> {
        self.drain(usize::MAX);
        let start = self.pending.len();
        self.attribution.release_all(&mut self.pending);
        self.number_from(start);
        self.publish_drops();
        Some(self.cut())
    }

    /// The next batch: full, or whatever arrived within [`BATCH_LATENCY`] (possibly nothing: a
    /// heartbeat carrying the clock). `None` once `max_events` were delivered.
    pub async fn next_batch(&mut self, max: usize) -> Option<EventBatch> {
        loop {
            self.drain(max);
            let done = self.remaining == Some(0);
            if done && self.pending.is_empty() {
                self.publish_drops();
                return None;
            }
            // At start, batches wait (up to PODS_LISTED_WAIT) for the pods' names; the ring buffer is
            // drained all the while.
            let hold = self.pods.as_ref().is_some_and(|p| !p.ready());
            if self.pending.len() >= max
                || done
                || (!hold && self.last_cut.elapsed() >= BATCH_LATENCY)
            {
                self.publish_drops();
                self.last_cut = Instant::now();
                return Some(self.cut());
            }
            self.poll.tick().await;
        }
    }
}
