//! The broker edge: NATS JetStream between processes (`--mode capture|aggregate|sink`).
//!
//! * Streams (created idempotently at startup, limits explicit): `TCPLAKE_EVENTS` on
//!   `tcplake.events.<node>`, `TCPLAKE_FLOWS` on `tcplake.flows.<shard>`, and `TCPLAKE_DEAD` on
//!   `tcplake.dead.<kind>` for messages that cannot be decoded. Retention is by limits with
//!   `discard: new`: a full stream refuses publishes (the producer waits and retries) instead of
//!   silently dropping the oldest data a consumer may still need.
//! * Producers publish many events per message ([`super::wire`]), one message at a time, each only
//!   after its predecessor on the subject is stored (`Nats-Expected-Last-Subject-Sequence`), so a
//!   producer's messages are stored in order even across broker restarts; a message id
//!   (`Nats-Msg-Id`: events `(node, first seq)` or a heartbeat's clock, flows `(producer, emission,
//!   first row)` and the claim it follows, `@<claim>`) recognises a retried message that was in fact
//!   stored.
//! * An aggregator claims its flows subject before it publishes (`Tcplake-Claim`,
//!   [`Broker::claim_shard`]): from then on, the subject's previous producer is refused.
//! * A stream ends with an end marker (header `Tcplake-End`) when a finite source is exhausted; a stop
//!   by signal sends none, so a restarted producer simply continues: every event message says the
//!   node's next `seq` (`Tcplake-Next-Seq`), and the first rows of a run that could not continue (its
//!   node's messages gone) say so (`Tcplake-Run-Start`).
//! * Consumers: aggregators read with an ordered consumer from the position their last published flow
//!   batch names (their own output is their checkpoint); the sink uses durable consumers and acks a
//!   message only once the files holding its rows are committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::wire::{self, WireError};
use super::{Ack, EdgeError, Rx, StreamFault, Tx};
use crate::event::{EventBatch, FlowBatch};
use crate::metrics::BrokerMetrics;
use crate::retry::Backoff;
use crate::secrets::Secret;
use crate::shutdown::Shutdown;
use Ends::AllSeenNodes;

pub const EVENTS_STREAM: &str = "TCPLAKE_EVENTS";
/// Partitioned streams: each node batch again, cut by flow key, one subject per partition and node
/// (`tcplake.part.<p>.<node>`), read by aggregator `p` alone (see [`super::partitioned`]).
pub const PARTS_STREAM: &str = "TCPLAKE_PARTS";
pub const FLOWS_STREAM: &str = "TCPLAKE_FLOWS";
pub const DEAD_STREAM: &str = "TCPLAKE_DEAD";
pub(crate) const END_HEADER: &str = "Tcplake-End";
/// On the first message of a capture run that found nothing of its node on the stream: its events'
/// `seq` start a numbering of their own there (see `mode::split::capture`), so a jump from what the
/// output holds is a new run, not a gap.
const RUN_START_HEADER: &str = "Tcplake-Run-Start";
/// On every event message: which event stream it belongs to (a hash of the capture's settings that
/// decide what it records), so a capture restarted with other settings does not continue the node's
/// stream.
const SOURCE_HEADER: &str = "Tcplake-Source";
/// On every event message: the `seq` the node's next event gets. A heartbeat (no rows) says where
/// the numbering stands as well as a batch, so a capture restarted after one continues it.
const NEXT_SEQ_HEADER: &str = "Tcplake-Next-Seq";
const MSG_ID: &str = "Nats-Msg-Id";
/// On a flows subject: an aggregator took the shard over from here (see [`Broker::claim_shard`]); the
/// value names the claimant. Consumers skip it.
pub(crate) const CLAIM_HEADER: &str = "Tcplake-Claim";
/// On a claim: the stream sequence of the shard's last flow message before it (0: none), where the
/// claimant resumed from.
const CHECKPOINT_HEADER: &str = "Tcplake-Checkpoint";
/// How long a failed publish is retried before the producing stage fails.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(120);
/// How long a process waits at its end for the broker to confirm the acks it sent.
const SETTLE_FOR: Duration = Duration::from_secs(10);

pub fn events_subject(node: &str) -> String {
    format!("tcplake.events.{node}")
}

pub fn part_subject(part: u32, node: &str) -> String {
    format!("tcplake.part.{part}.{node}")
}

/// The node of an events or partition subject.
fn node_of(subject: &str) -> Option<&str> {
    match subject.strip_prefix("tcplake.events.") {
        Some(node) => Some(node),
        None => subject
            .strip_prefix("tcplake.part.")?
            .split_once('.')
            .map(|(_, n)| n),
    }
}

/// Most partitions of the events stream: every capture batch is one message per partition, and each
/// partition one consumer in the aggregator that owns it.
pub const MAX_PARTITIONS: u32 = 64;

/// How the events stream records its partition count (its description): fixed when it is created,
/// learned by every later process.
const PARTITIONS_MARK: &str = "tcplake events; partitions=";

/// The partition count a description records (`None`: it records none that can be used).
fn recorded_partitions(description: Option<&str>) -> Option<u32> {
    match description {
        // A stream of an older tcplake says nothing: it is not partitioned.
        None | Some("") => Some(1),
        Some(d) => d
            .strip_prefix(PARTITIONS_MARK)
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=MAX_PARTITIONS).contains(n)),
    }
}

/// Where a shard stood when an aggregator claimed it ([`Broker::claim_shard`]).
pub enum Claimed {
    /// Its flows ended (an end marker): nothing is left to do.
    Ended,
    /// `last`: the last flow batch published before the claim (`None`: none yet), from which the
    /// claimant rebuilds what the shard held; `claim`: the claim's stream sequence, after which the
    /// claimant's own messages follow.
    From {
        last: Option<Box<FlowBatch>>,
        claim: u64,
    },
}

pub fn flows_subject(shard: u32) -> String {
    format!("tcplake.flows.{shard}")
}

/// A node name usable in a subject: letters, digits, `-` and `_`.
pub fn valid_node(node: &str) -> bool {
    !node.is_empty()
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// How the client proves who it is: the ways NATS users configure it.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerAuth {
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// A `.creds` file (user JWT + NKey seed).
    CredsFile(std::path::PathBuf),
    /// A user NKey seed.
    NKey(Secret),
}

impl BrokerAuth {
    /// What kind of credentials, for `--check-config` (never the values).
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerAuth::None => "none",
            BrokerAuth::UserPassword { .. } => "user+password",
            BrokerAuth::Token(_) => "token",
            BrokerAuth::CredsFile(_) => "creds-file",
            BrokerAuth::NKey(_) => "nkey",
        }
    }

    async fn apply(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, std::io::Error> {
        Ok(match self {
            BrokerAuth::None => opts,
            BrokerAuth::UserPassword { user, password } => {
                opts.user_and_password(user.clone(), password.expose().to_string())
            }
            BrokerAuth::Token(t) => opts.token(t.expose().to_string()),
            BrokerAuth::NKey(seed) => opts.nkey(seed.expose().to_string()),
            BrokerAuth::CredsFile(path) => opts.credentials_file(path).await?,
        })
    }
}

/// How to reach the broker and what limits its streams get.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerSettings {
    /// `nats://host:port`, without credentials (they are in `auth`): safe to log.
    pub url: String,
    pub auth: BrokerAuth,
    /// Keep retrying an unreachable broker at startup for this long.
    pub connect_for: Duration,
    /// Stream retention: messages older than this are removed.
    pub max_age: Duration,
    /// Stream retention: at most this many bytes per stream (then publishes wait).
    pub max_bytes: i64,
    /// Publishes awaiting their ack, per producer.
    /// zstd-compress message bodies.
    pub compress: bool,
    /// Sink: how long a delivered message may stay unacked before the broker redelivers it
    /// [default: the max file age + 30 s]. Redeliveries are deduplicated; a short wait after a sink
    /// crash makes the restarted sink get its messages sooner.
    pub ack_wait: Option<Duration>,
    /// Partitions of the events stream asked for (`None`: as the stream was created, or 1 when
    /// creating it). The stream records it; [`Broker::partitions`] is what it says.
    pub partitions: Option<u32>,
}

/// Any error of the NATS client, kept as the cause of tcplake's own.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the broker could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot reach the broker at {url} (tried for {secs} s; is nats-server running there, with \
         JetStream (-js)?)"
    )]
    Unreachable {
        url: String,
        secs: u64,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(
        "the broker at {url} refused tcplake's credentials (check the broker user and password, \
         token, NKey or credentials file)"
    )]
    Refused {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("broker at {url}: cannot use credentials file `{}`", path.display())]
    CredsFile {
        url: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("broker stream {name}")]
    Stream {
        name: &'static str,
        #[source]
        source: Cause,
    },
    #[error("broker stream {name}: the last message of {of} is unreadable")]
    Unreadable {
        name: &'static str,
        of: String,
        #[source]
        source: WireError,
    },
    #[error(
        "the broker cannot reserve {mib} MiB of JetStream storage for stream {name} (it reserves each \
         stream's limit up front): lower broker.max_bytes in the config file, or give nats-server more \
         JetStream storage (jetstream {{ max_file_store }}) or disk"
    )]
    NoRoom { name: &'static str, mib: i64 },
    #[error("broker consumer on {subject}")]
    Consumer {
        subject: String,
        #[source]
        source: Cause,
    },
    #[error(
        "broker consumer on {subject}: rebuilding the open windows needs messages from {from} on, but \
         retention already removed everything before {first} (raise broker.max_age / broker.max_bytes)"
    )]
    Retained {
        subject: String,
        from: u64,
        first: u64,
    },
    #[error(
        "node name `{0}` cannot be used in a broker subject: use letters, digits, `-` and `_` only"
    )]
    NodeName(String),
    #[error(
        "node `{node}`'s events on the broker were captured with other settings than this run's \
         ({run}): the source, its filters (a --cgroup or --pid by its id: a recreated cgroup is \
         another), recorded state changes, synthetic seed, start or lateness, or the replayed output \
         and range differ; run with the settings that recorded them, under another --node, or once \
         the node's messages have left the broker"
    )]
    SourceChanged { node: String, run: String },
    #[error(
        "this process asks for {asked} partitions (broker.partitions, --broker-partitions or \
         TCPLAKE_BROKER_PARTITIONS), but the events stream {name} was created with {recorded}: the \
         count is fixed when the streams are created, and every process learns it from the broker \
         (leave the setting unset). To change it, let the aggregators and sinks drain the streams, \
         stop every process, delete TCPLAKE_EVENTS, TCPLAKE_PARTS and TCPLAKE_FLOWS (`nats stream rm`) \
         and start again into a new output (--out)"
    )]
    PartitionsDisagree {
        name: &'static str,
        asked: u32,
        recorded: u32,
    },
    #[error(
        "the events stream TCPLAKE_EVENTS does not say how many partitions it has (its description \
         is `{description}`; tcplake records `tcplake events; partitions=P` there when it creates \
         the stream, and TCPLAKE_PARTS exists or the description was edited): restore it with \
         `nats stream edit TCPLAKE_EVENTS --description 'tcplake events; partitions=P'`"
    )]
    PartitionsUnknown { description: String },
    #[error(
        "the broker has a partitions stream TCPLAKE_PARTS but no events stream TCPLAKE_EVENTS (deleted \
         alone?): the partitions point into the old events stream; delete TCPLAKE_PARTS and \
         TCPLAKE_FLOWS too (`nats stream rm`) and start again into a new output (--out)"
    )]
    PartsWithoutEvents,
    #[error(
        "this aggregator is shard {index} of {count}, but the events stream is cut into {partitions} \
         partitions (broker.partitions), which {count} aggregators cannot share: each one takes the \
         partitions k with k mod N = I, so run at most {partitions} (--shard I/N with N <= \
         {partitions})"
    )]
    ShardsNotPartitions {
        index: u32,
        count: u32,
        partitions: u32,
    },
    #[error(
        "the claim at stream sequence {seq} of TCPLAKE_FLOWS (tcplake.flows.{shard}'s last message) \
         names checkpoint `{value}`, not a stream sequence (published by hand?): the shard's \
         aggregator cannot tell where to continue; delete it (`nats stream rmm TCPLAKE_FLOWS {seq}`) \
         so the message before it is the subject's last"
    )]
    BadClaim { shard: u32, seq: u64, value: String },
    #[error(
        "shard {shard}'s last flow batch (stream sequence {seq} of TCPLAKE_FLOWS) was removed by the \
         stream's retention (broker.max_age) before an aggregator claimed the shard, so its emissions \
         cannot be continued: the shard's running owner, if any, goes on; keep broker.max_age above \
         the longest time a shard goes without flows; to go on without it, write to a new output from \
         purged streams"
    )]
    CheckpointGone { shard: u32, seq: u64 },
}

/// A connection to JetStream with the tcplake streams in place.
#[derive(Clone)]
pub struct Broker {
    js: jetstream::Context,
    settings: BrokerSettings,
    metrics: Arc<BrokerMetrics>,
    /// Partitions of the events stream, as the stream records them (1: not partitioned).
    partitions: u32,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.settings.url)
            .finish()
    }
}

impl Broker {
    /// Connects (retrying with backoff for `connect_for`) and creates or updates the streams.
    pub async fn connect(
        settings: &BrokerSettings,
        metrics: Arc<BrokerMetrics>,
    ) -> Result<Self, BrokerError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let client = loop {
            let opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
            let opts = settings.auth.apply(opts).await.map_err(|source| {
                let BrokerAuth::CredsFile(path) = &settings.auth else {
                    unreachable!("only a credentials file is read")
                };
                BrokerError::CredsFile {
                    url: settings.url.clone(),
                    path: path.clone(),
                    source,
                }
            })?;
            match opts.connect(settings.url.as_str()).await {
                Ok(c) => break c,
                // Wrong credentials stay wrong: say so now instead of retrying for half a minute.
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::Authentication
                    ) =>
                {
                    return Err(BrokerError::Refused {
                        url: settings.url.clone(),
                        source: e,
                    })
                }
                Err(e) if started.elapsed() < settings.connect_for => {
                    if backoff.is_first() {
                        tracing::warn!(url = %settings.url, error = %e, "broker unreachable; retrying");
                    }
                    backoff.wait().await;
                }
                Err(e) => {
                    return Err(BrokerError::Unreachable {
                        url: settings.url.clone(),
                        secs: settings.connect_for.as_secs(),
                        source: e,
                    })
                }
            }
        };
        let mut broker = Broker {
            js: jetstream::new(client),
            settings: settings.clone(),
            metrics,
            partitions: 1,
        };
        let (partitions, existed) = broker.learn_partitions().await?;
        broker.partitions = partitions;
        let events = |p: u32| {
            (
                EVENTS_STREAM,
                "tcplake.events.>",
                settings.max_bytes,
                Some(p),
            )
        };
        if !existed {
            // Created here with the count recorded, unless another process created it meanwhile:
            // then that one's count holds (learned again, and refused if the setting disagrees).
            let (name, subjects, max_bytes, p) = events(partitions);
            match broker
                .js
                .create_stream(stream_config(settings, name, subjects, max_bytes, p))
                .await
            {
                Ok(_) => {}
                Err(e)
                    if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                {
                    broker.partitions = broker.learn_partitions().await?.0;
                }
                Err(e) => return Err(create_err(name, max_bytes, e)),
            }
        }
        // Dead letters are rare and small: they get a small fixed budget.
        let mut streams = vec![
            events(broker.partitions),
            (FLOWS_STREAM, "tcplake.flows.>", settings.max_bytes, None),
            (DEAD_STREAM, "tcplake.dead.>", 64 << 20, None),
        ];
        if broker.partitions > 1 {
            streams.push((PARTS_STREAM, "tcplake.part.>", settings.max_bytes, None));
        }
        for (name, subjects, max_bytes, p) in streams {
            broker
                .js
                .create_or_update_stream(stream_config(settings, name, subjects, max_bytes, p))
                .await
                .map_err(|e| create_err(name, max_bytes, e))?;
        }
        Ok(broker)
    }

    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.metrics
    }

    /// Partitions of the events stream (1: not partitioned), as the stream records them.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition count the events stream records, or (a new stream) the one asked for, which
    /// creating it then records. A stream that exists and disagrees with an explicit setting is
    /// refused: every process must read and write the same partitions.
    /// Also says whether the stream exists.
    async fn learn_partitions(&self) -> Result<(u32, bool), BrokerError> {
        let mut description = String::new();
        let recorded = match self.find_stream(EVENTS_STREAM).await? {
            Some(st) => {
                let d = st.cached_info().config.description.clone();
                description = d.clone().unwrap_or_default();
                match recorded_partitions(d.as_deref()) {
                    Some(p) => Some(p),
                    None => return Err(BrokerError::PartitionsUnknown { description }),
                }
            }
            None => None,
        };
        match (recorded, self.settings.partitions) {
            (Some(recorded), Some(asked)) if recorded != asked => {
                Err(BrokerError::PartitionsDisagree {
                    name: EVENTS_STREAM,
                    asked,
                    recorded,
                })
            }
            (Some(1), _) if self.find_stream(PARTS_STREAM).await?.is_some() => {
                // Partitioned once: a description rewritten since (by hand, or by an older tcplake)
                // must not turn its aggregators into readers of the other stream.
                Err(BrokerError::PartitionsUnknown { description })
            }
            (Some(recorded), _) => Ok((recorded, true)),
            // The events stream deleted alone: the partitions left behind point into the old one.
            (None, _) if self.find_stream(PARTS_STREAM).await?.is_some() => {
                Err(BrokerError::PartsWithoutEvents)
            }
            (None, asked) => Ok((asked.unwrap_or(1), false)),
        }
    }

    /// Stream `name`, if the broker has it.
    async fn find_stream(&self, name: &'static str) -> Result<Option<stream::Stream>, BrokerError> {
        match self.js.get_stream(name).await {
            Ok(st) => Ok(Some(st)),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(e) => Err(BrokerError::Stream {
                name,
                source: e.into(),
            }),
        }
    }

    /// Makes sure the acks released so far reached the broker: the last thing a consuming process
    /// does with it. An ack is a message the client only queues; without this, a process exiting
    /// right after its last commit can leave those deliveries unacked, and the broker hands them to
    /// the next run again (which skips them as committed, but had to read them).
    pub async fn settle(&self) {
        let client = self.js.client();
        // Flushed to the socket, then one request answered: the server read every ack before it.
        // Any answer will do, so it is not parsed into the client's account type (which fails on
        // nats-server 2.9's answer, and made every sink's exit warn that its acks may be lost).
        let round_trip = async {
            client.flush().await.map_err(|e| e.to_string())?;
            self.js
                .request::<_, [u8], serde_json::Value>("INFO", b"".as_slice())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(SETTLE_FOR, round_trip).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "the last acks may not have reached the broker; their messages will be delivered \
                 to the next run again and skipped as committed"
            ),
            Err(_) => tracing::warn!(
                "the broker did not confirm the last acks within {}s; their messages will be \
                 delivered to the next run again and skipped as committed",
                SETTLE_FOR.as_secs()
            ),
        }
    }

    async fn stream(&self, name: &'static str) -> Result<stream::Stream, BrokerError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| BrokerError::Stream {
                name,
                source: e.into(),
            })
    }

    /// The last message on `subject`, if any.
    pub(crate) async fn last_on(
        &self,
        name: &'static str,
        subject: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        let stream = self.stream(name).await?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(BrokerError::Stream {
                name,
                source: e.into(),
            }),
        }
    }

    /// Where a capture node's stream stands, from its last message on the stream.
    pub async fn capture_progress(&self, node: &str) -> Result<NodeProgress, BrokerError> {
        let Some(m) = self.last_on(EVENTS_STREAM, &events_subject(node)).await? else {
            return Ok(NodeProgress::Nothing);
        };
        if m.headers.get(END_HEADER).is_some() {
            return Ok(NodeProgress::Ended);
        }
        let unreadable = |source| BrokerError::Unreadable {
            name: EVENTS_STREAM,
            of: format!("node `{node}`"),
            source,
        };
        // The run-start mark is also on the run's first rows: only a message without rows says the
        // run has sent none yet.
        let run_start = m.headers.get(RUN_START_HEADER).is_some()
            && wire::decode_events(&m.payload)
                .map_err(unreadable)?
                .events
                .is_empty();
        let source = m.headers.get(SOURCE_HEADER).map(|v| v.as_str().to_string());
        if let Some(next) = m
            .headers
            .get(NEXT_SEQ_HEADER)
            .and_then(|v| v.as_str().parse().ok())
        {
            return Ok(NodeProgress::Next {
                next,
                run_start,
                source,
            });
        }
        // A message of an older tcplake: only a batch with rows says where the numbering stands.
        let batch = wire::decode_events(&m.payload).map_err(unreadable)?;
        Ok(match batch.events.last() {
            Some(e) => NodeProgress::Next {
                next: e.seq.saturating_add(1),
                run_start,
                source,
            },
            None => NodeProgress::Nothing,
        })
    }

    /// Takes shard `shard`'s flows subject over for an aggregator named `owner`: publishes a claim
    /// right after the subject's last message and returns where the shard stands there. From the claim
    /// on, a publish of the previous owner fails (its predecessor on the subject is no longer its own:
    /// [`StreamFault::Foreign`]) and it leaves the shard, so one aggregator at a time emits a shard's
    /// flows, and the new one continues from exactly the last flow message before its claim.
    pub async fn claim_shard(
        &self,
        shard: u32,
        count: u32,
        owner: &str,
    ) -> Result<Claimed, BrokerError> {
        let subject = flows_subject(shard);
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        let mut said = Instant::now();
        // Transient failures (a restarting server, a full stream) are retried as a publish is.
        let retry = |what: &str, error: &dyn std::fmt::Display| {
            if started.elapsed() >= PUBLISH_RETRY_FOR {
                return false;
            }
            tracing::warn!(shard, %error, "claiming the shard: {what} failed; retrying");
            true
        };
        loop {
            let tail = match self.last_on(FLOWS_STREAM, &subject).await {
                Ok(tail) => tail,
                Err(e) if retry("looking up its last message", &e) => {
                    backoff.wait().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (after, checkpoint) = match &tail {
                None => (0, 0),
                Some(m) if m.headers.get(END_HEADER).is_some() => return Ok(Claimed::Ended),
                // An earlier claim: the checkpoint it resumed from is still the last flow message.
                Some(m) if m.headers.get(CLAIM_HEADER).is_some() => {
                    let value = m.headers.get(CHECKPOINT_HEADER).map(|c| c.as_str());
                    let seq = value.and_then(|c| c.parse().ok()).ok_or_else(|| {
                        BrokerError::BadClaim {
                            shard,
                            seq: m.sequence,
                            value: value.unwrap_or("").to_string(),
                        }
                    })?;
                    (m.sequence, seq)
                }
                Some(m) => (m.sequence, m.sequence),
            };
            // The batch to resume from is read before the claim is made: a claim its claimant could
            // not follow would only stop the running owner.
            let last = match checkpoint {
                0 => None,
                seq => match self.flow_batch_at(shard, seq, tail.as_ref()).await {
                    Ok(batch) => Some(Box::new(batch)),
                    Err(e @ BrokerError::Stream { .. }) if retry("reading its last batch", &e) => {
                        backoff.wait().await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let id = format!("claim-{shard}-{after}-{owner}");
            let mut h = HeaderMap::new();
            h.insert(MSG_ID, id.as_str());
            h.insert(EXPECTED_LAST_SUBJECT_SEQ, after.to_string().as_str());
            h.insert(CLAIM_HEADER, owner);
            h.insert(SHARDS_HEADER, count.to_string().as_str());
            h.insert(CHECKPOINT_HEADER, checkpoint.to_string().as_str());
            let published = async {
                self.js
                    .publish_with_headers(subject.clone(), h, Bytes::new())
                    .await?
                    .await
            };
            let claim = match published.await {
                Ok(ack) => ack.sequence,
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    // Something was published after the last message looked at: look again (for
                    // as long as it takes; said every few seconds, as the shard waits meanwhile).
                    if said.elapsed() >= Duration::from_secs(5) {
                        tracing::warn!(
                            shard,
                            "the shard's owner keeps publishing while it is being claimed; still \
                             trying"
                        );
                        said = Instant::now();
                    }
                    backoff.wait().await;
                    continue;
                }
                Err(e) => {
                    // Stored, with its acknowledgement lost? Then the claim is made.
                    let stored = self.last_on(FLOWS_STREAM, &subject).await.ok().flatten();
                    match stored {
                        Some(m)
                            if m.headers.get(MSG_ID).map(|v| v.as_str()) == Some(id.as_str()) =>
                        {
                            m.sequence
                        }
                        _ if retry("publishing the claim", &e) => {
                            backoff.wait().await;
                            continue;
                        }
                        _ => {
                            return Err(BrokerError::Stream {
                                name: FLOWS_STREAM,
                                source: e.into(),
                            })
                        }
                    }
                }
            };
            return Ok(Claimed::From { last, claim });
        }
    }

    /// The flow batch at stream sequence `seq` of shard `shard`'s subject (`tail`: the subject's last
    /// message, if that is the one).
    async fn flow_batch_at(
        &self,
        shard: u32,
        seq: u64,
        tail: Option<&jetstream::message::StreamMessage>,
    ) -> Result<FlowBatch, BrokerError> {
        let fetched;
        let m = match tail.filter(|m| m.sequence == seq) {
            Some(m) => m,
            None => {
                let stream = self.stream(FLOWS_STREAM).await?;
                match stream.get_raw_message(seq).await {
                    Ok(m) => {
                        fetched = m;
                        &fetched
                    }
                    Err(e)
                        if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        return Err(BrokerError::CheckpointGone { shard, seq })
                    }
                    Err(e) => {
                        return Err(BrokerError::Stream {
                            name: FLOWS_STREAM,
                            source: e.into(),
                        })
                    }
                }
            }
        };
        wire::decode_flows(&m.payload).map_err(|source| BrokerError::Unreadable {
            name: FLOWS_STREAM,
            of: format!("shard {shard}"),
            source,
        })
    }

    /// A producer of event batches for `node`. It gives up retrying a failing publish once `shutdown`
    /// fires (the rest of the stream is then published by a restarted capture, or lost with the
    /// kernel's events if it is not restarted: the error says how many).
    /// `next_seq`: the `seq` its first event gets; `source`: the [`SOURCE_HEADER`] of its messages.
    pub fn events_tx(
        &self,
        node: &str,
        next_seq: u64,
        source: String,
        shutdown: Shutdown,
    ) -> Result<super::partitioned::EventsTx, BrokerError> {
        if !valid_node(node) {
            return Err(BrokerError::NodeName(node.to_string()));
        }
        let parts = match self.partitions {
            1 => Vec::new(),
            n => (0..n)
                .map(|p| self.part_tx(p, node, shutdown.clone()))
                .collect(),
        };
        let compress = self.settings.compress;
        let node = node.to_string();
        Ok(BrokerTx::new(
            self.clone(),
            events_subject(&node),
            Box::new(move |b: &Arc<EventBatch>| {
                // (node, first seq) names a batch whatever run or attempt publishes it.
                let id = events_msg_id(&node, b);
                (wire::encode_events(b, compress), id)
            }),
            Box::new(|b: &Arc<EventBatch>| {
                let mid = b.events.len() / 2;
                (mid > 0).then(|| {
                    let half = |r: &[crate::event::Event]| {
                        let mut h = EventBatch::new(Arc::clone(&b.node), r.to_vec(), b.clock_us);
                        h.sent_at_us = b.sent_at_us;
                        Arc::new(h)
                    };
                    (half(&b.events[..mid]), half(&b.events[mid..]))
                })
            }),
            Box::new(|b: &Arc<EventBatch>| b.events.len()),
            None,
            shutdown,
        )
        .numbering_from(
            next_seq,
            source,
            Box::new(|b: &Arc<EventBatch>| b.events.last().map(|e| e.seq.saturating_add(1))),
        ))
        .map(|tx| super::partitioned::EventsTx::new(tx, parts))
    }

    /// A producer of partition `part`'s shares of `node`'s batches (see [`super::partitioned`]).
    pub(crate) fn part_tx(
        &self,
        part: u32,
        node: &str,
        shutdown: Shutdown,
    ) -> BrokerTx<super::partitioned::Share> {
        use super::partitioned::{Share, FROM_HEADER, PIECE_OF_HEADER};
        let compress = self.settings.compress;
        let node = node.to_string();
        BrokerTx::new(
            self.clone(),
            part_subject(part, &node),
            Box::new(move |s: &Share| {
                (
                    wire::encode_partition(&s.batch, compress),
                    part_msg_id(&node, part, &s.batch),
                )
            }),
            Box::new(Share::halve),
            Box::new(|s: &Share| s.batch.events.len()),
            None,
            shutdown,
        )
        .with_item_headers(Box::new(|s: &Share| {
            let mut h = vec![(FROM_HEADER, s.from.to_string())];
            if let Some(of) = s.piece_of {
                h.push((PIECE_OF_HEADER, of.to_string()));
            }
            h
        }))
    }

    /// The first message on `subject` of stream `name` after stream sequence `after`, if any.
    pub(crate) async fn message_after(
        &self,
        name: &'static str,
        subject: &str,
        after: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        let stream = self.stream(name).await?;
        match stream
            .get_first_raw_message_by_subject(subject, after.saturating_add(1))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(BrokerError::Stream {
                name,
                source: e.into(),
            }),
        }
    }

    /// A producer of flow batches for shard `index` of `count`; its end marker names how many shards
    /// there are.
    pub fn flows_tx(&self, index: u32, count: u32, shutdown: Shutdown) -> BrokerTx<FlowBatch> {
        let compress = self.settings.compress;
        BrokerTx::new(
            self.clone(),
            flows_subject(index),
            Box::new(move |b: &FlowBatch| {
                // (emission, first row) names a message whatever attempt publishes it.
                let id = format!("{}-{}-{}", b.producer, b.seq, b.first_row);
                (wire::encode_flows(b, compress), id)
            }),
            Box::new(halve_flows),
            Box::new(|b: &FlowBatch| b.records.len()),
            Some(count),
            shutdown,
        )
    }

    /// Every event batch from stream position `from` on, in order (aggregators).
    pub async fn events_from(&self, from: u64) -> Result<BrokerRx<Arc<EventBatch>>, BrokerError> {
        self.ordered(
            EVENTS_STREAM,
            "tcplake.events.>".into(),
            from,
            Box::new(decode_positioned_events),
        )
        .await
    }

    /// Partition `part`'s shares of every node's batches from stream position `from` of the
    /// partitions stream on, in order (the aggregator of a partitioned stream).
    pub async fn partition_from(
        &self,
        part: u32,
        from: u64,
    ) -> Result<BrokerRx<Arc<EventBatch>>, BrokerError> {
        self.ordered(
            PARTS_STREAM,
            format!("tcplake.part.{part}.>"),
            from,
            Box::new(decode_positioned_partition),
        )
        .await
    }

    async fn ordered(
        &self,
        name: &'static str,
        filter: String,
        from: u64,
        decode: Decoder<Arc<EventBatch>>,
    ) -> Result<BrokerRx<Arc<EventBatch>>, BrokerError> {
        let stream = self.stream(name).await?;
        let info = stream.get_info().await.map_err(|e| BrokerError::Stream {
            name,
            source: e.into(),
        })?;
        if from > 0 && from < info.state.first_sequence {
            return Err(BrokerError::Retained {
                subject: filter,
                from,
                first: info.state.first_sequence,
            });
        }
        let messages = open_ordered(self.clone(), name, filter.clone(), from)
            .await
            .map_err(|e| consumer_err(&filter, e))?;
        let broker = self.clone();
        let reopen: Reopen = Arc::new(move |next| {
            Box::pin(open_ordered(broker.clone(), name, filter.clone(), next))
        });
        Ok(BrokerRx::new(
            self.clone(),
            messages,
            reopen,
            from,
            decode,
            Ends::AllSeenNodes,
        ))
    }

    /// A durable consumer (the sink's): redelivers whatever it did not ack, after a restart too.
    ///
    /// At startup the consumer is recreated from its ack floor, so messages a crashed predecessor held
    /// unacked come again *in stream order*, before newer ones (a surviving consumer would redeliver
    /// them only after the ack wait, behind newer messages, and per-producer order is what lets the
    /// sink skip what it already wrote).
    pub async fn durable<T: Send + 'static>(
        &self,
        stream: &'static str,
        name: &str,
        subject: &str,
        ack_wait: Duration,
        decode: Decoder<T>,
        ends: Ends,
    ) -> Result<BrokerRx<T>, BrokerError> {
        let s = self.stream(stream).await?;
        let start = match s.consumer_info(name).await {
            Ok(info) => {
                let floor = info.ack_floor.stream_sequence;
                s.delete_consumer(name)
                    .await
                    .map_err(|e| consumer_err(subject, e))?;
                floor + 1
            }
            Err(_) => 1,
        };
        let deliver_policy = if start <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            }
        };
        // Producers whose end marker this consumer acknowledged before the restart will not be
        // delivered again: learn from the stream which have ended and which are still going.
        let producers = self.producers(stream, subject, start).await?;
        let c = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_string()),
                filter_subject: subject.to_string(),
                deliver_policy,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                // Unacked messages are those in open files: bounded by file size and age.
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| consumer_err(subject, e))?;
        let messages = c.messages().await.map_err(|e| consumer_err(subject, e))?;
        // After a broker restart the durable consumer is still there (file storage): pull again. What
        // this process held unacked it still holds; acks lost meanwhile come back as redeliveries,
        // which the sink skips as already written.
        let (broker, name) = (self.clone(), name.to_string());
        let reopen: Reopen = Arc::new(move |_| {
            let (broker, name) = (broker.clone(), name.clone());
            Box::pin(async move {
                let s = broker.stream(stream).await?;
                let c: consumer::PullConsumer = s.get_consumer(&name).await?;
                let m = c.messages().await?;
                Ok(Box::pin(m.map(|m| m.map_err(Cause::from))) as MessageStream)
            })
        });
        let mut rx = BrokerRx::new(
            self.clone(),
            Box::pin(messages.map(|m| m.map_err(Cause::from))),
            reopen,
            start,
            decode,
            ends,
        );
        rx.seed(producers).map_err(|e| consumer_err(subject, e))?;
        Ok(rx)
    }

    /// The producers on `filter` (subjects with messages), and of those, which ended with a marker
    /// stored before stream sequence `before` (with the shard count it announced).
    async fn producers(
        &self,
        name: &'static str,
        filter: &str,
        before: u64,
    ) -> Result<Producers, BrokerError> {
        let stream = self.stream(name).await?;
        let mut subjects =
            stream
                .info_with_subjects(filter)
                .await
                .map_err(|e| BrokerError::Stream {
                    name,
                    source: e.into(),
                })?;
        let mut all = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(|e| BrokerError::Stream {
                name,
                source: e.into(),
            })?;
            all.push(subject);
        }
        let mut out = Producers::default();
        for subject in all {
            let Some(last) = self.last_on(name, &subject).await? else {
                continue;
            };
            // Only what this consumer will not see again counts here: messages from `before` on are
            // delivered and judged as they come (a batch makes its node live, garbage is set aside).
            if last.sequence >= before {
                continue;
            }
            if last.headers.get(END_HEADER).is_some() {
                let shards = last
                    .headers
                    .get(SHARDS_HEADER)
                    .and_then(|v| v.as_str().parse().ok());
                out.ended.push((subject, shards));
            } else if wire::is_batch(&last.payload) {
                out.live.push(subject);
            }
        }
        Ok(out)
    }

    /// Moves an undecodable message aside, with the reason, so it can be inspected and replayed.
    async fn dead_letter(&self, kind: &str, msg: &jetstream::Message, reason: &WireError) {
        self.metrics.dead_letters.add(1);
        let mut headers = HeaderMap::new();
        headers.insert("Tcplake-Reason", crate::report::one_line(reason).as_str());
        headers.insert("Tcplake-Subject", msg.subject.as_str());
        if let Ok(info) = msg.info() {
            headers.insert("Tcplake-Seq", info.stream_sequence.to_string().as_str());
        }
        let subject = format!("tcplake.dead.{kind}");
        match self
            .js
            .publish_with_headers(subject, headers, msg.payload.clone())
            .await
        {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::error!(error = %e, "could not dead-letter a bad message");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not dead-letter a bad message"),
        }
    }
}

/// A tcplake stream's configuration; the events stream records its partition count `partitions`.
fn stream_config(
    settings: &BrokerSettings,
    name: &'static str,
    subjects: &str,
    max_bytes: i64,
    partitions: Option<u32>,
) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        description: partitions.map(|p| format!("{PARTITIONS_MARK}{p}")),
        subjects: vec![subjects.to_string()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        max_age: settings.max_age,
        max_bytes,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

fn create_err(
    name: &'static str,
    max_bytes: i64,
    e: jetstream::context::CreateStreamError,
) -> BrokerError {
    match e.kind() {
        // Said plainly: the server's own words only name the resource, not the setting.
        CreateStreamErrorKind::JetStream(js)
            if js.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED
                || js.error_code() == ErrorCode::INSUFFICIENT_RESOURCES =>
        {
            BrokerError::NoRoom {
                name,
                mib: max_bytes >> 20,
            }
        }
        _ => BrokerError::Stream {
            name,
            source: e.into(),
        },
    }
}

/// An ordered consumer of `filter` on stream `name` from stream sequence `from` on (0: from the
/// start).
async fn open_ordered(
    broker: Broker,
    name: &'static str,
    filter: String,
    from: u64,
) -> Result<MessageStream, Cause> {
    let deliver_policy = if from <= 1 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    let stream = broker.stream(name).await?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let messages = c.messages().await?;
    Ok(Box::pin(messages.map(|m| m.map_err(Cause::from))))
}

fn consumer_err(subject: &str, e: impl Into<Cause>) -> BrokerError {
    BrokerError::Consumer {
        subject: subject.to_string(),
        source: e.into(),
    }
}

type Encoder<T> = Box<dyn Fn(&T) -> (Vec<u8>, String) + Send + Sync>;
/// Cuts an item in two halves (`None`: it holds one row and cannot be cut).
type Splitter<T> = Box<dyn Fn(&T) -> Option<(T, T)> + Send + Sync>;
type Counter<T> = Box<dyn Fn(&T) -> usize + Send + Sync>;
/// Headers of an item's message.
pub(crate) type ItemHeaders<T> = Box<dyn Fn(&T) -> Vec<(&'static str, String)> + Send + Sync>;
/// The `seq` after an item's last row (`None`: it holds none).
type After<T> = Box<dyn Fn(&T) -> Option<u64> + Send + Sync>;

/// Where a capture node's event stream stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeProgress {
    /// Nothing of the node on the stream (never published, or retention removed it), or nothing that
    /// says where its numbering stands.
    Nothing,
    /// The node's stream ended for good (an exhausted source, the end of `--duration`).
    Ended,
    /// The node's next event gets `seq` `next`; `run_start`: its run has sent no rows yet;
    /// `source`: the settings that recorded it ([`SOURCE_HEADER`], none from an older tcplake).
    Next {
        next: u64,
        run_start: bool,
        source: Option<String>,
    },
}

/// Server-side check that a publish directly follows the previous message on its subject.
const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
/// On a flows subject's end marker: how many shards share the flows.
pub const SHARDS_HEADER: &str = "Tcplake-Shards";

/// Bytes of a message's `max_payload` kept for its headers (see [`BrokerTx::send`]).
const HEADERS_ALLOWANCE: usize = 1024;

/// The producing half. Each message waits for its acknowledgement before the next is published, and
/// carries the stream sequence of its predecessor on the subject (`Nats-Expected-Last-Subject-Sequence`):
/// the server refuses it unless everything before it is stored. So a producer's messages are stored in
/// exactly the order it sent them, whatever fails in between; consumers rely on that (a sink skips
/// what precedes what it has seen, an aggregator's lateness follows stream order). Pipelined publishes
/// would be faster, but after a broker restart a lost message could be re-published behind a later
/// one, which consumers would then treat as already seen (found by the broker-restart test).
///
/// A batch whose message would exceed the server's `max_payload` is cut in halves (each named by its
/// first row, as any batch), rather than refused by the server and retried in vain.
pub struct BrokerTx<T> {
    broker: Broker,
    subject: String,
    encode: Encoder<T>,
    split: Splitter<T>,
    rows: Counter<T>,
    /// Flows: the shard count the end marker announces.
    shards: Option<u32>,
    /// Events: the next message is the first of a capture run (marked with [`RUN_START_HEADER`]).
    run_start: bool,
    /// Events: the `seq` of the next event to publish ([`NEXT_SEQ_HEADER`]), and of the event after
    /// an item (`None`: it holds no rows).
    next_seq: Option<u64>,
    after: Option<After<T>>,
    /// Events: the [`SOURCE_HEADER`] of every message.
    source: Option<String>,
    /// Stream sequence of the last message stored on the subject (0: none); `None` until looked up.
    last_seq: Option<u64>,
    /// A claimed flows subject ([`Self::after_claim`]): the newest message known to be this
    /// producer's (its claim, or its own publish). A lookup that finds a later message of another id
    /// means another aggregator claimed the shard.
    claimed_tail: Option<u64>,
    /// A claimed flows subject: appended to every message id (`@<claim>`), so the server's duplicate
    /// detection never takes this producer's message for the same emission published by the owner
    /// before or after it (which would be acknowledged as stored, the owners then riding each other).
    id_suffix: String,
    /// Headers an item's messages carry, set before each is published (a piece's own).
    item_headers: Option<ItemHeaders<T>>,
    /// Once fired, a failing publish is not retried any more.
    shutdown: Shutdown,
}

impl<T> BrokerTx<T> {
    fn new(
        broker: Broker,
        subject: String,
        encode: Encoder<T>,
        split: Splitter<T>,
        rows: Counter<T>,
        shards: Option<u32>,
        shutdown: Shutdown,
    ) -> Self {
        BrokerTx {
            broker,
            subject,
            encode,
            split,
            rows,
            shards,
            run_start: false,
            next_seq: None,
            after: None,
            source: None,
            last_seq: None,
            claimed_tail: None,
            id_suffix: String::new(),
            item_headers: None,
            shutdown,
        }
    }

    /// Publishes right after this producer's claim at stream sequence `claim`, and never after a
    /// message another producer published since (see [`Broker::claim_shard`]).
    pub fn after_claim(mut self, claim: u64) -> Self {
        self.last_seq = Some(claim);
        self.claimed_tail = Some(claim);
        self.id_suffix = format!("@{claim}");
        self
    }

    /// Gives each item's message (each piece's, when cut) the headers `of` says.
    pub(crate) fn with_item_headers(mut self, of: ItemHeaders<T>) -> Self {
        self.item_headers = Some(of);
        self
    }

    /// Ends the subject with an end marker that carries `own` headers too (a partition's says the
    /// node message it follows).
    pub(crate) async fn end_with(
        &mut self,
        own: &[(&'static str, String)],
    ) -> Result<(), EdgeError> {
        let id = format!("{}-end", self.subject);
        self.publish(Bytes::new(), &id, true, 0, own).await
    }

    /// The stream sequence of the last message stored on the subject (0: none).
    pub(crate) async fn last_stored_seq(&mut self) -> Result<u64, EdgeError> {
        if let Some(s) = self.last_seq {
            return Ok(s);
        }
        let (s, _) = self.last_stored().await?;
        self.last_seq = Some(s);
        Ok(s)
    }

    fn numbering_from(mut self, next_seq: u64, source: String, after: After<T>) -> Self {
        self.next_seq = Some(next_seq);
        self.source = Some(source);
        self.after = Some(after);
        self
    }

    /// Marks the messages this producer publishes as the start of a capture run, up to the first that
    /// holds rows (an idle capture sends empty batches, its clock only: the run starts with its first
    /// event).
    pub fn starting_run(mut self) -> Self {
        self.run_start = true;
        self
    }

    fn published_rows(&mut self, rows: usize) {
        if rows > 0 {
            self.run_start = false;
        }
    }

    /// The stream sequence and message id of the last message stored on the subject.
    async fn last_stored(&self) -> Result<(u64, Option<String>), EdgeError> {
        let stream = stream_of(&self.subject);
        let last = self
            .broker
            .last_on(stream, &self.subject)
            .await
            .map_err(|e| EdgeError::BrokerRequest {
                what: "looking up the last message stored on the subject",
                source: Box::new(e),
            })?;
        Ok(last.map_or((0, None), |m| {
            let id = m.headers.get(MSG_ID).map(|v| v.as_str().to_string());
            (m.sequence, id)
        }))
    }

    /// Publishes one message right after the subject's last and waits until it is stored, retrying
    /// for [`PUBLISH_RETRY_FOR`] (a full stream, a restarting server). A retry of a message that was in
    /// fact stored (its acknowledgement lost) is recognised by its id.
    async fn publish(
        &mut self,
        payload: Bytes,
        id: &str,
        end: bool,
        rows: usize,
        own: &[(&'static str, String)],
    ) -> Result<(), EdgeError> {
        let id = &format!("{id}{}", self.id_suffix);
        let id = id.as_str();
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let attempt = async {
                let last = match self.last_seq {
                    Some(s) => s,
                    None => {
                        let (s, last_id) = self.last_stored().await.map_err(Attempt::Lookup)?;
                        // After a failed or duplicate publish the subject's last message is looked up
                        // again: on a claimed subject it must be this producer's (or this message,
                        // stored before its acknowledgement was lost).
                        if self.claimed_tail.is_some_and(|t| s > t)
                            && last_id.as_deref() != Some(id)
                        {
                            return Err(Attempt::Claimed(s));
                        }
                        self.last_seq = Some(s);
                        s
                    }
                };
                let mut h = HeaderMap::new();
                h.insert(MSG_ID, id);
                h.insert(EXPECTED_LAST_SUBJECT_SEQ, last.to_string().as_str());
                if end {
                    h.insert(END_HEADER, "1");
                    if let Some(n) = self.shards {
                        h.insert(SHARDS_HEADER, n.to_string().as_str());
                    }
                } else if self.run_start {
                    h.insert(RUN_START_HEADER, "1");
                }
                if let Some(next) = self.next_seq {
                    h.insert(NEXT_SEQ_HEADER, next.to_string().as_str());
                }
                if let Some(source) = &self.source {
                    h.insert(SOURCE_HEADER, source.as_str());
                }
                for (name, value) in own {
                    h.insert(*name, value.as_str());
                }
                let ack = self
                    .broker
                    .js
                    .publish_with_headers(self.subject.clone(), h, payload.clone())
                    .await
                    .map_err(Attempt::Publish)?;
                ack.await.map_err(Attempt::Publish)
            };
            let failure = match attempt.await {
                Ok(ack) => {
                    let m = &self.broker.metrics;
                    m.published_messages.add(1);
                    m.published_bytes.add(payload.len() as u64);
                    if ack.duplicate {
                        // The sequence is the original's, which need not be the subject's last any
                        // more (a purge, retention, or a later message): look it up before the next.
                        m.duplicates_dropped.add(1);
                        self.last_seq = None;
                    } else {
                        self.last_seq = Some(ack.sequence);
                    }
                    if let Some(t) = &mut self.claimed_tail {
                        *t = (*t).max(ack.sequence);
                    }
                    self.published_rows(rows);
                    return Ok(());
                }
                Err(Attempt::Publish(e))
                    if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
                {
                    // Something was stored after our last: this very message (an earlier attempt
                    // whose acknowledgement was lost), or another producer using our subject.
                    let (seq, last_id) = self.last_stored().await?;
                    if last_id.as_deref() == Some(id) {
                        self.last_seq = Some(seq);
                        if let Some(t) = &mut self.claimed_tail {
                            *t = (*t).max(seq);
                        }
                        self.published_rows(rows);
                        return Ok(());
                    }
                    return Err(StreamFault::Foreign {
                        subject: self.subject.clone(),
                        seq,
                    }
                    .into());
                }
                Err(Attempt::Claimed(seq)) => {
                    return Err(StreamFault::Foreign {
                        subject: self.subject.clone(),
                        seq,
                    }
                    .into());
                }
                Err(e) => e,
            };
            let hint = publish_hint(&failure, &self.broker.settings);
            if started.elapsed() >= PUBLISH_RETRY_FOR {
                return Err(EdgeError::Publish {
                    subject: self.subject.clone(),
                    secs: PUBLISH_RETRY_FOR.as_secs(),
                    hint,
                    source: failure.into(),
                });
            }
            self.broker.metrics.publish_retries.add(1);
            tracing::warn!(subject = %self.subject, error = %format_args!("{failure}{hint}"), "publish failed; retrying");
            // The server may have restarted: look the subject's last message up again.
            self.last_seq = None;
            tokio::select! {
                _ = backoff.wait() => {}
                _ = self.shutdown.wait() => {
                    return Err(EdgeError::PublishStopped {
                        subject: self.subject.clone(),
                        rows,
                        hint,
                        source: failure.into(),
                    });
                }
            }
        }
    }
}

/// What to change, when a publish error's cryptic server words say the stream is full.
fn publish_hint(failure: &Attempt, s: &BrokerSettings) -> String {
    let lower = failure.to_string().to_ascii_lowercase();
    if lower.contains("maximum bytes") || lower.contains("insufficient resources") {
        format!(
            " (the stream is full: it keeps at most {} MiB for {}; raise broker.max_bytes or lower \
             broker.max_age)",
            s.max_bytes >> 20,
            humantime::format_duration(s.max_age)
        )
    } else {
        String::new()
    }
}

/// Why one publish attempt failed.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error(transparent)]
    Lookup(EdgeError),
    /// Another producer published on a claimed subject (at this stream sequence).
    #[error("another producer published on the subject (stream sequence {0})")]
    Claimed(u64),
    #[error(transparent)]
    Publish(jetstream::context::PublishError),
}

/// The stream a subject belongs to.
fn stream_of(subject: &str) -> &'static str {
    if subject.starts_with("tcplake.flows.") {
        FLOWS_STREAM
    } else if subject.starts_with("tcplake.part.") {
        PARTS_STREAM
    } else {
        EVENTS_STREAM
    }
}

impl<T: Send + Sync> Tx<T> for BrokerTx<T> {
    async fn send(&mut self, item: T) -> Result<(), EdgeError> {
        let max_payload = self.broker.js.client().server_info().max_payload;
        // The server counts a message's headers against max_payload too (ids, the predecessor's
        // sequence, the source hash: a few hundred bytes): a body that fits only without them was
        // refused on every retry.
        let limit = max_payload.saturating_sub(HEADERS_ALLOWANCE);
        // Halves are published first half first: the subject's order stays the rows' order.
        let mut todo = vec![item];
        while let Some(item) = todo.pop() {
            let (body, id) = (self.encode)(&item);
            if max_payload > 0 && body.len() > limit {
                match (self.split)(&item) {
                    Some((first, second)) => {
                        todo.push(second);
                        todo.push(first);
                        continue;
                    }
                    None => {
                        return Err(StreamFault::RowTooLarge {
                            subject: self.subject.clone(),
                            bytes: body.len(),
                            max_payload,
                        }
                        .into())
                    }
                }
            }
            let rows = (self.rows)(&item);
            if let Some(next) = self.after.as_ref().and_then(|after| after(&item)) {
                self.next_seq = Some(next);
            }
            // This message's own headers (a piece's): not kept for the ones after it.
            let own = self
                .item_headers
                .as_ref()
                .map(|of| of(&item))
                .unwrap_or_default();
            self.publish(Bytes::from(body), &id, false, rows, &own)
                .await?;
        }
        Ok(())
    }

    async fn close(&mut self, end_of_stream: bool) -> Result<(), EdgeError> {
        if end_of_stream {
            self.end_with(&[]).await?;
        }
        Ok(())
    }
}

/// Cuts a flow batch in two pieces (`None`: one row, which cannot be cut). Only a piece that completes
/// the emission carries its replay point; the others carry the one before it, so an aggregator that
/// restarts after publishing only some pieces rebuilds and publishes the whole emission again (as the
/// next emission, which supersedes the pieces) rather than continue after rows never published.
fn halve_flows(b: &FlowBatch) -> Option<(FlowBatch, FlowBatch)> {
    let mid = b.records.len() / 2;
    (mid > 0).then(|| {
        let half = |r: std::ops::Range<usize>| {
            let first_row = b.first_row + r.start as u32;
            let completes = first_row as usize + r.len() >= b.total_rows as usize;
            let replay = match (&b.replay_before, completes) {
                (Some(before), false) => before.clone(),
                _ => b.replay.clone(),
            };
            FlowBatch {
                producer: Arc::clone(&b.producer),
                seq: b.seq,
                first_row,
                total_rows: b.total_rows,
                records: b.records[r].to_vec(),
                replay,
                replay_before: b.replay_before.clone(),
                shard_count: b.shard_count,
                windows: b.windows,
            }
        };
        (half(0..mid), half(mid..b.records.len()))
    })
}

/// The id of an event batch's message: the same whatever attempt or run publishes the batch, and no
/// other batch's. Rows: `(node, first seq)`. A heartbeat (no rows, the capture's clock only) is named
/// by its clock: all heartbeats were once named `<node>-0`, so the broker took the second for a
/// duplicate of the first (and the first batch of events of a run that started idle, numbered from 0,
/// for a duplicate of that heartbeat: dropped).
fn events_msg_id(node: &str, b: &EventBatch) -> String {
    match (b.events.first(), b.clock_us) {
        (Some(e), _) => format!("{node}-{}", e.seq),
        (None, Some(clock)) => format!("{node}-clock-{clock}"),
        (None, None) => format!("{node}-empty"),
    }
}

/// Turns a message into an item; `Err` sends it to the dead-letter stream.
pub type Decoder<T> = Box<dyn Fn(&jetstream::Message) -> Result<T, WireError> + Send + Sync>;

fn decode_positioned_events(m: &jetstream::Message) -> Result<Arc<EventBatch>, WireError> {
    let mut b = wire::decode_events(&m.payload)?;
    // The batch's place on this edge is the broker's stream sequence.
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    b.position = seq..seq + 1;
    Ok(Arc::new(b))
}

fn decode_positioned_partition(m: &jetstream::Message) -> Result<Arc<EventBatch>, WireError> {
    let mut b = wire::decode_partition(&m.payload)?;
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    b.position = seq..seq + 1;
    Ok(Arc::new(b))
}

/// The id of a partition's share of a node batch: the node, the partition, and the `seq` after the
/// share (which no other share of the partition has), or a heartbeat's clock.
fn part_msg_id(node: &str, part: u32, b: &EventBatch) -> String {
    match (b.watermarks.as_deref().map(|w| w.next_seq), b.clock_us) {
        (Some(next), _) if next > 0 => format!("{node}-p{part}-{next}"),
        (_, Some(clock)) => format!("{node}-p{part}-clock-{clock}"),
        _ => format!("{node}-p{part}-empty"),
    }
}

/// Decoder for the sink's event consumer (positions do not matter there).
pub fn decode_events_msg(m: &jetstream::Message) -> Result<Arc<EventBatch>, WireError> {
    decode_positioned_events(m)
}

pub fn decode_flows_msg(m: &jetstream::Message) -> Result<FlowBatch, WireError> {
    wire::decode_flows(&m.payload)
}

/// When a consuming edge has seen the end of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// Every node that published has sent its end marker (the events stream).
    AllSeenNodes,
    /// Every shard `0..N` has sent its end marker, `N` learned from the markers (the flows stream).
    AllShards,
}

/// Producers found on a stream at startup, from messages before the consumer's start: subjects whose
/// last message is a batch (still going), and those that ended (with the shard count announced).
#[derive(Debug, Default)]
pub struct Producers {
    pub live: Vec<String>,
    pub ended: Vec<(String, Option<u32>)>,
}

/// The shard index of a flows subject (`tcplake.flows.<i>`).
fn shard_of(subject: &str) -> Option<u32> {
    subject.strip_prefix("tcplake.flows.")?.parse().ok()
}

type MessageStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<jetstream::Message, Cause>> + Send>>;

/// Opens the message stream again after the broker went away, continuing at a stream sequence.
type Reopen = Arc<
    dyn Fn(u64) -> futures_util::future::BoxFuture<'static, Result<MessageStream, Cause>>
        + Send
        + Sync,
>;

/// How long a consumer keeps trying to get its messages back after losing the broker (as producers do).
const CONSUME_RETRY_FOR: Duration = PUBLISH_RETRY_FOR;

/// A received item and its ack, to release once the item is durable downstream.
pub struct Delivery<T> {
    pub item: T,
    pub ack: Ack,
    /// Events: the first message of a capture run (its `seq` may jump ahead of the node's last).
    pub run_start: bool,
}

/// The consuming half.
pub struct BrokerRx<T> {
    broker: Broker,
    messages: MessageStream,
    reopen: Reopen,
    /// Stream sequence after the last message received (where a reopened ordered consumer starts).
    next_seq: u64,
    decode: Decoder<T>,
    ends: Ends,
    live_nodes: std::collections::BTreeSet<String>,
    ended_nodes: std::collections::BTreeSet<String>,
    ended_shards: std::collections::BTreeSet<u32>,
    /// How many shards share the flows, from their end markers.
    shard_count: Option<u32>,
    /// Everything had ended before this consumer started.
    complete: bool,
    /// Which producers' messages are delivered (a sharded sink's part); the others are acked unread.
    keep: Option<Keep>,
    /// Acks of messages that carried no item (end markers, dead letters, messages of producers not
    /// kept): the caller releases them.
    pub settled: Vec<Ack>,
}

/// Does a consumer deliver this subject's messages?
type Keep = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl<T> BrokerRx<T> {
    fn new(
        broker: Broker,
        messages: MessageStream,
        reopen: Reopen,
        next_seq: u64,
        decode: Decoder<T>,
        ends: Ends,
    ) -> Self {
        BrokerRx {
            broker,
            messages,
            reopen,
            next_seq,
            decode,
            ends,
            live_nodes: Default::default(),
            ended_nodes: Default::default(),
            ended_shards: Default::default(),
            shard_count: None,
            complete: false,
            keep: None,
            settled: Vec::new(),
        }
    }

    /// Delivers only the events of the nodes `node` selects and the flows of the shards `shard`
    /// selects; the others' messages are acked unread (unopened: no decompression). Their end markers
    /// still count: the input ends when every producer on the stream has ended, kept or not.
    pub fn keep_only(
        &mut self,
        node: impl Fn(&str) -> bool + Send + Sync + 'static,
        shard: impl Fn(u32) -> bool + Send + Sync + 'static,
    ) {
        self.keep = Some(Box::new(move |subject: &str| {
            match (subject.strip_prefix("tcplake.events."), shard_of(subject)) {
                (Some(n), _) => node(n),
                (None, Some(i)) => shard(i),
                (None, None) => true,
            }
        }));
    }

    /// The first stream sequence this consumer delivers: everything before it was handled (acked)
    /// by an earlier run of the same consumer.
    pub fn start_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes in what the stream says about its producers before the first delivery.
    fn seed(&mut self, p: Producers) -> Result<(), EdgeError> {
        for subject in p.live {
            if let Some(n) = node_of(&subject) {
                self.live_nodes.insert(n.to_string());
            }
        }
        let any_ended = !p.ended.is_empty();
        for (subject, shards) in p.ended {
            self.mark_ended(&subject, shards)?;
        }
        self.complete = match self.ends {
            AllSeenNodes => any_ended && self.live_nodes.is_empty(),
            Ends::AllShards => self.all_shards_ended(),
        };
        Ok(())
    }

    /// Records the end of `subject`'s producer; `true` when the whole input has ended.
    fn mark_ended(&mut self, subject: &str, shards: Option<u32>) -> Result<bool, EdgeError> {
        match self.ends {
            AllSeenNodes => {
                let Some(n) = node_of(subject) else {
                    return Ok(false);
                };
                self.live_nodes.remove(n);
                self.ended_nodes.insert(n.to_string());
                Ok(self.live_nodes.is_empty())
            }
            Ends::AllShards => {
                let Some(i) = shard_of(subject) else {
                    return Ok(false);
                };
                self.ended_shards.insert(i);
                // Markers of older builds do not say: then the highest shard seen bounds the count.
                let n =
                    shards.unwrap_or_else(|| self.ended_shards.iter().max().map_or(1, |m| m + 1));
                match self.shard_count {
                    Some(known) if known != n => {
                        return Err(StreamFault::ShardsDisagree {
                            this: format!("shard {i} ended"),
                            n,
                            earlier: "an earlier one".into(),
                            known,
                        }
                        .into())
                    }
                    _ => self.shard_count = Some(n),
                }
                if let Some(&beyond) = self.ended_shards.iter().find(|&&s| s >= n) {
                    return Err(StreamFault::ShardBeyond { shard: beyond, n }.into());
                }
                let done = self.all_shards_ended();
                if !done {
                    let waiting: Vec<String> = (0..n)
                        .filter(|s| !self.ended_shards.contains(s))
                        .map(|s| s.to_string())
                        .collect();
                    tracing::info!(
                        "flows of shard {i} ended; waiting for shard(s) {} of {n}",
                        waiting.join(", ")
                    );
                }
                Ok(done)
            }
        }
    }

    fn all_shards_ended(&self) -> bool {
        self.shard_count
            .is_some_and(|n| (0..n).all(|i| self.ended_shards.contains(&i)))
    }

    /// The broker went away (restart, network): reopen the consumer where this one stopped, with
    /// backoff, for up to [`CONSUME_RETRY_FOR`].
    async fn recover(&mut self, error: Cause) -> Result<(), EdgeError> {
        tracing::warn!(%error, next_seq = self.next_seq, "lost the broker while consuming; reconnecting");
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            backoff.wait().await;
            match (self.reopen)(self.next_seq).await {
                Ok(messages) => {
                    self.messages = messages;
                    self.broker.metrics.consumer_reconnects.add(1);
                    tracing::info!(next_seq = self.next_seq, "consuming again");
                    return Ok(());
                }
                Err(e) if started.elapsed() < CONSUME_RETRY_FOR => {
                    tracing::debug!(error = %crate::report::one_line(&*e), "broker not back yet");
                }
                Err(e) => {
                    return Err(EdgeError::Lost {
                        secs: CONSUME_RETRY_FOR.as_secs(),
                        lost: error,
                        source: e,
                    })
                }
            }
        }
    }

    /// The ack of message `m`: releasing it acks the message (counted; a failed ack only means a
    /// redelivery, which the sink deduplicates).
    fn ack(&self, m: jetstream::Message) -> Ack {
        let position = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let metrics = Arc::clone(&self.broker.metrics);
        Ack::new(position, move || {
            async move {
                metrics.acks.add(1);
                if let Err(e) = m.ack().await {
                    tracing::debug!(error = %e, "ack failed; the message will be redelivered and deduplicated");
                }
            }
            .boxed()
        })
    }

    /// The next item with its ack, or `None` at the end of the input.
    pub async fn next(&mut self) -> Result<Option<Delivery<T>>, EdgeError> {
        if self.complete {
            return Ok(None);
        }
        loop {
            let Some(m) = self.messages.next().await else {
                return Ok(None);
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    self.recover(e).await?;
                    continue;
                }
            };
            if let Ok(info) = m.info() {
                self.next_seq = info.stream_sequence + 1;
            }
            let node = node_of(m.subject.as_str()).map(str::to_string);
            if m.headers
                .as_ref()
                .is_some_and(|h| h.get(CLAIM_HEADER).is_some())
            {
                // A shard changing hands carries no rows.
                self.settled.push(self.ack(m));
                continue;
            }
            if let Some(h) = m.headers.as_ref().filter(|h| h.get(END_HEADER).is_some()) {
                let shards = h.get(SHARDS_HEADER).and_then(|v| v.as_str().parse().ok());
                let done = self.mark_ended(m.subject.as_str(), shards)?;
                self.settled.push(self.ack(m));
                if done {
                    return Ok(None);
                }
                continue;
            }
            // Counted whether kept or not: the broker delivered it, payload and all.
            self.broker.metrics.consumed_messages.add(1);
            self.broker
                .metrics
                .consumed_bytes
                .add(m.payload.len() as u64);
            if self
                .keep
                .as_ref()
                .is_some_and(|keep| !keep(m.subject.as_str()))
            {
                // Another part's: its producer is still waited for (see `keep_only`).
                if let Some(n) = node {
                    if !self.ended_nodes.contains(&n) {
                        self.live_nodes.insert(n);
                    }
                }
                self.broker.metrics.not_kept_messages.add(1);
                self.settled.push(self.ack(m));
                continue;
            }
            let run_start = m
                .headers
                .as_ref()
                .is_some_and(|h| h.get(RUN_START_HEADER).is_some());
            match (self.decode)(&m) {
                Ok(item) => {
                    // A node is waited for once it has sent something readable.
                    if let Some(n) = node {
                        if !self.ended_nodes.contains(&n) {
                            self.live_nodes.insert(n);
                        }
                    }
                    let ack = self.ack(m);
                    return Ok(Some(Delivery {
                        item,
                        ack,
                        run_start,
                    }));
                }
                Err(e) => {
                    // Counted, logged once per reason, set aside; the stream goes on.
                    tracing::warn!(subject = %m.subject, error = %crate::report::one_line(&e), "undecodable message sent to the dead-letter stream");
                    let kind = match m.subject.as_str() {
                        s if s.starts_with("tcplake.flows.") => "flows",
                        s if s.starts_with("tcplake.part.") => "partitions",
                        _ => "events",
                    };
                    self.broker.dead_letter(kind, &m, &e).await;
                    self.settled.push(self.ack(m));
                }
            }
        }
    }
}

/// Aggregators read positions, not acks: their input edge is a plain [`Rx`].
impl Rx<Arc<EventBatch>> for BrokerRx<Arc<EventBatch>> {
    async fn recv(&mut self) -> Result<Option<Arc<EventBatch>>, EdgeError> {
        // An ordered consumer needs no acks: they are let go unreleased.
        self.settled.clear();
        Ok(self.next().await?.map(|d| d.item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};

    /// Pieces of an emission: only the one that completes it carries its replay point, at any depth
    /// of cutting; the rows stay in order.
    #[test]
    fn only_the_piece_that_completes_an_emission_moves_the_checkpoint() {
        use crate::event::flow::{FlowBatch, ReplayPoint};
        let point = |from_seq| ReplayPoint {
            from_seq,
            ..Default::default()
        };
        let mut records = Vec::new();
        let mut w = crate::aggregate::Windows::new(crate::aggregate::WindowConfig {
            window_us: 1_000_000,
            allowed_lateness_us: 0,
            horizon_us: 0,
        });
        let mut src = crate::capture::synthetic::Synthetic::new(
            "n".into(),
            crate::capture::synthetic::SyntheticConfig {
                seed: 5,
                total: 2_000,
                start_us: 0,
                events_per_sim_sec: 1_000,
            },
        );
        let b = src.next_batch(2_000).unwrap();
        w.add(&b.node, &b.events, 0..1, |_| true);
        w.emit_all(&mut records);
        assert!(records.len() >= 8);
        let whole = FlowBatch {
            producer: "agg-0".into(),
            seq: 4,
            first_row: 0,
            total_rows: records.len() as u32,
            records: records.clone(),
            replay: point(9),
            replay_before: Some(point(3)),
            shard_count: 1,
            windows: None,
        };
        // Cut as the producer does for a small max_payload: halves, then their halves.
        let (a, b) = halve_flows(&whole).unwrap();
        let (a1, a2) = halve_flows(&a).unwrap();
        let (b1, b2) = halve_flows(&b).unwrap();
        let pieces = [a1, a2, b1, b2];
        let froms: Vec<u64> = pieces.iter().map(|p| p.replay.from_seq).collect();
        assert_eq!(froms, [3, 3, 3, 9]);
        assert!(pieces[3].completes() && !pieces[2].completes());
        let rows: Vec<_> = pieces.iter().flat_map(|p| p.records.clone()).collect();
        assert_eq!(rows, records);
        // A batch received from the broker (no checkpoint before it) keeps its own.
        let received = FlowBatch {
            replay_before: None,
            ..whole
        };
        let (a, _) = halve_flows(&received).unwrap();
        assert_eq!(a.replay.from_seq, 9);
    }

    /// Message ids deduplicate retries of one batch, never two batches: heartbeats of different
    /// times differ from each other and from any batch of rows.
    #[test]
    fn every_event_batch_has_an_id_of_its_own() {
        let node: Arc<str> = "n".into();
        let heartbeat = |clock| EventBatch::new(Arc::clone(&node), Vec::new(), Some(clock));
        let rows = |seq| {
            let e = Event::sample(seq, 1, EventKind::BytesSent { bytes: 1 });
            EventBatch::new(Arc::clone(&node), vec![e], Some(5))
        };
        let ids = [
            events_msg_id("n", &heartbeat(5)),
            events_msg_id("n", &heartbeat(6)),
            events_msg_id("n", &rows(0)),
            events_msg_id("n", &rows(5)),
        ];
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        // A retry of the same batch keeps its id (the broker drops it as a duplicate).
        assert_eq!(events_msg_id("n", &rows(5)), ids[3]);
        assert_eq!(events_msg_id("n", &heartbeat(6)), ids[1]);
    }
}
