//! Loading a module: format checks, the manifest, the fingerprint, compilation
//! (through the on-disk cache), import/export checks, pre-instantiation.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_sdk::abi::{EXPORT_ALLOC, EXPORT_APPLY, HOST_MODULE, MANIFEST_SECTION};
use kiln_sdk::manifest::Manifest;
use wasmtime::{ExternType, InstancePre, ValType};

use super::fingerprint::{self, Fingerprint, FingerprintReport};
use super::host::{HOST_FUNCTIONS, HostState};
use super::{ABI_VERSION, LoadError, Runtime};
use crate::views::ViewId;

/// A validated, compiled, pre-instantiated projection module. Cheap to clone.
#[derive(Clone)]
pub struct Module {
    inner: Arc<Inner>,
}

struct Inner {
    label: String,
    manifest: Manifest,
    view: ViewId,
    fingerprint: FingerprintReport,
    content_hash: blake3::Hash,
    from_cache: bool,
    pub(super) pre: InstancePre<HostState>,
    pub(super) runtime: Runtime,
}

impl Module {
    /// What the module was loaded from (its path, usually).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The physical view this module builds: `<name>-<version>`.
    pub fn view_id(&self) -> &ViewId {
        &self.inner.view
    }

    pub fn name(&self) -> &str {
        &self.inner.manifest.name
    }

    pub fn version(&self) -> &str {
        &self.inner.manifest.version
    }

    /// The module's logic, version left out (see [`fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint.fingerprint
    }

    /// The fingerprint with its parts' digests and how data was compared.
    pub fn fingerprint_report(&self) -> &FingerprintReport {
        &self.inner.fingerprint
    }

    /// blake3 of the module's bytes (the compile cache's key).
    pub fn content_hash(&self) -> blake3::Hash {
        self.inner.content_hash
    }

    /// Was the compiled code read from the on-disk cache (no compilation)?
    pub fn from_cache(&self) -> bool {
        self.inner.from_cache
    }

    /// Does an event reach this projection (its manifest's event types and categories)?
    pub fn wants(&self, stream: &str, event_type: &str) -> bool {
        self.inner.manifest.wants(stream, event_type)
    }

    pub(super) fn pre(&self) -> &InstancePre<HostState> {
        &self.inner.pre
    }

    pub(super) fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub(super) fn load(rt: &Runtime, label: &str, bytes: &[u8]) -> Result<Module, LoadError> {
        let module = label.to_string();
        let not_wasm = |reason: String| LoadError::NotWasm {
            module: module.clone(),
            reason,
        };
        let sections = parse_sections(bytes).map_err(not_wasm)?;
        let manifest = match sections.manifests.as_slice() {
            [] => return Err(LoadError::MissingManifest { module }),
            [one] => Manifest::parse(one).map_err(|reason| LoadError::MalformedManifest {
                module: module.clone(),
                reason,
            })?,
            many => {
                return Err(LoadError::MalformedManifest {
                    module,
                    reason: format!("{} kiln-manifest sections, expected one", many.len()),
                });
            }
        };
        if manifest.abi != ABI_VERSION {
            return Err(LoadError::UnsupportedAbi {
                module,
                name: manifest.name,
                version: manifest.version,
                abi: manifest.abi,
            });
        }
        let view = ViewId::from_parts(&manifest.name, &manifest.version).map_err(|e| {
            LoadError::MalformedManifest {
                module: module.clone(),
                reason: e.to_string(),
            }
        })?;
        let content_hash = blake3::hash(bytes);

        let (compiled, from_cache) = compile(rt, &module, bytes, &content_hash)?;
        check_imports(&module, &compiled)?;
        check_exports(&module, &compiled)?;
        // After compiling: a module wasmtime refuses gets wasmtime's reason.
        let fingerprint =
            fingerprint::fingerprint(bytes, &manifest.without_version()).map_err(|e| {
                LoadError::NotWasm {
                    module: module.clone(),
                    reason: e.to_string(),
                }
            })?;
        let pre = rt
            .linker
            .instantiate_pre(&compiled)
            .map_err(|e| LoadError::Compile {
                module: module.clone(),
                reason: format!("linking kiln's host functions: {e:#}"),
            })?;
        tracing::debug!(module = %module, view = %view, fingerprint = %fingerprint.fingerprint, from_cache, "loaded projection module");
        Ok(Module {
            inner: Arc::new(Inner {
                label: module,
                manifest,
                view,
                fingerprint,
                content_hash,
                from_cache,
                pre,
                runtime: rt.clone(),
            }),
        })
    }
}

struct Sections<'a> {
    manifests: Vec<&'a [u8]>,
}

/// Walks the module's sections (the binary format's outer framing only; the
/// compiler validates the rest).
fn parse_sections(bytes: &[u8]) -> Result<Sections<'_>, String> {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {}
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => {
            return Err("it is a WebAssembly component; kiln runs core modules built for wasm32-unknown-unknown".into());
        }
        Some([0, b'a', b's', b'm', ..]) => {
            return Err("unsupported WebAssembly binary version".into());
        }
        _ => return Err("it does not start with the WebAssembly magic number \\0asm".into()),
    }
    let mut s = Sections {
        manifests: Vec::new(),
    };
    let mut at = 8;
    while at < bytes.len() {
        let id = bytes[at];
        let (size, after) = leb_u32(bytes, at + 1)
            .ok_or_else(|| format!("bad section size at offset {}", at + 1))?;
        let end = after
            .checked_add(size as usize)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| format!("section at offset {at} runs past the end of the file"))?;
        let payload = &bytes[after..end];
        if id == 0 {
            let (len, name_at) = leb_u32(payload, 0).ok_or("bad custom section name")?;
            let name = payload
                .get(name_at..name_at + len as usize)
                .ok_or("custom section name runs past its section")?;
            if name == MANIFEST_SECTION.as_bytes() {
                s.manifests.push(&payload[name_at + len as usize..]);
            }
        }
        at = end;
    }
    Ok(s)
}

fn leb_u32(bytes: &[u8], mut at: usize) -> Option<(u32, usize)> {
    let mut result: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(at)?;
        at += 1;
        result |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(result).ok().map(|v| (v, at));
        }
    }
    None
}

/// Compiles the module, or reads its compiled code from the cache.
fn compile(
    rt: &Runtime,
    module: &str,
    bytes: &[u8],
    content_hash: &blake3::Hash,
) -> Result<(wasmtime::Module, bool), LoadError> {
    let cached = rt
        .config
        .cache_dir
        .as_ref()
        .map(|dir| cache_path(rt, dir, content_hash));
    if let Some(path) = &cached
        && let Some(m) = read_cached(rt, path)
    {
        return Ok((m, true));
    }
    let compiled = wasmtime::Module::new(&rt.engine, bytes).map_err(|e| LoadError::Compile {
        module: module.to_string(),
        reason: format!("{e:#}"),
    })?;
    if let Some(path) = &cached
        && let Err(e) = write_cached(&compiled, path)
    {
        tracing::warn!(module, path = %path.display(), "could not cache the compiled module: {e}");
    }
    Ok((compiled, false))
}

/// Cache file name: the module's content hash plus a hash of the engine's
/// compatibility settings, so another wasmtime or config never reads it.
fn cache_path(rt: &Runtime, dir: &std::path::Path, content_hash: &blake3::Hash) -> PathBuf {
    let mut h = std::hash::DefaultHasher::new();
    rt.engine.precompile_compatibility_hash().hash(&mut h);
    dir.join(format!(
        "{}-{:016x}.cwasm",
        content_hash.to_hex(),
        h.finish()
    ))
}

/// A cache file is the artifact's blake3 followed by the artifact; a file that
/// does not match its hash is ignored (and overwritten after compiling).
fn read_cached(rt: &Runtime, path: &std::path::Path) -> Option<wasmtime::Module> {
    let bytes = std::fs::read(path).ok()?;
    let (hash, artifact) = bytes.split_at_checked(32)?;
    if blake3::hash(artifact).as_bytes() != hash {
        tracing::warn!(path = %path.display(), "ignoring a corrupt compiled-module cache entry");
        return None;
    }
    // SAFETY: the artifact is one this runtime serialized into its own cache
    // directory (checked against its hash above), for an engine with the same
    // compatibility hash (part of the file name); wasmtime checks the header too.
    unsafe { wasmtime::Module::deserialize(&rt.engine, artifact) }.ok()
}

fn write_cached(compiled: &wasmtime::Module, path: &std::path::Path) -> anyhow::Result<()> {
    let artifact = compiled.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut file = Vec::with_capacity(32 + artifact.len());
    file.extend_from_slice(blake3::hash(&artifact).as_bytes());
    file.extend_from_slice(&artifact);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &file)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn check_imports(module: &str, compiled: &wasmtime::Module) -> Result<(), LoadError> {
    for import in compiled.imports() {
        if import.module() != HOST_MODULE {
            return Err(LoadError::ForeignImport {
                module: module.to_string(),
                import: format!("{}::{}", import.module(), import.name()),
            });
        }
        if !HOST_FUNCTIONS.contains(&import.name()) {
            return Err(LoadError::UnknownHostFunction {
                module: module.to_string(),
                name: import.name().to_string(),
            });
        }
    }
    Ok(())
}

fn check_exports(module: &str, compiled: &wasmtime::Module) -> Result<(), LoadError> {
    let missing = |export: &str, expected: &str| LoadError::MissingExport {
        module: module.to_string(),
        export: export.to_string(),
        expected: expected.to_string(),
    };
    match compiled.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => {}
        _ => return Err(missing("memory", "a 32-bit linear memory")),
    }
    let func_is = |name: &str, params: usize| match compiled.get_export(name) {
        Some(ExternType::Func(f)) => {
            f.params().len() == params
                && f.params().all(|p| matches!(p, ValType::I32))
                && f.results().len() == 1
                && f.results().all(|r| matches!(r, ValType::I32))
        }
        _ => false,
    };
    if !func_is(EXPORT_ALLOC, 1) {
        return Err(missing(EXPORT_ALLOC, "func (i32) -> i32"));
    }
    if !func_is(EXPORT_APPLY, 2) {
        return Err(missing(EXPORT_APPLY, "func (i32, i32) -> i32"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_walker_refuses_garbage_and_components() {
        let reason = |bytes: &[u8]| parse_sections(bytes).err().unwrap_or_default();
        assert!(reason(b"hello world").contains("magic"));
        assert!(reason(&[0, b'a', b's', b'm', 0x0d, 0, 1, 0]).contains("component"));
        let truncated = [0, b'a', b's', b'm', 1, 0, 0, 0, 1, 0x7f];
        assert!(reason(&truncated).contains("past the end"));
    }

    #[test]
    fn leb_decodes_multibyte_and_refuses_overlong() {
        assert_eq!(leb_u32(&[0xe5, 0x8e, 0x26], 0), Some((624_485, 3)));
        assert_eq!(leb_u32(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 0), None);
    }
}
