//! Grouped warm-up: a warming per-stream view applies the log a window at a
//! time with each stream's events together, so the SDK's per-stream form
//! decodes and encodes a stream's document once per call rather than once
//! per event, whatever the log's layout (issue 28).
//!
//! - **Window.** While warming, the worker gathers what the tail hands it
//!   until `warmup_group_mib` of events (a partition worker: its share of
//!   it), or the log's head read when the window began (a partition: the
//!   head its coordinator reads toward), or [`LINGER`] without a batch (the
//!   head may be a message that is not an event), whichever comes first.
//!   While a comparison or a digest waits on the view, each tail batch is a
//!   window of its own (the view must stand where the tail was cut).
//! - **Units.** The window's streams, in order of first appearance, are
//!   packed into units of at most [`CALL_STEPS`] × `warmup_batch` events
//!   (a partition worker: × its share of it; a stream with more
//!   is a unit of its own, applied in several calls); each call hands the
//!   guest its unit's events **in log order**. Calls read what the window's
//!   earlier calls wrote; nothing is committed until the window's last call.
//! - **Commit.** The window's documents and its last position commit in one
//!   write batch; a crash or a stop anywhere before it replays the window.
//! - **Same documents as log order.** Units are applied one after another,
//!   so the order changes only *between* units. The host checks, per window,
//!   that no document is written by one unit and read or written by another,
//!   and that no unit scans in a window of more than one unit
//!   ([`crate::runtime::Projector::apply_unit`]). Then each document's every
//!   touch comes from one unit, in log order, reading only documents no
//!   other unit writes: exactly what log order computes. A window that
//!   fails the check commits nothing and is applied in log order; the view
//!   stops grouping (status `warning` says why) until the worker restarts.
//! - **Failures.** A call that fails (a poison event, a trap, a limit) drops
//!   the window, which is applied again in log order by the usual warming
//!   path: the same event is parked or fails the version, at the same
//!   position, with the same reason, as without grouping.
//! - **Live views first.** The worker waits for live workers to be idle (or
//!   [`super::WARM_MAX_WAIT`]), as a warming step does, then hands calls to
//!   a blocking thread, which runs them one after another until a live
//!   worker is busy, a stop is asked for, or [`SLICE`] has passed.
//! - **Pipelined.** The tail is read a window ahead (`ahead.rs`), so the
//!   next window is read while this one is applied. The window's events are
//!   the tail's batches as they came, never copied. (Smaller first windows,
//!   to start applying sooner, were measured: they cost the live views'
//!   p99 more than they saved, see BENCHMARKS.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Halt, WARM_MAX_WAIT, Worker};
use crate::runtime::{ProjectionError, Ungroupable};
use crate::store::{Position, RecordedEvent};
use crate::views::Slot;

/// How long one hand-off of calls to a blocking thread runs at most (it also
/// ends before any call a live worker would wait behind). Measured with
/// `kiln bench lag`: 10 ms slices held the live views' p99 at 14.8 ms during
/// a warm-up, 1 ms at 6.8 ms (idle 3.1 ms), for 13 % of the warm-up's rate.
const SLICE: std::time::Duration = std::time::Duration::from_millis(1);

/// A grouped call holds this many warming steps' events (`warmup_batch`,
/// 256 by default: calls of 1024). Each call instantiates the guest afresh
/// and drops it after, unmapping its memory, which interrupts the other
/// cores (a TLB shootdown) where the live views run. Measured with `kiln
/// bench projection` and `kiln bench lag` (1M and 500k events, one worker):
/// calls of 256 warmed the runs log at 379-461k events/s and interleaved at
/// 281-366k, calls of 1024 at 586k and 405-542k, with the live views' p99
/// during the warm-up no worse (12 against 28 ms on one noisy run of three
/// rounds each); 2048 and 4096 added little.
const CALL_STEPS: usize = 4;

/// How long a window waits for the tail's next batch before it is applied.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Events gathered for the next window, in log order.
#[derive(Default)]
pub(super) struct Gathered {
    /// The batches as they came (joined off the runtime's threads).
    events: Vec<Vec<RecordedEvent>>,
    bytes: usize,
    /// The last position handed over with them (a partition's share may end
    /// past its last event).
    through: Position,
    /// The window is applied once `through` reaches it.
    target: Position,
    /// When the last batch came.
    pushed: Option<tokio::time::Instant>,
}

impl Gathered {
    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty() && self.through == 0
    }

    /// When the window is applied if no batch comes meanwhile.
    pub(super) fn linger_until(&self) -> tokio::time::Instant {
        self.pushed.unwrap_or_else(tokio::time::Instant::now) + LINGER
    }

    /// Sets the head the window is applied at (the first batch's caller).
    pub(super) fn aim(&mut self, target: Position) {
        self.target = self.target.max(target);
    }

    pub(super) fn push(&mut self, events: Vec<RecordedEvent>, through: Position) {
        self.pushed = Some(tokio::time::Instant::now());
        self.bytes += events.iter().map(event_bytes).sum::<usize>();
        self.events.push(events);
        self.through = self.through.max(through);
    }

    /// Forgets what was gathered (the tail is opened again from the
    /// checkpoint).
    pub(super) fn clear(&mut self) {
        *self = Gathered::default();
    }

    fn take(&mut self) -> (Vec<Vec<RecordedEvent>>, Position) {
        let taken = std::mem::take(self);
        (taken.events, taken.through)
    }
}

/// A window's events: the tail's batches as they came, never copied (a
/// 64 MiB window's copy took a fifth of its time).
pub(super) struct Window {
    batches: Vec<Vec<RecordedEvent>>,
}

/// Where an event sits in a [`Window`]: (batch, index).
type At = (u32, u32);

impl Window {
    fn get(&self, (batch, i): At) -> &RecordedEvent {
        &self.batches[batch as usize][i as usize]
    }

    fn iter(&self) -> impl Iterator<Item = &RecordedEvent> {
        self.batches.iter().flatten()
    }

    fn last(&self) -> Option<&RecordedEvent> {
        self.batches.iter().rev().find_map(|b| b.last())
    }

    fn slices(&self) -> Vec<&[RecordedEvent]> {
        self.batches.iter().map(Vec::as_slice).collect()
    }

    /// The window's events after `checkpoint` in one batch (to apply it in
    /// log order): a window of one batch is not copied.
    fn into_log(this: Arc<Window>, checkpoint: Position) -> Vec<RecordedEvent> {
        match Arc::try_unwrap(this) {
            Ok(mut w) if w.batches.len() == 1 => {
                let mut only = w.batches.pop().unwrap_or_default();
                only.retain(|e| e.position > checkpoint);
                only
            }
            Ok(w) => w
                .batches
                .into_iter()
                .flatten()
                .filter(|e| e.position > checkpoint)
                .collect(),
            Err(shared) => shared
                .iter()
                .filter(|e| e.position > checkpoint)
                .cloned()
                .collect(),
        }
    }
}

/// What an event costs a window: its bytes and a fixed overhead.
pub(super) fn event_bytes(e: &RecordedEvent) -> usize {
    e.data.len()
        + e.event_type.len()
        + e.stream.as_str().len()
        + e.metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 64
}

/// The calls of a window: `order` lists the window's events (log order
/// within each call), `calls` the unit and range of each call.
struct Plan {
    order: Vec<At>,
    calls: Vec<(u32, std::ops::Range<usize>)>,
    /// The streams of each unit (for a warning).
    streams: Vec<Vec<String>>,
}

/// Packs the streams of `window`'s events after `checkpoint` into units of
/// at most `step` events (see the module docs). `None` when that is one
/// unit (log order already).
fn plan(window: &Window, checkpoint: Position, step: usize) -> Option<Plan> {
    let step = step.max(1);
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut by_stream: Vec<(&str, Vec<At>)> = Vec::new();
    for (b, batch) in window.batches.iter().enumerate() {
        for (i, e) in batch.iter().enumerate() {
            if e.position <= checkpoint {
                continue;
            }
            let s = e.stream.as_str();
            let at = *index.entry(s).or_insert_with(|| {
                by_stream.push((s, Vec::new()));
                by_stream.len() - 1
            });
            by_stream[at].1.push((b as u32, i as u32));
        }
    }
    let mut units: Vec<(Vec<At>, Vec<String>)> = Vec::new();
    let mut open: (Vec<At>, Vec<String>) = (Vec::new(), Vec::new());
    for (stream, idx) in by_stream {
        if idx.len() >= step {
            units.push((idx, vec![stream.to_string()]));
            continue;
        }
        if open.0.len() + idx.len() > step {
            units.push(std::mem::take(&mut open));
        }
        open.0.extend(idx);
        open.1.push(stream.to_string());
    }
    if !open.0.is_empty() {
        units.push(open);
    }
    if units.len() < 2 {
        return None;
    }
    let total = units.iter().map(|u| u.0.len()).sum();
    let mut plan = Plan {
        order: Vec::with_capacity(total),
        calls: Vec::new(),
        streams: Vec::with_capacity(units.len()),
    };
    for (unit, (mut idx, streams)) in units.into_iter().enumerate() {
        // Log order within the unit ((batch, index) sorts as the log does).
        idx.sort_unstable();
        for chunk in idx.chunks(step) {
            let at = plan.order.len();
            plan.order.extend_from_slice(chunk);
            plan.calls.push((unit as u32, at..plan.order.len()));
        }
        plan.streams.push(streams);
    }
    Some(plan)
}

/// How applying a window grouped ended.
enum Grouped {
    Committed,
    /// Not committed: apply the window in log order (`Some`: and stop
    /// grouping, for this reason).
    InLogOrder(Option<String>),
}

impl Worker {
    /// Whether this worker gathers windows: the view is warming, declares
    /// `per_stream`, windows are on and no window of it met a shared
    /// document since the worker started.
    pub(super) fn groups(&self) -> bool {
        self.inner.config.warmup_group_bytes > 0
            && self.ungrouped.is_none()
            && self.module.manifest().per_stream
            && self.progress.warming.load(Ordering::Acquire)
    }

    /// Whether the gathered events make a window now.
    pub(super) fn window_full(&self) -> bool {
        let full = self.inner.config.warmup_group_bytes / self.share();
        self.gathered.bytes >= full.max(1)
            || self.gathered.through >= self.gathered.target
            || self.progress.marks.awaited() > 0
    }

    /// Applies what was gathered: grouped by stream when it can, else in log
    /// order; then the checkpoint stands at the last position gathered.
    pub(super) async fn apply_gathered(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), Halt> {
        let (batches, through) = self.gathered.take();
        let checkpoint = self.progress.checkpoint();
        let (groups, step) = (self.groups(), self.step() * CALL_STEPS);
        // Planning a window of many MiB takes milliseconds: off the
        // runtime's threads, which serve live views.
        let (window, plan) = tokio::task::spawn_blocking(move || {
            let window = Window { batches };
            let plan = if groups {
                plan(&window, checkpoint, step)
            } else {
                None
            };
            (Arc::new(window), plan)
        })
        .await
        .map_err(|e| Halt::Fault {
            reason: format!("planning a grouped window panicked: {e}"),
        })?;
        let grouped = match plan {
            Some(plan) if self.groups() => {
                self.apply_grouped(&window, plan, through, stop_rx).await
            }
            _ => Ok(Grouped::InLogOrder(None)),
        };
        let outcome = match grouped {
            Ok(Grouped::InLogOrder(reason)) => {
                self.apply_in_log_order(window, reason, stop_rx).await
            }
            Ok(Grouped::Committed) => {
                // Freeing a window's events takes milliseconds too.
                tokio::task::spawn_blocking(move || drop(window));
                Ok(())
            }
            Err(halt) => {
                tokio::task::spawn_blocking(move || drop(window));
                Err(halt)
            }
        };
        outcome?;
        if let Slot::Partition { .. } = self.slot {
            self.advance_to(through).await?;
        }
        Ok(())
    }

    /// Applies `window` in log order, as a warming step does (`reason`: and
    /// stops grouping for it).
    async fn apply_in_log_order(
        &mut self,
        window: Arc<Window>,
        reason: Option<String>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), Halt> {
        if let Some(reason) = reason {
            tracing::warn!("{reason}: this warm-up goes on in log order");
            self.progress.set_warning(Some(reason.clone()));
            self.ungrouped = Some(reason);
        }
        let checkpoint = self.progress.checkpoint();
        let events =
            tokio::task::spawn_blocking(move || Arc::new(Window::into_log(window, checkpoint)))
                .await
                .map_err(|e| Halt::Fault {
                    reason: format!("joining a window's events panicked: {e}"),
                })?;
        let outcome = if self.progress.fleet_first.load(Ordering::Acquire) {
            // What the fleet serves warms at the live views' priority.
            let priority = self.inner.priority.clone();
            let _busy = priority.enter();
            self.apply(&events, 0..events.len()).await
        } else {
            self.apply_warming(&events, stop_rx).await
        };
        tokio::task::spawn_blocking(move || drop(events));
        outcome
    }

    /// Events per warming step (K partition workers step K times finer).
    pub(super) fn step(&self) -> usize {
        (self.inner.config.warmup_batch / self.share()).max(1)
    }

    /// The partitions this worker's view warms in (1: not split).
    fn share(&self) -> usize {
        match self.slot {
            Slot::View => 1,
            Slot::Partition { of, .. } => (of as usize).max(1),
        }
    }

    async fn apply_grouped(
        &mut self,
        window: &Arc<Window>,
        plan: Plan,
        through: Position,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<Grouped, Halt> {
        let Some(last) = window.last().map(|e| e.position) else {
            return Ok(Grouped::InLogOrder(None));
        };
        // A partition commits its share's end; the view its last event.
        let through = match self.slot {
            Slot::View => last,
            Slot::Partition { .. } => through.max(last),
        };
        let plan = Arc::new(plan);
        let mut call = 0;
        while call < plan.calls.len() {
            if *stop_rx.borrow() {
                self.drop_window().await;
                return Err(Halt::Stopped);
            }
            let fleet_first = self.progress.fleet_first.load(Ordering::Acquire);
            let priority = self.inner.priority.clone();
            let _busy = if fleet_first {
                Some(priority.enter())
            } else {
                tokio::select! {
                    biased;
                    _ = stop_rx.changed() => {
                        self.drop_window().await;
                        return Err(Halt::Stopped);
                    }
                    _ = priority.wait_idle() => {}
                    _ = tokio::time::sleep(WARM_MAX_WAIT) => {}
                }
                None
            };
            let (next, result) = self
                .call_units(window, &plan, call, fleet_first, stop_rx)
                .await;
            call = next;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(shared)) => {
                    self.drop_window().await;
                    return Ok(Grouped::InLogOrder(Some(explain(&shared, &plan))));
                }
                Err(e) if is_host(&e) => {
                    self.drop_window().await;
                    return Err(Halt::of(e, None));
                }
                Err(e) => {
                    // The window is applied again in log order, which finds
                    // (and parks or fails on) the same event as it would alone.
                    tracing::warn!("a grouped call failed, applying the window in log order: {e}");
                    self.drop_window().await;
                    return Ok(Grouped::InLogOrder(None));
                }
            }
        }
        self.commit_window(window, through).await?;
        Ok(Grouped::Committed)
    }

    /// Runs calls of `plan` from `from` on a blocking thread, one after
    /// another while live workers stay idle (unless this view warms at their
    /// priority), no stop is asked for and [`SLICE`] has not passed; answers
    /// the next call to run and how the last one went.
    async fn call_units(
        &mut self,
        window: &Arc<Window>,
        plan: &Arc<Plan>,
        from: usize,
        fleet_first: bool,
        stop_rx: &watch::Receiver<bool>,
    ) -> (usize, Result<Result<(), Ungroupable>, ProjectionError>) {
        let Some(mut projector) = self.projector.take() else {
            return (from, Err(self.lost_projector()));
        };
        let (window, plan) = (window.clone(), plan.clone());
        let (priority, stop) = (self.inner.priority.clone(), stop_rx.clone());
        let started = std::time::Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let mut refs: Vec<&RecordedEvent> = Vec::new();
            let mut call = from;
            loop {
                let (unit, range) = plan.calls[call].clone();
                refs.clear();
                refs.extend(plan.order[range].iter().map(|&at| window.get(at)));
                let result = projector.apply_unit(unit, &refs);
                call += 1;
                let go_on = matches!(result, Ok(Ok(())))
                    && call < plan.calls.len()
                    && started.elapsed() < SLICE
                    && !*stop.borrow()
                    && (fleet_first || priority.is_idle());
                if !go_on {
                    drop(refs);
                    return (projector, call, result);
                }
            }
        })
        .await;
        match joined {
            Ok((projector, next, result)) => {
                self.projector = Some(projector);
                self.progress.batch_latency.record(started.elapsed());
                (next, result)
            }
            Err(e) => (
                from,
                Err(ProjectionError::Instantiate {
                    projection: self.module.name().to_string(),
                    version: self.module.version().to_string(),
                    reason: format!("applying a grouped call panicked: {e}"),
                }),
            ),
        }
    }

    pub(super) fn lost_projector(&self) -> ProjectionError {
        ProjectionError::Instantiate {
            projection: self.module.name().to_string(),
            version: self.module.version().to_string(),
            reason: "the projector was lost after an earlier failure".into(),
        }
    }

    async fn drop_window(&mut self) {
        if let Some(p) = self.projector.as_mut() {
            p.drop_window();
        }
    }

    /// Commits the window's documents with the checkpoint `through`.
    async fn commit_window(&mut self, window: &Arc<Window>, through: Position) -> Result<(), Halt> {
        let Some(mut projector) = self.projector.take() else {
            return Err(Halt::of(self.lost_projector(), None));
        };
        let before = projector.checkpoint();
        let applied = projector.window_events();
        let joined = tokio::task::spawn_blocking(move || {
            let result = projector.commit_window(through);
            (projector, result)
        })
        .await;
        let (projector, result) = joined.map_err(|e| Halt::Fault {
            reason: format!("committing a grouped window panicked: {e}"),
        })?;
        self.projector = Some(projector);
        match result {
            Ok(()) => {}
            Err(ProjectionError::SplitDependent { mut violation, .. }) => {
                let events: Arc<Vec<RecordedEvent>> = Arc::new(window.iter().cloned().collect());
                violation.streams = self
                    .streams_touching(&events, 0..events.len(), &violation.key)
                    .await;
                return Err(Halt::SplitDependent(violation));
            }
            Err(e) => return Err(Halt::of(e, None)),
        }
        self.progress.applied.fetch_add(applied, Ordering::Relaxed);
        self.progress.grouped.fetch_add(applied, Ordering::Relaxed);
        if self.progress.paused().is_some() {
            tracing::info!(checkpoint = through, "resumed after a host fault");
            self.progress.set_paused(None);
        }
        self.progress.advance(through);
        if self.slot == Slot::View {
            self.progress.marks.committed(
                &self.inner.views,
                &self.view,
                before,
                &window.slices(),
                through,
            );
        }
        Ok(())
    }
}

/// An error of the host (storage, instantiation), not of the window's events.
fn is_host(e: &ProjectionError) -> bool {
    matches!(
        e,
        ProjectionError::View { .. } | ProjectionError::Instantiate { .. }
    )
}

/// Why a window could not be applied grouped, naming the streams involved.
fn explain(shared: &Ungroupable, plan: &Plan) -> String {
    let names = |unit: u32| {
        let streams = plan.streams.get(unit as usize).map_or(&[][..], |s| &s[..]);
        let shown: Vec<&str> = streams.iter().take(3).map(String::as_str).collect();
        let more = streams.len().saturating_sub(3);
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    match shared.first {
        None => format!(
            "a grouped warm-up window scanned documents under {:?} (streams {}): it cannot be applied grouped by stream",
            shared.key,
            names(shared.unit)
        ),
        Some(first) => format!(
            "the view declares per_stream but document {:?} is touched by the events of streams {} and of streams {} in one warm-up window: it depends on more than one stream",
            shared.key,
            names(first),
            names(shared.unit)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{Window, plan};
    use crate::store::{RecordedEvent, StreamId};

    fn ev(position: u64, stream: &str) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::nil(),
            stream: StreamId::new(stream).expect("stream"),
            event_type: "T".into(),
            version: 1,
            position,
            timestamp: 0,
            metadata: Default::default(),
            tags: Vec::new(),
            data: bytes::Bytes::from_static(b"{}"),
        }
    }

    fn sorted_positions(w: &Window, order: &[super::At]) -> Vec<u64> {
        let mut seen: Vec<u64> = order.iter().map(|&at| w.get(at).position).collect();
        seen.sort_unstable();
        seen
    }

    /// One event per name, at positions 1, 2, …
    fn in_streams(streams: &[&str]) -> Vec<RecordedEvent> {
        streams
            .iter()
            .enumerate()
            .map(|(i, s)| ev(i as u64 + 1, s))
            .collect()
    }

    /// `events` split into batches of `per`, as the tail hands them over.
    fn window(events: &[RecordedEvent], per: usize) -> Window {
        Window {
            batches: events.chunks(per).map(<[_]>::to_vec).collect(),
        }
    }

    #[test]
    fn a_plan_keeps_log_order_within_each_call_and_every_event_once() {
        let streams = ["a-1", "b-1", "a-1", "c-1", "b-1", "a-1", "d-1", "c-1"];
        let events = in_streams(&streams);
        let w = window(&events, 3);
        let p = plan(&w, 0, 3).expect("more than one unit");
        let seen = sorted_positions(&w, &p.order);
        assert_eq!(seen, (1..=events.len() as u64).collect::<Vec<_>>());
        for (_, range) in &p.calls {
            let positions: Vec<u64> = p.order[range.clone()]
                .iter()
                .map(|&at| w.get(at).position)
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "log order in {positions:?}"
            );
            assert!(positions.len() <= 3);
        }
        // a-1 (3 events) is a unit alone; each stream sits in one unit.
        assert_eq!(p.streams[0], vec!["a-1".to_string()]);
        let mut all: Vec<&String> = p.streams.iter().flatten().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4);
        assert_eq!(p.streams.iter().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    fn a_plan_leaves_out_what_the_checkpoint_passed() {
        let streams = ["a-1", "b-1", "a-1", "c-1", "b-1", "a-1"];
        let events = in_streams(&streams);
        let w = window(&events, 4);
        let p = plan(&w, 2, 2).expect("more than one unit");
        let seen = sorted_positions(&w, &p.order);
        assert_eq!(seen, vec![3, 4, 5, 6]);
        let joined = Window::into_log(std::sync::Arc::new(w), 2);
        let positions: Vec<u64> = joined.iter().map(|e| e.position).collect();
        assert_eq!(positions, vec![3, 4, 5, 6]);
    }

    #[test]
    fn one_unit_is_no_plan() {
        let events: Vec<RecordedEvent> = (1..=4).map(|i| ev(i, "a-1")).collect();
        assert!(plan(&window(&events, 2), 0, 256).is_none());
        let two: Vec<RecordedEvent> = vec![ev(1, "a-1"), ev(2, "b-1")];
        assert!(
            plan(&window(&two, 1), 0, 256).is_none(),
            "two small streams share one unit"
        );
        assert!(plan(&window(&two, 1), 0, 1).is_some());
    }
}
