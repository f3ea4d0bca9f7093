//! The runtime's refusal catalogue: every way a module can be refused at load,
//! or a batch refused at run time, with a message naming the module (or the
//! projection, version and event position) and the reason.

use std::time::{Duration, Instant};

use kiln::runtime::{Instance, LoadError, ProjectionError, Runtime, RuntimeConfig};
use kiln::views::MemoryDocuments;
use kiln_tests::wasm::{
    self, CHAOS, EventLog, RAW_MANIFEST, assert_mentions, load_err, wat_module,
};
use serde_json::json;

#[test]
fn not_wasm_is_refused() {
    let rt = wasm::runtime();
    let e = load_err(&rt, "notes.txt", b"hello, I am not a module");
    assert!(matches!(e, LoadError::NotWasm { .. }), "{e}");
    assert_mentions(
        &e,
        &["module notes.txt", "not a WebAssembly module", "magic"],
    );
}

#[test]
fn foreign_imports_such_as_wasi_are_refused() {
    let rt = wasm::runtime();
    let bytes = wat_module(
        r#"(import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))"#,
        "",
        "(i32.const 0)",
        Some(RAW_MANIFEST),
    );
    let e = load_err(&rt, "wasi.wasm", &bytes);
    assert!(matches!(e, LoadError::ForeignImport { .. }), "{e}");
    assert_mentions(
        &e,
        &[
            "wasi.wasm",
            "wasi_snapshot_preview1::random_get",
            "only kiln's host module",
        ],
    );
}

#[test]
fn unknown_kiln_host_functions_are_refused() {
    let rt = wasm::runtime();
    let bytes = wat_module(
        r#"(import "kiln" "clock" (func (result i64)))"#,
        "",
        "(i32.const 0)",
        Some(RAW_MANIFEST),
    );
    let e = load_err(&rt, "clock.wasm", &bytes);
    assert!(matches!(e, LoadError::UnknownHostFunction { .. }), "{e}");
    assert_mentions(&e, &["clock.wasm", "kiln.clock"]);
}

#[test]
fn missing_manifest_is_refused() {
    let rt = wasm::runtime();
    let e = load_err(&rt, "bare.wasm", &wat_module("", "", "(i32.const 0)", None));
    assert!(matches!(e, LoadError::MissingManifest { .. }), "{e}");
    assert_mentions(&e, &["bare.wasm", "no kiln manifest", "kiln_sdk::export!"]);
}

#[test]
fn malformed_manifests_are_refused_with_the_reason() {
    let rt = wasm::runtime();
    for (manifest, reason) in [
        ("this is not json", "expected"),
        (r#"{"abi":1,"name":"raw"}"#, "missing field `version`"),
        (
            r#"{"abi":1,"name":"raw","version":"one"}"#,
            "invalid version",
        ),
        (
            r#"{"abi":1,"name":"9lives","version":"1.0.0"}"#,
            "invalid view name",
        ),
    ] {
        let bytes = wat_module("", "", "(i32.const 0)", Some(manifest));
        let e = load_err(&rt, "odd.wasm", &bytes);
        assert!(
            matches!(e, LoadError::MalformedManifest { .. }),
            "{manifest}: {e}"
        );
        assert_mentions(&e, &["odd.wasm", "malformed kiln manifest", reason]);
    }
}

#[test]
fn unknown_abi_version_is_refused() {
    let rt = wasm::runtime();
    let manifest = r#"{"abi":2,"name":"future","version":"3.0.0"}"#;
    let e = load_err(
        &rt,
        "future.wasm",
        &wat_module("", "", "(i32.const 0)", Some(manifest)),
    );
    assert!(matches!(e, LoadError::UnsupportedAbi { abi: 2, .. }), "{e}");
    assert_mentions(
        &e,
        &[
            "future.wasm",
            "future 3.0.0",
            "ABI version 2",
            "supports version 1",
        ],
    );
}

#[test]
fn missing_exports_are_refused() {
    let rt = wasm::runtime();
    let text = format!(
        r#"(module (memory (export "memory") 1)
             (func (export "kiln_alloc") (param i32) (result i32) (i32.const 0))
             (@custom "kiln-manifest" "{}"))"#,
        RAW_MANIFEST.replace('"', "\\\"")
    );
    let e = load_err(&rt, "half.wasm", &wat::parse_str(text).unwrap());
    assert!(matches!(e, LoadError::MissingExport { .. }), "{e}");
    assert_mentions(&e, &["half.wasm", "kiln_apply"]);
}

fn chaos(config: RuntimeConfig) -> Instance {
    let rt = Runtime::new(config).unwrap();
    let module = wasm::load(&rt, CHAOS);
    Instance::new(&module, Box::new(MemoryDocuments::default())).unwrap()
}

#[test]
fn guest_panic_reports_projection_version_position_and_text() {
    let mut inst = chaos(RuntimeConfig::default());
    let mut log = EventLog::new();
    log.push("s-1", "Note", json!({"text": "a"}))
        .push("s-1", "Note", json!({"text": "b"}))
        .push(
            "s-2",
            "Panic",
            json!({"message": "the flux capacitor is empty"}),
        )
        .push("s-1", "Note", json!({"text": "never"}));
    let e = inst.apply(log.events()).unwrap_err();
    match &e {
        ProjectionError::Panic {
            position, message, ..
        } => {
            assert_eq!(*position, 3);
            assert!(message.contains("the flux capacitor is empty"), "{message}");
        }
        other => panic!("expected a panic, got {other}"),
    }
    assert_mentions(
        &e,
        &[
            "projection chaos 1.0.0 panicked at event position 3",
            "flux capacitor",
        ],
    );

    // The instance is replaced after a trap: the next batch runs normally.
    let mut next = EventLog::new();
    next.push("s-3", "Note", json!({"text": "after"}));
    let writes = inst.apply(next.events()).unwrap();
    assert_eq!(writes.len(), 1);
}

#[test]
fn handler_error_reports_position_and_message() {
    let mut inst = chaos(RuntimeConfig::default());
    let mut log = EventLog::new();
    log.push("s-1", "Note", json!({"text": "a"})).push(
        "s-1",
        "Fail",
        json!({"message": "no such account"}),
    );
    let e = inst.apply(log.events()).unwrap_err();
    assert!(
        matches!(e, ProjectionError::Failed { position: 2, .. }),
        "{e}"
    );
    assert_mentions(
        &e,
        &["chaos 1.0.0 failed at event position 2", "no such account"],
    );
    // Undecodable event data is a failure of the same kind, naming the field.
    let mut bad = EventLog::new();
    bad.push("s-1", "Note", json!({"txet": "typo"}));
    let e = inst.apply(bad.events()).unwrap_err();
    assert_mentions(&e, &["position 1", "missing field `text`"]);
}

#[test]
fn infinite_loop_is_stopped_by_the_deadline() {
    let mut inst = chaos(RuntimeConfig {
        batch_deadline: Duration::from_millis(200),
        ..RuntimeConfig::default()
    });
    let mut log = EventLog::new();
    log.push("s-1", "Note", json!({"text": "a"}))
        .push("s-1", "Spin", json!({}));
    let started = Instant::now();
    let e = inst.apply(log.events()).unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            e,
            ProjectionError::Deadline {
                first: 1,
                last: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_mentions(
        &e,
        &["chaos 1.0.0", "deadline of 200 ms", "positions 1..=2"],
    );
    assert!(
        took < Duration::from_secs(5),
        "interrupted only after {took:?}"
    );
}

#[test]
fn memory_bomb_is_stopped_by_the_cap() {
    let cap = 32 << 20;
    let mut inst = chaos(RuntimeConfig {
        memory_cap: cap,
        ..RuntimeConfig::default()
    });
    let mut log = EventLog::new();
    log.push("s-1", "Hog", json!({"mib": 4}));
    inst.apply(log.events())
        .expect("4 MiB fits under a 32 MiB cap");
    let mut bomb = EventLog::new();
    bomb.push("s-1", "Hog", json!({"mib": 64}));
    let e = inst.apply(bomb.events()).unwrap_err();
    match &e {
        ProjectionError::MemoryCap { cap: c, wanted, .. } => {
            assert_eq!(*c, cap);
            assert!(*wanted > cap);
        }
        other => panic!("expected the memory cap, got {other}"),
    }
    assert_mentions(&e, &["chaos 1.0.0", "memory cap of 33554432 bytes"]);
}

fn raw_instance(imports: &str, data: &str, body: &str) -> Instance {
    let rt = wasm::runtime();
    let module = rt
        .load(
            "raw.wasm",
            &wat_module(imports, data, body, Some(RAW_MANIFEST)),
        )
        .unwrap();
    Instance::new(&module, Box::new(MemoryDocuments::default())).unwrap()
}

fn one_event() -> EventLog {
    let mut log = EventLog::new();
    log.push("s-1", "Anything", json!({}));
    log
}

#[test]
fn malformed_data_from_the_guest_is_refused() {
    let put = r#"(import "kiln" "put" (func $put (param i32 i32 i32 i32)))"#;
    let data = r#"(data (i32.const 0) "key") (data (i32.const 16) "{not json")"#;
    let cases = [
        // A document that is not JSON.
        (
            put,
            data,
            "(call $put (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 9)) (i32.const 0)",
            "is not JSON",
        ),
        // A pointer outside the guest's memory.
        (
            put,
            data,
            "(call $put (i32.const 0) (i32.const 3) (i32.const 70000) (i32.const 4)) (i32.const 0)",
            "outside the guest's memory",
        ),
        // An empty key.
        (
            put,
            data,
            "(call $put (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 1)) (i32.const 0)",
            "document key of 0 bytes",
        ),
        // A status kiln_apply may not return.
        ("", "", "(i32.const 7)", "kiln_apply returned 7"),
        // "Failed" without saying why.
        ("", "", "(i32.const 1)", "without calling kiln.fail"),
    ];
    for (imports, data, body, reason) in cases {
        let mut inst = raw_instance(imports, data, body);
        let e = inst.apply(one_event().events()).unwrap_err();
        assert!(
            matches!(e, ProjectionError::Malformed { .. }),
            "{body}: {e}"
        );
        assert_mentions(
            &e,
            &[
                "projection raw 0.1.0",
                "malformed data",
                "positions 1..=1",
                reason,
            ],
        );
    }
}

#[test]
fn a_plain_trap_is_reported_with_the_batch() {
    let mut inst = raw_instance("", "", "unreachable");
    let e = inst.apply(one_event().events()).unwrap_err();
    assert!(matches!(e, ProjectionError::Trap { .. }), "{e}");
    assert_mentions(
        &e,
        &[
            "projection raw 0.1.0 trapped",
            "positions 1..=1",
            "unreachable",
        ],
    );
}
