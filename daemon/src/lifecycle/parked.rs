//! Dead letters: events a version's projection failed on, parked (under the
//! `park` poison policy) so the projection could go on past them.
//!
//! They live in the views database beside the view's checkpoint
//! ([`ViewStore::park`]): parking writes the record and moves the checkpoint
//! past the event in one write batch, and a retry commits the event's
//! documents and removes its record in one write batch
//! ([`ViewStore::commit_unparked`]). A crash at any point leaves an event
//! parked and unapplied, or applied and gone: a parked event is applied at
//! most once. Each record keeps the event's original bytes (the log's own
//! encoding), so a retry sees exactly what the log held.
//!
//! Data directories of format 1 kept them in `parked/<view-id>.json`; those
//! files are moved into the database at start ([`migrate_files`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LifecycleError;
use crate::store::{RecordedEvent, StreamId, codec};
use crate::views::{ViewId, ViewStore};

/// Record format version (first byte).
const FORMAT: u8 = 1;

/// An event in a version's dead-letter list, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParkedEvent {
    pub position: u64,
    pub stream: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub id: uuid::Uuid,
    pub timestamp: u64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The event's data (as a string when it is not JSON).
    pub data: serde_json::Value,
    /// Why the projection refused it (the guest's message).
    pub error: String,
    /// When it was parked (ms since the Unix epoch).
    pub parked_at: u64,
}

/// A parked event with its original bytes.
pub(super) struct Parked {
    pub event: RecordedEvent,
    pub error: String,
    pub parked_at: u64,
}

impl Parked {
    pub fn new(event: &RecordedEvent, error: String) -> Parked {
        Parked {
            event: event.clone(),
            error,
            parked_at: super::now_millis(),
        }
    }

    /// `u8 format | u64 parked_at | u32 len, error | event (the log's codec)`.
    pub fn encode(&self) -> Vec<u8> {
        let event = codec::encode_event(&self.event);
        let mut out = Vec::with_capacity(1 + 8 + 4 + self.error.len() + event.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.parked_at.to_le_bytes());
        out.extend_from_slice(&(self.error.len() as u32).to_le_bytes());
        out.extend_from_slice(self.error.as_bytes());
        out.extend_from_slice(&event);
        out
    }

    pub fn decode(view: &ViewId, position: u64, bytes: &[u8]) -> Result<Parked, LifecycleError> {
        let corrupt = |reason: &str| LifecycleError::CorruptParked {
            view: view.clone(),
            position,
            reason: reason.to_string(),
        };
        let (&format, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if format != FORMAT {
            return Err(corrupt(&format!("record format {format}")));
        }
        fn take(rest: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
            (rest.len() >= n).then(|| rest.split_at(n))
        }
        let truncated = || corrupt("truncated");
        let (at, rest) = take(rest, 8).ok_or_else(truncated)?;
        let (len, rest) = take(rest, 4).ok_or_else(truncated)?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt("length"))?) as usize;
        let (error, rest) = take(rest, len).ok_or_else(truncated)?;
        let event = codec::decode_event(position, rest).map_err(|e| corrupt(&e.to_string()))?;
        Ok(Parked {
            event,
            error: String::from_utf8_lossy(error).into_owned(),
            parked_at: u64::from_le_bytes(at.try_into().map_err(|_| corrupt("time"))?),
        })
    }

    pub fn to_api(&self) -> ParkedEvent {
        let e = &self.event;
        ParkedEvent {
            position: e.position,
            stream: e.stream.to_string(),
            event_type: e.event_type.clone(),
            version: e.version,
            id: e.id,
            timestamp: e.timestamp,
            metadata: e.metadata.clone(),
            tags: e.tags.clone(),
            data: serde_json::from_slice(&e.data).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.data).into_owned())
            }),
            error: self.error.clone(),
            parked_at: self.parked_at,
        }
    }
}

/// The view's parked events, in position order.
pub(super) fn load(views: &ViewStore, view: &ViewId) -> Result<Vec<Parked>, LifecycleError> {
    views
        .parked(view)?
        .into_iter()
        .map(|(position, bytes)| Parked::decode(view, position, &bytes))
        .collect()
}

/// How many events the view has parked.
pub(super) fn count(views: &ViewStore, view: &ViewId) -> usize {
    views.parked(view).map_or(0, |p| p.len())
}

/// Moves format-1 dead-letter files (`<dir>/<view-id>.json`) into the views
/// database, then removes them. Their data went through a JSON value in
/// format 1, so it is kept as that value's text.
pub(super) fn migrate_files(dir: &Path, views: &ViewStore) -> Result<usize, LifecycleError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(LifecycleError::io("reading the dead-letter directory", dir)(e)),
    };
    let mut moved = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(view) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<ViewId>().ok())
            .filter(|_| path.extension().is_some_and(|e| e == "json"))
        else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(LifecycleError::io(
            format!("reading the dead letters of {view}"),
            &path,
        ))?;
        let old: Vec<ParkedEvent> =
            serde_json::from_slice(&bytes).map_err(|e| LifecycleError::CorruptParked {
                view: view.clone(),
                position: 0,
                reason: format!("{}: {e}", path.display()),
            })?;
        for p in &old {
            let stream =
                StreamId::new(p.stream.clone()).map_err(|e| LifecycleError::CorruptParked {
                    view: view.clone(),
                    position: p.position,
                    reason: e.to_string(),
                })?;
            let record = Parked {
                event: RecordedEvent {
                    id: p.id,
                    stream,
                    event_type: p.event_type.clone(),
                    version: p.version,
                    position: p.position,
                    timestamp: p.timestamp,
                    metadata: p.metadata.clone(),
                    tags: p.tags.clone(),
                    data: bytes::Bytes::from(p.data.to_string()),
                },
                error: p.error.clone(),
                parked_at: p.parked_at,
            };
            views.update_parked(&view, p.position, &record.encode())?;
            moved += 1;
        }
        std::fs::remove_file(&path).map_err(LifecycleError::io(
            format!("removing the migrated dead letters of {view}"),
            &path,
        ))?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Writes;

    fn event(position: u64, data: &[u8]) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::from_u128(7),
            stream: StreamId::new("user-1").expect("stream"),
            event_type: "LoginFailed".into(),
            version: 3,
            position,
            timestamp: 42,
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            tags: vec!["t".into()],
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn a_record_keeps_the_events_original_bytes() {
        // Key order and a number no f64 holds: a JSON value would change both.
        let data = br#"{"z":1,"a":123456789012345678901234567890,"m":"\u00e9"}"#;
        let p = Parked {
            event: event(9, data),
            error: "refused: bad".into(),
            parked_at: 1234,
        };
        let view: ViewId = "users-1_0_0".parse().expect("id");
        let back = Parked::decode(&view, 9, &p.encode()).expect("decodes");
        assert_eq!(&back.event.data[..], &data[..]);
        assert_eq!(back.event, p.event);
        assert_eq!(
            (back.error.as_str(), back.parked_at),
            ("refused: bad", 1234)
        );
        for cut in [0, 1, 9, 13, 20] {
            let err = Parked::decode(&view, 9, &p.encode()[..cut]).err();
            assert!(
                matches!(err, Some(LifecycleError::CorruptParked { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn parking_moves_the_checkpoint_and_a_retry_removes_the_record_with_its_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let views = ViewStore::open(dir.path()).expect("views");
        let view: ViewId = "users-1_0_0".parse().expect("id");
        views.create(&view).expect("create");
        let p = Parked::new(&event(5, b"{}"), "no".into());
        views
            .park(&view, crate::views::Slot::View, 5, &p.encode())
            .expect("park");
        assert_eq!(views.checkpoint(&view).expect("checkpoint"), 5);
        assert_eq!(load(&views, &view).expect("load").len(), 1);
        let mut writes = Writes::new();
        writes.insert(b"user-1".to_vec(), Some(b"{\"n\":1}".to_vec()));
        views
            .commit_unparked(&view, &writes, 5)
            .expect("retry commit");
        assert!(load(&views, &view).expect("load").is_empty());
        assert!(views.get(&view, b"user-1").expect("get").is_some());
        assert_eq!(
            views.checkpoint(&view).expect("checkpoint"),
            5,
            "a retry does not move it"
        );
        // Dropping a view drops its dead letters too.
        views
            .park(&view, crate::views::Slot::View, 6, &p.encode())
            .expect("park");
        views.drop_view(&view).expect("drop");
        views.create(&view).expect("create again");
        assert!(load(&views, &view).expect("load").is_empty());
    }

    #[test]
    fn format_one_files_move_into_the_database() {
        let dir = tempfile::tempdir().expect("dir");
        let views = ViewStore::open(dir.path().join("views")).expect("views");
        let view: ViewId = "chaos-1_0_0".parse().expect("id");
        views.create(&view).expect("create");
        let parked = dir.path().join("parked");
        std::fs::create_dir_all(&parked).expect("dir");
        let old = Parked::new(&event(4, br#"{"message":"x"}"#), "boom".into()).to_api();
        std::fs::write(
            parked.join("chaos-1_0_0.json"),
            serde_json::to_vec(&vec![old.clone()]).expect("json"),
        )
        .expect("write");
        assert_eq!(migrate_files(&parked, &views).expect("migrate"), 1);
        assert!(!parked.join("chaos-1_0_0.json").exists());
        let now: Vec<ParkedEvent> = load(&views, &view)
            .expect("load")
            .iter()
            .map(Parked::to_api)
            .collect();
        assert_eq!(now, vec![old]);
    }
}
