//! What a snapshot is: its manifest (view, fingerprint, log, position, the
//! event at that position, files and digests), the key it is stored under,
//! and the check that a log still holds the history it was built from.

use super::*;

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    pub name: String,
    pub size: u64,
    /// blake3 of its bytes, hex.
    pub blake3: String,
}

/// What a snapshot holds; written last, read first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// [`FORMAT`] of the kiln that wrote it.
    pub format: u32,
    /// That kiln's version.
    pub kiln: String,
    /// The view version that built it (`users-1_2_0`).
    pub view: String,
    /// The module fingerprint of the logic that built it.
    pub fingerprint: String,
    /// The identity of the log it was built from.
    pub log: String,
    /// Every event up to this log position is applied, none after.
    pub position: Position,
    /// The log's event at `position` (format 2; absent in format 1): a log
    /// that holds another event there, or none, is another history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventAt>,
    pub documents: u64,
    /// Bytes of keys and documents.
    pub bytes: u64,
    /// The documents' digest ([`crate::views::digest`]).
    pub digest: String,
    /// Dead letters in [`PARKED_FILE`].
    pub parked: u64,
    pub files: Vec<SnapshotFile>,
    /// Who published it.
    pub instance: String,
    pub created_millis: u64,
    /// The instance whose replay of the log built these documents when
    /// that is not the publisher (its view was itself filled from a
    /// snapshot): the documents' lineage, one witness in the fleet's
    /// digest vote however many instances bootstrap from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_by: Option<String>,
}

impl SnapshotManifest {
    /// The instance whose replay built the documents.
    pub fn built_by(&self) -> &str {
        self.built_by.as_deref().unwrap_or(&self.instance)
    }

    /// `<key>/<position, 20 digits>`: where its files live in a store.
    pub fn path(&self) -> String {
        format!(
            "{}/{:020}",
            snapshot_key(&self.log, &self.fingerprint),
            self.position
        )
    }

    /// Bytes of all its files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The event a snapshot was built after, as its manifest names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventAt {
    pub id: String,
    /// blake3 of everything the event holds ([`event_hash`]), hex.
    pub blake3: String,
}

impl EventAt {
    pub fn of(event: &RecordedEvent) -> EventAt {
        EventAt {
            id: event.id.to_string(),
            blake3: event_hash(event),
        }
    }
}

/// blake3 over every field of a recorded event (id, stream, type, version,
/// position, commit time, metadata, tags, data), each length-prefixed: two
/// events hash alike only when a projection could not tell them apart.
pub fn event_hash(e: &RecordedEvent) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(e.id.as_bytes());
    field(e.stream.as_str().as_bytes());
    field(e.event_type.as_bytes());
    field(&e.version.to_be_bytes());
    field(&e.position.to_be_bytes());
    field(&e.timestamp.to_be_bytes());
    field(&(e.metadata.len() as u64).to_be_bytes());
    for (k, v) in &e.metadata {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(&(e.tags.len() as u64).to_be_bytes());
    for t in &e.tags {
        field(t.as_bytes());
    }
    field(&e.data);
    h.finalize().to_hex().to_string()
}

/// How long reading one event of the log may take.
const EVENT_READ: Duration = Duration::from_secs(15);

/// The log's event at `position`: `None` when the log has none there (its
/// head is before it, or the first event at or after it is at another
/// position).
pub async fn event_at(
    log: &dyn EventStore,
    position: Position,
) -> Result<Option<RecordedEvent>, SnapshotError> {
    use futures::StreamExt;
    let failed = |reason: String| SnapshotError::Store {
        store: format!("the event log {}", log.log_identity()),
        op: format!("reading the event at {position}"),
        reason,
    };
    let head = log.head().await.map_err(|e| failed(e.to_string()))?;
    if position == 0 || position > head {
        return Ok(None);
    }
    let mut tail = log.tail(position);
    let first = tokio::time::timeout(EVENT_READ, tail.next())
        .await
        .map_err(|_| failed(format!("no answer within {EVENT_READ:?}")))?;
    match first {
        Some(Ok(batch)) => Ok(batch.into_iter().next().filter(|e| e.position == position)),
        Some(Err(e)) => Err(failed(e.to_string())),
        None => Err(failed("the log's tail ended".into())),
    }
}

/// Refuses `m` unless `log` holds the history it was built from: an event
/// at its position, the one it names.
pub(super) async fn check_history(
    log: &dyn EventStore,
    m: &SnapshotManifest,
) -> Result<(), SnapshotError> {
    let refused = |reason: String| SnapshotError::Refused {
        snapshot: format!("{} at {} ({})", m.view, m.position, m.path()),
        reason,
    };
    let Some(want) = &m.event else {
        return Err(refused(format!(
            "snapshot format {} names no event at its position: it cannot be checked against the log",
            m.format
        )));
    };
    match event_at(log, m.position).await? {
        Some(e) if EventAt::of(&e) == *want => Ok(()),
        Some(e) => Err(refused(format!(
            "the log's event at {} is {} (blake3 {}), the snapshot was built after {} (blake3 {}): \
             it is of another history of this log (a restore from a backup?)",
            m.position,
            e.id,
            event_hash(&e),
            want.id,
            want.blake3
        ))),
        None => Err(refused(format!(
            "the log holds no event at {} (its head is {}): it is of another history of this \
             log (a restore from a backup?)",
            m.position,
            log.head().await.unwrap_or(0)
        ))),
    }
}

/// Where the snapshots of fingerprint `fingerprint` built from log `log` are
/// kept: 32 hex digits of blake3 over both (a name any store accepts).
pub fn snapshot_key(log: &str, fingerprint: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(log.as_bytes());
    h.update(&[0]);
    h.update(fingerprint.as_bytes());
    h.finalize().to_hex()[..32].to_string()
}

pub(super) fn decode_parked(mut bytes: &[u8]) -> Option<Vec<(Position, Vec<u8>)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let at = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
        let record = bytes.get(12..12 + len)?.to_vec();
        out.push((at, record));
        bytes = &bytes[12 + len..];
    }
    Some(out)
}
