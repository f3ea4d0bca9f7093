//! kiln's wire format on JetStream: subjects, headers and how a message becomes a
//! [`RecordedEvent`]. Any NATS client that follows it appends events kiln
//! understands; `docs/jetstream.md` is the prose version of this file.
//!
//! - Event: subject `<prefix>.<category>.<stream-id>`, payload = the event's JSON
//!   data, headers `Nats-Msg-Id` (event id), `Kiln-Type`, `Kiln-Version`, and
//!   optionally `Kiln-Tags` (comma-separated), `Kiln-Metadata` (JSON object) and
//!   `Kiln-Timestamp` (milliseconds since the Unix epoch).
//!   Position = the JetStream stream sequence; timestamp = `Kiln-Timestamp` when
//!   the message carries one (an event copied from another log by `kiln
//!   migrate` keeps the commit time projections saw there), else the server's
//!   store time.
//! - Tag marker: subject `<prefix>._kiln.tag.<tag>`, empty payload, one per tag an
//!   append carries or is conditioned on, written in the same atomic batch as the
//!   events. `Kiln-Tag-Offset: k` says the tag's last event is `k` sequences
//!   before the marker; `Kiln-Tag-Position: p` says it is at position `p`.
//! - Snapshot: subject `<prefix>._kiln.snap.<stream-id>` in a stream of its own,
//!   header `Kiln-Version`, payload = the snapshot bytes.
//!
//! Event subjects have exactly three tokens after the prefix's, kiln's own ones
//! four, so a consumer filtered on `<prefix>.*.*` sees events and nothing else.
//!
//! **Foreign messages.** A stream shared with other services may hold messages
//! on event subjects that are not kiln events. [`decode_event`] is the one
//! definition, used by tails, reads, `latest` and appends alike: a message is a
//! kiln event when its subject is `<prefix>.<category>.<stream-id>` with a valid
//! stream id of that category, `Nats-Msg-Id` is a UUID, `Kiln-Type` is a valid
//! event type, `Kiln-Version` is an integer from 1 to [`MAX_VERSION`] that
//! provably follows the stream's previous version (the message carries the
//! server-checked `Nats-Expected-Last-Subject-Sequence` guard, 0 only with
//! version 1, or is message `k > 1` of an atomic batch with version `>= k`),
//! `Kiln-Tags` (if any) are valid tags, `Kiln-Metadata` (if any) is a JSON
//! object of strings, `Kiln-Timestamp` (if any) is an integer from 0 to
//! [`MAX_VERSION`], and the payload is JSON. Anything else is foreign: tails
//! and reads skip it (logged with its sequence, counted), `latest` reports the
//! last kiln event before it, and an append to a stream whose last message is
//! foreign is refused naming its sequence. A tag marker whose headers are
//! unusable, or point after the marker itself, counts as pointing at the marker
//! (the most conservative reading), so no marker can block its tag for ever.
//! Stream ids and tags use an alphabet (ASCII letters, digits, `- _ : @ + =`)
//! that is valid in a subject token as is: nothing is ever escaped.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use uuid::Uuid;

use super::super::{MAX_VERSION, Position, RecordedEvent, StoreError, StreamId, validate_tag};

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
pub const TIMESTAMP: &str = "Kiln-Timestamp";
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

    /// Whether `subject` matches [`Self::events_filter`].
    pub fn is_event(&self, subject: &str) -> bool {
        subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(category, id)| {
                !category.is_empty() && !id.is_empty() && !id.contains('.')
            })
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

    pub fn is_snapshot(&self, subject: &str) -> bool {
        subject
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with("._kiln.snap."))
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

/// Headers of one event message (everything but the OCC guard and batch
/// headers). `timestamp` is the commit time of a copied event (`Kiln-Timestamp`).
pub fn event_headers(
    id: &Uuid,
    event_type: &str,
    version: u64,
    tags: &[String],
    metadata: &BTreeMap<String, String>,
    timestamp: Option<u64>,
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
    if let Some(t) = timestamp {
        h.insert(TIMESTAMP, t.to_string().as_str());
    }
    h
}

pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_last(name).map(|v| v.as_str())
}

/// Why a message on an event subject is not a kiln event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotKiln(pub String);

impl std::fmt::Display for NotKiln {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Turns a stored message on an event subject into a recorded event, or says
/// why it is not a kiln event (see the module docs: the one definition).
/// `timestamp` is the server's store time, used unless the message carries
/// `Kiln-Timestamp`.
pub fn decode_event(
    subjects: &Subjects,
    subject: &str,
    position: Position,
    timestamp: u64,
    h: &HeaderMap,
    data: Bytes,
) -> Result<RecordedEvent, NotKiln> {
    let stream = subjects
        .stream_of(subject)
        .map_err(|e| NotKiln(e.to_string()))?;
    let missing = |name: &str| NotKiln(format!("header {name} is missing"));
    let id = header(h, MSG_ID).ok_or_else(|| missing(MSG_ID))?;
    let id = Uuid::parse_str(id.trim())
        .map_err(|e| NotKiln(format!("header {MSG_ID} {id:?} is not a UUID: {e}")))?;
    let event_type = header(h, TYPE).ok_or_else(|| missing(TYPE))?.trim();
    if event_type.is_empty()
        || event_type.len() > super::super::MAX_ID_LEN
        || event_type
            .chars()
            .any(|c| !c.is_ascii_graphic() || c == '*' || c == '>')
    {
        return Err(NotKiln(format!(
            "header {TYPE} {event_type:?} is not an event type"
        )));
    }
    let version = version_of(h).map_err(NotKiln)?;
    check_guard(h, version)?;
    let tags: Vec<String> = match header(h, TAGS) {
        Some(t) if !t.trim().is_empty() => {
            t.trim().split(',').map(|s| s.trim().to_string()).collect()
        }
        _ => Vec::new(),
    };
    if let Some(bad) = tags.iter().find_map(|t| validate_tag(t).err()) {
        return Err(NotKiln(format!("header {TAGS}: {bad}")));
    }
    let metadata = match header(h, METADATA) {
        Some(m) if !m.trim().is_empty() => serde_json::from_str(m.trim()).map_err(|e| {
            NotKiln(format!(
                "header {METADATA} is not a JSON object of strings: {e}"
            ))
        })?,
        _ => BTreeMap::new(),
    };
    let timestamp = match header(h, TIMESTAMP) {
        None => timestamp,
        Some(t) => match t.trim().parse::<u64>() {
            Ok(t) if t <= MAX_VERSION => t,
            _ => {
                return Err(NotKiln(format!(
                    "header {TIMESTAMP} {t:?} is not an integer from 0 to {MAX_VERSION}"
                )));
            }
        },
    };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&data) {
        return Err(NotKiln(format!("the payload is not JSON: {e}")));
    }
    Ok(RecordedEvent {
        id,
        stream,
        event_type: event_type.to_string(),
        version,
        position,
        timestamp,
        metadata,
        tags,
        data,
    })
}

/// A kiln event carries the proof that its version follows its stream's
/// previous one: the server checked `Nats-Expected-Last-Subject-Sequence`
/// when it stored the event (0, for a first event, only with version 1), or
/// the event is message `k > 1` of an atomic batch whose first message
/// carried that guard (its version at least `k`). A message without either
/// was published past the version check, so its `Kiln-Version` says nothing.
fn check_guard(h: &HeaderMap, version: u64) -> Result<(), NotKiln> {
    let number = |name: &str| {
        header(h, name).map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| NotKiln(format!("header {name} is {v:?}: {e}")))
        })
    };
    if let Some(guard) = number(EXPECTED_LAST_SUBJECT_SEQ) {
        return match guard? {
            0 if version != 1 => Err(NotKiln(format!(
                "header {VERSION} is {version} on a message guarded as its stream's first \
                 ({EXPECTED_LAST_SUBJECT_SEQ}: 0): a version that does not follow"
            ))),
            g if g > 0 && version == 1 => Err(NotKiln(format!(
                "header {VERSION} is 1 on a message guarded to follow sequence {g}: a \
                 version that does not follow"
            ))),
            _ => Ok(()),
        };
    }
    match (header(h, BATCH_ID), number(BATCH_SEQ).transpose()?) {
        (Some(_), Some(k)) if k > 1 && version >= k => Ok(()),
        (Some(_), Some(k)) if k > 1 => Err(NotKiln(format!(
            "header {VERSION} is {version} on message {k} of an atomic batch: a version \
             that does not follow"
        ))),
        _ => Err(NotKiln(format!(
            "no version guard: a kiln event carries {EXPECTED_LAST_SUBJECT_SEQ} (or follows \
             one that does in an atomic batch), so this message's {VERSION} is not known to \
             follow its stream's"
        ))),
    }
}

/// The `Kiln-Version` of a message: an integer from 1 to [`MAX_VERSION`].
pub fn version_of(h: &HeaderMap) -> Result<u64, String> {
    let v = header(h, VERSION).ok_or_else(|| format!("header {VERSION} is missing"))?;
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_VERSION).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "header {VERSION} is {n}, outside 1 to {MAX_VERSION}"
        )),
        Err(e) => Err(format!("header {VERSION} is {v:?}: {e}")),
    }
}

/// The version a snapshot message carries (kiln writes those alone).
pub fn snapshot_version(h: &HeaderMap, subject: &str, seq: u64) -> Result<u64, StoreError> {
    version_of(h).map_err(|reason| StoreError::Corrupt {
        what: format!("snapshot message {seq} on '{subject}'"),
        reason,
    })
}

/// The position of a tag's last event, from its newest marker message. A
/// marker kiln did not write (unusable headers, a position after the marker
/// itself) reads as pointing at the marker: conservative, and it never blocks
/// the tag for ever, since a condition `after` the marker passes it.
pub fn tag_position(h: &HeaderMap, marker_seq: u64) -> Result<Position, NotKiln> {
    let parse = |name: &str| {
        header(h, name).map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| NotKiln(format!("header {name} is {v:?}: {e}")))
        })
    };
    if let Some(k) = parse(TAG_OFFSET) {
        let k = k?;
        return marker_seq
            .checked_sub(k)
            .filter(|p| *p > 0)
            .ok_or_else(|| NotKiln(format!("offset {k} points before the start of the log")));
    }
    match parse(TAG_POSITION) {
        Some(p) => {
            let p = p?;
            if p >= marker_seq {
                return Err(NotKiln(format!(
                    "position {p} is not before the marker itself"
                )));
            }
            Ok(p)
        }
        None => Err(NotKiln(format!(
            "neither {TAG_OFFSET} nor {TAG_POSITION} is set"
        ))),
    }
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
        let mut h = event_headers(&id, "user.Registered", 7, &tags, &meta, None);
        h.insert(EXPECTED_LAST_SUBJECT_SEQ, "8");
        let ev = decode_event(&Subjects::new("k"), "k.u.u-1", 9, 5, &h, Bytes::from("{}")).unwrap();
        assert_eq!(
            (ev.id, ev.version, ev.position, ev.timestamp),
            (id, 7, 9, 5)
        );
        assert_eq!((ev.tags, ev.metadata), (tags, meta));
        assert_eq!(ev.event_type, "user.Registered");
    }

    /// A copied event keeps its original commit time; the server's store
    /// time is only the fallback.
    #[test]
    fn a_carried_timestamp_wins_over_the_server_time() {
        let s = Subjects::new("k");
        let decode = |h: &HeaderMap| decode_event(&s, "k.u.u-1", 9, 5, h, Bytes::from("{}"));
        let mut h = event_headers(&Uuid::new_v4(), "T", 1, &[], &BTreeMap::new(), Some(42));
        h.insert(EXPECTED_LAST_SUBJECT_SEQ, "0");
        assert_eq!(h.get_last(TIMESTAMP).map(|v| v.as_str()), Some("42"));
        assert_eq!(decode(&h).map(|e| e.timestamp), Ok(42));
        for bad in ["x", "-1", "9007199254740992", ""] {
            h.insert(TIMESTAMP, bad);
            let e = decode(&h).expect_err(bad);
            assert!(e.0.contains(TIMESTAMP), "{bad:?}: {e}");
        }
    }

    #[test]
    fn what_is_not_a_kiln_event() {
        let s = Subjects::new("k");
        let mut good = event_headers(&Uuid::new_v4(), "T", 3, &[], &BTreeMap::new(), None);
        good.insert(EXPECTED_LAST_SUBJECT_SEQ, "5");
        let decode = |subject: &str, h: &HeaderMap, data: &'static str| {
            decode_event(&s, subject, 9, 0, h, Bytes::from(data))
        };
        assert!(decode("k.u.u-1", &good, "{}").is_ok());
        let without = |name: &str| {
            let mut h = HeaderMap::new();
            for (k, v) in good.iter() {
                let key: &str = k.as_ref();
                if key != name {
                    h.insert(k.clone(), v[0].as_str());
                }
            }
            h
        };
        for name in [MSG_ID, TYPE, VERSION] {
            let e = decode("k.u.u-1", &without(name), "{}").unwrap_err();
            assert!(e.0.contains(name), "{e}");
        }
        for bad_version in ["0", "18446744073709551615", "-1", "x", "9007199254740992"] {
            let mut h = good.clone();
            h.insert(VERSION, bad_version);
            let e = decode("k.u.u-1", &h, "{}").unwrap_err();
            assert!(e.0.contains(VERSION), "{bad_version}: {e}");
        }
        let mut h = good.clone();
        h.insert(METADATA, "[1]");
        assert!(decode("k.u.u-1", &h, "{}").is_err());
        let mut h = good.clone();
        h.insert(TAGS, "ok,not ok");
        assert!(decode("k.u.u-1", &h, "{}").is_err());
        assert!(
            decode("k.u.u-1", &good, "not json")
                .unwrap_err()
                .0
                .contains("JSON")
        );
        assert!(decode("k.x.u-1", &good, "{}").is_err(), "category mismatch");
    }

    /// A version is only believed when the server checked where it goes.
    #[test]
    fn a_version_must_provably_follow() {
        let s = Subjects::new("k");
        let decode = |version: u64, guard: &[(&str, &str)]| {
            let mut h = event_headers(&Uuid::new_v4(), "T", version, &[], &BTreeMap::new(), None);
            for (k, v) in guard {
                h.insert(*k, *v);
            }
            decode_event(&s, "k.u.u-1", 9, 0, &h, Bytes::from("{}")).map(|e| e.version)
        };
        let guarded = |g: &'static str| [(EXPECTED_LAST_SUBJECT_SEQ, g)];
        let batch = |k: &'static str| [(BATCH_ID, "b"), (BATCH_SEQ, k)];
        assert_eq!(decode(1, &guarded("0")), Ok(1));
        assert_eq!(decode(4, &guarded("7")), Ok(4));
        assert_eq!(decode(3, &batch("2")), Ok(3));
        assert_eq!(decode(3, &batch("3")), Ok(3));
        let refused = [
            (decode(3, &[]), "no version guard"),
            (decode(3, &guarded("0")), "does not follow"),
            (decode(1, &guarded("7")), "does not follow"),
            (decode(2, &guarded("x")), EXPECTED_LAST_SUBJECT_SEQ),
            (decode(3, &batch("4")), "does not follow"),
            (decode(3, &batch("1")), "no version guard"),
            (decode(3, &[(BATCH_SEQ, "2")]), "no version guard"),
        ];
        for (i, (got, why)) in refused.into_iter().enumerate() {
            let e = got.expect_err("refused");
            assert!(e.0.contains(why), "case {i}: {e}");
        }
    }

    #[test]
    fn no_marker_blocks_its_tag() {
        let mut h = HeaderMap::new();
        h.insert(TAG_OFFSET, "2");
        assert_eq!(tag_position(&h, 10), Ok(8));
        h.insert(TAG_OFFSET, "10");
        assert!(tag_position(&h, 10).is_err());
        let mut h = HeaderMap::new();
        h.insert(TAG_POSITION, "7");
        assert_eq!(tag_position(&h, 10), Ok(7));
        h.insert(TAG_POSITION, "18446744073709551615");
        assert!(tag_position(&h, 10).is_err());
        assert!(tag_position(&HeaderMap::new(), 10).is_err());
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
