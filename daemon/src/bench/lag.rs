//! `kiln bench lag`: live lag — an append until it is visible in the active
//! view — with no warm-up running, and while a new version warms over the
//! whole log, in the same run. The design goal: a warm-up at most doubles it.
//!
//! 1. Fills a fresh embedded log with `--events` user events (the generator of
//!    `kiln bench projection`), deploys the `users` module, waits until it has
//!    caught up and makes it the active version (cutover policy `manual`, so
//!    it stays active for the whole run).
//! 2. Each of `--rounds` rounds measures, back to back:
//!    - **baseline**: `--samples` probes with nothing warming;
//!    - **warming**: a new version of `users` is deployed — the same code with
//!      one more (never appended) event type in its manifest, so a new
//!      fingerprint: a new physical view replaying the log from the first
//!      event — and probes run until it is ready; it is then retired (its
//!      column family dropped) before the next round. With several
//!      `--warmup-workers` settings (e.g. `1,2`), each round warms one
//!      version with each, so their warm-up rates and lags compare in one run.
//!
//!    - with `--compare`, once each warm-up is ready: **diffing**, the same
//!      number of probes while `kiln diff` of the active version against it
//!      runs back to back, then **digesting**, while the active view's
//!      digest (what a fleet member takes at every `digest_every`) runs back
//!      to back. Neither holds the active view (see `lifecycle/compare.rs`):
//!      what they cost it is the CPU and I/O of reading a whole view.
//!
//! A probe appends one `UserLoggedIn` to a user stream and waits until the
//! active view's checkpoint has reached it (the signal read-your-writes waits
//! on: the documents and checkpoint are committed by then). Probes are issued
//! open loop at `--rate` per second, each on a task of its own, and timed from
//! when they were due, so a stall counts against every probe it delays.
//! Baseline and warming phases alternate, so a busy machine skews both alike.
//! Printed: each round, then every probe of each phase together and each
//! phase's best round (lowest p99, the least disturbed by other load), with
//! the ratios warming / baseline of p50 and p99.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use kiln_sdk::manifest::Manifest;

use super::ratio;
use super::store::DurabilityArg;
use crate::lifecycle::{
    CutoverPolicy, DeployOutcome, Lifecycle, LifecycleConfig, LifecycleError, ViewPolicy, ViewState,
};
use crate::runtime::{Runtime, RuntimeConfig, manifest_edit};
use crate::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use crate::views::ViewId;

/// Users the probes log in (the fill's users: `user-0` .. `user-9999`).
const PROBE_USERS: u64 = 10_000;
/// Longest a probe may wait for visibility before the bench gives up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug, Clone)]
pub struct LagBenchArgs {
    /// Events in the log, i.e. what each warming version replays.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Probes per second (open loop).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Probes of each baseline phase.
    #[arg(long, default_value_t = 1000)]
    pub samples: u64,
    /// Rounds (one baseline and one warm-up each).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Durability of the embedded store.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    pub durability: DurabilityArg,
    /// Events a warming version applies at a time (`warmup_batch`; a grouped
    /// call: 4 × that).
    #[arg(long, default_value_t = crate::lifecycle::LifecycleConfig::new(".").warmup_batch)]
    pub warmup_batch: usize,
    /// Workers each warm-up replays with (a list: every round warms once with
    /// each, `users` being per stream), e.g. `1,2`.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub warmup_workers: Vec<usize>,
    /// Layout of the generated log (see `kiln bench projection`).
    #[arg(long, value_enum, default_value = "runs")]
    pub layout: super::projection::Layout,
    /// The projection: users (10,000 documents) or orders (one per 3
    /// events: `--events 3000000` makes a million-document view).
    #[arg(long, value_enum, default_value = "users")]
    pub projection: super::projection::Which,
    /// The module (by default the example `cargo test --release` builds).
    #[arg(long)]
    pub module: Option<PathBuf>,
    /// Directory for the log and the views (a temp dir, removed afterwards, by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also probe while diffs against each warmed version, and digests of
    /// the active view, run back to back.
    #[arg(long)]
    pub compare: bool,
}

pub async fn run(args: LagBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.rate > 0 && args.samples > 0 && args.rounds > 0,
        "--events, --rate, --samples and --rounds must be positive"
    );
    anyhow::ensure!(
        !args.warmup_workers.is_empty()
            && args
                .warmup_workers
                .iter()
                .all(|k| (1..=crate::lifecycle::MAX_WARMUP_WORKERS).contains(k)),
        "--warmup-workers: each between 1 and {}",
        crate::lifecycle::MAX_WARMUP_WORKERS
    );
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kiln-bench-lag-{}", uuid::Uuid::new_v4())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &dir).await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn bench(args: &LagBenchArgs, dir: &Path) -> anyhow::Result<()> {
    let module = args
        .module
        .clone()
        .unwrap_or_else(|| PathBuf::from(args.projection.module_path()));
    let wasm = std::fs::read(&module).with_context(|| {
        format!(
            "reading the module {} (run `cargo test --release` once to build it, or pass --module)",
            module.display()
        )
    })?;
    let mut config = EmbeddedConfig::new(dir.join("log"));
    config.durability = match args.durability {
        DurabilityArg::Fsync => Durability::Fsync,
        DurabilityArg::Buffered => Durability::Buffered,
    };
    let embedded = EmbeddedStore::open(config).context("opening the embedded store")?;
    println!(
        "kiln bench lag — {} events in the log ({:?} layout), probes at {}/s, {} rounds, durability {:?}",
        args.events, args.layout, args.rate, args.rounds, args.durability
    );
    let started = Instant::now();
    super::projection::fill_layout(&embedded, args.events, args.layout, args.projection).await?;
    println!(
        "fill: {} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    let store: Arc<dyn EventStore> = Arc::new(embedded);

    let mut lc = LifecycleConfig::new(dir.join("data"));
    lc.warmup_batch = args.warmup_batch.max(1);
    for name in ["users", "orders"] {
        lc.policies.insert(
            name.into(),
            ViewPolicy {
                cutover: CutoverPolicy::Manual,
                ..ViewPolicy::default()
            },
        );
    }
    lc.standby_grace = Duration::from_secs(24 * 3600);
    let lifecycle = Lifecycle::start(lc, store.clone(), Runtime::new(RuntimeConfig::default())?)
        .await
        .context("starting the lifecycle")?;
    let started = Instant::now();
    let active = lifecycle.deploy(&wasm, "users.wasm").await?.id().clone();
    wait_while_warming(&lifecycle, &active).await?;
    lifecycle.promote(&active).await?;
    println!(
        "{active}: replayed the log in {:.1} s, active, {} documents",
        started.elapsed().as_secs_f64(),
        lifecycle.views().digest(&active)?.documents
    );

    let mut baseline = Histogram::<u64>::new(3)?;
    // Each phase's best round (lowest p99): less exposed to other load.
    let mut best_idle: Option<Histogram<u64>> = None;
    // Per `--warmup-workers` entry: every probe, the best round, warm-up rates.
    let mut phases: Vec<WarmPhase> = args
        .warmup_workers
        .iter()
        .map(|&workers| WarmPhase::new(workers))
        .collect::<anyhow::Result<_>>()?;
    let (mut diffing, mut digesting) = (WarmPhase::new(0)?, WarmPhase::new(0)?);
    let mut variants = 0;
    for round in 1..=args.rounds {
        let idle = probe(&lifecycle, &store, &active, args.rate, |n| {
            n >= args.samples
        })
        .await?;
        tally(
            &format!("round {round}: baseline"),
            idle,
            &mut baseline,
            &mut best_idle,
        )?;
        for phase in &mut phases {
            variants += 1;
            lifecycle.set_warmup_workers(phase.workers);
            let module = variant(&wasm, variants)?;
            let deployed = Instant::now();
            let id = match lifecycle.deploy(&module, "bench-variant").await? {
                DeployOutcome::Warming(id) => id,
                other => anyhow::bail!("the variant module was not a new view: {other:?}"),
            };
            let busy = probe(&lifecycle, &store, &active, args.rate, |_| {
                lifecycle
                    .status_of(&id)
                    .is_none_or(|s| s.state != ViewState::Warming)
            })
            .await?;
            let took = deployed.elapsed().as_secs_f64();
            let status = lifecycle.status_of(&id);
            let replayed = status.as_ref().map_or(0, |s| s.events_applied);
            let used = status.and_then(|s| s.warmup_workers).unwrap_or(1);
            if args.compare {
                for (reader, what) in [(Reader::Diff(&id), "diffs"), (Reader::Digest, "digests")] {
                    let (busy, reads) =
                        while_reading(&lifecycle, &store, &active, args, reader).await?;
                    println!(
                        "  while {what} run back to back ({reads} of them): p50 {} p99 {} ({} probes)",
                        millis(&busy, 0.5),
                        millis(&busy, 0.99),
                        busy.len()
                    );
                    let phase = match reader {
                        Reader::Diff(_) => &mut diffing,
                        Reader::Digest => &mut digesting,
                    };
                    phase.all.add(&busy)?;
                    keep_best(&mut phase.best, busy);
                }
            }
            lifecycle.retire(&id).await?;
            phase.rates.push(replayed as f64 / took);
            println!(
                "  while {id} warms with {used} worker(s): p50 {} p99 {} ({} probes; it replayed {replayed} events in {took:.2} s, {:.0} events/s)",
                millis(&busy, 0.5),
                millis(&busy, 0.99),
                busy.len(),
                replayed as f64 / took
            );
            phase.all.add(&busy)?;
            keep_best(&mut phase.best, busy);
        }
    }

    println!("live lag, append → visible in the active view {active}, all rounds:");
    baseline_line("no warm-up (baseline):  ", &baseline);
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
    let first_rate = phases.first().map_or(0.0, WarmPhase::mean_rate);
    for phase in &phases {
        let rate = phase.mean_rate();
        println!(
            "  warming, {} worker(s):    p50 {}  p99 {}  max {}  ({} probes; warm-up at {rate:.0} events/s, mean; {:.2}× the first setting's)",
            phase.workers,
            millis(&phase.all, 0.5),
            millis(&phase.all, 0.99),
            millis(&phase.all, 1.0),
            phase.all.len(),
            ratio(rate, first_rate),
        );
        println!(
            "    ratio warming / baseline, all rounds:  p50 {:.2}  p99 {:.2}  (goal ≤ 2)",
            ratio(q(&phase.all, 0.5), q(&baseline, 0.5)),
            ratio(q(&phase.all, 0.99), q(&baseline, 0.99))
        );
        if let (Some(idle), Some(busy)) = (&best_idle, &phase.best) {
            println!(
                "    best rounds (lowest p99): baseline p50 {} p99 {} | warming p50 {} p99 {}; ratio p50 {:.2}  p99 {:.2}  (goal ≤ 2)",
                millis(idle, 0.5),
                millis(idle, 0.99),
                millis(busy, 0.5),
                millis(busy, 0.99),
                ratio(q(busy, 0.5), q(idle, 0.5)),
                ratio(q(busy, 0.99), q(idle, 0.99))
            );
        }
    }
    if args.compare {
        for (phase, what) in [(&diffing, "diffs run"), (&digesting, "digests run")] {
            summary(what, &phase.all, &baseline);
        }
    }
    lifecycle.shutdown().await;
    Ok(())
}

/// Prints the probes taken while `what`, and their ratios to `baseline`.
/// The baseline's line in a lag summary: `label`, then p50, p99, max.
pub(super) fn baseline_line(label: &str, baseline: &Histogram<u64>) {
    println!(
        "  {label} p50 {}  p99 {}  max {}  ({} probes)",
        millis(baseline, 0.5),
        millis(baseline, 0.99),
        millis(baseline, 1.0),
        baseline.len()
    );
}

pub(super) fn summary(what: &str, probes: &Histogram<u64>, baseline: &Histogram<u64>) {
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
    println!(
        "  while {what}:  p50 {}  p99 {}  max {}  ({} probes)",
        millis(probes, 0.5),
        millis(probes, 0.99),
        millis(probes, 1.0),
        probes.len(),
    );
    println!(
        "    ratio / baseline, all rounds:  p50 {:.2}  p99 {:.2}  (goal ≤ 2)",
        ratio(q(probes, 0.5), q(baseline, 0.5)),
        ratio(q(probes, 0.99), q(baseline, 0.99))
    );
}

/// What reads a whole view beside the probes.
#[derive(Clone, Copy)]
enum Reader<'a> {
    /// `kiln diff` of the active version against this one.
    Diff(&'a ViewId),
    /// The active view's digest at the next position it reaches.
    Digest,
}

/// `--samples` probes of `active` while `reader` runs back to back; the
/// probes and how many reads finished.
async fn while_reading(
    lifecycle: &Lifecycle,
    store: &Arc<dyn EventStore>,
    active: &ViewId,
    args: &LagBenchArgs,
    reader: Reader<'_>,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let stop = tokio::sync::watch::Sender::new(false);
    let reads = {
        let (lifecycle, active, mut stopped) =
            (lifecycle.clone(), active.clone(), stop.subscribe());
        let other = match reader {
            Reader::Diff(id) => Some(id.to_string()),
            Reader::Digest => None,
        };
        tokio::spawn(async move {
            let mut n = 0u64;
            while !*stopped.borrow_and_update() {
                let read = async {
                    match &other {
                        Some(b) => lifecycle
                            .diff(
                                &active.to_string(),
                                b,
                                crate::views::diff::DiffOptions::default(),
                                Duration::from_secs(30),
                            )
                            .await
                            .map(drop),
                        None => {
                            let at = lifecycle.checkpoint_of(&active).unwrap_or(0) + 1;
                            match lifecycle.digest_at(&active, at).await {
                                // A batch under way went past it: the next one.
                                Ok(_) | Err(LifecycleError::DigestMissed { .. }) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                    }
                };
                tokio::select! {
                    r = read => {
                        r?;
                        n += 1;
                    }
                    _ = stopped.changed() => break,
                }
            }
            anyhow::Ok(n)
        })
    };
    let probes = probe(lifecycle, store, active, args.rate, |n| n >= args.samples).await;
    stop.send_replace(true);
    let reads = reads.await??;
    Ok((probes?, reads))
}

/// The probes taken while warm-ups with one setting of `--warmup-workers` ran.
struct WarmPhase {
    workers: usize,
    all: Histogram<u64>,
    best: Option<Histogram<u64>>,
    rates: Vec<f64>,
}

impl WarmPhase {
    fn new(workers: usize) -> anyhow::Result<Self> {
        Ok(WarmPhase {
            workers,
            all: Histogram::new(3)?,
            best: None,
            rates: Vec::new(),
        })
    }

    fn mean_rate(&self) -> f64 {
        if self.rates.is_empty() {
            return 0.0;
        }
        self.rates.iter().sum::<f64>() / self.rates.len() as f64
    }
}

/// Waits until `id` has left `warming` (polled: this is the bench's driver,
/// not a hot path).
pub(super) async fn wait_while_warming(lifecycle: &Lifecycle, id: &ViewId) -> anyhow::Result<()> {
    loop {
        match lifecycle.status_of(id).map(|s| s.state) {
            Some(ViewState::Warming) => tokio::time::sleep(Duration::from_millis(20)).await,
            Some(ViewState::Failed) | None => {
                anyhow::bail!("{id} failed or vanished while warming")
            }
            Some(_) => return Ok(()),
        }
    }
}

/// Issues probe `n` at `start + n / rate` until `done(n)`, each on a task of
/// its own; lag in nanoseconds, from when each probe was due.
pub(super) async fn probe(
    lifecycle: &Lifecycle,
    store: &Arc<dyn EventStore>,
    view: &ViewId,
    rate: u64,
    done: impl FnMut(u64) -> bool,
) -> anyhow::Result<Histogram<u64>> {
    let login = |n: u64| {
        (
            format!("user-{}", n % PROBE_USERS),
            NewEvent::json("UserLoggedIn", &serde_json::json!({})),
        )
    };
    probe_with(lifecycle, store, view, rate, done, login).await
}

/// [`probe`], probe `n` appending `event(n)` (its stream, the event).
pub(super) async fn probe_with(
    lifecycle: &Lifecycle,
    store: &Arc<dyn EventStore>,
    view: &ViewId,
    rate: u64,
    mut done: impl FnMut(u64) -> bool,
    event: fn(u64) -> (String, NewEvent),
) -> anyhow::Result<Histogram<u64>> {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while !done(n) {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        let (lifecycle, store, view) = (lifecycle.clone(), store.clone(), view.clone());
        tasks.spawn(async move {
            let (stream, event) = event(n);
            let stream = StreamId::new(stream)?;
            let appended = store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::Any,
                    vec![event],
                ))
                .await?;
            lifecycle
                .wait_for_position(&view, appended.position, PROBE_TIMEOUT)
                .await?;
            anyhow::Ok(due.elapsed())
        });
        n += 1;
    }
    let mut hist = Histogram::<u64>::new(3)?;
    while let Some(lag) = tasks.join_next().await {
        hist.record(lag??.as_nanos() as u64)?;
    }
    Ok(hist)
}

/// Prints one phase's probes of one round (`what`: p50 p99, how many), adds
/// them to `all` and keeps the round in `best` if its p99 is the lowest.
pub(super) fn tally(
    what: &str,
    round: Histogram<u64>,
    all: &mut Histogram<u64>,
    best: &mut Option<Histogram<u64>>,
) -> anyhow::Result<()> {
    println!(
        "{what} p50 {} p99 {} ({} probes)",
        millis(&round, 0.5),
        millis(&round, 0.99),
        round.len()
    );
    all.add(&round)?;
    keep_best(best, round);
    Ok(())
}

/// Keeps in `best` whichever of it and `round` has the lower p99.
pub(super) fn keep_best(best: &mut Option<Histogram<u64>>, round: Histogram<u64>) {
    let better = best
        .as_ref()
        .is_none_or(|b| round.value_at_quantile(0.99) < b.value_at_quantile(0.99));
    if better && !round.is_empty() {
        *best = Some(round);
    }
}

/// The `q` quantile of `h` (nanoseconds) in milliseconds.
pub(super) fn millis(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.2} ms", h.value_at_quantile(q) as f64 / 1e6)
}

/// `module` as users `1.<round>.0` whose manifest also lists the event type
/// `BenchVariant<round>` (never appended): another fingerprint, so a new
/// physical view that replays the log, doing the same work per event.
fn variant(module: &[u8], round: u32) -> anyhow::Result<Vec<u8>> {
    replace_manifest(module, |m| {
        m.version = format!("1.{round}.0");
        m.events.push(format!("BenchVariant{round}"));
    })
}

/// `module` with its manifest rewritten by `edit`.
fn replace_manifest(module: &[u8], edit: impl FnOnce(&mut Manifest)) -> anyhow::Result<Vec<u8>> {
    let mut manifest = Manifest::parse(manifest_edit::manifest_bytes(module)?)
        .map_err(|e| anyhow::anyhow!("the module's manifest: {e}"))?;
    edit(&mut manifest);
    Ok(manifest_edit::replace_manifest(
        module,
        &serde_json::to_vec(&manifest)?,
    )?)
}
