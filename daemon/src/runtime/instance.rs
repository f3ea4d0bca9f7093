//! Running a module: an [`Instance`] applies batches of events and returns their
//! writes; a [`Projector`] commits them, with the checkpoint, to a view.

// A ProjectionError carries names, positions and messages for the operator; it
// is returned once per failed batch (which stops the view), never in a loop.
#![allow(clippy::result_large_err)]

use kiln_sdk::abi::{APPLY_FAILED, APPLY_OK, BatchWriter, EXPORT_ALLOC, EXPORT_APPLY};
use wasmtime::{Store, Trap, TypedFunc};

use std::time::Instant;

use super::host::{Fault, HostState, LimitHit};
use super::{EPOCH_TICK, Module, ProjectionError};
use crate::store::{Position, RecordedEvent};
use crate::views::owners::{HeldClaims, Touched};
use crate::views::{DocumentSource, Slot, ViewId, ViewStore, Writes};

struct Live {
    store: Store<HostState>,
    alloc: TypedFunc<i32, i32>,
    apply: TypedFunc<(i32, i32), i32>,
}

/// Runs a module over batches, reading committed documents from a
/// [`DocumentSource`]. Every batch runs in a fresh instance (nothing a module
/// keeps in its globals, memory or tables reaches the next batch), so a view
/// depends on its events only, never on how they were batched.
pub struct Instance {
    module: Module,
    /// The next batch's instance, made ahead (at [`Instance::new`], which
    /// checks that the module instantiates).
    live: Option<Live>,
    /// The source, while no instance is made.
    idle_source: Option<Box<dyn DocumentSource>>,
    batch: BatchWriter,
    positions: Vec<Position>,
    /// Keep what each batch reads ([`Instance::touched`]).
    tracking: bool,
    touched: Touched,
}

impl Instance {
    pub fn new(module: &Module, source: Box<dyn DocumentSource>) -> Result<Self, ProjectionError> {
        let mut inst = Instance {
            module: module.clone(),
            live: None,
            idle_source: None,
            batch: BatchWriter::new(),
            positions: Vec::new(),
            tracking: false,
            touched: Touched::default(),
        };
        inst.live = Some(inst.instantiate(source)?);
        Ok(inst)
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    /// From now on, keep what each batch reads and scans.
    pub fn track_reads(&mut self) {
        self.tracking = true;
    }

    /// What the last batch read and scanned (empty unless tracking).
    pub fn touched(&self) -> &Touched {
        &self.touched
    }

    /// [`Self::touched`], taken.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    fn error_ctx(&self) -> (String, String) {
        (
            self.module.name().to_string(),
            self.module.version().to_string(),
        )
    }

    /// The instance made ahead, or a new one.
    fn take_live(&mut self) -> Result<Live, ProjectionError> {
        if let Some(live) = self.live.take() {
            return Ok(live);
        }
        match self.idle_source.take() {
            Some(source) => self.instantiate(source),
            None => Err(self.instantiate_error("lost its view source")),
        }
    }

    fn instantiate_error(&self, reason: &str) -> ProjectionError {
        let (projection, version) = self.error_ctx();
        ProjectionError::Instantiate {
            projection,
            version,
            reason: reason.to_string(),
        }
    }

    fn instantiate(&mut self, source: Box<dyn DocumentSource>) -> Result<Live, ProjectionError> {
        let rt = self.module.runtime();
        let deadline = Instant::now() + rt.config.batch_deadline;
        let state = HostState::new(
            source,
            rt.config.memory_cap,
            rt.config.limits.clone(),
            deadline,
        );
        let mut store = Store::new(&rt.engine, state);
        store.limiter(|st| st as &mut dyn wasmtime::ResourceLimiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(rt.config.batch_deadline));
        let fail = |e: wasmtime::Error| format!("{e:#}");
        let made = self
            .module
            .pre()
            .instantiate(&mut store)
            .map_err(fail)
            .and_then(|instance| {
                let memory = instance
                    .get_memory(&mut store, "memory")
                    .ok_or_else(|| "no memory export".to_string())?;
                store.data_mut().memory = Some(memory);
                let alloc = instance
                    .get_typed_func::<i32, i32>(&mut store, EXPORT_ALLOC)
                    .map_err(fail)?;
                let apply = instance
                    .get_typed_func::<(i32, i32), i32>(&mut store, EXPORT_APPLY)
                    .map_err(fail)?;
                Ok((alloc, apply))
            });
        match made {
            Ok((alloc, apply)) => Ok(Live {
                store,
                alloc,
                apply,
            }),
            Err(reason) => {
                // Keep the source for another attempt.
                self.idle_source = Some(store.into_data().source);
                Err(self.instantiate_error(&reason))
            }
        }
    }

    /// Stops keeping what each batch reads (a view's own instance between
    /// grouped windows).
    pub fn untrack_reads(&mut self) {
        self.tracking = false;
    }

    /// Runs `events` through the projection (those its manifest does not want are
    /// skipped) and returns the batch's writes. Nothing is committed here.
    pub fn apply(&mut self, events: &[RecordedEvent]) -> Result<Writes, ProjectionError> {
        let events: Vec<&RecordedEvent> = events.iter().collect();
        self.apply_over(&events, None)
    }

    /// [`Self::apply`] reading `pending` (writes not committed yet) between
    /// the batch's own writes and the committed view.
    pub fn apply_over(
        &mut self,
        events: &[&RecordedEvent],
        pending: Option<std::sync::Arc<Writes>>,
    ) -> Result<Writes, ProjectionError> {
        self.batch.clear();
        self.positions.clear();
        self.touched = Touched::default();
        for e in events {
            if self.module.wants(e.stream.as_str(), &e.event_type) {
                self.positions.push(e.position);
                encode_event(&mut self.batch, e);
            }
        }
        if self.batch.is_empty() {
            return Ok(Writes::new());
        }
        let first = events.first().map_or(0, |e| e.position);
        let last = events.last().map_or(0, |e| e.position);
        let mut live = self.take_live()?;
        live.store.data_mut().touched = self.tracking.then(Touched::default);
        live.store.data_mut().pending = pending;
        let result = self.call_guest(&mut live);
        let st = live.store.data_mut();
        self.touched = st.touched.take().unwrap_or_default();
        let outcome = match result {
            Ok(APPLY_OK) => Ok(std::mem::take(&mut st.writes)),
            Ok(APPLY_FAILED) => Err(match st.failure.take() {
                Some((index, message)) => Outcome::Failed { index, message },
                None => Outcome::Malformed(
                    "kiln_apply returned 1 (failed) without calling kiln.fail".into(),
                ),
            }),
            Ok(other) => Err(Outcome::Malformed(format!(
                "kiln_apply returned {other}, expected 0 or 1"
            ))),
            Err(e) => Err(classify(st, &e)),
        };
        // The instance served its batch: the next one starts afresh.
        self.idle_source = Some(live.store.into_data().source);
        outcome.map_err(|o| self.error(o, first, last))
    }

    fn call_guest(&self, live: &mut Live) -> Result<i32, wasmtime::Error> {
        let deadline = self.module.runtime().config.batch_deadline;
        live.store.data_mut().deadline = Instant::now() + deadline;
        live.store.set_epoch_deadline(deadline_ticks(deadline));
        let bytes = self.batch.bytes();
        let len = i32::try_from(bytes.len())
            .map_err(|_| wasmtime::Error::msg("batch larger than 2 GiB"))?;
        let ptr = live.alloc.call(&mut live.store, len)?;
        let memory = live
            .store
            .data()
            .memory
            .ok_or_else(|| wasmtime::Error::msg("instance has no memory"))?;
        if memory
            .write(&mut live.store, ptr as u32 as usize, bytes)
            .is_err()
        {
            let reason = format!("kiln_alloc({len}) returned {ptr}, outside the guest's memory");
            live.store.data_mut().fault = Some(Fault::Malformed(reason.clone()));
            return Err(wasmtime::Error::msg(reason));
        }
        live.apply.call(&mut live.store, (ptr, len))
    }

    fn error(&self, outcome: Outcome, first: Position, last: Position) -> ProjectionError {
        let (projection, version) = self.error_ctx();
        let position_of = |index: u32| self.positions.get(index as usize).copied().unwrap_or(first);
        match outcome {
            Outcome::Failed { index, message } => ProjectionError::Failed {
                projection,
                version,
                position: position_of(index),
                message,
            },
            Outcome::Panic { index, message } => ProjectionError::Panic {
                projection,
                version,
                position: position_of(index),
                message,
            },
            Outcome::Deadline => ProjectionError::Deadline {
                projection,
                version,
                first,
                last,
                millis: self.module.runtime().config.batch_deadline.as_millis(),
            },
            Outcome::MemoryCap(wanted) => ProjectionError::MemoryCap {
                projection,
                version,
                first,
                last,
                cap: self.module.runtime().config.memory_cap,
                wanted,
            },
            Outcome::Malformed(reason) => ProjectionError::Malformed {
                projection,
                version,
                first,
                last,
                reason,
            },
            Outcome::View(source) => ProjectionError::View {
                view: self.module.view_id().clone(),
                first,
                last,
                source,
            },
            Outcome::Limit(hit) => ProjectionError::Limit {
                projection,
                version,
                first,
                last,
                what: hit.what,
                value: hit.value,
                limit: hit.limit,
                key: hit.key,
            },
            Outcome::Trap(reason) => ProjectionError::Trap {
                projection,
                version,
                first,
                last,
                reason,
            },
        }
    }
}

/// Appends a recorded event to a batch in the ABI's encoding.
pub fn encode_event(batch: &mut BatchWriter, e: &RecordedEvent) {
    batch.push(
        e.position,
        e.version,
        e.timestamp,
        e.stream.as_str(),
        &e.event_type,
        &e.data,
        e.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
}

enum Outcome {
    Failed { index: u32, message: String },
    Panic { index: u32, message: String },
    Deadline,
    MemoryCap(usize),
    Limit(LimitHit),
    Malformed(String),
    View(crate::views::ViewError),
    Trap(String),
}

/// What a trapped call means, from what the host saw during it.
fn classify(st: &mut HostState, e: &wasmtime::Error) -> Outcome {
    if let Some((index, message)) = st.panic.take() {
        return Outcome::Panic { index, message };
    }
    if let Some(wanted) = st.memory_refused.take() {
        return Outcome::MemoryCap(wanted);
    }
    match st.fault.take() {
        Some(Fault::Malformed(reason)) => return Outcome::Malformed(reason),
        Some(Fault::View(e)) => return Outcome::View(e),
        Some(Fault::Limit(hit)) => return Outcome::Limit(hit),
        Some(Fault::Deadline) => return Outcome::Deadline,
        None => {}
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return Outcome::Deadline;
    }
    Outcome::Trap(format!("{e:#}"))
}

fn deadline_ticks(deadline: std::time::Duration) -> u64 {
    (deadline.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1
}

/// A module bound to its view: applies batches and commits each batch's writes
/// with the view's new checkpoint in one RocksDB write batch.
pub struct Projector {
    instance: Instance,
    views: ViewStore,
    view: ViewId,
    /// Whose checkpoint this projector moves: the view's, or one warm-up
    /// partition's.
    slot: Slot,
    checkpoint: Position,
    /// What this projector claimed in a split warm-up (see `views::owners`).
    held: HeldClaims,
    /// A grouped window being applied, not committed yet.
    window: Option<Window>,
}

/// A grouped window in progress (see `lifecycle/worker/grouped.rs`): what
/// its calls wrote (not committed: later calls read it), what they read,
/// and which unit touched each document.
struct Window {
    pending: std::sync::Arc<Writes>,
    /// Every call's reads and scans, for a split warm-up's claims.
    touched: Touched,
    owners: std::collections::HashMap<Vec<u8>, Owner>,
    /// The unit of the last call, and how many units made calls.
    unit: Option<u32>,
    units: u32,
    /// A prefix some call scanned.
    scanned: Option<Vec<u8>>,
    first: Position,
    events: u64,
}

/// Who touched a document in a window: the first unit, whether any unit
/// wrote it, whether another unit touched it too.
struct Owner {
    unit: u32,
    written: bool,
    shared: bool,
}

/// Why a window's calls may differ from applying its events in log order:
/// a document written by one unit and touched by another, or a scan in a
/// window of more than one unit. Nothing of the window may be committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ungroupable {
    /// The document's key, or the prefix scanned (lossy UTF-8).
    pub key: String,
    /// The unit that touched it first (None for a scan).
    pub first: Option<u32>,
    /// The unit whose call met it.
    pub unit: u32,
}

impl Projector {
    /// Opens (creating if needed) the module's view and reads its checkpoint.
    pub fn open(module: &Module, views: &ViewStore) -> Result<Self, ProjectionError> {
        Self::open_at(module, views, Slot::View)
    }

    /// [`Self::open`] committing to the checkpoint of `slot`.
    pub fn open_at(
        module: &Module,
        views: &ViewStore,
        slot: Slot,
    ) -> Result<Self, ProjectionError> {
        let view = module.view_id().clone();
        let view_err = |source| ProjectionError::View {
            view: view.clone(),
            first: 0,
            last: 0,
            source,
        };
        views.ensure(&view).map_err(view_err)?;
        let checkpoint = views.checkpoint_at(&view, slot).map_err(view_err)?;
        let source = views.source(&view).map_err(view_err)?;
        let mut instance = Instance::new(module, Box::new(source))?;
        if matches!(slot, Slot::Partition { .. }) {
            // A split warm-up claims what each batch touches.
            instance.track_reads();
        }
        Ok(Projector {
            instance,
            views: views.clone(),
            view,
            slot,
            checkpoint,
            held: HeldClaims::default(),
            window: None,
        })
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    pub fn view(&self) -> &ViewId {
        &self.view
    }

    pub fn module(&self) -> &Module {
        self.instance.module()
    }

    /// The last position committed to the view (0 for a fresh one).
    pub fn checkpoint(&self) -> Position {
        self.checkpoint
    }

    /// Applies the events after the checkpoint (earlier ones were applied
    /// already and are skipped) and commits their writes and the new checkpoint
    /// atomically. On error nothing is committed and the checkpoint stays.
    pub fn apply(&mut self, events: &[RecordedEvent]) -> Result<(), ProjectionError> {
        let start = events.partition_point(|e| e.position <= self.checkpoint);
        let events = &events[start..];
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(());
        };
        let _span =
            tracing::debug_span!("batch", view = %self.view, first = events[0].position, last)
                .entered();
        let writes = self.instance.apply(events)?;
        let touched = self.instance.take_touched();
        self.commit(&writes, &touched, events[0].position, last)
    }

    /// Applies `events` (log order, after the checkpoint) as one call of a
    /// grouped window on behalf of `unit` (a set of streams; calls of one
    /// unit come one after another). The call reads what the window's
    /// earlier calls wrote; its writes join them, uncommitted. `Ok(Err)`:
    /// the window touched a document from two units with a write, or
    /// scanned in a window of more than one unit, so its calls may differ
    /// from applying its events in log order: drop the window
    /// ([`Self::drop_window`]). On `Err` the window must be dropped too.
    pub fn apply_unit(
        &mut self,
        unit: u32,
        events: &[&RecordedEvent],
    ) -> Result<Result<(), Ungroupable>, ProjectionError> {
        let events: Vec<&RecordedEvent> = events
            .iter()
            .copied()
            .filter(|e| e.position > self.checkpoint)
            .collect();
        let Some(first) = events.first().map(|e| e.position) else {
            return Ok(Ok(()));
        };
        let partition = matches!(self.slot, Slot::Partition { .. });
        let window = self.window.get_or_insert_with(|| Window {
            pending: std::sync::Arc::default(),
            touched: Touched::default(),
            owners: std::collections::HashMap::new(),
            unit: None,
            units: 0,
            scanned: None,
            first,
            events: 0,
        });
        self.instance.track_reads();
        let applied = self
            .instance
            .apply_over(&events, Some(window.pending.clone()));
        if !partition {
            self.instance.untrack_reads();
        }
        let writes = applied?;
        if window.unit != Some(unit) {
            window.unit = Some(unit);
            window.units += 1;
        }
        window.events += events.len() as u64;
        let touched = self.instance.touched();
        if window.scanned.is_none() {
            window.scanned = touched.scans.iter().next().cloned();
        }
        if let Some(prefix) = &window.scanned
            && window.units > 1
        {
            return Ok(Err(Ungroupable {
                key: String::from_utf8_lossy(prefix).into_owned(),
                first: None,
                unit,
            }));
        }
        let keys = writes.keys().map(|k| (k, true)).chain(
            touched
                .reads
                .iter()
                .filter(|k| !writes.contains_key(*k))
                .map(|k| (k, false)),
        );
        for (key, written) in keys {
            let owner = window.owners.entry(key.clone()).or_insert(Owner {
                unit,
                written,
                shared: false,
            });
            owner.shared |= owner.unit != unit;
            owner.written |= written;
            if owner.shared && owner.written {
                return Ok(Err(Ungroupable {
                    key: String::from_utf8_lossy(key).into_owned(),
                    first: Some(owner.unit),
                    unit,
                }));
            }
        }
        if partition {
            window.touched.reads.extend(touched.reads.iter().cloned());
        }
        std::sync::Arc::make_mut(&mut window.pending).extend(writes);
        Ok(Ok(()))
    }

    /// Events applied by the window's calls so far (0: no window).
    pub fn window_events(&self) -> u64 {
        self.window.as_ref().map_or(0, |w| w.events)
    }

    /// Commits the window's writes with the checkpoint `through` in one
    /// write batch (nothing when no call applied anything but the checkpoint).
    pub fn commit_window(&mut self, through: Position) -> Result<(), ProjectionError> {
        let Some(window) = self.window.take() else {
            return self.advance_to(through);
        };
        if through <= self.checkpoint {
            return Ok(());
        }
        let writes = std::sync::Arc::try_unwrap(window.pending).unwrap_or_else(|p| (*p).clone());
        self.commit(&writes, &window.touched, window.first, through)
    }

    /// Forgets the window's writes: nothing of it was committed.
    pub fn drop_window(&mut self) {
        self.window = None;
    }

    /// Moves the checkpoint to `through` with no documents: the events up to
    /// it that this projector was given were all it had to apply (a warm-up
    /// partition's share of a batch).
    pub fn advance_to(&mut self, through: Position) -> Result<(), ProjectionError> {
        if through <= self.checkpoint {
            return Ok(());
        }
        self.commit(
            &Writes::new(),
            &Touched::default(),
            self.checkpoint + 1,
            through,
        )
    }

    /// Commits `writes` and the checkpoint `last`; a split warm-up's
    /// partition claims what the batch touched (`touched`, and the writes)
    /// and refuses a batch that breaks `per_stream` (see `views::owners`).
    fn commit(
        &mut self,
        writes: &Writes,
        touched: &Touched,
        first: Position,
        last: Position,
    ) -> Result<(), ProjectionError> {
        self.views
            .commit_claimed(&self.view, self.slot, writes, touched, &mut self.held, last)
            .map_err(|source| ProjectionError::View {
                view: self.view.clone(),
                first,
                last,
                source,
            })?
            .map_err(|violation| ProjectionError::SplitDependent {
                violation,
                first,
                last,
            })?;
        self.checkpoint = last;
        Ok(())
    }
}
