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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self as js_stream, DirectGetErrorKind, StorageType};
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
    AppendRequest, AppendResult, EventBatches, EventStore, Limits, Position, RecordedEvent,
    Snapshot, StoreError, StreamHead, StreamId, validate_append,
};

/// Most messages in one atomic batch (the server's limit).
pub const MAX_BATCH_MESSAGES: usize = 1000;
/// Most events in one batch handed out by a tail.
pub const TAIL_BATCH: usize = 1024;
/// Most write attempts of one append whose expected version still holds while
/// other writers keep moving the stream (relaxed appends under contention).
const MAX_ATTEMPTS: u32 = 1000;
/// Most stream heads remembered from this process's own appends.
const HEAD_HINTS: usize = 65_536;

// JetStream API error codes kiln reacts to.
const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
const ERR_WRONG_LAST_SEQUENCE_IN_BATCH: u64 = 10164;
const ERR_WRONG_LAST_MSG_ID: u64 = 10070;
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
        let mut opts = ConnectOptions::new()
            .name(&config.connection_name)
            .request_timeout(Some(timeout))
            .connection_timeout(timeout)
            .event_callback(move |event| {
                let gen_tx = gen_tx.clone();
                async move {
                    match event {
                        Event::Connected => {
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
        Ok(JetStreamStore {
            inner: Arc::new(Inner {
                client,
                js,
                events,
                snapshots,
                subjects,
                config,
                reconnects: gen_rx,
                head_hints: Mutex::new(HashMap::new()),
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

    /// The JetStream context kiln uses (for benchmarks that compare with raw
    /// JetStream operations on the same server).
    pub fn context(&self) -> &Context {
        &self.inner.js
    }
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

    fn direct_error(
        &self,
        op: String,
        e: async_nats::jetstream::stream::DirectGetError,
    ) -> StoreError {
        match e.kind() {
            DirectGetErrorKind::TimedOut => StoreError::Timeout {
                op,
                millis: self.millis(),
            },
            _ => StoreError::backend(op, e),
        }
    }

    /// The last message on `subject` in `stream`, by direct get.
    async fn last_on(
        &self,
        stream: &js_stream::Stream,
        subject: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.direct_error(format!("reading the last message on '{subject}'"), e)),
        }
    }

    /// The first message on `subject` at sequence `seq` or later.
    async fn next_on(&self, subject: &str, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        match self
            .events
            .direct_get_builder()
            .sequence(seq)
            .next_by_subject(subject)
            .send()
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.direct_error(format!("reading '{subject}' from position {seq}"), e)),
        }
    }

    async fn msg_at(&self, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        match self.events.direct_get(seq).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.direct_error(format!("reading position {seq}"), e)),
        }
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
        let api = format!("$JS.API.DIRECT.GET.{}", self.config.stream);
        let mut out: Vec<StreamMessage> = Vec::with_capacity(max.min(1024));
        let mut seq = from;
        while out.len() < max {
            let want = (max - out.len()).min(1000);
            let inbox = self.client.new_inbox();
            let mut sub = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| StoreError::backend(op(), e))?;
            let body = serde_json::json!({ "seq": seq, "next_by_subj": subject, "batch": want });
            self.client
                .publish_with_reply(api.clone(), inbox, body.to_string().into())
                .await
                .map_err(|e| StoreError::backend(op(), e))?;
            let mut got = 0usize;
            let pending: u64;
            loop {
                let msg = tokio::time::timeout(self.config.request_timeout(), sub.next())
                    .await
                    .map_err(|_| StoreError::Timeout {
                        op: op(),
                        millis: self.millis(),
                    })?
                    .ok_or_else(|| StoreError::backend(op(), "the connection closed"))?;
                if let Some(status) = msg.status {
                    match status.as_u16() {
                        // End of batch: how many more match tells whether to go on.
                        204 => {
                            pending = msg
                                .headers
                                .as_ref()
                                .and_then(|h| wire::header(h, "Nats-Num-Pending"))
                                .and_then(|p| p.trim().parse().ok())
                                .unwrap_or(0);
                        }
                        404 => pending = 0,
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
                    break;
                }
                let m = StreamMessage::try_from(msg).map_err(|e| StoreError::backend(op(), e))?;
                seq = m.sequence + 1;
                out.push(m);
                got += 1;
            }
            drop(sub);
            if got == 0 || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Sends a message and waits for the server's ack (or error) as JSON.
    async fn publish_request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        op: &(dyn Fn() -> String + Sync),
    ) -> Result<PubReply, StoreError> {
        let request = Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.config.request_timeout()));
        let reply = self
            .client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::TimedOut => StoreError::Timeout {
                    op: op(),
                    millis: self.millis(),
                },
                RequestErrorKind::NoResponders => StoreError::backend(
                    op(),
                    format!(
                        "no JetStream stream captures '{subject}' (was stream '{}' deleted?)",
                        self.config.stream
                    ),
                ),
                _ => StoreError::backend(op(), e),
            })?;
        serde_json::from_slice(&reply.payload).map_err(|e| {
            StoreError::backend(
                op(),
                format!(
                    "unreadable publish ack {:?}: {e}",
                    String::from_utf8_lossy(&reply.payload)
                ),
            )
        })
    }

    /// The stream's head: its last event's version and position, plus that event's
    /// sequence for the OCC guard (the same number as the position).
    async fn head_of(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        let subject = self.subjects.event(stream);
        match self.last_on(&self.events, &subject).await? {
            None => Ok(StreamHead::default()),
            Some(m) => Ok(StreamHead {
                version: wire::version_of(&m.headers, &subject, m.sequence)?,
                position: m.sequence,
            }),
        }
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
                position: wire::tag_position(&m.headers, m.sequence, tag)?,
            }),
        }
    }

    /// Asks the server, without writing anything, whether `id` was stored within
    /// the dedupe window, and at which sequence. The probe carries the event id and
    /// an expected-last-msg-id that never holds: the server answers a known id with
    /// a duplicate ack (it checks ids first) and refuses anything else.
    async fn probe(&self, id: &Uuid) -> Result<Option<u64>, StoreError> {
        let op = || {
            format!(
                "looking up event id {id} in stream '{}'",
                self.config.stream
            )
        };
        let mut h = HeaderMap::new();
        h.insert(wire::MSG_ID, id.to_string().as_str());
        h.insert(
            wire::EXPECTED_LAST_MSG_ID,
            format!("kiln-probe-{}", Uuid::new_v4()).as_str(),
        );
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
                Some(e) if e.err_code == ERR_WRONG_LAST_MSG_ID => return Ok(None),
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
        let msgs = self.read_subject(&subject, seq, n).await?;
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
        let first_version = wire::version_of(&msgs[0].headers, &subject, seq)?;
        for (i, ev) in req.events.iter().enumerate() {
            let same = match msgs.get(i) {
                Some(m) => {
                    msg_id(m) == Some(ev.id)
                        && wire::version_of(&m.headers, &subject, m.sequence)?
                            == first_version + i as u64
                }
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
        let version = head.version + 1;
        let mut h = wire::event_headers(&ev.id, &ev.event_type, version, &ev.tags, &ev.metadata);
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
        let subject = self.subjects.event(&req.stream);
        let mut msgs: Vec<(String, HeaderMap, Bytes)> = Vec::with_capacity(n + markers.len());
        for (i, ev) in req.events.iter().enumerate() {
            let mut h = wire::event_headers(
                &ev.id,
                &ev.event_type,
                head.version + 1 + i as u64,
                &ev.tags,
                &ev.metadata,
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
                if reply.count.is_some_and(|c| c != total as u64) {
                    return Err(StoreError::backend(
                        op(),
                        format!("the server committed {:?} messages of {total}", reply.count),
                    ));
                }
                // An atomic batch is stored at consecutive sequences, the
                // commit (last) message at `seq`.
                let first_position = reply.seq + 1 - total as u64;
                Outcome::Committed(AppendResult {
                    first_position,
                    position: first_position + n as u64 - 1,
                    version: head.version + n as u64,
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
        let messages = req.events.len() + markers.len();
        if messages > MAX_BATCH_MESSAGES {
            return Err(StoreError::TooLarge {
                stream: req.stream.clone(),
                what: "the number of messages (events plus one marker per tag)".into(),
                size: messages,
                limit: MAX_BATCH_MESSAGES,
            });
        }
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
                _ => self.head_of(&req.stream).await?,
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
        let Some(last) = self.last_on(&self.events, &subject).await? else {
            return Ok(Vec::new());
        };
        let last_version = wire::version_of(&last.headers, &subject, last.sequence)?;
        let from = from_version.max(1);
        if from > last_version {
            return Ok(Vec::new());
        }
        let start = if from == last_version {
            last.sequence
        } else if from == 1 {
            1
        } else {
            self.seq_of_version(&subject, from, last.sequence).await?
        };
        let msgs = self.read_subject(&subject, start, limit).await?;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let ev = wire::decode_event(
                &self.subjects,
                &subject,
                m.sequence,
                header_time(&m.headers),
                &m.headers,
                m.payload,
            )?;
            if ev.version >= from {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The sequence of the first message on `subject` whose version is at least
    /// `version`: a binary search over sequences with direct gets (versions grow
    /// with sequences), about log2(last_seq) round trips.
    async fn seq_of_version(
        &self,
        subject: &str,
        version: u64,
        last_seq: u64,
    ) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = (1u64, last_seq);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let m = self
                .next_on(subject, mid)
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("subject '{subject}'"),
                    reason: format!(
                        "no message at or after position {mid}, yet its last is at {last_seq}"
                    ),
                })?;
            let v = wire::version_of(&m.headers, subject, m.sequence)?;
            if v == version {
                return Ok(m.sequence);
            }
            if v > version {
                hi = mid;
            } else {
                lo = m.sequence + 1;
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
        let consumer = self
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.subjects.events_filter(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::backend(op(), e))?;
        consumer
            .messages()
            .await
            .map_err(|e| StoreError::backend(op(), e))
    }

    fn decode_delivered(
        &self,
        msg: &jetstream::Message,
    ) -> Result<(Position, RecordedEvent), StoreError> {
        let info = msg.info().map_err(|e| StoreError::Corrupt {
            what: format!("a message delivered on '{}'", msg.subject),
            reason: format!("unreadable delivery metadata: {e}"),
        })?;
        let seq = info.stream_sequence;
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
        )?;
        Ok((seq, ev))
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
}

impl Tail {
    /// Turns delivered messages into events at `next` or later; a corrupt message
    /// is skipped and its error handed out after the good events before it.
    fn take(&mut self, raw: Vec<jetstream::Message>) -> Vec<RecordedEvent> {
        let mut out = Vec::with_capacity(raw.len());
        for msg in raw {
            match self.inner.decode_delivered(&msg) {
                Ok((seq, ev)) if seq >= self.next => {
                    self.next = seq + 1;
                    out.push(ev);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Ok(info) = msg.info() {
                        self.next = self.next.max(info.stream_sequence + 1);
                    }
                    if self.pending_error.is_none() {
                        tracing::warn!("tail skipped an undecodable message: {e}");
                        self.pending_error = Some(e);
                    }
                    if !out.is_empty() {
                        break;
                    }
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
            && inner.subjects.stream_of(&m.subject).is_ok()
        {
            return Ok(last);
        }
        let filter = inner.subjects.events_filter();
        Ok(inner
            .last_on(&inner.events, &filter)
            .await?
            .map_or(0, |m| m.sequence))
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
                    wire::version_of(&m.headers, &subject, m.sequence)?,
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
            version: wire::version_of(&m.headers, &subject, m.sequence)?,
            data: m.payload,
        })
    }
}
