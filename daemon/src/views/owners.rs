//! The `per_stream` promise, checked: which warm-up partition touched each
//! document while a warm-up is split.
//!
//! A `per_stream` view may warm in K partitions of streams (see
//! `lifecycle/worker/partitioned.rs`), which is right only if no document is
//! touched from two partitions: a document written from one and read or
//! written from another would depend on how the two interleaved. The module
//! says it holds; the host does not trust it. Every batch a partition commits
//! *claims* the documents it read and wrote: `owner/<view-id>/<key>` → the
//! partition, whether it wrote it, and whether two partitions read it. The
//! claims are checked and written in the partition's own commit (documents,
//! checkpoint and claims in one write batch), under one lock for the whole
//! database, so two partitions committing at once cannot both claim a key
//! unseen.
//!
//! A document written from one partition and touched from another, or
//! written after two partitions read it, is a [`SplitViolation`]: nothing of
//! that batch is committed, and the lifecycle warms the version again from
//! the first event with one worker ([`ViewStore::unsplit`]), for good. A scan
//! cannot be claimed key by key (it reads what other partitions may write
//! later under its prefix), so a scan in a split warm-up is a violation too.
//! What this costs: one read of the claims of the keys a batch touches, and
//! a write for each new one; nothing once the partitions merge (the claims
//! are dropped then). A view built by one worker is applied in log order and
//! cannot depend on a split, so nothing is checked there.
//!
//! Soundness: if no violation was met, every document was read and written
//! from one partition only, whose events it saw in log order, exactly as one
//! worker would have applied them; so the documents equal one worker's.

use std::collections::BTreeSet;
use std::fmt;

use rocksdb::WriteBatch;

use super::{Slot, ViewError, ViewId, ViewStore, Writes, per_view_key, per_view_range, storage};
use crate::store::Position;

/// `owner/<view-id>/<key>` → partition (u32 BE), flags ([`WRITTEN`], [`SHARED`]).
pub(super) const OWNER_PREFIX: &str = "owner/";
/// A view that must not warm in partitions again: `unsplit/<view-id>` → the
/// reason (UTF-8), after a [`SPLIT_RESET_PENDING`] byte while its documents
/// are being emptied.
pub(super) const UNSPLIT_PREFIX: &str = "unsplit/";
const SPLIT_RESET_PENDING: u8 = b'R';
const SPLIT_RESET_DONE: u8 = b'D';

const WRITTEN: u8 = 1;
const SHARED: u8 = 2;

/// What one partition has claimed already (key → whether it claimed a
/// write), so touching a key again needs no look at the stored claims: any
/// other partition touching it meets this partition's claim there. Bounded:
/// past [`HELD_CLAIMS_MAX`] keys it starts afresh (more look-ups, same
/// answers).
#[derive(Debug, Default)]
pub struct HeldClaims(std::collections::HashMap<Vec<u8>, bool>);

/// Keys a [`HeldClaims`] keeps at most.
const HELD_CLAIMS_MAX: usize = 1 << 20;

impl HeldClaims {
    /// Whether a touch of `key` (a write or not) is covered by a claim
    /// this partition committed.
    fn covers(&self, key: &[u8], write: bool) -> bool {
        self.0.get(key).is_some_and(|w| *w || !write)
    }

    fn hold(&mut self, key: &[u8], write: bool) {
        if self.0.len() >= HELD_CLAIMS_MAX && !self.0.contains_key(key) {
            self.0.clear();
        }
        let w = self.0.entry(key.to_vec()).or_insert(write);
        *w |= write;
    }
}

/// The documents one batch read (keys looked up, present or not) and the
/// prefixes it scanned; its writes are the batch's [`Writes`].
#[derive(Debug, Default, Clone)]
pub struct Touched {
    pub reads: BTreeSet<Vec<u8>>,
    pub scans: BTreeSet<Vec<u8>>,
}

/// A document touched from two partitions of a split warm-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitViolation {
    pub view: ViewId,
    /// The document's key (lossy UTF-8), or the scanned prefix.
    pub key: String,
    /// The partition that touched it first (None for a scan).
    pub first: Option<u32>,
    /// The partition whose batch met the violation.
    pub second: u32,
    pub of: u32,
    /// Which stream(s) of `second`'s batch: filled in by the worker.
    pub streams: Vec<String>,
    pub kind: ViolationKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// Written from one partition, read or written from another.
    Shared,
    /// Read from two partitions, then written.
    WrittenAfterSharedRead,
    /// The batch scanned a prefix.
    Scan,
}

impl fmt::Display for SplitViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (second, of) = (self.second, self.of);
        let streams = if self.streams.is_empty() {
            String::new()
        } else {
            format!(" (in partition {second} by {})", self.streams.join(", "))
        };
        match (self.kind, self.first) {
            (ViolationKind::Scan, _) => write!(
                f,
                "view {} declares per_stream but scans documents under {:?} in warm-up partition {second} of {of}{streams}: a split warm-up cannot prove what it reads",
                self.view, self.key
            ),
            (ViolationKind::WrittenAfterSharedRead, _) => write!(
                f,
                "view {} declares per_stream but document {:?}, read from two warm-up partitions, is written from partition {second} of {of}{streams}",
                self.view, self.key
            ),
            (ViolationKind::Shared, first) => write!(
                f,
                "view {} declares per_stream but document {:?} is touched from warm-up partitions {} and {second} of {of}{streams}: it depends on the events of more than one stream",
                self.view,
                self.key,
                first.map_or_else(|| "?".to_string(), |p| p.to_string())
            ),
        }
    }
}

fn owner_key(view: &ViewId, key: &[u8]) -> Vec<u8> {
    per_view_key(OWNER_PREFIX, view, key)
}

fn unsplit_key(view: &ViewId) -> Vec<u8> {
    format!("{UNSPLIT_PREFIX}{view}").into_bytes()
}

/// `[from, to)` of a view's claims.
pub(super) fn owner_range(view: &ViewId) -> (Vec<u8>, Vec<u8>) {
    per_view_range(OWNER_PREFIX, view)
}

/// A claim: (partition, flags); `None` when the stored bytes are not one
/// (then the key counts as touched by another partition: doubt warms again).
fn decode(v: &[u8]) -> Option<(u32, u8)> {
    let p = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
    let flags = *v.get(4)?;
    (v.len() == 5).then_some((p, flags))
}

fn encode(partition: u32, flags: u8) -> [u8; 5] {
    let mut v = [0u8; 5];
    v[..4].copy_from_slice(&partition.to_be_bytes());
    v[4] = flags;
    v
}

/// A stored claim: the partition and its flags.
type Claim = (u32, u8);

/// What `partition` touching a key claimed as `stored` makes of the claim:
/// the new claim (if it changes), or the violation's kind and the partition
/// that claimed the key.
fn claim(
    stored: Option<Claim>,
    partition: u32,
    write: bool,
) -> Result<Option<Claim>, (ViolationKind, Option<u32>)> {
    let w = if write { WRITTEN } else { 0 };
    let Some((owner, flags)) = stored else {
        return Ok(Some((partition, w)));
    };
    if flags & SHARED != 0 {
        return if write {
            Err((ViolationKind::WrittenAfterSharedRead, Some(owner)))
        } else {
            Ok(None)
        };
    }
    if owner == partition {
        return Ok((flags & w == 0 && write).then_some((owner, flags | w)));
    }
    if flags & WRITTEN != 0 || write {
        return Err((ViolationKind::Shared, Some(owner)));
    }
    Ok(Some((owner, flags | SHARED)))
}

impl ViewStore {
    /// Commits a split warm-up partition's batch as [`ViewStore::commit_at`]
    /// does, with the claims of what it touched, after checking them against
    /// every other partition's. `Ok(Err(_))`: a violation, nothing committed.
    /// `held`: what this partition claimed before (kept up to date here).
    pub fn commit_claimed(
        &self,
        view: &ViewId,
        slot: Slot,
        writes: &Writes,
        touched: &Touched,
        held: &mut HeldClaims,
        checkpoint: Position,
    ) -> Result<Result<(), Box<SplitViolation>>, ViewError> {
        let Slot::Partition { index, of } = slot else {
            self.commit_at(view, slot, writes, checkpoint)?;
            return Ok(Ok(()));
        };
        let violation = |kind, first, key: &[u8]| {
            Box::new(SplitViolation {
                view: view.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                first,
                second: index,
                of,
                streams: Vec::new(),
                kind,
            })
        };
        if let Some(prefix) = touched.scans.iter().next() {
            return Ok(Err(violation(ViolationKind::Scan, None, prefix)));
        }
        // Every key once, written ones as writes; none this partition holds.
        let keys: Vec<(&[u8], bool)> = writes
            .keys()
            .map(|k| (k.as_slice(), true))
            .chain(
                touched
                    .reads
                    .iter()
                    .filter(|k| !writes.contains_key(*k))
                    .map(|k| (k.as_slice(), false)),
            )
            .filter(|(k, write)| !held.covers(k, *write))
            .collect();
        let _claiming = self
            .claims
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stored = self
            .db
            .multi_get(keys.iter().map(|(k, _)| owner_key(view, k)));
        let mut batch = self.documents_batch(view, writes)?;
        for ((key, write), got) in keys.iter().zip(stored) {
            let got = got.map_err(storage(format!("reading the claims of {view}")))?;
            let stored = match got.as_deref().map(decode) {
                None => None,
                Some(Some(c)) => Some(c),
                // Unreadable: as if another partition had written it.
                Some(None) => Some((u32::MAX, WRITTEN)),
            };
            match claim(stored, index, *write) {
                Ok(Some((p, flags))) => batch.put(owner_key(view, key), encode(p, flags)),
                Ok(None) => {}
                Err((kind, first)) => return Ok(Err(violation(kind, first, key))),
            }
        }
        super::put_checkpoint(&mut batch, view, slot, checkpoint);
        self.db.write(batch).map_err(storage(format!(
            "committing {view} at position {checkpoint}{}",
            slot.describe()
        )))?;
        self.cached_commit(view, writes);
        for (key, write) in keys {
            held.hold(key, write);
        }
        Ok(Ok(()))
    }

    /// Why `view` must warm with one worker from now on, if it must; and
    /// whether its documents still wait to be emptied (a crash during
    /// [`Self::unsplit`]).
    pub fn unsplit_reason(&self, view: &ViewId) -> Result<Option<(String, bool)>, ViewError> {
        let got = self
            .db
            .get_pinned(unsplit_key(view))
            .map_err(storage(format!("reading whether {view} may warm split")))?;
        Ok(got.map(|v| {
            let pending = v.first() != Some(&SPLIT_RESET_DONE);
            (
                String::from_utf8_lossy(v.get(1..).unwrap_or(&[])).into_owned(),
                pending,
            )
        }))
    }

    /// After a [`SplitViolation`]: `view` never warms split again, and its
    /// documents, dead letters, partitions and claims go, so it warms from
    /// the first event with one worker. The reason is written first (a crash
    /// after it empties the view again at the next start, see
    /// [`Self::unsplit_reason`]); the column family is dropped and created
    /// before the checkpoint goes, so a crash never leaves documents under a
    /// checkpoint that did not build them.
    pub fn unsplit(&self, view: &ViewId, reason: &str) -> Result<(), ViewError> {
        let mut marked = vec![SPLIT_RESET_PENDING];
        marked.extend_from_slice(reason.as_bytes());
        self.db
            .put(unsplit_key(view), &marked)
            .map_err(storage(format!("marking {view} as never warming split")))?;
        self.forget_cache(view);
        if self.exists(view) {
            self.db
                .drop_cf(&view.to_string())
                .map_err(storage(format!("emptying view {view}")))?;
        }
        self.create(view)?;
        let mut batch = WriteBatch::default();
        batch.delete(super::checkpoint_key(view));
        for (from, to) in [
            super::parked_range(view),
            super::partition_range(view),
            owner_range(view),
        ] {
            batch.delete_range(from, to);
        }
        marked[0] = SPLIT_RESET_DONE;
        batch.put(unsplit_key(view), &marked);
        self.db.write(batch).map_err(storage(format!(
            "resetting the checkpoint of {view} to warm again"
        )))
    }

    /// The reason and claims go with the view (see [`Self::drop_view`]).
    pub(super) fn forget_claims(batch: &mut WriteBatch, view: &ViewId) {
        let (from, to) = owner_range(view);
        batch.delete_range(from, to);
        batch.delete(unsplit_key(view));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ViewId {
        ViewId::from_parts("tally", "1.0.0").expect("id")
    }

    fn writes(keys: &[&str]) -> Writes {
        keys.iter()
            .map(|k| (k.as_bytes().to_vec(), Some(b"1".to_vec())))
            .collect()
    }

    fn reads(keys: &[&str]) -> Touched {
        Touched {
            reads: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            scans: BTreeSet::new(),
        }
    }

    fn part(index: u32) -> Slot {
        Slot::Partition { index, of: 3 }
    }

    fn split_store() -> (tempfile::TempDir, ViewStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path()).expect("open");
        store.create(&id()).expect("create");
        store.split(&id(), 3).expect("split");
        (dir, store)
    }

    #[test]
    fn own_documents_in_every_partition_commit() {
        let (_d, store) = split_store();
        let mut held: [HeldClaims; 3] = Default::default();
        for round in 1..=3u64 {
            for p in 0..3 {
                let key = format!("s-{p}");
                let got = store
                    .commit_claimed(
                        &id(),
                        part(p),
                        &writes(&[&key]),
                        &reads(&[&key, "absent-everywhere"]),
                        &mut held[p as usize],
                        round,
                    )
                    .expect("commit");
                assert_eq!(got, Ok(()), "round {round}, partition {p}");
            }
        }
        assert_eq!(store.partitions(&id()).unwrap(), Some(vec![3, 3, 3]));
        assert!(store.get(&id(), b"s-2").unwrap().is_some());
    }

    #[test]
    fn a_document_written_from_two_partitions_is_refused_and_nothing_commits() {
        let (_d, store) = split_store();
        let ok = store.commit_claimed(
            &id(),
            part(0),
            &writes(&["all"]),
            &reads(&["all"]),
            &mut HeldClaims::default(),
            1,
        );
        assert_eq!(ok.unwrap(), Ok(()));
        let refused = store
            .commit_claimed(
                &id(),
                part(2),
                &writes(&["all", "s-2"]),
                &reads(&["all"]),
                &mut HeldClaims::default(),
                2,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.kind, ViolationKind::Shared);
        assert_eq!((refused.first, refused.second), (Some(0), 2));
        assert_eq!(refused.key, "all");
        assert!(refused.to_string().contains("\"all\""), "{refused}");
        // Nothing of the refused batch: neither its documents nor its checkpoint.
        assert!(store.get(&id(), b"s-2").unwrap().is_none());
        assert_eq!(store.partitions(&id()).unwrap(), Some(vec![1, 0, 0]));
    }

    #[test]
    fn reading_what_another_partition_wrote_or_writing_what_two_read_is_refused() {
        let (_d, store) = split_store();
        // The violation's kind, if any; each partition keeps what it holds,
        // as a partition's projector does.
        let held: [std::cell::RefCell<HeldClaims>; 3] = Default::default();
        let c = |p: u32, w: &[&str], r: &[&str], at| {
            store
                .commit_claimed(
                    &id(),
                    part(p),
                    &writes(w),
                    &reads(r),
                    &mut held[p as usize].borrow_mut(),
                    at,
                )
                .unwrap()
                .err()
                .map(|v| v.kind)
        };
        assert_eq!(c(0, &["a"], &[], 1), None);
        assert_eq!(c(0, &["a"], &["a"], 2), None, "its own, held");
        assert_eq!(c(1, &[], &["a"], 1), Some(ViolationKind::Shared));
        // Two partitions may read a document nobody writes...
        assert_eq!(c(1, &[], &["config"], 2), None);
        assert_eq!(c(2, &[], &["config"], 2), None);
        assert_eq!(c(1, &[], &["config"], 3), None);
        // ...but not once someone writes it, even one of them (what it
        // holds is a read: the write looks at the stored claim).
        assert_eq!(
            c(1, &["config"], &[], 4),
            Some(ViolationKind::WrittenAfterSharedRead)
        );
    }

    #[test]
    fn a_scan_in_a_split_warm_up_is_refused() {
        let (_d, store) = split_store();
        let mut t = reads(&[]);
        t.scans.insert(b"s-".to_vec());
        let e = store
            .commit_claimed(
                &id(),
                part(1),
                &writes(&[]),
                &t,
                &mut HeldClaims::default(),
                1,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind, ViolationKind::Scan);
    }

    #[test]
    fn unsplit_empties_the_view_and_is_remembered_until_the_view_is_dropped() {
        let (_d, store) = split_store();
        store
            .commit_claimed(
                &id(),
                part(0),
                &writes(&["all"]),
                &reads(&[]),
                &mut HeldClaims::default(),
                5,
            )
            .unwrap()
            .unwrap();
        assert_eq!(store.unsplit_reason(&id()).unwrap(), None);
        store.unsplit(&id(), "shared document").expect("unsplit");
        assert_eq!(
            store.unsplit_reason(&id()).unwrap(),
            Some(("shared document".to_string(), false))
        );
        assert_eq!(store.partitions(&id()).unwrap(), None);
        assert_eq!(store.checkpoint(&id()).unwrap(), 0);
        assert!(store.get(&id(), b"all").unwrap().is_none());
        // Claims went too: a partition could claim "all" afresh.
        let (from, to) = owner_range(&id());
        let mut it = store.db.raw_iterator();
        it.seek(&from);
        assert!(it.key().is_none_or(|k| k >= to.as_slice()), "claims left");
        store.drop_view(&id()).expect("drop");
        assert_eq!(store.unsplit_reason(&id()).unwrap(), None);
    }
}
