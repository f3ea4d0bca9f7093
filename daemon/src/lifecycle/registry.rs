//! The persisted registry: every view version the daemon knows, its state,
//! fingerprint, checkpoint (as of the last write), timings and last error.
//!
//! It is one JSON file, `registry.json`, replaced as a whole by writing a
//! temporary file, syncing it and renaming it over the old one: every change —
//! in particular a cutover, which flips two versions' states — lands in one
//! atomic step, so after a crash the registry is the old one or the new one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compare::CutoverCheck;
use super::{LifecycleError, ViewState};
use crate::views::ViewId;

/// The registry's on-disk format. Format 1 (kiln before the model-tested
/// lifecycle) is read and migrated: its entries are the same, its dead letters
/// lived in `parked/*.json` (moved into the views database at start).
pub(super) const FORMAT: u32 = 2;
/// The oldest format this kiln still opens (and migrates).
const OLDEST_FORMAT: u32 = 1;

/// One version's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Entry {
    #[serde(with = "id_text")]
    pub id: ViewId,
    pub state: ViewState,
    /// The physical view an alias reads (never itself an alias).
    #[serde(with = "opt_id_text", default)]
    pub alias_of: Option<ViewId>,
    pub fingerprint: String,
    /// Digest of each part of the fingerprint (`manifest`, `code`, `data`, …),
    /// to say what differs from another version. Empty for entries written
    /// before fingerprints had parts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fingerprint_parts: BTreeMap<String, String>,
    /// Why the deploy aliased or warmed: the fingerprints compared and what
    /// differed.
    #[serde(default)]
    pub deploy_note: Option<String>,
    /// blake3 of the module's bytes: the same name+version must keep it.
    pub content_hash: String,
    /// Where the module came from (a path, or `api`).
    pub source: String,
    /// Checkpoint as of the last registry write (the views database holds the
    /// authoritative one, committed with the documents).
    #[serde(default)]
    pub checkpoint: u64,
    pub deployed_at: u64,
    #[serde(default)]
    pub ready_at: Option<u64>,
    #[serde(default)]
    pub activated_at: Option<u64>,
    #[serde(default)]
    pub standby_since: Option<u64>,
    #[serde(default)]
    pub retired_at: Option<u64>,
    #[serde(default)]
    pub failed_at: Option<u64>,
    #[serde(default)]
    pub failed_position: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// A failed version that was active when it failed and had no healthy
    /// standby to fall back to: the bare name still serves its committed
    /// documents, marked stale, until another version is promoted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serving_stale: bool,
    /// How it last became active: `auto cutover`, `promote`, `rollback`, or
    /// `automatic rollback: <id> failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_by: Option<String>,
    /// Its documents compared with the active version's when it became
    /// ready (`auto-if-identical` and `manual` cutover): what a promote
    /// would change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_check: Option<CutoverCheck>,
}

impl Entry {
    /// The physical view this version reads.
    pub fn physical(&self) -> &ViewId {
        self.alias_of.as_ref().unwrap_or(&self.id)
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    versions: Vec<Entry>,
}

/// The registry in memory; [`Registry::save`] writes it.
#[derive(Clone, Debug)]
pub(super) struct Registry {
    path: PathBuf,
    pub entries: BTreeMap<ViewId, Entry>,
}

/// What [`Registry::load`] found on disk.
pub(super) enum Loaded {
    /// A registry of this format.
    Current(Registry),
    /// A registry of an older format, to migrate (then save).
    Older { registry: Registry, format: u32 },
    /// No registry file.
    Missing(Registry),
}

impl Registry {
    /// An empty registry that will be saved at `path`.
    pub fn empty(path: &Path) -> Registry {
        Registry {
            path: path.to_path_buf(),
            entries: BTreeMap::new(),
        }
    }

    /// Reads the registry at `path`. A missing file is reported as such (the
    /// caller decides whether that is a fresh data directory or lost state); a
    /// file that does not parse, or of a format this kiln does not know, is
    /// [`LifecycleError::CorruptRegistry`].
    pub fn load(path: &Path) -> Result<Loaded, LifecycleError> {
        let corrupt = |reason: String| LifecycleError::CorruptRegistry {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Loaded::Missing(Registry::empty(path)));
            }
            Err(e) => return Err(LifecycleError::io("reading the registry", path)(e)),
        };
        let file: File = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if !(OLDEST_FORMAT..=FORMAT).contains(&file.format) {
            return Err(corrupt(format!(
                "format {} (this kiln reads formats {OLDEST_FORMAT} to {FORMAT}; a newer kiln wrote it?)",
                file.format
            )));
        }
        let mut entries = BTreeMap::new();
        for e in file.versions {
            if let Some(of) = &e.alias_of
                && of == &e.id
            {
                return Err(corrupt(format!(
                    "{} is recorded as an alias of itself",
                    e.id
                )));
            }
            if entries.insert(e.id.clone(), e).is_some() {
                return Err(corrupt("a version is listed twice".into()));
            }
        }
        let registry = Registry {
            path: path.to_path_buf(),
            entries,
        };
        Ok(if file.format == FORMAT {
            Loaded::Current(registry)
        } else {
            Loaded::Older {
                registry,
                format: file.format,
            }
        })
    }

    /// Writes the whole registry atomically (temporary file, fsync, rename).
    pub fn save(&self) -> Result<(), LifecycleError> {
        let file = File {
            format: FORMAT,
            versions: self.entries.values().cloned().collect(),
        };
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| LifecycleError::CorruptRegistry {
                path: self.path.clone(),
                reason: format!("serializing: {e}"),
            })?;
        write_atomically(&self.path, &bytes, "writing the registry")
    }

    /// Versions of view `name`, in version order.
    pub fn of_name<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.values().filter(move |e| e.id.name() == name)
    }

    /// The active version of `name`.
    pub fn active<'a>(&'a self, name: &'a str) -> Option<&'a Entry> {
        self.of_name(name).find(|e| e.state == ViewState::Active)
    }

    /// Is physical view `id`'s column family still read by something: the
    /// version itself or an alias of it, unless retired? (A failed version
    /// keeps its documents: it may be serving them stale, and they are what an
    /// operator inspects.)
    pub fn needs_physical(&self, id: &ViewId) -> bool {
        self.entries
            .values()
            .any(|e| e.physical() == id && e.state != ViewState::Retired)
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, then
/// syncs the directory: readers and crashes see the old file or the new one.
pub(super) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    what: &str,
) -> Result<(), LifecycleError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io = |e| LifecycleError::io(what, path)(e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

mod id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::views::ViewId;

    pub fn serialize<S: Serializer>(id: &ViewId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ViewId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

mod opt_id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::views::ViewId;

    pub fn serialize<S: Serializer>(id: &Option<ViewId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.collect_str(id),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ViewId>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}
