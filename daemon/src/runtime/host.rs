//! kiln's host module (`"kiln"`): the functions a projection imports to read and
//! write its view, and report failures. Writes go to the batch's overlay; reads
//! see the overlay first, then the view's committed documents.
//!
//! Anything malformed the guest hands over (out-of-bounds pointers, keys that
//! are not UTF-8, documents that are not JSON) records a [`Fault`] and traps.

use std::ops::Range;

use kiln_sdk::abi::{ABSENT, HOST_MODULE, encode_entries};
use wasmtime::{Caller, Engine, Linker, Memory, ResourceLimiter};

use crate::views::{DocumentSource, ViewError, Writes};

/// Names of the host functions of ABI version 1.
pub(super) const HOST_FUNCTIONS: [&str; 6] = ["get", "put", "delete", "scan", "fail", "panic"];
/// Longest document key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
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
}

/// A store's data: the instance's memory, the view it reads, the batch's writes
/// and what the guest reported.
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
    scratch: Vec<u8>,
    read_buf: Vec<u8>,
}

impl HostState {
    pub(super) fn new(source: Box<dyn DocumentSource>, memory_cap: usize) -> Self {
        HostState {
            memory: None,
            source,
            writes: Writes::new(),
            failure: None,
            panic: None,
            fault: None,
            memory_refused: None,
            memory_cap,
            scratch: Vec::new(),
            read_buf: Vec::new(),
        }
    }

    /// Clears what one batch left behind.
    pub(super) fn reset(&mut self) {
        self.writes.clear();
        self.failure = None;
        self.panic = None;
        self.fault = None;
        self.memory_refused = None;
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

    /// The overlay's document, else the committed one.
    fn lookup(&mut self, key: &[u8]) -> wasmtime::Result<Option<&[u8]>> {
        if self.writes.contains_key(key) {
            return Ok(self.writes.get(key).and_then(|v| v.as_deref()));
        }
        match self.source.get_into(key, &mut self.read_buf) {
            Ok(true) => Ok(Some(&self.read_buf)),
            Ok(false) => Ok(None),
            Err(e) => Err(self.view_error(e)),
        }
    }

    /// Committed documents under `prefix` with the overlay applied, encoded.
    fn scan_into_scratch(&mut self, prefix: &[u8]) -> wasmtime::Result<()> {
        let committed = match self.source.scan_prefix(prefix) {
            Ok(v) => v,
            Err(e) => return Err(self.view_error(e)),
        };
        let mut merged: std::collections::BTreeMap<&[u8], &[u8]> = committed
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k, v),
                None => merged.remove(k.as_slice()),
            };
        }
        self.scratch.clear();
        encode_entries(&mut self.scratch, merged.into_iter());
        Ok(())
    }
}

/// The memory cap: a growth past it traps (rather than failing the guest's
/// allocation silently) and is reported as [`super::ProjectionError::MemoryCap`].
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_refused = Some(desired);
            return Err(wasmtime::Error::msg(format!(
                "memory cap exceeded: wanted {desired} bytes, the cap is {}",
                self.memory_cap
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

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
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "document key of {} bytes (must be 1 to {MAX_KEY_LEN})",
            key.len()
        ));
    }
    if let Err(e) = std::str::from_utf8(key) {
        return Err(format!("document key is not UTF-8: {e}"));
    }
    Ok(())
}

fn check_document(key: &[u8], doc: &[u8]) -> Result<(), String> {
    let key = String::from_utf8_lossy(key);
    if doc.len() > MAX_DOCUMENT_LEN {
        return Err(format!(
            "document {key:?} is {} bytes, the limit is {MAX_DOCUMENT_LEN}",
            doc.len()
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(doc)
        .map(|_| ())
        .map_err(|e| format!("document {key:?} is not JSON: {e}"))
}

/// Copies `value` into the guest's `out` region if it fits; returns its length.
fn deliver(mem: &mut [u8], out: Range<usize>, value: &[u8]) -> i64 {
    if value.len() <= out.len() {
        mem[out.start..out.start + value.len()].copy_from_slice(value);
    }
    value.len() as i64
}

fn message(mem: &[u8], ptr: i32, len: i32) -> String {
    let clipped = len.clamp(0, MAX_MESSAGE_LEN as i32);
    match region(mem.len(), ptr, clipped, "message") {
        Ok(r) => String::from_utf8_lossy(&mem[r]).into_owned(),
        Err(reason) => format!("<unreadable message: {reason}>"),
    }
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
            match checked {
                Ok((k, v)) => {
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
                }
                Err(reason) => Err(st.malformed(reason)),
            }
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
            st.scan_into_scratch(&bytes[p])?;
            Ok(deliver(bytes, out, &st.scratch))
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "fail",
        |mut caller: Caller<'_, HostState>, index: i32, mp: i32, ml: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            st.failure = Some((index as u32, message(bytes, mp, ml)));
            Ok(())
        },
    )?;
    l.func_wrap(
        HOST_MODULE,
        "panic",
        |mut caller: Caller<'_, HostState>, index: i32, mp: i32, ml: i32| -> wasmtime::Result<()> {
            let mem = memory(&mut caller)?;
            let (bytes, st) = mem.data_and_store_mut(&mut caller);
            st.panic = Some((index as u32, message(bytes, mp, ml)));
            Ok(())
        },
    )?;
    Ok(l)
}
