//! Hot deploy: the projections directory, watched.
//!
//! Every top-level `*.wasm` file is deployed at start and whenever it changes;
//! a file is (re)loaded only once it has been quiet for the debounce period
//! and its size and modification time did not move while it was read, so a
//! module still being written is never loaded half-written (and a module that
//! does not load yet is simply tried again on its next change). Removing a
//! file retires the version it deployed. Hidden files (`.name.wasm`, editors'
//! and `cp`'s temporaries) are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Lifecycle, LifecycleError, ViewState};
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
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            for path in event.paths {
                let _ = tx.send(path);
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
    Ok(tokio::spawn(async move {
        let _watcher = watcher; // Dropping it stops the notifications.
        w.run(rx).await;
    }))
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
    /// Which version each file deployed.
    known: HashMap<PathBuf, ViewId>,
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
        // (removed while the daemon was down) are retired.
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
            tracing::info!(view = %id, "its module file is gone: retiring");
            if let Err(e) = self.lifecycle.retire(&id).await {
                tracing::error!(view = %id, "retiring: {e}");
            }
        }
    }

    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<PathBuf>) {
        let debounce = self.lifecycle.config().watch_debounce;
        let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
        loop {
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
                    }
                }
                Some(None) => {
                    let now = Instant::now();
                    let due: Vec<PathBuf> = pending
                        .iter()
                        .filter(|(_, t)| now >= **t + debounce)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for path in due {
                        pending.remove(&path);
                        if !self.settle(&path).await {
                            // Still changing: look again after another quiet period.
                            pending.insert(path, Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// Handles a quiet path: a removed file retires its version, a present one
    /// is deployed. `false` if the file changed while being read.
    async fn settle(&mut self, path: &Path) -> bool {
        if !path.exists() {
            if let Some(id) = self.known.remove(path) {
                tracing::info!(view = %id, file = %path.display(), "module file removed: retiring");
                if let Err(e) = self.lifecycle.retire(&id).await {
                    tracing::error!(view = %id, "retiring: {e}");
                }
            }
            return true;
        }
        self.load(path).await
    }

    async fn load(&mut self, path: &Path) -> bool {
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let before = stamp(path);
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
        match self.lifecycle.deploy(&bytes, &label).await {
            Ok(outcome) => {
                tracing::info!(file = %label, view = %outcome.id(), ?outcome, "hot deploy");
                self.known.insert(path.to_path_buf(), outcome.id().clone());
            }
            Err(e) => tracing::error!(file = %label, "hot deploy refused: {e}"),
        }
        true
    }
}
