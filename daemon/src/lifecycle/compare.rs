//! Comparing two view versions at one log position while both keep running,
//! and the cutover check built on it.
//!
//! **Nothing waits for anyone but itself.** A comparison pins both views as
//! they stand: a *pinned* view ([`PinnedView`]) is one RocksDB snapshot of
//! the views database, its documents exactly at its checkpoint, readable
//! while the view's worker goes on. When the two stand at different
//! positions, the one behind puts a **mark** at the other's position
//! ([`Marks`]): its worker's tail cuts the batch right after that event, and
//! the moment the worker has committed it (before the next batch) it pins
//! the view there and goes on. So only the side that has not reached the
//! position waits, for itself; the one ahead, often the version a name
//! serves, never stops. A batch already handed to the worker when the mark
//! was put may carry it past the position: then it is pinned as it stands
//! and the other side is the one behind. The documents are compared from the
//! two pins, on a blocking thread, while both views tail on.
//!
//! **A comparison ends with its reason.** Its wait is bounded (`wait`,
//! `504 no_common_position`), and ends at once when either side's worker
//! stops: retired (`view_retired`), failed (`view_failed`), or the daemon
//! stopping (`503 shutting_down`). Comparisons do not wait for one another.
//!
//! Only caught-up versions are compared (ready, active, standby): a warming
//! one could take its whole replay to get there, a failed one never moves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::worker::Progress;
use super::{Inner, Lifecycle, LifecycleError, Resolved, ViewState, now_millis};
use crate::store::{EventBatches, Position, RecordedEvent};
use crate::views::diff::{Compared, DiffOptions, DiffReport, PinnedView};
use crate::views::{ViewId, ViewStore};

/// Examples of each kind a cutover check keeps (in the registry, for
/// `kiln status`, `/views` and the status page).
pub const CHECK_EXAMPLES: usize = 3;
/// Fields per changed document a cutover check keeps.
const CHECK_FIELDS: usize = 5;
/// Longest a cutover check waits for the two versions to meet.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// Where a cutover check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// Being compared.
    Pending,
    /// Same documents at `position`.
    Identical,
    /// The documents differ (see `summary`).
    Different,
    /// The comparison could not be taken (see `error`): the version waits
    /// for an operator.
    Error,
}

/// A ready version's documents compared with the active version's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CutoverCheck {
    /// The active version it was compared with.
    pub against: String,
    pub result: CheckResult,
    /// When it was asked for, or finished (ms since the epoch).
    pub at: u64,
    /// Counts and a few examples (A = `against`, B = this version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<DiffReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CutoverCheck {
    pub(super) fn pending(against: &ViewId, now: u64) -> Self {
        CutoverCheck {
            against: against.to_string(),
            result: CheckResult::Pending,
            at: now,
            summary: None,
            error: None,
        }
    }

    pub(super) fn done(against: &ViewId, outcome: &Result<DiffReport, String>, now: u64) -> Self {
        let (result, summary, error) = match outcome {
            Ok(r) if r.identical() => (
                CheckResult::Identical,
                Some(r.trimmed(CHECK_EXAMPLES, CHECK_FIELDS)),
                None,
            ),
            Ok(r) => (
                CheckResult::Different,
                Some(r.trimmed(CHECK_EXAMPLES, CHECK_FIELDS)),
                None,
            ),
            Err(e) => (CheckResult::Error, None, Some(e.clone())),
        };
        CutoverCheck {
            against: against.to_string(),
            result,
            at: now,
            summary,
            error,
        }
    }
}

/// Two versions that did not meet at one position in time.
#[derive(Debug, thiserror::Error)]
#[error("{a} (at {a_at}) and {b} (at {b_at}) did not meet at position {target} within {millis} ms")]
pub struct Unmet {
    pub a: ViewId,
    pub a_at: Position,
    pub b: ViewId,
    pub b_at: Position,
    pub target: Position,
    pub millis: u64,
}

/// Two versions compared (see [`Lifecycle::diff`]).
#[derive(Clone, Debug)]
pub struct Diff {
    pub a: Resolved,
    pub b: Resolved,
    pub report: DiffReport,
    /// How long the views took to meet at the common position.
    pub waited: Duration,
    /// How long the comparison itself took (snapshot to report).
    pub took: Duration,
}

/// What became of a mark (see [`Marks`]).
pub(super) enum Reached {
    /// The view stood at the first checkpoint at or past the mark's
    /// position, and was pinned there.
    Pinned(PinnedView),
    /// A batch handed to the worker before the mark was put carried the view
    /// past it without stopping: the view is at this checkpoint now.
    Passed(Position),
    /// The views database could not be read to pin the view.
    Unreadable(String),
}

struct Mark {
    id: u64,
    at: Position,
    tx: oneshot::Sender<Reached>,
}

#[derive(Default)]
struct MarkSet {
    /// The worker has stopped: no mark is taken any more.
    closed: bool,
    next_id: u64,
    pending: Vec<Mark>,
}

/// The marks on one physical view (kept in its worker's `Progress`): the
/// positions where comparisons and digests want it pinned. Its worker's tail
/// cuts a batch right after the first event at or past each mark, and the
/// worker pins the view the moment it has committed that batch (before the
/// next one), then goes on: nothing waits for anyone. When the worker stops
/// (retired, failed, dropped, shut down), every mark is answered at once.
pub(super) struct Marks {
    set: Mutex<MarkSet>,
    /// `true` once the worker has stopped.
    gone: watch::Sender<bool>,
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            set: Mutex::default(),
            gone: watch::Sender::new(false),
        }
    }
}

/// The view's worker has stopped: it will stand at no new position.
#[derive(Debug)]
pub(super) struct Gone;

/// A mark put and not answered yet; dropping it takes the mark away.
pub(super) struct Waiting {
    marks: Arc<Marks>,
    id: u64,
    rx: oneshot::Receiver<Reached>,
}

impl Waiting {
    async fn reached(&mut self) -> Result<Reached, Gone> {
        (&mut self.rx).await.map_err(|_| Gone)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.marks.lock().pending.retain(|m| m.id != self.id);
    }
}

/// Closes the marks of a worker when dropped (however its task ends).
pub(super) struct CloseOnDrop(pub(super) Arc<Marks>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Marks {
    fn lock(&self) -> std::sync::MutexGuard<'_, MarkSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for the view pinned where it first stands at or past `at`.
    fn put(self: &Arc<Self>, at: Position) -> Result<Waiting, Gone> {
        let mut set = self.lock();
        if set.closed {
            return Err(Gone);
        }
        let (tx, rx) = oneshot::channel();
        set.next_id += 1;
        let id = set.next_id;
        set.pending.push(Mark { id, at, tx });
        Ok(Waiting {
            marks: self.clone(),
            id,
            rx,
        })
    }

    /// Marks not answered yet (comparisons and digests waiting).
    pub(super) fn awaited(&self) -> usize {
        self.lock().pending.len()
    }

    /// Resolves once the worker has stopped.
    pub(super) fn gone(&self) -> watch::Receiver<bool> {
        self.gone.subscribe()
    }

    /// How many of `pending` (the events after position `last`, in order)
    /// the tail hands over now: up to and including the first event at or
    /// past the nearest mark ahead of `last`, else all of them.
    fn cut_at(&self, last: Position, pending: &[RecordedEvent]) -> usize {
        self.lock()
            .pending
            .iter()
            .filter(|m| m.at > last)
            .map(|m| pending.partition_point(|e| e.position < m.at) + 1)
            .filter(|n| *n <= pending.len())
            .min()
            .unwrap_or(pending.len())
    }

    /// The worker committed `applied` (those after `before`) and its view
    /// stands at `after`: the marks it reached are answered, with the view
    /// pinned now when `after` is the first event at or past the mark.
    pub(super) fn committed(
        &self,
        views: &ViewStore,
        view: &ViewId,
        before: Position,
        applied: &[&[RecordedEvent]],
        after: Position,
    ) {
        let mut set = self.lock();
        if set.pending.iter().all(|m| m.at > after) {
            return;
        }
        let mut pinned: Option<Result<PinnedView, String>> = None;
        let (reached, waiting): (Vec<Mark>, Vec<Mark>) = std::mem::take(&mut set.pending)
            .into_iter()
            .partition(|m| m.at <= after);
        set.pending = waiting;
        for m in reached {
            let first = applied
                .iter()
                .copied()
                .flatten()
                .find(|e| e.position > before && e.position >= m.at)
                .map(|e| e.position);
            let answer = if before < m.at && first == Some(after) {
                match pinned.get_or_insert_with(|| views.pin(view).map_err(|e| e.to_string())) {
                    Ok(p) => Reached::Pinned(p.clone()),
                    Err(e) => Reached::Unreadable(e.clone()),
                }
            } else {
                Reached::Passed(after)
            };
            let _ = m.tx.send(answer);
        }
    }

    /// The worker stops: every mark is answered ([`Gone`]) and none is
    /// taken any more.
    pub(super) fn close(&self) {
        let dropped = {
            let mut set = self.lock();
            set.closed = true;
            std::mem::take(&mut set.pending)
        };
        drop(dropped);
        self.gone.send_replace(true);
    }
}

/// `tail`, cut right after the first event at or past each mark on the view
/// (`from`: the first position it reads). It never waits: a cut batch's
/// rest is the next one.
fn cut(tail: EventBatches, marks: Arc<Marks>, from: Position) -> EventBatches {
    let state = (tail, marks, Vec::new(), from.saturating_sub(1));
    futures::stream::unfold(state, |(mut tail, marks, mut pending, last)| async move {
        while pending.is_empty() {
            match tail.next().await {
                None => return None,
                Some(Err(e)) => return Some((Err(e), (tail, marks, pending, last))),
                Some(Ok(batch)) => pending = batch,
            }
        }
        let rest = pending.split_off(marks.cut_at(last, &pending));
        let out = std::mem::replace(&mut pending, rest);
        let last = out.last().map_or(last, |e: &RecordedEvent| e.position);
        Some((Ok(out), (tail, marks, pending, last)))
    })
    .boxed()
}

impl Inner {
    /// The log from `from` for a view's worker, read `ahead` bytes ahead
    /// (see `worker::ahead`), cut at the marks on it.
    pub(super) fn tail(
        &self,
        marks: &Arc<Marks>,
        from: Position,
        ahead: usize,
        gate: Option<super::worker::ahead::Gate>,
    ) -> EventBatches {
        let read = super::worker::ahead::ahead(self.store.tail(from), ahead, gate);
        cut(read, marks.clone(), from)
    }

    /// The progress of the version `r` reads, if it is caught up and its
    /// worker runs (else why not).
    fn live(&self, r: &Resolved) -> Result<Arc<Progress>, LifecycleError> {
        let st = self.lock();
        let e = st
            .registry
            .entries
            .get(&r.version)
            .ok_or_else(|| LifecycleError::UnknownView {
                spec: r.version.to_string(),
            })?;
        let not = || LifecycleError::NotComparable {
            id: r.version.clone(),
            state: e.state,
        };
        if !matches!(
            e.state,
            ViewState::Ready | ViewState::Active | ViewState::Standby
        ) || !st.workers.contains_key(&r.physical)
        {
            return Err(not());
        }
        st.progress.get(&r.physical).cloned().ok_or_else(not)
    }

    /// Why the view `r` reads stopped tailing: retired, failed, the daemon
    /// stopping, or whatever its state says now.
    fn gone_reason(&self, r: &Resolved) -> LifecycleError {
        if self.check_running().is_err() {
            return LifecycleError::ShuttingDown;
        }
        let st = self.lock();
        match st.registry.entries.get(&r.version) {
            None => LifecycleError::UnknownView {
                spec: r.version.to_string(),
            },
            Some(e) if e.state == ViewState::Retired => LifecycleError::Retired {
                id: r.version.clone(),
            },
            Some(e) if e.state == ViewState::Failed => LifecycleError::Failed {
                id: r.version.clone(),
                reason: e.last_error.clone().unwrap_or_else(|| "failed".into()),
            },
            Some(e) => LifecycleError::NotComparable {
                id: r.version.clone(),
                state: e.state,
            },
        }
    }

    /// The physical view `view` pinned where it first stands at or past
    /// `at`, waiting for its worker to get there (the worker waits for no
    /// one). [`Gone`] when the worker stops first.
    pub(super) async fn reach(
        &self,
        progress: &Progress,
        view: &ViewId,
        at: Position,
    ) -> Result<Reached, Gone> {
        let mut waiting = progress.marks.put(at)?;
        if progress.checkpoint() < at {
            return waiting.reached().await;
        }
        // There already (or past): as it stands now.
        drop(waiting);
        Ok(match self.views.pin(view) {
            Ok(p) if p.position() == at => Reached::Pinned(p),
            Ok(p) => Reached::Passed(p.position()),
            Err(e) => Reached::Unreadable(e.to_string()),
        })
    }

    /// Compares `a` and `b` at one position (see the module docs).
    pub(super) async fn compare(
        self: &Arc<Self>,
        a: Resolved,
        b: Resolved,
        opts: DiffOptions,
        wait: Duration,
    ) -> Result<Diff, LifecycleError> {
        let started = Instant::now();
        let (progress_a, progress_b) = (self.live(&a)?, self.live(&b)?);
        let (mut gone_a, mut gone_b) = (progress_a.marks.gone(), progress_b.marks.gone());
        let mut shutdown = self.shutdown_tx.subscribe();
        // A side's version retired while its view tails on for another
        // version (an alias retired, its view still read): ended too.
        let mut registry = self.registry_tx.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        // Both as they stand now; then the one behind is pinned where it
        // reaches the other's position (the one ahead goes on meanwhile).
        let mut pin_a = self.views.pin(&a.physical)?;
        let mut pin_b = if a.physical == b.physical {
            pin_a.clone()
        } else {
            self.views.pin(&b.physical)?
        };
        while pin_a.position() != pin_b.position() {
            let a_behind = pin_a.position() < pin_b.position();
            let (behind, progress, target) = if a_behind {
                (&a, &progress_a, pin_b.position())
            } else {
                (&b, &progress_b, pin_a.position())
            };
            let unmet = || {
                LifecycleError::NoCommonPosition(Box::new(Unmet {
                    a: a.version.clone(),
                    a_at: progress_a.checkpoint(),
                    b: b.version.clone(),
                    b_at: progress_b.checkpoint(),
                    target,
                    millis: wait.as_millis() as u64,
                }))
            };
            let reached = tokio::select! {
                r = self.reach(progress, &behind.physical, target) => {
                    r.map_err(|Gone| self.gone_reason(behind))?
                }
                _ = gone_a.wait_for(|g| *g) => return Err(self.gone_reason(&a)),
                _ = gone_b.wait_for(|g| *g) => return Err(self.gone_reason(&b)),
                _ = shutdown.wait_for(|s| *s) => return Err(LifecycleError::ShuttingDown),
                _ = tokio::time::sleep_until(deadline) => return Err(unmet()),
                _ = registry.changed() => {
                    for side in [&a, &b] {
                        if self.live(side).is_err() {
                            return Err(self.gone_reason(side));
                        }
                    }
                    continue;
                }
            };
            let pinned = match reached {
                Reached::Pinned(p) => p,
                // Past the target: as it stands now, and the other side
                // is the one behind.
                Reached::Passed(_) => self.views.pin(&behind.physical)?,
                Reached::Unreadable(e) => {
                    return Err(LifecycleError::Internal(format!(
                        "pinning {} at {target}: {e}",
                        behind.physical
                    )));
                }
            };
            if a_behind {
                pin_a = pinned;
            } else {
                pin_b = pinned;
            }
        }
        let waited = started.elapsed();
        // At the lowest CPU priority: the live views go first.
        let compared = crate::background::at_lowest_priority("kiln-compare", move || {
            let t = Instant::now();
            pin_a.compare(&pin_b, &opts).map(|c| (c, t.elapsed()))
        });
        let (compared, took) = compared.await.ok_or_else(|| {
            LifecycleError::Internal("a comparison's thread did not answer".into())
        })??;
        match compared {
            Compared::Report(report) => Ok(Diff {
                a,
                b,
                report,
                waited,
                took,
            }),
            Compared::Apart { a: x, b: y } => Err(LifecycleError::Internal(format!(
                "two views pinned at one position read {x} and {y}"
            ))),
        }
    }

    /// Runs a cutover check [`machine::Registry::cutover_plan`] asked for, in
    /// the background, and hands its result to [`machine::Registry::compared`].
    pub(super) fn start_check(
        self: &Arc<Self>,
        candidate: ViewId,
        against: ViewId,
        promote_if_identical: bool,
    ) {
        let inner = self.clone();
        let task = tokio::spawn(async move {
            let resolved = {
                let st = inner.lock();
                let r = |id: &ViewId| {
                    st.registry.entries.get(id).map(|e| Resolved {
                        version: id.clone(),
                        physical: e.physical().clone(),
                        stale: e.serving_stale,
                    })
                };
                r(&against).zip(r(&candidate))
            };
            let outcome = match resolved {
                None => Err("a version was removed before the comparison".to_string()),
                Some((a, b)) => {
                    let opts = DiffOptions {
                        prefix: Vec::new(),
                        examples: CHECK_EXAMPLES,
                    };
                    inner
                        .compare(a, b, opts, CHECK_WAIT)
                        .await
                        .map(|d| d.report)
                        .map_err(|e| e.to_string())
                }
            };
            match &outcome {
                Ok(r) => tracing::info!(
                    view = %candidate, against = %against, position = r.position,
                    only_in_active = r.only_in_a, only_in_new = r.only_in_b, changed = r.changed,
                    "cutover check: {}", if r.identical() { "identical" } else { "the documents differ" }
                ),
                Err(e) => {
                    tracing::warn!(view = %candidate, against = %against, "cutover check could not be taken: {e}")
                }
            }
            let _ops = inner.ops.lock().await;
            let mut st = inner.lock();
            let before = st.registry.clone();
            let promoted = st.registry.compared(
                &candidate,
                &against,
                outcome,
                promote_if_identical,
                now_millis(),
            );
            if let Err(e) = inner.commit(&mut st, before) {
                tracing::error!(view = %candidate, "recording the cutover check: {e}");
                return;
            }
            if let Some(previous) = promoted {
                super::log_cutover(&candidate, previous.as_ref(), "auto-if-identical cutover");
            }
        });
        self.push_background(task);
    }
}

impl Lifecycle {
    /// Compares the documents of versions `a` and `b` (each a bare name, an
    /// exact id or a semver requirement; aliases read their view) at one log
    /// position, without stopping either: the one ahead is pinned as it
    /// stands, the one behind where it reaches that position (waiting at
    /// most `wait` for it), and the comparison reads the two pins. `409
    /// not_comparable` for a version that is not caught up and live; a side
    /// retired, failed or stopped meanwhile ends it at once with that reason.
    pub async fn diff(
        &self,
        a: &str,
        b: &str,
        opts: DiffOptions,
        wait: Duration,
    ) -> Result<Diff, LifecycleError> {
        self.inner.check_running()?;
        let (a, b) = (self.resolve_version(a)?, self.resolve_version(b)?);
        self.inner.compare(a, b, opts, wait).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: Position) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::nil(),
            stream: crate::store::StreamId::new("s-1").expect("stream"),
            event_type: "E".into(),
            version: position,
            position,
            timestamp: 0,
            metadata: Default::default(),
            tags: Vec::new(),
            data: b"{}".to_vec().into(),
        }
    }

    fn positions(batch: Vec<RecordedEvent>) -> Vec<Position> {
        batch.iter().map(|e| e.position).collect()
    }

    /// A marked tail cuts a batch right after the first event at or past
    /// each mark (a position that is no event's, such as a tag marker's,
    /// included) and never waits: the rest is the next batch at once.
    #[tokio::test]
    async fn a_marked_tail_is_cut_after_the_first_event_at_or_past_each_mark_and_never_waits() {
        // Position 4 is no event's (a tag marker on JetStream).
        let batches: Vec<Result<Vec<RecordedEvent>, crate::store::StoreError>> = vec![
            Ok([1, 2, 3, 5, 6, 7].into_iter().map(event).collect()),
            Ok(vec![event(8)]),
        ];
        let marks = Arc::new(Marks::default());
        let _at_4 = marks.put(4).expect("a live view takes marks");
        let _at_6 = marks.put(6).expect("a live view takes marks");
        let mut tail = cut(futures::stream::iter(batches).boxed(), marks.clone(), 1);
        let mut next = async || {
            let b = tokio::time::timeout(Duration::from_secs(1), tail.next()).await;
            positions(b.expect("never waits").expect("a batch").expect("ok"))
        };
        assert_eq!(next().await, [1, 2, 3, 5]);
        assert_eq!(next().await, [6]);
        assert_eq!(next().await, [7]);
        assert_eq!(next().await, [8]);
    }

    /// A mark dropped by its comparison cuts nothing any more, and a closed
    /// view (its worker stopped) answers every mark and takes none.
    #[tokio::test]
    async fn a_stopped_worker_answers_its_marks_at_once() {
        let marks = Arc::new(Marks::default());
        let dropped = marks.put(2).expect("mark");
        drop(dropped);
        assert_eq!(marks.cut_at(0, &[event(1), event(2), event(3)]), 3);
        let mut waiting = marks.put(5).expect("mark");
        let mut gone = marks.gone();
        let closer = CloseOnDrop(marks.clone());
        drop(closer);
        assert!(matches!(waiting.reached().await, Err(Gone)));
        assert!(*gone.wait_for(|g| *g).await.expect("gone"));
        assert!(marks.put(6).is_err());
    }
}
