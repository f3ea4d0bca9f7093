//! `kiln bench bootstrap`: a view served from an empty data directory by a
//! snapshot vs by replaying the log, in the same run, and what a snapshot
//! costs a live view.
//!
//! 1. Fills a fresh embedded log with `--events` user events.
//! 2. **Replay**: a lifecycle on data directory A deploys `users` and replays
//!    the log (time from deploy to ready); as the warm-up ran there, it
//!    publishes the view's snapshot (export + upload, timed by its metrics).
//! 3. **Bootstrap**: a second lifecycle on an empty data directory B, on the
//!    same log and snapshot store, deploys the same module: it downloads,
//!    checks and ingests the snapshot and tails from its position (time from
//!    deploy to ready). Both views' digests must be equal. Ratio replay /
//!    bootstrap (goal ≥ 10).
//! 4. **Live lag during snapshots**: on A, with `users` active, probes
//!    (append → visible, as `kiln bench lag`) with nothing else running vs
//!    while snapshots of the view are taken back to back; p50/p99 and their
//!    ratio (goal: p99 ≤ 2× idle).
//!
//! Snapshots go to a directory by default, or to a JetStream object store
//! bucket with `--nats-url` (the log stays embedded: the figures are the
//! object store's).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;

use super::lag::{keep_best, millis, probe, wait_while_warming};
use super::ratio;
use super::store::DurabilityArg;
use crate::lifecycle::{CutoverPolicy, Lifecycle, LifecycleConfig, ViewPolicy};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::snapshots::dir::DirStore;
use crate::snapshots::object::ObjectStore;
use crate::snapshots::{SnapshotConfig, SnapshotStore, Snapshots};
use crate::store::EventStore;
use crate::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};

#[derive(Args, Debug, Clone)]
pub struct BootstrapBenchArgs {
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Layout of the generated log (see `kiln bench projection`).
    #[arg(long, value_enum, default_value = "runs")]
    pub layout: super::projection::Layout,
    /// Live-lag probes per second (open loop).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Probes of each phase of a round.
    #[arg(long, default_value_t = 1000)]
    pub samples: u64,
    /// Rounds of the live-lag comparison.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    pub durability: DurabilityArg,
    /// Most MiB of documents a snapshot reads a second (`[snapshots]
    /// max_mib_per_sec`; 0: no limit).
    #[arg(long, default_value_t = 64)]
    pub snapshot_mib_per_sec: u64,
    /// Keep snapshots in a JetStream object store on this server instead of
    /// a directory.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// The projection: users (10,000 documents) or orders (one per 3 events).
    #[arg(long, value_enum, default_value = "users")]
    pub projection: super::projection::Which,
    /// The module (by default the example `cargo test --release` builds).
    #[arg(long)]
    pub module: Option<PathBuf>,
    /// Directory for the log, views and snapshots (a temp dir, removed
    /// afterwards, by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: BootstrapBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.rate > 0 && args.samples > 0 && args.rounds > 0,
        "--events, --rate, --samples and --rounds must be positive"
    );
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kiln-bench-bootstrap-{}", uuid::Uuid::new_v4())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &dir).await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn snapshot_store(
    args: &BootstrapBenchArgs,
    dir: &Path,
    bucket: &str,
) -> anyhow::Result<Box<dyn SnapshotStore>> {
    Ok(match &args.nats_url {
        None => Box::new(DirStore::open(
            dir.join("snapshots"),
            Duration::from_secs(30),
        )?),
        Some(url) => {
            let client = async_nats::connect(url.as_str())
                .await
                .with_context(|| format!("connecting to {url}"))?;
            let js = async_nats::jetstream::new(client);
            Box::new(ObjectStore::open(&js, bucket, 1, Duration::from_secs(30)).await?)
        }
    })
}

async fn lifecycle(
    dir: &Path,
    name: &str,
    mib_per_sec: u64,
    store: Arc<dyn EventStore>,
    snapshots: Box<dyn SnapshotStore>,
) -> anyhow::Result<(Lifecycle, Arc<Snapshots>)> {
    let work = dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work)?;
    let mut sc = SnapshotConfig::new(work);
    sc.instance = format!("bench-{name}");
    sc.max_bytes_per_sec = mib_per_sec << 20;
    let snapshots = Arc::new(Snapshots::new(snapshots, sc));
    let mut lc = LifecycleConfig::new(dir.join(name));
    lc.snapshots = Some(snapshots.clone());
    lc.default_policy = ViewPolicy {
        cutover: CutoverPolicy::Manual,
        ..ViewPolicy::default()
    };
    lc.policies.insert(
        "users".into(),
        ViewPolicy {
            cutover: CutoverPolicy::Manual,
            ..ViewPolicy::default()
        },
    );
    let l = Lifecycle::start(lc, store, Runtime::new(RuntimeConfig::default())?)
        .await
        .with_context(|| format!("starting lifecycle {name}"))?;
    Ok((l, snapshots))
}

async fn bench(args: &BootstrapBenchArgs, dir: &Path) -> anyhow::Result<()> {
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
    let bucket = format!("KILN_BENCH_{}", uuid::Uuid::new_v4().simple());
    println!(
        "kiln bench bootstrap — {} events ({:?} layout), snapshots in {}",
        args.events,
        args.layout,
        match &args.nats_url {
            Some(u) => format!("JetStream object store {bucket} at {u}"),
            None => "a directory".into(),
        }
    );
    let started = Instant::now();
    super::projection::fill_layout(&embedded, args.events, args.layout, args.projection).await?;
    println!(
        "fill: {} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    let store: Arc<dyn EventStore> = Arc::new(embedded);
    let head = store.head().await?;

    // Replay on A; A publishes the snapshot when caught up.
    let (a, snaps_a) = lifecycle(
        dir,
        "a",
        args.snapshot_mib_per_sec,
        store.clone(),
        snapshot_store(args, dir, &bucket).await?,
    )
    .await?;
    let started = Instant::now();
    let id = a.deploy(&wasm, "users.wasm").await?.id().clone();
    wait_while_warming(&a, &id).await?;
    let replay = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while snaps_a.metrics.published.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no snapshot published within 10 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = &snaps_a.metrics;
    let up_bytes = m.uploaded_bytes.load(Ordering::Relaxed);
    let up_secs = m.upload_millis.load(Ordering::Relaxed) as f64 / 1000.0;
    let digest_a = a.views().digest(&id)?;
    println!(
        "replay:    {id} served after {:.2} s ({:.0} events/s); its snapshot: {} documents, {:.1} MiB, exported and stored in {up_secs:.2} s ({:.1} MiB/s)",
        replay.as_secs_f64(),
        head as f64 / replay.as_secs_f64(),
        digest_a.documents,
        up_bytes as f64 / (1 << 20) as f64,
        ratio(up_bytes as f64 / (1 << 20) as f64, up_secs)
    );

    // Bootstrap on an empty B.
    let (b, snaps_b) = lifecycle(
        dir,
        "b",
        args.snapshot_mib_per_sec,
        store.clone(),
        snapshot_store(args, dir, &bucket).await?,
    )
    .await?;
    let started = Instant::now();
    let id_b = b.deploy(&wasm, "users.wasm").await?.id().clone();
    wait_while_warming(&b, &id_b).await?;
    let boot = started.elapsed();
    let m = &snaps_b.metrics;
    anyhow::ensure!(
        m.bootstraps.load(Ordering::Relaxed) == 1,
        "B did not bootstrap from the snapshot (refused: {})",
        m.refused.load(Ordering::Relaxed)
    );
    let down_bytes = m.downloaded_bytes.load(Ordering::Relaxed);
    let down_secs = m.download_millis.load(Ordering::Relaxed) as f64 / 1000.0;
    let digest_b = b.views().digest(&id_b)?;
    anyhow::ensure!(
        digest_a == digest_b,
        "the bootstrapped view differs from the replayed one: {digest_a:?} vs {digest_b:?}"
    );
    println!(
        "bootstrap: {id_b} served after {:.3} s from an empty data directory; {:.1} MiB fetched, checked and ingested in {down_secs:.2} s ({:.1} MiB/s); digest equal to the replay's",
        boot.as_secs_f64(),
        down_bytes as f64 / (1 << 20) as f64,
        ratio(down_bytes as f64 / (1 << 20) as f64, down_secs)
    );
    println!(
        "ratio replay / bootstrap: {:.1}× faster to serve (goal ≥ 10×)",
        ratio(replay.as_secs_f64(), boot.as_secs_f64())
    );
    b.shutdown().await;

    // Live lag on A: idle vs while snapshots are taken back to back.
    a.promote(&id).await?;
    let spec = id.to_string();
    let mut idle_all = Histogram::<u64>::new(3)?;
    let mut busy_all = Histogram::<u64>::new(3)?;
    let (mut idle_best, mut busy_best) = (None, None);
    for round in 1..=args.rounds {
        let idle = probe(&a, &store, &id, args.rate, |n| n >= args.samples).await?;
        let taking = tokio::spawn({
            let (a, spec) = (a.clone(), spec.clone());
            async move {
                let mut n = 0u32;
                let started = Instant::now();
                loop {
                    match a.snapshot(&spec).await {
                        Ok(_) => n += 1,
                        Err(e) => return Err(anyhow::anyhow!("snapshot: {e}")),
                    }
                    if n >= 1 && started.elapsed() > Duration::from_secs(3600) {
                        return Ok(n);
                    }
                }
            }
        });
        let before = snaps_a.metrics.published.load(Ordering::Relaxed);
        let busy = probe(&a, &store, &id, args.rate, |n| {
            n >= args.samples && snaps_a.metrics.published.load(Ordering::Relaxed) > before
        })
        .await?;
        taking.abort();
        let taken = snaps_a.metrics.published.load(Ordering::Relaxed) - before;
        println!(
            "round {round}: idle p50 {} p99 {} | during {taken} snapshot(s) p50 {} p99 {}",
            millis(&idle, 0.5),
            millis(&idle, 0.99),
            millis(&busy, 0.5),
            millis(&busy, 0.99)
        );
        idle_all.add(&idle)?;
        busy_all.add(&busy)?;
        keep_best(&mut idle_best, idle);
        keep_best(&mut busy_best, busy);
    }
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
    println!(
        "live lag, all rounds: idle p50 {} p99 {} | snapshotting p50 {} p99 {}; ratio p50 {:.2} p99 {:.2} (goal p99 ≤ 2)",
        millis(&idle_all, 0.5),
        millis(&idle_all, 0.99),
        millis(&busy_all, 0.5),
        millis(&busy_all, 0.99),
        ratio(q(&busy_all, 0.5), q(&idle_all, 0.5)),
        ratio(q(&busy_all, 0.99), q(&idle_all, 0.99))
    );
    if let (Some(i), Some(b)) = (&idle_best, &busy_best) {
        println!(
            "  best rounds (lowest p99): ratio p50 {:.2} p99 {:.2}",
            ratio(q(b, 0.5), q(i, 0.5)),
            ratio(q(b, 0.99), q(i, 0.99))
        );
    }
    a.shutdown().await;
    Ok(())
}
