//! The JetStream backend: kiln's event log in a NATS JetStream stream that other
//! services may share, with the same contract as the embedded store.
//!
//! - **Layout** ([`wire`]): one event per message on `<prefix>.<category>.<stream-id>`,
//!   position = the JetStream stream sequence (strictly increasing, with gaps where
//!   kiln's tag markers sit). Snapshots live in a second stream.
//! - **Versions in O(1)**: `latest` is one direct get of the last message on the
//!   stream's subject; its `Kiln-Version` header is the version. No consumer, no scan.
//! - **Optimistic concurrency at the server**: the first message of every append
//!   carries `Nats-Expected-Last-Subject-Sequence` = the sequence of the last event
//!   read; the server refuses the write if the subject moved. Several events (and
//!   tag markers) go in one atomic batch (`Nats-Batch-*` headers), so an append is
//!   all-or-nothing. No client-side lock anywhere: two kiln processes, or a kiln and
//!   a service in another language, race safely.
//! - **Idempotency**: `Nats-Msg-Id` = the event id. A retry within the stream's
//!   dedupe window is recognised by the server; kiln then finds the original
//!   messages (a *dedupe probe* asks the server, without writing, at which sequence
//!   an id was stored) and returns the original result. Beyond the window a retry
//!   is a new append (the embedded store remembers ids forever).
//! - **Tags**: each tag has a marker subject whose last message says where the
//!   tag's last event is; a tag-conditioned append guards each condition tag's
//!   marker with its last sequence inside the same atomic batch.
//! - **Tail**: an ordered pull consumer filtered on `<prefix>.*.*`, recreated from
//!   the last delivered position after errors or a reconnect (server restart), so
//!   each event is delivered once, in order.

mod config;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self as js_stream, LastRawMessageErrorKind, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Request, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use uuid::Uuid;

pub use config::{JetStreamConfig, NatsAuth, NatsTls};
pub use wire::Subjects;

use super::{
    AppendRequest, AppendResult, EventBatches, EventStore, ForeignRecord, Limits, MAX_VERSION,
    Position, RecordedEvent, Snapshot, StoreError, StoreHealth, StreamHead, StreamId,
    validate_append,
};

/// Most messages in one atomic batch (the server's limit; the shared
/// validation's [`super::MAX_APPEND_MESSAGES`] keeps appends within it).
pub const MAX_BATCH_MESSAGES: usize = super::MAX_APPEND_MESSAGES;
/// How long an append waits for its ack before checking that the stream
/// still has a leader (and again after each such wait).
const ACK_PATIENCE: Duration = Duration::from_millis(1500);
/// How long a publish nobody answered waits to learn whether its stream was
/// deleted (see [`Inner::no_responders`]).
const NO_RESPONDERS_LOOKUP: Duration = Duration::from_millis(300);
/// Most tries of a direct get no replica far enough along could answer.
const DIRECT_GET_ATTEMPTS: u32 = 8;
/// Most foreign messages remembered for `/views` and `/store/foreign`.
const FOREIGN_KEPT: usize = 256;
/// Most foreign messages stepped over, newest first, looking for a subject's
/// last kiln event.
const FOREIGN_WALK: usize = 256;

/// How many sequences [`Inner::last_matching_up_to`] looks back at most.
const MATCHING_WALK: u64 = 4096;

fn is_wildcard(subject: &str) -> bool {
    subject.split('.').any(|t| t == "*" || t == ">")
}

/// Whether `subject` matches the NATS subject filter `filter` (`*` one
/// token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}
/// Most events in one batch handed out by a tail.
pub const TAIL_BATCH: usize = 1024;
/// Most write attempts of one append whose expected version still holds while
/// other writers keep moving the stream (relaxed appends under contention).
const MAX_ATTEMPTS: u32 = 1000;
/// Most stream heads remembered from this process's own appends.
const HEAD_HINTS: usize = 65_536;

// JetStream API error codes kiln reacts to.
const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
const ERR_WRONG_LAST_MSG_ID: u64 = 10070;
const ERR_WRONG_LAST_SEQUENCE_IN_BATCH: u64 = 10164;
const ERR_DUPLICATE_IN_PROCESS: u64 = 10158;
const ERR_BATCH_DUPLICATE_MSG_ID: u64 = 10201;
const ERR_BATCH_INCOMPLETE: u64 = 10176;
const ERR_BATCH_TOO_MANY_INFLIGHT: u64 = 10210;

/// The JetStream event store. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct JetStreamStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `jetstream:<stream>:<created, ns>`: a stream deleted and made again
    /// is another log.
    identity: String,
    client: Client,
    js: Context,
    events: js_stream::Stream,
    snapshots: js_stream::Stream,
    subjects: Subjects,
    config: JetStreamConfig,
    /// Bumped on every (re)connect, so tails recreate their consumer at once.
    reconnects: watch::Receiver<u64>,
    /// The head each stream had after this process's last append to it: a hint
    /// that saves the read before the next append. Never trusted for a decision:
    /// the server checks the guard built from it, and a refusal or a conflict
    /// reads the real head. The mutex is never held across an await.
    head_hints: Mutex<HashMap<StreamId, StreamHead>>,
    /// Foreign messages seen on event subjects, by sequence (bounded).
    foreign: Mutex<BTreeMap<u64, ForeignRecord>>,
    foreign_total: AtomicU64,
    tail_stalls: AtomicU64,
    /// Connections made so far (see [`Inner::publish_request`]).
    connects: Arc<AtomicU64>,
    /// The server runs JetStream in a cluster (see [`Inner::probe`]).
    clustered: bool,
    /// The stream captures kiln's subjects only: tails read it whole (see
    /// [`Inner::open_tail`]).
    whole_stream_tail: bool,
    /// See [`Inner::seen`].
    seen_events: AtomicU64,
    seen_snapshots: AtomicU64,
}

impl JetStreamStore {
    /// Connects, then creates the event and snapshot streams or checks that the
    /// existing ones capture kiln's subjects and allow what kiln needs (direct get,
    /// atomic batches, the configured dedupe window), updating them if not.
    pub async fn connect(config: JetStreamConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let timeout = config.request_timeout();
        let (gen_tx, gen_rx) = watch::channel(0u64);
        let gen_tx = Arc::new(gen_tx);
        let elections_tx = gen_tx.clone();
        let connects = Arc::new(AtomicU64::new(0));
        let connects_seen = connects.clone();
        let mut opts = ConnectOptions::new()
            .name(&config.connection_name)
            .request_timeout(Some(timeout))
            .connection_timeout(timeout)
            .event_callback(move |event| {
                let gen_tx = gen_tx.clone();
                let connects = connects_seen.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connects.fetch_add(1, Ordering::AcqRel);
                            gen_tx.send_modify(|g| *g += 1);
                            tracing::info!("connected to NATS");
                        }
                        Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        other => tracing::debug!("NATS connection event: {other}"),
                    }
                }
            });
        opts = match &config.auth {
            NatsAuth::None => opts,
            NatsAuth::CredentialsFile { path } => {
                opts.credentials_file(path).await.map_err(|e| {
                    StoreError::backend(
                        format!("reading the NATS credentials file {}", path.display()),
                        e,
                    )
                })?
            }
            NatsAuth::UserPassword { user, password } => {
                opts.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token { token } => opts.token(token.clone()),
            NatsAuth::Nkey { seed } => opts.nkey(seed.clone()),
        };
        if let Some(tls) = &config.tls {
            opts = opts.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                opts = opts.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            if tls.handshake_first {
                opts = opts.tls_first();
            }
        }
        let client = opts.connect(&config.servers).await.map_err(|e| {
            StoreError::backend(
                format!("connecting to NATS at {}", config.servers.join(", ")),
                e,
            )
        })?;
        check_server_version(&client, &config)?;
        let clustered = client.server_info().cluster.is_some();
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let subjects = Subjects::new(&config.subject_prefix);
        let storage = if config.memory_storage {
            StorageType::Memory
        } else {
            StorageType::File
        };
        let events = ensure_stream(
            &js,
            js_stream::Config {
                name: config.stream.clone(),
                description: Some("kiln event log".into()),
                subjects: vec![
                    subjects.events_filter(),
                    subjects.tags_filter(),
                    subjects.probe_filter(),
                ],
                allow_direct: true,
                allow_atomic_publish: true,
                duplicate_window: config.duplicate_window(),
                num_replicas: config.replicas,
                storage,
                ..Default::default()
            },
        )
        .await?;
        check_stream(&events, &client)?;
        watch_leader_elections(&client, &config.stream, elections_tx).await;
        let snapshots = ensure_stream(
            &js,
            js_stream::Config {
                name: config.snapshot_stream(),
                description: Some("kiln aggregate snapshots (newest per stream)".into()),
                subjects: vec![subjects.snapshots_filter()],
                allow_direct: true,
                max_messages_per_subject: 1,
                num_replicas: config.replicas,
                storage,
                ..Default::default()
            },
        )
        .await?;
        let whole_stream_tail = {
            let ours = [
                subjects.events_filter(),
                subjects.tags_filter(),
                subjects.probe_filter(),
            ];
            events
                .cached_info()
                .config
                .subjects
                .iter()
                .all(|s| ours.contains(s))
        };
        let identity = format!(
            "jetstream:{}:{}",
            config.stream,
            events.cached_info().created.unix_timestamp_nanos()
        );
        Ok(JetStreamStore {
            inner: Arc::new(Inner {
                identity,
                client,
                js,
                events,
                snapshots,
                subjects,
                config,
                reconnects: gen_rx,
                head_hints: Mutex::new(HashMap::new()),
                foreign: Mutex::new(BTreeMap::new()),
                foreign_total: AtomicU64::new(0),
                tail_stalls: AtomicU64::new(0),
                clustered,
                whole_stream_tail,
                connects,
                seen_events: AtomicU64::new(0),
                seen_snapshots: AtomicU64::new(0),
            }),
        })
    }

    /// The NATS connection (for tools and tests that also speak core NATS).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }
    pub fn config(&self) -> &JetStreamConfig {
        &self.inner.config
    }

    pub fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// Why an acknowledged append could still be lost, if it could: the event
    /// stream has one replica, so it is only as durable as one server's disk,
    /// and nats-server syncs file storage to disk periodically (its
    /// `sync_interval`, 2 minutes by default), not on every write; memory
    /// storage loses everything on a restart. `kiln serve` logs it at start.
    pub fn durability_warning(&self) -> Option<String> {
        let config = &self.inner.events.cached_info().config;
        if config.storage == StorageType::Memory {
            return Some(format!(
                "JetStream stream '{}' keeps events in memory: a server restart loses them",
                config.name
            ));
        }
        (config.num_replicas <= 1).then(|| {
            format!(
                "JetStream stream '{}' has 1 replica: an acknowledged append is on one \
                 server's disk only after its next sync (nats-server syncs every \
                 `sync_interval`, 2 minutes by default), so a power loss can lose it. \
                 Use replicas = 3 on a cluster, or run nats-server with \
                 `jetstream {{ sync_interval: always }}`",
                config.name
            )
        })
    }

    /// The JetStream context kiln uses (for benchmarks that compare with raw
    /// JetStream operations on the same server).
    pub fn context(&self) -> &Context {
        &self.inner.js
    }
}

/// Bumps `tails` whenever the event stream elects a leader (a JetStream
/// advisory), so every tail recreates its consumer at once instead of
/// waiting to notice that a consumer on the old leader went silent.
async fn watch_leader_elections(client: &Client, stream: &str, tails: Arc<watch::Sender<u64>>) {
    let subject = format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}");
    match client.subscribe(subject.clone()).await {
        Ok(mut advisories) => {
            let stream = stream.to_string();
            tokio::spawn(async move {
                while advisories.next().await.is_some() {
                    tracing::info!(
                        stream,
                        "the event stream elected a leader; recreating tails"
                    );
                    tails.send_modify(|g| *g += 1);
                }
            });
        }
        Err(e) => tracing::warn!(
            "cannot follow {subject} ({e}); tails notice a leader change by their idle checks"
        ),
    }
}

/// The first release of nats-server with atomic batch publish.
const ATOMIC_BATCHES_SINCE: (u64, u64) = (2, 12);

/// `major.minor` of a server version string (`2.12.1`, `v2.14.0-beta.1`).
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Refuses a server that cannot do atomic batches: multi-event and tagged
/// appends would not be all-or-nothing on it.
fn check_server_version(client: &Client, config: &JetStreamConfig) -> Result<(), StoreError> {
    let info = client.server_info();
    let (want_major, want_minor) = ATOMIC_BATCHES_SINCE;
    match major_minor(&info.version) {
        Some(v) if v >= ATOMIC_BATCHES_SINCE => Ok(()),
        _ => Err(StoreError::backend(
            format!(
                "checking the NATS server at {} ({})",
                config.servers.join(", "),
                info.server_name
            ),
            format!(
                "nats-server {:?} cannot do atomic batch publish (nats-server \
                 {want_major}.{want_minor} or newer): kiln's multi-event and tagged appends \
                 would not be all-or-nothing; upgrade the server",
                info.version
            ),
        )),
    }
}

/// Refuses a stream that does not allow atomic batches after kiln asked for
/// them (a server or cluster member too old for the setting drops it).
fn check_stream(stream: &js_stream::Stream, client: &Client) -> Result<(), StoreError> {
    let info = stream.cached_info();
    if info.config.allow_atomic_publish && info.config.allow_direct {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (!info.config.allow_atomic_publish).then_some("allow_atomic_publish (atomic batches)"),
        (!info.config.allow_direct).then_some("allow_direct (direct get)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(StoreError::backend(
        format!("checking JetStream stream '{}'", info.config.name),
        format!(
            "the stream does not allow {} though kiln asked for it; the server \
             (nats-server {} at {}) or a member of its cluster does not support it",
            missing.join(" and "),
            client.server_info().version,
            client.server_info().server_name
        ),
    ))
}

async fn ensure_stream(
    js: &Context,
    want: js_stream::Config,
) -> Result<js_stream::Stream, StoreError> {
    let name = want.name.clone();
    let mut stream = js.get_or_create_stream(want.clone()).await.map_err(|e| {
        StoreError::backend(format!("creating or opening JetStream stream '{name}'"), e)
    })?;
    let have = stream
        .info()
        .await
        .map_err(|e| StoreError::backend(format!("reading the settings of stream '{name}'"), e))?
        .config
        .clone();
    let missing: Vec<&String> = want
        .subjects
        .iter()
        .filter(|s| !have.subjects.contains(s))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::backend(
            format!("checking JetStream stream '{name}'"),
            format!(
                "the stream exists but does not capture {missing:?} (it captures {:?}); \
                 add those subjects to it, or configure another stream name or subject prefix",
                have.subjects
            ),
        ));
    }
    let mut update = have.clone();
    update.allow_direct = true;
    update.allow_atomic_publish |= want.allow_atomic_publish;
    if want.duplicate_window > Duration::ZERO {
        update.duplicate_window = want.duplicate_window;
    }
    if want.max_messages_per_subject != 0 {
        update.max_messages_per_subject = want.max_messages_per_subject;
    }
    if update != have {
        tracing::info!(stream = %name, "updating the stream to the settings kiln needs");
        js.update_stream(update).await.map_err(|e| {
            StoreError::backend(
                format!(
                    "updating stream '{name}' to allow direct get and atomic batches \
                     with the configured dedupe window"
                ),
                e,
            )
        })?;
        stream = js
            .get_stream(&name)
            .await
            .map_err(|e| StoreError::backend(format!("reopening stream '{name}'"), e))?;
    }
    Ok(stream)
}

/// A JetStream API error as the server reports it in a publish ack.
#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (status {}, code {})",
            self.description, self.code, self.err_code
        )
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn guard_moved(&self) -> bool {
        matches!(
            self.err_code,
            ERR_WRONG_LAST_SEQUENCE | ERR_WRONG_LAST_SEQUENCE_IN_BATCH
        )
    }

    /// Worth retrying as is: the server is busy with something that will pass.
    fn transient(&self) -> bool {
        matches!(
            self.err_code,
            ERR_DUPLICATE_IN_PROCESS | ERR_BATCH_INCOMPLETE | ERR_BATCH_TOO_MANY_INFLIGHT
        ) || self.description.contains("in process")
    }
}

/// A publish ack, or the error in its place.
#[derive(Debug, Default, Deserialize)]
struct PubReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
}

/// The last read state of a tag: its newest marker and the event it points at.
#[derive(Clone, Copy, Debug, Default)]
struct TagState {
    marker_seq: u64,
    position: Position,
}

/// One tag marker an append writes.
struct MarkerPlan {
    tag: String,
    /// Index of the last event of the append carrying the tag, if any does.
    carried_by: Option<usize>,
    /// Part of the append's condition: guarded by its last sequence.
    guarded: bool,
}

/// What the server did with one write attempt.
enum Outcome {
    Committed(AppendResult),
    /// A single message whose id the server had seen, stored at this sequence.
    Duplicate(u64),
    /// An atomic batch refused because one of its ids was seen.
    DuplicateInBatch,
    /// An OCC guard failed: the stream (or a tag) moved since it was read.
    GuardMoved,
    /// The server asked to come back later.
    Busy(ApiError),
}

/// A subject's last kiln event, and the newest foreign message after it.
struct LastOn {
    event: Option<RecordedEvent>,
    foreign_after: Option<(u64, String)>,
}

impl LastOn {
    fn head(&self) -> StreamHead {
        self.event
            .as_ref()
            .map_or(StreamHead::default(), |ev| StreamHead {
                version: ev.version,
                position: ev.position,
            })
    }
}

/// The version of the last of `n` events appended on a stream at `version`.
fn next_version(stream: &StreamId, version: u64, n: usize) -> Result<u64, StoreError> {
    version
        .checked_add(n as u64)
        .filter(|v| *v <= MAX_VERSION)
        .ok_or_else(|| StoreError::TooLarge {
            stream: stream.clone(),
            what: "the stream's version after the append".into(),
            size: usize::try_from(version)
                .unwrap_or(usize::MAX)
                .saturating_add(n),
            limit: usize::try_from(MAX_VERSION).unwrap_or(usize::MAX),
        })
}

fn jitter(max_millis: u64) -> Duration {
    let r = (Uuid::new_v4().as_u128() as u64) % max_millis.max(1);
    Duration::from_millis(r)
}

fn backoff(attempt: u32) -> Duration {
    let ceiling = 2u64.saturating_pow(attempt.min(10)).min(1000);
    Duration::from_millis(ceiling / 2) + jitter(ceiling / 2 + 1)
}

fn header_time(h: &HeaderMap) -> u64 {
    wire::header(h, "Nats-Time-Stamp")
        .and_then(wire::parse_rfc3339_millis)
        .unwrap_or(0)
}

fn msg_id(m: &StreamMessage) -> Option<Uuid> {
    wire::header(&m.headers, wire::MSG_ID).and_then(|s| Uuid::parse_str(s.trim()).ok())
}

impl Inner {
    fn millis(&self) -> u64 {
        self.config.request_timeout_ms
    }

    /// Records a foreign message (logged once per sequence).
    fn note_foreign(&self, position: u64, subject: &str, reason: &wire::NotKiln) {
        let Ok(mut seen) = self.foreign.lock() else {
            return;
        };
        if seen.contains_key(&position) {
            return;
        }
        tracing::warn!(
            position,
            subject,
            "skipping a message that is not a kiln event: {reason}"
        );
        self.foreign_total.fetch_add(1, Ordering::Relaxed);
        if seen.len() >= FOREIGN_KEPT {
            seen.pop_first();
        }
        seen.insert(
            position,
            ForeignRecord {
                position,
                subject: subject.to_string(),
                reason: reason.to_string(),
            },
        );
    }

    fn decode_stored(&self, m: &StreamMessage) -> Result<RecordedEvent, wire::NotKiln> {
        let decoded = wire::decode_event(
            &self.subjects,
            m.subject.as_str(),
            m.sequence,
            header_time(&m.headers),
            &m.headers,
            m.payload.clone(),
        );
        if let Err(e) = &decoded {
            self.note_foreign(m.sequence, m.subject.as_str(), e);
        }
        decoded
    }

    /// The last kiln event on `subject` (an event subject or the events
    /// filter), stepping back over foreign messages; and the newest foreign
    /// message after it, if the subject ends with one.
    async fn last_event_on(&self, subject: &str) -> Result<LastOn, StoreError> {
        let mut foreign_after = None;
        let mut next = self.last_on(&self.events, subject).await?;
        for _ in 0..FOREIGN_WALK {
            let Some(m) = next else {
                return Ok(LastOn {
                    event: None,
                    foreign_after,
                });
            };
            match self.decode_stored(&m) {
                Ok(ev) => {
                    return Ok(LastOn {
                        event: Some(ev),
                        foreign_after,
                    });
                }
                Err(why) => {
                    foreign_after.get_or_insert((m.sequence, why.0));
                    next = if is_wildcard(subject) {
                        self.last_matching_up_to(subject, m.sequence - 1).await?
                    } else {
                        self.last_up_to(subject, m.sequence - 1).await?
                    };
                }
            }
        }
        Err(StoreError::Corrupt {
            what: format!("subject '{subject}'"),
            reason: format!(
                "its last {FOREIGN_WALK} messages are not kiln events; remove them or \
                 move the other service to subjects outside '{}'",
                self.subjects.events_filter()
            ),
        })
    }

    /// The last message on `subject` in `stream`, by direct get.
    async fn last_on(
        &self,
        stream: &js_stream::Stream,
        subject: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "last_by_subj": subject });
        self.direct_get(stream, body, || {
            format!("reading the last message on '{subject}'")
        })
        .await
    }

    /// The first message on `subject` at sequence `seq` or later.
    async fn next_on(&self, subject: &str, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "seq": seq, "next_by_subj": subject });
        self.direct_get(&self.events, body, || {
            format!("reading '{subject}' from position {seq}")
        })
        .await
    }

    async fn msg_at(&self, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "seq": seq });
        self.direct_get(&self.events, body, || format!("reading position {seq}"))
            .await
    }

    /// The last message matching the wildcard `filter` at or before sequence
    /// `up_to`, found by walking back one sequence at a time (at most
    /// [`MATCHING_WALK`]; removed sequences and other subjects are stepped
    /// over). A multi-subject "last" get cannot serve here: it answers the
    /// last message of *each* matching subject, earliest first.
    async fn last_matching_up_to(
        &self,
        filter: &str,
        up_to: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let stop = up_to.saturating_sub(MATCHING_WALK);
        let mut seq = up_to;
        while seq > stop {
            if let Some(m) = self.msg_at(seq).await?
                && subject_matches(filter, &m.subject)
            {
                return Ok(Some(m));
            }
            seq -= 1;
        }
        if seq == 0 {
            return Ok(None);
        }
        Err(StoreError::Corrupt {
            what: format!("the stream before position {}", up_to + 1),
            reason: format!(
                "none of its last {MATCHING_WALK} messages is on '{filter}': cannot tell its \
                 last event; move other services' messages out of this stream"
            ),
        })
    }

    /// The last message on the literal `subject` at or before sequence `up_to`.
    async fn last_up_to(
        &self,
        subject: &str,
        up_to: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if up_to == 0 {
            return Ok(None);
        }
        // `up_to_seq` applies to multi-subject last gets, answered as a batch.
        let body = serde_json::json!({ "multi_last": [subject], "up_to_seq": up_to, "batch": 1 });
        let op = || format!("reading the last message on '{subject}' up to position {up_to}");
        let (mut msgs, _) = self.direct_batch(body, &op).await?;
        Ok(msgs.pop())
    }

    /// The highest sequence of `stream` this process has seen written or read,
    /// sent with direct gets as `min_last_seq` (the proposed read-after-write
    /// of ADR-53: a server implementing it answers from a replica that far
    /// along, or 412). nats-server 2.15 ignores it, which is why replicated
    /// streams are read from their leader ([`Inner::leader_get`]).
    fn seen(&self, stream: &js_stream::Stream) -> &AtomicU64 {
        if stream.cached_info().config.name == self.config.stream {
            &self.seen_events
        } else {
            &self.seen_snapshots
        }
    }

    /// A get answered by the stream's leader (`$JS.API.STREAM.MSG.GET`), which
    /// has every acknowledged message: on a replicated stream a direct get may
    /// be answered by a follower a few milliseconds behind, so `latest` right
    /// after an ack, and a dedupe replay, could miss the write. (nats-server
    /// 2.15 does not implement `min_last_seq`, the proposed fix for that.)
    async fn leader_get(
        &self,
        stream: &js_stream::Stream,
        body: &serde_json::Value,
        op: &impl Fn() -> String,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let mut get = stream.raw_message_builder();
        if let Some(seq) = body["seq"].as_u64() {
            get = get.sequence(seq);
        }
        if let Some(subject) = body["last_by_subj"].as_str() {
            get = get.last_by_subject(subject);
        }
        if let Some(subject) = body["next_by_subj"].as_str() {
            get = get.next_by_subject(subject);
        }
        match get.send().await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) if e.to_string().contains("timed out") => Err(StoreError::Timeout {
                op: op(),
                millis: self.millis(),
            }),
            Err(e) if e.to_string().contains("no responders") => Err(self.electing(op())),
            Err(e) => Err(StoreError::backend(op(), e)),
        }
    }

    /// One direct get (`$JS.API.DIRECT.GET.<stream>` with `body`), answered
    /// by any replica at least as far along as what this process has seen.
    async fn direct_get(
        &self,
        stream: &js_stream::Stream,
        mut body: serde_json::Value,
        op: impl Fn() -> String,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if stream.cached_info().config.num_replicas > 1 {
            return self.leader_get(stream, &body, &op).await;
        }
        let seen = self.seen(stream);
        let name = &stream.cached_info().config.name;
        let api = format!("$JS.API.DIRECT.GET.{name}");
        for attempt in 0..DIRECT_GET_ATTEMPTS {
            let min = seen.load(Ordering::Acquire);
            if min > 0 {
                body["min_last_seq"] = min.into();
            }
            let msg = match self
                .client
                .request(api.clone(), body.to_string().into())
                .await
            {
                Ok(msg) => msg,
                Err(e) => {
                    return Err(match e.kind() {
                        RequestErrorKind::TimedOut => StoreError::Timeout {
                            op: op(),
                            millis: self.millis(),
                        },
                        RequestErrorKind::NoResponders => self.electing(op()),
                        _ => StoreError::backend(op(), e),
                    });
                }
            };
            if let Some(status) = msg.status {
                match status.as_u16() {
                    404 => return Ok(None),
                    // No replica that answered was far enough along yet; or
                    // the stream was deleted and created again, behind what
                    // this process saw: then its last sequence is the floor.
                    412 if attempt + 1 < DIRECT_GET_ATTEMPTS => {
                        if attempt == 2
                            && let Ok(info) = stream.clone().info().await
                            && info.state.last_sequence < min
                        {
                            tracing::warn!(
                                stream = %name,
                                "the stream's last sequence {} is behind {min}, which this \
                                 process saw: it was recreated; reading from what it holds",
                                info.state.last_sequence
                            );
                            seen.store(info.state.last_sequence, Ordering::Release);
                            continue;
                        }
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    412 => return Err(self.electing(op())),
                    code => {
                        return Err(StoreError::backend(
                            op(),
                            format!(
                                "direct get answered {code} {}",
                                msg.description.clone().unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
            let m = StreamMessage::try_from(msg).map_err(|e| StoreError::backend(op(), e))?;
            seen.fetch_max(m.sequence, Ordering::AcqRel);
            return Ok(Some(m));
        }
        Err(self.electing(op()))
    }

    /// Up to `max` messages on `subject` from sequence `from` on, with batched
    /// direct gets (one request per 1000 messages).
    async fn read_subject(
        &self,
        subject: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<StreamMessage>, StoreError> {
        let op = || format!("reading '{subject}' from position {from}");
        let mut out: Vec<StreamMessage> = Vec::with_capacity(max.min(1024));
        let mut seq = from;
        while out.len() < max {
            let want = (max - out.len()).min(1000);
            let body = serde_json::json!({ "seq": seq, "next_by_subj": subject, "batch": want });
            let (msgs, pending) = self.direct_batch(body, &op).await?;
            let Some(last) = msgs.last() else {
                break;
            };
            seq = last.sequence + 1;
            out.extend(msgs);
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// One batched direct get on the event stream: the messages the server
    /// sends until its end-of-batch, and how many more match (its
    /// `Nats-Num-Pending`).
    async fn direct_batch(
        &self,
        mut body: serde_json::Value,
        op: &(dyn Fn() -> String + Sync),
    ) -> Result<(Vec<StreamMessage>, u64), StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.config.stream);
        let min = self.seen_events.load(Ordering::Acquire);
        if min > 0 {
            body["min_last_seq"] = min.into();
        }
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| StoreError::backend(op(), e))?;
        self.client
            .publish_with_reply(api, inbox, body.to_string().into())
            .await
            .map_err(|e| StoreError::backend(op(), e))?;
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(self.config.request_timeout(), sub.next())
                .await
                .map_err(|_| StoreError::Timeout {
                    op: op(),
                    millis: self.millis(),
                })?
                .ok_or_else(|| StoreError::backend(op(), "the connection closed"))?;
            if let Some(status) = msg.status {
                return match status.as_u16() {
                    // End of batch: how many more match tells whether to go on.
                    204 => {
                        let pending = msg
                            .headers
                            .as_ref()
                            .and_then(|h| wire::header(h, "Nats-Num-Pending"))
                            .and_then(|p| p.trim().parse().ok())
                            .unwrap_or(0);
                        Ok((out, pending))
                    }
                    404 => Ok((out, 0)),
                    412 => Err(self.electing(op())),
                    code => Err(StoreError::backend(
                        op(),
                        format!(
                            "direct get answered {code} {}",
                            msg.description.clone().unwrap_or_default()
                        ),
                    )),
                };
            }
            let m = StreamMessage::try_from(msg).map_err(|e| StoreError::backend(op(), e))?;
            self.seen_events.fetch_max(m.sequence, Ordering::AcqRel);
            out.push(m);
        }
    }

    /// No server answered for the stream: it is electing a leader (all of its
    /// replicas are there but none leads yet), or it is gone. Asks which,
    /// briefly: a deleted stream is reported at once by the meta leader, and
    /// a stream without a leader answers nothing, so every retry of an
    /// append during an election would wait out the lookup (2 s before:
    /// appends came back up to 1.8 s after a raw client's).
    async fn no_responders(&self, op: String, subject: &str) -> StoreError {
        let name = &self.config.stream;
        let lookup = tokio::time::timeout(NO_RESPONDERS_LOOKUP, self.js.get_stream(name)).await;
        match lookup {
            Ok(Err(e)) if e.to_string().contains("not found") => StoreError::backend(
                op,
                format!("no JetStream stream captures '{subject}': stream '{name}' was deleted"),
            ),
            _ => self.electing(op),
        }
    }

    /// Does the event stream have a leader right now? One stream info request
    /// (answered by the leader), bounded by [`ACK_PATIENCE`]; no answer, an
    /// error or no leader in a cluster's answer all mean no.
    async fn stream_has_leader(&self) -> bool {
        let api = format!("$JS.API.STREAM.INFO.{}", self.config.stream);
        let request = Request::new()
            .payload(Bytes::new())
            .timeout(Some(ACK_PATIENCE));
        let Ok(reply) = self.client.send_request(api, request).await else {
            return false;
        };
        #[derive(Deserialize)]
        struct Leader {
            #[serde(default)]
            leader: Option<String>,
        }
        #[derive(Deserialize)]
        struct Info {
            #[serde(default)]
            error: Option<serde_json::Value>,
            #[serde(default)]
            cluster: Option<Leader>,
        }
        match serde_json::from_slice::<Info>(&reply.payload) {
            Ok(info) if info.error.is_none() => info
                .cluster
                .is_none_or(|c| c.leader.is_some_and(|l| !l.is_empty())),
            _ => false,
        }
    }

    fn electing(&self, op: String) -> StoreError {
        StoreError::Unavailable {
            op,
            reason: format!(
                "JetStream stream '{}' has no leader right now (electing a leader after a \
                 server left); retry in a moment",
                self.config.stream
            ),
        }
    }

    /// Sends a message and waits for the server's ack (or error) as JSON.
    async fn publish_request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        op: &(dyn Fn() -> String + Sync),
    ) -> Result<PubReply, StoreError> {
        let stream = if self.subjects.is_snapshot(&subject) {
            &self.seen_snapshots
        } else {
            &self.seen_events
        };
        let request = Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.config.request_timeout()));
        // While the ack is late, ask whether the stream still has a leader: a
        // request caught by a leader's death is never answered, and waiting
        // out the whole timeout would hide a routine election.
        // A reconnect while waiting means the request or its ack is lost:
        // say so rather than wait out the timeout; a retry with the same event
        // ids is safe.
        // A new leader elected meanwhile (its advisory) means a request
        // sent before it went to the old one and is never answered: say so
        // at once rather than at the next patience tick, or at the timeout
        // if the stream has a leader again by then (found measuring a leader
        // kill against a raw client: kiln's appends came back up to 1.8 s
        // after the raw client's).
        let mut moved = self.reconnects.clone();
        moved.borrow_and_update();
        let connects = self.connects.load(Ordering::Acquire);
        let send = self.client.send_request(subject.clone(), request);
        tokio::pin!(send);
        let answered = loop {
            tokio::select! {
                answered = &mut send => break answered,
                changed = moved.changed() => {
                    if changed.is_err() {
                        // The connection's watcher is gone (shutting down):
                        // wait for the answer or the timeout.
                        break (&mut send).await;
                    }
                    return Err(StoreError::Unavailable {
                        op: op(),
                        reason: "the stream elected a new leader, or the connection to NATS \
                                 was re-established, while waiting for the server's answer; \
                                 retry (the same event ids are safe)"
                            .into(),
                    });
                }
                _ = tokio::time::sleep(ACK_PATIENCE) => {
                    if self.connects.load(Ordering::Acquire) != connects {
                        return Err(StoreError::Unavailable {
                            op: op(),
                            reason: "the connection to NATS was lost and re-established while \
                                     waiting for the server's answer; retry (the same event \
                                     ids are safe)"
                                .into(),
                        });
                    }
                    if !self.stream_has_leader().await {
                        return Err(self.electing(op()));
                    }
                }
            }
        };
        let reply = match answered {
            Ok(reply) => reply,
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::TimedOut => StoreError::Timeout {
                        op: op(),
                        millis: self.millis(),
                    },
                    RequestErrorKind::NoResponders => self.no_responders(op(), &subject).await,
                    _ => StoreError::backend(op(), e),
                });
            }
        };
        let reply: PubReply = serde_json::from_slice(&reply.payload).map_err(|e| {
            StoreError::backend(
                op(),
                format!(
                    "unreadable publish ack {:?}: {e}",
                    String::from_utf8_lossy(&reply.payload)
                ),
            )
        })?;
        stream.fetch_max(reply.seq, Ordering::AcqRel);
        Ok(reply)
    }

    /// The stream's head: its last event's version and position, plus that event's
    /// sequence for the OCC guard (the same number as the position).
    /// Foreign messages at the end of the stream's subject are stepped over.
    async fn head_of(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        let last = self.last_event_on(&self.subjects.event(stream)).await?;
        Ok(last.head())
    }

    /// The head an append builds on: refused when the stream's subject ends
    /// with a foreign message (the server's guard would refuse every write
    /// built on the last kiln event, and writing after it would make the
    /// foreign message part of the stream).
    async fn head_for_append(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        let last = self.last_event_on(&self.subjects.event(stream)).await?;
        if let Some((position, reason)) = last.foreign_after {
            return Err(StoreError::ForeignMessage {
                stream: stream.clone(),
                position,
                reason,
            });
        }
        Ok(last.head())
    }

    fn head_hint(&self, stream: &StreamId) -> Option<StreamHead> {
        self.head_hints.lock().ok()?.get(stream).copied()
    }

    fn remember_head(&self, stream: &StreamId, result: AppendResult) {
        if let Ok(mut hints) = self.head_hints.lock() {
            if hints.len() >= HEAD_HINTS && !hints.contains_key(stream) {
                hints.clear();
            }
            hints.insert(
                stream.clone(),
                StreamHead {
                    version: result.version,
                    position: result.position,
                },
            );
        }
    }

    fn forget_head(&self, stream: &StreamId) {
        if let Ok(mut hints) = self.head_hints.lock() {
            hints.remove(stream);
        }
    }

    async fn tag_state(&self, tag: &str) -> Result<TagState, StoreError> {
        match self.last_on(&self.events, &self.subjects.tag(tag)).await? {
            None => Ok(TagState::default()),
            Some(m) => Ok(TagState {
                marker_seq: m.sequence,
                position: wire::tag_position(&m.headers, m.sequence).unwrap_or_else(|why| {
                    tracing::warn!(
                        tag,
                        position = m.sequence,
                        "tag marker not written by kiln ({why}): reading it as pointing at itself"
                    );
                    m.sequence
                }),
            }),
        }
    }

    /// Asks the server, without writing anything, whether `id` was stored within
    /// the dedupe window, and at which sequence. The probe carries the event id and
    /// a guard that never holds, one the server checks after the id (so a known
    /// id gets a duplicate ack) and that refuses anything else. Which guard
    /// depends on the server's mode (nats-server 2.15):
    /// - clustered: an expected last subject sequence of u64::MAX on the probe
    ///   subject (where nothing is stored). An expected-last-msg-id refusal
    ///   there leaves a replicated stream answering no further publishes.
    /// - one server: an expected-last-msg-id that never holds; a single server
    ///   checks the subject sequence before the id.
    async fn probe(&self, id: &Uuid) -> Result<Option<u64>, StoreError> {
        let op = || {
            format!(
                "looking up event id {id} in stream '{}'",
                self.config.stream
            )
        };
        let mut h = HeaderMap::new();
        h.insert(wire::MSG_ID, id.to_string().as_str());
        if self.clustered {
            h.insert(
                wire::EXPECTED_LAST_SUBJECT_SEQ,
                u64::MAX.to_string().as_str(),
            );
        } else {
            h.insert(
                wire::EXPECTED_LAST_MSG_ID,
                format!("kiln-probe-{}", Uuid::new_v4()).as_str(),
            );
        }
        for attempt in 0..MAX_ATTEMPTS {
            let reply = self
                .publish_request(self.subjects.probe(), h.clone(), Bytes::new(), &op)
                .await?;
            match reply.error {
                None if reply.duplicate => return Ok(Some(reply.seq)),
                None => {
                    return Err(StoreError::backend(
                        op(),
                        format!(
                            "the server stored the dedupe probe at position {} instead of \
                             refusing it; this server does not behave as kiln expects",
                            reply.seq
                        ),
                    ));
                }
                Some(e) if e.guard_moved() || e.err_code == ERR_WRONG_LAST_MSG_ID => {
                    return Ok(None);
                }
                Some(e) if e.transient() => tokio::time::sleep(backoff(attempt)).await,
                Some(e) => return Err(StoreError::backend(op(), e)),
            }
        }
        Err(StoreError::backend(
            op(),
            "the server kept answering 'in process'",
        ))
    }

    /// A retry of `req` whose first event the server stored at `seq`: the original
    /// result if the whole append was committed there, a duplicate-id error if not.
    async fn replayed_from(
        &self,
        seq: u64,
        req: &AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        let subject = self.subjects.event(&req.stream);
        let n = req.events.len();
        // A batched read may come from a replica behind the leader that just
        // reported the id: ask again, briefly, before judging the messages.
        let mut msgs = self.read_subject(&subject, seq, n).await?;
        for attempt in 1..DIRECT_GET_ATTEMPTS {
            if msgs.len() >= n && msgs.first().map(|m| m.sequence) == Some(seq) {
                break;
            }
            tokio::time::sleep(backoff(attempt)).await;
            msgs = self.read_subject(&subject, seq, n).await?;
        }
        if msgs.first().map(|m| m.sequence) != Some(seq) {
            let elsewhere = match self.msg_at(seq).await? {
                Some(m) => format!("'{}'", m.subject),
                None => "a message that no longer exists".to_string(),
            };
            return Err(StoreError::DuplicateEventId {
                stream: req.stream.clone(),
                id: req.events[0].id,
                reason: format!(
                    "it was already committed at position {seq} on {elsewhere} by another append"
                ),
            });
        }
        let version_at = |m: &StreamMessage| {
            wire::version_of(&m.headers).map_err(|reason| StoreError::Corrupt {
                what: format!("message {} on '{subject}'", m.sequence),
                reason,
            })
        };
        let first_version = version_at(&msgs[0])?;
        for (i, ev) in req.events.iter().enumerate() {
            let same = match msgs.get(i) {
                Some(m) => msg_id(m) == Some(ev.id) && version_at(m)? == first_version + i as u64,
                None => false,
            };
            if !same {
                return Err(StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: req.events[0].id,
                    reason: format!(
                        "it was committed by an earlier append that did not include event #{i} ({})",
                        ev.id
                    ),
                });
            }
        }
        Ok(AppendResult {
            first_position: seq,
            position: msgs[n - 1].sequence,
            version: first_version + n as u64 - 1,
        })
    }

    /// If `req` is a retry of a committed append, its original result.
    async fn replay(&self, req: &AppendRequest) -> Result<Option<AppendResult>, StoreError> {
        match self.probe(&req.events[0].id).await? {
            Some(seq) => self.replayed_from(seq, req).await.map(Some),
            None => Ok(None),
        }
    }

    /// The server refused a batch for a known id that is not its first: names it.
    async fn which_duplicate(&self, req: &AppendRequest) -> Result<StoreError, StoreError> {
        for ev in &req.events[1..] {
            if let Some(seq) = self.probe(&ev.id).await? {
                let where_ = match self.msg_at(seq).await? {
                    Some(m) => format!("on '{}' at position {seq}", m.subject),
                    None => format!("at position {seq}"),
                };
                return Ok(StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: ev.id,
                    reason: format!("it was already committed {where_} by another append"),
                });
            }
        }
        Ok(StoreError::DuplicateEventId {
            stream: req.stream.clone(),
            id: req.events[0].id,
            reason: "the server refused the append: one of its event ids was committed \
                     within the dedupe window"
                .into(),
        })
    }

    /// One marker per tag the append carries or is conditioned on, by tag name.
    fn plan_markers(&self, req: &AppendRequest) -> Vec<MarkerPlan> {
        let mut markers: BTreeMap<&str, MarkerPlan> = BTreeMap::new();
        fn marker<'m, 'a>(
            markers: &'m mut BTreeMap<&'a str, MarkerPlan>,
            tag: &'a str,
        ) -> &'m mut MarkerPlan {
            markers.entry(tag).or_insert_with(|| MarkerPlan {
                tag: tag.to_string(),
                carried_by: None,
                guarded: false,
            })
        }
        for (i, ev) in req.events.iter().enumerate() {
            for tag in &ev.tags {
                marker(&mut markers, tag).carried_by = Some(i);
            }
        }
        for tag in req.condition.iter().flat_map(|c| &c.tags) {
            marker(&mut markers, tag).guarded = true;
        }
        markers.into_values().collect()
    }

    async fn publish_single(
        &self,
        req: &AppendRequest,
        head: StreamHead,
    ) -> Result<Outcome, StoreError> {
        let ev = &req.events[0];
        let version = next_version(&req.stream, head.version, 1)?;
        let mut h = wire::event_headers(
            &ev.id,
            &ev.event_type,
            version,
            &ev.tags,
            &ev.metadata,
            ev.timestamp,
        );
        h.insert(
            wire::EXPECTED_LAST_SUBJECT_SEQ,
            head.position.to_string().as_str(),
        );
        let op = || format!("appending to stream '{}'", req.stream);
        let reply = self
            .publish_request(self.subjects.event(&req.stream), h, ev.data.clone(), &op)
            .await?;
        Ok(match reply.error {
            None if reply.duplicate => Outcome::Duplicate(reply.seq),
            None => Outcome::Committed(AppendResult {
                first_position: reply.seq,
                position: reply.seq,
                version,
            }),
            Some(e) if e.guard_moved() => Outcome::GuardMoved,
            Some(e) if e.transient() => Outcome::Busy(e),
            Some(e) => return Err(StoreError::backend(op(), e)),
        })
    }

    /// One atomic batch: the events (the first guarded by the stream's last
    /// sequence), then one marker per tag (condition tags guarded by theirs).
    async fn publish_batch(
        &self,
        req: &AppendRequest,
        head: StreamHead,
        markers: &[MarkerPlan],
        tags: &HashMap<String, TagState>,
    ) -> Result<Outcome, StoreError> {
        let n = req.events.len();
        let last_version = next_version(&req.stream, head.version, n)?;
        let subject = self.subjects.event(&req.stream);
        let mut msgs: Vec<(String, HeaderMap, Bytes)> = Vec::with_capacity(n + markers.len());
        for (i, ev) in req.events.iter().enumerate() {
            let mut h = wire::event_headers(
                &ev.id,
                &ev.event_type,
                head.version + 1 + i as u64,
                &ev.tags,
                &ev.metadata,
                ev.timestamp,
            );
            if i == 0 {
                h.insert(
                    wire::EXPECTED_LAST_SUBJECT_SEQ,
                    head.position.to_string().as_str(),
                );
            }
            msgs.push((subject.clone(), h, ev.data.clone()));
        }
        for (j, m) in markers.iter().enumerate() {
            let state = tags.get(&m.tag).copied().unwrap_or_default();
            let mut h = HeaderMap::new();
            match m.carried_by {
                Some(e) => h.insert(wire::TAG_OFFSET, (n + j - e).to_string().as_str()),
                None => h.insert(wire::TAG_POSITION, state.position.to_string().as_str()),
            }
            if m.guarded {
                h.insert(
                    wire::EXPECTED_LAST_SUBJECT_SEQ,
                    state.marker_seq.to_string().as_str(),
                );
            }
            msgs.push((self.subjects.tag(&m.tag), h, Bytes::new()));
        }
        let total = msgs.len();
        let batch_id = Uuid::new_v4().simple().to_string();
        let op = || {
            format!(
                "appending {n} events to stream '{}' in an atomic batch",
                req.stream
            )
        };
        let mut reply = None;
        for (k, (subj, mut h, payload)) in msgs.into_iter().enumerate() {
            h.insert(wire::BATCH_ID, batch_id.as_str());
            h.insert(wire::BATCH_SEQ, (k + 1).to_string().as_str());
            if k + 1 < total {
                self.client
                    .publish_with_headers(subj, h, payload)
                    .await
                    .map_err(|e| StoreError::backend(op(), e))?;
            } else {
                h.insert(wire::BATCH_COMMIT, "1");
                reply = Some(self.publish_request(subj, h, payload, &op).await?);
            }
        }
        let reply = reply.unwrap_or_default();
        Ok(match reply.error {
            None => {
                // A server that commits batches atomically says how many
                // messages it committed; anything else is not an atomic commit.
                if reply.count != Some(total as u64) {
                    return Err(StoreError::backend(
                        op(),
                        format!(
                            "the server acknowledged the batch with a message count of {} \
                             instead of {total}: it did not commit it as one atomic batch",
                            reply.count.map_or("none".to_string(), |c| c.to_string())
                        ),
                    ));
                }
                // An atomic batch is stored at consecutive sequences, the
                // commit (last) message at `seq`.
                let first_position = reply.seq + 1 - total as u64;
                Outcome::Committed(AppendResult {
                    first_position,
                    position: first_position + n as u64 - 1,
                    version: last_version,
                })
            }
            Some(e) if e.err_code == ERR_BATCH_DUPLICATE_MSG_ID => Outcome::DuplicateInBatch,
            Some(e) if e.guard_moved() => Outcome::GuardMoved,
            Some(e) if e.transient() => Outcome::Busy(e),
            Some(e) => return Err(StoreError::backend(op(), e)),
        })
    }

    async fn append(&self, req: AppendRequest) -> Result<AppendResult, StoreError> {
        validate_append(&req, &self.config.limits)?;
        let markers = self.plan_markers(&req);
        debug_assert!(req.events.len() + markers.len() <= MAX_BATCH_MESSAGES);
        let single = markers.is_empty() && req.events.len() == 1;
        let mut busy = None;
        for attempt in 0..MAX_ATTEMPTS {
            let hint = if attempt == 0 {
                self.head_hint(&req.stream)
            } else {
                None
            };
            let head = match hint {
                Some(h) if req.expected.admits(h.version) => h,
                _ => self.head_for_append(&req.stream).await?,
            };
            if !req.expected.admits(head.version) {
                if let Some(original) = self.replay(&req).await? {
                    return Ok(original);
                }
                return Err(StoreError::VersionConflict {
                    stream: req.stream.clone(),
                    expected: req.expected,
                    actual: head.version,
                });
            }
            let states = futures::future::try_join_all(markers.iter().map(|m| async move {
                Ok::<_, StoreError>((m.tag.clone(), self.tag_state(&m.tag).await?))
            }))
            .await?
            .into_iter()
            .collect::<HashMap<_, _>>();
            if let Some(cond) = &req.condition {
                for tag in &cond.tags {
                    let position = states.get(tag).map_or(0, |s| s.position);
                    if position > cond.after {
                        if let Some(original) = self.replay(&req).await? {
                            return Ok(original);
                        }
                        return Err(StoreError::TagConflict {
                            stream: req.stream.clone(),
                            tag: tag.clone(),
                            after: cond.after,
                            position,
                        });
                    }
                }
            }
            let outcome = if single {
                self.publish_single(&req, head).await?
            } else {
                self.publish_batch(&req, head, &markers, &states).await?
            };
            match outcome {
                Outcome::Committed(result) => {
                    self.remember_head(&req.stream, result);
                    return Ok(result);
                }
                Outcome::Duplicate(seq) => return self.replayed_from(seq, &req).await,
                Outcome::DuplicateInBatch => {
                    return match self.replay(&req).await? {
                        Some(original) => Ok(original),
                        None => Err(self.which_duplicate(&req).await?),
                    };
                }
                // Someone else wrote first: read again. The next round reports a
                // conflict if the expectation no longer holds, or retries if it does.
                Outcome::GuardMoved => {
                    self.forget_head(&req.stream);
                    if attempt >= 3 {
                        tokio::time::sleep(jitter(u64::from(attempt.min(50)))).await;
                    }
                }
                Outcome::Busy(e) => {
                    busy = Some(e);
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        Err(StoreError::backend(
            format!("appending to stream '{}'", req.stream),
            format!(
                "gave up after {MAX_ATTEMPTS} attempts: the stream kept moving between reading \
                 its version and writing{}",
                busy.map(|e| format!(" (last server answer: {e})"))
                    .unwrap_or_default()
            ),
        ))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let subject = self.subjects.event(stream);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Some(last) = self.last_event_on(&subject).await?.event else {
            return Ok(Vec::new());
        };
        let from = from_version.max(1);
        if from > last.version {
            return Ok(Vec::new());
        }
        let mut seq = if from == last.version {
            last.position
        } else if from == 1 {
            1
        } else {
            self.seq_of_version(&subject, from, last.position).await?
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        // Foreign messages are skipped, so a page may take more than one read;
        // and a batched read may be answered by a replica behind the last
        // event read above (seen with batched direct gets on 2.15): it is
        // asked again, briefly, until the read reaches that event.
        let mut behind = 0;
        while out.len() < limit && seq <= last.position {
            let msgs = self.read_subject(&subject, seq, limit - out.len()).await?;
            let Some(end) = msgs.last().map(|m| m.sequence) else {
                behind += 1;
                if behind >= DIRECT_GET_ATTEMPTS {
                    return Err(self.electing(format!(
                        "reading stream '{stream}' from position {seq} up to {}",
                        last.position
                    )));
                }
                tokio::time::sleep(backoff(behind)).await;
                continue;
            };
            for m in &msgs {
                if m.sequence > last.position {
                    break;
                }
                if let Ok(ev) = self.decode_stored(m)
                    && ev.version >= from
                {
                    out.push(ev);
                }
            }
            seq = end + 1;
        }
        Ok(out)
    }

    /// The sequence at or before the first kiln event on `subject` whose version
    /// is at least `version`: a binary search over sequences with direct gets
    /// (versions grow with sequences), about log2(last_seq) round trips. A
    /// foreign message met on the way sends the search left: starting early
    /// only costs reading (and skipping) a few more messages.
    async fn seq_of_version(
        &self,
        subject: &str,
        version: u64,
        last_seq: u64,
    ) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = (1u64, last_seq);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(m) = self.next_on(subject, mid).await? else {
                return Ok(lo);
            };
            match wire::version_of(&m.headers) {
                Ok(v) if v == version => return Ok(m.sequence),
                Ok(v) if v < version => lo = m.sequence + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    async fn open_tail(&self, from: Position) -> Result<pull::Ordered, StoreError> {
        let op = || {
            format!(
                "starting a tail of stream '{}' at position {from}",
                self.config.stream
            )
        };
        // Unfiltered when the stream holds kiln's subjects only: the server
        // then walks its blocks in order. With a wildcard filter that is not
        // the whole stream, it looks every message up through the block's
        // subject index, whose cost grows with the subjects in the block
        // (nats-server `msgBlock.firstMatching`): events written in runs of
        // one stream read 2.6x slower than interleaved ones that way. Tag
        // markers are then delivered too, and skipped (`Tail::take`).
        let filter_subject = if self.whole_stream_tail {
            String::new()
        } else {
            self.subjects.events_filter()
        };
        // Bounded well below the request timeout: during a leader election
        // the request can go unanswered, and the tail's loop retries it.
        let create = self.events.create_consumer(pull::OrderedConfig {
            filter_subject,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        });
        let consumer = tokio::time::timeout(ACK_PATIENCE * 2, create)
            .await
            .map_err(|_| self.electing(op()))?
            .map_err(|e| StoreError::backend(op(), e))?;
        consumer
            .messages()
            .await
            .map_err(|e| StoreError::backend(op(), e))
    }

    /// A delivered message's sequence, and the event it holds (or why it is
    /// not a kiln event, recorded as foreign); `None` for a message outside
    /// the event subjects (a tag marker, read by an unfiltered tail).
    fn decode_delivered(&self, msg: &jetstream::Message) -> Result<Delivered, StoreError> {
        let info = msg.info().map_err(|e| StoreError::Corrupt {
            what: format!("a message delivered on '{}'", msg.subject),
            reason: format!("unreadable delivery metadata: {e}"),
        })?;
        let seq = info.stream_sequence;
        if !self.subjects.is_event(msg.subject.as_str()) {
            return Ok((seq, None));
        }
        let timestamp = msg
            .reply
            .as_ref()
            .and_then(|r| wire::ack_subject_millis(r.as_str()))
            .unwrap_or(0);
        let empty = HeaderMap::new();
        let headers = msg.headers.as_ref().unwrap_or(&empty);
        let ev = wire::decode_event(
            &self.subjects,
            msg.subject.as_str(),
            seq,
            timestamp,
            headers,
            msg.payload.clone(),
        );
        if let Err(why) = &ev {
            self.note_foreign(seq, msg.subject.as_str(), why);
        }
        Ok((seq, Some(ev)))
    }
}

/// A delivered message's position and, on an event subject, its event or why
/// it is not one.
type Delivered = (Position, Option<Result<RecordedEvent, wire::NotKiln>>);

/// How long a tail waits for a message before asking the server whether the
/// log moved without it (a consumer lost to a leader election can stay silent
/// for a minute before the client library notices).
const TAIL_IDLE_CHECK: Duration = Duration::from_secs(3);

impl Inner {
    /// The first message on an event subject at `next` or later, if any: one
    /// direct get, asked after [`TAIL_IDLE_CHECK`] of silence from a consumer.
    async fn event_at_or_after(&self, next: Position) -> Option<Position> {
        match self.next_on(&self.subjects.events_filter(), next).await {
            Ok(m) => m.map(|m| m.sequence),
            Err(e) => {
                tracing::debug!("tail at position {next}: cannot check for a stall: {e}");
                None
            }
        }
    }
}

/// State of one tail: where it is, and its consumer while it has one.
struct Tail {
    inner: Arc<Inner>,
    next: Position,
    messages: Option<pull::Ordered>,
    reconnects: watch::Receiver<u64>,
    failures: u32,
    pending_error: Option<StoreError>,
    /// An event found waiting at the last idle check (see [`TAIL_IDLE_CHECK`]).
    suspect: Option<Position>,
}

impl Tail {
    /// Turns delivered messages into events at `next` or later. A foreign
    /// message is skipped (and recorded); the messages after it are taken as
    /// usual. A message without readable delivery metadata (no sequence to
    /// step past) ends the batch and recreates the consumer from `next`.
    fn take(&mut self, raw: Vec<jetstream::Message>) -> Vec<RecordedEvent> {
        let mut out = Vec::with_capacity(raw.len());
        for msg in raw {
            match self.inner.decode_delivered(&msg) {
                Ok((seq, _)) if seq < self.next => {}
                Ok((seq, Some(Ok(ev)))) => {
                    self.next = seq + 1;
                    out.push(ev);
                }
                Ok((seq, Some(Err(_)) | None)) => self.next = seq + 1,
                Err(e) => {
                    tracing::warn!(
                        "tail at position {}: {e}; recreating its consumer",
                        self.next
                    );
                    self.messages = None;
                    if self.pending_error.is_none() && out.is_empty() {
                        self.pending_error = Some(e);
                    }
                    break;
                }
            }
        }
        out
    }

    async fn next_batch(mut self) -> Option<(Result<Vec<RecordedEvent>, StoreError>, Tail)> {
        if let Some(e) = self.pending_error.take() {
            return Some((Err(e), self));
        }
        loop {
            if self.messages.is_none() {
                if self.failures > 0 {
                    // Wait, but wake up at once on a reconnect.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(self.failures)) => {}
                        changed = self.reconnects.changed() => if changed.is_err() { return None },
                    }
                }
                self.reconnects.borrow_and_update();
                match self.inner.open_tail(self.next).await {
                    Ok(m) => self.messages = Some(m),
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        tracing::warn!("tail at position {}: {e}; retrying", self.next);
                        continue;
                    }
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let mut lost_consumer = false;
            let raw = tokio::select! {
                item = messages.next() => match item {
                    Some(Ok(first)) => {
                        let mut raw = vec![first];
                        while raw.len() < TAIL_BATCH {
                            match messages.next().now_or_never() {
                                Some(Some(Ok(m))) => raw.push(m),
                                Some(Some(Err(_))) | Some(None) => {
                                    lost_consumer = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                        raw
                    }
                    Some(Err(e)) => {
                        tracing::warn!("tail at position {}: {e}; recreating its consumer", self.next);
                        lost_consumer = true;
                        Vec::new()
                    }
                    None => {
                        lost_consumer = true;
                        Vec::new()
                    }
                },
                changed = self.reconnects.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    tracing::info!("tail at position {}: reconnected, recreating its consumer", self.next);
                    lost_consumer = true;
                    Vec::new()
                }
                _ = tokio::time::sleep(TAIL_IDLE_CHECK) => {
                    // The check is bounded and gives way to a leader change:
                    // during an election it could wait a whole request
                    // timeout while the new leader is already announced.
                    let check = tokio::time::timeout(
                        TAIL_IDLE_CHECK,
                        self.inner.event_at_or_after(self.next),
                    );
                    let waiting = tokio::select! {
                        waiting = check => waiting.ok().flatten(),
                        changed = self.reconnects.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            tracing::info!(
                                "tail at position {}: reconnected, recreating its consumer",
                                self.next
                            );
                            self.messages = None;
                            self.failures = 0;
                            continue;
                        }
                    };
                    // Two silent checks in a row with an event waiting: not
                    // one merely in flight at the first check.
                    let stalled = waiting.is_some() && self.suspect == waiting;
                    self.suspect = waiting;
                    if stalled {
                        tracing::warn!(
                            "tail at position {}: its consumer delivered nothing for {:?} while \
                             the log holds position {}; recreating it",
                            self.next,
                            TAIL_IDLE_CHECK * 2,
                            waiting.unwrap_or_default()
                        );
                        self.suspect = None;
                        self.inner.tail_stalls.fetch_add(1, Ordering::Relaxed);
                        // Recreate at once: the server answers, the consumer does not.
                        self.messages = None;
                        self.failures = 0;
                        continue;
                    }
                    Vec::new()
                }
            };
            if lost_consumer {
                self.messages = None;
                self.failures = self.failures.saturating_add(1).min(4);
            } else {
                self.failures = 0;
            }
            let batch = self.take(raw);
            if !batch.is_empty() {
                return Some((Ok(batch), self));
            }
            if let Some(e) = self.pending_error.take() {
                return Some((Err(e), self));
            }
        }
    }
}

#[async_trait]
impl EventStore for JetStreamStore {
    fn log_identity(&self) -> &str {
        &self.inner.identity
    }

    async fn append(&self, req: AppendRequest) -> Result<AppendResult, StoreError> {
        self.inner.append(req).await
    }

    async fn latest(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        self.inner.head_of(stream).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream, from_version, limit).await
    }

    fn tail(&self, from: Position) -> EventBatches {
        let tail = Tail {
            inner: self.inner.clone(),
            next: from.max(1),
            messages: None,
            reconnects: self.inner.reconnects.clone(),
            failures: 0,
            pending_error: None,
            suspect: None,
        };
        futures::stream::unfold(tail, Tail::next_batch).boxed()
    }

    /// The last event's position. Usually the stream's last sequence, but not
    /// always: a tagged append ends with its tag markers, and a stream shared
    /// with other services may end with their messages; then it is the last
    /// message on the events filter. A sequence no tail delivers would keep
    /// whoever waits for a tail to reach the head (a warming view, `GET
    /// /events` without follow) waiting for the next append.
    async fn head(&self) -> Result<Position, StoreError> {
        let inner = &self.inner;
        let info = inner.events.get_info().await.map_err(|e| {
            StoreError::backend(
                format!("reading the state of stream '{}'", inner.config.stream),
                e,
            )
        })?;
        let last = info.state.last_sequence;
        if last == 0 {
            return Ok(0);
        }
        if let Some(m) = inner.msg_at(last).await?
            && wire::decode_event(&inner.subjects, &m.subject, last, 0, &m.headers, m.payload)
                .is_ok()
        {
            return Ok(last);
        }
        let filter = inner.subjects.events_filter();
        Ok(inner
            .last_event_on(&filter)
            .await?
            .event
            .map_or(0, |ev| ev.position))
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let latest = inner.head_of(stream).await?.version;
        if version > latest || version == 0 {
            return Err(StoreError::SnapshotAhead {
                stream: stream.clone(),
                version,
                latest,
            });
        }
        let subject = inner.subjects.snapshot(stream);
        let op = || format!("saving the snapshot of stream '{stream}' at version {version}");
        for attempt in 0..MAX_ATTEMPTS {
            let existing = inner.last_on(&inner.snapshots, &subject).await?;
            let (seq, existing_version) = match &existing {
                Some(m) => (
                    m.sequence,
                    wire::snapshot_version(&m.headers, &subject, m.sequence)?,
                ),
                None => (0, 0),
            };
            // Keep the newest: an older snapshot arriving late changes nothing.
            if existing.is_some() && existing_version > version {
                return Ok(());
            }
            let mut h = HeaderMap::new();
            h.insert(wire::VERSION, version.to_string().as_str());
            h.insert(wire::EXPECTED_LAST_SUBJECT_SEQ, seq.to_string().as_str());
            let reply = inner
                .publish_request(subject.clone(), h, data.clone(), &op)
                .await?;
            match reply.error {
                None => return Ok(()),
                Some(e) if e.guard_moved() || e.transient() => {
                    tokio::time::sleep(backoff(attempt.min(4))).await
                }
                Some(e) => return Err(StoreError::backend(op(), e)),
            }
        }
        Err(StoreError::backend(
            op(),
            "other writers kept saving snapshots of the stream",
        ))
    }

    fn health(&self) -> StoreHealth {
        let inner = &self.inner;
        StoreHealth {
            foreign_messages_total: inner.foreign_total.load(Ordering::Relaxed),
            foreign_messages: inner
                .foreign
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
            tail_stalls_total: inner.tail_stalls.load(Ordering::Relaxed),
        }
    }

    async fn latest_snapshot(&self, stream: &StreamId) -> Result<Snapshot, StoreError> {
        let inner = &self.inner;
        let subject = inner.subjects.snapshot(stream);
        let m = inner
            .last_on(&inner.snapshots, &subject)
            .await?
            .ok_or_else(|| StoreError::SnapshotNotFound {
                stream: stream.clone(),
            })?;
        Ok(Snapshot {
            stream: stream.clone(),
            version: wire::snapshot_version(&m.headers, &subject, m.sequence)?,
            data: m.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{is_wildcard, subject_matches};

    #[test]
    fn subject_filters_match_as_nats_does() {
        assert!(subject_matches("kiln.*.*", "kiln.user.user-1"));
        assert!(!subject_matches("kiln.*.*", "kiln._kiln.tag.a.b"));
        assert!(!subject_matches("kiln.*.*", "kiln.user"));
        assert!(subject_matches("kiln.>", "kiln._kiln.tag.a"));
        assert!(!subject_matches("kiln.>", "kiln"));
        assert!(subject_matches("kiln.user.user-1", "kiln.user.user-1"));
        assert!(!subject_matches("kiln.user.user-1", "kiln.user.user-2"));
        assert!(is_wildcard("kiln.*.*") && is_wildcard("kiln.>"));
        assert!(!is_wildcard("kiln.user.user-1"));
    }
}
