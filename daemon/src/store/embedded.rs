//! The embedded backend: the event log in a RocksDB instance of its own.
//!
//! One writer thread owns every write. Appends queue on a channel; the writer
//! takes whatever has queued (up to [`MAX_GROUP`] jobs), checks each against the
//! committed state plus the group's own earlier writes, and commits the whole
//! group in **one** `WriteBatch` (group commit). Because the check and the write
//! happen on that single thread, the optimistic-concurrency check and the write it
//! guards are one atomic step: no lock is held across I/O and none is needed.
//!
//! Column families:
//! - `events`: position (u64 BE) → record ([`super::codec`]); gap-free from 1.
//! - `streams`: stream id → latest version + last position (the O(1) index).
//! - `stream_index`: stream id, 0x00, version (u64 BE) → position.
//! - `event_ids`: event id → position, version, stream (idempotent retries).
//! - `tags`: tag → position of the last event carrying it (tag conditions).
//! - `snapshots`: stream id → version + snapshot bytes (the newest one).
//!
//! Everything an append touches goes into the same batch, so the index can never
//! disagree with the log. Tails are woken by a `watch` channel the writer bumps
//! after each commit; nothing polls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::codec::{decode_event, decode_position, encode_event, position_key};
use super::{
    AppendRequest, AppendResult, EventBatches, EventStore, Limits, Position, RecordedEvent,
    Snapshot, StoreError, StreamHead, StreamId, now_millis, validate_append,
};

const CF_EVENTS: &str = "events";
const CF_STREAMS: &str = "streams";
const CF_STREAM_INDEX: &str = "stream_index";
const CF_EVENT_IDS: &str = "event_ids";
const CF_TAGS: &str = "tags";
const CF_SNAPSHOTS: &str = "snapshots";
const COLUMN_FAMILIES: [&str; 6] = [
    CF_EVENTS,
    CF_STREAMS,
    CF_STREAM_INDEX,
    CF_EVENT_IDS,
    CF_TAGS,
    CF_SNAPSHOTS,
];

/// Most jobs committed in one write batch.
pub const MAX_GROUP: usize = 1024;
/// Most events in one batch handed out by a tail.
pub const TAIL_BATCH: usize = 1024;
/// Most bytes of stored events in one tail batch (at least one event): a
/// slow consumer of a log of large events holds at most this.
pub const TAIL_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// When an acknowledged append is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The write-ahead log is fsynced before any append in a group is
    /// acknowledged: an acknowledged append survives a power loss. Group commit
    /// shares one fsync among every append that queued meanwhile.
    #[default]
    Fsync,
    /// The write-ahead log is written to the OS but not fsynced: an acknowledged
    /// append survives the process being killed, but a power loss or kernel crash
    /// can lose the last moments of appends.
    Buffered,
}

/// How to open an embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub path: PathBuf,
    pub durability: Durability,
    pub limits: Limits,
}

impl EmbeddedConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            durability: Durability::default(),
            limits: Limits::default(),
        }
    }
}

/// The embedded event store. Cheap to clone; every clone shares one writer.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Always `Some` until the store is dropped (see [`Inner::db`]).
    db: Option<Arc<DB>>,
    stats: Arc<WriterStats>,
    jobs: mpsc::Sender<Job>,
    head: watch::Receiver<Position>,
    limits: Limits,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// `embedded:<uuid>`, made when the log was created (see [`log_identity`]).
    identity: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the job channel so the writer finishes its group and exits, then
        // wait for it: after a drop the database can be opened again at once.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = handle.join();
        }
        // A tail's read in flight on a blocking thread holds the database
        // for as long as one batch takes: wait for it (bounded), so that
        // the database can be opened again at once here too. Taking sole
        // ownership (not just seeing one owner) makes every later upgrade
        // of a tail's weak reference fail.
        let until = std::time::Instant::now() + READERS_WAIT;
        let mut db = self.db.take();
        while let Some(shared) = db {
            match Arc::try_unwrap(shared) {
                Ok(sole) => {
                    drop(sole);
                    break;
                }
                Err(shared) if std::time::Instant::now() >= until => {
                    tracing::warn!("the event log closes after a read still in flight");
                    drop(shared);
                    break;
                }
                Err(shared) => {
                    db = Some(shared);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}

impl Inner {
    fn db(&self) -> &Arc<DB> {
        self.db
            .as_ref()
            .expect("the log's database is open until the store is dropped")
    }
}

/// How long dropping the store waits for reads in flight to end.
const READERS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

enum Job {
    Append {
        req: AppendRequest,
        reply: oneshot::Sender<Result<AppendResult, StoreError>>,
    },
    Snapshot {
        stream: StreamId,
        version: u64,
        data: Bytes,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `config.path`.
    pub fn open(config: EmbeddedConfig) -> Result<Self, StoreError> {
        let db = Arc::new(open_db(&config.path)?);
        let identity = log_identity(&db)?;
        let head = last_position(&db)?;
        let (head_tx, head_rx) = watch::channel(head);
        let (jobs, rx) = mpsc::channel(4 * MAX_GROUP);
        let stats = Arc::new(WriterStats::default());
        let mut writer = Writer {
            db: db.clone(),
            stats: stats.clone(),
            head,
            head_tx,
            durability: config.durability,
        };
        let handle = std::thread::Builder::new()
            .name("kiln-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::backend("starting the store writer thread", e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db: Some(db),
                stats,
                jobs,
                head: head_rx,
                limits: config.limits,
                writer: Mutex::new(Some(handle)),
                identity,
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// A RocksDB checkpoint of the log in `dir` (which must not exist): a
    /// consistent copy taken while appends go on (SST files hard-linked when
    /// `dir` is on the same file system), and the head it holds.
    pub fn checkpoint_to(&self, dir: &Path) -> Result<Position, StoreError> {
        let op = || format!("copying the event log into {}", dir.display());
        rocksdb::checkpoint::Checkpoint::new(self.inner.db())
            .and_then(|c| c.create_checkpoint(dir))
            .map_err(|e| StoreError::backend(op(), e))?;
        // The head of the copy, not of the live log (which moved on).
        let copy = DB::open_cf_for_read_only(&Options::default(), dir, COLUMN_FAMILIES, false)
            .map_err(|e| StoreError::backend(op(), e))?;
        last_position(&copy)
    }

    /// The writer's group-commit counters.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }
}

fn open_db(path: &Path) -> Result<DB, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    let cfs = COLUMN_FAMILIES.iter().map(|name| {
        let mut cf_opts = Options::default();
        if *name != CF_EVENTS {
            // Point look-ups (stream heads, event ids, tags) mostly miss on
            // fresh keys: a bloom filter answers those without reading files.
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
            // The same for keys still in the memtable: a miss skips the skiplist.
            cf_opts.set_memtable_whole_key_filtering(true);
            cf_opts.set_memtable_prefix_bloom_ratio(0.05);
        }
        ColumnFamilyDescriptor::new(*name, cf_opts)
    });
    DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
        StoreError::backend(format!("opening the event store at {}", path.display()), e)
    })
}

/// Where the log's identity lives (default column family).
const LOG_ID_KEY: &[u8] = b"kiln/log-id";

/// The log's identity, `embedded:<uuid v4>`: made and stored the first time
/// a kiln that knows identities opens the log (a log created before has none
/// yet: it gets one then, which is no change to its events).
fn log_identity(db: &DB) -> Result<String, StoreError> {
    let op = "reading the log's identity";
    if let Some(v) = db.get(LOG_ID_KEY).map_err(|e| StoreError::backend(op, e))? {
        return String::from_utf8(v).map_err(|_| StoreError::Corrupt {
            what: "the log's identity".into(),
            reason: "not UTF-8".into(),
        });
    }
    new_identity(db)
}

/// Makes and stores (synced) a new identity for the log in `db`.
fn new_identity(db: &DB) -> Result<String, StoreError> {
    let id = format!("embedded:{}", Uuid::new_v4());
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.put_opt(LOG_ID_KEY, id.as_bytes(), &opts)
        .map_err(|e| StoreError::backend("storing the log's identity", e))?;
    Ok(id)
}

/// Gives the (closed) log at `path` a new identity: a new history epoch.
/// `kiln restore` calls it on the log it puts in place, whose events from
/// the backup's head on are another history than the original's (which may
/// go on too): nothing keyed by the old identity (a view snapshot built
/// after the backup) is taken for this log's. Returns the new identity.
pub fn begin_new_history(path: &Path) -> Result<String, StoreError> {
    new_identity(&open_db(path)?)
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Every column family is created at open; a missing one is a programming error.
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} exists after open"))
}

fn last_position(db: &DB) -> Result<Position, StoreError> {
    let mut it = db.raw_iterator_cf(cf(db, CF_EVENTS));
    it.seek_to_last();
    match it.key() {
        Some(k) => decode_position(k),
        None => {
            it.status()
                .map_err(|e| StoreError::backend("reading the log's head", e))?;
            Ok(0)
        }
    }
}

fn stream_index_key(stream: &StreamId, version: u64) -> Vec<u8> {
    let s = stream.as_str().as_bytes();
    let mut k = Vec::with_capacity(s.len() + 9);
    k.extend_from_slice(s);
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn encode_head(h: StreamHead) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&h.version.to_le_bytes());
    b[8..].copy_from_slice(&h.position.to_le_bytes());
    b
}

fn decode_u64(b: &[u8], at: usize, what: &str) -> Result<u64, StoreError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            what: what.to_string(),
            reason: format!("{} bytes is too short", b.len()),
        })
}

fn decode_head(b: &[u8], stream: &StreamId) -> Result<StreamHead, StoreError> {
    let what = format!("stream index entry of '{stream}'");
    Ok(StreamHead {
        version: decode_u64(b, 0, &what)?,
        position: decode_u64(b, 8, &what)?,
    })
}

fn read_head(db: &DB, stream: &StreamId) -> Result<StreamHead, StoreError> {
    match db
        .get_pinned_cf(cf(db, CF_STREAMS), stream.as_str())
        .map_err(|e| StoreError::backend(format!("reading the version of stream '{stream}'"), e))?
    {
        Some(v) => decode_head(&v, stream),
        None => Ok(StreamHead::default()),
    }
}

/// Where an event id was committed.
#[derive(Clone, Debug)]
struct IdEntry {
    stream: String,
    position: Position,
    version: u64,
}

fn encode_id_entry(e: &IdEntry) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + e.stream.len());
    b.extend_from_slice(&e.position.to_le_bytes());
    b.extend_from_slice(&e.version.to_le_bytes());
    b.extend_from_slice(e.stream.as_bytes());
    b
}

fn decode_id_entry(b: &[u8], id: &Uuid) -> Result<IdEntry, StoreError> {
    let what = format!("event id entry {id}");
    Ok(IdEntry {
        position: decode_u64(b, 0, &what)?,
        version: decode_u64(b, 8, &what)?,
        stream: String::from_utf8(b[16..].to_vec()).map_err(|e| StoreError::Corrupt {
            what,
            reason: e.to_string(),
        })?,
    })
}

/// Counters kept by the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Write batches committed (one fsync each under [`Durability::Fsync`]).
    pub groups: AtomicU64,
    /// Jobs (appends and snapshots) handled, committed or refused.
    pub jobs: AtomicU64,
    /// The last write's failure (a full disk, an I/O error) and since when
    /// writes fail; `None` once a write succeeds again.
    fault: Mutex<Option<(String, std::time::Instant)>>,
    /// Milliseconds spent unable to write, over faults that have ended.
    pub unwritable_ms: AtomicU64,
}

impl WriterStats {
    /// Why the log cannot be written now, if a write failed and none has
    /// succeeded since.
    pub fn fault(&self) -> Option<String> {
        self.fault
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|(e, _)| e.clone()))
    }

    /// Milliseconds spent unable to write, the current fault included.
    pub fn unwritable_millis(&self) -> u64 {
        let current = self
            .fault
            .lock()
            .ok()
            .and_then(|f| {
                f.as_ref()
                    .map(|(_, since)| since.elapsed().as_millis() as u64)
            })
            .unwrap_or(0);
        self.unwritable_ms.load(Ordering::Relaxed) + current
    }

    fn note_write(&self, result: &Result<(), String>) {
        let Ok(mut fault) = self.fault.lock() else {
            return;
        };
        match (result, fault.as_ref()) {
            (Err(e), None) => {
                tracing::error!("the log cannot be written: {e}");
                *fault = Some((e.clone(), std::time::Instant::now()));
            }
            (Ok(()), Some((_, since))) => {
                let ms = since.elapsed().as_millis() as u64;
                self.unwritable_ms.fetch_add(ms, Ordering::Relaxed);
                tracing::info!(after_ms = ms, "the log can be written again");
                *fault = None;
            }
            _ => {}
        }
    }

    /// Average number of jobs per committed group since the store opened.
    pub fn mean_group_size(&self) -> f64 {
        let groups = self.groups.load(Ordering::Relaxed);
        if groups == 0 {
            return 0.0;
        }
        self.jobs.load(Ordering::Relaxed) as f64 / groups as f64
    }
}

/// The single writer. Owns the log's head; the only code that writes the database.
struct Writer {
    db: Arc<DB>,
    stats: Arc<WriterStats>,
    head: Position,
    head_tx: watch::Sender<Position>,
    durability: Durability,
}

/// State written by earlier jobs of the group being built, not yet committed.
#[derive(Default)]
struct Overlay {
    head: Position,
    streams: HashMap<StreamId, StreamHead>,
    ids: HashMap<Uuid, IdEntry>,
    tags: HashMap<String, Position>,
    snapshots: HashMap<StreamId, u64>,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendResult, StoreError>>,
        Result<AppendResult, StoreError>,
    ),
    Snapshot(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.stats.groups.fetch_add(1, Ordering::Relaxed);
            self.stats
                .jobs
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            self.commit_group(group.drain(..));
        }
    }

    fn commit_group(&mut self, group: impl Iterator<Item = Job>) {
        let mut overlay = Overlay {
            head: self.head,
            ..Overlay::default()
        };
        let mut batch = WriteBatch::default();
        let now = now_millis();
        let replies: Vec<Reply> = group
            .map(|job| match job {
                Job::Append { req, reply } => {
                    let r = self.prepare_append(&req, &mut overlay, &mut batch, now);
                    Reply::Append(reply, r)
                }
                Job::Snapshot {
                    stream,
                    version,
                    data,
                    reply,
                } => {
                    let r =
                        self.prepare_snapshot(&stream, version, &data, &mut overlay, &mut batch);
                    Reply::Snapshot(reply, r)
                }
            })
            .collect();
        let written = if batch.is_empty() {
            Ok(())
        } else {
            let mut opts = WriteOptions::default();
            opts.set_sync(self.durability == Durability::Fsync);
            let written = self.db.write_opt(batch, &opts).map_err(|e| e.to_string());
            self.stats.note_write(&written);
            written
        };
        if written.is_ok() && overlay.head != self.head {
            self.head = overlay.head;
            self.head_tx.send_replace(self.head);
        }
        for reply in replies {
            let failed = |ok_was: &str| {
                StoreError::backend(
                    format!("committing {ok_was}"),
                    written.clone().err().unwrap_or_default(),
                )
            };
            match reply {
                Reply::Append(tx, r) => {
                    let r = match (r, &written) {
                        (Ok(_), Err(_)) => Err(failed("an append")),
                        (r, _) => r,
                    };
                    let _ = tx.send(r);
                }
                Reply::Snapshot(tx, r) => {
                    let r = match (r, &written) {
                        (Ok(_), Err(_)) => Err(failed("a snapshot")),
                        (r, _) => r,
                    };
                    let _ = tx.send(r);
                }
            }
        }
    }

    fn stream_head(&self, ov: &Overlay, stream: &StreamId) -> Result<StreamHead, StoreError> {
        match ov.streams.get(stream) {
            Some(h) => Ok(*h),
            None => read_head(&self.db, stream),
        }
    }

    fn lookup_id(&self, ov: &Overlay, id: &Uuid) -> Result<Option<IdEntry>, StoreError> {
        if let Some(e) = ov.ids.get(id) {
            return Ok(Some(e.clone()));
        }
        self.db
            .get_pinned_cf(cf(&self.db, CF_EVENT_IDS), id.as_bytes())
            .map_err(|e| StoreError::backend(format!("looking up event id {id}"), e))?
            .map(|b| decode_id_entry(&b, id))
            .transpose()
    }

    fn tag_last(&self, ov: &Overlay, tag: &str) -> Result<Position, StoreError> {
        if let Some(p) = ov.tags.get(tag) {
            return Ok(*p);
        }
        match self
            .db
            .get_pinned_cf(cf(&self.db, CF_TAGS), tag)
            .map_err(|e| StoreError::backend(format!("reading tag '{tag}'"), e))?
        {
            Some(b) => decode_u64(&b, 0, &format!("tag entry '{tag}'")),
            None => Ok(0),
        }
    }

    /// Checks one append against committed state and the group so far; on success
    /// adds its writes to `batch` and `ov`. On failure neither is touched.
    fn prepare_append(
        &self,
        req: &AppendRequest,
        ov: &mut Overlay,
        batch: &mut WriteBatch,
        now: u64,
    ) -> Result<AppendResult, StoreError> {
        let stream = &req.stream;
        // Idempotency: a retry of a committed append returns the original result.
        if let Some(first) = self.lookup_id(ov, &req.events[0].id)? {
            return self.replayed_result(req, first, ov);
        }
        for ev in &req.events[1..] {
            if let Some(entry) = self.lookup_id(ov, &ev.id)? {
                return Err(StoreError::DuplicateEventId {
                    stream: stream.clone(),
                    id: ev.id,
                    reason: format!(
                        "it was already committed to stream '{}' at version {} by another append",
                        entry.stream, entry.version
                    ),
                });
            }
        }
        let head = self.stream_head(ov, stream)?;
        if !req.expected.admits(head.version) {
            return Err(StoreError::VersionConflict {
                stream: stream.clone(),
                expected: req.expected,
                actual: head.version,
            });
        }
        if let Some(cond) = &req.condition {
            for tag in &cond.tags {
                let last = self.tag_last(ov, tag)?;
                if last > cond.after {
                    return Err(StoreError::TagConflict {
                        stream: stream.clone(),
                        tag: tag.clone(),
                        after: cond.after,
                        position: last,
                    });
                }
            }
        }
        // Every check passed: nothing below can fail.
        let (events_cf, index_cf, ids_cf, tags_cf) = (
            cf(&self.db, CF_EVENTS),
            cf(&self.db, CF_STREAM_INDEX),
            cf(&self.db, CF_EVENT_IDS),
            cf(&self.db, CF_TAGS),
        );
        let first_position = ov.head + 1;
        let mut version = head.version;
        for ev in &req.events {
            ov.head += 1;
            version += 1;
            let record = RecordedEvent {
                id: ev.id,
                stream: stream.clone(),
                event_type: ev.event_type.clone(),
                version,
                position: ov.head,
                timestamp: ev.timestamp.unwrap_or(now),
                metadata: ev.metadata.clone(),
                tags: ev.tags.clone(),
                data: ev.data.clone(),
            };
            batch.put_cf(events_cf, position_key(ov.head), encode_event(&record));
            batch.put_cf(
                index_cf,
                stream_index_key(stream, version),
                position_key(ov.head),
            );
            let entry = IdEntry {
                stream: stream.as_str().to_string(),
                position: ov.head,
                version,
            };
            batch.put_cf(ids_cf, ev.id.as_bytes(), encode_id_entry(&entry));
            ov.ids.insert(ev.id, entry);
            for tag in &ev.tags {
                batch.put_cf(tags_cf, tag.as_bytes(), ov.head.to_le_bytes());
                ov.tags.insert(tag.clone(), ov.head);
            }
        }
        let new_head = StreamHead {
            version,
            position: ov.head,
        };
        batch.put_cf(
            cf(&self.db, CF_STREAMS),
            stream.as_str(),
            encode_head(new_head),
        );
        ov.streams.insert(stream.clone(), new_head);
        Ok(AppendResult {
            first_position,
            position: ov.head,
            version,
        })
    }

    /// The first event id of `req` was committed: this is a retry if and only if
    /// every id was committed by that same append, in order.
    fn replayed_result(
        &self,
        req: &AppendRequest,
        first: IdEntry,
        ov: &Overlay,
    ) -> Result<AppendResult, StoreError> {
        let mut last = first.clone();
        for (i, ev) in req.events.iter().enumerate() {
            let entry = if i == 0 {
                first.clone()
            } else {
                self.lookup_id(ov, &ev.id)?.ok_or_else(|| StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: req.events[0].id,
                    reason: format!(
                        "it was committed by an earlier append that did not include event #{i} ({})",
                        ev.id
                    ),
                })?
            };
            if entry.stream != req.stream.as_str() || entry.version != first.version + i as u64 {
                return Err(StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: ev.id,
                    reason: format!(
                        "it was committed to stream '{}' at version {} by a different append",
                        entry.stream, entry.version
                    ),
                });
            }
            last = entry;
        }
        Ok(AppendResult {
            first_position: first.position,
            position: last.position,
            version: last.version,
        })
    }

    fn prepare_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: &Bytes,
        ov: &mut Overlay,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let latest = self.stream_head(ov, stream)?.version;
        if version > latest || version == 0 {
            return Err(StoreError::SnapshotAhead {
                stream: stream.clone(),
                version,
                latest,
            });
        }
        let existing = match ov.snapshots.get(stream) {
            Some(v) => Some(*v),
            None => self
                .db
                .get_pinned_cf(cf(&self.db, CF_SNAPSHOTS), stream.as_str())
                .map_err(|e| StoreError::backend(format!("reading the snapshot of '{stream}'"), e))?
                .map(|b| decode_u64(&b, 0, &format!("snapshot of '{stream}'")))
                .transpose()?,
        };
        // Keep the newest: an older snapshot arriving late changes nothing.
        if existing.is_some_and(|v| v > version) {
            return Ok(());
        }
        let mut value = Vec::with_capacity(8 + data.len());
        value.extend_from_slice(&version.to_le_bytes());
        value.extend_from_slice(data);
        batch.put_cf(cf(&self.db, CF_SNAPSHOTS), stream.as_str(), value);
        ov.snapshots.insert(stream.clone(), version);
        Ok(())
    }
}

/// Reads up to `max` events from position `from` to `to`, inclusive.
fn read_range(
    db: &DB,
    from: Position,
    to: Position,
    max: usize,
    max_bytes: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut out = Vec::with_capacity(max.min((to.saturating_sub(from) + 1) as usize));
    let mut it = db.raw_iterator_cf(cf(db, CF_EVENTS));
    it.seek(position_key(from));
    let mut bytes = 0usize;
    while out.len() < max && (bytes < max_bytes || out.is_empty()) {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        let pos = decode_position(k)?;
        if pos > to {
            break;
        }
        bytes += v.len();
        out.push(decode_event(pos, v)?);
        it.next();
    }
    it.status()
        .map_err(|e| StoreError::backend(format!("reading the log from position {from}"), e))?;
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    op: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::backend(op.to_string(), e))?
}

#[async_trait]
impl EventStore for EmbeddedStore {
    fn log_identity(&self) -> &str {
        &self.inner.identity
    }

    fn write_fault(&self) -> Option<String> {
        self.inner.stats.fault()
    }

    fn keeps_local_log(&self) -> bool {
        true
    }

    fn checkpoint_to(&self, dir: &Path) -> Result<Position, StoreError> {
        EmbeddedStore::checkpoint_to(self, dir)
    }

    fn unwritable_millis(&self) -> u64 {
        self.inner.stats.unwritable_millis()
    }

    async fn append(&self, req: AppendRequest) -> Result<AppendResult, StoreError> {
        validate_append(&req, &self.inner.limits)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Job::Append { req, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn latest(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        read_head(self.inner.db(), stream)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let db = self.inner.db().clone();
        let stream = stream.clone();
        blocking("reading a stream", move || {
            let prefix_len = stream.as_str().len() + 1;
            let start = stream_index_key(&stream, from_version.max(1));
            let mut positions = Vec::new();
            let mut it = db.raw_iterator_cf(cf(&db, CF_STREAM_INDEX));
            it.seek(&start);
            while positions.len() < limit {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                if k.len() != prefix_len + 8 || k[..prefix_len] != start[..prefix_len] {
                    break;
                }
                positions.push(decode_position(v)?);
                it.next();
            }
            it.status()
                .map_err(|e| StoreError::backend(format!("reading stream '{stream}'"), e))?;
            let events_cf = cf(&db, CF_EVENTS);
            let keys = positions.iter().map(|p| (events_cf, position_key(*p)));
            positions
                .iter()
                .zip(db.multi_get_cf(keys))
                .map(|(pos, got)| match got {
                    Ok(Some(v)) => decode_event(*pos, &v),
                    Ok(None) => Err(StoreError::Corrupt {
                        what: format!("stream index of '{stream}'"),
                        reason: format!("it points at position {pos}, which holds no event"),
                    }),
                    Err(e) => Err(StoreError::backend(format!("reading position {pos}"), e)),
                })
                .collect()
        })
        .await
    }

    fn tail(&self, from: Position) -> EventBatches {
        // Weak: a tail (or a task reading it ahead) never keeps the database
        // open after the store is dropped; a read in flight holds it until
        // it ends, and the store's drop waits for that (see `Inner::drop`).
        let state = (
            Arc::downgrade(self.inner.db()),
            self.inner.head.clone(),
            from.max(1),
        );
        futures::stream::unfold(state, |(db, mut head_rx, next)| async move {
            loop {
                let head = *head_rx.borrow_and_update();
                if head >= next {
                    let reader = db.upgrade()?;
                    let got = blocking("tailing the log", move || {
                        read_range(&reader, next, head, TAIL_BATCH, TAIL_BATCH_BYTES)
                    })
                    .await;
                    return match got {
                        Ok(batch) => match batch.last() {
                            Some(last) => {
                                let after = last.position + 1;
                                Some((Ok(batch), (db, head_rx, after)))
                            }
                            None => Some((
                                Err(StoreError::Corrupt {
                                    what: format!("log between positions {next} and {head}"),
                                    reason: "committed events are missing".into(),
                                }),
                                (db, head_rx, next),
                            )),
                        },
                        Err(e) => Some((Err(e), (db, head_rx, next))),
                    };
                }
                // Caught up: sleep until the writer publishes a new head. An error
                // means the store was closed, which ends the tail.
                if head_rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .boxed()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(*self.inner.head.borrow())
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Job::Snapshot {
                stream: stream.clone(),
                version,
                data,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn latest_snapshot(&self, stream: &StreamId) -> Result<Snapshot, StoreError> {
        let db = self.inner.db();
        let value = db
            .get_pinned_cf(cf(db, CF_SNAPSHOTS), stream.as_str())
            .map_err(|e| StoreError::backend(format!("reading the snapshot of '{stream}'"), e))?
            .ok_or_else(|| StoreError::SnapshotNotFound {
                stream: stream.clone(),
            })?;
        Ok(Snapshot {
            stream: stream.clone(),
            version: decode_u64(&value, 0, &format!("snapshot of '{stream}'"))?,
            data: Bytes::copy_from_slice(&value[8..]),
        })
    }
}

/// Iterates the whole log from `from` in position order (for offline tools).
pub fn scan_log(
    store: &EmbeddedStore,
    from: Position,
    max: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    read_range(store.inner.db(), from, Position::MAX, max, usize::MAX)
}
