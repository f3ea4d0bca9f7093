//! Hot deploy: the projections directory, watched.
//!
//! Every top-level `*.wasm` file is deployed at start and whenever its content
//! may have changed (created, written, renamed in; reads and attribute
//! changes are ignored, and a file whose size and modification time are those
//! it had when last read is not read again). A file is (re)loaded only once it
//! has been quiet for the debounce period and its size and modification time
//! did not move while it was read, so a module still being written is never
//! loaded half-written (and a module that does not load yet is simply tried
//! again on its next change). Hidden files (`.name.wasm`, editors' and `cp`'s
//! temporaries) are ignored.
//!
//! When a file redeploys, exactly:
//! - new content (a new name+version) deploys it, as an API deploy would;
//! - the content of a version already deployed changes nothing, wherever and
//!   under whatever file name it appears: a renamed or copied file just takes
//!   over as that version's source;
//! - the content of a **retired** version changes nothing: it stays retired
//!   (an operator's retire or rollback is never undone by a file); only an
//!   explicit deploy (API, CLI) brings it back.
//!
//! Removing a file retires the version it deployed, unless another file of
//! the directory still holds that module (a rename, a copy), or the version
//! is active (logged: promote or roll back first).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::machine::Origin;
use super::{DeployOutcome, Lifecycle, LifecycleError, ViewState};
use crate::views::ViewId;

/// Deploys what `dir` holds now and starts watching it.
pub(super) async fn start(
    lifecycle: Lifecycle,
    dir: PathBuf,
) -> Result<tokio::task::JoinHandle<()>, LifecycleError> {
    std::fs::create_dir_all(&dir).map_err(LifecycleError::io(
        "creating the projections directory",
        &dir,
    ))?;
    // notify reports events under the absolute path it watches (the current
    // directory joined to a relative one): use that form everywhere, so that
    // `--projections projections` and `/abs/projections` behave the same.
    let dir = std::path::absolute(&dir).map_err(LifecycleError::io(
        "resolving the projections directory",
        &dir,
    ))?;
    let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
    // Counted from here, before the watcher's task takes the change in, so
    // `kiln status --wait` sees a change as soon as notify reports it.
    let queued = lifecycle.inner.watch_queued.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && may_change_content(&event.kind)
        {
            for path in event.paths {
                queued.fetch_add(1, Ordering::AcqRel);
                if tx.send(path).is_err() {
                    unqueue(&queued);
                }
            }
        }
    })
    .map_err(|e| watch_error(&dir, e))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| watch_error(&dir, e))?;
    let mut w = DirWatch {
        lifecycle,
        dir: dir.clone(),
        known: HashMap::new(),
    };
    w.initial_scan().await;
    tracing::info!(dir = %dir.display(), "watching the projections directory");
    let reset = NothingPending(w.lifecycle.inner.clone());
    Ok(tokio::spawn(async move {
        let _watcher = watcher; // Dropping it stops the notifications.
        let _reset = reset;
        w.run(rx).await;
    }))
}

/// One queued change taken in (never below 0: see [`NothingPending`]).
fn unqueue(queued: &AtomicUsize) {
    let _ = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        Some(n.saturating_sub(1))
    });
}

/// When the watcher's task ends (the watcher gone, or a panic), nothing is
/// pending any more: `kiln status --wait` must not wait for it.
struct NothingPending(std::sync::Arc<super::Inner>);

impl Drop for NothingPending {
    fn drop(&mut self) {
        self.0.watch_pending.store(0, Ordering::Release);
        self.0.watch_queued.store(0, Ordering::Release);
    }
}

/// Can an event of this kind change a file's content or presence? (Our own
/// reads cause access events: counting those would re-read forever.)
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

fn watch_error(dir: &Path, e: notify::Error) -> LifecycleError {
    LifecycleError::Io {
        what: "watching the projections directory".into(),
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

struct DirWatch {
    lifecycle: Lifecycle,
    dir: PathBuf,
    /// Which version each file holds, and its (size, mtime) when last read.
    known: HashMap<PathBuf, (ViewId, Stamp)>,
}

type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

fn stamp(p: &Path) -> Stamp {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

fn is_module(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wasm")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

impl DirWatch {
    async fn initial_scan(&mut self) {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_module(p) && p.is_file())
                .collect(),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), "reading the projections directory: {e}");
                return;
            }
        };
        files.sort();
        for path in &files {
            self.load(path).await;
        }
        // Versions deployed from a file of this directory that is gone now
        // (removed while the daemon was down) are retired, unless another
        // file holds them (the load above made it their source then).
        let gone: Vec<ViewId> = self
            .lifecycle
            .status()
            .into_iter()
            .filter(|s| s.state != ViewState::Retired)
            .filter_map(|s| {
                let id: ViewId = s.id.parse().ok()?;
                let source = self.lifecycle.source_of(&id)?;
                // Sources recorded by older runs may be relative.
                let source = std::path::absolute(PathBuf::from(source)).ok()?;
                (source.parent() == Some(self.dir.as_path()) && !source.exists()).then_some(id)
            })
            .collect();
        for id in gone {
            self.retire_removed(&id, "its module file is gone").await;
        }
    }

    /// The module file of `id` is gone: retire it, unless it is active.
    async fn retire_removed(&self, id: &ViewId, why: &str) {
        match self.lifecycle.retire_unless_active(id).await {
            Ok(()) => tracing::info!(view = %id, "{why}: retired"),
            Err(
                e @ (LifecycleError::RetireActive { .. }
                | LifecycleError::RetireFleetVersion { .. }),
            ) => {
                tracing::warn!(view = %id, "{why}, but it stays: {e}")
            }
            Err(e) => tracing::error!(view = %id, "{why}; retiring it: {e}"),
        }
    }

    /// Another module file of the directory holding `id`'s module.
    fn other_file_with(&self, id: &ViewId, gone: &Path) -> Option<PathBuf> {
        let hash = self.lifecycle.content_hash_of(id)?;
        let rd = std::fs::read_dir(&self.dir).ok()?;
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != gone && is_module(p) && p.is_file())
            .find(|p| {
                std::fs::read(p).is_ok_and(|bytes| blake3::hash(&bytes).to_hex().as_str() == hash)
            })
    }

    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<PathBuf>) {
        let debounce = self.lifecycle.config().watch_debounce;
        let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
        loop {
            self.publish_pending(&pending);
            let next_due = pending.values().min().map(|t| *t + debounce);
            let got = match next_due {
                Some(due) => {
                    tokio::select! {
                        p = rx.recv() => p.map(Some),
                        _ = tokio::time::sleep_until(due.into()) => Some(None),
                    }
                }
                None => rx.recv().await.map(Some),
            };
            match got {
                None => return, // The watcher is gone.
                Some(Some(path)) => {
                    if is_module(&path) && path.parent() == Some(self.dir.as_path()) {
                        pending.insert(path, Instant::now());
                        self.publish_pending(&pending);
                    }
                    // Pending now (published before it leaves the queue).
                    unqueue(&self.lifecycle.inner.watch_queued);
                }
                Some(None) => {
                    let now = Instant::now();
                    let due: Vec<PathBuf> = pending
                        .iter()
                        .filter(|(_, t)| now >= **t + debounce)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for path in due {
                        // Still counted as pending while it is read and deployed.
                        if self.settle(&path).await {
                            pending.remove(&path);
                        } else {
                            // Still changing: look again after another quiet period.
                            pending.insert(path, Instant::now());
                        }
                        self.publish_pending(&pending);
                    }
                }
            }
        }
    }

    fn publish_pending(&self, pending: &HashMap<PathBuf, Instant>) {
        self.lifecycle
            .inner
            .watch_pending
            .store(pending.len(), Ordering::Release);
    }

    /// Handles a quiet path: a removed file retires its version, a present one
    /// is deployed. `false` if the file changed while being read.
    async fn settle(&mut self, path: &Path) -> bool {
        if !path.exists() {
            let Some((id, _)) = self.known.remove(path) else {
                return true;
            };
            let label = path.display().to_string();
            if self.lifecycle.source_of(&id).as_deref() != Some(label.as_str()) {
                return true; // Another file took the version over (a rename).
            }
            if let Some(other) = self.other_file_with(&id, path) {
                // A rename whose new name we have not handled yet.
                return self.load(&other).await;
            }
            self.retire_removed(&id, &format!("module file {label} removed"))
                .await;
            return true;
        }
        if self
            .known
            .get(path)
            .is_some_and(|(_, seen)| *seen == stamp(path))
        {
            return true; // Not changed since it was read.
        }
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            // A FIFO or a device would block the read (and the watcher).
            tracing::warn!(file = %path.display(), "not a regular file: not loaded");
            return true;
        }
        self.load(path).await
    }

    async fn load(&mut self, path: &Path) -> bool {
        let before = stamp(path);
        self.lifecycle
            .inner
            .watch_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %path.display(), "reading a module: {e}");
                return true;
            }
        };
        if stamp(path) != before || before.map(|b| b.0) != Some(bytes.len() as u64) {
            return false;
        }
        let label = path.display().to_string();
        match self
            .lifecycle
            .deploy_from(&bytes, &label, Origin::Watch)
            .await
        {
            Ok(outcome) => {
                match &outcome {
                    DeployOutcome::AlreadyDeployed(id) => {
                        tracing::debug!(file = %label, view = %id, "already deployed")
                    }
                    DeployOutcome::StaysRetired(id) => tracing::info!(
                        file = %label, view = %id,
                        "a retired version: it stays retired (deploy it through the API or CLI to bring it back)"
                    ),
                    _ => {
                        tracing::info!(file = %label, view = %outcome.id(), ?outcome, "hot deploy")
                    }
                }
                self.known
                    .insert(path.to_path_buf(), (outcome.id().clone(), before));
            }
            Err(e) => tracing::error!(file = %label, "hot deploy refused: {e}"),
        }
        true
    }
}
