//! The native test harness: runs a projection without wasm, through the same
//! batch decoding the module uses, over documents kept in a map.

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;

use crate::abi::BatchWriter;
use crate::{Backend, BatchError, Projection, run_batch};

/// Why the harness could not apply an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HarnessError {
    pub position: u64,
    pub message: String,
}

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event at position {}: {}", self.position, self.message)
    }
}

impl std::error::Error for HarnessError {}

/// Feeds events to projection `P` and keeps its documents in memory.
///
/// ```
/// # use kiln_sdk::{Event, Harness, PerStream, StreamProjection};
/// # #[derive(serde::Deserialize)]
/// # enum UserEvent { UserRegistered { name: String } }
/// # #[derive(Default, serde::Serialize, serde::Deserialize)]
/// # struct Profile { name: String }
/// # struct U;
/// # impl StreamProjection for U {
/// #     const NAME: &'static str = "users";
/// #     const EVENTS: &'static [&'static str] = &["UserRegistered"];
/// #     type Event = UserEvent;
/// #     type State = Profile;
/// #     fn apply(_: Profile, e: &Event<UserEvent>) -> Profile {
/// #         let UserEvent::UserRegistered { name } = &e.data;
/// #         Profile { name: name.clone() }
/// #     }
/// # }
/// # type Users = PerStream<U>;
/// # use serde_json::json;
/// # fn main() -> Result<(), kiln_sdk::HarnessError> {
/// let mut h = Harness::<Users>::new();
/// h.event("user-1", "UserRegistered", json!({"name": "Ada"}))?;
/// assert_eq!(h.doc::<Profile>("user-1").unwrap().name, "Ada");
/// # Ok(())
/// # }
/// ```
pub struct Harness<P> {
    docs: MapBackend,
    position: u64,
    versions: HashMap<String, u64>,
    batch: BatchWriter,
    _p: std::marker::PhantomData<P>,
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Projection> Harness<P> {
    pub fn new() -> Self {
        Harness {
            docs: MapBackend::default(),
            position: 0,
            versions: HashMap::new(),
            batch: BatchWriter::new(),
            _p: std::marker::PhantomData,
        }
    }

    /// Appends one event (next position, next version of its stream, timestamp =
    /// position) and applies it.
    pub fn event(
        &mut self,
        stream: &str,
        event_type: &str,
        data: serde_json::Value,
    ) -> Result<&mut Self, HarnessError> {
        let bytes = data.to_string();
        self.position += 1;
        let version = self.versions.entry(stream.to_string()).or_insert(0);
        *version += 1;
        let (position, version) = (self.position, *version);
        self.batch.clear();
        self.batch.push(
            position,
            version,
            position,
            stream,
            event_type,
            bytes.as_bytes(),
            std::iter::empty(),
        );
        self.flush(position)?;
        Ok(self)
    }

    /// Applies a pre-encoded batch (see [`BatchWriter`]); `first` is the position
    /// of its first event, for error messages. Used by benchmarks.
    pub fn apply_encoded(&mut self, batch: &[u8], first: u64) -> Result<(), HarnessError> {
        run_batch::<P>(batch, &mut self.docs, |_| {}).map_err(|e| error(e, first))
    }

    fn flush(&mut self, first: u64) -> Result<(), HarnessError> {
        run_batch::<P>(self.batch.bytes(), &mut self.docs, |_| {}).map_err(|e| error(e, first))
    }

    /// The document at `key`, decoded; `None` if absent or of another shape.
    pub fn doc<D: DeserializeOwned>(&self, key: &str) -> Option<D> {
        self.docs
            .0
            .get(key)
            .and_then(|v| serde_json::from_slice(v).ok())
    }

    /// The document at `key` as JSON.
    pub fn json(&self, key: &str) -> Option<serde_json::Value> {
        self.doc(key)
    }

    /// Every document (key → JSON bytes), in key order.
    pub fn documents(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.docs.0
    }
}

fn error(e: BatchError, first: u64) -> HarnessError {
    HarnessError {
        position: first + u64::from(e.index),
        message: e.message,
    }
}

#[derive(Default)]
struct MapBackend(BTreeMap<String, Vec<u8>>);

impl Backend for MapBackend {
    fn get(&mut self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }

    fn put(&mut self, key: &str, value: &[u8]) {
        match self.0.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                self.0.insert(key.to_string(), value.to_vec());
            }
        }
    }

    fn delete(&mut self, key: &str) {
        self.0.remove(key);
    }

    fn scan(&mut self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.0
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
