//! What a cutover would change: the documents of two views compared at one
//! log position.
//!
//! [`ViewStore::compare`] takes **one** RocksDB snapshot of the views
//! database (every column family and the checkpoints in the default one are
//! in it), reads both views' checkpoints from that snapshot, and, when they
//! are equal, walks the two column families in key order at once: one pass,
//! a merge of two sorted iterators. Memory is bounded by the number of
//! examples kept (`examples` per kind), never by the size of the views.
//!
//! Documents whose bytes are equal are equal. Documents whose bytes differ
//! are parsed as JSON and compared as values (so a different field order or
//! spacing is no change); a changed document is described by the JSON
//! pointers (RFC 6901) of the fields that differ, each with its old (A) and
//! new (B) value.

use std::cmp::Ordering;

use std::sync::Arc;

use rocksdb::ReadOptions;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::digest::{Digester, ViewDigest, position_in};
use super::{Db, ViewError, ViewId, ViewStore, checkpoint_key, decode_checkpoint, storage};
use crate::store::Position;

/// Most field changes listed for one changed document (the rest are counted).
pub const MAX_FIELDS: usize = 20;

/// What to compare and how much to show.
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// Only keys starting with this (empty: every key).
    pub prefix: Vec<u8>,
    /// Examples kept of each kind (only in A, only in B, changed).
    pub examples: usize,
}

/// A document present in one view only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyDoc {
    pub key: String,
    pub doc: Value,
}

/// One field that differs: its JSON pointer, its value in A (`old`, absent
/// when A lacks it) and in B (`new`, absent when B lacks it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

/// A document present in both views whose JSON differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangedDoc {
    pub key: String,
    /// The fields that differ, in document order (at most [`MAX_FIELDS`]).
    pub fields: Vec<FieldChange>,
    /// Fields that differ beyond those listed.
    #[serde(default)]
    pub more_fields: usize,
}

/// The first few differences of each kind, in key order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffExamples {
    pub only_in_a: Vec<KeyDoc>,
    pub only_in_b: Vec<KeyDoc>,
    pub changed: Vec<ChangedDoc>,
}

/// Two views compared at one log position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffReport {
    /// The log position both views had applied up to in the snapshot.
    pub position: Position,
    /// Distinct keys looked at (in A, in B or in both).
    pub compared: u64,
    pub only_in_a: u64,
    pub only_in_b: u64,
    pub changed: u64,
    pub same: u64,
    pub examples: DiffExamples,
}

impl DiffReport {
    /// No document only in one view, none changed.
    pub fn identical(&self) -> bool {
        self.only_in_a == 0 && self.only_in_b == 0 && self.changed == 0
    }

    /// The same report with at most `n` examples of each kind and
    /// [`MAX_FIELDS`]`.min(fields)` fields per changed document (for a
    /// summary kept in the registry).
    pub fn trimmed(&self, n: usize, fields: usize) -> DiffReport {
        let mut r = self.clone();
        r.examples.only_in_a.truncate(n);
        r.examples.only_in_b.truncate(n);
        r.examples.changed.truncate(n);
        for c in &mut r.examples.changed {
            if c.fields.len() > fields {
                c.more_fields += c.fields.len() - fields;
                c.fields.truncate(fields);
            }
        }
        r
    }
}

/// What [`ViewStore::compare`] found.
#[derive(Debug)]
pub enum Compared {
    /// Both views were at `report.position` in the snapshot.
    Report(DiffReport),
    /// The snapshot caught them at different positions: nothing compared.
    Apart { a: Position, b: Position },
}

impl ViewStore {
    /// Compares views `a` and `b` in one snapshot. `taken(a_at, b_at)` is
    /// called as soon as the snapshot exists, with both checkpoints as it
    /// holds them (the caller may let workers go on from there); unless they
    /// are equal nothing is compared ([`Compared::Apart`]).
    pub fn compare(
        &self,
        a: &ViewId,
        b: &ViewId,
        opts: &DiffOptions,
        taken: impl FnOnce(Position, Position),
    ) -> Result<Compared, ViewError> {
        let cf_a = self.cf(a)?;
        let cf_b = self.cf(b)?;
        let snapshot = self.db.snapshot();
        let at = |v: &ViewId| -> Result<Position, ViewError> {
            let got = snapshot
                .get_pinned(checkpoint_key(v))
                .map_err(storage(format!("reading the checkpoint of {v}")))?;
            decode_checkpoint(v, got.as_deref())
        };
        let (at_a, at_b) = (at(a), at(b));
        let (at_a, at_b) = match (at_a, at_b) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => {
                taken(0, 0);
                return Err(e);
            }
        };
        taken(at_a, at_b);
        if at_a != at_b {
            return Ok(Compared::Apart { a: at_a, b: at_b });
        }
        let ia = snapshot.raw_iterator_cf_opt(&cf_a, whole_view_scan());
        let ib = snapshot.raw_iterator_cf_opt(&cf_b, whole_view_scan());
        merge((a, ia), (b, ib), opts, at_a).map(Compared::Report)
    }

    /// The view `view` as it stands now, pinned in one RocksDB snapshot of
    /// the views database (see [`PinnedView`]). Refused while the view warms
    /// in partitions.
    pub fn pin(&self, view: &ViewId) -> Result<PinnedView, ViewError> {
        self.cf(view)?;
        let snapshot = self.db.snapshot();
        let position = position_in(&snapshot, view)?;
        // SAFETY: the snapshot borrows the database it was taken of.
        // `Pinned` owns a handle on that same database (`db`: an `Arc`, whose
        // contents never move) and drops the snapshot before it (fields drop
        // in declaration order), so the borrow never outlives the database.
        let snapshot = unsafe {
            std::mem::transmute::<
                rocksdb::SnapshotWithThreadMode<'_, Db>,
                rocksdb::SnapshotWithThreadMode<'static, Db>,
            >(snapshot)
        };
        Ok(PinnedView(Arc::new(Pinned {
            snapshot,
            db: self.db.clone(),
            view: view.clone(),
            position,
        })))
    }
}

/// One view as one RocksDB snapshot of the views database holds it: its
/// documents exactly at `position`, its checkpoint then, readable for as
/// long as it is kept while the view's worker goes on. Cheap to clone.
/// (Taking one costs microseconds; keeping one only keeps RocksDB from
/// compacting away what the view overwrote since.)
#[derive(Clone)]
pub struct PinnedView(Arc<Pinned>);

struct Pinned {
    // Declared before `db`: dropped before the database it borrows.
    snapshot: rocksdb::SnapshotWithThreadMode<'static, Db>,
    db: Arc<Db>,
    view: ViewId,
    position: Position,
}

impl PinnedView {
    /// The physical view.
    pub fn view(&self) -> &ViewId {
        &self.0.view
    }

    /// The log position its documents are at (its checkpoint in the snapshot).
    pub fn position(&self) -> Position {
        self.0.position
    }

    /// Calls `read` with an iterator over the view's documents as pinned.
    fn read<T>(
        &self,
        read: impl FnOnce(rocksdb::DBRawIteratorWithThreadMode<'_, Db>) -> Result<T, ViewError>,
    ) -> Result<T, ViewError> {
        let p = &self.0;
        // The column family stays referenced while the iterator reads it.
        let cf =
            p.db.cf_handle(&p.view.to_string())
                .ok_or_else(|| ViewError::NotFound(p.view.clone()))?;
        read(p.snapshot.raw_iterator_cf_opt(&cf, whole_view_scan()))
    }

    /// The digest of the documents as pinned (see [`super::digest`]).
    pub fn digest(&self) -> Result<ViewDigest, ViewError> {
        self.read(|mut it| {
            let mut d = Digester::new();
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                d.add(k, v);
                it.next();
            }
            it.status()
                .map_err(storage(format!("reading the documents of {}", self.view())))?;
            Ok(d.finish(self.position()))
        })
    }

    /// Compares the documents of two pinned views, which must stand at one
    /// position (else [`Compared::Apart`], nothing read).
    pub fn compare(&self, other: &PinnedView, opts: &DiffOptions) -> Result<Compared, ViewError> {
        let (at_a, at_b) = (self.position(), other.position());
        if at_a != at_b {
            return Ok(Compared::Apart { a: at_a, b: at_b });
        }
        self.read(|ia| {
            other.read(|ib| {
                merge((self.view(), ia), (other.view(), ib), opts, at_a).map(Compared::Report)
            })
        })
    }
}

/// One merge pass over two views' documents (each an iterator over one
/// column family, in key order), both at `position`.
fn merge(
    (a, mut ia): (&ViewId, rocksdb::DBRawIteratorWithThreadMode<'_, Db>),
    (b, mut ib): (&ViewId, rocksdb::DBRawIteratorWithThreadMode<'_, Db>),
    opts: &DiffOptions,
    position: Position,
) -> Result<DiffReport, ViewError> {
    ia.seek(&opts.prefix);
    ib.seek(&opts.prefix);
    let mut report = DiffReport {
        position,
        ..DiffReport::default()
    };
    let n = opts.examples;
    loop {
        let prefix = opts.prefix.as_slice();
        let ka = ia.key().filter(|k| k.starts_with(prefix));
        let kb = ib.key().filter(|k| k.starts_with(prefix));
        let order = match (ka, kb) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => x.cmp(y),
        };
        report.compared += 1;
        match order {
            Ordering::Less => {
                report.only_in_a += 1;
                if report.examples.only_in_a.len() < n
                    && let (Some(k), Some(v)) = (ia.key(), ia.value())
                {
                    report.examples.only_in_a.push(key_doc(k, v));
                }
                ia.next();
            }
            Ordering::Greater => {
                report.only_in_b += 1;
                if report.examples.only_in_b.len() < n
                    && let (Some(k), Some(v)) = (ib.key(), ib.value())
                {
                    report.examples.only_in_b.push(key_doc(k, v));
                }
                ib.next();
            }
            Ordering::Equal => {
                let (va, vb) = (ia.value().unwrap_or(&[]), ib.value().unwrap_or(&[]));
                if va == vb {
                    report.same += 1;
                } else {
                    let (old, new) = (parse(va), parse(vb));
                    if old == new {
                        report.same += 1;
                    } else {
                        report.changed += 1;
                        if report.examples.changed.len() < n {
                            let mut fields = Vec::new();
                            let mut more = 0;
                            json_diff(&old, &new, &mut String::new(), &mut fields, &mut more);
                            report.examples.changed.push(ChangedDoc {
                                key: text(ia.key().unwrap_or(&[])),
                                fields,
                                more_fields: more,
                            });
                        }
                    }
                }
                ia.next();
                ib.next();
            }
        }
    }
    ia.status()
        .map_err(storage(format!("reading {a} for a comparison")))?;
    ib.status()
        .map_err(storage(format!("reading {b} for a comparison")))?;
    Ok(report)
}

impl ViewStore {
    /// Reads every document of `view` (keys starting with `prefix`) in one
    /// snapshot and returns how many: the plain scan a comparison's speed is
    /// measured against (`kiln bench diff`).
    pub fn scan_count(&self, view: &ViewId, prefix: &[u8]) -> Result<(u64, u64), ViewError> {
        let cf = self.cf(view)?;
        let snapshot = self.db.snapshot();
        let mut it = snapshot.raw_iterator_cf_opt(&cf, whole_view_scan());
        it.seek(prefix);
        let (mut docs, mut bytes) = (0u64, 0u64);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            docs += 1;
            bytes += (k.len() + v.len()) as u64;
            it.next();
        }
        it.status().map_err(storage(format!("scanning {view}")))?;
        Ok((docs, bytes))
    }

    /// Flushes `view`'s memtable to files (benchmarks: a view as a long-running
    /// daemon has it on disk).
    pub fn flush(&self, view: &ViewId) -> Result<(), ViewError> {
        let cf = self.cf(view)?;
        self.db
            .flush_cf(&cf)
            .map_err(storage(format!("flushing {view}")))
    }
}

/// Read options of a scan of a whole view: it must not evict what queries
/// keep hot in the block cache.
pub(super) fn whole_view_scan() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.fill_cache(false);
    o.set_readahead_size(2 << 20);
    o
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A stored document as JSON (a document that is not JSON, which kiln never
/// writes, is shown as a string).
fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(text(bytes)))
}

fn key_doc(k: &[u8], v: &[u8]) -> KeyDoc {
    KeyDoc {
        key: text(k),
        doc: parse(v),
    }
}

/// One JSON pointer token (`~` → `~0`, `/` → `~1`).
fn push_token(path: &mut String, token: &str) {
    path.push('/');
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

/// The fields where `old` and `new` differ, as JSON pointers under `path`:
/// objects key by key, arrays index by index, anything else whole. At most
/// [`MAX_FIELDS`] are listed; the rest are counted in `more`.
pub fn json_diff(
    old: &Value,
    new: &Value,
    path: &mut String,
    out: &mut Vec<FieldChange>,
    more: &mut usize,
) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let len = path.len();
            for (k, va) in a {
                push_token(path, k);
                match b.get(k) {
                    Some(vb) if va == vb => {}
                    Some(vb) => json_diff(va, vb, path, out, more),
                    None => field(path, Some(va), None, out, more),
                }
                path.truncate(len);
            }
            for (k, vb) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                push_token(path, k);
                field(path, None, Some(vb), out, more);
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let len = path.len();
            for i in 0..a.len().max(b.len()) {
                path.push('/');
                path.push_str(&i.to_string());
                match (a.get(i), b.get(i)) {
                    (Some(va), Some(vb)) if va == vb => {}
                    (Some(va), Some(vb)) => json_diff(va, vb, path, out, more),
                    (va, vb) => field(path, va, vb, out, more),
                }
                path.truncate(len);
            }
        }
        (a, b) if a != b => field(path, Some(a), Some(b), out, more),
        _ => {}
    }
}

fn field(
    path: &str,
    old: Option<&Value>,
    new: Option<&Value>,
    out: &mut Vec<FieldChange>,
    more: &mut usize,
) {
    if out.len() < MAX_FIELDS {
        out.push(FieldChange {
            path: path.to_string(),
            old: old.cloned(),
            new: new.cloned(),
        });
    } else {
        *more += 1;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::views::Writes;

    fn diff(a: Value, b: Value) -> Vec<(String, Option<Value>, Option<Value>)> {
        let (mut out, mut more) = (Vec::new(), 0);
        json_diff(&a, &b, &mut String::new(), &mut out, &mut more);
        out.into_iter().map(|f| (f.path, f.old, f.new)).collect()
    }

    #[test]
    fn field_paths_name_what_changed_with_old_and_new_values() {
        assert_eq!(
            diff(
                json!({"name": "Ada", "logins": 3, "tags": ["a", "b"], "a/b": {"x~": 1}}),
                json!({"name": "Ada", "logins": 4, "tags": ["a"], "a/b": {"x~": 2}, "new": true}),
            ),
            vec![
                ("/a~1b/x~0".into(), Some(json!(1)), Some(json!(2))),
                ("/logins".into(), Some(json!(3)), Some(json!(4))),
                ("/tags/1".into(), Some(json!("b")), None),
                ("/new".into(), None, Some(json!(true))),
            ]
        );
        assert_eq!(
            diff(json!(1), json!("1")),
            vec![("".into(), Some(json!(1)), Some(json!("1")))]
        );
        assert!(diff(json!({"a": [1, {"b": 2}]}), json!({"a": [1, {"b": 2}]})).is_empty());
    }

    #[test]
    fn a_merge_of_two_views_counts_and_shows_each_kind_of_difference() {
        let dir = tempfile::tempdir().unwrap();
        let views = ViewStore::open(dir.path()).unwrap();
        let (a, b): (ViewId, ViewId) = ("u-1_0_0".parse().unwrap(), "u-1_1_0".parse().unwrap());
        views.create(&a).unwrap();
        views.create(&b).unwrap();
        let docs = |pairs: &[(&str, &str)]| -> Writes {
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
                .collect()
        };
        views
            .commit(
                &a,
                &docs(&[
                    ("k1", r#"{"n":1}"#),
                    ("k2", r#"{"n":2,"m":1}"#),
                    ("k3", r#"{"n":3}"#),
                    ("x1", r#"{"n":9}"#),
                ]),
                7,
            )
            .unwrap();
        views
            .commit(
                &b,
                &docs(&[
                    ("k0", r#"{"n":0}"#),
                    ("k2", r#"{"m":1, "n":2}"#),
                    ("k3", r#"{"n":4}"#),
                    ("x1", r#"{"n":10}"#),
                ]),
                5,
            )
            .unwrap();
        let opts = DiffOptions {
            prefix: b"k".to_vec(),
            examples: 10,
        };
        let mut seen = None;
        let got = views
            .compare(&a, &b, &opts, |x, y| seen = Some((x, y)))
            .unwrap();
        assert!(matches!(got, Compared::Apart { a: 7, b: 5 }), "{got:?}");
        assert_eq!(seen, Some((7, 5)));
        views.commit(&b, &Writes::new(), 7).unwrap();
        let Compared::Report(r) = views.compare(&a, &b, &opts, |_, _| {}).unwrap() else {
            panic!("apart")
        };
        assert_eq!(
            (
                r.position,
                r.compared,
                r.only_in_a,
                r.only_in_b,
                r.changed,
                r.same
            ),
            (7, 4, 1, 1, 1, 1),
            "x1 is outside the prefix; k2 differs only in field order"
        );
        assert_eq!(r.examples.only_in_a[0].key, "k1");
        assert_eq!(r.examples.only_in_b[0].doc, json!({"n": 0}));
        assert_eq!(r.examples.changed[0].key, "k3");
        assert_eq!(r.examples.changed[0].fields[0].path, "/n");
        assert!(!r.identical());
        let few = DiffOptions {
            prefix: vec![],
            examples: 0,
        };
        let Compared::Report(all) = views.compare(&a, &b, &few, |_, _| {}).unwrap() else {
            panic!("apart")
        };
        assert_eq!((all.compared, all.changed), (5, 2));
        assert!(all.examples.changed.is_empty(), "memory bounded by N = 0");
        let Compared::Report(same) = views.compare(&a, &a, &few, |_, _| {}).unwrap() else {
            panic!("apart")
        };
        assert!(same.identical() && same.same == 4);
    }
}
