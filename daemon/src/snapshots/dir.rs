//! Snapshots in a directory (`--snapshot-dir`): `<dir>/<key>/<position>/`
//! holds a snapshot's files and, written last by rename, its manifest.
//!
//! It needs no lease: one process owns a log on the embedded store, and
//! snapshots of other logs live under other keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::{MANIFEST, SnapshotError, SnapshotManifest, SnapshotStore, io};

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// Snapshots under `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SnapshotError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(format!(
            "creating the snapshot directory {}",
            root.display()
        )))?;
        Ok(DirStore { root })
    }

    fn at(&self, path: &str) -> Result<PathBuf, SnapshotError> {
        // Paths are made by kiln from hex keys, positions and plain names.
        if path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(SnapshotError::Internal(format!(
                "not a snapshot path: {path:?}"
            )));
        }
        Ok(self.root.join(path))
    }

    async fn read_manifests(&self, key_dir: &Path, out: &mut Vec<SnapshotManifest>) {
        let Ok(mut entries) = tokio::fs::read_dir(key_dir).await else {
            return;
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let path = e.path().join(MANIFEST);
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue; // not finished (or being removed)
            };
            match serde_json::from_slice::<SnapshotManifest>(&bytes) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!("skipping the snapshot manifest {}: {e}", path.display()),
            }
        }
    }
}

#[async_trait]
impl SnapshotStore for DirStore {
    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    async fn manifests(&self, key: &str) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let mut out = Vec::new();
        self.read_manifests(&self.at(key)?, &mut out).await;
        Ok(out)
    }

    async fn all_manifests(&self) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let mut out = Vec::new();
        let mut keys = tokio::fs::read_dir(&self.root).await.map_err(io(format!(
            "listing the snapshot directory {}",
            self.root.display()
        )))?;
        while let Ok(Some(k)) = keys.next_entry().await {
            self.read_manifests(&k.path(), &mut out).await;
        }
        Ok(out)
    }

    async fn put(&self, path: &str, from: &Path) -> Result<(), SnapshotError> {
        let to = self.at(path)?;
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        // Copied beside, synced, then renamed: a reader sees all or nothing.
        let tmp = to.with_extension("partial");
        tokio::fs::copy(from, &tmp).await.map_err(io(format!(
            "copying {} to {}",
            from.display(),
            tmp.display()
        )))?;
        let file = tokio::fs::File::open(&tmp)
            .await
            .map_err(io(format!("opening {}", tmp.display())))?;
        file.sync_all()
            .await
            .map_err(io(format!("syncing {}", tmp.display())))?;
        tokio::fs::rename(&tmp, &to)
            .await
            .map_err(io(format!("renaming {}", tmp.display())))
    }

    async fn get(&self, path: &str, to: &Path, done: &AtomicU64) -> Result<(), SnapshotError> {
        let from = self.at(path)?;
        let n = tokio::fs::copy(&from, to).await.map_err(io(format!(
            "copying {} to {}",
            from.display(),
            to.display()
        )))?;
        done.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn remove(&self, manifest: &SnapshotManifest) -> Result<(), SnapshotError> {
        let dir = self.at(&manifest.path())?;
        // The manifest first: a half-removed snapshot is never listed.
        let _ = tokio::fs::remove_file(dir.join(MANIFEST)).await;
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(io(format!("removing {}", dir.display())))
    }

    async fn lease(&self, _key: &str, _holder: &str) -> Result<super::Lease, SnapshotError> {
        Ok(super::Lease::Held(Box::new(NoLease)))
    }
}

struct NoLease;

#[async_trait]
impl super::HeldLease for NoLease {
    async fn release(self: Box<Self>) {}
}
