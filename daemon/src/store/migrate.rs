//! Copying a log from one store to another (`kiln migrate --to-jetstream`):
//! from one machine to a cluster.
//!
//! The source is read in position order and every event is appended to the
//! target with what projections see unchanged: its stream and version (each
//! append expects `Exact(version - 1)`, so the target's own optimistic
//! concurrency check, the server's guard on JetStream, proves the version),
//! id, type, data, metadata, tags and commit time ([`NewEvent::timestamp`],
//! carried on JetStream as `Kiln-Timestamp`). Runs of consecutive events of
//! one stream go in one append (atomic on both backends), within the limits,
//! when they carry tags (the tag markers go with them) or are long; short
//! untagged runs go one append per event, much faster on JetStream (see
//! [`MIN_BATCH`]). Either way the copy is the same, event by event.
//! Positions are the target's own: JetStream sequences have gaps (tag
//! markers), the order is the same.
//!
//! **Resuming.** Before copying, the target's events are read from its start
//! and compared field by field with the source's first events: a target that
//! holds a prefix of the source resumes after it (so an interrupted copy,
//! even one whose last append was stored but not acknowledged, continues
//! without duplicates); a target holding anything else is refused, naming the
//! first event that differs. Nothing is written before that check passes.

use std::time::{Duration, Instant};

use futures::StreamExt;

use super::embedded::{EmbeddedStore, scan_log};
use super::{
    AppendRequest, EventStore, ExpectedVersion, Limits, MAX_APPEND_MESSAGES, NewEvent, Position,
    RecordedEvent, StoreError, StreamId,
};

/// Events read from the source at a time.
const READ_CHUNK: usize = 4096;

/// Shortest run of untagged events of one stream copied in one append. A
/// JetStream atomic batch costs a server round of about 20 ms whatever its
/// size (measured with nats-server 2.12 on loopback: 0.2 ms for a single
/// guarded publish), so shorter runs go one guarded append per event: the
/// copy ends up identical, event by event. Tagged events always go through
/// one append with their tag markers.
const MIN_BATCH: usize = 64;

/// What can stop a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the target already holds other events: its event #{index} (position {target_position}) \
         is {theirs}, but the source's event #{index} (position {source_position}) is {ours}: \
         {field} differs. kiln migrate only continues a target that holds a prefix of the \
         source; use another stream (--nats-stream) or an empty one"
    )]
    Mismatch {
        index: u64,
        source_position: Position,
        target_position: Position,
        ours: String,
        theirs: String,
        field: &'static str,
    },
    #[error(
        "the target holds more events than the source's {source_events}: it is not a copy \
         of this log (its event #{} is {first_extra})", source_events + 1
    )]
    TargetLonger {
        source_events: u64,
        first_extra: String,
    },
    #[error("event {id} at position {position} of stream '{stream}' cannot be copied: {reason}")]
    Uncopyable {
        position: Position,
        stream: String,
        id: uuid::Uuid,
        reason: String,
    },
    #[error(
        "appending the source's events at positions {first}..={last} (stream '{stream}', \
         versions from {version}) to the target failed: {source}"
    )]
    Append {
        first: Position,
        last: Position,
        stream: StreamId,
        version: u64,
        #[source]
        source: StoreError,
    },
    #[error("{what} failed: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
}

/// How far a migration got; passed to the progress callback and returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Events in the source log.
    pub source_events: u64,
    /// Events the target already held (verified) when this run started.
    pub already_copied: u64,
    /// Events this run appended.
    pub copied: u64,
    /// The target's position of the last event copied (or verified).
    pub target_head: Position,
}

impl Progress {
    /// Events of the source now in the target.
    pub fn done(&self) -> u64 {
        self.already_copied + self.copied
    }
}

/// Options of [`migrate`].
#[derive(Clone, Copy, Debug)]
pub struct MigrateOptions {
    /// Stop after appending this many events (testing an interrupted run).
    pub limit: Option<u64>,
    /// Call the progress callback at most this often.
    pub report_every: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            limit: None,
            report_every: Duration::from_secs(1),
        }
    }
}

/// Copies `source` into `target` (see the module docs); `progress` is called
/// after the verification and then every `report_every` while copying.
pub async fn migrate(
    source: &EmbeddedStore,
    target: &dyn EventStore,
    target_limits: &Limits,
    options: MigrateOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<Progress, MigrateError> {
    let store = |what| move |source| MigrateError::Store { what, source };
    let source_head = source
        .head()
        .await
        .map_err(store("reading the source's head"))?;
    let verified = verify_prefix(source, target, source_head).await?;
    let mut p = Progress {
        source_events: source_head,
        already_copied: verified.events,
        copied: 0,
        target_head: verified.target_head,
    };
    progress(&p);
    let mut next = verified.events + 1;
    let mut last_report = Instant::now();
    let mut run: Vec<RecordedEvent> = Vec::new();
    'copy: while next <= source_head {
        let chunk = blocking_scan(source, next).await?;
        if chunk.is_empty() {
            break;
        }
        for ev in chunk {
            next = ev.position + 1;
            if let Some(limit) = options.limit
                && p.copied + run.len() as u64 >= limit
            {
                break 'copy;
            }
            if !run.is_empty() && !fits(&run, &ev, target_limits) {
                p.target_head = append_run(target, &run).await?;
                p.copied += run.len() as u64;
                run.clear();
                if last_report.elapsed() >= options.report_every {
                    progress(&p);
                    last_report = Instant::now();
                }
            }
            run.push(ev);
        }
    }
    if !run.is_empty() {
        p.target_head = append_run(target, &run).await?;
        p.copied += run.len() as u64;
    }
    progress(&p);
    Ok(p)
}

async fn blocking_scan(
    source: &EmbeddedStore,
    from: Position,
) -> Result<Vec<RecordedEvent>, MigrateError> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || scan_log(&source, from, READ_CHUNK))
        .await
        .map_err(|e| MigrateError::Store {
            what: "reading the source log",
            source: StoreError::backend("reading the source log", e),
        })?
        .map_err(|source| MigrateError::Store {
            what: "reading the source log",
            source,
        })
}

/// Can `ev` join `run` (events of one stream, consecutive versions) in one
/// append within the limits?
fn fits(run: &[RecordedEvent], ev: &RecordedEvent, limits: &Limits) -> bool {
    let Some(last) = run.last() else {
        return true;
    };
    if ev.stream != last.stream || ev.version != last.version + 1 {
        return false;
    }
    if run.len() + 1 > limits.max_events_per_append {
        return false;
    }
    let bytes = |e: &RecordedEvent| {
        e.data.len()
            + e.metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    };
    let total: usize = run.iter().map(bytes).sum::<usize>() + bytes(ev);
    if total > limits.max_append_bytes {
        return false;
    }
    let mut tags: std::collections::HashSet<&str> = run
        .iter()
        .flat_map(|e| e.tags.iter().map(String::as_str))
        .collect();
    tags.extend(ev.tags.iter().map(String::as_str));
    run.len() + 1 + tags.len() <= MAX_APPEND_MESSAGES
}

/// Appends `run` (one stream, consecutive versions) expecting the stream to
/// be just before its first version; returns the target position of its last.
async fn append_run(
    target: &dyn EventStore,
    run: &[RecordedEvent],
) -> Result<Position, MigrateError> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(0);
    };
    // A stream id an older embedded store accepted but no subject can carry.
    let stream = StreamId::new(first.stream.as_str()).map_err(|e| MigrateError::Uncopyable {
        position: first.position,
        stream: first.stream.to_string(),
        id: first.id,
        reason: e.to_string(),
    })?;
    let events = run
        .iter()
        .map(|e| NewEvent {
            id: e.id,
            event_type: e.event_type.clone(),
            data: e.data.clone(),
            metadata: e.metadata.clone(),
            tags: e.tags.clone(),
            timestamp: Some(e.timestamp),
        })
        .collect();
    let events: Vec<NewEvent> = events;
    let batched = events.len() >= MIN_BATCH || events.iter().any(|e| !e.tags.is_empty());
    if batched {
        return append_with_retry(target, &stream, first, last, events).await;
    }
    let mut position = 0;
    for (ev, original) in events.into_iter().zip(run) {
        position = append_with_retry(target, &stream, original, original, vec![ev]).await?;
    }
    Ok(position)
}

/// One append of `events` (the source's `first..=last`), expecting the
/// stream just before `first`'s version; retried while the target is briefly
/// unavailable.
async fn append_with_retry(
    target: &dyn EventStore,
    stream: &StreamId,
    first: &RecordedEvent,
    last: &RecordedEvent,
    events: Vec<NewEvent>,
) -> Result<Position, MigrateError> {
    let req = AppendRequest::new(
        stream.clone(),
        ExpectedVersion::Exact(first.version - 1),
        events,
    );
    let mut attempt = 0u32;
    loop {
        match target.append(req.clone()).await {
            Ok(r) => return Ok(r.position),
            Err(e) if e.is_retryable() && attempt < 10 => {
                attempt += 1;
                tracing::warn!(attempt, "retrying an append the target could not take: {e}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(source) => {
                return Err(MigrateError::Append {
                    first: first.position,
                    last: last.position,
                    stream: stream.clone(),
                    version: first.version,
                    source,
                });
            }
        }
    }
}

struct Verified {
    events: u64,
    target_head: Position,
}

/// Reads the target from its start and checks it holds a prefix of the
/// source, event by event.
async fn verify_prefix(
    source: &EmbeddedStore,
    target: &dyn EventStore,
    source_head: Position,
) -> Result<Verified, MigrateError> {
    let target_head = target.head().await.map_err(|source| MigrateError::Store {
        what: "reading the target's head",
        source,
    })?;
    let mut verified = Verified {
        events: 0,
        target_head: 0,
    };
    if target_head == 0 {
        return Ok(verified);
    }
    let mut tail = target.tail(1);
    let mut pending: std::collections::VecDeque<RecordedEvent> = Default::default();
    let mut next_source = 1;
    while verified.target_head < target_head {
        let batch = match tail.next().await {
            Some(b) => b.map_err(|source| MigrateError::Store {
                what: "reading the target's events",
                source,
            })?,
            None => break,
        };
        for theirs in batch {
            if theirs.position > target_head {
                break;
            }
            if pending.is_empty() && next_source <= source_head {
                pending.extend(blocking_scan(source, next_source).await?);
                next_source = pending.back().map_or(source_head + 1, |e| e.position + 1);
            }
            let index = verified.events + 1;
            let Some(ours) = pending.pop_front() else {
                return Err(MigrateError::TargetLonger {
                    source_events: source_head,
                    first_extra: describe(&theirs),
                });
            };
            if let Some(field) = first_difference(&ours, &theirs) {
                return Err(MigrateError::Mismatch {
                    index,
                    source_position: ours.position,
                    target_position: theirs.position,
                    ours: describe(&ours),
                    theirs: describe(&theirs),
                    field,
                });
            }
            verified.events = index;
            verified.target_head = theirs.position;
        }
    }
    Ok(verified)
}

fn describe(e: &RecordedEvent) -> String {
    format!(
        "event {} ({} at version {} of '{}')",
        e.id, e.event_type, e.version, e.stream
    )
}

/// The first field (in the order projections care about) where a copied event
/// differs from its original; positions are the target's own and not compared.
pub fn first_difference(ours: &RecordedEvent, theirs: &RecordedEvent) -> Option<&'static str> {
    if ours.id != theirs.id {
        Some("the event id")
    } else if ours.stream != theirs.stream {
        Some("the stream")
    } else if ours.version != theirs.version {
        Some("the version")
    } else if ours.event_type != theirs.event_type {
        Some("the type")
    } else if ours.timestamp != theirs.timestamp {
        Some("the timestamp")
    } else if ours.metadata != theirs.metadata {
        Some("the metadata")
    } else if ours.tags != theirs.tags {
        Some("the tags")
    } else if ours.data != theirs.data {
        Some("the data")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ev(stream: &str, version: u64, tags: &[&str], data: &str) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::now_v7(),
            stream: StreamId::new(stream).expect("valid"),
            event_type: "T".into(),
            version,
            position: version,
            timestamp: 7,
            metadata: Default::default(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            data: Bytes::from(data.to_string()),
        }
    }

    #[test]
    fn runs_are_one_stream_consecutive_and_within_limits() {
        let limits = Limits {
            max_events_per_append: 3,
            max_append_bytes: 10,
            ..Limits::default()
        };
        let run = vec![ev("a-1", 1, &[], "1"), ev("a-1", 2, &[], "2")];
        assert!(fits(&run, &ev("a-1", 3, &[], "3"), &limits));
        assert!(
            !fits(&run, &ev("a-2", 1, &[], "3"), &limits),
            "another stream"
        );
        assert!(
            !fits(&run, &ev("a-1", 4, &[], "3"), &limits),
            "a version gap"
        );
        assert!(
            !fits(&run, &ev("a-1", 3, &[], "\"123456789\""), &limits),
            "too many bytes"
        );
        let full = vec![run[0].clone(), run[1].clone(), ev("a-1", 3, &[], "3")];
        assert!(
            !fits(&full, &ev("a-1", 4, &[], "4"), &limits),
            "too many events"
        );
    }

    #[test]
    fn differences_name_the_field() {
        let a = ev("a-1", 1, &["t"], "{}");
        let mut b = a.clone();
        b.position = 99;
        assert_eq!(
            first_difference(&a, &b),
            None,
            "positions are the target's own"
        );
        b.timestamp = 8;
        assert_eq!(first_difference(&a, &b), Some("the timestamp"));
        let mut c = a.clone();
        c.tags.clear();
        assert_eq!(first_difference(&a, &c), Some("the tags"));
        let mut d = a.clone();
        d.id = uuid::Uuid::now_v7();
        assert_eq!(first_difference(&a, &d), Some("the event id"));
    }
}
