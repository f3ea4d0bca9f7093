//! The AssemblyScript SDK and its `users` port, end to end: modules built by
//! `tests/build.rs` with `kiln-as build`, run by the real runtime into real
//! views. `users-as` builds the Rust `users`' documents byte for byte; the
//! SDK's JSON writer writes what serde_json writes; failures and panics carry
//! the event's position; the SDK's and the example's own unit tests (Node)
//! pass.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kiln::runtime::{Module, ProjectionError, Projector};
use kiln::views::ViewStore;
use kiln_tests::rng::Rng;
use kiln_tests::wasm::{self, EventLog, USERS};
use serde_json::json;

const USERS_AS: &str = env!("KILN_WASM_USERS_AS");
const FIXTURE: &str = env!("KILN_WASM_SDK_AS_FIXTURE");

/// Every document of the module's view after applying `log` in batches of
/// `batch`, or the first batch's error.
fn run(
    module: &Module,
    log: &EventLog,
    batch: usize,
) -> Result<BTreeMap<String, Vec<u8>>, Box<ProjectionError>> {
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let mut p = Projector::open(module, &views).unwrap();
    for chunk in log.events().chunks(batch) {
        p.apply(chunk).map_err(Box::new)?;
    }
    Ok(views
        .scan(p.view(), b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
        .collect())
}

/// Users with names and emails that exercise the JSON writer's escapes and
/// UTF-8, several events per stream in one batch, and ignored events.
fn users_log() -> EventLog {
    let names = [
        "Ada",
        "Zoë \"Z\" O'Brien",
        "back\\slash/slash",
        "tab\tnew\nline\r\u{1}\u{1f}\u{7f}",
        "漢字 and 😀 and \u{2028}",
        "",
    ];
    let mut log = EventLog::new();
    for (i, name) in names.iter().enumerate() {
        let stream = format!("user-{i}");
        log.push(
            &stream,
            "UserRegistered",
            json!({"name": name, "email": format!("{i}@x.io"), "extra": [1, {"a": null}]}),
        );
        for _ in 0..i {
            log.push(&stream, "UserLoggedIn", json!({}));
        }
        if i % 2 == 0 {
            log.push(
                &stream,
                "UserRenamed",
                json!({"name": format!("{name} II")}),
            )
            .push(&stream, "LoginFailed", json!({}))
            .push(&stream, "EmailChanged", json!({"email": "é@x.io"}));
        }
        log.push("admin-1", "UserLoggedIn", json!({})).push(
            &stream,
            "Unrelated",
            json!({"ignored": true}),
        );
    }
    log
}

#[test]
fn users_as_builds_the_rust_users_documents_byte_for_byte() {
    let rt = wasm::runtime();
    let rust = wasm::load(&rt, USERS);
    let script = wasm::load(&rt, USERS_AS);
    let log = users_log();
    let expected = run(&rust, &log, usize::MAX).unwrap();
    assert_eq!(expected.len(), 6);
    for batch in [1, 4, usize::MAX] {
        let got = run(&script, &log, batch).unwrap();
        assert_eq!(got, expected, "users-as in batches of {batch}");
    }
    let zoe: serde_json::Value = serde_json::from_slice(&expected["user-1"]).unwrap();
    assert_eq!(zoe["name"], "Zoë \"Z\" O'Brien");
    assert_eq!(zoe["logins"], 1);
}

#[test]
fn users_as_is_the_users_view_at_1_1_0() {
    let rt = wasm::runtime();
    let rust = wasm::load(&rt, USERS);
    let script = wasm::load(&rt, USERS_AS);
    assert_eq!(script.view_id().to_string(), "users-1_1_0");
    assert_eq!(script.manifest().events, rust.manifest().events);
    assert_eq!(script.manifest().categories, rust.manifest().categories);
    // Both declare per-stream documents: both may warm by stream partitions.
    assert!(rust.manifest().per_stream);
    assert_eq!(script.manifest().per_stream, rust.manifest().per_stream);
}

#[test]
fn users_as_failure_names_the_projection_and_position() {
    let rt = wasm::runtime();
    let script = wasm::load(&rt, USERS_AS);
    let mut log = EventLog::new();
    log.push(
        "user-1",
        "UserRegistered",
        json!({"name": "A", "email": "a"}),
    )
    .push("user-1", "UserRenamed", json!({"nom": "x"}));
    match run(&script, &log, 10).map_err(|e| *e) {
        Err(ProjectionError::Failed {
            projection,
            version,
            position,
            message,
        }) => {
            assert_eq!((projection.as_str(), version.as_str()), ("users", "1.1.0"));
            assert_eq!(position, 2);
            assert_eq!(
                message,
                "event of type \"UserRenamed\" does not decode: missing field `name`"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn sdk_as_panic_names_the_position_and_message() {
    let rt = wasm::runtime();
    let fixture = wasm::load(&rt, FIXTURE);
    let mut log = EventLog::new();
    log.push("c-1", "Count", json!({"key": "n"}))
        .push("c-1", "Panic", json!({"message": "boom"}))
        .push("c-1", "Count", json!({"key": "n"}));
    match run(&fixture, &log, 10).map_err(|e| *e) {
        Err(ProjectionError::Panic {
            position, message, ..
        }) => {
            assert_eq!(position, 2);
            assert!(
                message.starts_with("boom (at test/fixture.ts:"),
                "{message}"
            );
        }
        other => panic!("expected a panic, got {other:?}"),
    }
}

/// The Rust side of the fixture's `Echo` document.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Echo {
    s: String,
    f: f64,
    i: i64,
    u: u64,
    b: bool,
}

/// A random string mixing ASCII, escapes, 2-, 3- and 4-byte UTF-8.
fn string(rng: &mut Rng) -> String {
    const CHARS: &[char] = &[
        'a', 'Z', '0', ' ', '"', '\\', '/', '\n', '\t', '\r', '\u{0}', '\u{1f}', '\u{7f}', 'é',
        'ß', '€', '\u{2028}', '\u{fffd}', '😀', '𝄞',
    ];
    (0..rng.below(12))
        .map(|_| CHARS[rng.below(CHARS.len() as u64) as usize])
        .collect()
}

/// A random finite f64 and whether it has at most 15 significant digits and
/// a decimal exponent within ±22 (money, measures, counts): raw bits,
/// decimals, integers, powers of ten.
fn float(rng: &mut Rng) -> (f64, bool) {
    match rng.below(4) {
        0 => loop {
            let f = f64::from_bits(rng.next_u64());
            if f.is_finite() {
                break (f, false);
            }
        },
        1 => ((rng.below(2_000_000) as f64 - 1_000_000.0) / 100.0, true),
        2 => (rng.below(1 << 49) as f64, true),
        _ => {
            let text = format!("{}e{}", rng.below(9) + 1, rng.below(45) as i64 - 22);
            (text.parse().expect("a float"), true)
        }
    }
}

/// Strings, integers and booleans exactly as serde_json writes them; floats
/// too when they have at most 15 significant digits and a decimal exponent
/// within ±22. Another float
/// may come out a few units in the last place from serde_json's
/// (the SDK parses such numbers within a few ulps, and AssemblyScript's dtoa
/// is Grisu2, not shortest-nearest).
#[test]
fn sdk_as_json_writer_writes_what_serde_json_writes() {
    let rt = wasm::runtime();
    let fixture = wasm::load(&rt, FIXTURE);
    let mut rng = Rng(14);
    let mut log = EventLog::new();
    let mut expected = BTreeMap::new();
    // (value, exact): the extremes need 17 digits or exponents past ±22.
    let fixed = [
        (0.0, true),
        (-0.0, true),
        (0.1, true),
        (1.0, true),
        (1e15, true),
        (1e16, true),
        (1e17, true),
        (1.5e-7, true),
        (0.001, true),
        (1e-5, true),
        (123.456, true),
        (7e22, true),
        (f64::MAX, false),
        (f64::MIN_POSITIVE, false),
        (5e-324, false),
        (-1e300, false),
        (9007199254740993.0, true),
    ];
    for n in 0..600 {
        let (f, short) = fixed.get(n).copied().unwrap_or_else(|| float(&mut rng));
        let echo = Echo {
            s: string(&mut rng),
            f,
            i: rng.next_u64() as i64 >> rng.below(64),
            u: rng.next_u64() >> rng.below(64),
            b: rng.below(2) == 1,
        };
        let key = format!("echo/{n:04}");
        let mut data = serde_json::to_value(&echo).unwrap();
        data["key"] = json!(key);
        log.push("t-1", "Echo", data);
        expected.insert(key, (serde_json::to_vec(&echo).unwrap(), echo, short));
    }
    let got = run(&fixture, &log, 100).unwrap();
    let (mut long_floats_differing, mut max_ulps) = (0, 0);
    for (key, (want, echo, short)) in &expected {
        let have = got.get(key).unwrap_or_else(|| panic!("no {key}"));
        let (have_text, want_text) = (String::from_utf8_lossy(have), String::from_utf8_lossy(want));
        if *short || have == want {
            assert_eq!(have_text, want_text, "{key}");
            continue;
        }
        long_floats_differing += 1;
        let back: Echo = serde_json::from_slice(have).unwrap();
        let ulps = back.f.to_bits().abs_diff(echo.f.to_bits());
        max_ulps = max_ulps.max(ulps);
        assert!(
            ulps <= 4,
            "{key}: {have_text} is {ulps} ulps from {want_text}"
        );
        assert_eq!(
            Echo { f: echo.f, ..back },
            *echo,
            "{key}: only the float may differ: {have_text}"
        );
    }
    // Measured (seed 14): 89 of the 600 documents, each with a float of 17
    // digits or an extreme exponent, at most 2 ulps away.
    eprintln!(
        "{long_floats_differing} floats written otherwise than serde_json, at most {max_ulps} ulps away"
    );
}

/// Runs `npm test` in `dir` (relative to the workspace root).
fn npm_test(dir: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(root.join(dir))
        .output()
        .expect("running npm");
    assert!(
        out.status.success(),
        "npm test in {dir} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sdk_as_unit_tests_pass_in_node() {
    npm_test("sdk-as");
}

#[test]
fn users_as_unit_tests_pass_in_node() {
    npm_test("projections/users-as");
}
