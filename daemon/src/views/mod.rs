//! Views: the documents projections build, one RocksDB column family per
//! physical view, in a RocksDB instance of their own (separate from the log).
//!
//! A physical view is named by a [`ViewId`], `<name>-<major>_<minor>_<patch>`
//! (`users-1_2_0`, `users-2_0_0-rc_1`), ordered by name then semver. Each view's
//! checkpoint (the log position it has applied up to) lives in the default column
//! family under `checkpoint/<view-id>`; [`ViewStore::commit`] writes a batch's
//! documents **and** the checkpoint in one RocksDB write batch, so after a crash
//! a view is exactly at its checkpoint, never ahead or behind.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub mod diff;
pub mod digest;
pub mod owners;
pub mod snapshot;

use rocksdb::{DBWithThreadMode, MultiThreaded, Options, WriteBatch};
use semver::Version;

use crate::store::Position;

type Db = DBWithThreadMode<MultiThreaded>;

const DEFAULT_CF: &str = "default";
const CHECKPOINT_PREFIX: &str = "checkpoint/";
/// Dead letters: `parked/<view-id>/<position, u64 big-endian>` → the record
/// the lifecycle encodes (the event's original bytes and why it was parked).
const PARKED_PREFIX: &str = "parked/";
/// A partitioned warm-up's checkpoints: `partition/<view-id>/<index, u32
/// big-endian>` → partitions (u32 BE) and checkpoint (u64 BE). While they
/// exist the view's own checkpoint is the position the warm-up split at,
/// followed by [`SPLIT_TAG`] (9 bytes: a kiln that predates partitions refuses
/// the view as corrupt rather than replaying some partitions' events twice).
const PARTITION_PREFIX: &str = "partition/";
const SPLIT_TAG: u8 = b'P';
/// Longest view name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What can go wrong with view ids and the view store.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("invalid view name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid view id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("invalid version {version:?} for view {name:?}: {reason}")]
    InvalidVersion {
        name: String,
        version: String,
        reason: String,
    },
    #[error("view {0} does not exist")]
    NotFound(ViewId),
    #[error("view {0} already exists")]
    AlreadyExists(ViewId),
    #[error("view {0} is warming in partitions: its documents stand at no single position yet")]
    Partitioned(ViewId),
    #[error("view {0} is not empty: a snapshot goes only into a fresh view")]
    NotEmpty(ViewId),
    #[error("view {view}: snapshot refused: {reason}")]
    DigestMismatch { view: ViewId, reason: String },
    #[error("view {view}: corrupt checkpoint: {reason}")]
    CorruptCheckpoint { view: ViewId, reason: String },
    #[error("{op}: {source}")]
    Storage {
        op: String,
        #[source]
        source: rocksdb::Error,
    },
}

fn storage(op: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> ViewError {
    move |source| ViewError::Storage {
        op: op.into(),
        source,
    }
}

/// The id of one physical view: a projection's name and its module's version.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ViewId {
    name: String,
    version: Version,
}

impl ViewId {
    /// Checks the name and version; build metadata (`+...`) is refused because
    /// it does not order versions and would give two ids one precedence.
    pub fn new(name: &str, version: Version) -> Result<Self, ViewError> {
        check_name(name)?;
        if !version.build.is_empty() {
            return Err(ViewError::InvalidVersion {
                name: name.to_string(),
                version: version.to_string(),
                reason: "build metadata (+...) is not allowed in a view version".into(),
            });
        }
        Ok(ViewId {
            name: name.to_string(),
            version,
        })
    }

    /// A view id from a name and a version string, e.g. `("users", "1.2.0")`.
    pub fn from_parts(name: &str, version: &str) -> Result<Self, ViewError> {
        let v = Version::parse(version).map_err(|e| ViewError::InvalidVersion {
            name: name.to_string(),
            version: version.to_string(),
            reason: e.to_string(),
        })?;
        ViewId::new(name, v)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &Version {
        &self.version
    }
}

/// Names are `-`-separated segments of ASCII letters, digits and `_`, each
/// starting with a letter, so the version in an id starts at the first `-`
/// followed by a digit.
pub fn check_name(name: &str) -> Result<(), ViewError> {
    let bad = |reason: &str| {
        Err(ViewError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad(&format!("it must be 1 to {MAX_NAME_LEN} bytes"));
    }
    for segment in name.split('-') {
        if !segment.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return bad("each '-'-separated part must start with an ASCII letter");
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return bad(&format!(
                "character {c:?} is not allowed (use ASCII letters, digits, _ and -)"
            ));
        }
    }
    Ok(())
}

impl fmt::Display for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.version;
        write!(f, "{}-{}_{}_{}", self.name, v.major, v.minor, v.patch)?;
        if !v.pre.is_empty() {
            write!(f, "-{}", v.pre.as_str().replace('.', "_"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ViewId({self})")
    }
}

impl FromStr for ViewId {
    type Err = ViewError;

    fn from_str(id: &str) -> Result<Self, ViewError> {
        let invalid = |reason: &str| ViewError::InvalidId {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let split = id
            .match_indices('-')
            .map(|(i, _)| i)
            .find(|i| id[i + 1..].starts_with(|c: char| c.is_ascii_digit()))
            .ok_or_else(|| invalid("expected <name>-<major>_<minor>_<patch>"))?;
        let (name, version) = (&id[..split], &id[split + 1..]);
        let (core, pre) = match version.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (version, None),
        };
        let mut text = core.replace('_', ".");
        if let Some(pre) = pre {
            text.push('-');
            text.push_str(&pre.replace('_', "."));
        }
        let version = Version::parse(&text).map_err(|e| invalid(&format!("bad version: {e}")))?;
        let view = ViewId::new(name, version)?;
        if view.to_string() != id {
            return Err(invalid("not in canonical form (e.g. users-1_2_0)"));
        }
        Ok(view)
    }
}

impl PartialOrd for ViewId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ViewId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.name
            .cmp(&other.name)
            .then_with(|| self.version.cmp_precedence(&other.version))
    }
}

/// Documents as (key, document) pairs, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A batch's document writes: key → new document, or `None` for a delete.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Reads a view's committed documents (what a projection's `get`/`scan` fall
/// back to after the batch's own writes).
pub trait DocumentSource: Send {
    /// Copies the document at `key` into `out` (cleared first); `false` if absent.
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool, ViewError>;
    /// Calls `each` with every document whose key starts with `prefix`, in key
    /// order, until it breaks. Nothing is copied: the slices live for the call.
    fn scan_each(&self, prefix: &[u8], each: &mut ScanVisitor<'_>) -> Result<(), ViewError>;
}

/// What [`DocumentSource::scan_each`] calls per document: key, document.
pub type ScanVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// The JSON documents kiln stores and serves: any JSON value serde_json parses
/// ([`serde_json::Value`] is what readers parse them into), so with its limits
/// (nesting at most 128 deep, numbers within `f64`, strings UTF-8 without lone
/// surrogates). Checked without building the value.
pub fn check_json(bytes: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<JsonCheck>(bytes).map(|_| ())
}

/// Visits a JSON value the way [`serde_json::Value`] does (`deserialize_any`,
/// so every string, number and nesting level is checked), keeping nothing.
struct JsonCheck;

impl<'de> serde::Deserialize<'de> for JsonCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonCheck)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonCheck {
    type Value = JsonCheck;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_i64<E>(self, _: i64) -> Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_u64<E>(self, _: u64) -> Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<JsonCheck, E> {
        if v.is_finite() {
            Ok(JsonCheck)
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_unit<E>(self) -> Result<JsonCheck, E> {
        Ok(JsonCheck)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonCheck, A::Error> {
        while seq.next_element::<JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonCheck, A::Error> {
        while map.next_entry::<JsonCheck, JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
}

/// Longest document key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// The one rule for document keys, on the host (what a projection may
/// write) and in the API (what a client may ask for, a listing's `after`):
/// 1 to [`MAX_KEY_LEN`] bytes of UTF-8 without control characters. So every
/// key a listing returns as `next` is one it takes back.
pub fn check_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "document key of {} bytes (must be 1 to {MAX_KEY_LEN})",
            key.len()
        ));
    }
    let text = std::str::from_utf8(key).map_err(|e| format!("document key is not UTF-8: {e}"))?;
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "document key {text:?} contains the control character {c:?}"
        ));
    }
    Ok(())
}

/// The views database. Cheap to clone.
#[derive(Clone)]
pub struct ViewStore {
    db: Arc<Db>,
    path: PathBuf,
    /// Each view's read cache ([`DocCache`]), kept current by every write
    /// of documents below.
    caches: Arc<std::sync::Mutex<std::collections::HashMap<ViewId, DocCache>>>,
    /// Held while a split warm-up's partition checks and commits its claims
    /// (see [`owners`]).
    claims: Arc<std::sync::Mutex<()>>,
}

impl ViewStore {
    /// Opens (or creates) the views database at `dir`, with every view in it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ViewError> {
        let path = dir.as_ref().to_path_buf();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = match Db::list_cf(&opts, &path) {
            Ok(cfs) => cfs,
            Err(_) => vec![DEFAULT_CF.to_string()],
        };
        let db = Db::open_cf(&opts, &path, cfs).map_err(storage(format!(
            "opening the views database at {}",
            path.display()
        )))?;
        Ok(ViewStore {
            db: Arc::new(db),
            path,
            caches: Arc::default(),
            claims: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A RocksDB checkpoint of every view in `dir` (which must not exist):
    /// each view's documents with the checkpoint they were committed with,
    /// taken while views go on applying batches.
    pub fn checkpoint_to(&self, dir: &Path) -> Result<(), ViewError> {
        rocksdb::checkpoint::Checkpoint::new(&*self.db)
            .and_then(|c| c.create_checkpoint(dir))
            .map_err(storage(format!("copying the views into {}", dir.display())))
    }

    /// How many handles (clones, sources) share this database.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.db)
    }

    /// Every view in the database, in [`ViewId`] order. Column families whose
    /// names are not view ids are skipped.
    pub fn views(&self) -> Result<Vec<ViewId>, ViewError> {
        let names =
            Db::list_cf(&Options::default(), &self.path).map_err(storage("listing the views"))?;
        let mut ids: Vec<ViewId> = names.iter().filter_map(|n| n.parse().ok()).collect();
        ids.sort();
        Ok(ids)
    }

    pub fn exists(&self, view: &ViewId) -> bool {
        self.db.cf_handle(&view.to_string()).is_some()
    }

    /// Creates an empty view at checkpoint 0.
    pub fn create(&self, view: &ViewId) -> Result<(), ViewError> {
        if self.exists(view) {
            return Err(ViewError::AlreadyExists(view.clone()));
        }
        self.db
            .create_cf(view.to_string(), &Options::default())
            .map_err(storage(format!("creating view {view}")))
    }

    /// Creates the view unless it exists.
    pub fn ensure(&self, view: &ViewId) -> Result<(), ViewError> {
        match self.create(view) {
            Err(ViewError::AlreadyExists(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drops the view's column family, its checkpoint and its dead letters.
    pub fn drop_view(&self, view: &ViewId) -> Result<(), ViewError> {
        if !self.exists(view) {
            return Err(ViewError::NotFound(view.clone()));
        }
        let mut batch = WriteBatch::default();
        batch.delete(checkpoint_key(view));
        let (from, to) = parked_range(view);
        batch.delete_range(from, to);
        let (from, to) = partition_range(view);
        batch.delete_range(from, to);
        Self::forget_claims(&mut batch, view);
        batch.delete(snapshot::marker_key(view));
        batch.delete(snapshot::lineage_key(view));
        self.db.write(batch).map_err(storage(format!(
            "deleting the checkpoint and dead letters of {view}"
        )))?;
        self.forget_cache(view);
        self.db
            .drop_cf(&view.to_string())
            .map_err(storage(format!("dropping view {view}")))
    }

    /// The read cache of `view`'s documents, shared by every reader of it
    /// in this process.
    fn cache_of(&self, view: &ViewId) -> DocCache {
        match self.caches.lock() {
            Ok(mut caches) => caches.entry(view.clone()).or_default().clone(),
            // A poisoned map: a cache of its own that nothing else fills.
            Err(_) => DocCache::default(),
        }
    }

    fn forget_cache(&self, view: &ViewId) {
        if let Ok(mut caches) = self.caches.lock()
            && let Some(cache) = caches.remove(view)
        {
            cache.clear();
        }
    }

    /// After `writes` to `view` were committed: its cache says the same.
    fn cached_commit(&self, view: &ViewId, writes: &Writes) {
        if let Ok(caches) = self.caches.lock()
            && let Some(cache) = caches.get(view)
        {
            cache.committed(writes);
        }
    }

    /// The position the view has applied up to (0 for a fresh view). While
    /// a partitioned warm-up runs, the position it split at: every event up
    /// to it is applied, some after it too (see [`Self::partitions`]).
    pub fn checkpoint(&self, view: &ViewId) -> Result<Position, ViewError> {
        if !self.exists(view) {
            return Err(ViewError::NotFound(view.clone()));
        }
        let got = self
            .db
            .get_pinned(checkpoint_key(view))
            .map_err(storage(format!("reading the checkpoint of {view}")))?;
        decode_checkpoint(view, got.as_deref())
    }

    /// The checkpoint of `slot`: the view's, or one warm-up partition's.
    pub fn checkpoint_at(&self, view: &ViewId, slot: Slot) -> Result<Position, ViewError> {
        let Slot::Partition { index, of } = slot else {
            return self.checkpoint(view);
        };
        self.cf(view)?;
        let corrupt = |reason: String| ViewError::CorruptCheckpoint {
            view: view.clone(),
            reason,
        };
        let got = self
            .db
            .get_pinned(partition_key(view, index))
            .map_err(storage(format!("reading partition {index} of {view}")))?
            .ok_or_else(|| corrupt(format!("partition {index} of {of} has no checkpoint")))?;
        match decode_partition(&got) {
            Some((n, position)) if n == of => Ok(position),
            _ => Err(corrupt(format!(
                "partition {index}: not a checkpoint of one of {of} partitions"
            ))),
        }
    }

    /// The checkpoints of the view's partitioned warm-up, by partition
    /// index, or `None` when it has none. A set that is not whole (a missing
    /// index, disagreeing partition counts) is refused as corrupt: which
    /// events were applied cannot be told then.
    pub fn partitions(&self, view: &ViewId) -> Result<Option<Vec<Position>>, ViewError> {
        self.cf(view)?;
        let corrupt = |reason: String| ViewError::CorruptCheckpoint {
            view: view.clone(),
            reason,
        };
        let (from, to) = partition_range(view);
        let mut it = self.db.raw_iterator();
        it.seek(&from);
        let mut found: Vec<(u32, u32, Position)> = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= to.as_slice() {
                break;
            }
            let index = k
                .get(from.len()..)
                .and_then(|i| <[u8; 4]>::try_from(i).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| corrupt(format!("a partition key of {} bytes", k.len())))?;
            let (of, position) = decode_partition(v)
                .ok_or_else(|| corrupt(format!("partition {index}: {} bytes", v.len())))?;
            found.push((index, of, position));
            it.next();
        }
        it.status()
            .map_err(storage(format!("reading the partitions of {view}")))?;
        if found.is_empty() {
            return Ok(None);
        }
        let of = found[0].1;
        let whole = found.len() == of as usize
            && found
                .iter()
                .enumerate()
                .all(|(i, &(index, n, _))| index as usize == i && n == of);
        if !whole {
            return Err(corrupt(format!(
                "{} partition checkpoints, not one for each of {of} partitions",
                found.len()
            )));
        }
        Ok(Some(found.into_iter().map(|(_, _, p)| p).collect()))
    }

    /// Splits the view's warm-up into `of` partitions, each at the view's
    /// checkpoint, in one write batch.
    pub fn split(&self, view: &ViewId, of: u32) -> Result<Position, ViewError> {
        self.cf(view)?;
        let at = self.checkpoint(view)?;
        let mut batch = WriteBatch::default();
        for index in 0..of {
            batch.put(partition_key(view, index), encode_partition(of, at));
        }
        let mut tagged = at.to_be_bytes().to_vec();
        tagged.push(SPLIT_TAG);
        batch.put(checkpoint_key(view), tagged);
        self.db.write(batch).map_err(storage(format!(
            "splitting the warm-up of {view} into {of} partitions"
        )))?;
        Ok(at)
    }

    /// Ends a partitioned warm-up whose partitions all stand at `at`: the
    /// view's checkpoint becomes `at` and the partitions' go, in one write
    /// batch. Refused when a partition stands elsewhere.
    pub fn merge(&self, view: &ViewId, at: Position) -> Result<(), ViewError> {
        let Some(all) = self.partitions(view)? else {
            return Err(ViewError::CorruptCheckpoint {
                view: view.clone(),
                reason: "merging a warm-up that has no partitions".into(),
            });
        };
        if let Some((index, p)) = all.iter().enumerate().find(|(_, p)| **p != at) {
            return Err(ViewError::CorruptCheckpoint {
                view: view.clone(),
                reason: format!("merging at {at}, but partition {index} stands at {p}"),
            });
        }
        let mut batch = WriteBatch::default();
        for (from, to) in [partition_range(view), owners::owner_range(view)] {
            batch.delete_range(from, to);
        }
        batch.put(checkpoint_key(view), at.to_be_bytes());
        self.db
            .write(batch)
            .map_err(storage(format!("merging the partitions of {view} at {at}")))
    }

    /// One document.
    pub fn get(&self, view: &ViewId, key: &[u8]) -> Result<Option<Vec<u8>>, ViewError> {
        let cf = self.cf(view)?;
        self.db
            .get_cf(&cf, key)
            .map_err(storage(format!("reading {view}")))
    }

    /// Up to `limit` documents whose keys start with `prefix`, in key order,
    /// starting after `start_after` when given (for paging).
    pub fn scan(
        &self,
        view: &ViewId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, ViewError> {
        self.scan_bounded(view, prefix, start_after, limit, usize::MAX)
    }

    /// [`Self::scan`] that also stops once the entries it holds reach
    /// `max_bytes` (keys and values; always at least one entry).
    pub fn scan_bounded(
        &self,
        view: &ViewId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Entries, ViewError> {
        let cf = self.cf(view)?;
        let mut it = self.db.raw_iterator_cf(&cf);
        match start_after {
            Some(after) if after >= prefix => {
                it.seek(after);
                if it.key() == Some(after) {
                    it.next();
                }
            }
            _ => it.seek(prefix),
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < limit && (bytes < max_bytes || out.is_empty()) {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(prefix) {
                break;
            }
            bytes += k.len() + v.len();
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status().map_err(storage(format!("scanning {view}")))?;
        Ok(out)
    }

    /// Writes a batch's documents and the view's new checkpoint in **one**
    /// RocksDB write batch: both land or neither does.
    pub fn commit(
        &self,
        view: &ViewId,
        writes: &Writes,
        checkpoint: Position,
    ) -> Result<(), ViewError> {
        self.commit_at(view, Slot::View, writes, checkpoint)
    }

    /// [`Self::commit`] with the checkpoint of `slot`.
    pub fn commit_at(
        &self,
        view: &ViewId,
        slot: Slot,
        writes: &Writes,
        checkpoint: Position,
    ) -> Result<(), ViewError> {
        let mut batch = self.documents_batch(view, writes)?;
        put_checkpoint(&mut batch, view, slot, checkpoint);
        self.db.write(batch).map_err(storage(format!(
            "committing {view} at position {checkpoint}{}",
            slot.describe()
        )))?;
        self.cached_commit(view, writes);
        Ok(())
    }

    /// Parks the event at `position` (its dead-letter `record`) and moves the
    /// checkpoint of `slot` to it, in one write batch: a crash parks it and
    /// skips it, or does neither.
    pub fn park(
        &self,
        view: &ViewId,
        slot: Slot,
        position: Position,
        record: &[u8],
    ) -> Result<(), ViewError> {
        self.cf(view)?;
        let mut batch = WriteBatch::default();
        batch.put(parked_key(view, position), record);
        put_checkpoint(&mut batch, view, slot, position);
        self.db.write(batch).map_err(storage(format!(
            "parking position {position} of {view}{}",
            slot.describe()
        )))
    }

    /// Replaces the dead-letter record at `position` (e.g. a newer error).
    pub fn update_parked(
        &self,
        view: &ViewId,
        position: Position,
        record: &[u8],
    ) -> Result<(), ViewError> {
        self.db
            .put(parked_key(view, position), record)
            .map_err(storage(format!(
                "updating parked position {position} of {view}"
            )))
    }

    /// Commits a retried parked event: its documents, and its removal from the
    /// dead letters, in one write batch (the checkpoint does not move). A crash
    /// leaves it parked with nothing applied, or applied and gone: each parked
    /// event is applied at most once.
    pub fn commit_unparked(
        &self,
        view: &ViewId,
        writes: &Writes,
        position: Position,
    ) -> Result<(), ViewError> {
        let mut batch = self.documents_batch(view, writes)?;
        batch.delete(parked_key(view, position));
        self.db.write(batch).map_err(storage(format!(
            "committing parked position {position} of {view}"
        )))?;
        self.cached_commit(view, writes);
        Ok(())
    }

    /// The view's dead-letter records, in position order.
    pub fn parked(&self, view: &ViewId) -> Result<Vec<(Position, Vec<u8>)>, ViewError> {
        read_parked(view, self.db.raw_iterator())
    }

    /// A write batch holding `writes` to `view`'s documents.
    fn documents_batch(&self, view: &ViewId, writes: &Writes) -> Result<WriteBatch, ViewError> {
        let cf = self.cf(view)?;
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.put_cf(&cf, k, v),
                None => batch.delete_cf(&cf, k),
            }
        }
        Ok(batch)
    }

    /// A [`DocumentSource`] reading `view`'s committed documents.
    pub fn source(&self, view: &ViewId) -> Result<ViewSource, ViewError> {
        self.cf(view)?;
        Ok(ViewSource {
            store: self.clone(),
            cf: view.to_string(),
            view: view.clone(),
            cache: self.cache_of(view),
        })
    }

    fn cf(&self, view: &ViewId) -> Result<Arc<rocksdb::BoundColumnFamily<'_>>, ViewError> {
        self.db
            .cf_handle(&view.to_string())
            .ok_or_else(|| ViewError::NotFound(view.clone()))
    }

    /// A document of the column family named `cf` copied into `out` (the hot
    /// path of projections' reads: no view id formatting, no allocation).
    fn get_in(
        &self,
        cf: &str,
        view: &ViewId,
        key: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<bool, ViewError> {
        let handle = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| ViewError::NotFound(view.clone()))?;
        let got = self
            .db
            .get_pinned_cf(&handle, key)
            .map_err(storage(format!("reading {view}")))?;
        out.clear();
        match got {
            Some(v) => {
                out.extend_from_slice(&v);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// A stored checkpoint (none: 0, a fresh view).
fn decode_checkpoint(view: &ViewId, stored: Option<&[u8]>) -> Result<Position, ViewError> {
    let Some(v) = stored else { return Ok(0) };
    match (<[u8; 8]>::try_from(&v[..v.len().min(8)]), v.get(8..)) {
        (Ok(p), Some([] | [SPLIT_TAG])) => Ok(u64::from_be_bytes(p)),
        _ => Err(ViewError::CorruptCheckpoint {
            view: view.clone(),
            reason: format!("{} bytes, expected 8 (or 9 while partitioned)", v.len()),
        }),
    }
}

fn checkpoint_key(view: &ViewId) -> Vec<u8> {
    format!("{CHECKPOINT_PREFIX}{view}").into_bytes()
}

/// Where a committer's checkpoint lives: the view's own, or one partition's
/// of a partitioned warm-up (see [`ViewStore::partitions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    View,
    Partition { index: u32, of: u32 },
}

impl Slot {
    fn describe(self) -> String {
        match self {
            Slot::View => String::new(),
            Slot::Partition { index, of } => format!(" (warm-up partition {index} of {of})"),
        }
    }
}

fn put_checkpoint(batch: &mut WriteBatch, view: &ViewId, slot: Slot, checkpoint: Position) {
    match slot {
        Slot::View => batch.put(checkpoint_key(view), checkpoint.to_be_bytes()),
        Slot::Partition { index, of } => {
            batch.put(partition_key(view, index), encode_partition(of, checkpoint))
        }
    }
}

fn partition_key(view: &ViewId, index: u32) -> Vec<u8> {
    per_view_key(PARTITION_PREFIX, view, &index.to_be_bytes())
}

/// `[from, to)` of a view's partition keys.
fn partition_range(view: &ViewId) -> (Vec<u8>, Vec<u8>) {
    per_view_range(PARTITION_PREFIX, view)
}

/// `<prefix><view>/<suffix>`: one record of a view's in the default family.
fn per_view_key(prefix: &str, view: &ViewId, suffix: &[u8]) -> Vec<u8> {
    let mut k = format!("{prefix}{view}/").into_bytes();
    k.extend_from_slice(suffix);
    k
}

/// `[from, to)` of the keys [`per_view_key`] gives `view` (`/` + 1 is `0`).
fn per_view_range(prefix: &str, view: &ViewId) -> (Vec<u8>, Vec<u8>) {
    (
        format!("{prefix}{view}/").into_bytes(),
        format!("{prefix}{view}0").into_bytes(),
    )
}

fn encode_partition(of: u32, checkpoint: Position) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&of.to_be_bytes());
    v[4..].copy_from_slice(&checkpoint.to_be_bytes());
    v
}

fn decode_partition(v: &[u8]) -> Option<(u32, Position)> {
    let of = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
    let at = u64::from_be_bytes(v.get(4..)?.try_into().ok()?);
    Some((of, at))
}

/// A view's dead letters, read through `it` (the database's, or a snapshot's).
fn read_parked(
    view: &ViewId,
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, Db>,
) -> Result<Vec<(Position, Vec<u8>)>, ViewError> {
    let (from, to) = parked_range(view);
    it.seek(&from);
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k >= to.as_slice() {
            break;
        }
        let position = k
            .get(from.len()..)
            .and_then(|p| <[u8; 8]>::try_from(p).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| ViewError::CorruptCheckpoint {
                view: view.clone(),
                reason: format!("a dead-letter key of {} bytes", k.len()),
            })?;
        out.push((position, v.to_vec()));
        it.next();
    }
    it.status()
        .map_err(storage(format!("reading the dead letters of {view}")))?;
    Ok(out)
}

fn parked_key(view: &ViewId, position: Position) -> Vec<u8> {
    per_view_key(PARKED_PREFIX, view, &position.to_be_bytes())
}

/// `[from, to)` of a view's dead-letter keys.
fn parked_range(view: &ViewId) -> (Vec<u8>, Vec<u8>) {
    per_view_range(PARKED_PREFIX, view)
}

/// One view's committed documents, as a [`DocumentSource`], read through
/// the view's [`DocCache`].
pub struct ViewSource {
    store: ViewStore,
    cf: String,
    view: ViewId,
    cache: DocCache,
}

/// Most bytes of documents (keys included) one view's [`DocCache`] holds;
/// past it the cache starts over empty.
pub const DOC_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The committed documents (and known absences) a view's projection read or
/// wrote lately, so the next batches read them from memory instead of
/// RocksDB: in a log whose streams interleave, each batch touches each
/// document once and a point read per document is most of the view's cost.
/// The [`ViewStore`] keeps one per view and tells it of every write of
/// documents once RocksDB has it ([`ViewStore::commit`],
/// [`ViewStore::commit_unparked`]); dropping the view drops it. So it never
/// holds what RocksDB does not.
#[derive(Clone, Default)]
pub struct DocCache(Arc<std::sync::Mutex<CacheEntries>>);

#[derive(Default)]
struct CacheEntries {
    docs: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
    /// Bumped by every commit: a read from RocksDB is remembered only if no
    /// commit came between it and its remembering.
    generation: u64,
}

impl CacheEntries {
    fn insert(&mut self, key: &[u8], doc: Option<&[u8]>) {
        let size = key.len() + doc.map_or(0, <[u8]>::len) + 32;
        if self.bytes + size > DOC_CACHE_BYTES {
            self.docs.clear();
            self.bytes = 0;
        }
        if let Some(old) = self.docs.insert(key.to_vec(), doc.map(<[u8]>::to_vec)) {
            self.bytes = self
                .bytes
                .saturating_sub(key.len() + old.map_or(0, |d| d.len()) + 32);
        }
        self.bytes += size;
    }
}

impl DocCache {
    /// `Some(found)` when `key` is cached (its document copied into `out`).
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Option<bool> {
        let entries = self.0.lock().ok()?;
        let cached = entries.docs.get(key)?;
        out.clear();
        Some(match cached {
            Some(doc) => {
                out.extend_from_slice(doc);
                true
            }
            None => false,
        })
    }

    fn generation(&self) -> u64 {
        self.0.lock().map_or(0, |e| e.generation)
    }

    /// Remembers what RocksDB answered for `key`, unless a commit came after
    /// the read (at `generation`).
    fn remember(&self, key: &[u8], doc: Option<&[u8]>, generation: u64) {
        if let Ok(mut entries) = self.0.lock()
            && entries.generation == generation
        {
            entries.insert(key, doc);
        }
    }

    fn clear(&self) {
        if let Ok(mut entries) = self.0.lock() {
            entries.generation += 1;
            entries.docs.clear();
            entries.bytes = 0;
        }
    }

    /// A batch's writes, committed: the cache now says what RocksDB says.
    fn committed(&self, writes: &Writes) {
        if let Ok(mut entries) = self.0.lock() {
            entries.generation += 1;
            for (k, v) in writes {
                entries.insert(k, v.as_deref());
            }
        }
    }
}

impl DocumentSource for ViewSource {
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool, ViewError> {
        if let Some(found) = self.cache.get_into(key, out) {
            return Ok(found);
        }
        let generation = self.cache.generation();
        let found = self.store.get_in(&self.cf, &self.view, key, out)?;
        self.cache
            .remember(key, found.then_some(out.as_slice()), generation);
        Ok(found)
    }

    fn scan_each(&self, prefix: &[u8], each: &mut ScanVisitor<'_>) -> Result<(), ViewError> {
        let handle = self
            .store
            .db
            .cf_handle(&self.cf)
            .ok_or_else(|| ViewError::NotFound(self.view.clone()))?;
        let mut it = self.store.db.raw_iterator_cf(&handle);
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) || each(k, v).is_break() {
                break;
            }
            it.next();
        }
        it.status()
            .map_err(storage(format!("scanning {}", self.view)))
    }
}

/// Documents in memory (offline runs, tests), as a [`DocumentSource`].
#[derive(Default, Clone)]
pub struct MemoryDocuments(pub BTreeMap<Vec<u8>, Vec<u8>>);

impl MemoryDocuments {
    /// Applies a batch's writes.
    pub fn apply(&mut self, writes: Writes) {
        for (k, v) in writes {
            match v {
                Some(v) => self.0.insert(k, v),
                None => self.0.remove(&k),
            };
        }
    }
}

/// Copies `found` into `out`; whether there was a document.
fn copy_out(found: Option<&Vec<u8>>, out: &mut Vec<u8>) -> bool {
    out.clear();
    match found {
        Some(v) => {
            out.extend_from_slice(v);
            true
        }
        None => false,
    }
}

impl DocumentSource for MemoryDocuments {
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool, ViewError> {
        Ok(copy_out(self.0.get(key), out))
    }

    fn scan_each(&self, prefix: &[u8], each: &mut ScanVisitor<'_>) -> Result<(), ViewError> {
        let from = (
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        );
        for (k, v) in self.0.range::<[u8], _>(from) {
            if !k.starts_with(prefix) || each(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }
}

/// In-memory documents shared between an [`Instance`](crate::runtime::Instance)
/// (which reads them) and its driver (which applies each batch's writes).
#[derive(Default, Clone)]
pub struct SharedDocuments(pub Arc<std::sync::RwLock<MemoryDocuments>>);

impl SharedDocuments {
    /// Applies a batch's writes.
    pub fn apply(&self, writes: Writes) {
        if let Ok(mut docs) = self.0.write() {
            docs.apply(writes);
        }
    }

    /// A copy of every document.
    pub fn snapshot(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.0.read().map(|d| d.0.clone()).unwrap_or_default()
    }
}

impl DocumentSource for SharedDocuments {
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) -> Result<bool, ViewError> {
        match self.0.read() {
            Ok(d) => Ok(copy_out(d.0.get(key), out)),
            Err(_) => Ok(copy_out(None, out)),
        }
    }

    fn scan_each(&self, prefix: &[u8], each: &mut ScanVisitor<'_>) -> Result<(), ViewError> {
        match self.0.read() {
            Ok(d) => d.scan_each(prefix, each),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_ids_round_trip_and_order_by_semver() {
        for (name, version, id) in [
            ("users", "1.2.0", "users-1_2_0"),
            ("user-profiles", "10.0.3", "user-profiles-10_0_3"),
            ("users", "2.0.0-rc.1", "users-2_0_0-rc_1"),
            ("users", "2.0.0-alpha-x.3", "users-2_0_0-alpha-x_3"),
        ] {
            let v = ViewId::from_parts(name, version).unwrap();
            assert_eq!(v.to_string(), id);
            let back: ViewId = id.parse().unwrap();
            assert_eq!(back, v);
            assert_eq!(back.version().to_string(), version);
        }
        let mut ids: Vec<ViewId> = [
            "users-1_10_0",
            "users-1_2_0",
            "users-1_10_0-rc_1",
            "accounts-9_0_0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        ids.sort();
        let sorted: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(
            sorted,
            [
                "accounts-9_0_0",
                "users-1_2_0",
                "users-1_10_0-rc_1",
                "users-1_10_0"
            ]
        );
    }

    #[test]
    fn bad_names_and_ids_are_refused_with_reasons() {
        for bad in ["", "1users", "users-2x", "us ers", "users.v2"] {
            let e = check_name(bad).unwrap_err();
            assert!(matches!(e, ViewError::InvalidName { .. }), "{bad:?}: {e}");
        }
        for bad in [
            "users",
            "users-1_2",
            "users-01_2_0",
            "users-1.2.0",
            "-1_0_0",
        ] {
            assert!(bad.parse::<ViewId>().is_err(), "{bad:?} parsed");
        }
        let e = ViewId::from_parts("users", "1.0.0+build5").unwrap_err();
        assert!(e.to_string().contains("build metadata"), "{e}");
    }

    #[test]
    fn one_key_rule_for_writers_and_readers() {
        for ok in ["k", "user-42", "ünïcode key", &"x".repeat(MAX_KEY_LEN)] {
            assert_eq!(check_key(ok.as_bytes()), Ok(()), "{ok:?}");
        }
        let long = "x".repeat(MAX_KEY_LEN + 1);
        for (bad, why) in [
            (&b""[..], "bytes"),
            (long.as_bytes(), "bytes"),
            (&b"a\x01b"[..], "control character"),
            (&b"tab\there"[..], "control character"),
            (&b"\xff"[..], "UTF-8"),
        ] {
            let e = check_key(bad).expect_err("refused");
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    /// The read cache says what RocksDB says: commits (and commits of
    /// parked events) update it, a read raced by a commit is not
    /// remembered, and dropping the view forgets it.
    #[test]
    fn the_read_cache_follows_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let views = ViewStore::open(dir.path()).unwrap();
        let v: ViewId = "c-1_0_0".parse().unwrap();
        views.create(&v).unwrap();
        let source = views.source(&v).unwrap();
        let mut out = Vec::new();
        let write = |k: &str, d: Option<&str>| -> Writes {
            [(k.as_bytes().to_vec(), d.map(|d| d.as_bytes().to_vec()))].into()
        };
        assert!(
            !source.get_into(b"k", &mut out).unwrap(),
            "absent, remembered"
        );
        views.commit(&v, &write("k", Some("1")), 1).unwrap();
        assert!(source.get_into(b"k", &mut out).unwrap());
        assert_eq!(out, b"1");
        views
            .commit_unparked(&v, &write("k", Some("2")), 2)
            .unwrap();
        source.get_into(b"k", &mut out).unwrap();
        assert_eq!(out, b"2", "a retried parked event's write");
        views.commit(&v, &write("k", None), 3).unwrap();
        assert!(!source.get_into(b"k", &mut out).unwrap(), "deleted");
        // A read from RocksDB that a commit overtook is not remembered.
        let cache = views.cache_of(&v);
        let before = cache.generation();
        views.commit(&v, &write("j", Some("new")), 4).unwrap();
        cache.remember(b"j", Some(b"old"), before);
        source.get_into(b"j", &mut out).unwrap();
        assert_eq!(out, b"new");
        // Dropped and created again: nothing of the old view is cached.
        views.drop_view(&v).unwrap();
        views.create(&v).unwrap();
        let source = views.source(&v).unwrap();
        assert!(!source.get_into(b"j", &mut out).unwrap());
    }

    #[test]
    fn documents_are_checked_as_readers_parse_them() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let cases: Vec<Vec<u8>> = vec![
            br#"{"a":[1,2.5,-3e10,true,null,"x\u00e9"]}"#.to_vec(),
            b"1e99999".to_vec(),
            b"-1e400".to_vec(),
            br#""\ud800""#.to_vec(),
            br#""\ud83d\ude00""#.to_vec(),
            b"\"\xff\xfe\"".to_vec(),
            deep(100).into_bytes(),
            deep(128).into_bytes(),
            deep(129).into_bytes(),
            deep(100_000).into_bytes(),
            br#"{"k":1} trailing"#.to_vec(),
            b"".to_vec(),
            br#"{"\ud800":1}"#.to_vec(),
            b"18446744073709551616".to_vec(),
        ];
        for bytes in cases {
            let reader = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
            assert_eq!(
                check_json(&bytes).is_ok(),
                reader,
                "{:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            );
        }
        assert!(check_json(b"1e99999").is_err());
        assert!(check_json(deep(100_000).as_bytes()).is_err());
        assert!(check_json(br#""\ud800""#).is_err());
        assert!(check_json(br#"{"ok":[1,"two"]}"#).is_ok());
    }
}
