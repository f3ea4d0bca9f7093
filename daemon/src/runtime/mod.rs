//! The WebAssembly projection runtime.
//!
//! One [`Runtime`] owns one `wasmtime::Engine`, configured for determinism (NaN
//! canonicalization, deterministic relaxed SIMD, no WASI: a module can import
//! nothing but kiln's host module, so it has no clock, randomness or files) and
//! for speed (modules are compiled once, cached on disk by content hash, and
//! pre-instantiated). An epoch ticker thread bounds each batch's run time.
//!
//! - [`Runtime::load`] validates a module and reads its manifest without running
//!   it, giving a [`Module`] (manifest, [`ViewId`], [`Fingerprint`]), or a
//!   [`LoadError`] naming the module and the reason.
//! - [`Instance`] runs a module over batches of events against a
//!   [`DocumentSource`]; each batch yields its writes, or a [`ProjectionError`]
//!   naming the projection, version, event position and reason.
//! - [`Projector`] is an instance bound to a view in the [`ViewStore`](crate::views::ViewStore): each batch's
//!   writes and the view's checkpoint commit in one RocksDB write batch.
//!
//! The guest side of the contract is `sdk/ABI.md`, implemented by `kiln-sdk`.

pub mod fingerprint;
mod host;
mod instance;
pub mod manifest_edit;
mod module;

use std::path::PathBuf;
use std::time::Duration;

use wasmtime::{Config, Engine, Linker, OptLevel};

pub use fingerprint::{Fingerprint, FingerprintReport};
pub use instance::{Instance, Projector, Ungroupable, encode_event};
pub use module::Module;

use crate::store::Position;
use crate::views::{ViewError, ViewId};
use host::HostState;

/// The ABI version this runtime accepts.
pub const ABI_VERSION: u32 = kiln_sdk::abi::ABI_VERSION;

/// How often the epoch ticker advances; the unit of batch deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits and caching of a runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Most linear memory one instance may use, in bytes.
    pub memory_cap: usize,
    /// Longest one batch may run before it is interrupted.
    pub batch_deadline: Duration,
    /// Where compiled modules are cached (by content hash); `None` = no cache.
    pub cache_dir: Option<PathBuf>,
    /// What else a module may make the host spend (`sdk/ABI.md`, "Limits").
    pub limits: Limits,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            memory_cap: 256 << 20,
            batch_deadline: Duration::from_secs(10),
            cache_dir: None,
            limits: Limits::default(),
        }
    }
}

/// Bounds on the host resources a module can make kiln spend, beyond its
/// memory cap and batch deadline. Each refusal is a typed error naming the
/// limit ([`LoadError::TooBig`] at load, [`ProjectionError::Limit`] in a batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of keys and documents one batch may hold written (the batch's
    /// overlay: a key rewritten counts once, at its latest size).
    pub batch_write_bytes: usize,
    /// Keys (puts and deletes) one batch may write.
    pub batch_write_entries: usize,
    /// Largest result of one `scan` (its encoding's length), in bytes.
    pub scan_bytes: usize,
    /// Largest module accepted, in bytes.
    pub module_bytes: usize,
    /// Largest code section (all function bodies), in bytes.
    pub code_bytes: usize,
    /// Largest function body, in bytes of code (compile time grows with its
    /// square for some shapes of code).
    pub function_bytes: usize,
    /// Deepest nesting of blocks, loops and ifs in a function.
    pub block_nesting: usize,
    /// Most functions, globals, or table elements a module may declare.
    pub definitions: usize,
    /// Longest a module may take to compile: past it the load is refused
    /// ([`LoadError::CompileTimeout`]) and nothing waits for it any more.
    pub compile_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            batch_write_bytes: 64 << 20,
            batch_write_entries: 100_000,
            scan_bytes: 16 << 20,
            module_bytes: 16 << 20,
            code_bytes: 4 << 20,
            function_bytes: 128 << 10,
            block_nesting: 1_000,
            definitions: 100_000,
            compile_time: Duration::from_secs(60),
        }
    }
}

/// Why a module was refused at load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("module {module}: cannot read it: {source}")]
    Read {
        module: String,
        #[source]
        source: std::io::Error,
    },
    #[error("module {module}: not a WebAssembly module: {reason}")]
    NotWasm { module: String, reason: String },
    #[error(
        "module {module}: imports {import}, but a projection may import only kiln's host module \"kiln\" (no WASI or other host APIs)"
    )]
    ForeignImport { module: String, import: String },
    #[error(
        "module {module}: imports kiln.{name}, which kiln's host module does not provide (ABI {ABI_VERSION})"
    )]
    UnknownHostFunction { module: String, name: String },
    #[error(
        "module {module}: no kiln manifest (custom section \"kiln-manifest\"); build projections with kiln_sdk::export!"
    )]
    MissingManifest { module: String },
    #[error("module {module}: malformed kiln manifest: {reason}")]
    MalformedManifest { module: String, reason: String },
    #[error(
        "module {module}: projection {name} {version} targets ABI version {abi}, but this kiln supports version {ABI_VERSION}"
    )]
    UnsupportedAbi {
        module: String,
        name: String,
        version: String,
        abi: u32,
    },
    #[error("module {module}: missing or mistyped export {export} (expected {expected})")]
    MissingExport {
        module: String,
        export: String,
        expected: String,
    },
    #[error("module {module}: does not compile: {reason}")]
    Compile { module: String, reason: String },
    #[error(
        "module {module}: compiling took longer than {millis} ms (runtime.compile_ms); refused (the compile finishes in the background and is dropped)"
    )]
    CompileTimeout { module: String, millis: u64 },
    #[error(
        "module {module}: projection {projection}: {what} is {value}, over the limit of {limit} (runtime.{key}); refused before compiling"
    )]
    TooBig {
        module: String,
        /// The projection's name and version, e.g. "users 1.2.0".
        projection: String,
        /// What was measured, e.g. "function 3's body, in bytes".
        what: String,
        value: u64,
        limit: u64,
        /// The configuration key of the limit.
        key: &'static str,
    },
    #[error(
        "module {module}: projection {name} {version} declares {initial} bytes of initial memory, over the memory cap of {cap} bytes"
    )]
    MemoryCap {
        module: String,
        name: String,
        version: String,
        initial: u64,
        cap: usize,
    },
}

/// Why a batch could not be applied. Every variant names the projection, its
/// version and the log position of the event (or the batch's range).
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("projection {projection} {version} panicked at event position {position}: {message}")]
    Panic {
        projection: String,
        version: String,
        position: Position,
        message: String,
    },
    #[error("projection {projection} {version} failed at event position {position}: {message}")]
    Failed {
        projection: String,
        version: String,
        position: Position,
        message: String,
    },
    #[error(
        "projection {projection} {version} trapped in the batch at positions {first}..={last}: {reason}"
    )]
    Trap {
        projection: String,
        version: String,
        first: Position,
        last: Position,
        reason: String,
    },
    #[error(
        "projection {projection} {version} exceeded its deadline of {millis} ms in the batch at positions {first}..={last} (infinite loop?)"
    )]
    Deadline {
        projection: String,
        version: String,
        first: Position,
        last: Position,
        millis: u128,
    },
    #[error(
        "projection {projection} {version} exceeded its memory cap of {cap} bytes (wanted {wanted}) in the batch at positions {first}..={last}"
    )]
    MemoryCap {
        projection: String,
        version: String,
        first: Position,
        last: Position,
        cap: usize,
        wanted: usize,
    },
    #[error(
        "projection {projection} {version} returned malformed data in the batch at positions {first}..={last}: {reason}"
    )]
    Malformed {
        projection: String,
        version: String,
        first: Position,
        last: Position,
        reason: String,
    },
    #[error(
        "projection {projection} {version} went over a host limit in the batch at positions {first}..={last}: {what} reached {value}, the limit is {limit} (runtime.{key})"
    )]
    Limit {
        projection: String,
        version: String,
        first: Position,
        last: Position,
        /// What was counted, e.g. "bytes written by the batch".
        what: &'static str,
        value: u64,
        limit: u64,
        /// The configuration key of the limit.
        key: &'static str,
    },
    #[error("projection {projection} {version} could not be instantiated: {reason}")]
    Instantiate {
        projection: String,
        version: String,
        reason: String,
    },
    /// A split warm-up's batch touched a document another partition
    /// touched: the `per_stream` promise does not hold (`views::owners`).
    #[error("{violation} (in the batch at positions {first}..={last})")]
    SplitDependent {
        violation: Box<crate::views::owners::SplitViolation>,
        first: Position,
        last: Position,
    },
    #[error("view {view} at batch positions {first}..={last}: {source}")]
    View {
        view: ViewId,
        first: Position,
        last: Position,
        #[source]
        source: ViewError,
    },
}

/// The engine, the host functions, and the epoch ticker. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: std::sync::Arc<Linker<HostState>>,
    config: RuntimeConfig,
    /// The compile cache, when configured and safe to use.
    cache: Option<std::sync::Arc<module::CompileCache>>,
}

impl ProjectionError {
    /// A fault of the engine's limits (deadline, memory cap, a host limit)
    /// rather than of one event: such a batch is retried in smaller batches,
    /// in a fresh instance, before any event is declared poison.
    pub fn is_resource_fault(&self) -> bool {
        matches!(
            self,
            ProjectionError::Deadline { .. }
                | ProjectionError::MemoryCap { .. }
                | ProjectionError::Limit { .. }
        )
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let mut c = Config::new();
        // One memory per module: the memory cap is the instance's whole memory.
        c.wasm_multi_memory(false);
        c.cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .parallel_compilation(true);
        if std::env::var_os("KILN_WASM_PERFMAP").is_some() {
            // Lets `perf` name guest functions (/tmp/perf-<pid>.map).
            c.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&c).map_err(|e| anyhow::anyhow!("configuring wasmtime: {e}"))?;
        let linker = host::linker(&engine)
            .map_err(|e| anyhow::anyhow!("defining kiln's host functions: {e}"))?;
        start_epoch_ticker(&engine)?;
        let cache = match &config.cache_dir {
            Some(dir) => module::CompileCache::open(dir)?,
            None => None,
        };
        Ok(Runtime {
            engine,
            linker: std::sync::Arc::new(linker),
            config,
            cache: cache.map(std::sync::Arc::new),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Validates `bytes` as a projection module named `label` (a path, usually)
    /// and prepares it for instantiation. Nothing in the module runs.
    pub fn load(&self, label: &str, bytes: &[u8]) -> Result<Module, LoadError> {
        Module::load(self, label, bytes)
    }

    /// [`Runtime::load`] on a file.
    pub fn load_file(&self, path: impl AsRef<std::path::Path>) -> Result<Module, LoadError> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            module: label.clone(),
            source,
        })?;
        self.load(&label, &bytes)
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn start_epoch_ticker(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("kiln-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the epoch ticker: {e}"))?;
    Ok(())
}
