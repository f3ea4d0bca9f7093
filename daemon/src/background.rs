//! Work that reads views beside live traffic (comparisons, digests,
//! snapshot exports) runs on a thread of its own at the lowest CPU priority
//! (nice 19): it takes the CPU the live views leave, so a diff or a digest
//! is something their readers do not notice (issue 32). On a machine with
//! idle cores it runs at full speed.

/// Lowers the calling thread's CPU priority to nice 19 (Linux: per thread;
/// threads it starts inherit it).
pub fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; `0` names the
    // calling thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// At most this many such threads at once (diffs asked through the API are
/// bounded by nothing else but the connection limit): the others wait.
const THREADS: usize = 4;
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(THREADS);

/// Runs the blocking `work` on a new thread named `name` at the lowest CPU
/// priority and answers its result. `None` when the thread could not start
/// or `work` panicked (the caller names what failed).
pub async fn at_lowest_priority<T, F>(name: &str, work: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // Never closed: a permit always comes. Held by the thread, not by the
    // caller: a caller that goes away (a client hanging up on a diff) does
    // not free a slot while its thread still reads.
    let slot = SLOTS.acquire().await.ok()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _slot = slot;
            lowest_priority();
            let _ = tx.send(work());
        })
        .ok()?;
    rx.await.ok()
}
