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
//! - **Tail**: an ordered pull consumer, on the whole stream when it captures
//!   kiln's subjects only (the server reads that up to twice as fast as a
//!   wildcard filter; what is not an event subject is skipped), else filtered
//!   on `<prefix>.*.*`; recreated from the last delivered position after errors,
//!   a reconnect (server restart) or a leader election, so each event is
//!   delivered once, in order.
//!
//! Files: `connect.rs` (connecting, stream set-up and capability checks,
//! leader elections), `append.rs` (guarded publishes, atomic batches, dedupe
//! probes, snapshots saved), `read.rs` (direct and leader gets, stream reads,
//! heads), `tail.rs` (the consumer behind a tail), `wire.rs` (subjects and
//! headers), `config.rs`.

mod append;
mod config;
mod connect;
mod read;
mod tail;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{self as js_stream, StorageType};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use uuid::Uuid;

pub use config::{JetStreamConfig, NatsAuth, NatsTls};
pub use tail::TAIL_BATCH;
pub use wire::Subjects;

use super::{
    AppendRequest, AppendResult, EventBatches, EventStore, ForeignRecord, Limits, Position,
    RecordedEvent, Snapshot, StoreError, StoreHealth, StreamHead, StreamId,
};

/// Most messages in one atomic batch (the server's limit; the shared
/// validation's [`super::MAX_APPEND_MESSAGES`] keeps appends within it).
pub const MAX_BATCH_MESSAGES: usize = super::MAX_APPEND_MESSAGES;
/// How long an append waits for its ack before checking that the stream
/// still has a leader (and again after each such wait).
const ACK_PATIENCE: Duration = Duration::from_millis(1500);
/// Most tries of a direct get no replica far enough along could answer.
const DIRECT_GET_ATTEMPTS: u32 = 8;
/// Most foreign messages remembered for `/views` and `/store/foreign`.
const FOREIGN_KEPT: usize = 256;

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
    /// When publishes stopped being answered (ms since `started`; 0: they
    /// are answered), see [`Inner::no_responders`].
    no_responders_since: AtomicU64,
    started: std::time::Instant,
    /// Bumped when the event stream elects a leader (its advisory).
    elections: watch::Receiver<u64>,
    /// Disconnections so far: connected while `connects > disconnects`.
    disconnects: Arc<AtomicU64>,
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

fn jitter(max_millis: u64) -> Duration {
    let r = (Uuid::new_v4().as_u128() as u64) % max_millis.max(1);
    Duration::from_millis(r)
}

fn backoff(attempt: u32) -> Duration {
    let ceiling = 2u64.saturating_pow(attempt.min(10)).min(1000);
    Duration::from_millis(ceiling / 2) + jitter(ceiling / 2 + 1)
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
        tail::batches(self.inner.clone(), from)
    }

    /// The last event's position. Usually the stream's last sequence, but not
    /// always: a tagged append ends with its tag markers, and a stream shared
    /// with other services may end with their messages; then it is the last
    /// message on the events filter. A sequence no tail delivers would keep
    /// whoever waits for a tail to reach the head (a warming view, `GET
    /// /events` without follow) waiting for the next append.
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        self.inner.save_snapshot(stream, version, data).await
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
        self.inner.latest_snapshot(stream).await
    }
}
