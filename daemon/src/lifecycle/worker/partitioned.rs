//! Parallel warm-up by stream partition.
//!
//! A view whose every document depends only on one stream's events (manifest
//! `per_stream`) warms with K workers (`warmup_workers`): stream `s` belongs
//! to partition `fnv1a(s) mod K`. The view's worker becomes the coordinator:
//! it reads the log once and hands each partition's worker its share of every
//! batch, with the batch's last position. Each partition worker has its own
//! instance and its own checkpoint (`partition/<view>/<i>` in the views
//! database), committed with its documents in one write batch, and moves it
//! to the batch's last position even when its share was empty.
//!
//! - **Start.** The view's checkpoint `c` is split into K partition
//!   checkpoints, all `c`, in one write batch (`ViewStore::split`); the
//!   view's own checkpoint is tagged as split while they exist.
//! - **Progress.** Every event up to the lowest partition checkpoint is
//!   applied: that is the view's checkpoint in status and for waiters.
//! - **End.** When every partition stands at the last position handed out and
//!   the log's head is within one warm-up batch of it, the partitions merge
//!   into the view's checkpoint in one write batch (`ViewStore::merge`) and
//!   the worker goes on alone, as any worker (its caught-up check follows).
//! - **Crash, stop, fault.** Each partition resumes from its own checkpoint:
//!   the coordinator reads from the lowest, and a partition skips what it
//!   has applied. A host fault in any partition stops them all (what they
//!   committed stays) and the round starts again after the usual backoff; a
//!   projection failure fails the version, as it would alone. The partition
//!   count is stored, so a restart with another `warmup_workers` finishes
//!   the warm-up it started.
//!
//! Each partition worker applies its shares as a warming worker does, in
//! steps of `warmup_batch / K` events, each once live workers are idle: K of
//! them keep a live batch waiting no longer than one warming worker would.
//!
//! Documents equal a single worker's: a stream's events reach one partition,
//! in log order, and its documents see only them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::{Command, FAULT_RETRY_FIRST, Halt, Progress, Worker};
use crate::lifecycle::LifecycleError;
use crate::store::{Position, RecordedEvent};
use crate::views::{Slot, ViewError};

/// Shares queued per partition worker.
const QUEUED_SHARES: usize = 2;

/// The partition (of `of`) that stream `stream` belongs to: FNV-1a, so it is
/// the same in every process and release (a stored warm-up resumes with it).
pub(crate) fn partition_of(stream: &str, of: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(of.max(1))) as u32
}

/// A partition's part of one batch of the log.
struct Share {
    events: Arc<Vec<RecordedEvent>>,
    /// The batch's last position: the partition's checkpoint afterwards.
    through: Position,
    /// The head the coordinator reads toward: a grouped window of the
    /// partition is applied once its shares reach it.
    head: Position,
}

/// What a partition worker tells the coordinator.
enum Report {
    Done {
        index: usize,
        checkpoint: Position,
        applied: u64,
        /// Of them, applied in windows grouped by stream.
        grouped: u64,
        parked: usize,
        /// Why the partition stopped grouping windows, if it did.
        warning: Option<String>,
    },
    Halted {
        index: usize,
        halt: Halt,
    },
}

/// A view store error met by the coordinator: the disk's fault, or state
/// that cannot be trusted (the version fails, naming it).
fn halt_of(e: ViewError) -> Halt {
    match e {
        ViewError::Storage { .. } => Halt::Fault {
            reason: e.to_string(),
        },
        e => Halt::Failed {
            position: None,
            reason: e.to_string(),
        },
    }
}

impl Worker {
    /// Runs the view's partitioned warm-up, when it has one stored or should
    /// start one, until the partitions merge; host faults pause and retry.
    /// `Err` only with [`Halt::Stopped`] or [`Halt::Failed`].
    pub(super) async fn warm_in_partitions(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), Halt> {
        let mut backoff = FAULT_RETRY_FIRST;
        loop {
            match self.partitioned_round(stop_rx, commands).await {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    // The view's checkpoint moved under the projector.
                    self.projector = None;
                    match self.open().await {
                        Ok(()) => return Ok(()),
                        Err(e) => match Halt::of(e, None) {
                            Halt::Fault { reason } => {
                                if !self.pause(&reason, &mut backoff, stop_rx).await {
                                    return Err(Halt::Stopped);
                                }
                            }
                            _ => {
                                return Err(Halt::Failed {
                                    position: None,
                                    reason: self.open_error.take().unwrap_or_default(),
                                });
                            }
                        },
                    }
                }
                Err(Halt::Fault { reason }) => {
                    if !self.pause(&reason, &mut backoff, stop_rx).await {
                        return Err(Halt::Stopped);
                    }
                }
                Err(Halt::SplitDependent(violation)) => {
                    let reason = violation.to_string();
                    tracing::warn!(
                        "{reason}: warming again from the first event with one worker, in log order"
                    );
                    self.progress.set_warning(Some(reason.clone()));
                    if let Err(halt) = self.unsplit(&reason).await {
                        match halt {
                            Halt::Fault { reason } => {
                                if !self.pause(&reason, &mut backoff, stop_rx).await {
                                    return Err(Halt::Stopped);
                                }
                            }
                            halt => return Err(halt),
                        }
                    }
                }
                Err(halt) => return Err(halt),
            }
        }
    }

    /// One run of the partition workers: `Ok(true)` when they merged,
    /// `Ok(false)` when this view warms with one worker.
    async fn partitioned_round(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<bool, Halt> {
        let views = self.inner.views.clone();
        if let Some((reason, pending)) = views.unsplit_reason(&self.view).map_err(halt_of)? {
            // A split warm-up of this view met a shared document: never
            // again, and a reset cut short by a crash is finished first.
            self.progress.set_warning(Some(reason.clone()));
            if pending {
                self.unsplit(&reason).await?;
            }
            return Ok(false);
        }
        let checkpoints = match views.partitions(&self.view).map_err(halt_of)? {
            Some(stored) => stored,
            None => {
                let workers = self.inner.warmup_workers.load(Ordering::Relaxed);
                if workers <= 1
                    || !self.module.manifest().per_stream
                    || !self.progress.warming.load(Ordering::Acquire)
                {
                    return Ok(false);
                }
                let head = self.inner.store.head().await.map_err(|e| Halt::Fault {
                    reason: format!("reading the log head: {e}"),
                })?;
                let left = head.saturating_sub(self.progress.checkpoint());
                if left < self.inner.config.warmup_partition_min_events {
                    return Ok(false);
                }
                let at = views.split(&self.view, workers as u32).map_err(halt_of)?;
                tracing::info!(at, workers, "warming in partitions");
                vec![at; workers]
            }
        };
        let of = checkpoints.len() as u32;
        self.progress
            .partitions
            .store(checkpoints.len(), Ordering::Relaxed);
        let (stop_parts, parts_stop_rx) = watch::channel(false);
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        let mut shares = Vec::with_capacity(checkpoints.len());
        for (index, &checkpoint) in checkpoints.iter().enumerate() {
            let (tx, rx) = mpsc::channel(QUEUED_SHARES);
            shares.push(tx);
            let part = Worker {
                inner: self.inner.clone(),
                view: self.view.clone(),
                module: self.module.clone(),
                progress: Progress::new(checkpoint, true, 0),
                poison: self.poison,
                projector: None,
                retry: None,
                target: None,
                open_error: None,
                slot: Slot::Partition {
                    index: index as u32,
                    of,
                },
                gathered: Default::default(),
                ungrouped: None,
            };
            let span = tracing::info_span!("partition", index, of);
            tasks.spawn(
                part.run_partition(index, rx, parts_stop_rx.clone(), report_tx.clone())
                    .instrument(span),
            );
        }
        drop(report_tx);
        let outcome = self
            .coordinate(checkpoints, &shares, &mut reports, stop_rx, commands)
            .await;
        // Every partition stops after its current step (on success each has
        // applied all it was given) and is waited for.
        let _ = stop_parts.send(true);
        drop(shares);
        while tasks.join_next().await.is_some() {}
        let at = outcome?;
        views.merge(&self.view, at).map_err(halt_of)?;
        tracing::info!(at, partitions = of, "partitions merged");
        Ok(true)
    }

    /// Reads the log once and hands out the partitions' shares until every
    /// partition stands at the last position handed out, within one warm-up
    /// batch of the head: that position.
    async fn coordinate(
        &mut self,
        mut checkpoints: Vec<Position>,
        shares: &[mpsc::Sender<Share>],
        reports: &mut mpsc::UnboundedReceiver<Report>,
        stop_rx: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<Position, Halt> {
        let of = checkpoints.len() as u32;
        let slack = self.inner.config.warmup_batch.max(1) as u64;
        let lowest = |c: &[Position]| c.iter().copied().min().unwrap_or(0);
        let mut handed_out = lowest(&checkpoints);
        if handed_out > self.progress.checkpoint() {
            self.progress.advance(handed_out);
        }
        let mut target = 0;
        let mut closing = false;
        // The store's own tail (comparisons hold only caught-up views'
        // tails), read ahead of the partitions by their windows.
        let budget = match self.inner.config.warmup_group_bytes {
            0 => super::ahead::LOG_ORDER_AHEAD,
            window => window,
        };
        let mut tail = super::ahead::ahead(
            self.inner.store.tail(handed_out + 1),
            budget,
            Some(self.gate()),
        );
        loop {
            let low = lowest(&checkpoints);
            let high = checkpoints.iter().copied().max().unwrap_or(0);
            if !closing && low >= target {
                let head = self.inner.store.head().await.map_err(|e| Halt::Fault {
                    reason: format!("reading the log head: {e}"),
                })?;
                self.inner.head.fetch_max(head, Ordering::AcqRel);
                if handed_out < high {
                    // Resumed unevenly: hand out at least up to the furthest.
                    target = high;
                } else if head.saturating_sub(low) <= slack {
                    closing = true;
                } else {
                    target = head;
                }
            }
            if closing && checkpoints.iter().all(|c| *c == handed_out) {
                return Ok(handed_out);
            }
            tokio::select! {
                biased;
                _ = stop_rx.changed() => return Err(Halt::Stopped),
                Some(cmd) = commands.recv() => match cmd {
                    Command::RetryParked(reply) => {
                        let _ = reply.send(Err(LifecycleError::WarmingInPartitions {
                            id: self.view.clone(),
                            partitions: of as usize,
                        }));
                    }
                },
                report = reports.recv() => match report {
                    Some(Report::Done { index, checkpoint, applied, grouped, parked, warning }) => {
                        checkpoints[index] = checkpoint;
                        self.progress.applied.fetch_add(applied, Ordering::Relaxed);
                        self.progress.grouped.fetch_add(grouped, Ordering::Relaxed);
                        if warning.is_some() && self.progress.warning().is_none() {
                            self.progress.set_warning(warning);
                        }
                        if parked > 0 {
                            self.progress.parked.store(parked, Ordering::Release);
                        }
                        let low = lowest(&checkpoints);
                        if low > self.progress.checkpoint() {
                            self.progress.set_paused(None);
                            self.progress.advance(low);
                        }
                    }
                    Some(Report::Halted { index, halt }) => {
                        tracing::warn!(index, "a warm-up partition halted");
                        return Err(halt);
                    }
                    None => {
                        return Err(Halt::Fault {
                            reason: "the warm-up's partition workers ended".into(),
                        });
                    }
                },
                next = tail.next(), if !closing => match next {
                    None => return Err(Halt::Stopped),
                    Some(Err(e)) => {
                        return Err(Halt::Fault {
                            reason: format!("the log is unreadable: {e}"),
                        });
                    }
                    Some(Ok(batch)) => {
                        let Some(through) = batch.last().map(|e| e.position) else {
                            continue;
                        };
                        self.inner.head.fetch_max(through, Ordering::AcqRel);
                        let mut parts: Vec<Vec<RecordedEvent>> = vec![Vec::new(); of as usize];
                        for event in batch {
                            parts[partition_of(event.stream.as_str(), of) as usize].push(event);
                        }
                        for (part, share) in parts.into_iter().zip(shares) {
                            let share_of = Share { events: Arc::new(part), through, head: target };
                            tokio::select! {
                                biased;
                                _ = stop_rx.changed() => return Err(Halt::Stopped),
                                sent = share.send(share_of) => if sent.is_err() {
                                    // Its worker halted: its report says why.
                                    break;
                                },
                            }
                        }
                        handed_out = through;
                    }
                },
            }
        }
    }

    /// A partition's worker: applies each share as a warming worker applies a
    /// batch, then moves its checkpoint to the share's last position.
    async fn run_partition(
        mut self,
        index: usize,
        mut shares: mpsc::Receiver<Share>,
        mut stop_rx: watch::Receiver<bool>,
        reports: mpsc::UnboundedSender<Report>,
    ) {
        if let Err(e) = self.open().await {
            let halt = match Halt::of(e, None) {
                Halt::Fault { reason } => Halt::Fault { reason },
                _ => Halt::Failed {
                    position: None,
                    reason: self.open_error.take().unwrap_or_default(),
                },
            };
            let _ = reports.send(Report::Halted { index, halt });
            return;
        }
        loop {
            // Shares are gathered into a window (see `grouped.rs`) while more
            // are queued and the window is not full; a view that does not
            // group applies each share as it comes.
            let share = tokio::select! {
                biased;
                _ = stop_rx.changed() => return,
                share = shares.recv() => match share {
                    Some(share) => Some(share),
                    None => return,
                },
                _ = tokio::time::sleep_until(self.gathered.linger_until()), if !self.gathered.is_empty() => None,
            };
            if share.is_some() && !self.gathered.is_empty() && !self.groups() {
                // Gathered while grouping: applied before the share after it.
                if let Err(halt) = self.apply_gathered(&mut stop_rx).await {
                    if !matches!(halt, Halt::Stopped) {
                        let _ = reports.send(Report::Halted { index, halt });
                    }
                    return;
                }
            }
            let before = self.progress.applied.load(Ordering::Relaxed);
            let grouped_before = self.progress.grouped.load(Ordering::Relaxed);
            let done = match share {
                Some(share) if self.groups() => {
                    let events = Arc::try_unwrap(share.events).unwrap_or_else(|e| (*e).clone());
                    self.gathered.aim(share.head);
                    self.gathered.push(events, share.through);
                    if !self.window_full() {
                        continue;
                    }
                    self.apply_gathered(&mut stop_rx).await
                }
                Some(share) => match self.apply_warming(&share.events, &mut stop_rx).await {
                    Ok(()) => self.advance_to(share.through).await,
                    Err(halt) => Err(halt),
                },
                None => self.apply_gathered(&mut stop_rx).await,
            };
            let report = match done {
                Ok(()) => Report::Done {
                    index,
                    checkpoint: self.progress.checkpoint(),
                    applied: self.progress.applied.load(Ordering::Relaxed) - before,
                    grouped: self.progress.grouped.load(Ordering::Relaxed) - grouped_before,
                    parked: self.progress.parked.load(Ordering::Acquire),
                    warning: self.ungrouped.clone(),
                },
                Err(Halt::Stopped) => return,
                Err(halt) => Report::Halted { index, halt },
            };
            let halted = matches!(report, Report::Halted { .. });
            if reports.send(report).is_err() || halted {
                return;
            }
        }
    }

    /// Empties the view to warm it again with one worker from the first
    /// event (see [`crate::views::ViewStore::unsplit`]), and opens it.
    async fn unsplit(&mut self, reason: &str) -> Result<(), Halt> {
        self.projector = None;
        let views = self.inner.views.clone();
        let view = self.view.clone();
        let reason = reason.to_string();
        tokio::task::spawn_blocking(move || views.unsplit(&view, &reason))
            .await
            .map_err(|e| Halt::Fault {
                reason: format!("emptying the view panicked: {e}"),
            })?
            .map_err(halt_of)?;
        self.progress.partitions.store(0, Ordering::Relaxed);
        self.progress.parked.store(0, Ordering::Release);
        self.open().await.map_err(|e| Halt::of(e, None))
    }

    /// The streams of `batch[range]` whose events, each applied alone to the
    /// committed view (nothing is committed), touch document `key`: what a
    /// split-dependence warning names. Best effort: an error names none.
    pub(super) fn streams_touching(
        &self,
        batch: &Arc<Vec<RecordedEvent>>,
        range: std::ops::Range<usize>,
        key: &str,
    ) -> impl std::future::Future<Output = Vec<String>> + Send + 'static {
        let module = self.module.clone();
        let views = self.inner.views.clone();
        let view = self.view.clone();
        let batch = batch.clone();
        let key = key.as_bytes().to_vec();
        let found = tokio::task::spawn_blocking(move || {
            let source = views.source(&view).ok()?;
            let mut instance = crate::runtime::Instance::new(&module, Box::new(source)).ok()?;
            instance.track_reads();
            let mut streams: Vec<String> = Vec::new();
            for e in &batch[range] {
                let Ok(writes) = instance.apply(std::slice::from_ref(e)) else {
                    continue;
                };
                let touched = instance.touched();
                let hit = writes.contains_key(&key)
                    || touched.reads.contains(&key)
                    || touched.scans.iter().any(|p| key.starts_with(p));
                let stream = e.stream.as_str();
                if hit && !streams.iter().any(|s| s == stream) {
                    streams.push(stream.to_string());
                    if streams.len() == 3 {
                        break;
                    }
                }
            }
            Some(streams)
        });
        async move { found.await.ok().flatten().unwrap_or_default() }
    }

    /// Moves the projector's checkpoint to `through` (nothing of its share
    /// was left to apply before it).
    pub(super) async fn advance_to(&mut self, through: Position) -> Result<(), Halt> {
        let Some(mut projector) = self.projector.take() else {
            return Err(Halt::Fault {
                reason: "the projector was lost after an earlier failure".into(),
            });
        };
        if projector.checkpoint() >= through {
            self.projector = Some(projector);
            return Ok(());
        }
        let joined = tokio::task::spawn_blocking(move || {
            let result = projector.advance_to(through);
            (projector, result)
        })
        .await;
        let (projector, result) = joined.map_err(|e| Halt::Fault {
            reason: format!("moving a partition's checkpoint panicked: {e}"),
        })?;
        self.projector = Some(projector);
        result.map_err(|e| Halt::of(e, None))?;
        self.progress.advance(through);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::partition_of;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a stored warm-up resumes with the same assignment in
        // any later release.
        assert_eq!(partition_of("user-1", 7), 6);
        assert_eq!(partition_of("order-42", 3), 2);
        let mut counts = [0usize; 4];
        for i in 0..10_000 {
            counts[partition_of(&format!("user-{i}"), 4) as usize] += 1;
        }
        for c in counts {
            assert!((2_000..3_000).contains(&c), "uneven spread: {counts:?}");
        }
        assert_eq!(partition_of("anything", 1), 0);
    }
}
