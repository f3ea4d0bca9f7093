//! Snapshots in a JetStream object store bucket (`--snapshot-bucket`,
//! e.g. `KILN_VIEWS`) on the server the log is on: every instance of a fleet
//! reads and publishes there. Object names are the directory store's paths
//! (`<key>/<position>/<file>`); the manifest is put last.
//!
//! The lease of a key is an entry in the KV bucket `<bucket>_LEASES`, made
//! with `create` (it succeeds only when the key is absent: the server
//! decides, not a client-side lock). The bucket's `max_age` is the lease's
//! time to live; the holder refreshes its entry with a revision-checked
//! `update` every third of it, so a holder that dies lets go within the TTL,
//! and releases it with a revision-checked purge (never someone else's).
//! A bucket made with a shorter `max_age` than this instance's TTL (an
//! earlier `lease_ttl_secs`) is raised to it when the store opens, else
//! every lease would lapse before its first refresh; it is never lowered
//! (an instance with a longer TTL may share the bucket: a longer `max_age`
//! only makes a dead holder's lease last longer).
//!
//! An upload cut short (a crash, a lost connection) leaves the chunks it
//! sent under `$O.<bucket>.C.<nuid>` with no object naming them: nothing
//! lists them. Each sweep also lists the bucket's chunk subjects, and
//! purges those no object names that have not grown for a lease TTL since
//! an earlier sweep saw them (judged by what this process sees change, on
//! its own clock: an upload under way sends a chunk at least that often,
//! or has lost its lease and could publish nothing anyway).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use async_nats::jetstream::{self, kv, object_store};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{HeldLease, Lease, MANIFEST, SnapshotError, SnapshotManifest, SnapshotStore, io};

/// How long a lease lives unless refreshed.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

pub struct ObjectStore {
    bucket: String,
    objects: object_store::ObjectStore,
    /// The bucket's stream (its chunk subjects are listed from it).
    stream: jetstream::stream::Stream,
    leases: kv::Store,
    ttl: Duration,
    /// Chunk subjects no object names, as an earlier sweep saw them: their
    /// message count, and since when it has not changed.
    orphans: Mutex<HashMap<String, (usize, Instant)>>,
}

impl ObjectStore {
    /// Opens bucket `bucket` (and its lease bucket), creating them when
    /// missing, with `replicas` replicas.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        ttl: Duration,
    ) -> Result<Self, SnapshotError> {
        let store_err = |op: &str, e: String| SnapshotError::Store {
            store: format!("object store {bucket}"),
            op: op.to_string(),
            reason: e,
        };
        let objects = match js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.to_string(),
                    description: Some("kiln view snapshots".into()),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| store_err("creating the bucket", e.to_string()))?,
        };
        let lease_bucket = format!("{bucket}_LEASES");
        let lease_config = |max_age: Duration, replicas: usize| kv::Config {
            bucket: lease_bucket.clone(),
            description: "kiln snapshot leases (one publisher per view)".into(),
            history: 1,
            max_age,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let leases = match js.get_key_value(&lease_bucket).await {
            Ok(s) => {
                let config = s
                    .status()
                    .await
                    .map_err(|e| store_err("reading the lease bucket", e.to_string()))?
                    .info
                    .config;
                if config.max_age < ttl {
                    tracing::info!(
                        bucket = %lease_bucket,
                        "raising the lease bucket's max_age from {:?} to the lease TTL {ttl:?}",
                        config.max_age
                    );
                    js.update_key_value(lease_config(ttl, config.num_replicas))
                        .await
                        .map_err(|e| {
                            store_err("raising the lease bucket's max_age", e.to_string())
                        })?
                } else {
                    s
                }
            }
            Err(_) => js
                .create_key_value(lease_config(ttl, replicas))
                .await
                .map_err(|e| store_err("creating the lease bucket", e.to_string()))?,
        };
        let stream = js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| store_err("opening the bucket's stream", e.to_string()))?;
        Ok(ObjectStore {
            bucket: bucket.to_string(),
            objects,
            stream,
            leases,
            ttl,
            orphans: Mutex::new(HashMap::new()),
        })
    }

    fn err(&self, op: impl Into<String>, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Store {
            store: self.describe(),
            op: op.into(),
            reason: e.to_string(),
        }
    }

    /// Purges the chunks of uploads cut short (see the module docs): chunk
    /// subjects no object names, unchanged for a TTL since a sweep saw
    /// them. How many chunks went.
    pub async fn sweep_chunks(&self) -> Result<u64, SnapshotError> {
        let prefix = format!("$O.{}.C.", self.bucket);
        let mut chunks = Vec::new();
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| self.err("listing chunk subjects", e))?;
        while let Some(s) = subjects.next().await {
            chunks.push(s.map_err(|e| self.err("listing chunk subjects", e))?);
        }
        // Listed after the chunks: an upload that ends in between is named.
        let mut named = HashSet::new();
        let mut list = self
            .objects
            .list()
            .await
            .map_err(|e| self.err("listing", e))?;
        while let Some(info) = list.next().await {
            named.insert(info.map_err(|e| self.err("listing", e))?.nuid);
        }
        let now = Instant::now();
        let mut purge = Vec::new();
        {
            let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            let before = std::mem::take(&mut *orphans);
            for (subject, count) in chunks {
                let Some(nuid) = subject.strip_prefix(&prefix) else {
                    continue;
                };
                if named.contains(nuid) {
                    continue;
                }
                match before.get(&subject) {
                    Some((seen, since)) if *seen == count => {
                        if now.duration_since(*since) >= self.ttl {
                            purge.push((subject, count));
                        } else {
                            orphans.insert(subject, (count, *since));
                        }
                    }
                    _ => {
                        orphans.insert(subject, (count, now));
                    }
                }
            }
        }
        let mut removed = 0;
        for (subject, count) in purge {
            self.stream
                .purge()
                .filter(&subject)
                .await
                .map_err(|e| self.err(format!("purging {subject}"), e))?;
            tracing::info!(subject = %subject, chunks = count, "purged the chunks of an upload cut short");
            removed += count as u64;
        }
        Ok(removed)
    }

    async fn names(&self) -> Result<Vec<String>, SnapshotError> {
        let mut list = self
            .objects
            .list()
            .await
            .map_err(|e| self.err("listing", e))?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| self.err("listing", e))?;
            if !info.deleted {
                out.push(info.name);
            }
        }
        Ok(out)
    }

    /// The manifest stored as `name`: `Ok(None)` when it does not parse or
    /// is not where it says it is (skipped with a warning: one bad object
    /// stops nothing else); a store that cannot be read is an error, not
    /// an absent snapshot.
    async fn read_manifest(&self, name: &str) -> Result<Option<SnapshotManifest>, SnapshotError> {
        let mut object = match self.objects.get(name).await {
            Ok(o) => o,
            // Removed between the listing and now.
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(format!("reading {name}"), e)),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(io(format!("reading {name}")))?;
        Ok(super::parse_manifest(&bytes, name))
    }

    async fn manifests_where(
        &self,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let suffix = format!("/{MANIFEST}");
        let mut out = Vec::new();
        for name in self.names().await? {
            if name.ends_with(&suffix)
                && keep(&name)
                && let Some(m) = self.read_manifest(&name).await?
            {
                out.push(m);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl SnapshotStore for ObjectStore {
    fn describe(&self) -> String {
        format!("object store {}", self.bucket)
    }

    async fn manifests(&self, key: &str) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let prefix = format!("{key}/");
        self.manifests_where(|n| n.starts_with(&prefix)).await
    }

    async fn all_manifests(&self) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        self.manifests_where(|_| true).await
    }

    async fn put(&self, path: &str, from: &Path) -> Result<(), SnapshotError> {
        let mut file = tokio::fs::File::open(from)
            .await
            .map_err(io(format!("opening {}", from.display())))?;
        self.objects
            .put(path, &mut file)
            .await
            .map_err(|e| self.err(format!("uploading {path}"), e))?;
        Ok(())
    }

    async fn get(&self, path: &str, to: &Path, done: &AtomicU64) -> Result<(), SnapshotError> {
        let mut object = self
            .objects
            .get(path)
            .await
            .map_err(|e| self.err(format!("downloading {path}"), e))?;
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(io(format!("creating {}", to.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = object
                .read(&mut buf)
                .await
                .map_err(|e| self.err(format!("downloading {path}"), e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .await
                .map_err(io(format!("writing {}", to.display())))?;
            done.fetch_add(n as u64, Ordering::Relaxed);
        }
        file.flush()
            .await
            .map_err(io(format!("writing {}", to.display())))?;
        Ok(())
    }

    async fn remove(&self, manifest: &SnapshotManifest) -> Result<(), SnapshotError> {
        let base = manifest.path();
        // The manifest first: a half-removed snapshot is never listed.
        let manifest_name = format!("{base}/{MANIFEST}");
        self.objects
            .delete(&manifest_name)
            .await
            .map_err(|e| self.err(format!("removing {manifest_name}"), e))?;
        for f in &manifest.files {
            let name = format!("{base}/{}", f.name);
            if let Err(e) = self.objects.delete(&name).await {
                tracing::warn!("removing the snapshot file {name}: {e}");
            }
        }
        Ok(())
    }

    async fn sweep(&self, key: &str) -> Result<usize, SnapshotError> {
        let prefix = format!("{key}/");
        let names: Vec<String> = self
            .names()
            .await?
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        let base = |n: &str| n.rsplit_once('/').map(|(b, _)| b.to_string());
        let complete: std::collections::HashSet<String> = names
            .iter()
            .filter(|n| n.ends_with(&format!("/{MANIFEST}")))
            .filter_map(|n| base(n))
            .collect();
        let mut removed = 0;
        for n in &names {
            if base(n).is_some_and(|b| !complete.contains(&b)) {
                self.objects
                    .delete(n)
                    .await
                    .map_err(|e| self.err(format!("removing {n}"), e))?;
                removed += 1;
            }
        }
        // And chunks no object names (an upload cut short under any key).
        match self.sweep_chunks().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(chunks = n, "purged chunks no snapshot file names"),
            Err(e) => tracing::warn!("sweeping chunks no snapshot file names: {e}"),
        }
        Ok(removed)
    }

    async fn lease(&self, key: &str, holder: &str) -> Result<Lease, SnapshotError> {
        let taken = match self
            .leases
            .create(key, bytes::Bytes::from(holder.to_string()))
            .await
        {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = match self.leases.entry(key).await {
                    Ok(Some(v)) if v.operation == kv::Operation::Put => v,
                    // Gone meanwhile: free next time.
                    Ok(_) => return Ok(Lease::HeldBy("(just released)".to_string())),
                    Err(e) => return Err(self.err("reading a lease", e)),
                };
                let by = String::from_utf8_lossy(&entry.value).into_owned();
                if by != holder {
                    return Ok(Lease::HeldBy(by));
                }
                // Held under this instance's own name: by an earlier run
                // of it that stopped without releasing (this run asks only
                // for leases it does not hold). Taken over at once.
                match self
                    .leases
                    .update(key, bytes::Bytes::from(holder.to_string()), entry.revision)
                    .await
                {
                    Ok(revision) => revision,
                    Err(_) => return Ok(Lease::HeldBy(by)),
                }
            }
            Err(e) => return Err(self.err("taking a lease", e)),
        };
        let revision = Arc::new(AtomicU64::new(taken));
        let lost = Arc::new(AtomicBool::new(false));
        let (leases, key2, holder2, rev2, lost2) = (
            self.leases.clone(),
            key.to_string(),
            holder.to_string(),
            revision.clone(),
            lost.clone(),
        );
        let (ttl, every) = (self.ttl, self.ttl / 3);
        let refresher = tokio::spawn(async move {
            let mut refreshed = tokio::time::Instant::now();
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                let at = rev2.load(Ordering::Acquire);
                match leases
                    .update(&key2, bytes::Bytes::from(holder2.clone()), at)
                    .await
                {
                    Ok(r) => {
                        rev2.store(r, Ordering::Release);
                        refreshed = tokio::time::Instant::now();
                        wait = every;
                    }
                    // Another holder's now: it lapsed and was taken.
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        tracing::warn!(key = %key2, "a snapshot lease was lost: {e}");
                        lost2.store(true, Ordering::Release);
                        return;
                    }
                    // A timeout or a broken connection: tried again each
                    // second until the lease would have lapsed.
                    Err(e) if refreshed.elapsed() + Duration::from_secs(1) < ttl => {
                        tracing::debug!(key = %key2, "refreshing a snapshot lease failed, trying again: {e}");
                        wait = Duration::from_secs(1);
                    }
                    Err(e) => {
                        tracing::warn!(key = %key2, "refreshing a snapshot lease failed until it lapsed: {e}");
                        lost2.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        });
        Ok(Lease::Held(Box::new(KvLease {
            leases: self.leases.clone(),
            key: key.to_string(),
            revision,
            lost,
            refresher,
        })))
    }
}

struct KvLease {
    leases: kv::Store,
    key: String,
    revision: Arc<AtomicU64>,
    lost: Arc<AtomicBool>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for KvLease {
    fn drop(&mut self) {
        // Dropped without a release: it lapses after its TTL.
        self.refresher.abort();
    }
}

#[async_trait]
impl HeldLease for KvLease {
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    async fn release(self: Box<Self>) {
        self.refresher.abort();
        let at = self.revision.load(Ordering::Acquire);
        if let Err(e) = self.leases.purge_expect_revision(&self.key, Some(at)).await {
            tracing::debug!(key = %self.key, "releasing a snapshot lease: {e} (it lapses by itself)");
        }
    }
}
