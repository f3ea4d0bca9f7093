//! Tails: an ordered pull consumer on the event stream, recreated from the
//! last delivered position after errors, reconnects, leader elections and
//! silent stalls, so each event is delivered once, in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::super::{EventBatches, Position, RecordedEvent, StoreError};
use super::{ACK_PATIENCE, Inner, backoff, wire};

/// Most events in one batch handed out by a tail.
pub const TAIL_BATCH: usize = 1024;

/// The batches of events a tail from `from` hands out.
pub(super) fn batches(inner: Arc<Inner>, from: Position) -> EventBatches {
    let tail = Tail {
        reconnects: inner.reconnects.clone(),
        inner,
        next: from.max(1),
        messages: None,
        failures: 0,
        pending_error: None,
        suspect: None,
    };
    futures::stream::unfold(tail, Tail::next_batch).boxed()
}

impl Inner {
    async fn open_tail(&self, from: Position) -> Result<pull::Ordered, StoreError> {
        let op = || {
            format!(
                "starting a tail of stream '{}' at position {from}",
                self.config.stream
            )
        };
        // Unfiltered when the stream holds kiln's subjects only: the server
        // then walks its blocks in order. With a wildcard filter that is not
        // the whole stream, it looks every message up through the block's
        // subject index, whose cost grows with the subjects in the block
        // (nats-server `msgBlock.firstMatching`): events written in runs of
        // one stream read 2.6x slower than interleaved ones that way. Tag
        // markers are then delivered too, and skipped (`Tail::take`).
        let filter_subject = if self.whole_stream_tail {
            String::new()
        } else {
            self.subjects.events_filter()
        };
        // Bounded well below the request timeout: during a leader election
        // the request can go unanswered, and the tail's loop retries it.
        let create = self.events.create_consumer(pull::OrderedConfig {
            filter_subject,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        });
        let consumer = tokio::time::timeout(ACK_PATIENCE * 2, create)
            .await
            .map_err(|_| self.electing(op()))?
            .map_err(|e| StoreError::backend(op(), e))?;
        consumer
            .messages()
            .await
            .map_err(|e| StoreError::backend(op(), e))
    }

    /// A delivered message's sequence, and the event it holds (or why it is
    /// not a kiln event, recorded as foreign); `None` for a message outside
    /// the event subjects (a tag marker, read by an unfiltered tail).
    fn decode_delivered(&self, msg: &jetstream::Message) -> Result<Delivered, StoreError> {
        let info = msg.info().map_err(|e| StoreError::Corrupt {
            what: format!("a message delivered on '{}'", msg.subject),
            reason: format!("unreadable delivery metadata: {e}"),
        })?;
        let seq = info.stream_sequence;
        if !self.subjects.is_event(msg.subject.as_str()) {
            return Ok((seq, None));
        }
        let timestamp = msg
            .reply
            .as_ref()
            .and_then(|r| wire::ack_subject_millis(r.as_str()))
            .unwrap_or(0);
        let empty = HeaderMap::new();
        let headers = msg.headers.as_ref().unwrap_or(&empty);
        let ev = wire::decode_event(
            &self.subjects,
            msg.subject.as_str(),
            seq,
            timestamp,
            headers,
            msg.payload.clone(),
        );
        if let Err(why) = &ev {
            self.note_foreign(seq, msg.subject.as_str(), why);
        }
        Ok((seq, Some(ev)))
    }
}

/// A delivered message's position and, on an event subject, its event or why
/// it is not one.
type Delivered = (Position, Option<Result<RecordedEvent, wire::NotKiln>>);

/// How long a tail waits for a message before asking the server whether the
/// log moved without it (a consumer lost to a leader election can stay silent
/// for a minute before the client library notices).
const TAIL_IDLE_CHECK: Duration = Duration::from_secs(3);

impl Inner {
    /// The first message on an event subject at `next` or later, if any: one
    /// direct get, asked after [`TAIL_IDLE_CHECK`] of silence from a consumer.
    async fn event_at_or_after(&self, next: Position) -> Option<Position> {
        match self.next_on(&self.subjects.events_filter(), next).await {
            Ok(m) => m.map(|m| m.sequence),
            Err(e) => {
                tracing::debug!("tail at position {next}: cannot check for a stall: {e}");
                None
            }
        }
    }
}

/// State of one tail: where it is, and its consumer while it has one.
struct Tail {
    inner: Arc<Inner>,
    next: Position,
    messages: Option<pull::Ordered>,
    reconnects: watch::Receiver<u64>,
    failures: u32,
    pending_error: Option<StoreError>,
    /// An event found waiting at the last idle check (see [`TAIL_IDLE_CHECK`]).
    suspect: Option<Position>,
}

impl Tail {
    /// Turns delivered messages into events at `next` or later. A foreign
    /// message is skipped (and recorded); the messages after it are taken as
    /// usual. A message without readable delivery metadata (no sequence to
    /// step past) ends the batch and recreates the consumer from `next`.
    fn take(&mut self, raw: Vec<jetstream::Message>) -> Vec<RecordedEvent> {
        let mut out = Vec::with_capacity(raw.len());
        for msg in raw {
            match self.inner.decode_delivered(&msg) {
                Ok((seq, _)) if seq < self.next => {}
                Ok((seq, Some(Ok(ev)))) => {
                    self.next = seq + 1;
                    out.push(ev);
                }
                Ok((seq, Some(Err(_)) | None)) => self.next = seq + 1,
                Err(e) => {
                    tracing::warn!(
                        "tail at position {}: {e}; recreating its consumer",
                        self.next
                    );
                    self.messages = None;
                    if self.pending_error.is_none() && out.is_empty() {
                        self.pending_error = Some(e);
                    }
                    break;
                }
            }
        }
        out
    }

    async fn next_batch(mut self) -> Option<(Result<Vec<RecordedEvent>, StoreError>, Tail)> {
        if let Some(e) = self.pending_error.take() {
            return Some((Err(e), self));
        }
        loop {
            if self.messages.is_none() {
                if self.failures > 0 {
                    // Wait, but wake up at once on a reconnect.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(self.failures)) => {}
                        changed = self.reconnects.changed() => if changed.is_err() { return None },
                    }
                }
                self.reconnects.borrow_and_update();
                match self.inner.open_tail(self.next).await {
                    Ok(m) => self.messages = Some(m),
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        tracing::warn!("tail at position {}: {e}; retrying", self.next);
                        continue;
                    }
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let mut lost_consumer = false;
            let raw = tokio::select! {
                item = messages.next() => match item {
                    Some(Ok(first)) => {
                        let mut raw = vec![first];
                        while raw.len() < TAIL_BATCH {
                            match messages.next().now_or_never() {
                                Some(Some(Ok(m))) => raw.push(m),
                                Some(Some(Err(_))) | Some(None) => {
                                    lost_consumer = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                        raw
                    }
                    Some(Err(e)) => {
                        tracing::warn!("tail at position {}: {e}; recreating its consumer", self.next);
                        lost_consumer = true;
                        Vec::new()
                    }
                    None => {
                        lost_consumer = true;
                        Vec::new()
                    }
                },
                changed = self.reconnects.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    tracing::info!("tail at position {}: reconnected, recreating its consumer", self.next);
                    lost_consumer = true;
                    Vec::new()
                }
                _ = tokio::time::sleep(TAIL_IDLE_CHECK) => {
                    // The check is bounded and gives way to a leader change:
                    // during an election it could wait a whole request
                    // timeout while the new leader is already announced.
                    let check = tokio::time::timeout(
                        TAIL_IDLE_CHECK,
                        self.inner.event_at_or_after(self.next),
                    );
                    let waiting = tokio::select! {
                        waiting = check => waiting.ok().flatten(),
                        changed = self.reconnects.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            tracing::info!(
                                "tail at position {}: reconnected, recreating its consumer",
                                self.next
                            );
                            self.messages = None;
                            self.failures = 0;
                            continue;
                        }
                    };
                    // Two silent checks in a row with an event waiting: not
                    // one merely in flight at the first check.
                    let stalled = waiting.is_some() && self.suspect == waiting;
                    self.suspect = waiting;
                    if stalled {
                        tracing::warn!(
                            "tail at position {}: its consumer delivered nothing for {:?} while \
                             the log holds position {}; recreating it",
                            self.next,
                            TAIL_IDLE_CHECK * 2,
                            waiting.unwrap_or_default()
                        );
                        self.suspect = None;
                        self.inner.tail_stalls.fetch_add(1, Ordering::Relaxed);
                        // Recreate at once: the server answers, the consumer does not.
                        self.messages = None;
                        self.failures = 0;
                        continue;
                    }
                    Vec::new()
                }
            };
            if lost_consumer {
                self.messages = None;
                self.failures = self.failures.saturating_add(1).min(4);
            } else {
                self.failures = 0;
            }
            let batch = self.take(raw);
            if !batch.is_empty() {
                return Some((Ok(batch), self));
            }
            if let Some(e) = self.pending_error.take() {
                return Some((Err(e), self));
            }
        }
    }
}
