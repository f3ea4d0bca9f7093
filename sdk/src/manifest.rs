//! The manifest: what a module is and what it wants, readable without running it.
//!
//! It lives in the wasm custom section [`crate::abi::MANIFEST_SECTION`] as one
//! JSON object, built at compile time by [`crate::export!`]:
//!
//! ```json
//! {"abi":1,"name":"users","version":"1.2.0","events":["UserRegistered"],"categories":["user"]}
//! ```
//!
//! The const functions here build those bytes in a `static` (so nothing runs at
//! load time) and refuse, at compile time, names that would need JSON escaping.

use serde::{Deserialize, Serialize};

use crate::abi::ABI_VERSION;

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// ABI version the module was built against.
    pub abi: u32,
    /// Projection name (the view name).
    pub name: String,
    /// Semantic version, the crate's `CARGO_PKG_VERSION`.
    pub version: String,
    /// Event types the projection handles; empty = every type.
    #[serde(default)]
    pub events: Vec<String>,
    /// Stream categories it reads (the part of a stream id before the first `-`);
    /// empty = every category.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Every document depends only on the events of one stream (the SDK's
    /// `PerStream` form): the host may warm the view with several workers,
    /// each replaying the streams of its hash partition. Absent = `false`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub per_stream: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Manifest {
    /// Parses the manifest section's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// Does an event of `event_type` on `stream` reach the projection?
    pub fn wants(&self, stream: &str, event_type: &str) -> bool {
        let category = stream.split('-').next().unwrap_or(stream);
        (self.events.is_empty() || self.events.iter().any(|e| e == event_type))
            && (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
    }

    /// The manifest's bytes with the version left out, the part of a module's
    /// fingerprint that comes from its manifest. Every other field counts,
    /// this one and any added later: each decides which events reach the
    /// guest or how the host schedules them (`per_stream` lets a warm-up run
    /// in partitions, which builds a wrong view if the promise is false), so
    /// a module that changes one is never taken for the same logic.
    pub fn without_version(&self) -> Vec<u8> {
        let mut m = serde_json::to_value(self).unwrap_or_default();
        if let Some(fields) = m.as_object_mut() {
            fields.remove("version");
        }
        serde_json::to_vec(&m).unwrap_or_default()
    }
}

/// The manifest of projection `P` built by crate version `version`, as the
/// module would carry it (for native tools and tests).
pub fn of<P: crate::Projection>(version: &str) -> Manifest {
    Manifest {
        abi: ABI_VERSION,
        name: P::NAME.to_string(),
        version: version.to_string(),
        events: P::EVENTS.iter().map(|s| s.to_string()).collect(),
        categories: P::CATEGORIES.iter().map(|s| s.to_string()).collect(),
        per_stream: P::PER_STREAM,
    }
}

const PARTS: [&str; 7] = [
    "{\"abi\":",
    ",\"name\":\"",
    "\",\"version\":\"",
    "\",\"events\":[",
    "],\"categories\":[",
    "]",
    "}",
];

/// Written before the closing brace when the projection is per stream.
const PER_STREAM: &str = ",\"per_stream\":true";

/// Length in bytes of the encoded manifest (compile time).
pub const fn encoded_len(
    name: &str,
    version: &str,
    events: &[&str],
    categories: &[&str],
    per_stream: bool,
) -> usize {
    let mut n = if per_stream { PER_STREAM.len() } else { 0 };
    let mut i = 0;
    while i < PARTS.len() {
        n += PARTS[i].len();
        i += 1;
    }
    n + digits(ABI_VERSION) + name.len() + version.len() + list_len(events) + list_len(categories)
}

/// The manifest's bytes (compile time). `N` must be [`encoded_len`] of the same
/// arguments. Panics (a compile error in a `static`) on a name that is empty or
/// holds a character outside printable ASCII, or `"` or `\`.
pub const fn encode<const N: usize>(
    name: &str,
    version: &str,
    events: &[&str],
    categories: &[&str],
    per_stream: bool,
) -> [u8; N] {
    check(name);
    check(version);
    let mut out = [0u8; N];
    let mut at = copy(&mut out, 0, PARTS[0].as_bytes());
    at = write_u32(&mut out, at, ABI_VERSION);
    at = copy(&mut out, at, PARTS[1].as_bytes());
    at = copy(&mut out, at, name.as_bytes());
    at = copy(&mut out, at, PARTS[2].as_bytes());
    at = copy(&mut out, at, version.as_bytes());
    at = copy(&mut out, at, PARTS[3].as_bytes());
    at = write_list(&mut out, at, events);
    at = copy(&mut out, at, PARTS[4].as_bytes());
    at = write_list(&mut out, at, categories);
    at = copy(&mut out, at, PARTS[5].as_bytes());
    if per_stream {
        at = copy(&mut out, at, PER_STREAM.as_bytes());
    }
    at = copy(&mut out, at, PARTS[6].as_bytes());
    assert!(at == N, "manifest length mismatch");
    out
}

const fn check(s: &str) {
    let b = s.as_bytes();
    assert!(
        !b.is_empty(),
        "kiln manifest: empty name, version, event type or category"
    );
    let mut i = 0;
    while i < b.len() {
        assert!(
            b[i] > b' ' && b[i] < 0x7f && b[i] != b'"' && b[i] != b'\\',
            "kiln manifest: names must be printable ASCII without spaces, '\"' or '\\'"
        );
        i += 1;
    }
}

const fn digits(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

const fn list_len(items: &[&str]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < items.len() {
        n += items[i].len() + 2 + if i > 0 { 1 } else { 0 };
        i += 1;
    }
    n
}

const fn copy<const N: usize>(out: &mut [u8; N], mut at: usize, src: &[u8]) -> usize {
    let mut i = 0;
    while i < src.len() {
        out[at] = src[i];
        at += 1;
        i += 1;
    }
    at
}

const fn write_u32<const N: usize>(out: &mut [u8; N], at: usize, v: u32) -> usize {
    let n = digits(v);
    let mut i = 0;
    let mut rest = v;
    while i < n {
        out[at + n - 1 - i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        i += 1;
    }
    at + n
}

const fn write_list<const N: usize>(out: &mut [u8; N], mut at: usize, items: &[&str]) -> usize {
    let mut i = 0;
    while i < items.len() {
        check(items[i]);
        if i > 0 {
            out[at] = b',';
            at += 1;
        }
        out[at] = b'"';
        at = copy(out, at + 1, items[i].as_bytes());
        out[at] = b'"';
        at += 1;
        i += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "orders";
    const EVENTS: &[&str] = &["OrderPlaced", "OrderShipped"];
    const LEN: usize = encoded_len(NAME, "1.2.0-rc.1", EVENTS, &[], false);
    static BYTES: [u8; LEN] = encode::<LEN>(NAME, "1.2.0-rc.1", EVENTS, &[], false);
    const PS_LEN: usize = encoded_len("users", "1.0.0", &[], &["user"], true);
    static PS_BYTES: [u8; PS_LEN] = encode::<PS_LEN>("users", "1.0.0", &[], &["user"], true);

    #[test]
    fn compile_time_manifest_is_the_json_the_host_parses() {
        let m = Manifest::parse(&BYTES).unwrap();
        assert_eq!(m.abi, ABI_VERSION);
        assert_eq!(m.name, "orders");
        assert_eq!(m.version, "1.2.0-rc.1");
        assert_eq!(m.events, ["OrderPlaced", "OrderShipped"]);
        assert!(m.categories.is_empty());
        assert!(!m.per_stream);
        // Absent when false: the bytes of modules built before the field.
        assert!(!String::from_utf8_lossy(&BYTES).contains("per_stream"));
    }

    #[test]
    fn a_per_stream_manifest_says_so_and_fingerprints_apart() {
        let m = Manifest::parse(&PS_BYTES).unwrap();
        assert!(m.per_stream);
        assert_eq!(m.categories, ["user"]);
        assert_eq!(serde_json::to_vec(&m).unwrap(), PS_BYTES);
        let mut general = m.clone();
        general.per_stream = false;
        assert_ne!(m.without_version(), general.without_version());
    }

    #[test]
    fn without_version_keeps_every_field_but_the_version() {
        // Every field the manifest serializes (a field added later too),
        // changed alone, changes the fingerprint's manifest part; only the
        // version does not.
        let m = Manifest::parse(&PS_BYTES).unwrap();
        let fields = serde_json::to_value(&m).unwrap();
        let fields = fields.as_object().unwrap();
        assert!(fields.len() >= 6, "{fields:?}");
        for (name, value) in fields {
            let changed = match value {
                serde_json::Value::Number(n) => serde_json::json!(n.as_u64().unwrap() + 1),
                serde_json::Value::String(s) => serde_json::json!(format!("{s}x")),
                serde_json::Value::Array(a) if a.is_empty() => serde_json::json!(["x"]),
                serde_json::Value::Array(_) => serde_json::json!([]),
                serde_json::Value::Bool(b) => serde_json::json!(!b),
                other => panic!("a manifest field of an unexpected kind: {name} = {other}"),
            };
            let mut other = fields.clone();
            other.insert(name.clone(), changed);
            let other: Manifest = serde_json::from_value(other.into()).unwrap();
            assert_eq!(
                m.without_version() == other.without_version(),
                name == "version",
                "changing {name}"
            );
        }
    }

    #[test]
    fn filter_by_type_and_category() {
        let mut m = Manifest::parse(&BYTES).unwrap();
        assert!(m.wants("order-1", "OrderPlaced"));
        assert!(!m.wants("order-1", "OrderCancelled"));
        m.categories = vec!["order".into()];
        assert!(m.wants("order-1", "OrderShipped"));
        assert!(!m.wants("customer-1", "OrderShipped"));
    }

    #[test]
    fn without_version_ignores_only_the_version() {
        let a = Manifest::parse(&BYTES).unwrap();
        let mut b = a.clone();
        b.version = "9.9.9".into();
        assert_eq!(a.without_version(), b.without_version());
        b.name = "other".into();
        assert_ne!(a.without_version(), b.without_version());
    }
}
