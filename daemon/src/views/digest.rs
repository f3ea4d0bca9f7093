//! A view's digest: what two copies of a view compare to agree without
//! shipping their documents.
//!
//! The digest of a view at log position P is one blake3 hash over its
//! documents **in key order**, each fed as the key's length (u32,
//! big-endian), the key, the document's length (u32, big-endian) and the
//! document. The lengths make it unambiguous (no two different sets of
//! documents feed the same bytes). It is taken from one RocksDB snapshot, so
//! the documents and the checkpoint P it reports belong together while the
//! view's worker goes on. Two instances that applied the same module
//! fingerprint to the same log up to the same P must report the same digest;
//! a snapshot's manifest carries it, and a bootstrap checks it.

use serde::{Deserialize, Serialize};

use super::{ViewError, ViewId, ViewStore, checkpoint_key, decode_checkpoint, storage};
use crate::store::Position;

/// A view's documents at one position, summed up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDigest {
    /// The log position the documents are at.
    pub position: Position,
    /// How many documents.
    pub documents: u64,
    /// Their keys' and documents' bytes.
    pub bytes: u64,
    /// blake3, hex.
    pub digest: String,
}

/// Feeds documents in key order; [`Self::finish`] gives the digest.
#[derive(Default)]
pub struct Digester {
    hasher: blake3::Hasher,
    documents: u64,
    bytes: u64,
}

impl Digester {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next document (keys must come in ascending order).
    pub fn add(&mut self, key: &[u8], doc: &[u8]) {
        self.hasher.update(&(key.len() as u32).to_be_bytes());
        self.hasher.update(key);
        self.hasher.update(&(doc.len() as u32).to_be_bytes());
        self.hasher.update(doc);
        self.documents += 1;
        self.bytes += (key.len() + doc.len()) as u64;
    }

    pub fn finish(self, position: Position) -> ViewDigest {
        ViewDigest {
            position,
            documents: self.documents,
            bytes: self.bytes,
            digest: self.hasher.finalize().to_hex().to_string(),
        }
    }
}

impl ViewStore {
    /// The digest of `view`'s documents at its checkpoint (one snapshot).
    pub fn digest(&self, view: &ViewId) -> Result<ViewDigest, ViewError> {
        self.pin(view)?.digest()
    }
}

/// The checkpoint `snapshot` holds for `view`; refused while the view warms
/// in partitions.
pub(super) fn position_in(
    snapshot: &rocksdb::SnapshotWithThreadMode<'_, super::Db>,
    view: &ViewId,
) -> Result<Position, ViewError> {
    let stored = snapshot
        .get_pinned(checkpoint_key(view))
        .map_err(storage(format!("reading the checkpoint of {view}")))?;
    if stored.as_deref().is_some_and(|v| v.len() != 8) {
        decode_checkpoint(view, stored.as_deref())?;
        return Err(ViewError::Partitioned(view.clone()));
    }
    decode_checkpoint(view, stored.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Writes;

    fn write(store: &ViewStore, view: &ViewId, docs: &[(&str, &str)], at: Position) {
        let writes: Writes = docs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
            .collect();
        store.commit(view, &writes, at).expect("commit");
    }

    #[test]
    fn equal_documents_equal_digests_and_any_change_shows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path()).expect("open");
        let a = ViewId::from_parts("a", "1.0.0").expect("id");
        let b = ViewId::from_parts("b", "1.0.0").expect("id");
        store.create(&a).expect("create");
        store.create(&b).expect("create");
        // Same documents written in another order and batching.
        write(&store, &a, &[("k1", "{\"n\":1}"), ("k2", "{}")], 7);
        write(&store, &b, &[("k2", "{}")], 3);
        write(&store, &b, &[("k1", "{\"n\":1}")], 7);
        let (da, db) = (store.digest(&a).expect("a"), store.digest(&b).expect("b"));
        assert_eq!(da, db);
        assert_eq!((da.position, da.documents), (7, 2));
        // One byte of one document differs.
        write(&store, &b, &[("k1", "{\"n\":2}")], 8);
        let db = store.digest(&b).expect("b");
        assert_ne!(da.digest, db.digest);
        assert_eq!(db.position, 8);
        // Moving bytes between key and document is a change too.
        let c = ViewId::from_parts("c", "1.0.0").expect("id");
        let d = ViewId::from_parts("d", "1.0.0").expect("id");
        store.create(&c).expect("create");
        store.create(&d).expect("create");
        write(&store, &c, &[("ab", "c")], 1);
        write(&store, &d, &[("a", "bc")], 1);
        assert_ne!(
            store.digest(&c).expect("c").digest,
            store.digest(&d).expect("d").digest
        );
    }

    #[test]
    fn a_partitioned_view_has_no_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path()).expect("open");
        let v = ViewId::from_parts("p", "1.0.0").expect("id");
        store.create(&v).expect("create");
        store.split(&v, 2).expect("split");
        assert!(matches!(store.digest(&v), Err(ViewError::Partitioned(_))));
    }
}
