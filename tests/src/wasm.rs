//! The example projections built for wasm32 by `tests/build.rs`, and helpers
//! to run modules in tests.

use std::path::Path;

use kiln::runtime::{Module, Runtime, RuntimeConfig};
use kiln::store::{RecordedEvent, StreamId};

/// `projections/users` as a module.
pub const USERS: &str = env!("KILN_WASM_USERS");
/// `projections/orders` as a module.
pub const ORDERS: &str = env!("KILN_WASM_ORDERS");
/// `projections/inventory` as a module.
pub const INVENTORY: &str = env!("KILN_WASM_INVENTORY");
/// `projections/chaos` (deliberately faulty) as a module.
pub const CHAOS: &str = env!("KILN_WASM_CHAOS");
/// `projections/tally` (one document gathers every stream, yet it declares
/// `per_stream`) as a module.
pub const TALLY: &str = env!("KILN_WASM_TALLY");

/// What loading `bytes` (named `label`) was refused for; panics if it loads.
pub fn load_err(rt: &Runtime, label: &str, bytes: &[u8]) -> kiln::runtime::LoadError {
    match rt.load(label, bytes) {
        Ok(m) => panic!("{label} loaded as {}", m.view_id()),
        Err(e) => e,
    }
}

/// Asserts that `e`'s message mentions each of `parts`.
pub fn assert_mentions(e: &impl std::fmt::Display, parts: &[&str]) {
    let text = e.to_string();
    for p in parts {
        assert!(text.contains(p), "{text:?} does not mention {p:?}");
    }
}

/// A runtime with default limits and no compile cache.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

/// Loads a module that must load.
pub fn load(rt: &Runtime, path: &str) -> Module {
    rt.load_file(Path::new(path))
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

/// Builds recorded events at positions `first..`, versions counted per stream.
pub struct EventLog {
    events: Vec<RecordedEvent>,
    versions: std::collections::HashMap<String, u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    pub fn new() -> Self {
        EventLog {
            events: Vec::new(),
            versions: Default::default(),
        }
    }

    /// Appends an event (timestamp = position, like the SDK's native harness).
    pub fn push(&mut self, stream: &str, event_type: &str, data: serde_json::Value) -> &mut Self {
        let position = self.events.len() as u64 + 1;
        let version = self.versions.entry(stream.to_string()).or_insert(0);
        *version += 1;
        self.events.push(RecordedEvent {
            id: uuid::Uuid::new_v4(),
            stream: StreamId::new(stream).expect("stream id"),
            event_type: event_type.to_string(),
            version: *version,
            position,
            timestamp: position,
            metadata: Default::default(),
            tags: Vec::new(),
            data: data.to_string().into(),
        });
        self
    }

    pub fn events(&self) -> &[RecordedEvent] {
        &self.events
    }
}

/// `projections/users` at `version`. With `changed`, its manifest no longer
/// subscribes to `LoginFailed`: a different fingerprint ("changed logic") and a
/// visibly different view (`failed_logins` stays 0). Two calls that differ only
/// in `version` give the same fingerprint ("identical logic": an alias).
pub fn users_module(version: &str, changed: bool) -> Vec<u8> {
    let bytes = std::fs::read(USERS).expect("users module");
    let mut m = manifest_of(&bytes);
    m["version"] = serde_json::Value::from(version);
    if changed {
        let events: Vec<serde_json::Value> = m["events"]
            .as_array()
            .expect("the users manifest lists its events")
            .iter()
            .filter(|e| *e != "LoginFailed")
            .cloned()
            .collect();
        m["events"] = serde_json::Value::from(events);
    }
    with_manifest(&bytes, &m.to_string())
}

/// `module` with its `kiln-manifest` custom section's content replaced by
/// `manifest` (the other sections untouched, in order).
pub fn with_manifest(module: &[u8], manifest: &str) -> Vec<u8> {
    kiln::runtime::manifest_edit::replace_manifest(module, manifest.as_bytes())
        .expect("a module with a manifest")
}

/// `module`'s manifest, as JSON.
pub fn manifest_of(module: &[u8]) -> serde_json::Value {
    let bytes = kiln::runtime::manifest_edit::manifest_bytes(module).expect("a manifest");
    serde_json::from_slice(bytes).expect("manifest JSON")
}

/// A hand-written module (WAT) with a kiln manifest, for malformed-guest tests:
/// `imports` and `body` are spliced into a module exporting memory,
/// `kiln_alloc` (always 1024) and `kiln_apply` (whose body is `body`).
pub fn wat_module(imports: &str, data: &str, body: &str, manifest: Option<&str>) -> Vec<u8> {
    let manifest = manifest
        .map(|m| format!("(@custom \"kiln-manifest\" \"{}\")", m.replace('"', "\\\"")))
        .unwrap_or_default();
    let text = format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            {data}
            (func (export "kiln_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "kiln_apply") (param i32 i32) (result i32) {body})
            {manifest})"#
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// A manifest for hand-written test modules.
pub const RAW_MANIFEST: &str = r#"{"abi":1,"name":"raw","version":"0.1.0"}"#;

/// The compiled-module entries of a compile cache directory (`*.cwasm`), by name.
pub fn cache_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("the cache directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    entries.sort();
    entries
}

/// A hand-written module (WAT) with a kiln manifest named `name`: `fields`
/// are spliced into a module that declares its own memory, `kiln_alloc`
/// and `kiln_apply`, imports included.
pub fn wat_raw(name: &str, fields: &str) -> Vec<u8> {
    let manifest = format!(r#"{{"abi":1,"name":"{name}","version":"0.1.0"}}"#);
    let text = format!(
        "(module {fields} (@custom \"kiln-manifest\" \"{}\"))",
        manifest.replace('"', "\\\"")
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// A module named `name` that counts its calls to `kiln_apply` in a global
/// and puts the count (its last digit) under `calls`: in a fresh instance per
/// batch it is always 1; were instances reused, it would depend on the batching.
pub fn call_counter(name: &str) -> Vec<u8> {
    wat_raw(
        name,
        r#"(import "kiln" "put" (func $put (param i32 i32 i32 i32)))
        (memory (export "memory") 1)
        (global $calls (mut i32) (i32.const 0))
        (data (i32.const 0) "calls")
        (func (export "kiln_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "kiln_apply") (param i32 i32) (result i32)
            (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
            (i32.store8 (i32.const 16)
                (i32.add (i32.const 48) (i32.rem_u (global.get $calls) (i32.const 10))))
            (call $put (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 1))
            (i32.const 0))"#,
    )
}
