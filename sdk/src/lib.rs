//! kiln-sdk: write kiln projections in Rust, run them as WebAssembly in the
//! daemon, and unit test the very same code natively.
//!
//! A projection is a type implementing [`Projection`]: typed events in, reads and
//! writes of typed JSON documents by key through a [`View`]. One event may touch
//! several documents. [`StreamProjection`] is the simpler per-stream form (one
//! state document per stream, keyed by the stream id, `apply(state, event) ->
//! state`), adapted by [`PerStream`]; [`KeyedProjection`] (adapted by
//! [`Keyed`]) is the same with a key of your choosing, for documents that
//! gather several streams. [`export!`] turns a projection into a module: it embeds the
//! manifest and emits the ABI exports when building for `wasm32`, and nothing
//! else on native targets, where [`Harness`] feeds events and shows documents.
//!
//! ```
//! use kiln_sdk::{Event, Projection, View};
//! #[derive(serde::Deserialize)]
//! pub enum UserEvent { UserRegistered { name: String } }
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! pub struct Profile { name: String, logins: u64 }
//! pub struct Users;
//! impl Projection for Users {
//!     const NAME: &'static str = "users";
//!     const EVENTS: &'static [&'static str] = &["UserRegistered"];
//!     type Event = UserEvent;
//!     fn handle(e: &Event<UserEvent>, view: &mut View) -> kiln_sdk::Result<()> {
//!         let UserEvent::UserRegistered { name } = &e.data;
//!         view.put(e.stream, &Profile { name: name.clone(), logins: 0 })
//!     }
//! }
//! kiln_sdk::export!(Users);
//!
//! # fn main() -> Result<(), kiln_sdk::HarnessError> {
//! // The same code, natively, in a unit test:
//! let mut h = kiln_sdk::Harness::<Users>::new();
//! h.event("user-1", "UserRegistered", serde_json::json!({"name": "Ada"}))?;
//! assert_eq!(h.doc::<Profile>("user-1").unwrap().name, "Ada");
//! # Ok(())
//! # }
//! ```
//!
//! The wire-level contract is `sdk/ABI.md`; [`abi`] is its single implementation.

pub mod abi;
pub mod event;
#[doc(hidden)]
pub mod guest;
#[cfg(not(target_arch = "wasm32"))]
mod harness;
pub mod manifest;

use std::collections::HashMap;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use event::Event;
#[cfg(not(target_arch = "wasm32"))]
pub use harness::{Harness, HarnessError};
pub use manifest::Manifest;

/// A projection's failure: a message the host reports with the projection's
/// name, version and the event's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub fn msg(message: impl std::fmt::Display) -> Self {
        Error(message.to_string())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a [`View`]'s documents live: the daemon's view (through host calls) in
/// wasm, a map in the native [`Harness`]. Reads see earlier writes.
pub trait Backend {
    fn get(&mut self, key: &str) -> Option<&[u8]>;
    fn put(&mut self, key: &str, value: &[u8]);
    fn delete(&mut self, key: &str);
    /// Every document whose key starts with `prefix`, in key order.
    fn scan(&mut self, prefix: &str) -> Vec<(String, Vec<u8>)>;
}

/// A projection's handle on its view: JSON documents by key.
pub struct View<'a> {
    backend: &'a mut dyn Backend,
    scratch: Vec<u8>,
}

impl<'a> View<'a> {
    pub fn new(backend: &'a mut dyn Backend) -> Self {
        View {
            backend,
            scratch: Vec::new(),
        }
    }

    /// The document at `key`, if any.
    pub fn get<D: DeserializeOwned>(&mut self, key: &str) -> Result<Option<D>> {
        match self.backend.get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes)
                .map(Some)
                .map_err(|e| Error(format!("document {key:?} does not decode: {e}"))),
        }
    }

    /// The document at `key`, or `D::default()`.
    pub fn get_or_default<D: DeserializeOwned + Default>(&mut self, key: &str) -> Result<D> {
        Ok(self.get(key)?.unwrap_or_default())
    }

    /// Writes `doc` at `key`, replacing any previous document.
    pub fn put<D: Serialize + ?Sized>(&mut self, key: &str, doc: &D) -> Result<()> {
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, doc)?;
        self.backend.put(key, &self.scratch);
        Ok(())
    }

    /// Reads the document at `key` (or the default), lets `f` change it, writes it back.
    pub fn update<D, F>(&mut self, key: &str, f: F) -> Result<()>
    where
        D: Serialize + DeserializeOwned + Default,
        F: FnOnce(&mut D),
    {
        let mut doc = self.get_or_default(key)?;
        f(&mut doc);
        self.put(key, &doc)
    }

    pub fn delete(&mut self, key: &str) {
        self.backend.delete(key);
    }

    /// Every document whose key starts with `prefix`, in key order.
    pub fn scan<D: DeserializeOwned>(&mut self, prefix: &str) -> Result<Vec<(String, D)>> {
        self.backend
            .scan(prefix)
            .into_iter()
            .map(|(k, v)| match serde_json::from_slice(&v) {
                Ok(d) => Ok((k, d)),
                Err(e) => Err(Error(format!("document {k:?} does not decode: {e}"))),
            })
            .collect()
    }
}

/// A projection: events in, document reads and writes out. It keeps no state of
/// its own between events (everything lives in the view), so a replay rebuilds
/// the same view byte for byte.
pub trait Projection {
    /// The view's name; the module's version comes from the crate's version.
    const NAME: &'static str;
    /// Event types handled; the host delivers only these. Empty = all types.
    const EVENTS: &'static [&'static str] = &[];
    /// Stream categories read; empty = all categories.
    const CATEGORIES: &'static [&'static str] = &[];
    /// Every document this projection reads or writes depends only on the
    /// events of one stream, so the host may warm its view with several
    /// workers, each replaying the streams of its hash partition (`per_stream`
    /// in the manifest). [`PerStream`] says so, and holds it by construction;
    /// a general projection may declare it when it holds. The host checks it
    /// while a warm-up is split: a document touched from two partitions makes
    /// the version warm again from the first event with one worker
    /// (docs/lifecycle.md, "Parallel warm-up").
    const PER_STREAM: bool = false;
    /// The typed events: an enum whose variants are the event types.
    type Event: DeserializeOwned;

    fn handle(event: &Event<'_, Self::Event>, view: &mut View<'_>) -> Result<()>;

    /// Called once after the last event of every batch, before its writes are
    /// committed; a failure fails the batch. Nothing to do by default.
    fn finish_batch(view: &mut View<'_>) -> Result<()> {
        let _ = view;
        Ok(())
    }

    /// Applies one encoded batch: [`Projection::handle`] for each wanted
    /// event, then [`Projection::finish_batch`]. [`PerStream`] and [`Keyed`]
    /// replace it to keep decoded states for the batch in a local map (no `Any`: a `TypeId`
    /// hashes the crate's version, and the module's fingerprint must not).
    #[doc(hidden)]
    fn apply_batch(
        input: &[u8],
        view: &mut View<'_>,
        on_event: &mut dyn FnMut(u32),
    ) -> Result<(), BatchError>
    where
        Self: Sized,
    {
        let events = for_each_event::<Self>(input, view, on_event, Self::handle)?;
        Self::finish_batch(view).map_err(|e| BatchError {
            index: events.saturating_sub(1),
            message: e.0,
        })
    }
}

/// The per-stream form: one state document per stream, keyed by its stream
/// id and nothing else, so every document depends only on its own stream's
/// events. That is what lets the host warm the view by stream partitions
/// (`per_stream` in the manifest), and it holds by construction: the form has
/// no way to write another document. A projection whose documents gather
/// several streams uses [`KeyedProjection`] (never partitioned) or the
/// general [`Projection`].
pub trait StreamProjection {
    const NAME: &'static str;
    const EVENTS: &'static [&'static str] = &[];
    const CATEGORIES: &'static [&'static str] = &[];
    type Event: DeserializeOwned;
    type State: Serialize + DeserializeOwned + Default + 'static;

    /// The stream's state after `event`.
    fn apply(state: Self::State, event: &Event<'_, Self::Event>) -> Self::State;
}

/// Adapts a [`StreamProjection`] into a [`Projection`]: `kiln_sdk::export!(PerStream<MyProjection>)`.
pub struct PerStream<S>(PhantomData<S>);

impl<S: StreamProjection> Projection for PerStream<S> {
    const NAME: &'static str = S::NAME;
    const EVENTS: &'static [&'static str] = S::EVENTS;
    const CATEGORIES: &'static [&'static str] = S::CATEGORIES;
    const PER_STREAM: bool = true;
    type Event = S::Event;

    /// One event on its own: read the stream's state, apply, write it back.
    fn handle(event: &Event<'_, S::Event>, view: &mut View<'_>) -> Result<()> {
        let state = view.get_or_default::<S::State>(event.stream)?;
        view.put(event.stream, &S::apply(state, event))
    }

    fn apply_batch(
        input: &[u8],
        view: &mut View<'_>,
        on_event: &mut dyn FnMut(u32),
    ) -> Result<(), BatchError> {
        fold_batch::<Self, S::State>(input, view, on_event, |e| e.stream.to_string(), S::apply)
    }
}

/// The keyed form: one state document per key, where [`Self::key`] may send
/// the events of several streams to one document (a per-category total, a
/// document per customer fed by order streams). Its view always warms with
/// one worker, in log order: events of different streams that share a
/// document must meet it in the order the log holds them.
pub trait KeyedProjection {
    const NAME: &'static str;
    const EVENTS: &'static [&'static str] = &[];
    const CATEGORIES: &'static [&'static str] = &[];
    type Event: DeserializeOwned;
    type State: Serialize + DeserializeOwned + Default + 'static;

    /// The key of the document `event` updates.
    fn key(event: &Event<'_, Self::Event>) -> String;

    /// The document's state after `event`.
    fn apply(state: Self::State, event: &Event<'_, Self::Event>) -> Self::State;
}

/// Adapts a [`KeyedProjection`] into a [`Projection`]: `kiln_sdk::export!(Keyed<MyProjection>)`.
pub struct Keyed<K>(PhantomData<K>);

impl<K: KeyedProjection> Projection for Keyed<K> {
    const NAME: &'static str = K::NAME;
    const EVENTS: &'static [&'static str] = K::EVENTS;
    const CATEGORIES: &'static [&'static str] = K::CATEGORIES;
    type Event = K::Event;

    fn handle(event: &Event<'_, K::Event>, view: &mut View<'_>) -> Result<()> {
        let key = K::key(event);
        let state = view.get_or_default::<K::State>(&key)?;
        view.put(&key, &K::apply(state, event))
    }

    fn apply_batch(
        input: &[u8],
        view: &mut View<'_>,
        on_event: &mut dyn FnMut(u32),
    ) -> Result<(), BatchError> {
        fold_batch::<Self, K::State>(input, view, on_event, K::key, K::apply)
    }
}

/// The batch of a state-per-key form: keeps each key's decoded state for the
/// rest of the batch and writes every state touched once, at the end, in key
/// order. A key with many events in one batch is read, decoded, encoded and
/// written once; the documents are the same as writing after every event (the
/// batch's writes commit together either way).
fn fold_batch<P: Projection, S: Serialize + DeserializeOwned + Default>(
    input: &[u8],
    view: &mut View<'_>,
    on_event: &mut dyn FnMut(u32),
    key: impl Fn(&Event<'_, P::Event>) -> String,
    apply: impl Fn(S, &Event<'_, P::Event>) -> S,
) -> Result<(), BatchError> {
    let mut memo: HashMap<String, S> = HashMap::new();
    let events = for_each_event::<P>(input, view, on_event, |event, view| {
        let key = key(event);
        let state = match memo.remove(&key) {
            Some(state) => state,
            None => view.get_or_default::<S>(&key)?,
        };
        memo.insert(key, apply(state, event));
        Ok(())
    })?;
    // Key order: the same writes in the same order on every run.
    let mut states: Vec<_> = memo.into_iter().collect();
    states.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (key, state) in states {
        view.put(&key, &state).map_err(|e| BatchError {
            index: events.saturating_sub(1),
            message: e.0,
        })?;
    }
    Ok(())
}

/// Why a batch stopped: the index of the event within the batch and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    pub index: u32,
    pub message: String,
}

/// Applies an encoded batch: decodes each event, skips those the manifest does
/// not want, calls `P::handle`. The same code runs in wasm and in the harness.
pub fn run_batch<P: Projection>(
    input: &[u8],
    backend: &mut dyn Backend,
    mut on_event: impl FnMut(u32),
) -> Result<(), BatchError> {
    P::apply_batch(input, &mut View::new(backend), &mut on_event)
}

/// Decodes each event of a batch, skips those `P` does not want, hands the
/// others to `handle`. Returns how many events the batch held.
fn for_each_event<P: Projection>(
    input: &[u8],
    view: &mut View<'_>,
    on_event: &mut dyn FnMut(u32),
    mut handle: impl FnMut(&Event<'_, P::Event>, &mut View<'_>) -> Result<()>,
) -> Result<u32, BatchError> {
    let fail = |index: u32, message: String| BatchError { index, message };
    let mut reader =
        abi::BatchReader::new(input).map_err(|e| fail(0, format!("malformed batch: {e}")))?;
    let mut index = 0u32;
    loop {
        let raw = match reader.next_event() {
            Ok(Some(raw)) => raw,
            Ok(None) => return Ok(index),
            Err(e) => return Err(fail(index, format!("malformed batch: {e}"))),
        };
        on_event(index);
        if wanted::<P>(raw.stream, raw.event_type) {
            let event = event::decode::<P::Event>(&raw).map_err(|e| {
                fail(
                    index,
                    format!("event of type {:?} does not decode: {e}", raw.event_type),
                )
            })?;
            handle(&event, view).map_err(|e| fail(index, e.0))?;
        }
        index += 1;
    }
}

fn wanted<P: Projection>(stream: &str, event_type: &str) -> bool {
    let category = stream.split('-').next().unwrap_or(stream);
    (P::EVENTS.is_empty() || P::EVENTS.contains(&event_type))
        && (P::CATEGORIES.is_empty() || P::CATEGORIES.contains(&category))
}

/// Turns a [`Projection`] into a kiln module: embeds the manifest (name, the
/// crate's `CARGO_PKG_VERSION`, event types, categories, ABI version) in the
/// `kiln-manifest` custom section and emits the ABI exports. On native targets
/// it only checks the manifest at compile time.
///
/// The manifest `static` is deliberately not `#[used]`: on wasm32 a
/// `link_section` static becomes the custom section either way, and `#[used]`
/// would also keep a copy in the data segment, putting the crate's version
/// into the module's logic (and so into its fingerprint).
#[macro_export]
macro_rules! export {
    ($projection:ty) => {
        const _: () = {
            const KILN_MANIFEST_LEN: usize = $crate::manifest::encoded_len(
                <$projection as $crate::Projection>::NAME,
                env!("CARGO_PKG_VERSION"),
                <$projection as $crate::Projection>::EVENTS,
                <$projection as $crate::Projection>::CATEGORIES,
                <$projection as $crate::Projection>::PER_STREAM,
            );
            #[cfg_attr(target_arch = "wasm32", unsafe(link_section = "kiln-manifest"))]
            #[allow(dead_code)]
            static KILN_MANIFEST: [u8; KILN_MANIFEST_LEN] =
                $crate::manifest::encode::<KILN_MANIFEST_LEN>(
                    <$projection as $crate::Projection>::NAME,
                    env!("CARGO_PKG_VERSION"),
                    <$projection as $crate::Projection>::EVENTS,
                    <$projection as $crate::Projection>::CATEGORIES,
                    <$projection as $crate::Projection>::PER_STREAM,
                );

            #[cfg(target_arch = "wasm32")]
            #[unsafe(no_mangle)]
            extern "C" fn kiln_alloc(len: i32) -> i32 {
                $crate::guest::alloc(len)
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(no_mangle)]
            extern "C" fn kiln_apply(ptr: i32, len: i32) -> i32 {
                $crate::guest::apply::<$projection>(ptr, len)
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::BatchWriter;

    #[derive(serde::Deserialize)]
    enum CounterEvent {
        Added { n: u64 },
    }

    #[derive(Default, Serialize, serde::Deserialize)]
    struct Total {
        n: u64,
        events: u64,
        last_position: u64,
    }

    struct Counter;

    impl StreamProjection for Counter {
        const NAME: &'static str = "counter";
        type Event = CounterEvent;
        type State = Total;

        fn apply(mut t: Total, e: &Event<'_, CounterEvent>) -> Total {
            let CounterEvent::Added { n } = &e.data;
            t.n += n;
            t.events += 1;
            t.last_position = e.position;
            t
        }
    }

    /// All streams of a category into one document: the keyed form.
    struct CategoryTotal;

    impl KeyedProjection for CategoryTotal {
        const NAME: &'static str = "category-total";
        type Event = CounterEvent;
        type State = Total;

        fn key(e: &Event<'_, CounterEvent>) -> String {
            e.category().to_string()
        }

        fn apply(t: Total, e: &Event<'_, CounterEvent>) -> Total {
            Counter::apply(t, e)
        }
    }

    /// Streams interleaved in one batch.
    const EVENTS: &[(&str, u64)] = &[
        ("c-a", 1),
        ("c-b", 2),
        ("c-a", 3),
        ("c-c", 4),
        ("c-b", 5),
        ("c-a", 6),
        ("c-a", 7),
    ];

    fn batch(events: &[(&str, u64)], first: u64) -> BatchWriter {
        let mut b = BatchWriter::new();
        for (i, (stream, n)) in events.iter().enumerate() {
            let data = format!("{{\"n\":{n}}}");
            let p = first + i as u64;
            b.push(
                p,
                p,
                p,
                stream,
                "Added",
                data.as_bytes(),
                std::iter::empty(),
            );
        }
        b
    }

    /// [`EVENTS`] in one batch, checked equal to applying them one by one.
    fn one_batch_as_one_by_one<P: Projection>() -> Harness<P> {
        let mut one_batch = Harness::<P>::new();
        one_batch
            .apply_encoded(batch(EVENTS, 1).bytes(), 1)
            .unwrap();
        let mut one_by_one = Harness::<P>::new();
        for (i, e) in EVENTS.iter().enumerate() {
            let p = i as u64 + 1;
            one_by_one
                .apply_encoded(batch(std::slice::from_ref(e), p).bytes(), p)
                .unwrap();
        }
        assert_eq!(one_batch.documents(), one_by_one.documents());
        one_batch
    }

    #[test]
    fn per_stream_batches_build_the_documents_event_by_event_does() {
        let mut one_batch = one_batch_as_one_by_one::<PerStream<Counter>>();
        let a: Total = one_batch.doc("c-a").unwrap();
        assert_eq!((a.n, a.events, a.last_position), (17, 4, 7));
        // A second batch starts from what the first one wrote.
        one_batch
            .apply_encoded(batch(&[("c-a", 10), ("c-c", 1)], 8).bytes(), 8)
            .unwrap();
        let a: Total = one_batch.doc("c-a").unwrap();
        assert_eq!((a.n, a.events, a.last_position), (27, 5, 8));
    }

    #[test]
    fn the_per_stream_form_is_partitionable_and_the_keyed_form_never_is() {
        assert!(manifest::of::<PerStream<Counter>>("1.0.0").per_stream);
        assert!(!manifest::of::<Keyed<CategoryTotal>>("1.0.0").per_stream);
    }

    #[test]
    fn keyed_batches_gather_streams_into_one_document_in_log_order() {
        let one_batch = one_batch_as_one_by_one::<Keyed<CategoryTotal>>();
        let c: Total = one_batch.doc("c").unwrap();
        assert_eq!((c.n, c.events, c.last_position), (28, 7, 7));
        assert_eq!(one_batch.documents().len(), 1);
    }

    #[test]
    fn a_failing_batch_writes_nothing_of_its_per_stream_states() {
        let mut h = Harness::<PerStream<Counter>>::new();
        h.apply_encoded(batch(&[("c-a", 1)], 1).bytes(), 1).unwrap();
        let mut b = batch(&[("c-a", 2), ("c-b", 3)], 2);
        b.push(4, 4, 4, "c-a", "Nope", b"{}", std::iter::empty());
        let e = h.apply_encoded(b.bytes(), 2).unwrap_err();
        assert_eq!(e.position, 4, "{e}");
        let a: Total = h.doc("c-a").unwrap();
        assert_eq!(a.n, 1, "the failed batch's states were not written");
        assert!(h.doc::<Total>("c-b").is_none());
    }
}
