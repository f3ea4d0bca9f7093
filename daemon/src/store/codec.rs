//! The embedded store's binary record format.
//!
//! An event is stored under its position (`u64` big-endian, so RocksDB's byte
//! order is position order). The value is:
//!
//! ```text
//! u8 format (=1) | 16 id | u64 version | u64 timestamp
//! | str stream | str type | u32 n, n × (str key, str value) | u32 n, n × str tag | bytes data
//! ```
//!
//! where `str`/`bytes` are a `u32` little-endian length and the bytes. The
//! position is not repeated in the value; decoding takes it from the key.

use bytes::Bytes;
use uuid::Uuid;

use super::{Position, RecordedEvent, StoreError, StreamId};

const FORMAT: u8 = 1;

/// Key of an event in the `events` column family.
pub fn position_key(position: Position) -> [u8; 8] {
    position.to_be_bytes()
}

/// Reads a position key back.
pub fn decode_position(key: &[u8]) -> Result<Position, StoreError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        what: "event key".into(),
        reason: format!("expected 8 bytes, got {}", key.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Encodes everything of `ev` but its position.
pub fn encode_event(ev: &RecordedEvent) -> Vec<u8> {
    let meta_len: usize = ev.metadata.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let tags_len: usize = ev.tags.iter().map(|t| 4 + t.len()).sum();
    let mut out = Vec::with_capacity(
        1 + 16
            + 16
            + 8
            + ev.stream.as_str().len()
            + ev.event_type.len()
            + 8
            + meta_len
            + tags_len
            + 4
            + ev.data.len(),
    );
    out.push(FORMAT);
    out.extend_from_slice(ev.id.as_bytes());
    out.extend_from_slice(&ev.version.to_le_bytes());
    out.extend_from_slice(&ev.timestamp.to_le_bytes());
    put_bytes(&mut out, ev.stream.as_str().as_bytes());
    put_bytes(&mut out, ev.event_type.as_bytes());
    out.extend_from_slice(&(ev.metadata.len() as u32).to_le_bytes());
    for (k, v) in &ev.metadata {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out.extend_from_slice(&(ev.tags.len() as u32).to_le_bytes());
    for t in &ev.tags {
        put_bytes(&mut out, t.as_bytes());
    }
    put_bytes(&mut out, &ev.data);
    out
}

/// Decodes an event stored at `position`.
pub fn decode_event(position: Position, value: &[u8]) -> Result<RecordedEvent, StoreError> {
    let mut r = Reader {
        buf: value,
        position,
    };
    let format = r.take(1)?[0];
    if format != FORMAT {
        return Err(r.corrupt(format!("unknown record format {format}")));
    }
    let id = Uuid::from_slice(r.take(16)?).map_err(|e| r.corrupt(e.to_string()))?;
    let version = r.u64()?;
    let timestamp = r.u64()?;
    let stream = StreamId::recorded(r.string()?).map_err(|e| r.corrupt(e.to_string()))?;
    let event_type = r.string()?;
    let n = r.u32()? as usize;
    let mut metadata = std::collections::BTreeMap::new();
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        metadata.insert(k, v);
    }
    let n = r.u32()? as usize;
    let mut tags = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        tags.push(r.string()?);
    }
    let data = Bytes::copy_from_slice(r.bytes()?);
    if !r.buf.is_empty() {
        return Err(r.corrupt(format!("{} trailing bytes", r.buf.len())));
    }
    Ok(RecordedEvent {
        id,
        stream,
        event_type,
        version,
        position,
        timestamp,
        metadata,
        tags,
        data,
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    position: Position,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            what: format!("event at position {}", self.position),
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(self.corrupt(format!(
                "truncated: wanted {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|e| self.corrupt(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = RecordedEvent> {
        (
            any::<u128>(),
            "[a-z][a-z0-9_:-]{0,30}",
            "[a-zA-Z.]{1,20}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,20}", 0..4),
            proptest::collection::vec("[a-z0-9]{1,10}", 0..4),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(
                |(id, stream, ty, version, position, timestamp, metadata, tags, data)| {
                    RecordedEvent {
                        id: Uuid::from_u128(id),
                        stream: StreamId::new(stream).expect("strategy makes valid ids"),
                        event_type: ty,
                        version,
                        position,
                        timestamp,
                        metadata,
                        tags,
                        data: Bytes::from(data),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn events_round_trip(ev in arb_event()) {
            let bytes = encode_event(&ev);
            let back = decode_event(ev.position, &bytes).unwrap();
            prop_assert_eq!(back, ev);
        }

        #[test]
        fn truncated_records_are_corrupt_not_panics(ev in arb_event(), cut in 0usize..64) {
            let bytes = encode_event(&ev);
            let cut = cut.min(bytes.len().saturating_sub(1));
            let err = decode_event(ev.position, &bytes[..cut]).unwrap_err();
            prop_assert!(matches!(err, StoreError::Corrupt { .. }), "{}", err);
        }
    }

    #[test]
    fn an_event_of_a_stream_id_older_kilns_accepted_still_decodes() {
        // New appends refuse a leading '-' (empty category); a log written
        // before that rule is read whole.
        let ev = RecordedEvent {
            id: Uuid::from_u128(1),
            stream: StreamId::recorded("-legacy").expect("stored id"),
            event_type: "T".into(),
            version: 1,
            position: 7,
            timestamp: 0,
            metadata: Default::default(),
            tags: vec![],
            data: Bytes::from_static(b"{}"),
        };
        assert!(StreamId::new("-legacy").is_err());
        assert_eq!(decode_event(7, &encode_event(&ev)).unwrap(), ev);
    }

    #[test]
    fn position_keys_sort_in_position_order() {
        let mut keys: Vec<_> = [300u64, 2, 1 << 40, 1]
            .iter()
            .map(|p| position_key(*p))
            .collect();
        keys.sort();
        let back: Vec<_> = keys.iter().map(|k| decode_position(k).unwrap()).collect();
        assert_eq!(back, vec![1, 2, 300, 1 << 40]);
    }
}
