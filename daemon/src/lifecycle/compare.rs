//! Comparing two view versions at one log position while both keep running,
//! and the cutover check built on it.
//!
//! **The faster worker waits at the common position.** A comparison picks
//! the target position `P`, the higher of the two views' checkpoints, and
//! puts a **hold** at `P` on both views' tails: a held tail hands its worker
//! the events up to `P` and keeps the rest until the hold is lifted (a batch
//! that straddles `P` is cut there). The view at `P` stops there; the other
//! catches up to `P` and stops too. Then one RocksDB snapshot of the views
//! database is taken; both checkpoints are read from it, and if they are
//! both `P` the holds are lifted at once and the documents are compared from
//! the snapshot while the workers go on. A batch already handed over when
//! the hold was put can carry a view past `P`: then `P` moves up to it and
//! the wait repeats. The wait is bounded (`wait`); the workers are held only
//! while the slower one catches up (live views: a batch or so), never while
//! the comparison reads. Comparisons run one at a time.
//!
//! Only caught-up versions are compared (ready, active, standby): a warming
//! one would hold the live view for its whole replay, a failed one never
//! moves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Inner, Lifecycle, LifecycleError, Resolved, ViewState, now_millis};
use crate::store::{EventBatches, Position};
use crate::views::ViewId;
use crate::views::diff::{Compared, DiffOptions, DiffReport};

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

/// The holds on view tails: per physical view, the position its worker may
/// not go past (`None`: free).
#[derive(Default)]
pub(super) struct Holds(Mutex<HashMap<ViewId, watch::Sender<Option<Position>>>>);

impl Holds {
    fn sender(&self, view: &ViewId) -> watch::Sender<Option<Position>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(view.clone())
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    fn set(&self, view: &ViewId, at: Option<Position>) {
        self.sender(view).send_replace(at);
    }
}

/// Lifts the holds it put when dropped (a comparison that ends, fails or is
/// abandoned by its client never leaves a view held).
pub(super) struct HoldGuard<'a> {
    pub(super) holds: &'a Holds,
    pub(super) views: Vec<ViewId>,
}

impl HoldGuard<'_> {
    pub(super) fn hold(&self, at: Position) {
        for v in &self.views {
            self.holds.set(v, Some(at));
        }
    }

    fn release(&self) {
        for v in &self.views {
            self.holds.set(v, None);
        }
    }
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// `tail`, cut at the hold on `view`: events past the held position stay
/// here until the hold is lifted or moved past them.
fn held(tail: EventBatches, hold: watch::Receiver<Option<Position>>) -> EventBatches {
    let state = (tail, hold, Vec::new());
    futures::stream::unfold(state, |(mut tail, mut hold, mut pending)| async move {
        loop {
            if !pending.is_empty() {
                let limit = *hold.borrow_and_update();
                let cut = match limit {
                    Some(p) => {
                        pending.partition_point(|e: &crate::store::RecordedEvent| e.position <= p)
                    }
                    None => pending.len(),
                };
                if cut > 0 {
                    let rest = pending.split_off(cut);
                    let out = std::mem::replace(&mut pending, rest);
                    return Some((Ok(out), (tail, hold, pending)));
                }
                if hold.changed().await.is_err() {
                    // The holds are gone (shutting down): nothing holds.
                    let out = std::mem::take(&mut pending);
                    return Some((Ok(out), (tail, hold, pending)));
                }
                continue;
            }
            match tail.next().await {
                None => return None,
                Some(Err(e)) => return Some((Err(e), (tail, hold, pending))),
                Some(Ok(batch)) => pending = batch,
            }
        }
    })
    .boxed()
}

impl Inner {
    /// The log from `from` for `view`'s worker, cut at any hold on `view`.
    pub(super) fn tail(&self, view: &ViewId, from: Position) -> EventBatches {
        held(self.store.tail(from), self.holds.sender(view).subscribe())
    }

    /// Compares `a` and `b` at one position (see the module docs).
    pub(super) async fn compare(
        self: &Arc<Self>,
        a: Resolved,
        b: Resolved,
        opts: DiffOptions,
        wait: Duration,
    ) -> Result<Diff, LifecycleError> {
        let _one_at_a_time = self.compare_lock.lock().await;
        let started = Instant::now();
        let (progress_a, progress_b) = {
            let st = self.lock();
            let live = |r: &Resolved| {
                let e = st.registry.entries.get(&r.version).ok_or_else(|| {
                    LifecycleError::UnknownView {
                        spec: r.version.to_string(),
                    }
                })?;
                if !matches!(
                    e.state,
                    ViewState::Ready | ViewState::Active | ViewState::Standby
                ) || !st.workers.contains_key(&r.physical)
                {
                    return Err(LifecycleError::NotComparable {
                        id: r.version.clone(),
                        state: e.state,
                    });
                }
                st.progress
                    .get(&r.physical)
                    .cloned()
                    .ok_or_else(|| LifecycleError::NotComparable {
                        id: r.version.clone(),
                        state: e.state,
                    })
            };
            (live(&a)?, live(&b)?)
        };
        let guard = HoldGuard {
            holds: &self.holds,
            views: vec![a.physical.clone(), b.physical.clone()],
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx_a = progress_a.checkpoint_tx.subscribe();
        let mut rx_b = progress_b.checkpoint_tx.subscribe();
        let mut target = progress_a.checkpoint().max(progress_b.checkpoint());
        guard.hold(target);
        loop {
            // Wait until both views are at the target (moving it up when a
            // batch handed over before the hold carried one past it).
            loop {
                let (at_a, at_b) = (*rx_a.borrow_and_update(), *rx_b.borrow_and_update());
                if at_a.max(at_b) > target {
                    target = at_a.max(at_b);
                    guard.hold(target);
                    continue;
                }
                if at_a == target && at_b == target {
                    break;
                }
                for r in [&a, &b] {
                    if let Some(reason) = self.failure_of(&r.physical) {
                        return Err(LifecycleError::Failed {
                            id: r.physical.clone(),
                            reason,
                        });
                    }
                }
                let timeout = || {
                    LifecycleError::NoCommonPosition(Box::new(Unmet {
                        a: a.version.clone(),
                        a_at: at_a,
                        b: b.version.clone(),
                        b_at: at_b,
                        target,
                        millis: wait.as_millis() as u64,
                    }))
                };
                tokio::select! {
                    r = rx_a.changed() => r.map_err(|_| LifecycleError::ShuttingDown)?,
                    r = rx_b.changed() => r.map_err(|_| LifecycleError::ShuttingDown)?,
                    _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
                }
            }
            let waited = started.elapsed();
            let views = self.views.clone();
            let (pa, pb, o) = (a.physical.clone(), b.physical.clone(), opts.clone());
            let (lift_tx, lift_rx) = tokio::sync::oneshot::channel::<bool>();
            let compare = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                views
                    .compare(&pa, &pb, &o, |x, y| {
                        let _ = lift_tx.send(x == y);
                    })
                    .map(|c| (c, t.elapsed()))
            });
            // Lift the holds as soon as the snapshot is taken at one position.
            if lift_rx.await.unwrap_or(false) {
                guard.release();
            }
            let (compared, took) = compare
                .await
                .map_err(|e| LifecycleError::Internal(format!("a comparison panicked: {e}")))??;
            match compared {
                Compared::Report(report) => {
                    return Ok(Diff {
                        a,
                        b,
                        report,
                        waited,
                        took,
                    });
                }
                Compared::Apart { a: x, b: y } => {
                    target = target.max(x).max(y);
                    guard.hold(target);
                }
            }
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
    /// position, without stopping either: the faster one waits at the
    /// common position (at most `wait`) while the other catches up, then
    /// both go on while the comparison reads one snapshot. `409
    /// not_comparable` for a version that is not caught up and live.
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
    use crate::store::RecordedEvent;

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

    /// A held tail hands over events up to the hold, cutting a batch that
    /// straddles it, and the rest once the hold is lifted.
    #[tokio::test]
    async fn a_held_tail_stops_at_the_hold_and_goes_on_when_it_is_lifted() {
        let batches: Vec<Result<Vec<RecordedEvent>, crate::store::StoreError>> =
            vec![Ok((1..=5).map(event).collect()), Ok(vec![event(6)])];
        let (tx, rx) = watch::channel(Some(3));
        let mut tail = held(futures::stream::iter(batches).boxed(), rx);
        let first = tail.next().await.expect("a batch").expect("ok");
        assert_eq!(
            first.iter().map(|e| e.position).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let waiting = tokio::time::timeout(Duration::from_millis(50), tail.next()).await;
        assert!(waiting.is_err(), "nothing past the hold");
        tx.send_replace(Some(4));
        let next = tail.next().await.expect("a batch").expect("ok");
        assert_eq!(next.iter().map(|e| e.position).collect::<Vec<_>>(), [4]);
        tx.send_replace(None);
        let rest = tail.next().await.expect("a batch").expect("ok");
        assert_eq!(rest.iter().map(|e| e.position).collect::<Vec<_>>(), [5]);
        let last = tail.next().await.expect("a batch").expect("ok");
        assert_eq!(last[0].position, 6);
    }
}
