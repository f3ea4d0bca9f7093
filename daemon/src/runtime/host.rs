//! kiln's host module (`"kiln"`): the functions a projection imports to read and
//! write its view, and report failures. Writes go to the batch's overlay; reads
//! see the overlay first, then the view's committed documents.
//!
//! Anything malformed the guest hands over (out-of-bounds pointers, keys that
//! are not UTF-8, documents that are not JSON) records a [`Fault`] and traps.

use std::ops::{Bound, ControlFlow, Range};
use std::time::Instant;

use kiln_sdk::abi::{ABSENT, HOST_MODULE};
use wasmtime::{Caller, Engine, Linker, Memory, ResourceLimiter};

use super::Limits;
use crate::views::owners::Touched;
use crate::views::{DocumentSource, ViewError, Writes};

/// Names of the host functions of ABI version 1.
pub(super) const HOST_FUNCTIONS: [&str; 6] = ["get", "put", "delete", "scan", "fail", "panic"];
/// Longest document key, in bytes.
pub use crate::views::MAX_KEY_LEN;
/// Largest document, in bytes.
pub const MAX_DOCUMENT_LEN: usize = 4 << 20;
/// Longest failure or panic message kept, in bytes.
const MAX_MESSAGE_LEN: usize = 4096;

/// Why the host stopped a guest call.
pub(super) enum Fault {
    /// The guest handed over something malformed.
    Malformed(String),
    /// Reading the view failed.
    View(ViewError),
    /// The guest went over one of the host's [`Limits`].
    Limit(LimitHit),
    /// Host work done for the guest (a scan) ran past the batch's deadline.
    Deadline,
}

/// Which limit, and how far the guest went.
#[derive(Clone, Copy, Debug)]
pub(super) struct LimitHit {
    pub(super) what: &'static str,
    pub(super) value: u64,
    pub(super) limit: u64,
    pub(super) key: &'static str,
}

impl LimitHit {
    /// `value` within `limit`, or the hit.
    fn check(
        what: &'static str,
        value: usize,
        limit: usize,
        key: &'static str,
    ) -> Result<(), LimitHit> {
        if value <= limit {
            return Ok(());
        }
        Err(LimitHit {
            what,
            value: value as u64,
            limit: limit as u64,
            key,
        })
    }
}

/// How many scanned entries between two looks at the clock.
const SCAN_CLOCK_EVERY: u32 = 256;

/// A store's data: the instance's memory, the view it reads, the batch's writes
/// and what the guest reported. One per batch: every batch runs in a fresh
/// instance, so nothing here outlives it.
pub(crate) struct HostState {
    pub(super) memory: Option<Memory>,
    pub(super) source: Box<dyn DocumentSource>,
    pub(super) writes: Writes,
    pub(super) failure: Option<(u32, String)>,
    pub(super) panic: Option<(u32, String)>,
    pub(super) fault: Option<Fault>,
    /// Set when a memory growth beyond the cap was refused: the size wanted.
    pub(super) memory_refused: Option<usize>,
    pub(super) memory_cap: usize,
    /// When the batch's deadline passes (host work checks it; guest code is
    /// interrupted by the epoch).
    pub(super) deadline: Instant,
    limits: Limits,
    /// Bytes of keys and documents in `writes`.
    write_bytes: usize,
    /// Bytes of every memory of the instance together.
    memory_total: usize,
    /// Elements of every table of the instance together.
    table_total: usize,
    read_buf: Vec<u8>,
    /// What the batch read, kept when its view warms split (the host checks
    /// the `per_stream` promise, see `views::owners`).
    pub(super) touched: Option<Touched>,
    /// What earlier calls of a grouped window wrote, not committed yet:
    /// read after the call's own writes, before the committed view (see
    /// [`super::instance::Projector::apply_unit`]). Scans do not see it: a
    /// scan in a window of more than one unit is never committed.
    pub(super) pending: Option<std::sync::Arc<Writes>>,
}

impl HostState {
    pub(super) fn new(
        source: Box<dyn DocumentSource>,
        memory_cap: usize,
        limits: Limits,
        deadline: Instant,
    ) -> Self {
        HostState {
            memory: None,
            source,
            writes: Writes::new(),
            failure: None,
            panic: None,
            fault: None,
            memory_refused: None,
            memory_cap,
            deadline,
            limits,
            write_bytes: 0,
            memory_total: 0,
            table_total: 0,
            read_buf: Vec::new(),
            touched: None,
            pending: None,
        }
    }

    fn malformed(&mut self, reason: String) -> wasmtime::Error {
        let e = wasmtime::Error::msg(reason.clone());
        self.fault = Some(Fault::Malformed(reason));
        e
    }

    fn view_error(&mut self, e: ViewError) -> wasmtime::Error {
        let out = wasmtime::Error::msg(e.to_string());
        self.fault = Some(Fault::View(e));
        out
    }

    fn stop(&mut self, fault: Fault) -> wasmtime::Error {
        let e = match &fault {
            Fault::Limit(hit) => wasmtime::Error::msg(format!(
                "{} reached {}, the limit is {}",
                hit.what, hit.value, hit.limit
            )),
            _ => wasmtime::Error::msg("stopped by the host"),
        };
        self.fault = Some(fault);
        e
    }

    /// Admits a write of `key` (a document of `doc_len` bytes, or a delete)
    /// into the batch's overlay, within the batch's write limits.
    fn admit_write(&mut self, key: &[u8], doc_len: Option<usize>) -> wasmtime::Result<()> {
        let size = |doc: Option<usize>| key.len() + doc.unwrap_or(0);
        let (old, new_key) = match self.writes.get(key) {
            Some(doc) => (size(doc.as_ref().map(Vec::len)), false),
            None => (0, true),
        };
        let bytes = self.write_bytes - old + size(doc_len);
        let entries = self.writes.len() + usize::from(new_key);
        LimitHit::check(
            "bytes of keys and documents written by the batch",
            bytes,
            self.limits.batch_write_bytes,
            "batch_write_mib",
        )
        .and_then(|()| {
            LimitHit::check(
                "keys written by the batch",
                entries,
                self.limits.batch_write_entries,
                "batch_write_entries",
            )
        })
        .map_err(|hit| self.stop(Fault::Limit(hit)))?;
        self.write_bytes = bytes;
        Ok(())
    }

    /// The overlay's document, else the committed one.
    fn lookup(&mut self, key: &[u8]) -> wasmtime::Result<Option<&[u8]>> {
        if let Some(t) = &mut self.touched
            && !t.reads.contains(key)
        {
            t.reads.insert(key.to_vec());
        }
        if self.writes.contains_key(key) {
            return Ok(self.writes.get(key).and_then(|v| v.as_deref()));
        }
        if self.pending.as_ref().is_some_and(|p| p.contains_key(key)) {
            let pending = self.pending.as_ref().and_then(|p| p.get(key));
            return Ok(pending.and_then(|v| v.as_deref()));
        }
        match self.source.get_into(key, &mut self.read_buf) {
            Ok(true) => Ok(Some(&self.read_buf)),
            Ok(false) => Ok(None),
            Err(e) => Err(self.view_error(e)),
        }
    }

    /// Streams the committed documents under `prefix`, with the overlay
    /// applied, into `out` in the entries encoding, as far as they fit; returns
    /// the whole encoding's length. Nothing is buffered in the host; the scan
    /// stops at [`Limits::scan_bytes`] or the batch's deadline.
    fn scan(&mut self, prefix: &[u8], out: &mut [u8]) -> wasmtime::Result<i64> {
        if let Some(t) = &mut self.touched {
            t.scans.insert(prefix.to_vec());
        }
        let mut enc = ScanEncoder {
            out,
            len: 4,
            count: 0,
            limit: self.limits.scan_bytes,
            deadline: self.deadline,
            stopped: None,
        };
        let from = (Bound::Included(prefix), Bound::Unbounded);
        let mut overlay = self
            .writes
            .range::<[u8], _>(from)
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        let scanned = self.source.scan_each(prefix, &mut |k, v| {
            // Overlay entries before this key, then this key's own, if any.
            while let Some((ok, ov)) = overlay.next_if(|(ok, _)| ok.as_slice() <= k) {
                let replaces = ok.as_slice() == k;
                if let Some(ov) = ov
                    && enc.push(ok, ov).is_break()
                {
                    return ControlFlow::Break(());
                }
                if replaces {
                    return ControlFlow::Continue(());
                }
            }
            enc.push(k, v)
        });
        if let Err(e) = scanned {
            return Err(self.view_error(e));
        }
        if enc.stopped.is_none() {
            for (k, v) in overlay {
                if let Some(v) = v
                    && enc.push(k, v).is_break()
                {
                    break;
                }
            }
        }
        if let Some(fault) = enc.stopped.take() {
            return Err(self.stop(fault));
        }
        if enc.len <= enc.out.len() {
            enc.out[..4].copy_from_slice(&enc.count.to_le_bytes());
        }
        Ok(enc.len as i64)
    }
}

/// Writes a scan's entries into the guest's buffer while they fit, counting
/// the whole length; stops the scan at the size limit or the deadline.
struct ScanEncoder<'a> {
    out: &'a mut [u8],
    /// Length of the encoding so far (the count's 4 bytes included).
    len: usize,
    count: u32,
    limit: usize,
    deadline: Instant,
    stopped: Option<Fault>,
}

impl ScanEncoder<'_> {
    fn push(&mut self, key: &[u8], doc: &[u8]) -> ControlFlow<()> {
        let at = self.len;
        self.len += 8 + key.len() + doc.len();
        self.count += 1;
        if let Err(hit) = LimitHit::check(
            "bytes of one scan's result",
            self.len,
            self.limit,
            "scan_mib",
        ) {
            self.stopped = Some(Fault::Limit(hit));
            return ControlFlow::Break(());
        }
        if self.count.is_multiple_of(SCAN_CLOCK_EVERY) && Instant::now() > self.deadline {
            self.stopped = Some(Fault::Deadline);
            return ControlFlow::Break(());
        }
        if self.len <= self.out.len() {
            let mut w = at;
            for part in [key, doc] {
                self.out[w..w + 4].copy_from_slice(&(part.len() as u32).to_le_bytes());
                self.out[w + 4..w + 4 + part.len()].copy_from_slice(part);
                w += 4 + part.len();
            }
        }
        ControlFlow::Continue(())
    }
}

/// The memory cap covers every memory of the instance together (kiln's engine
/// refuses multi-memory modules, so there is one); a growth past it traps
/// (rather than failing the guest's allocation silently) and is reported as
/// [`super::ProjectionError::MemoryCap`]. Tables are bounded alike, by
/// [`Limits::definitions`] elements in all.
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_total.saturating_sub(current) + desired;
        if total > self.memory_cap {
            self.memory_refused = Some(total);
            return Err(wasmtime::Error::msg(format!(
                "memory cap exceeded: wanted {total} bytes, the cap is {}",
                self.memory_cap
            )));
        }
        self.memory_total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_total.saturating_sub(current) + desired;
        LimitHit::check(
            "table elements",
            total,
            self.limits.definitions,
            "definitions",
        )
        .map_err(|hit| self.stop(Fault::Limit(hit)))?;
        self.table_total = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Most tables one instance may have.
const MAX_TABLES: usize = 16;

/// A guest region as a range of its memory, or a fault naming what was wrong.
fn region(mem_len: usize, ptr: i32, len: i32, what: &str) -> Result<Range<usize>, String> {
    let (start, n) = (ptr as u32 as usize, len as u32 as usize);
    match start.checked_add(n) {
        Some(end) if end <= mem_len => Ok(start..end),
        _ => Err(format!(
            "{what} at {start}..{} lies outside the guest's memory of {mem_len} bytes",
            start as u64 + n as u64
        )),
    }
}

fn memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<Memory> {
    match caller.data().memory {
        Some(m) => Ok(m),
        None => Err(caller
            .data_mut()
            .malformed("host function called before the instance was ready".into())),
    }
}

fn check_key(key: &[u8]) -> Result<(), String> {
    crate::views::check_key(key)
}

fn check_document(key: &[u8], doc: &[u8]) -> Result<(), String> {
    let key = String::from_utf8_lossy(key);
    if doc.len() > MAX_DOCUMENT_LEN {
        return Err(format!(
            "document {key:?} is {} bytes, the limit is {MAX_DOCUMENT_LEN}",
            doc.len()
        ));
    }
    crate::views::check_json(doc).map_err(|e| format!("document {key:?} is not JSON: {e}"))
}

/// Copies `value` into the guest's `out` region if it fits; returns its length.
fn deliver(mem: &mut [u8], out: Range<usize>, value: &[u8]) -> i64 {
    if value.len() <= out.len() {
        mem[out.start..out.start + value.len()].copy_from_slice(value);
    }
    value.len() as i64
}

/// A `fail`/`panic` message (the region checked whole, the text clipped).
fn message(mem: &[u8], ptr: i32, len: i32) -> Result<String, String> {
    let r = region(mem.len(), ptr, len, "message")?;
    let clipped = r.start..r.end.min(r.start + MAX_MESSAGE_LEN);
    Ok(String::from_utf8_lossy(&mem[clipped]).into_owned())
}

/// kiln's host functions, for every store of `engine`.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    l.func_wrap(
        HOST_MODULE,
        "get",
        |mut caller: Caller<'_, HostState>,
         kp: i32,
         kl: i32,
         op: i32,
         oc: i32|
         -> wasmtime::Result<i64> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            let regions = region(bytes.len(), kp, kl, "get key").and_then(|k| {
                let out = region(bytes.len(), op, oc, "get output buffer")?;
                check_key(&bytes[k.clone()])?;
                Ok((k, out))
            });
            let (k, out) = match regions {
                Ok(r) => r,
                Err(reason) => return Err(st.malformed(reason)),
            };
            match st.lookup(&bytes[k])? {
                None => Ok(ABSENT),
                Some(value) => Ok(deliver(bytes, out, value)),
            }
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "put",
        |mut caller: Caller<'_, HostState>,
         kp: i32,
         kl: i32,
         vp: i32,
         vl: i32|
         -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            let checked = region(bytes.len(), kp, kl, "put key").and_then(|k| {
                let v = region(bytes.len(), vp, vl, "put document")?;
                check_key(&bytes[k.clone()])?;
                check_document(&bytes[k.clone()], &bytes[v.clone()])?;
                Ok((k, v))
            });
            let (k, v) = match checked {
                Ok(r) => r,
                Err(reason) => return Err(st.malformed(reason)),
            };
            st.admit_write(&bytes[k.clone()], Some(v.len()))?;
            // Rewrites of a key within a batch reuse its buffer.
            match st.writes.get_mut(&bytes[k.clone()]) {
                Some(Some(doc)) => {
                    doc.clear();
                    doc.extend_from_slice(&bytes[v]);
                }
                Some(slot) => *slot = Some(bytes[v].to_vec()),
                None => {
                    st.writes.insert(bytes[k].to_vec(), Some(bytes[v].to_vec()));
                }
            }
            Ok(())
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "delete",
        |mut caller: Caller<'_, HostState>, kp: i32, kl: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            let checked = region(bytes.len(), kp, kl, "delete key").and_then(|k| {
                check_key(&bytes[k.clone()])?;
                Ok(k)
            });
            match checked {
                Ok(k) => {
                    st.admit_write(&bytes[k.clone()], None)?;
                    st.writes.insert(bytes[k].to_vec(), None);
                    Ok(())
                }
                Err(reason) => Err(st.malformed(reason)),
            }
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "scan",
        |mut caller: Caller<'_, HostState>,
         pp: i32,
         pl: i32,
         op: i32,
         oc: i32|
         -> wasmtime::Result<i64> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            let regions = region(bytes.len(), pp, pl, "scan prefix").and_then(|p| {
                let out = region(bytes.len(), op, oc, "scan output buffer")?;
                Ok((p, out))
            });
            let (p, out) = match regions {
                Ok(r) => r,
                Err(reason) => return Err(st.malformed(reason)),
            };
            if p.len() > MAX_KEY_LEN {
                // Matches no key; the empty result is the count alone.
                return Ok(deliver(bytes, out, &0u32.to_le_bytes()));
            }
            let prefix = bytes[p].to_vec();
            st.scan(&prefix, &mut bytes[out])
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "fail",
        |mut caller: Caller<'_, HostState>, index: i32, mp: i32, ml: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            match message(bytes, mp, ml) {
                Ok(m) => {
                    st.failure = Some((index as u32, m));
                    Ok(())
                }
                Err(reason) => Err(st.malformed(reason)),
            }
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "panic",
        |mut caller: Caller<'_, HostState>, index: i32, mp: i32, ml: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            match message(bytes, mp, ml) {
                Ok(m) => {
                    st.panic = Some((index as u32, m));
                    Ok(())
                }
                Err(reason) => Err(st.malformed(reason)),
            }
        },
    )?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::MemoryDocuments;
    use kiln_sdk::abi::encode_entries;

    fn state(committed: &[(&str, &str)], limits: Limits) -> HostState {
        let docs = MemoryDocuments(
            committed
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        );
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        HostState::new(Box::new(docs), 1 << 20, limits, deadline)
    }

    #[test]
    fn scan_streams_committed_documents_merged_with_the_batch_writes() {
        let mut st = state(
            &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("x", "9")],
            Limits::default(),
        );
        st.writes.insert(b"b".to_vec(), Some(b"20".to_vec()));
        st.writes.insert(b"c".to_vec(), None);
        st.writes.insert(b"a0".to_vec(), Some(b"10".to_vec()));
        st.writes.insert(b"e".to_vec(), Some(b"5".to_vec()));
        st.writes.insert(b"y".to_vec(), Some(b"0".to_vec()));
        let want: Vec<(&[u8], &[u8])> = vec![
            (b"a", b"1"),
            (b"a0", b"10"),
            (b"b", b"20"),
            (b"d", b"4"),
            (b"e", b"5"),
        ];
        let mut expected = Vec::new();
        encode_entries(&mut expected, want.into_iter());
        // "" would see x and y too; scan the a..e documents through prefixes.
        let mut all = Vec::new();
        encode_entries(
            &mut all,
            [
                (&b"a"[..], &b"1"[..]),
                (b"a0", b"10"),
                (b"b", b"20"),
                (b"d", b"4"),
                (b"e", b"5"),
                (b"x", b"9"),
                (b"y", b"0"),
            ]
            .into_iter(),
        );
        let mut out = vec![0xAA; 4096];
        let n = st.scan(b"", &mut out).unwrap();
        assert_eq!(&out[..n as usize], all.as_slice());
        let mut out = vec![0xAA; 4096];
        let n = st.scan(b"a", &mut out).unwrap();
        let mut a_only = Vec::new();
        encode_entries(
            &mut a_only,
            [(&b"a"[..], &b"1"[..]), (b"a0", b"10")].into_iter(),
        );
        assert_eq!(&out[..n as usize], a_only.as_slice());
        assert!(expected.len() < all.len());
        // Too small a buffer: the full length, and no count written.
        let mut small = vec![0xAA; 8];
        assert_eq!(st.scan(b"", &mut small).unwrap() as usize, all.len());
        assert_eq!(&small[..4], &[0xAA; 4]);
        // No match: the count alone.
        let mut out = vec![0xAA; 16];
        assert_eq!(st.scan(b"q", &mut out).unwrap(), 4);
        assert_eq!(&out[..4], &0u32.to_le_bytes());
    }

    #[test]
    fn scan_stops_at_its_size_limit_and_at_the_deadline() {
        let docs: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("k{i:04}"), "[1,2,3]".to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = docs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let limits = Limits {
            scan_bytes: 1000,
            ..Limits::default()
        };
        let mut st = state(&refs, limits);
        assert!(st.scan(b"k", &mut []).is_err());
        match st.fault.take() {
            Some(Fault::Limit(hit)) => {
                assert_eq!(hit.key, "scan_mib");
                assert_eq!(hit.limit, 1000);
                assert!(hit.value > 1000 && hit.value < 1100, "{}", hit.value);
            }
            _ => panic!("expected the scan limit"),
        }
        let mut st = state(&refs, Limits::default());
        st.deadline = Instant::now() - std::time::Duration::from_millis(1);
        assert!(st.scan(b"k", &mut []).is_err());
        assert!(matches!(st.fault.take(), Some(Fault::Deadline)));
    }

    #[test]
    fn batch_writes_are_counted_at_their_latest_size() {
        let limits = Limits {
            batch_write_bytes: 100,
            batch_write_entries: 3,
            ..Limits::default()
        };
        let mut st = state(&[], limits);
        let put = |st: &mut HostState, k: &str, len: usize| {
            st.admit_write(k.as_bytes(), Some(len))?;
            st.writes
                .insert(k.as_bytes().to_vec(), Some(vec![b'0'; len]));
            Ok::<_, wasmtime::Error>(())
        };
        put(&mut st, "a", 60).unwrap();
        // A rewrite replaces the key's bytes rather than adding to them.
        put(&mut st, "a", 90).unwrap();
        put(&mut st, "a", 10).unwrap();
        put(&mut st, "b", 80).unwrap();
        let hit = |st: &mut HostState| match st.fault.take() {
            Some(Fault::Limit(hit)) => (hit.key, hit.value, hit.limit),
            _ => panic!("expected a limit"),
        };
        assert!(put(&mut st, "c", 80).is_err());
        assert_eq!(hit(&mut st), ("batch_write_mib", 173, 100));
        put(&mut st, "c", 1).unwrap();
        assert!(put(&mut st, "d", 1).is_err());
        assert_eq!(hit(&mut st), ("batch_write_entries", 4, 3));
    }
}
