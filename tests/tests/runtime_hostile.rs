//! The hostile-module catalogue: modules written to make the host spend what
//! it should not (memory, time, disk, compile work) or to smuggle in state,
//! each refused or bounded with a typed error naming the limit. Every module is
//! WebAssembly text, built here with the `wat` crate.
//!
//! Where a case measures the host's memory it states the bound: the growth of
//! the process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`)
//! over the case. The tests of this file run one at a time (one lock), so no
//! other case's memory is counted.

use std::sync::{Mutex, MutexGuard};

use kiln::runtime::{
    Instance, Limits, LoadError, ProjectionError, Projector, Runtime, RuntimeConfig,
};
use kiln::views::{MemoryDocuments, SharedDocuments, ViewStore, Writes};
use kiln_tests::wasm::{self, EventLog, assert_mentions, cache_entries, call_counter, wat_raw};
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: u64 = 1 << 20;

/// A `/proc/self/status` field, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kib * 1024
}

/// Runs `f` and returns its result with the growth of the peak RSS over it.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, u64) {
    // "5" resets VmHWM to the current RSS (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
    let before = status_bytes("VmRSS:");
    let out = f();
    let peak = status_bytes("VmHWM:");
    (out, peak.saturating_sub(before))
}

fn runtime(config: RuntimeConfig) -> Runtime {
    Runtime::new(config).expect("runtime")
}

const IMPORTS: &str = r#"
    (import "kiln" "put" (func $put (param i32 i32 i32 i32)))
    (import "kiln" "scan" (func $scan (param i32 i32 i32 i32) (result i64)))
    (import "kiln" "fail" (func $fail (param i32 i32 i32)))
    (import "kiln" "panic" (func $panic (param i32 i32 i32)))
    (func (export "kiln_alloc") (param i32) (result i32) (i32.const 1024))"#;

/// A module named `name` with kiln's imports, `memory` pages of memory,
/// `extra` fields and `kiln_apply` running `body`.
fn hostile(name: &str, pages: u32, extra: &str, body: &str) -> Vec<u8> {
    wat_raw(
        name,
        &format!(
            r#"{IMPORTS}
            (memory (export "memory") {pages})
            {extra}
            (func (export "kiln_apply") (param i32 i32) (result i32) (local $i i32) {body})"#
        ),
    )
}

fn instance(rt: &Runtime, bytes: &[u8]) -> Instance {
    let module = rt
        .load("hostile.wasm", bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    Instance::new(&module, Box::new(MemoryDocuments::default())).expect("instance")
}

fn events(n: usize) -> EventLog {
    let mut log = EventLog::new();
    for i in 0..n {
        log.push("s-1", "Anything", json!({ "i": i }));
    }
    log
}

fn load_err(rt: &Runtime, bytes: &[u8]) -> LoadError {
    wasm::load_err(rt, "hostile.wasm", bytes)
}

/// A runtime with the default memory cap and deadline, and `limits`.
fn with_limits(limits: Limits) -> Runtime {
    runtime(RuntimeConfig {
        limits,
        ..RuntimeConfig::default()
    })
}

#[test]
fn a_second_memory_is_refused_at_load() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let e = load_err(&rt, &hostile("multi", 1, "(memory $m2 1)", "(i32.const 0)"));
    assert!(matches!(e, LoadError::Compile { .. }), "{e}");
    assert_mentions(&e, &["hostile.wasm", "does not compile", "memor"]);
}

#[test]
fn initial_memory_over_the_cap_is_refused_at_load() {
    let _s = serial();
    let rt = runtime(RuntimeConfig {
        memory_cap: 64 << 20,
        ..RuntimeConfig::default()
    });
    // 2048 pages: 128 MiB.
    let e = load_err(&rt, &hostile("fat", 2048, "", "(i32.const 0)"));
    match &e {
        LoadError::MemoryCap { initial, cap, .. } => {
            assert_eq!((*initial, *cap), (128 << 20, 64 << 20));
        }
        other => panic!("expected MemoryCap, got {other}"),
    }
    assert_mentions(&e, &["hostile.wasm", "fat 0.1.0", "memory cap"]);
}

#[test]
fn table_growth_is_bounded() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let body = r#"
        (loop $again
            (drop (table.grow $t (ref.null func) (i32.const 10000)))
            (br $again))
        (i32.const 0)"#;
    let mut inst = instance(&rt, &hostile("tables", 1, "(table $t 1 funcref)", body));
    let e = inst.apply(events(1).events()).unwrap_err();
    match &e {
        ProjectionError::Limit { key, limit, .. } => {
            assert_eq!((*key, *limit), ("definitions", 100_000));
        }
        other => panic!("expected a limit, got {other}"),
    }
    assert_mentions(&e, &["tables 0.1.0", "table elements", "positions 1..=1"]);
}

/// `kiln_apply` putting a `doc_len`-byte JSON string under key number `$i`
/// (4 bytes at 0..4) for `$i` in `0..count`.
fn put_loop(doc_len: u32, count: u32) -> String {
    format!(
        r#"
        (memory.fill (i32.const 65536) (i32.const 97) (i32.const {doc_len}))
        (i32.store8 (i32.const 65536) (i32.const 34))
        (i32.store8 (i32.const {last}) (i32.const 34))
        (loop $again
            (i32.store8 (i32.const 0) (i32.add (i32.const 65) (i32.and (local.get $i) (i32.const 31))))
            (i32.store8 (i32.const 1) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 5)) (i32.const 31))))
            (i32.store8 (i32.const 2) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 10)) (i32.const 31))))
            (i32.store8 (i32.const 3) (i32.add (i32.const 65) (i32.and (i32.shr_u (local.get $i) (i32.const 15)) (i32.const 31))))
            (call $put (i32.const 0) (i32.const 4) (i32.const 65536) (i32.const {doc_len}))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $again (i32.lt_u (local.get $i) (i32.const {count}))))
        (i32.const 0)"#,
        last = 65536 + doc_len - 1
    )
}

/// Bound: a batch of 4 MiB puts under distinct keys (400 GB if unbounded)
/// stops at the default 64 MiB written, and the host's peak RSS grows by less
/// than 256 MiB (the overlay's 64 MiB, the guest's 8 MiB memory, copies).
#[test]
fn a_batch_writing_without_end_stops_at_the_write_limit() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let mut inst = instance(
        &rt,
        &hostile("writer", 128, "", &put_loop(4 << 20, 100_000)),
    );
    let (e, growth) = peak_growth(|| inst.apply(events(1).events()).unwrap_err());
    match &e {
        ProjectionError::Limit {
            key, limit, value, ..
        } => {
            assert_eq!((*key, *limit), ("batch_write_mib", 64 * MIB));
            assert!(*value > 64 * MIB && *value <= 69 * MIB, "{value}");
        }
        other => panic!("expected the write limit, got {other}"),
    }
    assert_mentions(
        &e,
        &["writer 0.1.0", "positions 1..=1", "runtime.batch_write_mib"],
    );
    assert!(growth < 256 * MIB, "peak RSS grew by {} MiB", growth / MIB);
    eprintln!("write bomb: peak RSS +{} MiB", growth / MIB);
}

#[test]
fn a_batch_writing_too_many_keys_stops_at_the_entries_limit() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let mut inst = instance(&rt, &hostile("keys", 2, "", &put_loop(3, 1_000_000)));
    let e = inst.apply(events(1).events()).unwrap_err();
    match &e {
        ProjectionError::Limit {
            key, value, limit, ..
        } => {
            assert_eq!(
                (*key, *value, *limit),
                ("batch_write_entries", 100_001, 100_000)
            );
        }
        other => panic!("expected the entries limit, got {other}"),
    }
}

/// A module scanning everything with `out_cap` 0 and putting `true` under
/// `len` if the length it was told is `expected`.
fn scanner(expected: u64) -> Vec<u8> {
    let body = format!(
        r#"
        (i32.store (i32.const 0) (i32.const 0x006e656c))
        (i32.store (i32.const 8) (i32.const 0x65757274))
        (i32.store (i32.const 16) (i32.const 0x736c6166))
        (i32.store8 (i32.const 20) (i32.const 0x65))
        (if (i64.eq (call $scan (i32.const 0) (i32.const 0) (i32.const 1024) (i32.const 0))
                    (i64.const {expected}))
            (then (call $put (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 4)))
            (else (call $put (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 5))))
        (i32.const 0)"#
    );
    hostile("scanner", 1, "", &body)
}

/// Bound: a scan over 128 MiB of committed documents with `out_cap` 0 reads
/// them from a RocksDB iterator without copying them: the total length is
/// right and the peak RSS grows by less than 96 MiB (RocksDB's block cache
/// included; copying the result, as before, took twice the documents' size).
/// With the default `scan_mib` (16) the same scan is a typed limit.
#[test]
fn a_scan_streams_from_the_view_and_stops_at_its_limit() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let docs = 128u64;
    let doc_len = MIB;
    let mut doc = vec![b'a'; doc_len as usize];
    doc[0] = b'"';
    doc[doc_len as usize - 1] = b'"';
    let rt = with_limits(Limits {
        scan_bytes: 256 << 20,
        ..Limits::default()
    });
    let key_len = 8u64;
    let expected = 4 + docs * (8 + key_len + doc_len);
    let module = rt.load("scanner.wasm", &scanner(expected)).unwrap();
    views.ensure(module.view_id()).unwrap();
    for chunk in 0..docs / 16 {
        let mut writes = Writes::new();
        for i in chunk * 16..(chunk + 1) * 16 {
            writes.insert(format!("doc{i:05}").into_bytes(), Some(doc.clone()));
        }
        views.commit(module.view_id(), &writes, 0).unwrap();
    }
    drop(doc);
    let mut p = Projector::open(&module, &views).unwrap();
    let (applied, growth) = peak_growth(|| p.apply(events(1).events()).map_err(|e| e.to_string()));
    applied.unwrap();
    let got = views.get(module.view_id(), b"len").unwrap();
    assert_eq!(got.as_deref(), Some(&b"true"[..]), "the scan's length");
    assert!(growth < 96 * MIB, "peak RSS grew by {} MiB", growth / MIB);
    eprintln!("scan of {docs} MiB: peak RSS +{} MiB", growth / MIB);

    let strict = runtime(RuntimeConfig::default());
    let module = strict.load("scanner.wasm", &scanner(expected)).unwrap();
    let mut p = Projector::open(&module, &views).unwrap();
    let e = p.apply(events(2).events()).unwrap_err();
    match &e {
        ProjectionError::Limit { key, limit, .. } => {
            assert_eq!((*key, *limit), ("scan_mib", 16 * MIB));
        }
        other => panic!("expected the scan limit, got {other}"),
    }
}

#[test]
fn documents_that_are_not_json_values_are_refused() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: [(&str, &[u8]); 5] = [
        ("invalid UTF-8", b"\"\xff\xfe\""),
        ("a lone surrogate", br#""\ud800""#),
        ("arrays 100,000 deep", deep.as_bytes()),
        ("a number out of range", b"1e99999"),
        ("two values", b"1 2"),
    ];
    for (what, doc) in cases {
        let escaped: String = doc.iter().map(|b| format!("\\{b:02x}")).collect();
        let body = format!(
            "(call $put (i32.const 0) (i32.const 1) (i32.const 4096) (i32.const {})) (i32.const 0)",
            doc.len()
        );
        let data = format!(r#"(data (i32.const 0) "k") (data (i32.const 4096) "{escaped}")"#);
        let mut inst = instance(&rt, &hostile("docs", 4, &data, &body));
        let e = inst.apply(events(1).events()).unwrap_err();
        assert!(
            matches!(e, ProjectionError::Malformed { .. }),
            "{what}: {e}"
        );
        assert_mentions(&e, &["docs 0.1.0", "document \"k\" is not JSON"]);
    }
}

#[test]
fn bad_message_pointers_in_fail_and_panic_are_malformed() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    for body in [
        "(call $fail (i32.const 0) (i32.const 70000) (i32.const 8)) (i32.const 1)",
        "(call $panic (i32.const 0) (i32.const -5) (i32.const 8)) unreachable",
        "(call $fail (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 1)",
    ] {
        let mut inst = instance(&rt, &hostile("liar", 1, "", body));
        let e = inst.apply(events(1).events()).unwrap_err();
        assert!(
            matches!(e, ProjectionError::Malformed { .. }),
            "{body}: {e}"
        );
        assert_mentions(
            &e,
            &["liar 0.1.0", "message at", "outside the guest's memory"],
        );
    }
}

#[test]
fn a_module_counting_its_calls_builds_the_same_view_at_every_batch_size() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    let module = rt.load("counter.wasm", &call_counter("counter")).unwrap();
    let log = events(4);
    let mut views = Vec::new();
    for batch in [1, 2, 3, 4] {
        let docs = SharedDocuments::default();
        let mut inst = Instance::new(&module, Box::new(docs.clone())).unwrap();
        for chunk in log.events().chunks(batch) {
            docs.apply(inst.apply(chunk).unwrap());
        }
        views.push(docs.snapshot());
    }
    assert_eq!(
        views[0].get(&b"calls"[..]).map(Vec::as_slice),
        Some(&b"1"[..])
    );
    assert!(views.iter().all(|v| *v == views[0]), "{views:?}");

    // The same through `kiln run`.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.wasm");
    std::fs::write(&path, call_counter("counter")).unwrap();
    let input = "{\"stream\":\"s-1\",\"type\":\"A\"}\n".repeat(4);
    let mut outputs = Vec::new();
    for batch in [1, 2, 4] {
        let mut out = Vec::new();
        kiln::cli::run::run_offline(
            &path,
            input.as_bytes(),
            "events",
            batch,
            RuntimeConfig::default(),
            &mut out,
        )
        .unwrap();
        outputs.push(String::from_utf8(out).unwrap());
    }
    assert_eq!(outputs[0].trim(), r#"{"key":"calls","doc":1}"#);
    assert!(outputs.iter().all(|o| *o == outputs[0]), "{outputs:?}");
}

/// A module putting its own name under `who`.
fn named(name: &str) -> Vec<u8> {
    hostile(
        name,
        1,
        &format!(r#"(data (i32.const 0) "who") (data (i32.const 16) "\"{name}\"")"#),
        &format!(
            "(call $put (i32.const 0) (i32.const 3) (i32.const 16) (i32.const {})) (i32.const 0)",
            name.len() + 2
        ),
    )
}

fn who(rt: &Runtime, bytes: &[u8]) -> (bool, Vec<u8>) {
    let module = rt.load("named.wasm", bytes).unwrap();
    let docs = SharedDocuments::default();
    let mut inst = Instance::new(&module, Box::new(docs.clone())).unwrap();
    docs.apply(inst.apply(events(1).events()).unwrap());
    let doc = docs.snapshot().remove(&b"who"[..]).unwrap();
    (module.from_cache(), doc)
}

#[test]
fn a_renamed_or_altered_compile_cache_entry_is_never_run() {
    use std::os::unix::fs::PermissionsExt;
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.clone()),
        ..RuntimeConfig::default()
    };
    let (alpha, beta) = (named("alpha"), named("beta"));
    {
        let rt = runtime(config.clone());
        assert_eq!(who(&rt, &alpha), (false, b"\"alpha\"".to_vec()));
        assert_eq!(who(&rt, &beta), (false, b"\"beta\"".to_vec()));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700, "the cache directory's mode");
    assert_eq!(mode(&cache.join("key")), 0o600, "the cache key's mode");
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 2);
    let rt = runtime(config.clone());
    assert_eq!(who(&rt, &alpha), (true, b"\"alpha\"".to_vec()));

    // alpha's compiled code under beta's name: ignored, beta compiled again.
    let alpha_hash = rt
        .load("alpha.wasm", &alpha)
        .unwrap()
        .content_hash()
        .to_hex()
        .to_string();
    let (a, b) = if entries[0].to_string_lossy().contains(&alpha_hash) {
        (&entries[0], &entries[1])
    } else {
        (&entries[1], &entries[0])
    };
    std::fs::copy(a, b).unwrap();
    let rt = runtime(config.clone());
    assert_eq!(who(&rt, &beta), (false, b"\"beta\"".to_vec()));
    assert_eq!(who(&rt, &beta), (true, b"\"beta\"".to_vec()), "rewritten");

    // One byte altered anywhere: ignored.
    let original = std::fs::read(b).unwrap();
    for at in [0, 20, 60, 90, original.len() / 2, original.len() - 1] {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        std::fs::write(b, &bytes).unwrap();
        let rt = runtime(config.clone());
        assert_eq!(
            who(&rt, &beta),
            (false, b"\"beta\"".to_vec()),
            "byte {at} altered"
        );
    }
    // Made with another key (another daemon's cache): ignored.
    std::fs::write(b, &original).unwrap();
    std::fs::write(cache.join("key"), [7u8; 32]).unwrap();
    let rt = runtime(config);
    assert_eq!(
        who(&rt, &beta),
        (false, b"\"beta\"".to_vec()),
        "another key"
    );
}

#[test]
fn compile_work_is_bounded_before_compiling() {
    let _s = serial();
    let rt = runtime(RuntimeConfig::default());
    // One function of 200,000 sequential ifs: 1.2 MB of code (an if setting
    // a local compiles in time growing with the square of the function's
    // size: 25 s at 1 MB).
    let ifs = "(if (local.get $i) (then (nop)))".repeat(200_000);
    let e = load_err(&rt, &hostile("ifs", 1, "", &format!("{ifs} (i32.const 0)")));
    match &e {
        LoadError::TooBig {
            key, limit, value, ..
        } => {
            assert_eq!((*key, *limit), ("function_kib", 128 << 10));
            assert!(*value > MIB, "{value}");
        }
        other => panic!("expected TooBig, got {other}"),
    }
    assert_mentions(
        &e,
        &[
            "hostile.wasm",
            "refused before compiling",
            "projection ifs 0.1.0",
            "runtime.function_kib",
        ],
    );

    let nested = format!("{}{}", "(block ".repeat(2_000), ")".repeat(2_000));
    let e = load_err(
        &rt,
        &hostile("deep", 1, "", &format!("{nested} (i32.const 0)")),
    );
    assert!(
        matches!(
            &e,
            LoadError::TooBig {
                key: "block_nesting",
                value: 1001,
                limit: 1000,
                ..
            }
        ),
        "{e}"
    );

    let functions = "(func nop)".repeat(100);
    let globals = "(global i32 (i32.const 0))".repeat(11);
    let cases = [
        (
            Limits {
                module_bytes: 200,
                ..Limits::default()
            },
            &functions,
            "module_mib",
            200,
        ),
        (
            Limits {
                code_bytes: 100,
                ..Limits::default()
            },
            &functions,
            "code_mib",
            100,
        ),
        (
            Limits {
                definitions: 10,
                ..Limits::default()
            },
            &globals,
            "definitions",
            10,
        ),
    ];
    for (limits, fields, key, limit) in cases {
        let e = load_err(
            &with_limits(limits),
            &hostile("small", 1, fields, "(i32.const 0)"),
        );
        match &e {
            LoadError::TooBig {
                key: k,
                limit: l,
                value,
                ..
            } => {
                assert_eq!((*k, *l), (key, limit));
                assert!(*value > limit, "{e}");
            }
            other => panic!("expected {key}, got {other}"),
        }
    }
}

/// A module within the size limits that still compiles slowly is refused
/// once its compile outlasts the budget (`runtime.compile_ms`): the load
/// answers then, naming the module and the key, while the compile finishes
/// alone; the same module loads under the default budget.
#[test]
fn a_compile_over_its_time_budget_is_refused() {
    let _s = serial();
    // About 110 KB of ifs setting a local (the quadratic shape): ~0.3 s to
    // compile here, 15× the 20 ms budget.
    let ifs = "(if (local.get $i) (then (local.set $i (i32.const 1))))".repeat(12_000);
    let slow = hostile("slow", 1, "", &format!("{ifs} (i32.const 0)"));
    let rt = with_limits(Limits {
        compile_time: std::time::Duration::from_millis(20),
        ..Limits::default()
    });
    let started = std::time::Instant::now();
    let e = load_err(&rt, &slow);
    let answered = started.elapsed();
    assert!(
        matches!(&e, LoadError::CompileTimeout { millis: 20, .. }),
        "{e}"
    );
    assert_mentions(&e, &["hostile.wasm", "runtime.compile_ms"]);
    assert!(
        answered < std::time::Duration::from_secs(2),
        "the refusal waited {answered:?}"
    );
    let rt = runtime(RuntimeConfig::default());
    rt.load("hostile.wasm", &slow)
        .unwrap_or_else(|e| panic!("under the default budget: {e}"));
}
