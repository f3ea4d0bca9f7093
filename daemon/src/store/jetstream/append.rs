//! The append path: one guarded publish, or one atomic batch of events and
//! tag markers, retried while the stream moves under an expectation that
//! still holds; a dedupe probe and replay when the server has seen an event
//! id; and snapshots, saved with the same guard.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use async_nats::jetstream::message::StreamMessage;
use async_nats::{HeaderMap, Request, RequestErrorKind};
use bytes::Bytes;
use serde::Deserialize;
use uuid::Uuid;

use super::super::{
    AppendRequest, AppendResult, MAX_VERSION, Position, StoreError, StreamHead, StreamId,
    validate_append,
};
use super::{ACK_PATIENCE, DIRECT_GET_ATTEMPTS, Inner, MAX_BATCH_MESSAGES, backoff, jitter, wire};

/// Most write attempts of one append whose expected version still holds while
/// other writers keep moving the stream (relaxed appends under contention).
const MAX_ATTEMPTS: u32 = 1000;
/// Most stream heads remembered from this process's own appends.
const HEAD_HINTS: usize = 65_536;

// JetStream API error codes kiln reacts to.
const ERR_WRONG_LAST_SEQUENCE: u64 = 10071;
const ERR_WRONG_LAST_MSG_ID: u64 = 10070;
const ERR_WRONG_LAST_SEQUENCE_IN_BATCH: u64 = 10164;
const ERR_DUPLICATE_IN_PROCESS: u64 = 10158;
const ERR_BATCH_DUPLICATE_MSG_ID: u64 = 10201;
const ERR_BATCH_INCOMPLETE: u64 = 10176;
const ERR_BATCH_TOO_MANY_INFLIGHT: u64 = 10210;

/// A JetStream API error as the server reports it in a publish ack.
#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (status {}, code {})",
            self.description, self.code, self.err_code
        )
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn guard_moved(&self) -> bool {
        matches!(
            self.err_code,
            ERR_WRONG_LAST_SEQUENCE | ERR_WRONG_LAST_SEQUENCE_IN_BATCH
        )
    }

    /// Worth retrying as is: the server is busy with something that will pass.
    fn transient(&self) -> bool {
        matches!(
            self.err_code,
            ERR_DUPLICATE_IN_PROCESS | ERR_BATCH_INCOMPLETE | ERR_BATCH_TOO_MANY_INFLIGHT
        ) || self.description.contains("in process")
    }
}

/// A publish ack, or the error in its place.
#[derive(Debug, Default, Deserialize)]
struct PubReply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
}

/// The last read state of a tag: its newest marker and the event it points at.
#[derive(Clone, Copy, Debug, Default)]
struct TagState {
    marker_seq: u64,
    position: Position,
}

/// One tag marker an append writes.
struct MarkerPlan {
    tag: String,
    /// Index of the last event of the append carrying the tag, if any does.
    carried_by: Option<usize>,
    /// Part of the append's condition: guarded by its last sequence.
    guarded: bool,
}

/// What the server did with one write attempt.
enum Outcome {
    Committed(AppendResult),
    /// A single message whose id the server had seen, stored at this sequence.
    Duplicate(u64),
    /// An atomic batch refused because one of its ids was seen.
    DuplicateInBatch,
    /// An OCC guard failed: the stream (or a tag) moved since it was read.
    GuardMoved,
    /// The server asked to come back later.
    Busy(ApiError),
}

/// The version of the last of `n` events appended on a stream at `version`.
fn next_version(stream: &StreamId, version: u64, n: usize) -> Result<u64, StoreError> {
    version
        .checked_add(n as u64)
        .filter(|v| *v <= MAX_VERSION)
        .ok_or_else(|| StoreError::TooLarge {
            stream: stream.clone(),
            what: "the stream's version after the append".into(),
            size: usize::try_from(version)
                .unwrap_or(usize::MAX)
                .saturating_add(n),
            limit: usize::try_from(MAX_VERSION).unwrap_or(usize::MAX),
        })
}

fn msg_id(m: &StreamMessage) -> Option<Uuid> {
    wire::header(&m.headers, wire::MSG_ID).and_then(|s| Uuid::parse_str(s.trim()).ok())
}

impl Inner {
    /// Sends a message and waits for the server's ack (or error) as JSON.
    async fn publish_request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        op: &(dyn Fn() -> String + Sync),
    ) -> Result<PubReply, StoreError> {
        let stream = if self.subjects.is_snapshot(&subject) {
            &self.seen_snapshots
        } else {
            &self.seen_events
        };
        let request = Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(self.config.request_timeout()));
        // While the ack is late, ask whether the stream still has a leader: a
        // request caught by a leader's death is never answered, and waiting
        // out the whole timeout would hide a routine election.
        // A reconnect while waiting means the request or its ack is lost:
        // say so rather than wait out the timeout; a retry with the same event
        // ids is safe.
        // A new leader elected meanwhile (its advisory) means a request
        // sent before it went to the old one is never answered, and so does
        // a reconnect after a request sent on the lost connection: say so at
        // once rather than at the next patience tick, or at the timeout if
        // the stream has a leader again by then (found measuring a node kill
        // against a raw client: kiln's appends came back up to 1.8 s after
        // the raw client's). Not a reconnect after a request made while
        // disconnected: it is sent once the connection is back, and answered
        // (the fleet model, seed 33, ended that wait too).
        let reconnected = || StoreError::Unavailable {
            op: op(),
            reason: "the connection to NATS was lost and re-established while waiting for the \
                     server's answer; retry (the same event ids are safe)"
                .into(),
        };
        let mut moved = self.reconnects.clone();
        moved.borrow_and_update();
        let elections = *self.elections.borrow();
        let connects = self.connects.load(Ordering::Acquire);
        let on_a_connection = connects > self.disconnects.load(Ordering::Acquire);
        let send = self.client.send_request(subject.clone(), request);
        tokio::pin!(send);
        let answered = loop {
            tokio::select! {
                answered = &mut send => break answered,
                changed = moved.changed() => {
                    if changed.is_err() {
                        // The connection's watcher is gone (shutting down):
                        // wait for the answer or the timeout.
                        break (&mut send).await;
                    }
                    if *self.elections.borrow() != elections {
                        return Err(StoreError::Unavailable {
                            op: op(),
                            reason: "the stream elected a new leader while waiting for the \
                                     server's answer; retry (the same event ids are safe)"
                                .into(),
                        });
                    }
                    if on_a_connection && self.connects.load(Ordering::Acquire) != connects {
                        return Err(reconnected());
                    }
                }
                _ = tokio::time::sleep(ACK_PATIENCE) => {
                    if self.connects.load(Ordering::Acquire) != connects {
                        return Err(reconnected());
                    }
                    if !self.stream_has_leader().await {
                        return Err(self.electing(op()));
                    }
                }
            }
        };
        let reply = match answered {
            Ok(reply) => reply,
            Err(e) => {
                return Err(match e.kind() {
                    RequestErrorKind::TimedOut => StoreError::Timeout {
                        op: op(),
                        millis: self.millis(),
                    },
                    RequestErrorKind::NoResponders => self.no_responders(op(), &subject).await,
                    _ => StoreError::backend(op(), e),
                });
            }
        };
        let reply: PubReply = serde_json::from_slice(&reply.payload).map_err(|e| {
            StoreError::backend(
                op(),
                format!(
                    "unreadable publish ack {:?}: {e}",
                    String::from_utf8_lossy(&reply.payload)
                ),
            )
        })?;
        stream.fetch_max(reply.seq, Ordering::AcqRel);
        if self.no_responders_since.load(Ordering::Acquire) != 0 {
            self.no_responders_since.store(0, Ordering::Release);
        }
        Ok(reply)
    }

    fn head_hint(&self, stream: &StreamId) -> Option<StreamHead> {
        self.head_hints.lock().ok()?.get(stream).copied()
    }

    fn remember_head(&self, stream: &StreamId, result: AppendResult) {
        if let Ok(mut hints) = self.head_hints.lock() {
            if hints.len() >= HEAD_HINTS && !hints.contains_key(stream) {
                hints.clear();
            }
            hints.insert(
                stream.clone(),
                StreamHead {
                    version: result.version,
                    position: result.position,
                },
            );
        }
    }

    fn forget_head(&self, stream: &StreamId) {
        if let Ok(mut hints) = self.head_hints.lock() {
            hints.remove(stream);
        }
    }

    async fn tag_state(&self, tag: &str) -> Result<TagState, StoreError> {
        match self.last_on(&self.events, &self.subjects.tag(tag)).await? {
            None => Ok(TagState::default()),
            Some(m) => Ok(TagState {
                marker_seq: m.sequence,
                position: wire::tag_position(&m.headers, m.sequence).unwrap_or_else(|why| {
                    tracing::warn!(
                        tag,
                        position = m.sequence,
                        "tag marker not written by kiln ({why}): reading it as pointing at itself"
                    );
                    m.sequence
                }),
            }),
        }
    }

    /// Asks the server, without writing anything, whether `id` was stored within
    /// the dedupe window, and at which sequence. The probe carries the event id and
    /// a guard that never holds, one the server checks after the id (so a known
    /// id gets a duplicate ack) and that refuses anything else. Which guard
    /// depends on the server's mode (nats-server 2.15):
    /// - clustered: an expected last subject sequence of u64::MAX on the probe
    ///   subject (where nothing is stored). An expected-last-msg-id refusal
    ///   there leaves a replicated stream answering no further publishes.
    /// - one server: an expected-last-msg-id that never holds; a single server
    ///   checks the subject sequence before the id.
    async fn probe(&self, id: &Uuid) -> Result<Option<u64>, StoreError> {
        let op = || {
            format!(
                "looking up event id {id} in stream '{}'",
                self.config.stream
            )
        };
        let mut h = HeaderMap::new();
        h.insert(wire::MSG_ID, id.to_string().as_str());
        if self.clustered {
            h.insert(
                wire::EXPECTED_LAST_SUBJECT_SEQ,
                u64::MAX.to_string().as_str(),
            );
        } else {
            h.insert(
                wire::EXPECTED_LAST_MSG_ID,
                format!("kiln-probe-{}", Uuid::new_v4()).as_str(),
            );
        }
        for attempt in 0..MAX_ATTEMPTS {
            let reply = self
                .publish_request(self.subjects.probe(), h.clone(), Bytes::new(), &op)
                .await?;
            match reply.error {
                None if reply.duplicate => return Ok(Some(reply.seq)),
                None => {
                    return Err(StoreError::backend(
                        op(),
                        format!(
                            "the server stored the dedupe probe at position {} instead of \
                             refusing it; this server does not behave as kiln expects",
                            reply.seq
                        ),
                    ));
                }
                Some(e) if e.guard_moved() || e.err_code == ERR_WRONG_LAST_MSG_ID => {
                    return Ok(None);
                }
                Some(e) if e.transient() => tokio::time::sleep(backoff(attempt)).await,
                Some(e) => return Err(StoreError::backend(op(), e)),
            }
        }
        Err(StoreError::backend(
            op(),
            "the server kept answering 'in process'",
        ))
    }

    /// A retry of `req` whose first event the server stored at `seq`: the original
    /// result if the whole append was committed there, a duplicate-id error if not.
    async fn replayed_from(
        &self,
        seq: u64,
        req: &AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        let subject = self.subjects.event(&req.stream);
        let n = req.events.len();
        // A batched read may come from a replica behind the leader that just
        // reported the id: ask again, briefly, before judging the messages.
        let mut msgs = self.read_subject(&subject, seq, n).await?;
        for attempt in 1..DIRECT_GET_ATTEMPTS {
            if msgs.len() >= n && msgs.first().map(|m| m.sequence) == Some(seq) {
                break;
            }
            tokio::time::sleep(backoff(attempt)).await;
            msgs = self.read_subject(&subject, seq, n).await?;
        }
        if msgs.first().map(|m| m.sequence) != Some(seq) {
            let elsewhere = match self.msg_at(seq).await? {
                Some(m) => format!("'{}'", m.subject),
                None => "a message that no longer exists".to_string(),
            };
            return Err(StoreError::DuplicateEventId {
                stream: req.stream.clone(),
                id: req.events[0].id,
                reason: format!(
                    "it was already committed at position {seq} on {elsewhere} by another append"
                ),
            });
        }
        let version_at = |m: &StreamMessage| {
            wire::version_of(&m.headers).map_err(|reason| StoreError::Corrupt {
                what: format!("message {} on '{subject}'", m.sequence),
                reason,
            })
        };
        let first_version = version_at(&msgs[0])?;
        for (i, ev) in req.events.iter().enumerate() {
            let same = match msgs.get(i) {
                Some(m) => msg_id(m) == Some(ev.id) && version_at(m)? == first_version + i as u64,
                None => false,
            };
            if !same {
                return Err(StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: req.events[0].id,
                    reason: format!(
                        "it was committed by an earlier append that did not include event #{i} ({})",
                        ev.id
                    ),
                });
            }
        }
        Ok(AppendResult {
            first_position: seq,
            position: msgs[n - 1].sequence,
            version: first_version + n as u64 - 1,
        })
    }

    /// If `req` is a retry of a committed append, its original result.
    async fn replay(&self, req: &AppendRequest) -> Result<Option<AppendResult>, StoreError> {
        match self.probe(&req.events[0].id).await? {
            Some(seq) => self.replayed_from(seq, req).await.map(Some),
            None => Ok(None),
        }
    }

    /// The server refused a batch for a known id that is not its first: names it.
    async fn which_duplicate(&self, req: &AppendRequest) -> Result<StoreError, StoreError> {
        for ev in &req.events[1..] {
            if let Some(seq) = self.probe(&ev.id).await? {
                let where_ = match self.msg_at(seq).await? {
                    Some(m) => format!("on '{}' at position {seq}", m.subject),
                    None => format!("at position {seq}"),
                };
                return Ok(StoreError::DuplicateEventId {
                    stream: req.stream.clone(),
                    id: ev.id,
                    reason: format!("it was already committed {where_} by another append"),
                });
            }
        }
        Ok(StoreError::DuplicateEventId {
            stream: req.stream.clone(),
            id: req.events[0].id,
            reason: "the server refused the append: one of its event ids was committed \
                     within the dedupe window"
                .into(),
        })
    }

    /// One marker per tag the append carries or is conditioned on, by tag name.
    fn plan_markers(&self, req: &AppendRequest) -> Vec<MarkerPlan> {
        let mut markers: BTreeMap<&str, MarkerPlan> = BTreeMap::new();
        fn marker<'m, 'a>(
            markers: &'m mut BTreeMap<&'a str, MarkerPlan>,
            tag: &'a str,
        ) -> &'m mut MarkerPlan {
            markers.entry(tag).or_insert_with(|| MarkerPlan {
                tag: tag.to_string(),
                carried_by: None,
                guarded: false,
            })
        }
        for (i, ev) in req.events.iter().enumerate() {
            for tag in &ev.tags {
                marker(&mut markers, tag).carried_by = Some(i);
            }
        }
        for tag in req.condition.iter().flat_map(|c| &c.tags) {
            marker(&mut markers, tag).guarded = true;
        }
        markers.into_values().collect()
    }

    async fn publish_single(
        &self,
        req: &AppendRequest,
        head: StreamHead,
    ) -> Result<Outcome, StoreError> {
        let ev = &req.events[0];
        let version = next_version(&req.stream, head.version, 1)?;
        let mut h = wire::event_headers(
            &ev.id,
            &ev.event_type,
            version,
            &ev.tags,
            &ev.metadata,
            ev.timestamp,
        );
        h.insert(
            wire::EXPECTED_LAST_SUBJECT_SEQ,
            head.position.to_string().as_str(),
        );
        let op = || format!("appending to stream '{}'", req.stream);
        let reply = self
            .publish_request(self.subjects.event(&req.stream), h, ev.data.clone(), &op)
            .await?;
        Ok(match reply.error {
            None if reply.duplicate => Outcome::Duplicate(reply.seq),
            None => Outcome::Committed(AppendResult {
                first_position: reply.seq,
                position: reply.seq,
                version,
            }),
            Some(e) if e.guard_moved() => Outcome::GuardMoved,
            Some(e) if e.transient() => Outcome::Busy(e),
            Some(e) => return Err(StoreError::backend(op(), e)),
        })
    }

    /// One atomic batch: the events (the first guarded by the stream's last
    /// sequence), then one marker per tag (condition tags guarded by theirs).
    async fn publish_batch(
        &self,
        req: &AppendRequest,
        head: StreamHead,
        markers: &[MarkerPlan],
        tags: &HashMap<String, TagState>,
    ) -> Result<Outcome, StoreError> {
        let n = req.events.len();
        let last_version = next_version(&req.stream, head.version, n)?;
        let subject = self.subjects.event(&req.stream);
        let mut msgs: Vec<(String, HeaderMap, Bytes)> = Vec::with_capacity(n + markers.len());
        for (i, ev) in req.events.iter().enumerate() {
            let mut h = wire::event_headers(
                &ev.id,
                &ev.event_type,
                head.version + 1 + i as u64,
                &ev.tags,
                &ev.metadata,
                ev.timestamp,
            );
            if i == 0 {
                h.insert(
                    wire::EXPECTED_LAST_SUBJECT_SEQ,
                    head.position.to_string().as_str(),
                );
            }
            msgs.push((subject.clone(), h, ev.data.clone()));
        }
        for (j, m) in markers.iter().enumerate() {
            let state = tags.get(&m.tag).copied().unwrap_or_default();
            let mut h = HeaderMap::new();
            match m.carried_by {
                Some(e) => h.insert(wire::TAG_OFFSET, (n + j - e).to_string().as_str()),
                None => h.insert(wire::TAG_POSITION, state.position.to_string().as_str()),
            }
            if m.guarded {
                h.insert(
                    wire::EXPECTED_LAST_SUBJECT_SEQ,
                    state.marker_seq.to_string().as_str(),
                );
            }
            msgs.push((self.subjects.tag(&m.tag), h, Bytes::new()));
        }
        let total = msgs.len();
        let batch_id = Uuid::new_v4().simple().to_string();
        let op = || {
            format!(
                "appending {n} events to stream '{}' in an atomic batch",
                req.stream
            )
        };
        let mut reply = None;
        for (k, (subj, mut h, payload)) in msgs.into_iter().enumerate() {
            h.insert(wire::BATCH_ID, batch_id.as_str());
            h.insert(wire::BATCH_SEQ, (k + 1).to_string().as_str());
            if k + 1 < total {
                self.client
                    .publish_with_headers(subj, h, payload)
                    .await
                    .map_err(|e| StoreError::backend(op(), e))?;
            } else {
                h.insert(wire::BATCH_COMMIT, "1");
                reply = Some(self.publish_request(subj, h, payload, &op).await?);
            }
        }
        let reply = reply.unwrap_or_default();
        Ok(match reply.error {
            None => {
                // A server that commits batches atomically says how many
                // messages it committed; anything else is not an atomic commit.
                if reply.count != Some(total as u64) {
                    return Err(StoreError::backend(
                        op(),
                        format!(
                            "the server acknowledged the batch with a message count of {} \
                             instead of {total}: it did not commit it as one atomic batch",
                            reply.count.map_or("none".to_string(), |c| c.to_string())
                        ),
                    ));
                }
                // An atomic batch is stored at consecutive sequences, the
                // commit (last) message at `seq`.
                let first_position = reply.seq + 1 - total as u64;
                Outcome::Committed(AppendResult {
                    first_position,
                    position: first_position + n as u64 - 1,
                    version: last_version,
                })
            }
            Some(e) if e.err_code == ERR_BATCH_DUPLICATE_MSG_ID => Outcome::DuplicateInBatch,
            Some(e) if e.guard_moved() => Outcome::GuardMoved,
            Some(e) if e.transient() => Outcome::Busy(e),
            Some(e) => return Err(StoreError::backend(op(), e)),
        })
    }

    pub(super) async fn append(&self, req: AppendRequest) -> Result<AppendResult, StoreError> {
        validate_append(&req, &self.config.limits)?;
        let markers = self.plan_markers(&req);
        debug_assert!(req.events.len() + markers.len() <= MAX_BATCH_MESSAGES);
        let single = markers.is_empty() && req.events.len() == 1;
        let mut busy = None;
        for attempt in 0..MAX_ATTEMPTS {
            let hint = if attempt == 0 {
                self.head_hint(&req.stream)
            } else {
                None
            };
            let head = match hint {
                Some(h) if req.expected.admits(h.version) => h,
                _ => self.head_for_append(&req.stream).await?,
            };
            if !req.expected.admits(head.version) {
                if let Some(original) = self.replay(&req).await? {
                    return Ok(original);
                }
                return Err(StoreError::VersionConflict {
                    stream: req.stream.clone(),
                    expected: req.expected,
                    actual: head.version,
                });
            }
            let states = futures::future::try_join_all(markers.iter().map(|m| async move {
                Ok::<_, StoreError>((m.tag.clone(), self.tag_state(&m.tag).await?))
            }))
            .await?
            .into_iter()
            .collect::<HashMap<_, _>>();
            if let Some(cond) = &req.condition {
                for tag in &cond.tags {
                    let position = states.get(tag).map_or(0, |s| s.position);
                    if position > cond.after {
                        if let Some(original) = self.replay(&req).await? {
                            return Ok(original);
                        }
                        return Err(StoreError::TagConflict {
                            stream: req.stream.clone(),
                            tag: tag.clone(),
                            after: cond.after,
                            position,
                        });
                    }
                }
            }
            let outcome = if single {
                self.publish_single(&req, head).await?
            } else {
                self.publish_batch(&req, head, &markers, &states).await?
            };
            match outcome {
                Outcome::Committed(result) => {
                    self.remember_head(&req.stream, result);
                    return Ok(result);
                }
                Outcome::Duplicate(seq) => return self.replayed_from(seq, &req).await,
                Outcome::DuplicateInBatch => {
                    return match self.replay(&req).await? {
                        Some(original) => Ok(original),
                        None => Err(self.which_duplicate(&req).await?),
                    };
                }
                // Someone else wrote first: read again. The next round reports a
                // conflict if the expectation no longer holds, or retries if it does.
                Outcome::GuardMoved => {
                    self.forget_head(&req.stream);
                    if attempt >= 3 {
                        tokio::time::sleep(jitter(u64::from(attempt.min(50)))).await;
                    }
                }
                Outcome::Busy(e) => {
                    busy = Some(e);
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        Err(StoreError::backend(
            format!("appending to stream '{}'", req.stream),
            format!(
                "gave up after {MAX_ATTEMPTS} attempts: the stream kept moving between reading \
                 its version and writing{}",
                busy.map(|e| format!(" (last server answer: {e})"))
                    .unwrap_or_default()
            ),
        ))
    }

    pub(super) async fn save_snapshot(
        &self,
        stream: &StreamId,
        version: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let latest = self.head_of(stream).await?.version;
        if version > latest || version == 0 {
            return Err(StoreError::SnapshotAhead {
                stream: stream.clone(),
                version,
                latest,
            });
        }
        let subject = self.subjects.snapshot(stream);
        let op = || format!("saving the snapshot of stream '{stream}' at version {version}");
        for attempt in 0..MAX_ATTEMPTS {
            let existing = self.last_on(&self.snapshots, &subject).await?;
            let (seq, existing_version) = match &existing {
                Some(m) => (
                    m.sequence,
                    wire::snapshot_version(&m.headers, &subject, m.sequence)?,
                ),
                None => (0, 0),
            };
            // Keep the newest: an older snapshot arriving late changes nothing.
            if existing.is_some() && existing_version > version {
                return Ok(());
            }
            let mut h = HeaderMap::new();
            h.insert(wire::VERSION, version.to_string().as_str());
            h.insert(wire::EXPECTED_LAST_SUBJECT_SEQ, seq.to_string().as_str());
            let reply = self
                .publish_request(subject.clone(), h, data.clone(), &op)
                .await?;
            match reply.error {
                None => return Ok(()),
                Some(e) if e.guard_moved() || e.transient() => {
                    tokio::time::sleep(backoff(attempt.min(4))).await
                }
                Some(e) => return Err(StoreError::backend(op(), e)),
            }
        }
        Err(StoreError::backend(
            op(),
            "other writers kept saving snapshots of the stream",
        ))
    }
}
