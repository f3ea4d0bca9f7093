//! Benchmarks behind `kiln bench`: each prints its figures next to a baseline
//! measured in the same run, with the ratio, so numbers compare across machines.

pub mod bootstrap;
pub mod diff;
pub mod http;
pub mod lag;
pub mod projection;
pub mod slow_diff;
pub mod store;

use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The store core: latest_version at 1 vs 1,000,000 events; append throughput
    /// with 1 and 64 concurrent appenders.
    Store(store::StoreBenchArgs),
    /// Replay generated events from the embedded log through the `users`
    /// projection, as wasm and natively, and print events/s and their ratio.
    Projection(projection::ProjectionBenchArgs),
    /// The HTTP API on loopback: appends through the API vs straight to the
    /// store, and `GET /views/users/{key}` at a fixed rate (p50/p99 latency).
    Http(http::HttpBenchArgs),
    /// Live lag (append → visible in the active view), p50/p99, with no
    /// warm-up running and while a new version replays the whole log, in the
    /// same run, and their ratio.
    Lag(lag::LagBenchArgs),
    /// A view served from an empty data directory by a snapshot vs by a
    /// replay of the log, in the same run, and live lag while snapshots are
    /// taken vs idle.
    Bootstrap(bootstrap::BootstrapBenchArgs),
    /// Two views of a million documents compared (`kiln diff`'s merge) next
    /// to a plain scan of both, in the same run, and their ratio.
    Diff(diff::DiffBenchArgs),
    /// Live lag on the active version while `kiln diff` against a slow
    /// candidate waits for it, next to idle, in the same run.
    SlowDiff(slow_diff::SlowDiffBenchArgs),
}

/// Runs a benchmark to completion on a fresh multi-threaded runtime.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd {
        BenchCommand::Store(args) => rt.block_on(store::run(args)),
        BenchCommand::Projection(args) => rt.block_on(projection::run(args)),
        BenchCommand::Http(args) => rt.block_on(http::run(args)),
        BenchCommand::Lag(args) => rt.block_on(lag::run(args)),
        BenchCommand::Diff(args) => rt.block_on(diff::run(args)),
        BenchCommand::Bootstrap(args) => rt.block_on(bootstrap::run(args)),
        BenchCommand::SlowDiff(args) => rt.block_on(slow_diff::run(args)),
    }
}

/// Latency samples of one operation.
#[derive(Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// The `q` quantile (0.5 = median), or zero when empty.
    pub fn quantile(&mut self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let idx = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[idx.min(self.0.len() - 1)]
    }
}

/// `a / b`, or NaN when `b` is zero.
/// Runs `n` workers concurrently until `window` is over and returns their
/// total rate per second. `worker(i, deadline)` does operations until the
/// deadline and returns how many it did.
pub async fn rate_of_workers<F, Fut>(n: usize, window: Duration, worker: F) -> anyhow::Result<f64>
where
    F: Fn(usize, std::time::Instant) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let start = std::time::Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(worker(i, deadline))).collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

/// A duration in microseconds with two decimals, for tables.
pub fn micros(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}
