//! `kiln bench store`: the store core's two promises, measured.
//!
//! 1. `latest_version` is O(1): its median latency on a stream with 1 event and
//!    on one with 1,000,000 events, in the same run, and their ratio (flat ≈ 1).
//! 2. Group commit: append throughput with 1 appender and with 64 concurrent
//!    appenders (each appending one event per call), and their ratio.
//!
//! `--backend jetstream` measures the same on a NATS server (see [`jetstream`]),
//! next to the raw JetStream baselines of the same server.

mod jetstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::{Samples, micros, ratio};
use crate::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};

#[derive(Args, Debug, Clone)]
pub struct StoreBenchArgs {
    /// Which backend to measure.
    #[arg(long, value_enum, default_value_t = Backend::Embedded)]
    pub backend: Backend,
    /// Events in the long stream.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// latest_version calls measured per stream.
    #[arg(long, default_value_t = 20_000)]
    pub samples: usize,
    /// How long each append-throughput run lasts, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Durability of the embedded store while measuring.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    pub durability: DurabilityArg,
    /// Directory for the embedded store (a temp dir, removed afterwards, by default).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// NATS servers for `--backend jetstream` (JetStream-enabled, comma-separated
    /// for a cluster).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Replicas of the bench's stream (3 on a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// `--backend jetstream`: events per multi-event append (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,500")]
    pub batch_sizes: Vec<usize>,
    /// `--backend jetstream`: concurrent writers of multi-event appends
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub writers: Vec<usize>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Jetstream,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurabilityArg {
    Fsync,
    Buffered,
}

pub async fn run(args: StoreBenchArgs) -> anyhow::Result<()> {
    if args.backend == Backend::Jetstream {
        return jetstream::run(args).await;
    }
    let temp = tempfile_dir(&args)?;
    let mut config = EmbeddedConfig::new(temp.join("log"));
    config.durability = match args.durability {
        DurabilityArg::Fsync => Durability::Fsync,
        DurabilityArg::Buffered => Durability::Buffered,
    };
    let embedded = EmbeddedStore::open(config).context("opening the embedded store")?;
    let store: Arc<dyn EventStore> = Arc::new(embedded.clone());
    println!(
        "kiln bench store — backend: embedded, durability: {:?}",
        args.durability
    );
    latest_version_bench(&store, &args).await?;
    append_bench(&store, &args).await?;
    println!(
        "group commit: {:.1} jobs per write batch on average",
        embedded.writer_stats().mean_group_size()
    );
    drop((store, embedded));
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    Ok(())
}

fn tempfile_dir(args: &StoreBenchArgs) -> anyhow::Result<std::path::PathBuf> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kiln-bench-{}", uuid::Uuid::new_v4())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn payload(n: u64) -> NewEvent {
    NewEvent::json(
        "Benched",
        &serde_json::json!({ "n": n, "name": "user name", "ok": true }),
    )
}

/// Fills a stream with `count` events, in appends as large as the limits allow.
pub async fn fill(
    store: &Arc<dyn EventStore>,
    stream: &StreamId,
    count: u64,
) -> anyhow::Result<f64> {
    let chunk = 500u64;
    let start = Instant::now();
    let mut written = 0;
    while written < count {
        let n = chunk.min(count - written);
        let events = (written..written + n).map(payload).collect();
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(written),
                events,
            ))
            .await
            .with_context(|| format!("filling {stream} at version {written}"))?;
        written += n;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// latest_version median on a 1-event stream vs an `args.events`-event stream;
/// returns both medians.
pub async fn latest_version_bench(
    store: &Arc<dyn EventStore>,
    args: &StoreBenchArgs,
) -> anyhow::Result<(Duration, Duration)> {
    let short = StreamId::new("bench-short")?;
    let long = StreamId::new("bench-long")?;
    fill(store, &short, 1).await?;
    let rate = fill(store, &long, args.events).await?;
    println!(
        "fill: {} events into one stream at {:.0} events/s (500-event appends)",
        args.events, rate
    );
    let (mut s_short, mut s_long) = (
        Samples::with_capacity(args.samples),
        Samples::with_capacity(args.samples),
    );
    for _ in 0..args.samples {
        // Interleaved so both see the same cache and machine conditions.
        let t = Instant::now();
        let v = store.latest_version(&short).await?;
        s_short.push(t.elapsed());
        anyhow::ensure!(v == 1, "short stream at version {v}, expected 1");
        let t = Instant::now();
        let v = store.latest_version(&long).await?;
        s_long.push(t.elapsed());
        anyhow::ensure!(v == args.events, "long stream at version {v}");
    }
    let (m1, m2) = (s_short.quantile(0.5), s_long.quantile(0.5));
    println!(
        "latest_version median, stream of 1 event:          {}",
        micros(m1)
    );
    println!(
        "latest_version median, stream of {} events:  {}",
        args.events,
        micros(m2)
    );
    println!(
        "latest_version ratio (long / short):              {:.2}  (goal ≤ 1.2)",
        ratio(m2.as_secs_f64(), m1.as_secs_f64())
    );
    Ok((m1, m2))
}

/// Events/s for 1 appender, then for 64 concurrent appenders; returns both.
pub async fn append_bench(
    store: &Arc<dyn EventStore>,
    args: &StoreBenchArgs,
) -> anyhow::Result<(f64, f64)> {
    let window = Duration::from_secs_f64(args.seconds);
    let one = appenders(store, 1, window).await?;
    println!("append throughput, 1 appender:    {one:>10.0} events/s");
    let many = appenders(store, 64, window).await?;
    println!("append throughput, 64 appenders:  {many:>10.0} events/s");
    println!(
        "append throughput ratio (64 / 1): {:.1}x  (group commit)",
        ratio(many, one)
    );
    Ok((one, many))
}

async fn appenders(store: &Arc<dyn EventStore>, n: usize, window: Duration) -> anyhow::Result<f64> {
    super::rate_of_workers(n, window, |i, deadline| {
        let store = store.clone();
        async move {
            let stream = StreamId::new(format!("bench-appender{n}x{i}"))?;
            let mut count = 0u64;
            while Instant::now() < deadline {
                store
                    .append(AppendRequest::new(
                        stream.clone(),
                        ExpectedVersion::Exact(count),
                        vec![payload(count)],
                    ))
                    .await?;
                count += 1;
            }
            Ok(count)
        }
    })
    .await
}
