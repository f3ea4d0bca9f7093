//! Dead letters: events a version's projection failed on, parked (under the
//! `park` poison policy) so the projection could go on past them.
//!
//! One JSON file per view version, `parked/<view-id>.json`, replaced atomically.
//! An event is parked *before* the checkpoint moves past it, keyed by position,
//! so a crash in between parks it again rather than losing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::LifecycleError;
use super::registry::write_atomically;
use crate::store::{RecordedEvent, StreamId};
use crate::views::ViewId;

/// An event in a version's dead-letter list.
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
    pub data: serde_json::Value,
    /// Why the projection refused it (the guest's message).
    pub error: String,
    /// When it was parked (ms since the Unix epoch).
    pub parked_at: u64,
}

impl ParkedEvent {
    pub(super) fn new(e: &RecordedEvent, error: String) -> Self {
        ParkedEvent {
            position: e.position,
            stream: e.stream.to_string(),
            event_type: e.event_type.clone(),
            version: e.version,
            id: e.id,
            timestamp: e.timestamp,
            metadata: e.metadata.clone(),
            tags: e.tags.clone(),
            data: serde_json::from_slice(&e.data).unwrap_or(serde_json::Value::Null),
            error,
            parked_at: super::now_millis(),
        }
    }

    /// The event as the log recorded it, for a retry.
    pub(super) fn to_recorded(&self) -> Option<RecordedEvent> {
        Some(RecordedEvent {
            id: self.id,
            stream: StreamId::new(self.stream.clone()).ok()?,
            event_type: self.event_type.clone(),
            version: self.version,
            position: self.position,
            timestamp: self.timestamp,
            metadata: self.metadata.clone(),
            tags: self.tags.clone(),
            data: Bytes::from(self.data.to_string()),
        })
    }
}

/// The dead-letter file of `view` under `dir`.
pub(super) fn path(dir: &Path, view: &ViewId) -> PathBuf {
    dir.join(format!("{view}.json"))
}

/// The view's parked events, in position order (none when there is no file).
pub(super) fn load(dir: &Path, view: &ViewId) -> Result<Vec<ParkedEvent>, LifecycleError> {
    let path = path(dir, view);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LifecycleError::CorruptRegistry {
            path,
            reason: format!("dead letters of {view}: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(LifecycleError::io(
            format!("reading the dead letters of {view}"),
            &path,
        )(e)),
    }
}

/// Replaces the view's parked events (removing the file when there are none).
pub(super) fn save(
    dir: &Path,
    view: &ViewId,
    events: &[ParkedEvent],
) -> Result<(), LifecycleError> {
    let path = path(dir, view);
    if events.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LifecycleError::io(
                format!("removing the dead letters of {view}"),
                &path,
            )(e)),
            _ => Ok(()),
        };
    }
    let bytes = serde_json::to_vec_pretty(events).map_err(|e| LifecycleError::CorruptRegistry {
        path: path.clone(),
        reason: format!("serializing the dead letters of {view}: {e}"),
    })?;
    write_atomically(
        &path,
        &bytes,
        &format!("writing the dead letters of {view}"),
    )
}

/// Adds `event` to the view's list (replacing one at the same position).
pub(super) fn park(dir: &Path, view: &ViewId, event: ParkedEvent) -> Result<usize, LifecycleError> {
    let mut all = load(dir, view)?;
    all.retain(|p| p.position != event.position);
    all.push(event);
    all.sort_by_key(|p| p.position);
    save(dir, view, &all)?;
    Ok(all.len())
}
