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

        // Bounded compile work: sizes checked before anything is compiled.
        check_size(rt, &module, &manifest, bytes)?;
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

/// Refuses, before compiling, a module whose compilation or instances would
/// cost more than the runtime's [`Limits`](super::Limits) allow: its size, a
/// function body's size, block nesting, the count of functions, globals and
/// table elements, and initial memory over the memory cap. Malformed input is
/// left to the compiler, which names the fault.
fn check_size(
    rt: &Runtime,
    module: &str,
    manifest: &Manifest,
    bytes: &[u8],
) -> Result<(), LoadError> {
    use wasmparser::{Operator, Parser, Payload};
    let limits = &rt.config.limits;
    let too_big = |what: String, value: usize, limit: usize, key: &'static str| {
        Err(LoadError::TooBig {
            module: module.to_string(),
            projection: format!("{} {}", manifest.name, manifest.version),
            what,
            value: value as u64,
            limit: limit as u64,
            key,
        })
    };
    if bytes.len() > limits.module_bytes {
        return too_big(
            "the module, in bytes".into(),
            bytes.len(),
            limits.module_bytes,
            "module_mib",
        );
    }
    let (mut functions, mut globals, mut table_elements, mut memory) = (0usize, 0usize, 0u64, 0u64);
    let mut body_index = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else {
            return Ok(());
        };
        match payload {
            Payload::FunctionSection(r) => functions += r.count() as usize,
            Payload::GlobalSection(r) => globals += r.count() as usize,
            Payload::TableSection(r) => {
                for t in r.into_iter().flatten() {
                    table_elements = table_elements.saturating_add(t.ty.initial);
                }
            }
            Payload::MemorySection(r) => {
                for m in r.into_iter().flatten() {
                    let page = 1u64 << m.page_size_log2.unwrap_or(16);
                    memory = memory.saturating_add(m.initial.saturating_mul(page));
                }
            }
            Payload::CodeSectionStart { size, .. } if size as usize > limits.code_bytes => {
                return too_big(
                    "the code section, in bytes".into(),
                    size as usize,
                    limits.code_bytes,
                    "code_mib",
                );
            }
            Payload::CodeSectionEntry(body) => {
                let size = body.range().len();
                if size > limits.function_bytes {
                    return too_big(
                        format!(
                            "the body of function {body_index} (of the code section), in bytes"
                        ),
                        size,
                        limits.function_bytes,
                        "function_kib",
                    );
                }
                let Ok(mut ops) = body.get_operators_reader() else {
                    return Ok(());
                };
                let mut depth = 0usize;
                while !ops.eof() {
                    match ops.read() {
                        Ok(
                            Operator::Block { .. }
                            | Operator::Loop { .. }
                            | Operator::If { .. }
                            | Operator::Try { .. }
                            | Operator::TryTable { .. },
                        ) => {
                            depth += 1;
                            if depth > limits.block_nesting {
                                return too_big(
                                    format!(
                                        "the block nesting of function {body_index} (of the code section)"
                                    ),
                                    depth,
                                    limits.block_nesting,
                                    "block_nesting",
                                );
                            }
                        }
                        Ok(Operator::End) => depth = depth.saturating_sub(1),
                        Ok(_) => {}
                        Err(_) => return Ok(()),
                    }
                }
                body_index += 1;
            }
            _ => {}
        }
    }
    for (what, value) in [
        ("functions defined", functions as u64),
        ("globals defined", globals as u64),
        ("initial table elements", table_elements),
    ] {
        if value > limits.definitions as u64 {
            return too_big(
                format!("the count of {what}"),
                usize::try_from(value).unwrap_or(usize::MAX),
                limits.definitions,
                "definitions",
            );
        }
    }
    if memory > rt.config.memory_cap as u64 {
        return Err(LoadError::MemoryCap {
            module: module.to_string(),
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            initial: memory,
            cap: rt.config.memory_cap,
        });
    }
    Ok(())
}

/// Compiles the module, or reads its compiled code from the cache.
fn compile(
    rt: &Runtime,
    module: &str,
    bytes: &[u8],
    content_hash: &blake3::Hash,
) -> Result<(wasmtime::Module, bool), LoadError> {
    let engine_hash = engine_hash(&rt.engine);
    if let Some(cache) = &rt.cache
        && let Some(m) = cache.read(&rt.engine, content_hash, engine_hash)
    {
        return Ok((m, true));
    }
    let compiled = compile_within(rt, module, bytes)?;
    if let Some(cache) = &rt.cache
        && let Err(e) = cache.write(&compiled, content_hash, engine_hash)
    {
        tracing::warn!(module, cache = %cache.dir.display(), "could not cache the compiled module: {e}");
    }
    Ok((compiled, false))
}

/// Compiles on a thread of its own and waits at most the compile budget:
/// wasmtime cannot interrupt a compile, so past the budget the load is
/// refused and the thread finishes alone (the size limits checked before
/// bound how long that is).
fn compile_within(rt: &Runtime, module: &str, bytes: &[u8]) -> Result<wasmtime::Module, LoadError> {
    let budget = rt.config.limits.compile_time;
    let (tx, rx) = std::sync::mpsc::channel();
    let (engine, code) = (rt.engine.clone(), bytes.to_vec());
    std::thread::Builder::new()
        .name("kiln-compile".into())
        .spawn(move || {
            let _ = tx.send(wasmtime::Module::new(&engine, &code));
        })
        .map_err(|e| LoadError::Compile {
            module: module.to_string(),
            reason: format!("cannot start a compile thread: {e}"),
        })?;
    match rx.recv_timeout(budget) {
        Ok(compiled) => compiled.map_err(|e| LoadError::Compile {
            module: module.to_string(),
            reason: format!("{e:#}"),
        }),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(LoadError::CompileTimeout {
            module: module.to_string(),
            millis: budget.as_millis() as u64,
        }),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(LoadError::Compile {
            module: module.to_string(),
            reason: "the compile thread panicked".into(),
        }),
    }
}

/// A hash of the engine's compatibility settings (wasmtime's version and the
/// configuration compiled code depends on).
fn engine_hash(engine: &wasmtime::Engine) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    h.finish()
}

/// What every cache entry starts with (the format's version included).
const CACHE_MAGIC: &[u8; 16] = b"kiln-cwasm-v2\n\0\0";

/// The compile cache: a directory only the daemon's user may enter (mode
/// 0700), holding a secret key (`key`, mode 0600) and one file per module and
/// engine. Each entry is
///
/// ```text
/// magic (16) | MAC (32) | module content hash (32) | engine hash (8, LE) | artifact
/// ```
///
/// where the MAC is blake3 keyed with the secret over everything after it. An
/// entry is run only if its MAC holds and it names this module's content and
/// this engine: a file renamed, copied from elsewhere or altered is ignored
/// (with a warning) and the module is compiled again, overwriting it.
pub(super) struct CompileCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl CompileCache {
    /// Opens (creating) the cache at `dir`. A directory another user owns, or
    /// whose mode cannot be narrowed to 0700, is not used (a warning says why).
    pub(super) fn open(dir: &std::path::Path) -> anyhow::Result<Option<CompileCache>> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("creating the module cache {}: {e}", dir.display()))?;
        let key_path = dir.join("key");
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path);
        if let Ok(mut f) = created {
            use std::io::Write;
            let mut key = Vec::with_capacity(32);
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", key_path.display()))?;
        }
        let refuse = |why: String| {
            tracing::warn!(cache = %dir.display(), "not using the compile cache: {why}; modules are compiled at every load");
            Ok(None)
        };
        let (dir_meta, key_meta) = match (std::fs::metadata(dir), std::fs::metadata(&key_path)) {
            (Ok(d), Ok(k)) => (d, k),
            (Err(e), _) | (_, Err(e)) => return refuse(format!("cannot read it: {e}")),
        };
        // The key file is ours whoever made it first: its owner is the daemon's
        // user when the directory is trustworthy.
        let me = match probe_uid(dir) {
            Ok(uid) => uid,
            Err(e) => return refuse(format!("cannot write in it: {e}")),
        };
        if dir_meta.uid() != me || key_meta.uid() != me {
            return refuse(format!(
                "it (or its key) is owned by uid {}, not the daemon's uid {me}",
                dir_meta.uid()
            ));
        }
        for (path, meta, mode) in [
            (dir, &dir_meta, 0o700),
            (key_path.as_path(), &key_meta, 0o600),
        ] {
            if meta.mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "narrowing the compile cache's mode from {:o} to {mode:o}", meta.mode() & 0o777);
                if let Err(e) =
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                {
                    return refuse(format!("cannot narrow {}'s mode: {e}", path.display()));
                }
            }
        }
        let key = match std::fs::read(&key_path) {
            Ok(k) => k,
            Err(e) => return refuse(format!("cannot read its key: {e}")),
        };
        let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) else {
            return refuse(format!(
                "its key {} is not 32 bytes (remove it to make a new one)",
                key_path.display()
            ));
        };
        Ok(Some(CompileCache {
            dir: dir.to_path_buf(),
            key,
        }))
    }

    /// Cache file name: the module's content hash and the engine's hash.
    fn path(&self, content_hash: &blake3::Hash, engine_hash: u64) -> PathBuf {
        self.dir.join(format!(
            "{}-{engine_hash:016x}.cwasm",
            content_hash.to_hex()
        ))
    }

    fn mac(&self, content_hash: &blake3::Hash, engine_hash: u64, artifact: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(content_hash.as_bytes());
        h.update(&engine_hash.to_le_bytes());
        h.update(artifact);
        h.finalize()
    }

    /// The compiled module, if its entry is provably this module's for this
    /// engine; else `None` (after a warning, when an entry was there).
    fn read(
        &self,
        engine: &wasmtime::Engine,
        content_hash: &blake3::Hash,
        engine_hash: u64,
    ) -> Option<wasmtime::Module> {
        let path = self.path(content_hash, engine_hash);
        let bytes = std::fs::read(&path).ok()?;
        let why_not = || -> Result<&[u8], &'static str> {
            let rest = bytes
                .strip_prefix(CACHE_MAGIC)
                .ok_or("not a kiln cache entry")?;
            let (mac, rest) = rest.split_at_checked(32).ok_or("truncated")?;
            let (content, rest) = rest.split_at_checked(32).ok_or("truncated")?;
            let (engine_bytes, artifact) = rest.split_at_checked(8).ok_or("truncated")?;
            if content != content_hash.as_bytes() {
                return Err("compiled from another module");
            }
            if engine_bytes != engine_hash.to_le_bytes() {
                return Err("compiled for another engine");
            }
            // blake3::Hash compares in constant time.
            if self.mac(content_hash, engine_hash, artifact)
                != blake3::Hash::from_slice(mac).map_err(|_| "truncated")?
            {
                return Err("its MAC does not hold (altered, or made with another key)");
            }
            Ok(artifact)
        };
        match why_not() {
            // SAFETY: the artifact is one this daemon serialized: the MAC, keyed
            // with a secret only the daemon's user can read, covers it together
            // with this module's content hash and this engine's hash;
            // wasmtime checks its own header too.
            Ok(artifact) => match unsafe { wasmtime::Module::deserialize(engine, artifact) } {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring a compiled-module cache entry wasmtime refuses: {e}");
                    None
                }
            },
            Err(why) => {
                tracing::warn!(path = %path.display(), "ignoring a compiled-module cache entry: {why}; compiling the module again");
                None
            }
        }
    }

    fn write(
        &self,
        compiled: &wasmtime::Module,
        content_hash: &blake3::Hash,
        engine_hash: u64,
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let artifact = compiled.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut file = Vec::with_capacity(88 + artifact.len());
        file.extend_from_slice(CACHE_MAGIC);
        file.extend_from_slice(self.mac(content_hash, engine_hash, &artifact).as_bytes());
        file.extend_from_slice(content_hash.as_bytes());
        file.extend_from_slice(&engine_hash.to_le_bytes());
        file.extend_from_slice(&artifact);
        let path = self.path(content_hash, engine_hash);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&file)?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// The daemon's uid, as the owner of a file it creates in `dir`.
fn probe_uid(dir: &std::path::Path) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join(format!(".probe{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    let uid = std::fs::metadata(&probe).map(|m| m.uid());
    let _ = std::fs::remove_file(&probe);
    uid
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
