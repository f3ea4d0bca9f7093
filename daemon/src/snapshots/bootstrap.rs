//! Bootstrap: a version that starts with an empty view looks for a snapshot
//! of its logic on this log, checks it against the log's history, fetches,
//! checks and ingests it, or waits for the instance building it, or builds
//! it itself (taking the lease). Anything found wrong refuses the snapshot
//! and the version replays.

use super::*;

impl Snapshots {
    /// Run by a warming version's worker before it opens its view: fills a
    /// fresh view from the newest snapshot of its fingerprint on this log
    /// (`store`) that holds the history the log holds, or decides to
    /// replay. `activity` is kept up to date for status.
    #[allow(clippy::too_many_arguments)]
    pub async fn bootstrap(
        &self,
        views: &ViewStore,
        view: &ViewId,
        fingerprint: &str,
        store: &dyn EventStore,
        activity: &Mutex<Option<SnapshotActivity>>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Bootstrap, SnapshotError> {
        let log = store.log_identity();
        let set = |a: Option<SnapshotActivity>| {
            if let Ok(mut g) = activity.lock() {
                *g = a;
            }
        };
        let key = snapshot_key(log, fingerprint);
        if views.abandoned_ingest(view)? {
            tracing::warn!(view = %view, "an ingest of a snapshot was cut short: the view was emptied and starts again");
        }
        let fresh = !views.exists(view)
            || (views.checkpoint(view)? == 0 && views.partitions(view)?.is_none());
        if !fresh {
            // A warm-up resumed after a restart: it goes on replaying, and
            // keeps the others waiting for its snapshot.
            if let Err(e) = self.take_lease(view, &key).await {
                tracing::warn!(view = %view, "taking the snapshot lease: {e}");
            }
            return Ok(Bootstrap::Replay);
        }
        if !self.config.bootstrap {
            return Ok(Bootstrap::Replay);
        }
        let mut announced = false;
        let mut failed_fetches = 0u32;
        loop {
            if let Some(m) = self.latest(log, fingerprint).await? {
                self.release(view).await;
                let fetched = match check_history(store, &m).await {
                    Ok(()) => self.fetch_and_ingest(views, view, &m, activity).await,
                    Err(e) => Err(e),
                };
                let e = match fetched {
                    Ok(()) => {
                        self.ingest_fault(view, false);
                        return Ok(Bootstrap::Done(m.position));
                    }
                    Err(e) => e,
                };
                match e {
                    // This host's storage failed mid-ingest: not the
                    // snapshot's fault. The worker pauses and retries; the
                    // retry empties what was ingested (its marker) first.
                    SnapshotError::View(_) if self.ingest_fault(view, true) < INGEST_TRIES => {
                        return Err(e);
                    }
                    // Not forever: the version replays (the view emptied
                    // first); the snapshot stays, for hosts that can take it.
                    SnapshotError::View(_) => {
                        views.abandoned_ingest(view)?;
                        self.ingest_fault(view, false);
                        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                        let reason = format!(
                            "this host's views database failed {INGEST_TRIES} times ingesting the snapshot at {}: {e}",
                            m.position
                        );
                        tracing::warn!(view = %view, "{reason}; replaying from the first event");
                        set(Some(SnapshotActivity::Refused { reason }));
                        return Ok(Bootstrap::Replay);
                    }
                    // Checked and found bad: never used. This instance
                    // replays; holding the key's lease, it removes the bad
                    // snapshot and publishes a good one once caught up (else
                    // every later instance would be refused by it again).
                    SnapshotError::Refused { .. } => {
                        self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                        let reason = e.to_string();
                        tracing::warn!(view = %view, "snapshot refused, replaying from the first event: {reason}");
                        match self.take_lease(view, &key).await {
                            Ok(None) => {
                                if let Err(e) = self.store.remove(&m).await {
                                    tracing::warn!(view = %view, "removing the refused snapshot at {}: {e}", m.position);
                                }
                            }
                            Ok(Some(_)) => {}
                            Err(e) => {
                                tracing::warn!(view = %view, "taking the snapshot lease: {e}")
                            }
                        }
                        set(Some(SnapshotActivity::Refused { reason }));
                        return Ok(Bootstrap::Replay);
                    }
                    // The store could not be read (a timeout, a snapshot
                    // pruned while it downloaded): tried again, newest
                    // first, three times before replaying.
                    e if failed_fetches < 3 => {
                        failed_fetches += 1;
                        let wait = Duration::from_millis(500 << failed_fetches);
                        tracing::warn!(view = %view, "fetching the snapshot at {} failed, trying again in {wait:?}: {e}", m.position);
                        tokio::select! {
                            _ = stop.changed() => return Ok(Bootstrap::Stopped),
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                    e => {
                        let reason = format!("the snapshot store failed 4 times: {e}");
                        tracing::warn!(view = %view, "{reason}; replaying from the first event");
                        set(Some(SnapshotActivity::Refused { reason }));
                        return Ok(Bootstrap::Replay);
                    }
                }
            }
            if self.holds_lease(view).await {
                set(Some(SnapshotActivity::Building));
                return Ok(Bootstrap::Replay);
            }
            match self.take_lease(view, &key).await? {
                // Taken: look once more (its holder may have published and
                // let go just now), then build.
                None => continue,
                Some(holder) => {
                    if !announced {
                        tracing::info!(view = %view, %holder, "another instance is building this fingerprint: waiting for its snapshot");
                        announced = true;
                    }
                    set(Some(SnapshotActivity::Waiting { holder }));
                    tokio::select! {
                        _ = stop.changed() => return Ok(Bootstrap::Stopped),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    pub(super) async fn fetch_and_ingest(
        &self,
        views: &ViewStore,
        view: &ViewId,
        m: &SnapshotManifest,
        activity: &Mutex<Option<SnapshotActivity>>,
    ) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let refused = |reason: String| SnapshotError::Refused {
            snapshot: format!("{} at {} ({})", m.view, m.position, m.path()),
            reason,
        };
        if m.files.iter().any(|f| !safe_name(&f.name)) {
            return Err(refused("a file name that is not a plain name".into()));
        }
        let dir = self
            .config
            .work_dir
            .join(format!("incoming-{view}-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("creating {}", dir.display())))?;
        let result = async {
            let total = m.file_bytes();
            let done = AtomicU64::new(0);
            let report = |done: u64| {
                if let Ok(mut g) = activity.lock() {
                    *g = Some(SnapshotActivity::Downloading {
                        position: m.position,
                        done_bytes: done,
                        total_bytes: total,
                    });
                }
            };
            report(0);
            let mut ssts = Vec::new();
            let mut parked = Vec::new();
            for f in &m.files {
                let local = dir.join(&f.name);
                let before = done.load(Ordering::Relaxed);
                let remote = format!("{}/{}", m.path(), f.name);
                let got = self.store.get(&remote, &local, &done);
                let ticker = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        report(done.load(Ordering::Relaxed));
                    }
                };
                tokio::select! {
                    r = got => r?,
                    _ = ticker => unreachable!("the ticker never ends"),
                }
                report(done.load(Ordering::Relaxed));
                let (size, hash) = hash_file(&local).await?;
                if size != f.size {
                    return Err(refused(format!(
                        "{}: {size} bytes arrived, the manifest says {} (truncated?)",
                        f.name, f.size
                    )));
                }
                if hash != f.blake3 {
                    return Err(refused(format!(
                        "{}: its blake3 differs from the manifest's",
                        f.name
                    )));
                }
                self.metrics
                    .downloaded_bytes
                    .fetch_add(done.load(Ordering::Relaxed) - before, Ordering::Relaxed);
                if f.name == PARKED_FILE {
                    let bytes = tokio::fs::read(&local)
                        .await
                        .map_err(io(format!("reading {}", local.display())))?;
                    parked = decode_parked(&bytes)
                        .ok_or_else(|| refused("its dead-letter file is malformed".into()))?;
                } else {
                    ssts.push(local);
                }
            }
            if parked.len() as u64 != m.parked {
                return Err(refused(format!(
                    "{} dead letters, the manifest says {}",
                    parked.len(),
                    m.parked
                )));
            }
            let expect = ViewDigest {
                position: m.position,
                documents: m.documents,
                bytes: m.bytes,
                digest: m.digest.clone(),
            };
            let (views, view2) = (views.clone(), view.clone());
            let built_by = m.built_by().to_string();
            tokio::task::spawn_blocking(move || {
                views.ingest(&view2, &ssts, &expect, &parked, &built_by)
            })
            .await
            .map_err(|e| SnapshotError::Internal(format!("ingesting panicked: {e}")))?
            .map_err(|e| match e {
                ViewError::DigestMismatch { reason, .. } => refused(reason),
                e => e.into(),
            })
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        result?;
        let millis = started.elapsed().as_millis() as u64;
        self.metrics.bootstraps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .download_millis
            .fetch_add(millis, Ordering::Relaxed);
        if let Ok(mut p) = self.published.lock() {
            p.insert(view.clone(), (m.position, Instant::now()));
        }
        if let Ok(mut g) = activity.lock() {
            *g = Some(SnapshotActivity::Bootstrapped {
                position: m.position,
                bytes: m.file_bytes(),
                millis,
                instance: m.instance.clone(),
            });
        }
        tracing::info!(view = %view, position = m.position, bytes = m.file_bytes(), millis, from = %m.instance, "bootstrapped from a snapshot: tailing from the next event");
        Ok(())
    }

    /// Counts a failed ingest of `view` (`failed: false` forgets them); how
    /// many in a row.
    pub(super) fn ingest_fault(&self, view: &ViewId, failed: bool) -> u32 {
        let mut faults = self.ingest_faults.lock().unwrap_or_else(|p| p.into_inner());
        if !failed {
            faults.remove(view);
            return 0;
        }
        let n = faults.entry(view.clone()).or_default();
        *n += 1;
        *n
    }
}
