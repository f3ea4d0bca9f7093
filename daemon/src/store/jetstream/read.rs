//! Reads: the last event on a subject (stepping over foreign messages),
//! direct gets (from the stream's leader when it is replicated), batched
//! direct gets for pages of a stream, and the heads and snapshots read with
//! them.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self as js_stream, LastRawMessageErrorKind};
use async_nats::{HeaderMap, RequestErrorKind};
use futures::StreamExt;

use super::super::{Position, RecordedEvent, Snapshot, StoreError, StreamHead, StreamId};
use super::{DIRECT_GET_ATTEMPTS, Inner, backoff, wire};

/// Most foreign messages stepped over, newest first, looking for a subject's
/// last kiln event.
const FOREIGN_WALK: usize = 256;

/// How many sequences [`Inner::last_matching_up_to`] looks back at most.
const MATCHING_WALK: u64 = 4096;

fn is_wildcard(subject: &str) -> bool {
    subject.split('.').any(|t| t == "*" || t == ">")
}

/// Whether `subject` matches the NATS subject filter `filter` (`*` one
/// token, `>` the rest).
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subject's last kiln event, and the newest foreign message after it.
struct LastOn {
    event: Option<RecordedEvent>,
    foreign_after: Option<(u64, String)>,
}

impl LastOn {
    fn head(&self) -> StreamHead {
        self.event
            .as_ref()
            .map_or(StreamHead::default(), |ev| StreamHead {
                version: ev.version,
                position: ev.position,
            })
    }
}

fn header_time(h: &HeaderMap) -> u64 {
    wire::header(h, "Nats-Time-Stamp")
        .and_then(wire::parse_rfc3339_millis)
        .unwrap_or(0)
}

impl Inner {
    fn decode_stored(&self, m: &StreamMessage) -> Result<RecordedEvent, wire::NotKiln> {
        let decoded = wire::decode_event(
            &self.subjects,
            m.subject.as_str(),
            m.sequence,
            header_time(&m.headers),
            &m.headers,
            m.payload.clone(),
        );
        if let Err(e) = &decoded {
            self.note_foreign(m.sequence, m.subject.as_str(), e);
        }
        decoded
    }

    /// The last kiln event on `subject` (an event subject or the events
    /// filter), stepping back over foreign messages; and the newest foreign
    /// message after it, if the subject ends with one.
    async fn last_event_on(&self, subject: &str) -> Result<LastOn, StoreError> {
        let mut foreign_after = None;
        let mut next = self.last_on(&self.events, subject).await?;
        for _ in 0..FOREIGN_WALK {
            let Some(m) = next else {
                return Ok(LastOn {
                    event: None,
                    foreign_after,
                });
            };
            match self.decode_stored(&m) {
                Ok(ev) => {
                    return Ok(LastOn {
                        event: Some(ev),
                        foreign_after,
                    });
                }
                Err(why) => {
                    foreign_after.get_or_insert((m.sequence, why.0));
                    next = if is_wildcard(subject) {
                        self.last_matching_up_to(subject, m.sequence - 1).await?
                    } else {
                        self.last_up_to(subject, m.sequence - 1).await?
                    };
                }
            }
        }
        Err(StoreError::Corrupt {
            what: format!("subject '{subject}'"),
            reason: format!(
                "its last {FOREIGN_WALK} messages are not kiln events; remove them or \
                 move the other service to subjects outside '{}'",
                self.subjects.events_filter()
            ),
        })
    }

    /// The last message on `subject` in `stream`, by direct get.
    pub(super) async fn last_on(
        &self,
        stream: &js_stream::Stream,
        subject: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "last_by_subj": subject });
        self.direct_get(stream, body, || {
            format!("reading the last message on '{subject}'")
        })
        .await
    }

    /// The first message on `subject` at sequence `seq` or later.
    pub(super) async fn next_on(
        &self,
        subject: &str,
        seq: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "seq": seq, "next_by_subj": subject });
        self.direct_get(&self.events, body, || {
            format!("reading '{subject}' from position {seq}")
        })
        .await
    }

    pub(super) async fn msg_at(&self, seq: u64) -> Result<Option<StreamMessage>, StoreError> {
        let body = serde_json::json!({ "seq": seq });
        self.direct_get(&self.events, body, || format!("reading position {seq}"))
            .await
    }

    /// The last message matching the wildcard `filter` at or before sequence
    /// `up_to`, found by walking back one sequence at a time (at most
    /// [`MATCHING_WALK`]; removed sequences and other subjects are stepped
    /// over). A multi-subject "last" get cannot serve here: it answers the
    /// last message of *each* matching subject, earliest first.
    async fn last_matching_up_to(
        &self,
        filter: &str,
        up_to: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let stop = up_to.saturating_sub(MATCHING_WALK);
        let mut seq = up_to;
        while seq > stop {
            if let Some(m) = self.msg_at(seq).await?
                && subject_matches(filter, &m.subject)
            {
                return Ok(Some(m));
            }
            seq -= 1;
        }
        if seq == 0 {
            return Ok(None);
        }
        Err(StoreError::Corrupt {
            what: format!("the stream before position {}", up_to + 1),
            reason: format!(
                "none of its last {MATCHING_WALK} messages is on '{filter}': cannot tell its \
                 last event; move other services' messages out of this stream"
            ),
        })
    }

    /// The last message on the literal `subject` at or before sequence `up_to`.
    async fn last_up_to(
        &self,
        subject: &str,
        up_to: u64,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if up_to == 0 {
            return Ok(None);
        }
        // `up_to_seq` applies to multi-subject last gets, answered as a batch.
        let body = serde_json::json!({ "multi_last": [subject], "up_to_seq": up_to, "batch": 1 });
        let op = || format!("reading the last message on '{subject}' up to position {up_to}");
        let (mut msgs, _) = self.direct_batch(body, &op).await?;
        Ok(msgs.pop())
    }

    /// The highest sequence of `stream` this process has seen written or read,
    /// sent with direct gets as `min_last_seq` (the proposed read-after-write
    /// of ADR-53: a server implementing it answers from a replica that far
    /// along, or 412). nats-server 2.15 ignores it, which is why replicated
    /// streams are read from their leader ([`Inner::leader_get`]).
    fn seen(&self, stream: &js_stream::Stream) -> &AtomicU64 {
        if stream.cached_info().config.name == self.config.stream {
            &self.seen_events
        } else {
            &self.seen_snapshots
        }
    }

    /// A get answered by the stream's leader (`$JS.API.STREAM.MSG.GET`), which
    /// has every acknowledged message: on a replicated stream a direct get may
    /// be answered by a follower a few milliseconds behind, so `latest` right
    /// after an ack, and a dedupe replay, could miss the write. (nats-server
    /// 2.15 does not implement `min_last_seq`, the proposed fix for that.)
    async fn leader_get(
        &self,
        stream: &js_stream::Stream,
        body: &serde_json::Value,
        op: &impl Fn() -> String,
    ) -> Result<Option<StreamMessage>, StoreError> {
        let mut get = stream.raw_message_builder();
        if let Some(seq) = body["seq"].as_u64() {
            get = get.sequence(seq);
        }
        if let Some(subject) = body["last_by_subj"].as_str() {
            get = get.last_by_subject(subject);
        }
        if let Some(subject) = body["next_by_subj"].as_str() {
            get = get.next_by_subject(subject);
        }
        match get.send().await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) if e.to_string().contains("timed out") => Err(StoreError::Timeout {
                op: op(),
                millis: self.millis(),
            }),
            Err(e) if e.to_string().contains("no responders") => Err(self.electing(op())),
            Err(e) => Err(StoreError::backend(op(), e)),
        }
    }

    /// One direct get (`$JS.API.DIRECT.GET.<stream>` with `body`), answered
    /// by any replica at least as far along as what this process has seen.
    async fn direct_get(
        &self,
        stream: &js_stream::Stream,
        mut body: serde_json::Value,
        op: impl Fn() -> String,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if stream.cached_info().config.num_replicas > 1 {
            return self.leader_get(stream, &body, &op).await;
        }
        let seen = self.seen(stream);
        let name = &stream.cached_info().config.name;
        let api = format!("$JS.API.DIRECT.GET.{name}");
        for attempt in 0..DIRECT_GET_ATTEMPTS {
            let min = seen.load(Ordering::Acquire);
            if min > 0 {
                body["min_last_seq"] = min.into();
            }
            let msg = match self
                .client
                .request(api.clone(), body.to_string().into())
                .await
            {
                Ok(msg) => msg,
                Err(e) => {
                    return Err(match e.kind() {
                        RequestErrorKind::TimedOut => StoreError::Timeout {
                            op: op(),
                            millis: self.millis(),
                        },
                        RequestErrorKind::NoResponders => self.electing(op()),
                        _ => StoreError::backend(op(), e),
                    });
                }
            };
            if let Some(status) = msg.status {
                match status.as_u16() {
                    404 => return Ok(None),
                    // No replica that answered was far enough along yet; or
                    // the stream was deleted and created again, behind what
                    // this process saw: then its last sequence is the floor.
                    412 if attempt + 1 < DIRECT_GET_ATTEMPTS => {
                        if attempt == 2
                            && let Ok(info) = stream.clone().info().await
                            && info.state.last_sequence < min
                        {
                            tracing::warn!(
                                stream = %name,
                                "the stream's last sequence {} is behind {min}, which this \
                                 process saw: it was recreated; reading from what it holds",
                                info.state.last_sequence
                            );
                            seen.store(info.state.last_sequence, Ordering::Release);
                            continue;
                        }
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    412 => return Err(self.electing(op())),
                    code => {
                        return Err(StoreError::backend(
                            op(),
                            format!(
                                "direct get answered {code} {}",
                                msg.description.clone().unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
            let m = StreamMessage::try_from(msg).map_err(|e| StoreError::backend(op(), e))?;
            seen.fetch_max(m.sequence, Ordering::AcqRel);
            return Ok(Some(m));
        }
        Err(self.electing(op()))
    }

    /// Up to `max` messages on `subject` from sequence `from` on, with batched
    /// direct gets (one request per 1000 messages).
    pub(super) async fn read_subject(
        &self,
        subject: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<StreamMessage>, StoreError> {
        let op = || format!("reading '{subject}' from position {from}");
        let mut out: Vec<StreamMessage> = Vec::with_capacity(max.min(1024));
        let mut seq = from;
        while out.len() < max {
            let want = (max - out.len()).min(1000);
            let body = serde_json::json!({ "seq": seq, "next_by_subj": subject, "batch": want });
            let (msgs, pending) = self.direct_batch(body, &op).await?;
            let Some(last) = msgs.last() else {
                break;
            };
            seq = last.sequence + 1;
            out.extend(msgs);
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// One batched direct get on the event stream: the messages the server
    /// sends until its end-of-batch, and how many more match (its
    /// `Nats-Num-Pending`).
    async fn direct_batch(
        &self,
        mut body: serde_json::Value,
        op: &(dyn Fn() -> String + Sync),
    ) -> Result<(Vec<StreamMessage>, u64), StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.config.stream);
        let min = self.seen_events.load(Ordering::Acquire);
        if min > 0 {
            body["min_last_seq"] = min.into();
        }
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| StoreError::backend(op(), e))?;
        self.client
            .publish_with_reply(api, inbox, body.to_string().into())
            .await
            .map_err(|e| StoreError::backend(op(), e))?;
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(self.config.request_timeout(), sub.next())
                .await
                .map_err(|_| StoreError::Timeout {
                    op: op(),
                    millis: self.millis(),
                })?
                .ok_or_else(|| StoreError::backend(op(), "the connection closed"))?;
            if let Some(status) = msg.status {
                return match status.as_u16() {
                    // End of batch: how many more match tells whether to go on.
                    204 => {
                        let pending = msg
                            .headers
                            .as_ref()
                            .and_then(|h| wire::header(h, "Nats-Num-Pending"))
                            .and_then(|p| p.trim().parse().ok())
                            .unwrap_or(0);
                        Ok((out, pending))
                    }
                    404 => Ok((out, 0)),
                    412 => Err(self.electing(op())),
                    code => Err(StoreError::backend(
                        op(),
                        format!(
                            "direct get answered {code} {}",
                            msg.description.clone().unwrap_or_default()
                        ),
                    )),
                };
            }
            let m = StreamMessage::try_from(msg).map_err(|e| StoreError::backend(op(), e))?;
            self.seen_events.fetch_max(m.sequence, Ordering::AcqRel);
            out.push(m);
        }
    }

    /// The stream's head: its last event's version and position, plus that event's
    /// sequence for the OCC guard (the same number as the position).
    /// Foreign messages at the end of the stream's subject are stepped over.
    pub(super) async fn head_of(&self, stream: &StreamId) -> Result<StreamHead, StoreError> {
        let last = self.last_event_on(&self.subjects.event(stream)).await?;
        Ok(last.head())
    }

    /// The head an append builds on: refused when the stream's subject ends
    /// with a foreign message (the server's guard would refuse every write
    /// built on the last kiln event, and writing after it would make the
    /// foreign message part of the stream).
    pub(super) async fn head_for_append(
        &self,
        stream: &StreamId,
    ) -> Result<StreamHead, StoreError> {
        let last = self.last_event_on(&self.subjects.event(stream)).await?;
        if let Some((position, reason)) = last.foreign_after {
            return Err(StoreError::ForeignMessage {
                stream: stream.clone(),
                position,
                reason,
            });
        }
        Ok(last.head())
    }

    pub(super) async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let subject = self.subjects.event(stream);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Some(last) = self.last_event_on(&subject).await?.event else {
            return Ok(Vec::new());
        };
        let from = from_version.max(1);
        if from > last.version {
            return Ok(Vec::new());
        }
        let mut seq = if from == last.version {
            last.position
        } else if from == 1 {
            1
        } else {
            self.seq_of_version(&subject, from, last.position).await?
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        // Foreign messages are skipped, so a page may take more than one read;
        // and a batched read may be answered by a replica behind the last
        // event read above (seen with batched direct gets on 2.15): it is
        // asked again, briefly, until the read reaches that event.
        let mut behind = 0;
        while out.len() < limit && seq <= last.position {
            let msgs = self.read_subject(&subject, seq, limit - out.len()).await?;
            let Some(end) = msgs.last().map(|m| m.sequence) else {
                behind += 1;
                if behind >= DIRECT_GET_ATTEMPTS {
                    return Err(self.electing(format!(
                        "reading stream '{stream}' from position {seq} up to {}",
                        last.position
                    )));
                }
                tokio::time::sleep(backoff(behind)).await;
                continue;
            };
            for m in &msgs {
                if m.sequence > last.position {
                    break;
                }
                if let Ok(ev) = self.decode_stored(m)
                    && ev.version >= from
                {
                    out.push(ev);
                }
            }
            seq = end + 1;
        }
        Ok(out)
    }

    /// The sequence at or before the first kiln event on `subject` whose version
    /// is at least `version`: a binary search over sequences with direct gets
    /// (versions grow with sequences), about log2(last_seq) round trips. A
    /// foreign message met on the way sends the search left: starting early
    /// only costs reading (and skipping) a few more messages.
    async fn seq_of_version(
        &self,
        subject: &str,
        version: u64,
        last_seq: u64,
    ) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = (1u64, last_seq);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(m) = self.next_on(subject, mid).await? else {
                return Ok(lo);
            };
            match wire::version_of(&m.headers) {
                Ok(v) if v == version => return Ok(m.sequence),
                Ok(v) if v < version => lo = m.sequence + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// The last event's position (documented on `JetStreamStore`'s `head`).
    pub(super) async fn head(&self) -> Result<Position, StoreError> {
        let info = self.events.get_info().await.map_err(|e| {
            StoreError::backend(
                format!("reading the state of stream '{}'", self.config.stream),
                e,
            )
        })?;
        let last = info.state.last_sequence;
        if last == 0 {
            return Ok(0);
        }
        if let Some(m) = self.msg_at(last).await?
            && wire::decode_event(&self.subjects, &m.subject, last, 0, &m.headers, m.payload)
                .is_ok()
        {
            return Ok(last);
        }
        let filter = self.subjects.events_filter();
        Ok(self
            .last_event_on(&filter)
            .await?
            .event
            .map_or(0, |ev| ev.position))
    }

    pub(super) async fn latest_snapshot(&self, stream: &StreamId) -> Result<Snapshot, StoreError> {
        let subject = self.subjects.snapshot(stream);
        let m = self
            .last_on(&self.snapshots, &subject)
            .await?
            .ok_or_else(|| StoreError::SnapshotNotFound {
                stream: stream.clone(),
            })?;
        Ok(Snapshot {
            stream: stream.clone(),
            version: wire::snapshot_version(&m.headers, &subject, m.sequence)?,
            data: m.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{is_wildcard, subject_matches};

    #[test]
    fn subject_filters_match_as_nats_does() {
        assert!(subject_matches("kiln.*.*", "kiln.user.user-1"));
        assert!(!subject_matches("kiln.*.*", "kiln._kiln.tag.a.b"));
        assert!(!subject_matches("kiln.*.*", "kiln.user"));
        assert!(subject_matches("kiln.>", "kiln._kiln.tag.a"));
        assert!(!subject_matches("kiln.>", "kiln"));
        assert!(subject_matches("kiln.user.user-1", "kiln.user.user-1"));
        assert!(!subject_matches("kiln.user.user-1", "kiln.user.user-2"));
        assert!(is_wildcard("kiln.*.*") && is_wildcard("kiln.>"));
        assert!(!is_wildcard("kiln.user.user-1"));
    }

    /// What an unfiltered tail takes as an event subject is exactly what the
    /// server's `<prefix>.*.*` filter matches, for one- and two-token
    /// prefixes and every kind of subject a shared stream may hold.
    #[test]
    fn is_event_agrees_with_the_events_filter() {
        for prefix in ["kiln", "acme.kiln"] {
            let subjects = super::super::Subjects::new(prefix);
            let filter = subjects.events_filter();
            let cases = [
                format!("{prefix}.user.user-1"),
                format!("{prefix}.acct:eu@x+y=z_w.acct:eu@x+y=z_w-42"),
                format!("{prefix}._kiln.tag.vip"),
                format!("{prefix}._kiln.probe.dedupe"),
                format!("{prefix}._kiln.snap.user-1"),
                format!("{prefix}.user"),
                prefix.to_string(),
                format!("{prefix}x.user.user-1"),
                format!("x{prefix}.user.user-1"),
                format!("{prefix}.a.b.c"),
                "billing.invoice.1".to_string(),
                "kiln.user.user-1".to_string(),
                "acme.kiln.user.user-1".to_string(),
                "acme.user.user-1".to_string(),
            ];
            for subject in cases {
                assert_eq!(
                    subjects.is_event(&subject),
                    subject_matches(&filter, &subject),
                    "prefix {prefix}, subject {subject}"
                );
            }
        }
    }
}
