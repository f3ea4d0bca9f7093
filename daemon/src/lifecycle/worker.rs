//! One worker per running physical view: tails the log from the view's
//! checkpoint and applies batches through its [`Projector`] (documents and
//! checkpoint in one RocksDB batch), on a blocking thread.
//!
//! A warming worker applies at most `warmup_batch` events at a time (a
//! grouped call: 4 × that, see `grouped.rs`) and, before each, waits until no live worker (ready, active, standby) is applying a
//! batch, or [`WARM_MAX_WAIT`] has passed: live views get the CPU first, and a
//! warm-up still moves while live views are busy all the time.
//!
//! **Caught up** is judged against a head read earlier, never one read after
//! the batch (under a steady append rate that one is always ahead): the worker
//! reads the head, replays up to it, then reads the head again; when the log
//! grew by at most one warm-up batch meanwhile, the version is caught up
//! (as current as a live view one batch behind); otherwise that head is the
//! next target. Each round is shorter than the last while the warm-up applies
//! faster than the log grows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::Instrument;

use super::compare::{CloseOnDrop, Marks};
use super::{Inner, LifecycleError, PoisonPolicy, parked};
use crate::runtime::{Instance, Module, ProjectionError, Projector};
use crate::snapshots::{Bootstrap, SnapshotError};
use crate::store::{Position, RecordedEvent};
use crate::views::{Slot, ViewId};

pub(super) mod ahead;
mod grouped;
mod partitioned;

/// How long a worker waits before re-opening a tail that returned an error.
const TAIL_RETRY: Duration = Duration::from_millis(500);

/// First and longest wait before a view paused by a host fault (storage I/O,
/// a full disk) tries again; the wait doubles in between.
const FAULT_RETRY_FIRST: Duration = Duration::from_millis(250);
const FAULT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Longest a warming batch waits for live workers to be idle before it runs
/// anyway (so two busy live views cannot starve a warm-up).
pub(super) const WARM_MAX_WAIT: Duration = Duration::from_millis(20);

/// Live workers applying a batch right now; warming workers wait for zero.
#[derive(Default)]
pub(super) struct Priority {
    busy: AtomicUsize,
    idle: Notify,
}

struct Busy<'a>(&'a Priority);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Priority {
    fn enter(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    /// No live worker is applying a batch.
    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

/// What a physical view's worker has done, read by status and waiters.
pub(super) struct Progress {
    pub checkpoint: AtomicU64,
    pub applied: AtomicU64,
    pub warming: AtomicBool,
    pub parked: AtomicUsize,
    /// Bumped on every commit (and on failure, to wake waiters).
    pub checkpoint_tx: watch::Sender<Position>,
    /// (when, applied then, events/s).
    pub rate: std::sync::Mutex<(Instant, u64, f64)>,
    /// How long batches take to apply and commit.
    pub batch_latency: LatencyHistogram,
    /// Why the worker is paused by a host fault (it retries by itself).
    pub paused: std::sync::Mutex<Option<String>>,
    /// Host faults met since start (each one paused the worker).
    pub faults: AtomicU64,
    /// Events its warm-up applied in windows grouped by stream.
    pub grouped: AtomicU64,
    /// Partitions of its warm-up, while one runs or since one ran (0: none).
    pub partitions: AtomicUsize,
    /// What it is doing with snapshots (see [`crate::snapshots`]).
    pub snapshot: std::sync::Mutex<Option<crate::snapshots::SnapshotActivity>>,
    /// The fleet serves this view and it is still warming here: it warms at
    /// the live views' priority (other warm-ups yield to it).
    pub fleet_first: AtomicBool,
    /// Why the view warms with one worker despite `per_stream` (see
    /// `views::owners`).
    pub warning: std::sync::Mutex<Option<String>>,
    /// Where comparisons and digests want the view pinned (see
    /// [`super::compare`]); closed when the worker stops.
    pub marks: Arc<Marks>,
    /// When the checkpoint last moved (or the worker started).
    moved_at: std::sync::Mutex<Instant>,
}

impl Progress {
    pub fn new(checkpoint: Position, warming: bool, parked: usize) -> Arc<Self> {
        Arc::new(Progress {
            checkpoint: AtomicU64::new(checkpoint),
            applied: AtomicU64::new(0),
            warming: AtomicBool::new(warming),
            parked: AtomicUsize::new(parked),
            checkpoint_tx: watch::Sender::new(checkpoint),
            rate: std::sync::Mutex::new((Instant::now(), 0, 0.0)),
            batch_latency: LatencyHistogram::default(),
            paused: std::sync::Mutex::new(None),
            faults: AtomicU64::new(0),
            grouped: AtomicU64::new(0),
            partitions: AtomicUsize::new(0),
            snapshot: std::sync::Mutex::new(None),
            fleet_first: AtomicBool::new(false),
            warning: std::sync::Mutex::new(None),
            marks: Arc::default(),
            moved_at: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// How long the checkpoint has not moved.
    pub fn still_for(&self) -> Duration {
        self.moved_at
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Sets the checkpoint (and when it moved), waking waiters.
    fn advance(&self, to: Position) {
        if let Ok(mut t) = self.moved_at.lock() {
            *t = Instant::now();
        }
        self.checkpoint.store(to, Ordering::Release);
        self.checkpoint_tx.send_replace(to);
    }

    /// Why the view warms with one worker despite `per_stream`, if so.
    pub fn warning(&self) -> Option<String> {
        self.warning.lock().ok().and_then(|w| w.clone())
    }

    fn set_warning(&self, warning: Option<String>) {
        if let Ok(mut w) = self.warning.lock() {
            *w = warning;
        }
    }

    /// Why the worker is paused, if it is.
    pub fn paused(&self) -> Option<String> {
        self.paused.lock().ok().and_then(|p| p.clone())
    }

    fn set_paused(&self, reason: Option<String>) {
        if let Ok(mut p) = self.paused.lock() {
            *p = reason;
        }
    }

    pub fn checkpoint(&self) -> Position {
        self.checkpoint.load(Ordering::Acquire)
    }

    /// Updates the rate from the applied count (called about once a second).
    pub fn sample_rate(&self) {
        if let Ok(mut r) = self.rate.lock() {
            let now = Instant::now();
            let applied = self.applied.load(Ordering::Relaxed);
            let secs = now.duration_since(r.0).as_secs_f64();
            if secs >= 0.5 {
                let current = (applied - r.1.min(applied)) as f64 / secs;
                r.2 = if r.2 == 0.0 {
                    current
                } else {
                    0.5 * r.2 + 0.5 * current
                };
                r.0 = now;
                r.1 = applied;
            }
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate.lock().map(|r| r.2).unwrap_or(0.0)
    }
}

/// Upper bounds (seconds) of the batch latency buckets.
const BATCH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A lock-free latency histogram over [`BATCH_BUCKETS`] (plus `+Inf`).
#[derive(Default)]
pub(super) struct LatencyHistogram {
    /// Per bucket, not cumulative; a time above the last bound is only counted.
    buckets: [AtomicU64; BATCH_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BATCH_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> super::BatchLatency {
        let mut total = 0;
        let buckets = BATCH_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (*bound, total)
            })
            .collect();
        super::BatchLatency {
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            buckets,
        }
    }
}

pub(super) enum Command {
    RetryParked(oneshot::Sender<Result<usize, LifecycleError>>),
}

/// The lifecycle's hold on a running worker.
pub(super) struct WorkerHandle {
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
    pub commands: mpsc::Sender<Command>,
    marks: Arc<Marks>,
}

impl WorkerHandle {
    /// Stops the worker after its current batch and waits for it. What
    /// waits for the view to reach a position is answered at once, not
    /// after the batch.
    pub async fn stop(self) {
        self.marks.close();
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }

    /// Stops the worker at its next await point, as a crash would (a batch
    /// already handed to a blocking thread still finishes, or not).
    pub async fn abort(self) {
        self.marks.close();
        self.join.abort();
        let _ = self.join.await;
    }
}

/// Starts the worker of `module`'s physical view.
pub(super) fn spawn(
    inner: &Arc<Inner>,
    module: Module,
    progress: Arc<Progress>,
    poison: PoisonPolicy,
) -> WorkerHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (commands, commands_rx) = mpsc::channel(8);
    let view = module.view_id().clone();
    let span = tracing::info_span!("view", view = %view);
    // However the worker ends (stopped, failed, aborted), its marks are
    // answered at once.
    let marks = progress.marks.clone();
    let closer = CloseOnDrop(marks.clone());
    let worker = Worker {
        inner: inner.clone(),
        view,
        module,
        progress,
        poison,
        projector: None,
        retry: None,
        target: None,
        open_error: None,
        slot: Slot::View,
        gathered: grouped::Gathered::default(),
        ungrouped: None,
    };
    let join = tokio::spawn(
        async move {
            let _closer = closer;
            worker.run(stop_rx, commands_rx).await;
        }
        .instrument(span),
    );
    WorkerHandle {
        stop,
        join,
        commands,
        marks,
    }
}

struct Worker {
    inner: Arc<Inner>,
    view: ViewId,
    module: Module,
    progress: Arc<Progress>,
    poison: PoisonPolicy,
    projector: Option<Projector>,
    /// A second instance for retrying parked events (made on first use).
    retry: Option<Instance>,
    /// While warming: the head this round replays up to (see the module docs).
    target: Option<Position>,
    /// Why the projector last failed to open.
    open_error: Option<String>,
    /// Whose checkpoint the projector moves: the view's, or (a worker of a
    /// partitioned warm-up) its partition's.
    slot: Slot,
    /// Events gathered for the next grouped window (see `grouped.rs`).
    gathered: grouped::Gathered,
    /// Why this worker stopped grouping windows, if it did.
    ungrouped: Option<String>,
}

/// Why a worker stopped applying.
enum Halt {
    Stopped,
    /// The projection failed: the version goes `failed`.
    Failed {
        position: Option<Position>,
        reason: String,
    },
    /// The host failed (storage I/O, a full disk): pause, retry, resume.
    Fault {
        reason: String,
    },
    /// A split warm-up touched one document from two partitions: the view
    /// warms again with one worker (see `views::owners`).
    SplitDependent(Box<crate::views::owners::SplitViolation>),
}

impl Halt {
    /// A non-poison error: the host's fault when storage failed, else the
    /// projection's.
    fn of(e: ProjectionError, position: Option<Position>) -> Halt {
        match e {
            ProjectionError::View { .. } => Halt::Fault {
                reason: e.to_string(),
            },
            ProjectionError::SplitDependent { violation, .. } => Halt::SplitDependent(violation),
            e => Halt::Failed {
                position,
                reason: e.to_string(),
            },
        }
    }
}

impl Worker {
    async fn run(
        mut self,
        mut stop_rx: watch::Receiver<bool>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut backoff = FAULT_RETRY_FIRST;
        if self.slot == Slot::View && self.progress.warming.load(Ordering::Acquire) {
            loop {
                match self.bootstrap(&mut stop_rx).await {
                    Ok(true) => break,
                    Ok(false) => return,
                    Err(reason) => {
                        if !self.pause(&reason, &mut backoff, &mut stop_rx).await {
                            return;
                        }
                    }
                }
            }
            self.progress.set_paused(None);
        }
        loop {
            match self.open().await {
                Ok(()) => break,
                Err(e) => match Halt::of(e, None) {
                    Halt::Fault { reason } => {
                        if !self.pause(&reason, &mut backoff, &mut stop_rx).await {
                            return;
                        }
                    }
                    _ => {
                        // Not the host's fault: the module cannot open its view.
                        let reason = self.open_error.take().unwrap_or_default();
                        self.fail(None, reason);
                        return;
                    }
                },
            }
        }
        let warming = self.progress.warming.load(Ordering::Acquire);
        tracing::info!(
            checkpoint = self.progress.checkpoint(),
            warming,
            "view worker started"
        );
        match self.warm_in_partitions(&mut stop_rx, &mut commands).await {
            Ok(()) => {}
            Err(Halt::Failed { position, reason }) => {
                self.fail(position, reason);
                return;
            }
            Err(_) => {
                tracing::info!(
                    checkpoint = self.progress.checkpoint(),
                    "view worker stopped"
                );
                return;
            }
        }
        if warming && let Err(e) = self.check_caught_up().await {
            tracing::warn!("reading the log head: {e}");
        }
        let (mut tail, mut reads_ahead) = self.open_tail();
        loop {
            let done = tokio::select! {
                biased;
                _ = stop_rx.changed() => break,
                Some(cmd) = commands.recv() => {
                    self.command(cmd).await;
                    continue;
                }
                next = tail.next() => match next {
                    None => {
                        tracing::info!("the log's tail ended (store closed)");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("tailing the log: {e}; retrying in {TAIL_RETRY:?}");
                        self.progress.set_paused(Some(format!("the log is unreadable: {e}")));
                        tokio::select! {
                            _ = stop_rx.changed() => break,
                            _ = tokio::time::sleep(TAIL_RETRY) => {}
                        }
                        if self.inner.store.head().await.is_ok() {
                            self.progress.set_paused(None);
                        }
                        // The new tail hands over again what was gathered.
                        self.gathered.clear();
                        (tail, reads_ahead) = self.open_tail();
                        continue;
                    }
                    Some(Ok(batch)) => self.batch(batch, &mut stop_rx).await,
                },
                // No batch for a while: what was gathered is a window.
                _ = tokio::time::sleep_until(self.gathered.linger_until()), if !self.gathered.is_empty() => {
                    self.apply_window(&mut stop_rx).await
                }
            };
            match done {
                Ok(()) => backoff = FAULT_RETRY_FIRST,
                Err(Halt::Stopped) => break,
                Err(Halt::Failed { position, reason }) => {
                    self.fail(position, reason);
                    return;
                }
                Err(Halt::SplitDependent(violation)) => {
                    // Only a split warm-up's partitions claim documents.
                    self.fail(None, violation.to_string());
                    return;
                }
                Err(Halt::Fault { reason }) => {
                    // Back to the checkpoint: what failed to commit is
                    // applied again by a fresh projector.
                    self.projector = None;
                    self.gathered.clear();
                    loop {
                        if !self.pause(&reason, &mut backoff, &mut stop_rx).await {
                            return;
                        }
                        match self.open().await {
                            Ok(()) => break,
                            Err(e) => match Halt::of(e, None) {
                                Halt::Fault { .. } => continue,
                                _ => {
                                    let reason = self.open_error.take().unwrap_or_default();
                                    self.fail(None, reason);
                                    return;
                                }
                            },
                        }
                    }
                    (tail, reads_ahead) = self.open_tail();
                }
            }
            if reads_ahead
                && !self.progress.warming.load(Ordering::Acquire)
                && self.gathered.is_empty()
            {
                // Caught up: live views read the log as it grows, without a
                // task between them and it. Nothing past the checkpoint was
                // applied, so the new tail starts there.
                (tail, reads_ahead) = self.open_tail();
            }
        }
        tracing::info!(
            checkpoint = self.progress.checkpoint(),
            "view worker stopped"
        );
    }

    /// The log from the checkpoint, cut at the marks on the view and, while
    /// warming, read ahead of what is applied (see `ahead.rs`): by a window
    /// when it gathers windows. The flag says whether it reads ahead.
    fn open_tail(&self) -> (crate::store::EventBatches, bool) {
        let budget = if !self.progress.warming.load(Ordering::Acquire) {
            0
        } else if self.groups() {
            self.inner.config.warmup_group_bytes
        } else {
            ahead::LOG_ORDER_AHEAD
        };
        let tail = self.inner.tail(
            &self.progress.marks,
            self.progress.checkpoint() + 1,
            budget,
            Some(self.gate()),
        );
        (tail, budget > 0)
    }

    /// What reading ahead gives way to (see `ahead.rs`).
    fn gate(&self) -> ahead::Gate {
        ahead::Gate {
            priority: self.inner.priority.clone(),
            progress: self.progress.clone(),
        }
    }

    /// Before a warming view opens: fills it from a snapshot when one of
    /// its fingerprint exists on this log (or waits for the instance
    /// building one), else lets it replay. `Ok(false)`: stopped meanwhile;
    /// `Err`: the views database failed (a host fault: pause and retry).
    async fn bootstrap(&mut self, stop_rx: &mut watch::Receiver<bool>) -> Result<bool, String> {
        let Some(snapshots) = self.inner.config.snapshots.clone() else {
            return Ok(true);
        };
        let fingerprint = self.module.fingerprint().to_string();
        let outcome = snapshots
            .bootstrap(
                &self.inner.views,
                &self.view,
                &fingerprint,
                self.inner.store.as_ref(),
                &self.progress.snapshot,
                stop_rx,
            )
            .await;
        match outcome {
            Ok(Bootstrap::Done(position)) => {
                self.progress.advance(position);
                self.progress.parked.store(
                    parked::count(&self.inner.views, &self.view),
                    Ordering::Relaxed,
                );
                Ok(true)
            }
            Ok(Bootstrap::Replay) => Ok(true),
            Ok(Bootstrap::Stopped) => Ok(false),
            Err(SnapshotError::View(e)) => Err(e.to_string()),
            Err(e) => {
                // The snapshot store is unreachable or unreadable: replay.
                tracing::warn!("snapshots unavailable, replaying from the view's checkpoint: {e}");
                if let Ok(mut g) = self.progress.snapshot.lock() {
                    *g = Some(crate::snapshots::SnapshotActivity::Refused {
                        reason: e.to_string(),
                    });
                }
                Ok(true)
            }
        }
    }

    /// Paused by a host fault: says why (status, metrics, log), waits the
    /// backoff (doubling it), and answers whether to go on (`false`: stopped).
    async fn pause(
        &mut self,
        reason: &str,
        backoff: &mut Duration,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> bool {
        self.progress.faults.fetch_add(1, Ordering::Relaxed);
        self.progress.set_paused(Some(reason.to_string()));
        tracing::warn!(
            checkpoint = self.progress.checkpoint(),
            "paused by a host fault, retrying in {backoff:?}: {reason}"
        );
        // A builder that cannot build lets go of its snapshot lease: the
        // instances waiting for its snapshot would otherwise wait for as
        // long as this host's fault lasts (a full disk: for good). One of
        // them builds instead; this one publishes nothing unless it takes
        // the lease again once caught up.
        if let Some(snapshots) = &self.inner.config.snapshots
            && snapshots.holds_lease(&self.view).await
        {
            tracing::warn!(
                "paused while building: letting go of the snapshot lease so another instance builds"
            );
            snapshots.release(&self.view).await;
        }
        let wait = *backoff;
        *backoff = (*backoff * 2).min(FAULT_RETRY_MAX);
        tokio::select! {
            _ = stop_rx.changed() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    async fn open(&mut self) -> Result<(), ProjectionError> {
        let module = self.module.clone();
        let views = self.inner.views.clone();
        let slot = self.slot;
        let projector = tokio::task::spawn_blocking(move || {
            Projector::open_at(&module, &views, slot).map_err(Box::new)
        })
        .await
        .map_err(|e| ProjectionError::Instantiate {
            projection: self.module.name().to_string(),
            version: self.module.version().to_string(),
            reason: format!("opening the view panicked: {e}"),
        })?
        .map_err(|e| *e)
        .inspect_err(|e| self.open_error = Some(e.to_string()))?;
        self.progress.advance(projector.checkpoint());
        self.projector = Some(projector);
        Ok(())
    }

    fn fail(&self, position: Option<Position>, reason: String) {
        tracing::error!(?position, "view version failed: {reason}");
        self.inner.on_failed(&self.view, position, reason);
        self.progress.checkpoint_tx.send_modify(|_| {});
    }

    /// Applies one batch from the tail.
    async fn batch(
        &mut self,
        batch: Vec<RecordedEvent>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), Halt> {
        if let Some(last) = batch.last() {
            self.inner.head.fetch_max(last.position, Ordering::AcqRel);
        }
        if !self.gathered.is_empty() && !self.groups() {
            // Gathered while grouping: applied before anything after it (a
            // view only stops warming between windows, but never skip them).
            self.apply_gathered(stop_rx).await?;
        }
        if self.groups() {
            if self.gathered.is_empty() {
                // The window ends at the head as it is now (or sooner).
                let head = self.inner.store.head().await.unwrap_or(0);
                self.gathered.aim(head);
            }
            let through = batch.last().map_or(0, |e| e.position);
            self.gathered.push(batch, through);
            if self.window_full() {
                return self.apply_window(stop_rx).await;
            }
            return Ok(());
        }
        let batch = Arc::new(batch);
        if !self.progress.warming.load(Ordering::Acquire) {
            let priority = self.inner.priority.clone();
            let _busy = priority.enter();
            return self.apply(&batch, 0..batch.len()).await;
        }
        if self.progress.fleet_first.load(Ordering::Acquire) {
            // What the fleet serves, warming here: at the live views'
            // priority, so the other warm-ups wait for it.
            let priority = self.inner.priority.clone();
            let busy = priority.enter();
            self.apply(&batch, 0..batch.len()).await?;
            drop(busy);
        } else {
            self.apply_warming(&batch, stop_rx).await?;
        }
        self.check_caught_up()
            .await
            .map_err(|e| tracing::warn!("reading the log head: {e}"))
            .ok();
        Ok(())
    }

    /// Applies the gathered window, then checks whether the warm-up caught up.
    async fn apply_window(&mut self, stop_rx: &mut watch::Receiver<bool>) -> Result<(), Halt> {
        self.apply_gathered(stop_rx).await?;
        self.check_caught_up()
            .await
            .map_err(|e| tracing::warn!("reading the log head: {e}"))
            .ok();
        Ok(())
    }

    /// Applies `batch` as a warming version does: `warmup_batch` events at a
    /// time, each step once live workers are idle (or [`WARM_MAX_WAIT`] has
    /// passed).
    async fn apply_warming(
        &mut self,
        batch: &Arc<Vec<RecordedEvent>>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), Halt> {
        // K partition workers step K times finer: a live batch waits for a
        // core at most as long as it would behind one warming worker.
        let step = self.step();
        let mut at = 0;
        while at < batch.len() {
            tokio::select! {
                biased;
                _ = stop_rx.changed() => return Err(Halt::Stopped),
                _ = self.inner.priority.wait_idle() => {}
                _ = tokio::time::sleep(WARM_MAX_WAIT) => {}
            }
            let end = (at + step).min(batch.len());
            self.apply(batch, at..end).await?;
            at = end;
            if !self.progress.warming.load(Ordering::Acquire) {
                // Promoted to live mid-batch (it cannot be, but stay correct).
                return self.apply(batch, at..batch.len()).await;
            }
        }
        Ok(())
    }

    /// Warming and at this round's target? Read the head: within one warm-up
    /// batch of it, the version is caught up (tell the lifecycle); else the
    /// head is the next round's target.
    async fn check_caught_up(&mut self) -> Result<(), LifecycleError> {
        if !self.progress.warming.load(Ordering::Acquire) {
            return Ok(());
        }
        let checkpoint = self.progress.checkpoint();
        if self.target.is_some_and(|t| checkpoint < t) {
            return Ok(());
        }
        let head = self.inner.store.head().await?;
        self.inner.head.fetch_max(head, Ordering::AcqRel);
        let slack = self.inner.config.warmup_batch.max(1) as u64;
        if head.saturating_sub(checkpoint) <= slack && self.target.is_some() || checkpoint >= head {
            self.inner.on_caught_up(&self.view);
        } else {
            self.target = Some(head);
        }
        Ok(())
    }

    /// Applies `batch[range]`; a projection failure is handled by the poison
    /// policy (the events are re-applied one by one, each batch in a fresh
    /// instance, to find the poison one). An event refused alone for a
    /// resource fault ([`ProjectionError::is_resource_fault`]) is tried once
    /// more before it is declared poison: what a batch of many spent is never
    /// charged to one of its events.
    async fn apply(
        &mut self,
        batch: &Arc<Vec<RecordedEvent>>,
        range: std::ops::Range<usize>,
    ) -> Result<(), Halt> {
        if range.is_empty() {
            return Ok(());
        }
        match self.apply_blocking(batch, range.clone()).await {
            Ok(()) => return Ok(()),
            Err(ProjectionError::SplitDependent { mut violation, .. }) => {
                violation.streams = self.streams_touching(batch, range, &violation.key).await;
                return Err(Halt::SplitDependent(violation));
            }
            Err(e) if !is_poison(&e) => return Err(Halt::of(e, None)),
            Err(e) => tracing::warn!("batch refused, re-applying it event by event: {e}"),
        }
        for i in range {
            if batch[i].position <= self.progress.checkpoint() {
                continue;
            }
            let mut alone = self.apply_blocking(batch, i..i + 1).await;
            if let Err(e) = &alone
                && e.is_resource_fault()
            {
                // A fault of the engine's limits (deadline, memory cap, a host
                // limit) may be the machine's: once more, in a fresh instance,
                // before the event is charged with it.
                tracing::warn!(
                    position = batch[i].position,
                    "event refused alone, trying it once more: {e}"
                );
                alone = self.apply_blocking(batch, i..i + 1).await;
            }
            match alone {
                Ok(()) => {}
                Err(e) if !is_poison(&e) => return Err(Halt::of(e, Some(batch[i].position))),
                Err(e) => match self.poison {
                    PoisonPolicy::Stop => {
                        return Err(Halt::Failed {
                            position: Some(batch[i].position),
                            reason: e.to_string(),
                        });
                    }
                    PoisonPolicy::Park => self.park(&batch[i], e).await?,
                },
            }
        }
        Ok(())
    }

    /// Records `event` in the dead letters, then moves the checkpoint past it.
    async fn park(&mut self, event: &RecordedEvent, error: ProjectionError) -> Result<(), Halt> {
        let position = event.position;
        tracing::warn!(position, "parking a poison event: {error}");
        let record = parked::Parked::new(event, error.to_string()).encode();
        self.inner
            .views
            .park(&self.view, self.slot, position, &record)
            .map_err(|e| Halt::Fault {
                reason: format!("parking the event at {position}: {e}"),
            })?;
        self.progress.parked.store(
            parked::count(&self.inner.views, &self.view),
            Ordering::Release,
        );
        // The projector's checkpoint is behind the view's now: open it again.
        self.projector = None;
        self.open().await.map_err(|e| Halt::of(e, Some(position)))?;
        if self.slot == Slot::View {
            // Past the parked event: the marks it reached are answered now,
            // not at the next commit (none comes while the log is quiet: a
            // comparison waiting for this position waited out its limit).
            self.progress
                .marks
                .committed(&self.inner.views, &self.view, position, &[], position);
        }
        Ok(())
    }

    async fn apply_blocking(
        &mut self,
        batch: &Arc<Vec<RecordedEvent>>,
        range: std::ops::Range<usize>,
    ) -> Result<(), ProjectionError> {
        let Some(mut projector) = self.projector.take() else {
            return Err(self.lost_projector());
        };
        let events = batch.clone();
        let before = projector.checkpoint();
        let started = Instant::now();
        let handed = range.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let result = projector.apply(&events[range]);
            (projector, result)
        })
        .await;
        let took = started.elapsed();
        let (projector, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                return Err(ProjectionError::Instantiate {
                    projection: self.module.name().to_string(),
                    version: self.module.version().to_string(),
                    reason: format!("applying a batch panicked: {e}"),
                });
            }
        };
        let after = projector.checkpoint();
        self.projector = Some(projector);
        result?;
        self.progress.batch_latency.record(took);
        if after > before {
            let applied = batch
                .iter()
                .filter(|e| e.position > before && e.position <= after)
                .count() as u64;
            self.progress.applied.fetch_add(applied, Ordering::Relaxed);
            // A commit landed: whatever paused the worker is over (cleared
            // before waiters see the new checkpoint).
            if self.progress.paused().is_some() {
                tracing::info!(checkpoint = after, "resumed after a host fault");
                self.progress.set_paused(None);
            }
            self.progress.advance(after);
            if self.slot == Slot::View {
                // Standing at `after` until the next batch: pinned now where
                // a comparison or a digest asked for it.
                self.progress.marks.committed(
                    &self.inner.views,
                    &self.view,
                    before,
                    &[&batch[handed]],
                    after,
                );
            }
        }
        Ok(())
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::RetryParked(reply) => {
                let result = self.retry_parked().await;
                let _ = reply.send(result);
            }
        }
    }

    /// Runs each parked event through the projection again, in position order,
    /// each in its own step: one that now succeeds has its writes committed
    /// together with its removal from the list (the checkpoint does not move),
    /// so a crash anywhere applies no event twice; one that fails again stays,
    /// with its new error.
    async fn retry_parked(&mut self) -> Result<usize, LifecycleError> {
        let all = parked::load(&self.inner.views, &self.view)?;
        if all.is_empty() {
            return Ok(0);
        }
        let view = self.view.clone();
        let views = self.inner.views.clone();
        let module = self.module.clone();
        let retry = self.retry.take();
        let joined = tokio::task::spawn_blocking(move || {
            let mut instance = match retry {
                Some(i) => i,
                None => {
                    let source = views.source(&view)?;
                    Instance::new(&module, Box::new(source))?
                }
            };
            let mut left = 0;
            let mut retried = 0;
            for mut p in all {
                let position = p.event.position;
                match instance.apply(std::slice::from_ref(&p.event)) {
                    Ok(writes) => {
                        views.commit_unparked(&view, &writes, position)?;
                        retried += 1;
                    }
                    Err(e) => {
                        p.error = e.to_string();
                        views.update_parked(&view, position, &p.encode())?;
                        left += 1;
                    }
                }
            }
            Ok::<_, LifecycleError>((instance, left, retried))
        })
        .await
        .map_err(|e| LifecycleError::Failed {
            id: self.view.clone(),
            reason: format!("retrying parked events panicked: {e}"),
        })?;
        let (instance, left, retried) = joined?;
        self.retry = Some(instance);
        self.progress.parked.store(left, Ordering::Release);
        tracing::info!(retried, still_parked = left, "retried parked events");
        Ok(retried)
    }
}

/// Is this error about the event (the guest refused or misbehaved on it),
/// rather than about the host (storage, instantiation)?
fn is_poison(e: &ProjectionError) -> bool {
    !matches!(
        e,
        ProjectionError::View { .. }
            | ProjectionError::Instantiate { .. }
            | ProjectionError::SplitDependent { .. }
    )
}
