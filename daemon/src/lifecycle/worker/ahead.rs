//! Reading the log ahead of a warming worker.
//!
//! A warming worker spends most of its time applying; with the tail read
//! only when it asks for the next batch, reading and applying took turns on
//! one thread (a grouped window of 64 MiB: 0.4 s of reading, then 0.5 s of
//! applying). [`ahead`] reads the tail in a task of its own into a queue of
//! at most `budget` bytes (as [`super::grouped::event_bytes`] counts them),
//! so the next window is read while this one is applied.
//!
//! Each read first gives way to live workers, as a warming step does.
//! It changes only when a batch is read, never what the worker is handed:
//! the same batches, errors and end, in the same order. Marks cut the
//! batches after this (see `compare::cut`). Dropping the stream ends the
//! task and drops the store's tail (a read in flight finishes first).

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use super::grouped::event_bytes;
use crate::store::{EventBatches, RecordedEvent, StoreError};

/// What a warming worker's tail reads ahead when it does not gather
/// windows: a few of the store's batches.
pub(super) const LOG_ORDER_AHEAD: usize = 8 << 20;

type Item = Result<Vec<RecordedEvent>, StoreError>;

/// Whom reading ahead gives way to: before each read it waits, as a
/// warming step does, for live workers to be idle (or
/// [`super::WARM_MAX_WAIT`]), unless the view warms at their priority.
pub(in crate::lifecycle) struct Gate {
    pub priority: Arc<super::Priority>,
    pub progress: Arc<super::Progress>,
}

impl Gate {
    async fn pass(&self) {
        use std::sync::atomic::Ordering::Acquire;
        if self.progress.fleet_first.load(Acquire) || !self.progress.warming.load(Acquire) {
            return;
        }
        tokio::select! {
            _ = self.priority.wait_idle() => {}
            _ = tokio::time::sleep(super::WARM_MAX_WAIT) => {}
        }
    }
}

/// `tail`, read ahead by up to `budget` bytes (0: as it is), each read
/// once `gate` lets it.
pub(in crate::lifecycle) fn ahead(
    tail: EventBatches,
    budget: usize,
    gate: Option<Gate>,
) -> EventBatches {
    if budget == 0 {
        return tail;
    }
    let budget = budget.min(u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(budget));
    let (tx, rx) = mpsc::unbounded_channel::<(Item, u32)>();
    let taken = permits.clone();
    tokio::spawn(
        async move {
            let mut tail = tail;
            loop {
                if let Some(gate) = &gate {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = gate.pass() => {}
                    }
                }
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = tail.next() => next,
                };
                let Some(item) = next else { return };
                // A batch larger than the budget waits for an empty queue;
                // an error waits for one too, and nothing is read after it
                // until it is received (the reader of a failing store would
                // spin, queueing errors, while the worker waits to retry).
                let cost = match &item {
                    Ok(batch) => batch.iter().map(event_bytes).sum::<usize>().min(budget),
                    Err(_) => budget,
                } as u32;
                let permit = tokio::select! {
                    _ = tx.closed() => return,
                    p = taken.acquire_many(cost) => p,
                };
                match permit {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
                if tx.send((item, cost)).is_err() {
                    return;
                }
            }
        }
        .in_current_span(),
    );
    futures::stream::unfold((rx, permits), |(mut rx, permits)| async move {
        let (item, cost) = rx.recv().await?;
        permits.add_permits(cost as usize);
        Some((item, (rx, permits)))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::ahead;
    use crate::store::{EventBatches, RecordedEvent, StoreError, StreamId};
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn batch(first: u64, n: u64) -> Vec<RecordedEvent> {
        (first..first + n)
            .map(|position| RecordedEvent {
                id: uuid::Uuid::nil(),
                stream: StreamId::new("s-1").expect("stream"),
                event_type: "T".into(),
                version: position,
                position,
                timestamp: 0,
                metadata: Default::default(),
                tags: Vec::new(),
                data: bytes::Bytes::from_static(b"{}"),
            })
            .collect()
    }

    /// A tail of `batches` batches of 10 events, then an error, then the
    /// end; `read` counts what was taken from it.
    fn source(batches: u64, read: Arc<AtomicUsize>) -> EventBatches {
        futures::stream::iter((0..=batches).map(move |i| {
            read.fetch_add(1, Ordering::SeqCst);
            if i == batches {
                Err(StoreError::Closed)
            } else {
                Ok(batch(i * 10 + 1, 10))
            }
        }))
        .boxed()
    }

    #[tokio::test]
    async fn hands_over_the_same_batches_errors_and_end() {
        let read = Arc::new(AtomicUsize::new(0));
        let got: Vec<_> = ahead(source(5, read), 1 << 20, None).collect().await;
        assert_eq!(got.len(), 6);
        for (i, item) in got.iter().take(5).enumerate() {
            let positions: Vec<u64> = item
                .as_ref()
                .expect("a batch")
                .iter()
                .map(|e| e.position)
                .collect();
            let first = i as u64 * 10 + 1;
            assert_eq!(positions, (first..first + 10).collect::<Vec<_>>());
        }
        assert!(matches!(got[5], Err(StoreError::Closed)));
    }

    #[tokio::test]
    async fn reads_no_more_than_its_budget_ahead() {
        let read = Arc::new(AtomicUsize::new(0));
        // One event costs 2 + 1 + 3 + 64 = 70 bytes: a batch 700; a budget
        // of two batches.
        let mut tail = ahead(source(100, read.clone()), 1400, None);
        let first = tail.next().await;
        assert!(matches!(first, Some(Ok(_))));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Handed one; two queued; one read and waiting for room.
        let taken = read.load(Ordering::SeqCst);
        assert!((3..=4).contains(&taken), "read {taken} batches");
        let rest: Vec<_> = tail.collect().await;
        assert_eq!(rest.len(), 100, "99 batches and the error");
    }

    #[tokio::test]
    async fn nothing_is_read_past_an_error_until_it_is_received() {
        let read = Arc::new(AtomicUsize::new(0));
        let counted = read.clone();
        // Errors only, as a store that fails every read.
        let failing = futures::stream::repeat_with(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Err::<Vec<RecordedEvent>, _>(StoreError::Closed)
        })
        .boxed();
        let mut tail = ahead(failing, 1 << 20, None);
        assert!(matches!(tail.next().await, Some(Err(_))));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Handed one; one queued; one read and waiting for it to be taken.
        let taken = read.load(Ordering::SeqCst);
        assert!(
            taken <= 3,
            "read {taken} times past an error not yet received"
        );
    }

    #[tokio::test]
    async fn dropping_it_ends_the_reading() {
        let read = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Guard(dropped.clone());
        let slow = source(1000, read)
            .then(move |b| {
                let _keep = &guard;
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    b
                }
            })
            .boxed();
        let mut tail = ahead(slow, 1 << 30, None);
        assert!(matches!(tail.next().await, Some(Ok(_))));
        drop(tail);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the store's tail outlived the stream read ahead of it");
    }
}
