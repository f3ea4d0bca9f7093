//! Backups of an embedded data directory, taken while the daemon runs
//! (`POST /admin/backup`, `kiln backup`), and their restore (`kiln restore`,
//! offline).
//!
//! A backup is a directory laid out like a data directory, plus a manifest:
//!
//! ```text
//! <backup>/registry.json     the registry as last written
//! <backup>/views/            RocksDB checkpoint of the views database
//! <backup>/log/              RocksDB checkpoint of the event log
//! <backup>/modules/          the deployed modules
//! <backup>/kiln-backup.json  the manifest, written last: format, kiln version,
//!                            time, log head, views, every file's size and blake3
//! ```
//!
//! **Consistency.** Admin operations (deploy, promote, rollback, retire,
//! resume, the standby sweep) wait while the copies are taken (not while the
//! manifest's hashes are computed), so no view is created or dropped half
//! way; appends and projections go on. The registry is copied first, then the views, then the
//! log: each view's documents are copied with the checkpoint they were
//! committed with (one RocksDB checkpoint of one database is consistent), and
//! the log, copied last, holds every event any copied view has applied. A
//! daemon started on the restore resumes each view from its checkpoint up to
//! the backup's log head, exactly as after a crash.
//!
//! **Where.** The directory is a path on the daemon's machine: it must be
//! absolute, outside the data directory, and absent or empty; the daemon
//! creates it (its parent must exist). Checkpoints hard-link the immutable
//! RocksDB files when the backup is on the data directory's file system, so
//! a backup there costs little space and seconds, but shares the disk: copy
//! it elsewhere (it is a plain directory) to survive losing the disk.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lifecycle::Lifecycle;
use crate::store::{Position, StoreError};
use crate::views::ViewError;

/// The manifest's file name, in the backup directory.
pub const MANIFEST: &str = "kiln-backup.json";
/// The backup format this kiln writes and restores.
pub const FORMAT: u32 = 1;

const REGISTRY: &str = "registry.json";

/// What a backup holds; written last, as `kiln-backup.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The kiln that wrote it.
    pub kiln_version: String,
    /// When the backup was taken, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The last position of the copied log.
    pub log_head: Position,
    /// The view versions the registry held.
    pub views: Vec<String>,
    /// Every file of the backup but the manifest, by path relative to it.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub blake3: String,
}

/// What can go wrong taking or restoring a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup target {path}: {reason}")]
    BadTarget { path: PathBuf, reason: String },
    #[error("restore target {path}: {reason}")]
    BadRestoreTarget { path: PathBuf, reason: String },
    #[error("{path} is not a usable kiln backup: {reason}")]
    BadBackup { path: PathBuf, reason: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Views(#[from] ViewError),
    #[error(
        "this daemon's log is not on this machine (JetStream store): back up the stream with \
         NATS's own tools (e.g. `nats stream backup`); the views rebuild from it"
    )]
    Unsupported,
    #[error("the backup task failed: {0}")]
    Task(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

/// Is `dir` absent, or an empty directory?
fn absent_or_empty(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io("reading", dir)(e)),
    }
}

/// `path` without `.` and `..` (lexically; a symlink is taken as it is named).
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Refuses a backup target that is relative, inside the data directory, or
/// not empty (see the module docs).
pub fn check_target(dir: &Path, data_dir: &Path) -> Result<(), BackupError> {
    let bad = |reason: String| BackupError::BadTarget {
        path: dir.to_path_buf(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(bad(
            "the path must be absolute (it is a path on the daemon's machine)".into(),
        ));
    }
    let target = normalized(dir);
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| normalized(data_dir));
    let target_real = target
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .zip(target.file_name())
        .map(|(p, name)| p.join(name))
        .unwrap_or_else(|| target.clone());
    if target_real.starts_with(&data) || data.starts_with(&target_real) {
        return Err(bad(format!(
            "it overlaps the data directory {}: choose a directory outside it",
            data.display()
        )));
    }
    if !absent_or_empty(dir)? {
        return Err(bad(
            "it is not empty: a backup goes into a new or empty directory, never over \
             another one"
                .into(),
        ));
    }
    match target.parent() {
        Some(p) if p.is_dir() => Ok(()),
        _ => Err(bad("its parent directory does not exist".into())),
    }
}

/// Takes a backup of the daemon's data directory into `dir` (see the module
/// docs). On failure the partly written directory is removed.
pub async fn create(lifecycle: &Lifecycle, dir: &Path) -> Result<Manifest, BackupError> {
    if !lifecycle.store().keeps_local_log() {
        return Err(BackupError::Unsupported);
    }
    let data_dir = lifecycle.config().data_dir.clone();
    check_target(dir, &data_dir)?;
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let result = take(lifecycle, dir, &data_dir).await;
    if result.is_err() {
        if existed {
            // It was empty: empty it again.
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    result
}

async fn take(lifecycle: &Lifecycle, dir: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    let (dir, data_dir) = (dir.to_path_buf(), data_dir.to_path_buf());
    let (views, log_head) = {
        // No deploy, retire or sweep creates or drops a view meanwhile.
        let _ops = lifecycle.pause_operations().await;
        let views: Vec<String> = lifecycle
            .status()
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        let view_store = lifecycle.views().clone();
        let store = lifecycle.store().clone();
        let (dir, data_dir) = (dir.clone(), data_dir.clone());
        let log_head = tokio::task::spawn_blocking(move || {
            let registry = data_dir.join(REGISTRY);
            std::fs::copy(&registry, dir.join(REGISTRY)).map_err(io("copying", &registry))?;
            view_store.checkpoint_to(&dir.join("views"))?;
            let log_head = store.checkpoint_to(&dir.join("log"))?;
            copy_tree(&data_dir.join("modules"), &dir.join("modules"))?;
            Ok::<_, BackupError>(log_head)
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))??;
        (views, log_head)
    };
    // Hashing reads every file: done with admin operations going on again.
    tokio::task::spawn_blocking(move || {
        let manifest = Manifest {
            format: FORMAT,
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            created_at_ms: crate::store::now_millis(),
            log_head,
            views,
            files: list_files(&dir)?,
        };
        write_manifest(&dir, &manifest)?;
        Ok(manifest)
    })
    .await
    .map_err(|e| BackupError::Task(e.to_string()))?
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let bytes =
        serde_json::to_vec_pretty(manifest).map_err(|e| BackupError::Task(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("writing", &path))
}

/// Copies the regular files under `from` (if it exists) into `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<(), BackupError> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to).map_err(io("creating", to))?;
    for entry in std::fs::read_dir(from).map_err(io("reading", from))? {
        let entry = entry.map_err(io("reading", from))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else if path.is_file() {
            std::fs::copy(&path, &target).map_err(io("copying", &path))?;
        }
    }
    Ok(())
}

/// Every regular file under `root` but the manifest, with its size and blake3.
fn list_files(root: &Path) -> Result<BTreeMap<String, FileEntry>, BackupError> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, FileEntry>,
    ) -> Result<(), BackupError> {
        for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
            let path = entry.map_err(io("reading", dir))?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .map_err(|e| BackupError::Task(e.to_string()))?
                .to_string_lossy()
                .replace('\\', "/");
            if rel == MANIFEST || rel.ends_with(".tmp") {
                continue;
            }
            out.insert(rel, hash_file(&path)?);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn hash_file(path: &Path) -> Result<FileEntry, BackupError> {
    let mut file = std::fs::File::open(path).map_err(io("reading", path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(FileEntry {
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Reads and checks a backup's manifest and every file it lists.
pub fn verify(backup: &Path) -> Result<Manifest, BackupError> {
    let bad = |reason: String| BackupError::BadBackup {
        path: backup.to_path_buf(),
        reason,
    };
    let path = backup.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!(
                "it has no {MANIFEST} (an unfinished or foreign directory)"
            )));
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
    if manifest.format != FORMAT {
        return Err(bad(format!(
            "it is backup format {}, this kiln restores format {FORMAT}",
            manifest.format
        )));
    }
    for needed in [REGISTRY, "log/CURRENT", "views/CURRENT"] {
        if !manifest.files.contains_key(needed) {
            return Err(bad(format!("its manifest lists no {needed}")));
        }
    }
    for (rel, want) in &manifest.files {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(bad(format!("its manifest lists an unsafe path {rel:?}")));
        }
        let file = backup.join(rel);
        if !file.is_file() {
            return Err(bad(format!("{rel} is missing")));
        }
        let got = hash_file(&file)?;
        if &got != want {
            return Err(bad(format!(
                "{rel} is {} bytes with blake3 {}, the manifest says {} bytes with blake3 {}",
                got.bytes, got.blake3, want.bytes, want.blake3
            )));
        }
    }
    Ok(manifest)
}

/// Verifies `backup` and copies it into `data_dir` (absent or empty), through
/// a staging directory next to it renamed into place at the end: an
/// interrupted restore leaves no half-restored data directory. The restored
/// log gets a new identity (a new history epoch): snapshots published from
/// the original's log are never used on it.
pub fn restore(backup: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    let bad_target = |reason: String| BackupError::BadRestoreTarget {
        path: data_dir.to_path_buf(),
        reason,
    };
    if !absent_or_empty(data_dir)? {
        return Err(bad_target(
            "it is not empty: restore only into a new or empty data directory".into(),
        ));
    }
    let manifest = verify(backup)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| bad_target("it has no directory name".into()))?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad_target("its parent directory does not exist".into()));
    }
    let staging = parent.join(format!(".{}.kiln-restore", name.to_string_lossy()));
    if staging.exists() {
        // Left by an interrupted restore of ours.
        std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    }
    for rel in manifest.files.keys() {
        let to = staging.join(rel);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(io("creating", p))?;
        }
        let from = backup.join(rel);
        std::fs::copy(&from, &to).map_err(io("copying", &from))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &to))?;
    }
    std::fs::copy(backup.join(MANIFEST), staging.join(MANIFEST))
        .map_err(io("copying", &backup.join(MANIFEST)))?;
    // What is appended from here is another history than the original's
    // (which may go on): the restored log gets an identity of its own.
    crate::store::embedded::begin_new_history(&staging.join("log"))?;
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(io("replacing the empty", data_dir))?;
    }
    std::fs::rename(&staging, data_dir).map_err(io("moving the restore into", data_dir))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_absolute_outside_the_data_dir_and_empty() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("data");
        let err = |dir: &Path| check_target(dir, &data).expect_err("refused").to_string();
        assert!(err(Path::new("backups/b1")).contains("absolute"));
        assert!(err(&data.join("b1")).contains("overlaps"));
        assert!(err(&data.join("x/../b1")).contains("overlaps"));
        assert!(
            err(tmp.path()).contains("overlaps"),
            "a parent of the data dir"
        );
        let full = tmp.path().join("full");
        std::fs::create_dir_all(full.join("x")).expect("full");
        assert!(err(&full).contains("not empty"));
        assert!(err(&tmp.path().join("no/such/b1")).contains("parent"));
        check_target(&tmp.path().join("b1"), &data).expect("a fresh sibling is fine");
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).expect("empty");
        check_target(&empty, &data).expect("an empty directory is fine");
    }

    #[test]
    fn a_tampered_or_unfinished_backup_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let b = tmp.path().join("b");
        // A real log (a restore gives it a new identity), stand-ins for the rest.
        drop(
            crate::store::embedded::EmbeddedStore::open(
                crate::store::embedded::EmbeddedConfig::new(b.join("log")),
            )
            .expect("log"),
        );
        for f in ["registry.json", "views/CURRENT"] {
            let p = b.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dir");
            std::fs::write(&p, f).expect("write");
        }
        let current = std::fs::read(b.join("log/CURRENT")).expect("log/CURRENT");
        let e = verify(&b).expect_err("no manifest").to_string();
        assert!(e.contains(MANIFEST), "{e}");
        let manifest = Manifest {
            format: FORMAT,
            kiln_version: "t".into(),
            created_at_ms: 1,
            log_head: 3,
            views: vec![],
            files: list_files(&b).expect("list"),
        };
        write_manifest(&b, &manifest).expect("manifest");
        assert_eq!(verify(&b).expect("intact"), manifest);
        std::fs::write(b.join("log/CURRENT"), "changed").expect("tamper");
        let e = verify(&b).expect_err("tampered").to_string();
        assert!(e.contains("log/CURRENT") && e.contains("blake3"), "{e}");
        std::fs::write(b.join("log/CURRENT"), &current).expect("untamper");
        let target = tmp.path().join("restored");
        std::fs::create_dir_all(target.join("x")).expect("non-empty");
        let e = restore(&b, &target).expect_err("non-empty").to_string();
        assert!(e.contains("not empty"), "{e}");
        std::fs::remove_dir_all(target.join("x")).expect("empty it");
        restore(&b, &target).expect("restored");
        assert_eq!(
            std::fs::read_to_string(target.join("views/CURRENT")).expect("copied"),
            "views/CURRENT"
        );
        assert!(target.join(MANIFEST).is_file());
        // The restored log is another history: it has an identity of its own.
        let identity = |dir: &Path| {
            use crate::store::EventStore;
            crate::store::embedded::EmbeddedStore::open(
                crate::store::embedded::EmbeddedConfig::new(dir.join("log")),
            )
            .expect("log")
            .log_identity()
            .to_string()
        };
        assert_ne!(identity(&target), identity(&b));
    }
}
