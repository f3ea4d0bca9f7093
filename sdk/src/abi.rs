//! The wire formats of kiln's guest ABI, version [`ABI_VERSION`] (see `sdk/ABI.md`).
//!
//! The host encodes a batch of events with [`BatchWriter`]; the guest decodes it
//! with [`BatchReader`]. Scan results use [`encode_entries`] / [`EntryReader`].
//! Both sides link this one module, so the encoding has a single definition.
//! All integers are little-endian; strings are UTF-8 with a `u32` length prefix.

/// The ABI version this SDK speaks. A host refuses modules declaring another one.
pub const ABI_VERSION: u32 = 1;
/// The wasm module name every host function is imported from.
pub const HOST_MODULE: &str = "kiln";
/// The custom section holding the manifest (JSON, see [`crate::manifest`]).
pub const MANIFEST_SECTION: &str = "kiln-manifest";
/// Export: `kiln_alloc(len: i32) -> i32`, a guest buffer of at least `len` bytes.
pub const EXPORT_ALLOC: &str = "kiln_alloc";
/// Export: `kiln_apply(ptr: i32, len: i32) -> i32`, applies an encoded batch.
pub const EXPORT_APPLY: &str = "kiln_apply";
/// `kiln_apply` result: every event was handled.
pub const APPLY_OK: i32 = 0;
/// `kiln_apply` result: a handler failed and reported why through `kiln.fail`.
pub const APPLY_FAILED: i32 = 1;
/// Returned by `kiln.get` when the key holds no document.
pub const ABSENT: i64 = -1;

/// Why an encoded buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// One event as it crosses the ABI, borrowing the batch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub position: u64,
    pub version: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub stream: &'a str,
    pub event_type: &'a str,
    /// The event's JSON document.
    pub data: &'a [u8],
    /// Encoded metadata pairs; read them with [`Metadata`].
    pub metadata: Metadata<'a>,
}

/// An event's metadata (string pairs), decoded lazily from the batch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> Metadata<'a> {
    /// No metadata.
    pub const EMPTY: Metadata<'static> = Metadata {
        count: 0,
        bytes: &[],
    };

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Every pair, in the order they were encoded.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut r = Reader::new(self.bytes);
        (0..self.count).map_while(move |_| Some((r.str().ok()?, r.str().ok()?)))
    }
}

/// Encodes a batch of events (host side, and the SDK's native harness).
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
}

impl Default for BatchWriter {
    fn default() -> Self {
        BatchWriter::new()
    }
}

impl BatchWriter {
    pub fn new() -> Self {
        BatchWriter {
            buf: vec![0; 4],
            count: 0,
        }
    }

    /// Empties the writer, keeping its allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        self.count = 0;
    }

    /// Appends one event; `metadata` pairs are copied in order.
    #[allow(clippy::too_many_arguments)]
    pub fn push<'m>(
        &mut self,
        position: u64,
        version: u64,
        timestamp: u64,
        stream: &str,
        event_type: &str,
        data: &[u8],
        metadata: impl ExactSizeIterator<Item = (&'m str, &'m str)>,
    ) {
        let b = &mut self.buf;
        b.extend_from_slice(&position.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&timestamp.to_le_bytes());
        put_bytes(b, stream.as_bytes());
        put_bytes(b, event_type.as_bytes());
        put_bytes(b, data);
        put_u32(b, metadata.len() as u32);
        for (k, v) in metadata {
            put_bytes(b, k.as_bytes());
            put_bytes(b, v.as_bytes());
        }
        self.count += 1;
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Events pushed since the last clear.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encoded batch.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Decodes a batch encoded by [`BatchWriter`].
pub struct BatchReader<'a> {
    r: Reader<'a>,
    remaining: u32,
}

impl<'a> BatchReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let remaining = r.u32()?;
        Ok(BatchReader { r, remaining })
    }

    /// Events not yet read.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// The next event, `None` at the end; an error if the buffer is malformed.
    pub fn next_event(&mut self) -> Result<Option<RawEvent<'a>>, DecodeError> {
        if self.remaining == 0 {
            return if self.r.is_empty() {
                Ok(None)
            } else {
                Err(DecodeError("trailing bytes after the last event".into()))
            };
        }
        self.remaining -= 1;
        let r = &mut self.r;
        let position = r.u64()?;
        let version = r.u64()?;
        let timestamp = r.u64()?;
        let stream = r.str()?;
        let event_type = r.str()?;
        let data = r.bytes()?;
        let count = r.u32()?;
        let start = r.pos;
        for _ in 0..count {
            r.str()?;
            r.str()?;
        }
        let metadata = Metadata {
            count,
            bytes: &r.buf[start..r.pos],
        };
        Ok(Some(RawEvent {
            position,
            version,
            timestamp,
            stream,
            event_type,
            data,
            metadata,
        }))
    }
}

/// Encodes key/value entries (the result of a prefix scan).
pub fn encode_entries<'e>(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = (&'e [u8], &'e [u8])>,
) {
    put_u32(out, entries.len() as u32);
    for (k, v) in entries {
        put_bytes(out, k);
        put_bytes(out, v);
    }
}

/// Decodes entries encoded by [`encode_entries`].
pub struct EntryReader<'a> {
    r: Reader<'a>,
    remaining: u32,
}

impl<'a> EntryReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let remaining = r.u32()?;
        Ok(EntryReader { r, remaining })
    }

    pub fn next_entry(&mut self) -> Result<Option<(&'a str, &'a [u8])>, DecodeError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        Ok(Some((self.r.str()?, self.r.bytes()?)))
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "truncated: {n} bytes wanted at offset {} of {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        std::str::from_utf8(self.bytes()?)
            .map_err(|e| DecodeError(format!("string at offset {at} is not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batches_round_trip(events in proptest::collection::vec(
            (any::<u64>(), any::<u64>(), any::<u64>(), ".{0,12}", ".{0,12}", proptest::collection::vec(any::<u8>(), 0..40),
             proptest::collection::vec((".{0,5}", ".{0,5}"), 0..3)), 0..20)) {
            let mut w = BatchWriter::new();
            for (p, v, t, s, ty, d, m) in &events {
                w.push(*p, *v, *t, s, ty, d, m.iter().map(|(a, b)| (a.as_str(), b.as_str())));
            }
            let mut r = BatchReader::new(w.bytes()).unwrap();
            for (p, v, t, s, ty, d, m) in &events {
                let e = r.next_event().unwrap().unwrap();
                prop_assert_eq!((e.position, e.version, e.timestamp), (*p, *v, *t));
                prop_assert_eq!((e.stream, e.event_type, e.data), (s.as_str(), ty.as_str(), d.as_slice()));
                let got: Vec<_> = e.metadata.iter().collect();
                let want: Vec<_> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                prop_assert_eq!(got, want);
            }
            prop_assert!(r.next_event().unwrap().is_none());
        }

        #[test]
        fn truncated_batches_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(mut r) = BatchReader::new(&bytes) {
                for _ in 0..8 {
                    match r.next_event() {
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            }
        }
    }

    #[test]
    fn entries_round_trip() {
        let mut out = Vec::new();
        let entries: [(&[u8], &[u8]); 2] = [(b"a/1", b"{}"), (b"a/2", b"[1]")];
        encode_entries(&mut out, entries.into_iter());
        let mut r = EntryReader::new(&out).unwrap();
        assert_eq!(r.next_entry().unwrap(), Some(("a/1", &b"{}"[..])));
        assert_eq!(r.next_entry().unwrap(), Some(("a/2", &b"[1]"[..])));
        assert_eq!(r.next_entry().unwrap(), None);
    }
}
