//! kiln's wire format on JetStream: subjects, headers and how a message becomes a
//! [`RecordedEvent`]. Any NATS client that follows it appends events kiln
//! understands; `docs/jetstream.md` is the prose version of this file.
//!
//! - Event: subject `<prefix>.<category>.<stream-id>`, payload = the event's JSON
//!   data, headers `Nats-Msg-Id` (event id), `Kiln-Type`, `Kiln-Version`, and
//!   optionally `Kiln-Tags` (comma-separated) and `Kiln-Metadata` (JSON object).
//!   Position = the JetStream stream sequence, timestamp = the server's store time.
//! - Tag marker: subject `<prefix>._kiln.tag.<tag>`, empty payload, one per tag an
//!   append carries or is conditioned on, written in the same atomic batch as the
//!   events. `Kiln-Tag-Offset: k` says the tag's last event is `k` sequences
//!   before the marker; `Kiln-Tag-Position: p` says it is at position `p`.
//! - Snapshot: subject `<prefix>._kiln.snap.<stream-id>` in a stream of its own,
//!   header `Kiln-Version`, payload = the snapshot bytes.
//!
//! Event subjects have exactly three tokens after the prefix's, kiln's own ones
//! four, so a consumer filtered on `<prefix>.*.*` sees events and nothing else.
//! Stream ids and tags use an alphabet (ASCII letters, digits, `- _ : @ + =`)
//! that is valid in a subject token as is: nothing is ever escaped.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use uuid::Uuid;

use super::super::{Position, RecordedEvent, StoreError, StreamId};

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
pub const BATCH_ID: &str = "Nats-Batch-Id";
pub const BATCH_SEQ: &str = "Nats-Batch-Sequence";
pub const BATCH_COMMIT: &str = "Nats-Batch-Commit";
pub const TYPE: &str = "Kiln-Type";
pub const VERSION: &str = "Kiln-Version";
pub const TAGS: &str = "Kiln-Tags";
pub const METADATA: &str = "Kiln-Metadata";
pub const TAG_OFFSET: &str = "Kiln-Tag-Offset";
pub const TAG_POSITION: &str = "Kiln-Tag-Position";

/// The subjects of one kiln log, derived from its prefix.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_string(),
        }
    }

    /// `<prefix>.<category>.<stream-id>`.
    pub fn event(&self, stream: &StreamId) -> String {
        format!("{}.{}.{}", self.prefix, stream.category(), stream)
    }

    /// Matches every event subject and nothing else kiln writes.
    pub fn events_filter(&self) -> String {
        format!("{}.*.*", self.prefix)
    }

    pub fn tag(&self, tag: &str) -> String {
        format!("{}._kiln.tag.{tag}", self.prefix)
    }

    pub fn tags_filter(&self) -> String {
        format!("{}._kiln.tag.*", self.prefix)
    }

    /// Where dedupe probes are sent; the server never stores them.
    pub fn probe(&self) -> String {
        format!("{}._kiln.probe.dedupe", self.prefix)
    }

    pub fn probe_filter(&self) -> String {
        format!("{}._kiln.probe.*", self.prefix)
    }

    pub fn snapshot(&self, stream: &StreamId) -> String {
        format!("{}._kiln.snap.{stream}", self.prefix)
    }

    pub fn snapshots_filter(&self) -> String {
        format!("{}._kiln.snap.*", self.prefix)
    }

    /// The stream id of an event subject, checked against its category token.
    pub fn stream_of(&self, subject: &str) -> Result<StreamId, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: format!("event subject '{subject}'"),
            reason,
        };
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| corrupt(format!("it does not start with '{}.'", self.prefix)))?;
        let (category, id) = rest
            .split_once('.')
            .ok_or_else(|| corrupt("expected <category>.<stream-id> after the prefix".into()))?;
        let stream = StreamId::new(id).map_err(|e| corrupt(e.to_string()))?;
        if stream.category() != category {
            return Err(corrupt(format!(
                "category token '{category}' is not the category of stream id '{stream}'"
            )));
        }
        Ok(stream)
    }
}

/// Headers of one event message (everything but the OCC guard and batch headers).
pub fn event_headers(
    id: &Uuid,
    event_type: &str,
    version: u64,
    tags: &[String],
    metadata: &BTreeMap<String, String>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(MSG_ID, id.to_string().as_str());
    h.insert(TYPE, event_type);
    h.insert(VERSION, version.to_string().as_str());
    if !tags.is_empty() {
        h.insert(TAGS, tags.join(",").as_str());
    }
    if !metadata.is_empty() {
        // serde_json writes one line; validate_append refused line breaks anyway.
        let json = serde_json::to_string(metadata).unwrap_or_default();
        h.insert(METADATA, json.as_str());
    }
    h
}

pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_last(name).map(|v| v.as_str())
}

pub fn header_u64(h: &HeaderMap, name: &str, what: impl Fn() -> String) -> Result<u64, StoreError> {
    let v = header(h, name).ok_or_else(|| StoreError::Corrupt {
        what: what(),
        reason: format!("header {name} is missing"),
    })?;
    v.trim().parse().map_err(|e| StoreError::Corrupt {
        what: what(),
        reason: format!("header {name} is {v:?}: {e}"),
    })
}

/// The version an event message carries.
pub fn version_of(h: &HeaderMap, subject: &str, seq: u64) -> Result<u64, StoreError> {
    header_u64(h, VERSION, || format!("message {seq} on '{subject}'"))
}

/// Turns a stored event message into a recorded event.
pub fn decode_event(
    subjects: &Subjects,
    subject: &str,
    position: Position,
    timestamp: u64,
    h: &HeaderMap,
    data: Bytes,
) -> Result<RecordedEvent, StoreError> {
    let what = || format!("event at position {position} on '{subject}'");
    let corrupt = |reason: String| StoreError::Corrupt {
        what: what(),
        reason,
    };
    let stream = subjects.stream_of(subject)?;
    let id = header(h, MSG_ID).ok_or_else(|| corrupt(format!("header {MSG_ID} is missing")))?;
    let id = Uuid::parse_str(id.trim())
        .map_err(|e| corrupt(format!("header {MSG_ID} {id:?} is not a UUID: {e}")))?;
    let event_type = header(h, TYPE)
        .ok_or_else(|| corrupt(format!("header {TYPE} is missing")))?
        .trim()
        .to_string();
    let version = header_u64(h, VERSION, what)?;
    let tags = match header(h, TAGS) {
        Some(t) if !t.trim().is_empty() => {
            t.trim().split(',').map(|s| s.trim().to_string()).collect()
        }
        _ => Vec::new(),
    };
    let metadata = match header(h, METADATA) {
        Some(m) if !m.trim().is_empty() => serde_json::from_str(m.trim()).map_err(|e| {
            corrupt(format!(
                "header {METADATA} is not a JSON object of strings: {e}"
            ))
        })?,
        _ => BTreeMap::new(),
    };
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

/// The position of a tag's last event, from its newest marker message.
pub fn tag_position(h: &HeaderMap, marker_seq: u64, tag: &str) -> Result<Position, StoreError> {
    let what = || format!("marker {marker_seq} of tag '{tag}'");
    if header(h, TAG_OFFSET).is_some() {
        let k = header_u64(h, TAG_OFFSET, what)?;
        return marker_seq
            .checked_sub(k)
            .ok_or_else(|| StoreError::Corrupt {
                what: what(),
                reason: format!("offset {k} points before the start of the log"),
            });
    }
    header_u64(h, TAG_POSITION, what)
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as the server writes
/// it (`2026-11-23T21:20:04.477553858Z`).
pub fn parse_rfc3339_millis(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let mut rest = &s[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (num(s.len() - 5, 2)? * 3600 + num(s.len() - 2, 2)? * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    u64::try_from(secs * 1000 + millis).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The store time of a message a consumer delivered, from its ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<nanos>.<pending>`, or
/// the v2 form with domain and account hash and a trailing token).
pub fn ack_subject_millis(reply: &str) -> Option<u64> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let nanos = match tokens.len() {
        9 => tokens[7],
        n if n >= 11 => tokens[9],
        _ => return None,
    };
    nanos.parse::<u64>().ok().map(|n| n / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_and_never_collide() {
        let s = Subjects::new("kiln");
        let id = StreamId::new("user-42").unwrap();
        assert_eq!(s.event(&id), "kiln.user.user-42");
        assert_eq!(s.stream_of("kiln.user.user-42").unwrap(), id);
        assert!(s.stream_of("kiln.order.user-42").is_err());
        assert!(s.stream_of("other.user.user-42").is_err());
        // kiln's own subjects have four tokens: `kiln.*.*` never matches them.
        assert_eq!(s.tag("t").split('.').count(), 4);
        assert_eq!(s.snapshot(&id).split('.').count(), 4);
        assert_eq!(s.probe().split('.').count(), 4);
        let dotted = Subjects::new("acme.kiln");
        assert_eq!(dotted.stream_of("acme.kiln.user.user-42").unwrap(), id);
    }

    #[test]
    fn headers_round_trip() {
        let id = Uuid::new_v4();
        let mut meta = BTreeMap::new();
        meta.insert("correlation-id".to_string(), "abc 123 ü".to_string());
        let tags = vec!["a".to_string(), "b:c".to_string()];
        let h = event_headers(&id, "user.Registered", 7, &tags, &meta);
        let ev = decode_event(&Subjects::new("k"), "k.u.u-1", 9, 5, &h, Bytes::from("{}")).unwrap();
        assert_eq!(
            (ev.id, ev.version, ev.position, ev.timestamp),
            (id, 7, 9, 5)
        );
        assert_eq!((ev.tags, ev.metadata), (tags, meta));
        assert_eq!(ev.event_type, "user.Registered");
    }

    #[test]
    fn parses_server_timestamps() {
        assert_eq!(parse_rfc3339_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_millis("2026-11-23T21:20:04.477553858Z"),
            Some(1_795_468_804_477)
        );
        assert_eq!(
            parse_rfc3339_millis("2026-11-23T22:20:04.4+01:00"),
            Some(1_795_468_804_400)
        );
        assert_eq!(parse_rfc3339_millis("garbage"), None);
        assert_eq!(
            ack_subject_millis("$JS.ACK.S.C.1.5.5.1795468804477553858.0"),
            Some(1_795_468_804_477)
        );
        assert_eq!(
            ack_subject_millis("$JS.ACK.dom.hash.S.C.1.5.5.1795468804477553858.0.xyz"),
            Some(1_795_468_804_477)
        );
    }
}
