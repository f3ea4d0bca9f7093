//! The lifecycle's side of view snapshots (docs/fleet.md, "Snapshots and
//! bootstrap"; the store, manifests and leases are `crate::snapshots`): a
//! snapshot on command, the one a warm-up ships once caught up, periodic
//! ones, and letting go of the building lease when a warm-up makes no
//! progress. Bootstrap itself runs in the worker, before its first event.

use super::*;

impl Lifecycle {
    /// The snapshot store, or [`LifecycleError::SnapshotsOff`].
    fn snapshots_on(&self) -> Result<Arc<Snapshots>, LifecycleError> {
        self.inner
            .config
            .snapshots
            .clone()
            .ok_or(LifecycleError::SnapshotsOff)
    }

    /// Takes a snapshot of version `spec`'s view now and publishes it
    /// (`POST /admin/views/{id}/snapshot`); the store's newest one when it
    /// already holds one at the view's position.
    pub async fn snapshot(&self, spec: &str) -> Result<SnapshotManifest, LifecycleError> {
        self.inner.check_running()?;
        let snapshots = self.snapshots_on()?;
        let resolved = self.resolve_version(spec)?;
        let (physical, state, fingerprint) = {
            let st = self.inner.lock();
            let e = st.registry.entries.get(&resolved.version).ok_or_else(|| {
                LifecycleError::UnknownView {
                    spec: spec.to_string(),
                }
            })?;
            let physical = e.physical().clone();
            let state = st.registry.physical_state(&physical);
            let fingerprint = st
                .registry
                .entries
                .get(&physical)
                .map_or_else(|| e.fingerprint.clone(), |p| p.fingerprint.clone());
            (physical, (e.state, state), fingerprint)
        };
        if !matches!(
            state.0,
            ViewState::Ready | ViewState::Active | ViewState::Standby
        ) || state.1 != Physical::Live
        {
            return Err(LifecycleError::NotSnapshottable {
                id: resolved.version,
                state: state.0,
            });
        }
        let log = self.inner.store.log_identity();
        let failed = |e: SnapshotError| match e {
            SnapshotError::LeaseHeld(holder) => LifecycleError::SnapshotBusy {
                id: physical.clone(),
                holder,
            },
            e => LifecycleError::Snapshot {
                id: physical.clone(),
                reason: e.to_string(),
            },
        };
        match snapshots
            .publish(
                &self.inner.views,
                &physical,
                &fingerprint,
                &self.inner.store,
            )
            .await
            .map_err(failed)?
        {
            Some(m) => Ok(m),
            None => snapshots
                .latest(log, &fingerprint)
                .await
                .map_err(failed)?
                .ok_or(LifecycleError::NothingToSnapshot { id: physical }),
        }
    }

    /// Every snapshot in the store (`GET /admin/snapshots`).
    pub async fn snapshots(&self) -> Result<Vec<SnapshotManifest>, LifecycleError> {
        let snapshots = self.snapshots_on()?;
        snapshots
            .list()
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))
    }

    /// The snapshot counters, when snapshots are on.
    pub fn snapshot_metrics(&self) -> Option<&crate::snapshots::SnapshotMetrics> {
        self.inner.config.snapshots.as_ref().map(|s| &s.metrics)
    }
}

impl Inner {
    /// A version caught up: the warm-up this instance ran (holding the
    /// snapshot lease) is shipped to the snapshot store in the background.
    pub(super) fn ship_built(
        self: &Arc<Self>,
        snapshots: Arc<Snapshots>,
        id: &ViewId,
        fingerprint: String,
    ) {
        let (this, id) = (self.clone(), id.clone());
        let task = tokio::spawn(async move {
            let progress = this.lock().progress.get(&id).cloned();
            let built = progress.as_ref().is_some_and(|p| {
                p.snapshot
                    .lock()
                    .is_ok_and(|g| *g == Some(SnapshotActivity::Building))
            });
            // A lease that lapsed while this instance built (an outage
            // of the snapshot store past the lease's TTL, a stall): the
            // view is built all the same, so it ships it unless another
            // instance has published meanwhile; `publish` takes the
            // lease only when free, so one building now goes on alone.
            let ships = snapshots.holds_lease(&id).await
                || (built
                    && matches!(
                        snapshots
                            .latest(this.store.log_identity(), &fingerprint)
                            .await,
                        Ok(None)
                    ));
            if !ships {
                return;
            }
            let empty = progress.as_ref().is_some_and(|p| p.checkpoint() == 0);
            let published = this.publish_snapshot(&snapshots, &id, &fingerprint).await;
            // Caught up having applied no event (deployed on an empty
            // log): nothing was published, and nothing is being built.
            if published.is_none()
                && empty
                && let Some(p) = progress
                && let Ok(mut g) = p.snapshot.lock()
                && *g == Some(SnapshotActivity::Building)
            {
                *g = None;
            }
        });
        self.push_background(task);
    }

    /// Publishes a snapshot of physical view `id`, logging the outcome.
    pub(super) async fn publish_snapshot(
        &self,
        snapshots: &Arc<Snapshots>,
        id: &ViewId,
        fingerprint: &str,
    ) -> Option<SnapshotManifest> {
        match snapshots
            .publish(&self.views, id, fingerprint, &self.store)
            .await
        {
            Ok(m) => m,
            Err(SnapshotError::LeaseHeld(holder)) => {
                tracing::debug!(view = %id, %holder, "not publishing a snapshot: another instance is");
                None
            }
            Err(e) => {
                tracing::warn!(view = %id, "publishing a snapshot: {e}");
                None
            }
        }
    }

    /// Periodic snapshots (`[snapshots] every`): live physical views whose
    /// last snapshot is far enough behind, one at a time.
    pub(super) async fn periodic_snapshots(self: &Arc<Self>, snapshots: &Arc<Snapshots>) {
        let due: Vec<(ViewId, String)> = {
            let st = self.lock();
            st.registry
                .entries
                .values()
                .filter(|e| e.alias_of.is_none())
                .filter(|e| {
                    matches!(
                        e.state,
                        ViewState::Ready | ViewState::Active | ViewState::Standby
                    )
                })
                .filter(|e| st.workers.contains_key(&e.id))
                .filter(|e| {
                    st.progress
                        .get(&e.id)
                        .is_some_and(|p| snapshots.due(&e.id, p.checkpoint()))
                })
                .map(|e| (e.id.clone(), e.fingerprint.clone()))
                .collect()
        };
        for (id, fingerprint) in due {
            // Another instance may have published since: count from it.
            if let Ok(Some(m)) = snapshots
                .latest(self.store.log_identity(), &fingerprint)
                .await
            {
                snapshots.note_published(&id, m.position);
            }
            let checkpoint = self.lock().progress.get(&id).map(|p| p.checkpoint());
            if checkpoint.is_some_and(|c| snapshots.due(&id, c)) {
                self.publish_snapshot(snapshots, &id, &fingerprint).await;
            }
        }
    }

    /// Every 250 ms: refresh the head, sample rates, retire standbys whose
    /// grace period is over.
    /// A warm-up holding a snapshot lease whose checkpoint has not moved
    /// for `stall_after` while the log is ahead of it lets go of the lease
    /// (issue 25, item 4): the instances waiting for its snapshot build
    /// instead of waiting on a holder alive but stuck (a guest spinning to
    /// its deadline, a tail that does not move), since refreshing a lease
    /// says only that the holder is alive. It publishes later only if it
    /// takes the lease again once caught up.
    ///
    /// Progress is events applied (a partitioned warm-up's checkpoint stays
    /// at its split until it merges); `seen` is each warming view's count
    /// and since when it has not changed.
    pub(super) async fn release_stuck_builders(&self, seen: &mut HashMap<ViewId, (u64, Instant)>) {
        let Some(snapshots) = &self.config.snapshots else {
            return;
        };
        let head = self.head.load(Ordering::Acquire);
        let now = Instant::now();
        let stuck: Vec<ViewId> = {
            let st = self.lock();
            let before = std::mem::take(seen);
            for (v, p) in st.progress.iter() {
                if !p.warming.load(Ordering::Acquire) || p.checkpoint() >= head {
                    continue;
                }
                let applied = p.applied.load(Ordering::Relaxed);
                let since = match before.get(v) {
                    Some((a, since)) if *a == applied => *since,
                    _ => now,
                };
                seen.insert(v.clone(), (applied, since));
            }
            seen.iter()
                .filter(|(_, (_, since))| now.duration_since(*since) >= self.config.stall_after)
                .map(|(v, _)| v.clone())
                .collect()
        };
        for view in stuck {
            if snapshots.holds_lease(&view).await {
                tracing::warn!(
                    view = %view,
                    stalled_for = ?self.config.stall_after,
                    "building, but no progress: letting go of the snapshot lease so another instance builds"
                );
                snapshots.release(&view).await;
            }
        }
    }
}
