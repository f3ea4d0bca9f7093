//! Publishing: export a view from one RocksDB snapshot, hash and upload its
//! files under the building lease, the manifest last; on a thread of its
//! own at the lowest CPU priority so live views go first.

use super::*;

impl Snapshots {
    /// Exports `view` (built by `fingerprint` from the log `store`) as it
    /// stands, uploads it and prunes older snapshots of its key. `Ok(None)`
    /// when the store already has a snapshot at that position.
    ///
    /// The export, hashing and upload run on a thread of their own at the
    /// lowest CPU priority (nice 19), with a runtime of its own: a snapshot
    /// takes the CPU live views leave, so it does not delay them. The event
    /// at the snapshot's position is read on the caller's runtime (the
    /// log's client lives there).
    pub async fn publish(
        self: &Arc<Self>,
        views: &ViewStore,
        view: &ViewId,
        fingerprint: &str,
        store: &Arc<dyn EventStore>,
    ) -> Result<Option<SnapshotManifest>, SnapshotError> {
        let _one = self.publishing.lock().await;
        let key = snapshot_key(store.log_identity(), fingerprint);
        if let Some(holder) = self.take_lease(view, &key).await? {
            return Err(SnapshotError::LeaseHeld(holder));
        }
        let (this, views2, view2, fingerprint2) = (
            self.clone(),
            views.clone(),
            view.clone(),
            fingerprint.to_string(),
        );
        let log = LogHandle {
            store: store.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let result = in_background(move || async move {
            this.publish_leased(&views2, &view2, &fingerprint2, &log)
                .await
        })
        .await;
        self.release(view).await;
        if result.is_err() {
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    pub(super) async fn publish_leased(
        &self,
        views: &ViewStore,
        view: &ViewId,
        fingerprint: &str,
        handle: &LogHandle,
    ) -> Result<Option<SnapshotManifest>, SnapshotError> {
        let log = handle.store.log_identity();
        let started = Instant::now();
        let dir = self
            .config
            .work_dir
            .join(format!("outgoing-{view}-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("creating {}", dir.display())))?;
        let result = async {
            let (views2, view2, dir2) = (views.clone(), view.clone(), dir.clone());
            let (max, rate) = (self.config.max_file_bytes, self.config.max_bytes_per_sec);
            let exported =
                tokio::task::spawn_blocking(move || views2.export(&view2, &dir2, max, rate))
                    .await
                    .map_err(|e| SnapshotError::Internal(format!("exporting panicked: {e}")))??;
            let mut existing = self
                .store
                .manifests(&snapshot_key(log, fingerprint))
                .await?;
            let position = exported.digest.position;
            // An empty log's view is no shortcut for anyone.
            if position == 0
                || existing
                    .iter()
                    .any(|m| m.position == position && m.format == FORMAT)
            {
                return Ok::<_, SnapshotError>((None, existing));
            }
            let event = handle.event_at(position).await?.ok_or_else(|| {
                SnapshotError::Internal(format!(
                    "{view}'s checkpoint {position} is no event of the log: not published"
                ))
            })?;
            // A snapshot of another format at this position (an older
            // kiln's) is replaced, never mixed with this one's files.
            for old in existing.iter().filter(|m| m.position == position) {
                self.store.remove(old).await?;
            }
            // (and never pruned below: its path is this snapshot's now)
            existing.retain(|m| m.position != position);
            let mut paths = exported.files.clone();
            let parked_path = dir.join(PARKED_FILE);
            tokio::fs::write(&parked_path, encode_parked(&exported.parked))
                .await
                .map_err(io(format!("writing {}", parked_path.display())))?;
            paths.push(parked_path);
            let mut files = Vec::new();
            for p in &paths {
                let (size, blake3) = hash_file(p).await?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                files.push(SnapshotFile { name, size, blake3 });
            }
            let manifest = SnapshotManifest {
                format: FORMAT,
                kiln: env!("CARGO_PKG_VERSION").to_string(),
                view: view.to_string(),
                fingerprint: fingerprint.to_string(),
                log: log.to_string(),
                position,
                event: Some(EventAt::of(&event)),
                documents: exported.digest.documents,
                bytes: exported.digest.bytes,
                digest: exported.digest.digest.clone(),
                parked: exported.parked.len() as u64,
                files,
                instance: self.config.instance.clone(),
                created_millis: now_millis(),
                // Filled from another's snapshot: that one's lineage.
                built_by: views.lineage(view)?.filter(|b| *b != self.config.instance),
            };
            for (p, f) in paths.iter().zip(&manifest.files) {
                self.store
                    .put(&format!("{}/{}", manifest.path(), f.name), p)
                    .await?;
            }
            // The manifest makes it a snapshot: only under a lease still held.
            self.still_leased(view).await?;
            let manifest_path = dir.join(MANIFEST);
            let text = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| SnapshotError::Internal(e.to_string()))?;
            tokio::fs::write(&manifest_path, text)
                .await
                .map_err(io(format!("writing {}", manifest_path.display())))?;
            self.store
                .put(&format!("{}/{MANIFEST}", manifest.path()), &manifest_path)
                .await?;
            Ok((Some(manifest), existing))
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let (manifest, existing) = result?;
        let Some(manifest) = manifest else {
            return Ok(None);
        };
        let millis = started.elapsed().as_millis() as u64;
        self.metrics.published.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .uploaded_bytes
            .fetch_add(manifest.file_bytes(), Ordering::Relaxed);
        self.metrics
            .upload_millis
            .fetch_add(millis, Ordering::Relaxed);
        if let Ok(mut p) = self.published.lock() {
            p.insert(view.clone(), (manifest.position, Instant::now()));
        }
        tracing::info!(view = %view, position = manifest.position, documents = manifest.documents, bytes = manifest.file_bytes(), millis, store = %self.store.describe(), "published a snapshot");
        let sweep = match self.still_leased(view).await {
            Ok(()) => self.store.sweep(&snapshot_key(log, fingerprint)).await,
            Err(_) => Ok(0),
        };
        match sweep {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(view = %view, files = n, "removed the files of an interrupted snapshot upload")
            }
            Err(e) => tracing::warn!(view = %view, "sweeping interrupted snapshot uploads: {e}"),
        }
        // Newest `keep` stay.
        let mut older: Vec<SnapshotManifest> = existing;
        older.sort_by_key(|m| std::cmp::Reverse(m.position));
        for m in older.into_iter().skip(self.config.keep.saturating_sub(1)) {
            if let Err(e) = self.store.remove(&m).await {
                tracing::warn!(view = %view, "pruning the snapshot at {}: {e}", m.position);
            }
        }
        Ok(Some(manifest))
    }
}

/// The log a snapshot is published from, and the runtime its client runs on.
pub(super) struct LogHandle {
    store: Arc<dyn EventStore>,
    runtime: tokio::runtime::Handle,
}

impl LogHandle {
    /// [`event_at`], run on the log's runtime.
    async fn event_at(&self, position: Position) -> Result<Option<RecordedEvent>, SnapshotError> {
        let store = self.store.clone();
        self.runtime
            .spawn(async move { event_at(store.as_ref(), position).await })
            .await
            .map_err(|e| SnapshotError::Internal(format!("reading the event at {position}: {e}")))?
    }
}

/// Runs `work` to completion on a new thread at the lowest CPU priority,
/// with a current-thread runtime of its own (threads it starts, such as the
/// runtime's blocking pool, inherit the priority).
pub(super) async fn in_background<F, Fut, T>(work: F) -> Result<T, SnapshotError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, SnapshotError>>,
    T: Send + 'static,
{
    let (mut tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kiln-snapshot".into())
        .spawn(move || {
            crate::background::lowest_priority();
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                // The caller gone (its task aborted at shutdown or a crash):
                // the work is dropped with it, letting go of the views.
                Ok(rt) => rt.block_on(async {
                    tokio::select! {
                        r = work() => Some(r),
                        _ = tx.closed() => None,
                    }
                }),
                Err(e) => Some(Err(SnapshotError::Internal(format!(
                    "starting the snapshot runtime: {e}"
                )))),
            };
            if let Some(result) = result {
                let _ = tx.send(result);
            }
        })
        .map_err(io("starting the snapshot thread"))?;
    rx.await
        .map_err(|_| SnapshotError::Internal("the snapshot thread panicked".into()))?
}

/// Size and blake3 (hex) of a local file.
pub(super) async fn hash_file(path: &Path) -> Result<(u64, String), SnapshotError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut h = blake3::Hasher::new();
        let file = std::fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        h.update_reader(file)
            .map_err(io(format!("reading {}", path.display())))?;
        let size = std::fs::metadata(&path)
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        Ok((size, h.finalize().to_hex().to_string()))
    })
    .await
    .map_err(|e| SnapshotError::Internal(format!("hashing panicked: {e}")))?
}

/// Dead letters as `[u64 position][u32 length][record]…`, big-endian.
pub(super) fn encode_parked(parked: &[(Position, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (at, record) in parked {
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&(record.len() as u32).to_be_bytes());
        out.extend_from_slice(record);
    }
    out
}
