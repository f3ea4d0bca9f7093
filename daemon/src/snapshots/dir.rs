//! Snapshots in a directory (`--snapshot-dir`): `<dir>/<key>/<position>/`
//! holds a snapshot's files and, written last by rename, its manifest.
//!
//! The directory may be shared (a volume several instances on one
//! JetStream log mount), so publishing a key takes a lease there too:
//! `<dir>/<key>/.lease/<generation>`, see [`DirStore::lease`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{MANIFEST, SnapshotError, SnapshotManifest, SnapshotStore, io};

/// The directory of a key's lease files.
const LEASE_DIR: &str = ".lease";
/// What a released lease file holds.
const RELEASED: &str = "\n(released)";

pub struct DirStore {
    root: PathBuf,
    /// A lease not refreshed for this long has lapsed.
    ttl: Duration,
    seen: Seen,
}

/// What this process saw of lease files: per file, its modification time
/// and text, and when this process first saw them so. A lease has lapsed
/// when this process has seen its file unchanged for the TTL by its own
/// clock: a holder on another machine touches the file by *its* clock, so
/// the file's time is never compared with this machine's.
type Seen = Arc<Mutex<HashMap<PathBuf, (Option<SystemTime>, String, Instant)>>>;

/// Lease files remembered at most (forgotten all at once beyond: each is
/// then judged afresh, which only delays a take-over by a TTL).
const SEEN_MAX: usize = 4096;

impl DirStore {
    /// Snapshots under `root` (created if missing); leases lapse after
    /// `ttl` without a refresh (`[snapshots] lease_ttl_secs`).
    pub fn open(root: impl Into<PathBuf>, ttl: Duration) -> Result<Self, SnapshotError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(format!(
            "creating the snapshot directory {}",
            root.display()
        )))?;
        Ok(DirStore {
            root,
            ttl,
            seen: Seen::default(),
        })
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
            let location = path
                .strip_prefix(&self.root)
                .map(|p| p.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/"))
                .unwrap_or_default();
            if let Some(m) = super::parse_manifest(&bytes, &location) {
                out.push(m);
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
        // Put beside, synced, then renamed: a reader sees all or nothing.
        // Linked when `from` is on the same filesystem (its files are
        // written once and never changed): a snapshot then costs the disk
        // its export, not a second copy beside the live views' writes.
        let tmp = to.with_extension("partial");
        let _ = tokio::fs::remove_file(&tmp).await;
        if tokio::fs::hard_link(from, &tmp).await.is_err() {
            tokio::fs::copy(from, &tmp).await.map_err(io(format!(
                "copying {} to {}",
                from.display(),
                tmp.display()
            )))?;
        }
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

    /// Takes `key`'s lease. Its files are numbered generations; the highest
    /// is the lease, held by the holder it names until it is released (its
    /// text ends in `(released)`) or not refreshed (its modification time)
    /// for `ttl`. Taking it creates generation highest + 1 with
    /// `create_new` (O_EXCL: of two takers, one gets it), then checks that
    /// no higher generation exists (a taker that read the directory long
    /// ago may create a number a newer holder already removed). The new
    /// holder removes the lower generations. The holder refreshes its file
    /// every third of `ttl` while it still is the highest.
    async fn lease(&self, key: &str, holder: &str) -> Result<super::Lease, SnapshotError> {
        let dir = self.at(key)?.join(LEASE_DIR);
        let (ttl, seen) = (self.ttl, self.seen.clone());
        let holder = holder.to_string();
        tokio::task::spawn_blocking(move || take_lease(&dir, &holder, ttl, &seen))
            .await
            .map_err(|e| SnapshotError::Internal(format!("taking a lease panicked: {e}")))?
    }

    /// Removes what an interrupted upload left under `key`: position
    /// directories without a manifest, and partial files. Only the lease's
    /// holder calls it, after it published: no other upload is under way.
    async fn sweep(&self, key: &str) -> Result<usize, SnapshotError> {
        let key_dir = self.at(key)?;
        let Ok(mut entries) = tokio::fs::read_dir(&key_dir).await else {
            return Ok(0);
        };
        let mut removed = 0;
        while let Ok(Some(e)) = entries.next_entry().await {
            let path = e.path();
            if e.file_name() == LEASE_DIR || !path.is_dir() {
                continue;
            }
            if tokio::fs::try_exists(path.join(MANIFEST))
                .await
                .unwrap_or(true)
            {
                continue;
            }
            let mut files = tokio::fs::read_dir(&path)
                .await
                .map_err(io(format!("listing {}", path.display())))?;
            while let Ok(Some(_)) = files.next_entry().await {
                removed += 1;
            }
            tokio::fs::remove_dir_all(&path)
                .await
                .map_err(io(format!("removing {}", path.display())))?;
        }
        Ok(removed)
    }
}

/// Lease generation files in `dir`, by number.
fn generations(dir: &Path) -> Result<Vec<u64>, SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    let mut out: Vec<u64> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Who holds lease file `path`, unless it is released or lapsed (or gone):
/// lapsed when this process has seen it unchanged for `ttl` (see [`Seen`]).
fn live_holder(path: &Path, ttl: Duration, seen: &Seen) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    if text.ends_with(RELEASED) {
        return None;
    }
    let modified = std::fs::metadata(path).ok()?.modified().ok();
    let now = Instant::now();
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let since = match seen.get(path) {
        Some((m, t, since)) if *m == modified && *t == text => *since,
        _ => {
            if seen.len() >= SEEN_MAX {
                seen.clear();
            }
            seen.insert(path.to_path_buf(), (modified, text.clone(), now));
            now
        }
    };
    (now.duration_since(since) < ttl).then(|| text.lines().next().unwrap_or("?").to_string())
}

fn take_lease(
    dir: &Path,
    holder: &str,
    ttl: Duration,
    seen: &Seen,
) -> Result<super::Lease, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let gens = generations(dir)?;
    let highest = gens.last().copied().unwrap_or(0);
    // Held under this instance's own name: by an earlier run of it that
    // stopped without releasing (this run asks only for leases it does
    // not hold), so it is taken over at once rather than waited out.
    if highest > 0
        && let Some(by) = live_holder(&dir.join(highest.to_string()), ttl, seen)
        && by != holder
    {
        return Ok(super::Lease::HeldBy(by));
    }
    let mine = highest + 1;
    let path = dir.join(mine.to_string());
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path);
    let mut file = match created {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let by = live_holder(&path, ttl, seen).unwrap_or_else(|| "(just taken)".into());
            return Ok(super::Lease::HeldBy(by));
        }
        Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
    };
    use std::io::Write;
    file.write_all(holder.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(format!("writing {}", path.display())))?;
    drop(file);
    // A newer generation than ours: we read the directory too long ago.
    if let Some(&newer) = generations(dir)?.iter().rfind(|g| **g > mine) {
        let _ = std::fs::remove_file(&path);
        let by = live_holder(&dir.join(newer.to_string()), ttl, seen)
            .unwrap_or_else(|| "(just taken)".into());
        return Ok(super::Lease::HeldBy(by));
    }
    for g in gens {
        let _ = std::fs::remove_file(dir.join(g.to_string()));
    }
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (path2, dir2, lost2) = (path.clone(), dir.to_path_buf(), lost.clone());
    let refresher = tokio::spawn(async move {
        let mut refreshed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(ttl / 3).await;
            let (p, d) = (path2.clone(), dir2.clone());
            let outcome = tokio::task::spawn_blocking(move || refresh(&d, &p, mine))
                .await
                .unwrap_or(Refresh::Failed);
            match outcome {
                Refresh::Done => refreshed = tokio::time::Instant::now(),
                // An I/O error: tried again until the lease would have lapsed.
                Refresh::Failed if refreshed.elapsed() + ttl / 3 < ttl => {}
                Refresh::Failed | Refresh::Superseded => {
                    tracing::warn!(lease = %path2.display(), "a snapshot lease was lost ({outcome:?})");
                    lost2.store(true, Ordering::Release);
                    return;
                }
            }
        }
    });
    Ok(super::Lease::Held(Box::new(FileLease {
        path,
        holder: holder.to_string(),
        lost,
        refresher,
    })))
}

#[derive(Debug)]
enum Refresh {
    Done,
    /// A newer generation exists: another instance holds the lease.
    Superseded,
    Failed,
}

/// Touches lease file `path` (generation `mine`) if it is still the highest.
fn refresh(dir: &Path, path: &Path, mine: u64) -> Refresh {
    match generations(dir) {
        Ok(g) if g.last() != Some(&mine) => Refresh::Superseded,
        Ok(_) => match std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()))
        {
            Ok(()) => Refresh::Done,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Refresh::Superseded,
            Err(_) => Refresh::Failed,
        },
        Err(_) => Refresh::Failed,
    }
}

/// A lease file this instance holds.
struct FileLease {
    path: PathBuf,
    holder: String,
    lost: Arc<std::sync::atomic::AtomicBool>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for FileLease {
    fn drop(&mut self) {
        // Not released (a crash, in effect): it lapses after its TTL.
        self.refresher.abort();
    }
}

#[async_trait]
impl super::HeldLease for FileLease {
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Marks the file released (kept: a taker numbers after it).
    async fn release(self: Box<Self>) {
        self.refresher.abort();
        if self.lost.load(Ordering::Acquire) {
            return;
        }
        let (path, text) = (self.path.clone(), format!("{}{RELEASED}", self.holder));
        let _ = tokio::task::spawn_blocking(move || {
            // Never re-creates a file a newer holder removed.
            use std::io::Write;
            let mut f = std::fs::File::options().write(true).open(path)?;
            f.set_len(0)?;
            f.write_all(text.as_bytes())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HeldLease, Lease};
    use super::*;

    fn held(l: Lease) -> Box<dyn HeldLease> {
        match l {
            Lease::Held(h) => h,
            Lease::HeldBy(by) => panic!("held by {by}"),
        }
    }

    fn holder(l: Lease) -> String {
        match l {
            Lease::Held(_) => panic!("taken, but someone holds it"),
            Lease::HeldBy(by) => by,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_lease_excludes_until_released_or_lapsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_millis(600);
        let a = DirStore::open(dir.path(), ttl).expect("a");
        let b = DirStore::open(dir.path(), ttl).expect("b");
        let lease = held(a.lease("k", "a").await.expect("a takes"));
        // Refreshed past its TTL: still held.
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(holder(b.lease("k", "b").await.expect("b")), "a");
        // Another key is another lease.
        held(b.lease("k2", "b").await.expect("b takes k2"))
            .release()
            .await;
        lease.release().await;
        let lease = held(b.lease("k", "b").await.expect("b takes once released"));
        assert_eq!(holder(a.lease("k", "a").await.expect("a")), "b");
        // A holder that dies (never releases, stops refreshing) lapses; a
        // later run under the same name takes it over at once.
        drop(lease);
        let again = held(b.lease("k", "b").await.expect("b's next run takes it"));
        drop(again);
        assert_eq!(holder(a.lease("k", "a").await.expect("a")), "b");
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let lease = held(a.lease("k", "a").await.expect("a takes a lapsed lease"));
        // Only the newest generation is left.
        assert_eq!(
            generations(&dir.path().join("k").join(LEASE_DIR)).expect("gens"),
            vec![4]
        );
        lease.release().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_many_racers_for_a_lapsed_lease_exactly_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_millis(300);
        // Eight processes, each with its own view of the lease files.
        let stores: Vec<Arc<DirStore>> = (0..8)
            .map(|_| Arc::new(DirStore::open(dir.path(), ttl).expect("store")))
            .collect();
        for round in 0..5 {
            // They race until the lease lapsed for them (the winner of the
            // round before died), never two at once.
            let deadline = Instant::now() + ttl * 10;
            let winners = loop {
                let mut racers = Vec::new();
                for (i, store) in stores.iter().enumerate() {
                    let store = store.clone();
                    racers.push(tokio::spawn(async move {
                        store.lease("k", &format!("r{i}")).await.expect("lease")
                    }));
                }
                let mut winners = Vec::new();
                for r in racers {
                    if let Lease::Held(h) = r.await.expect("racer") {
                        winners.push(h);
                    }
                }
                assert!(winners.len() <= 1, "round {round}: {} won", winners.len());
                if !winners.is_empty() {
                    break winners;
                }
                assert!(Instant::now() < deadline, "round {round}: nobody took it");
                tokio::time::sleep(ttl / 5).await;
            };
            // The winner dies: the next round races for a lapsed lease.
            drop(winners);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_taken_over_behind_its_holders_back_is_known_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ttl = Duration::from_millis(300);
        let a = DirStore::open(dir.path(), ttl).expect("a");
        let lease = held(a.lease("k", "a").await.expect("a takes"));
        tokio::time::sleep(ttl).await;
        assert!(!lease.is_lost(), "refreshed while it is the highest");
        // Another instance's generation appears (a lapse seen elsewhere).
        std::fs::write(dir.path().join("k").join(LEASE_DIR).join("2"), "b").expect("gen 2");
        tokio::time::sleep(ttl).await;
        assert!(lease.is_lost());
        // Its release leaves the newer holder's file alone.
        lease.release().await;
        let b = std::fs::read_to_string(dir.path().join("k").join(LEASE_DIR).join("2"));
        assert_eq!(b.expect("gen 2"), "b");
    }

    #[tokio::test]
    async fn the_sweep_removes_uploads_without_a_manifest_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path(), Duration::from_secs(30)).expect("store");
        let key = dir.path().join("k");
        for (at, manifest) in [
            ("00000000000000000010", true),
            ("00000000000000000020", false),
        ] {
            std::fs::create_dir_all(key.join(at)).expect("dir");
            std::fs::write(key.join(at).join("docs-0000.sst"), b"x").expect("file");
            if manifest {
                std::fs::write(key.join(at).join(MANIFEST), b"{}").expect("manifest");
            }
        }
        let lease = held(store.lease("k", "a").await.expect("lease"));
        assert_eq!(store.sweep("k").await.expect("sweep"), 1);
        assert!(key.join("00000000000000000010").join(MANIFEST).exists());
        assert!(!key.join("00000000000000000020").exists());
        assert!(key.join(LEASE_DIR).exists());
        lease.release().await;
    }
}
