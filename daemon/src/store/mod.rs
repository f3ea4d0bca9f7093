//! The store core: the event log kiln appends to and tails.
//!
//! One trait, [`EventStore`], two backends: [`embedded::EmbeddedStore`] (a RocksDB
//! instance of its own, the zero set-up default) and the JetStream backend. Both
//! are held to the same contract by the conformance suite in `tests/`:
//!
//! - `append` checks the expected version (or a tag condition) and writes in one
//!   atomic step at the storage; a mismatch is a typed [`StoreError::VersionConflict`]
//!   carrying the stream's current version. Multi-event appends are all-or-nothing.
//!   Retrying an append whose event ids were committed returns the original result.
//! - `latest` / `latest_version` are O(1) whatever the stream's length; version 0
//!   means "no events" and is not an error.
//! - `tail` is a live stream of recorded events in position order, woken on commit.
//! - "No snapshot" is [`StoreError::SnapshotNotFound`], never an I/O error.
//!
//! Input is validated here, once, by [`validate_append`], so both backends refuse
//! the same things with the same messages.

pub mod codec;
pub mod embedded;
pub mod jetstream;
pub mod migrate;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A global position in the log. The first event is at position 1; 0 means "before
/// everything" (an empty log's head, a fresh view's checkpoint).
pub type Position = u64;

/// Longest stream id or tag accepted, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// An event stream's id, e.g. `user-42`. Its *category* is the part before the
/// first `-` (`user`), which projections filter on.
///
/// Allowed: ASCII letters, digits and `- _ : @ + =`, 1 to [`MAX_ID_LEN`] bytes,
/// not starting with `-` (the category is never empty). The same alphabet is
/// valid as a NATS subject token, so an id means the same thing on both backends
/// and never needs escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    pub fn new(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        let checked = check_id(&id).and_then(|()| {
            if id.starts_with('-') {
                Err(
                    "it starts with '-', so its category (the part before the first '-') \
                     would be empty"
                        .to_string(),
                )
            } else {
                Ok(())
            }
        });
        match checked {
            Ok(()) => Ok(StreamId(id)),
            Err(reason) => Err(StoreError::InvalidStreamId { id, reason }),
        }
    }

    /// A stream id read back from storage: the alphabet and length are
    /// checked, but an id starting with `-` (which older kilns accepted on
    /// the embedded store) is still readable, so no recorded event is lost.
    pub(crate) fn recorded(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        match check_id(&id) {
            Ok(()) => Ok(StreamId(id)),
            Err(reason) => Err(StoreError::InvalidStreamId { id, reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part of the id before the first `-` (the whole id when it has none).
    pub fn category(&self) -> &str {
        self.0.split('-').next().unwrap_or(&self.0)
    }
}

impl TryFrom<String> for StreamId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        StreamId::new(s)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = StoreError;
    fn try_from(s: &str) -> Result<Self, StoreError> {
        StreamId::new(s)
    }
}

impl From<StreamId> for String {
    fn from(s: StreamId) -> String {
        s.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", self.0)
    }
}

/// Checks a stream id or tag against kiln's id alphabet.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "it is {} bytes long, the limit is {MAX_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(format!(
            "character {c:?} is not allowed (use ASCII letters, digits and - _ : @ + =)"
        ));
    }
    Ok(())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '@' | '+' | '=')
}

/// What the stream's version must be for an append to go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// Relaxed: append whatever the stream's version.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    Exists,
    /// The stream's latest version must be exactly this (0 = no events).
    Exact(u64),
}

impl ExpectedVersion {
    /// Does a stream at `actual` satisfy this expectation?
    pub fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exists => actual > 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// An event to append. `data` must be a JSON document.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Makes retries idempotent: an append whose ids were committed is not written twice.
    pub id: Uuid,
    pub event_type: String,
    pub data: Bytes,
    pub metadata: BTreeMap<String, String>,
    /// Tags for tag-conditioned appends (see [`AppendCondition`]).
    pub tags: Vec<String>,
    /// The commit time to record instead of the append's own (milliseconds
    /// since the Unix epoch). Only a copy of a log sets it (`kiln migrate`),
    /// so projections see the time the event was first committed; `None`
    /// everywhere else.
    pub timestamp: Option<u64>,
}

impl NewEvent {
    /// A new event with a fresh id and no metadata or tags. Ids are UUIDv7
    /// (time-ordered), which keeps the embedded store's id index append-mostly.
    pub fn new(event_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            data: data.into(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
            timestamp: None,
        }
    }

    /// A new event whose data is `value` serialized as JSON.
    pub fn json(event_type: impl Into<String>, value: &serde_json::Value) -> Self {
        NewEvent::new(event_type, value.to_string())
    }

    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Records `millis` as the event's commit time (see [`NewEvent::timestamp`]).
    pub fn with_timestamp(mut self, millis: u64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// Dynamic consistency boundary: the append commits only if no event carrying any
/// of `tags` was committed at a position after `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendCondition {
    pub tags: Vec<String>,
    pub after: Position,
}

/// One append: events for one stream, guarded by an expected version and,
/// optionally, a tag condition. Checked and written as one atomic step.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub condition: Option<AppendCondition>,
}

impl AppendRequest {
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        AppendRequest {
            stream,
            expected,
            events,
            condition: None,
        }
    }

    pub fn with_condition(mut self, condition: AppendCondition) -> Self {
        self.condition = Some(condition);
        self
    }
}

/// What an append committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendResult {
    /// Position of the first event written.
    pub first_position: Position,
    /// Position of the last event written.
    pub position: Position,
    /// The stream's version after the append (the last event's version).
    pub version: u64,
}

/// A stream's latest version and the position of its last event, read in O(1).
/// An empty stream is `{ version: 0, position: 0 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    pub version: u64,
    pub position: Position,
}

/// An event as the log recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordedEvent {
    pub id: Uuid,
    pub stream: StreamId,
    #[serde(rename = "type")]
    pub event_type: String,
    /// 1-based within the stream.
    pub version: u64,
    /// Global: gap-free on the embedded store, the stream sequence on JetStream.
    pub position: Position,
    /// Commit time, milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub metadata: BTreeMap<String, String>,
    pub tags: Vec<String>,
    #[serde(serialize_with = "serialize_json_bytes")]
    pub data: Bytes,
}

fn serialize_json_bytes<S: serde::Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    // Data was checked to be JSON on append; embed it as a document, not a string.
    let raw: &serde_json::value::RawValue = serde_json::from_slice(data)
        .map_err(|e| serde::ser::Error::custom(format!("event data is not JSON: {e}")))?;
    raw.serialize(s)
}

/// An aggregate snapshot: opaque bytes taken at a stream version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub stream: StreamId,
    pub version: u64,
    pub data: Bytes,
}

/// Size limits on what an append may carry. Both backends enforce the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest `data` of one event, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one append.
    pub max_events_per_append: usize,
    /// Largest total of data + metadata of one append, in bytes.
    pub max_append_bytes: usize,
    /// Most tags on one event.
    pub max_tags_per_event: usize,
    /// Largest metadata of one event (keys + values, in bytes). On JetStream it
    /// travels in a header, next to the other headers of the message.
    pub max_metadata_bytes: usize,
}

/// Most messages one append may write: its events plus one tag marker per
/// distinct tag it carries or is conditioned on. JetStream's atomic batches
/// hold at most this many; both backends refuse more the same way.
pub const MAX_APPEND_MESSAGES: usize = 1000;

/// Highest version a stream can reach. Far beyond any real stream; it keeps
/// `version + n` from overflowing, and versions JSON-safe (2^53 - 1).
pub const MAX_VERSION: u64 = (1 << 53) - 1;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 512 * 1024,
            max_events_per_append: 500,
            max_append_bytes: 4 * 1024 * 1024,
            max_tags_per_event: 64,
            max_metadata_bytes: 16 * 1024,
        }
    }
}

/// Everything that can go wrong in the store core. Conflicts and bad input are
/// distinct variants from I/O failures and timeouts.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "version conflict on stream '{stream}': expected {expected}, but the stream is at version {actual}"
    )]
    VersionConflict {
        stream: StreamId,
        expected: ExpectedVersion,
        actual: u64,
    },
    #[error(
        "append condition failed on stream '{stream}': tag '{tag}' has an event at position {position}, after position {after}"
    )]
    TagConflict {
        stream: StreamId,
        tag: String,
        after: Position,
        position: Position,
    },
    #[error("invalid stream id '{id}': {reason}")]
    InvalidStreamId { id: String, reason: String },
    #[error("invalid tag '{tag}': {reason}")]
    InvalidTag { tag: String, reason: String },
    #[error("invalid event #{index} ({id}) for stream '{stream}': {reason}")]
    InvalidEvent {
        stream: StreamId,
        index: usize,
        id: Uuid,
        reason: String,
    },
    #[error("append to stream '{stream}' carries no events")]
    NoEvents { stream: StreamId },
    #[error("append to stream '{stream}' is too large: {what} is {size}, the limit is {limit}")]
    TooLarge {
        stream: StreamId,
        what: String,
        size: usize,
        limit: usize,
    },
    #[error("event id {id} conflicts on stream '{stream}': {reason}")]
    DuplicateEventId {
        stream: StreamId,
        id: Uuid,
        reason: String,
    },
    #[error("no snapshot for stream '{stream}'")]
    SnapshotNotFound { stream: StreamId },
    #[error(
        "snapshot of stream '{stream}' at version {version} is ahead of the stream's latest version {latest}"
    )]
    SnapshotAhead {
        stream: StreamId,
        version: u64,
        latest: u64,
    },
    #[error("{op} timed out after {millis} ms")]
    Timeout { op: String, millis: u64 },
    #[error("{op} failed: {source}")]
    Backend {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "stream '{stream}' ends with a message at position {position} that is not a kiln \
         event ({reason}); kiln will not append after it: remove that message \
         (`nats stream rmm <stream> {position}`) or append to another stream"
    )]
    ForeignMessage {
        stream: StreamId,
        position: Position,
        reason: String,
    },
    #[error("{op} failed, retry: {reason}")]
    Unavailable { op: String, reason: String },
    #[error("corrupt record ({what}): {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn backend(
        op: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            op: op.into(),
            source: source.into(),
        }
    }

    /// Worth retrying as is: the backend is briefly unable to answer (a
    /// JetStream stream electing a leader, a timeout).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Timeout { .. }
        )
    }

    /// Is this an optimistic-concurrency conflict (version or tag condition)?
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::VersionConflict { .. } | StoreError::TagConflict { .. }
        )
    }
}

/// A message on an event subject that is not a kiln event (see docs/store.md,
/// "Foreign messages"): tails and reads skip it, appends after it are refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignRecord {
    pub position: Position,
    pub subject: String,
    pub reason: String,
}

/// What a store has noticed about the log and its tails since it was opened,
/// for `/metrics` and `/views`. The embedded store has nothing to report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// Distinct foreign messages skipped.
    pub foreign_messages_total: u64,
    /// The most recent of them (bounded), oldest first.
    pub foreign_messages: Vec<ForeignRecord>,
    /// Tails found stalled (no answer from the server within their idle
    /// deadline while connected) and recreated.
    pub tail_stalls_total: u64,
}

/// Batches of recorded events in strictly increasing position order, never empty.
pub type EventBatches = BoxStream<'static, Result<Vec<RecordedEvent>, StoreError>>;

/// The store core's contract. See the module docs; the conformance suite in
/// `tests/` is its executable specification.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `req.events` to `req.stream` if the expected version and the tag
    /// condition hold; the check and the write are one atomic step.
    async fn append(&self, req: AppendRequest) -> Result<AppendResult, StoreError>;

    /// The stream's latest version and last position, in O(1).
    async fn latest(&self, stream: &StreamId) -> Result<StreamHead, StoreError>;

    /// The stream's latest version in O(1); 0 for a stream with no events.
    async fn latest_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        Ok(self.latest(stream).await?.version)
    }

    /// Up to `limit` events of the stream, from version `from_version` (1-based) on.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// A live stream of every event at position `from` or later, in position order,
    /// each exactly once. It waits for new commits when it has caught up.
    fn tail(&self, from: Position) -> EventBatches;

    /// The position of the last event in the log (0 when it is empty).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Saves a snapshot of `stream` taken at `version` (which must not be ahead of it).
    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: Bytes,
    ) -> Result<(), StoreError>;

    /// The snapshot with the highest version; [`StoreError::SnapshotNotFound`] if none.
    async fn latest_snapshot(&self, stream: &StreamId) -> Result<Snapshot, StoreError>;

    /// Why the store cannot take appends now (its last write failed: a full
    /// disk, an I/O error, and none has succeeded since), if so. Readiness
    /// probes report it. Default: no such knowledge.
    fn write_fault(&self) -> Option<String> {
        None
    }

    /// Milliseconds the store has spent unable to write since it opened.
    fn unwritable_millis(&self) -> u64 {
        0
    }

    /// Which log this is: the same for every process reading this log, and
    /// different for any other (another data directory, a stream deleted and
    /// created again). A view snapshot is applied only to the log it was
    /// built from.
    fn log_identity(&self) -> &str;

    /// Foreign messages skipped and tails recreated, since the store was opened.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Is the log on this machine, so [`EventStore::checkpoint_to`] can copy it?
    fn keeps_local_log(&self) -> bool {
        false
    }

    /// Writes a consistent copy of the log into `dir` (which must not exist
    /// yet) while appends go on, and returns the head it holds (`kiln
    /// backup`). Only a store with its log on this machine can; the default
    /// says so.
    fn checkpoint_to(&self, dir: &std::path::Path) -> Result<Position, StoreError> {
        Err(StoreError::backend(
            format!("copying the log into {}", dir.display()),
            "this store keeps no log on this machine (back up a JetStream stream with \
             NATS's own tools, e.g. `nats stream backup`)",
        ))
    }
}

/// Checks an append against the id alphabet, JSON and size limits, and counts
/// everything either backend stores (tags per event, metadata bytes, messages
/// per append with one tag marker per distinct tag). Both backends call this
/// first, so bad input is refused identically and nothing is written.
pub fn validate_append(req: &AppendRequest, limits: &Limits) -> Result<(), StoreError> {
    let stream = &req.stream;
    if req.events.is_empty() {
        return Err(StoreError::NoEvents {
            stream: stream.clone(),
        });
    }
    if req.events.len() > limits.max_events_per_append {
        return Err(StoreError::TooLarge {
            stream: stream.clone(),
            what: "the number of events".into(),
            size: req.events.len(),
            limit: limits.max_events_per_append,
        });
    }
    if let Some(cond) = &req.condition {
        if cond.tags.is_empty() {
            return Err(StoreError::InvalidTag {
                tag: String::new(),
                reason: "an append condition needs at least one tag".into(),
            });
        }
        for tag in &cond.tags {
            validate_tag(tag)?;
        }
    }
    let mut distinct_tags: std::collections::HashSet<&str> = req
        .condition
        .iter()
        .flat_map(|c| c.tags.iter().map(String::as_str))
        .collect();
    let mut total = 0usize;
    let mut seen = std::collections::HashSet::with_capacity(req.events.len());
    for (index, ev) in req.events.iter().enumerate() {
        let invalid = |reason: String| StoreError::InvalidEvent {
            stream: stream.clone(),
            index,
            id: ev.id,
            reason,
        };
        if !seen.insert(ev.id) {
            return Err(StoreError::DuplicateEventId {
                stream: stream.clone(),
                id: ev.id,
                reason: "the same id appears twice in one append".into(),
            });
        }
        if ev.event_type.is_empty() || ev.event_type.len() > MAX_ID_LEN {
            return Err(invalid(format!(
                "event type must be 1 to {MAX_ID_LEN} bytes, got {}",
                ev.event_type.len()
            )));
        }
        if let Some(c) = ev
            .event_type
            .chars()
            .find(|c| !c.is_ascii_graphic() || *c == '*' || *c == '>')
        {
            return Err(invalid(format!(
                "event type {:?} contains {c:?} (use printable ASCII without spaces, '*' or '>')",
                ev.event_type
            )));
        }
        if let Some(t) = ev.timestamp
            && t > MAX_VERSION
        {
            return Err(invalid(format!(
                "timestamp {t} is beyond {MAX_VERSION} (milliseconds since the Unix epoch)"
            )));
        }
        if ev.data.len() > limits.max_event_bytes {
            return Err(StoreError::TooLarge {
                stream: stream.clone(),
                what: format!("event #{index} ({})'s data in bytes", ev.id),
                size: ev.data.len(),
                limit: limits.max_event_bytes,
            });
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&ev.data) {
            return Err(invalid(format!("data is not valid JSON: {e}")));
        }
        for (k, v) in &ev.metadata {
            if k.is_empty() || k.chars().any(|c| c.is_control() || c == ':' || c == ' ') {
                return Err(invalid(format!(
                    "metadata key {k:?} must be non-empty, without spaces, ':' or control characters"
                )));
            }
            if v.chars().any(|c| c == '\r' || c == '\n') {
                return Err(invalid(format!(
                    "metadata value of {k:?} contains a line break"
                )));
            }
            total += k.len() + v.len();
        }
        let metadata_bytes: usize = ev.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if metadata_bytes > limits.max_metadata_bytes {
            return Err(StoreError::TooLarge {
                stream: stream.clone(),
                what: format!("event #{index} ({})'s metadata in bytes", ev.id),
                size: metadata_bytes,
                limit: limits.max_metadata_bytes,
            });
        }
        if ev.tags.len() > limits.max_tags_per_event {
            return Err(StoreError::TooLarge {
                stream: stream.clone(),
                what: format!("event #{index} ({})'s number of tags", ev.id),
                size: ev.tags.len(),
                limit: limits.max_tags_per_event,
            });
        }
        for tag in &ev.tags {
            validate_tag(tag)?;
            distinct_tags.insert(tag);
        }
        total += ev.data.len();
    }
    let messages = req.events.len() + distinct_tags.len();
    if messages > MAX_APPEND_MESSAGES {
        return Err(StoreError::TooLarge {
            stream: stream.clone(),
            what: "the number of messages (events plus one per distinct tag)".into(),
            size: messages,
            limit: MAX_APPEND_MESSAGES,
        });
    }
    if total > limits.max_append_bytes {
        return Err(StoreError::TooLarge {
            stream: stream.clone(),
            what: "the append's total size in bytes".into(),
            size: total,
            limit: limits.max_append_bytes,
        });
    }
    Ok(())
}

/// Tags share the stream id alphabet (they become NATS subject tokens on JetStream).
pub fn validate_tag(tag: &str) -> Result<(), StoreError> {
    check_id(tag).map_err(|reason| StoreError::InvalidTag {
        tag: tag.to_string(),
        reason,
    })
}

/// Milliseconds since the Unix epoch, for commit timestamps.
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_alphabet_and_length() {
        assert!(StreamId::new("user-42").is_ok());
        assert!(StreamId::new("order:2024@eu+x=y_z").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", "ü", "a/b"] {
            let err = StreamId::new(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidStreamId { .. }),
                "{bad:?} gave {err}"
            );
        }
        assert!(StreamId::new("x".repeat(MAX_ID_LEN)).is_ok());
        let err = StreamId::new("x".repeat(MAX_ID_LEN + 1)).unwrap_err();
        assert!(err.to_string().contains("201 bytes"), "{err}");
    }

    #[test]
    fn category_is_prefix_before_first_dash() {
        assert_eq!(StreamId::new("user-42-x").unwrap().category(), "user");
        assert_eq!(StreamId::new("config").unwrap().category(), "config");
        // The category is never empty: an id may not start with '-'.
        let err = StreamId::new("-42").unwrap_err();
        assert!(err.to_string().contains("category"), "{err}");
        assert_eq!(StreamId::new("a-").unwrap().category(), "a");
    }

    #[test]
    fn expected_version_admits() {
        assert!(ExpectedVersion::Any.admits(0) && ExpectedVersion::Any.admits(9));
        assert!(ExpectedVersion::NoStream.admits(0) && !ExpectedVersion::NoStream.admits(1));
        assert!(!ExpectedVersion::Exists.admits(0) && ExpectedVersion::Exists.admits(1));
        assert!(ExpectedVersion::Exact(3).admits(3) && !ExpectedVersion::Exact(3).admits(2));
    }

    #[test]
    fn validation_names_the_problem() {
        let s = StreamId::new("user-1").unwrap();
        let limits = Limits::default();
        let req = |events| AppendRequest::new(s.clone(), ExpectedVersion::Any, events);
        let e = validate_append(&req(vec![]), &limits).unwrap_err();
        assert!(matches!(e, StoreError::NoEvents { .. }));
        let e = validate_append(
            &req(vec![
                NewEvent::new("ok", "{}"),
                NewEvent::new("bad", "{nope"),
            ]),
            &limits,
        )
        .unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidEvent { index: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let big = format!("\"{}\"", "x".repeat(limits.max_event_bytes));
        let e = validate_append(&req(vec![NewEvent::new("big", big)]), &limits).unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        let ev = NewEvent::new("a", "{}");
        let e = validate_append(&req(vec![ev.clone(), ev]), &limits).unwrap_err();
        assert!(matches!(e, StoreError::DuplicateEventId { .. }), "{e}");
        let e = validate_append(&req(vec![NewEvent::new("has space", "{}")]), &limits).unwrap_err();
        assert!(matches!(e, StoreError::InvalidEvent { .. }), "{e}");
        let e = validate_append(
            &req(vec![NewEvent::new("t", "1").with_tags(["a.b"])]),
            &limits,
        )
        .unwrap_err();
        assert!(matches!(e, StoreError::InvalidTag { .. }), "{e}");
    }
}
