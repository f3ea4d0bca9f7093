//! A view's documents written out as SST files, and read back in.
//!
//! [`ViewStore::export`] takes one RocksDB snapshot (the worker goes on), and
//! writes the view's documents in key order into SST files of at most
//! `max_file_bytes` each, together with the view's dead letters and the
//! checkpoint the snapshot holds: exactly the view at that position. The
//! digest ([`super::digest`]) is computed in the same pass.
//!
//! [`ViewStore::ingest`] puts such files into an **empty** view: a marker
//! (`bootstrap/<view>`) is stored first, then RocksDB ingests the files into
//! the view's column family, then one write batch sets the checkpoint, the
//! dead letters and removes the marker. A crash in between leaves the marker;
//! [`ViewStore::abandoned_ingest`] finds it and empties the view, so a view
//! half ingested is never resumed from (its checkpoint would be 0 with
//! documents in it).

use std::path::{Path, PathBuf};

use rocksdb::{IngestExternalFileOptions, Options, SstFileWriter, WriteBatch};

use super::digest::{Digester, ViewDigest, position_in};
use super::{
    ViewError, ViewId, ViewStore, checkpoint_key, parked_key, per_view_key, read_parked, storage,
};
use crate::store::Position;

const BOOTSTRAP_PREFIX: &str = "bootstrap/";
const LINEAGE_PREFIX: &str = "lineage/";

/// A view written out by [`ViewStore::export`].
#[derive(Debug, Clone)]
pub struct Exported {
    /// Its documents' digest; `digest.position` is the checkpoint.
    pub digest: ViewDigest,
    /// The SST files written, in key order (none for a view without documents).
    pub files: Vec<PathBuf>,
    /// Its dead letters (position, record), as they were at the checkpoint.
    pub parked: Vec<(Position, Vec<u8>)>,
}

/// Keeps an export at or under a rate (documents' bytes per second, 0: as
/// fast as it goes), checked every MiB: a snapshot in the background does
/// not crowd the disk the live views commit to.
struct Pace {
    bytes_per_sec: u64,
    started: std::time::Instant,
    bytes: u64,
    next_check: u64,
}

impl Pace {
    fn new(bytes_per_sec: u64) -> Self {
        Pace {
            bytes_per_sec,
            started: std::time::Instant::now(),
            bytes: 0,
            next_check: 1 << 20,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.bytes_per_sec == 0 || self.bytes < self.next_check {
            return;
        }
        self.next_check = self.bytes + (1 << 20);
        let due = std::time::Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

pub(super) fn marker_key(view: &ViewId) -> Vec<u8> {
    per_view_key(BOOTSTRAP_PREFIX, view, b"")
}

/// Where a bootstrapped view keeps the instance whose replay of the log
/// built the documents it was filled with (absent: replayed here).
pub(super) fn lineage_key(view: &ViewId) -> Vec<u8> {
    per_view_key(LINEAGE_PREFIX, view, b"")
}

fn io(op: String) -> impl FnOnce(rocksdb::Error) -> ViewError {
    storage(op)
}

/// Whether RocksDB refused to ingest files for what they hold (the
/// snapshot's fault) rather than for a failure of this host's storage
/// (I/O, shutdown, a busy or timed-out database: those are retried).
fn files_at_fault(e: &rocksdb::Error) -> bool {
    use rocksdb::ErrorKind::*;
    !matches!(
        e.kind(),
        IOError | ShutdownInProgress | Busy | TimedOut | TryAgain | Aborted | Incomplete
    )
}

impl ViewStore {
    /// Writes `view` as one RocksDB snapshot holds it into `dir` (which must
    /// exist): SST files named `docs-<n>.sst`, each at most about
    /// `max_file_bytes`, reading at most `max_bytes_per_sec` of documents a
    /// second (0: no limit).
    pub fn export(
        &self,
        view: &ViewId,
        dir: &Path,
        max_file_bytes: u64,
        max_bytes_per_sec: u64,
    ) -> Result<Exported, ViewError> {
        let cf = self.cf(view)?;
        let snapshot = self.db.snapshot();
        let position = position_in(&snapshot, view)?;
        let parked = read_parked(view, snapshot.raw_iterator())?;
        let opts = Options::default();
        let mut writer: Option<SstFileWriter<'_>> = None;
        let mut files = Vec::new();
        let mut digest = Digester::new();
        let mut pace = Pace::new(max_bytes_per_sec);
        let mut it = snapshot.raw_iterator_cf_opt(&cf, super::diff::whole_view_scan());
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            digest.add(k, v);
            let w = match &mut writer {
                Some(w) => w,
                None => {
                    let path = dir.join(format!("docs-{:04}.sst", files.len()));
                    let w = SstFileWriter::create(&opts);
                    w.open(&path)
                        .map_err(io(format!("creating {}", path.display())))?;
                    files.push(path);
                    writer.insert(w)
                }
            };
            w.put(k, v)
                .map_err(io(format!("writing a snapshot of {view}")))?;
            pace.wrote(k.len() + v.len());
            if w.file_size() >= max_file_bytes
                && let Some(mut w) = writer.take()
            {
                w.finish()
                    .map_err(io(format!("finishing a snapshot file of {view}")))?;
            }
            it.next();
        }
        it.status()
            .map_err(storage(format!("reading the documents of {view}")))?;
        if let Some(mut w) = writer.take() {
            w.finish()
                .map_err(io(format!("finishing a snapshot file of {view}")))?;
        }
        Ok(Exported {
            digest: digest.finish(position),
            files,
            parked,
        })
    }

    /// Fills the empty view `view` from SST `files` (moved into the
    /// database) with its checkpoint at `position`, its dead letters
    /// `parked` and its lineage `built_by` (the instance whose replay built
    /// the documents, see [`Self::lineage`]). Refused unless the view is
    /// fresh: no checkpoint, no partitions, no documents.
    pub fn ingest(
        &self,
        view: &ViewId,
        files: &[PathBuf],
        expect: &ViewDigest,
        parked: &[(Position, Vec<u8>)],
        built_by: &str,
    ) -> Result<(), ViewError> {
        let position = expect.position;
        self.ensure(view)?;
        let cf = self.cf(view)?;
        let fresh = self.checkpoint(view)? == 0 && self.partitions(view)?.is_none() && {
            let mut it = self.db.raw_iterator_cf(&cf);
            it.seek_to_first();
            it.key().is_none()
        };
        if !fresh {
            return Err(ViewError::NotEmpty(view.clone()));
        }
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db
            .put_opt(marker_key(view), position.to_be_bytes(), &sync)
            .map_err(io(format!("marking {view} as being bootstrapped")))?;
        if !files.is_empty() {
            let mut opts = IngestExternalFileOptions::default();
            opts.set_move_files(true);
            if let Err(e) = self
                .db
                .ingest_external_file_cf_opts(&cf, &opts, files.to_vec())
            {
                if !files_at_fault(&e) {
                    // This host's storage: the worker pauses and retries.
                    return Err(io(format!("ingesting the snapshot files of {view}"))(e));
                }
                // Files RocksDB cannot take (not SST, keys out of order or
                // overlapping, ...): the snapshot's fault, refused, and
                // the view left empty for a replay.
                drop(cf);
                self.empty_after_refusal(view)?;
                return Err(ViewError::DigestMismatch {
                    view: view.clone(),
                    reason: format!("RocksDB cannot ingest its files: {e}"),
                });
            }
        }
        // The documents are checked before the checkpoint makes them a view.
        let mut digest = Digester::new();
        let mut it = self
            .db
            .raw_iterator_cf_opt(&cf, super::diff::whole_view_scan());
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            digest.add(k, v);
            it.next();
        }
        it.status()
            .map_err(storage(format!("reading the ingested documents of {view}")))?;
        drop(it);
        let got = digest.finish(position);
        if got != *expect {
            let reason = format!(
                "its documents do not match its manifest: {} documents with digest {}, the manifest says {} with {}",
                got.documents, got.digest, expect.documents, expect.digest
            );
            drop(cf);
            self.empty_after_refusal(view)?;
            return Err(ViewError::DigestMismatch {
                view: view.clone(),
                reason,
            });
        }
        let mut batch = WriteBatch::default();
        for (at, record) in parked {
            batch.put(parked_key(view, *at), record);
        }
        batch.put(checkpoint_key(view), position.to_be_bytes());
        batch.put(lineage_key(view), built_by.as_bytes());
        batch.delete(marker_key(view));
        self.db
            .write_opt(batch, &sync)
            .map_err(io(format!("setting {view}'s checkpoint to {position}")))?;
        self.forget_cache(view);
        Ok(())
    }

    /// The instance whose replay of the log built `view`'s documents when
    /// it was filled from a snapshot (the snapshot's publisher, or the one
    /// that publisher's view came from); `None`: replayed here. Digests of
    /// views of one lineage are one witness, not several (the fleet's vote).
    pub fn lineage(&self, view: &ViewId) -> Result<Option<String>, ViewError> {
        let got = self
            .db
            .get_pinned(lineage_key(view))
            .map_err(io(format!("reading the lineage of {view}")))?;
        Ok(got.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Empties `view` after its snapshot was refused mid-ingest (dropped,
    /// created again) and removes its bootstrap marker.
    fn empty_after_refusal(&self, view: &ViewId) -> Result<(), ViewError> {
        self.drop_view(view)?;
        self.create(view)?;
        self.db
            .delete(marker_key(view))
            .map_err(io(format!("removing the bootstrap marker of {view}")))
    }

    /// Whether an ingest into `view` was cut short (a crash between the
    /// files and the checkpoint); if so the view is emptied (dropped and
    /// created again) and the marker removed, so it starts afresh.
    pub fn abandoned_ingest(&self, view: &ViewId) -> Result<bool, ViewError> {
        let marked = self
            .db
            .get_pinned(marker_key(view))
            .map_err(io(format!("reading the bootstrap marker of {view}")))?
            .is_some();
        if !marked {
            return Ok(false);
        }
        if self.exists(view) {
            self.drop_view(view)?;
        }
        self.create(view)?;
        self.db
            .delete(marker_key(view))
            .map_err(io(format!("removing the bootstrap marker of {view}")))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::Writes;

    fn id(name: &str) -> ViewId {
        ViewId::from_parts(name, "1.0.0").expect("id")
    }

    #[test]
    fn export_then_ingest_is_the_same_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path().join("a")).expect("open");
        let v = id("v");
        store.create(&v).expect("create");
        let writes: Writes = (0..5000u32)
            .map(|i| {
                (
                    format!("k{i:05}").into_bytes(),
                    Some(format!("{{\"i\":{i}}}").into_bytes()),
                )
            })
            .collect();
        store
            .park(&v, crate::views::Slot::View, 17, b"{\"why\":1}")
            .expect("park");
        store.commit(&v, &writes, 41).expect("commit");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).expect("mkdir");
        // Small files: the export splits.
        let exported = store.export(&v, &out, 16 * 1024, 0).expect("export");
        assert!(exported.files.len() > 1, "{:?}", exported.files);
        assert_eq!(exported.digest.position, 41);
        assert_eq!(exported.digest.documents, 5000);
        assert_eq!(exported.parked.len(), 1);

        let other = ViewStore::open(dir.path().join("b")).expect("open");
        // A digest that does not match refuses the files and leaves the view empty.
        let mut wrong = exported.digest.clone();
        wrong.digest = "0".repeat(64);
        let copies: Vec<PathBuf> = exported
            .files
            .iter()
            .map(|f| {
                let c = f.with_extension("copy.sst");
                std::fs::copy(f, &c).expect("copy");
                c
            })
            .collect();
        let refused = other.ingest(&v, &copies, &wrong, &exported.parked, "x");
        assert!(
            matches!(refused, Err(ViewError::DigestMismatch { .. })),
            "{refused:?}"
        );
        assert_eq!(other.checkpoint(&v).expect("checkpoint"), 0);
        assert_eq!(other.digest(&v).expect("digest").documents, 0);
        assert_eq!(store.lineage(&v).expect("lineage"), None, "replayed");
        other
            .ingest(&v, &exported.files, &exported.digest, &exported.parked, "a")
            .expect("ingest");
        assert_eq!(other.checkpoint(&v).expect("checkpoint"), 41);
        assert_eq!(other.lineage(&v).expect("lineage").as_deref(), Some("a"));
        assert_eq!(other.digest(&v).expect("digest"), exported.digest);
        assert_eq!(other.parked(&v).expect("parked"), exported.parked);
        assert!(!other.abandoned_ingest(&v).expect("marker"));
        // A second ingest into a view that is not empty is refused.
        let again = store.export(&v, &out, 1 << 30, 0).expect("export");
        assert!(matches!(
            other.ingest(&v, &again.files, &again.digest, &[], "x"),
            Err(ViewError::NotEmpty(_))
        ));
    }

    #[test]
    fn an_interrupted_ingest_is_found_and_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path()).expect("open");
        let v = id("w");
        store.create(&v).expect("create");
        // As an ingest cut short leaves it: the marker and documents, no checkpoint.
        store
            .db
            .put(marker_key(&v), 9u64.to_be_bytes())
            .expect("marker");
        let writes: Writes = [(b"k".to_vec(), Some(b"{}".to_vec()))].into();
        store.commit(&v, &writes, 0).expect("docs");
        assert!(store.abandoned_ingest(&v).expect("found"));
        assert_eq!(store.digest(&v).expect("digest").documents, 0);
        assert!(!store.abandoned_ingest(&v).expect("gone"));
    }

    #[test]
    fn an_empty_view_exports_no_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ViewStore::open(dir.path()).expect("open");
        let v = id("e");
        store.create(&v).expect("create");
        store.commit(&v, &Writes::new(), 3).expect("commit");
        let exported = store.export(&v, dir.path(), 1 << 20, 0).expect("export");
        assert!(exported.files.is_empty());
        let other = ViewStore::open(dir.path().join("b")).expect("open");
        other
            .ingest(&v, &[], &exported.digest, &[], "x")
            .expect("ingest");
        assert_eq!(other.checkpoint(&v).expect("checkpoint"), 3);
    }
}
