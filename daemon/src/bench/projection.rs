//! `kiln bench projection`: replays generated events from the embedded log
//! through the `users` projection, as wasm and natively, in the same run.
//!
//! 1. Fills a fresh embedded log with `--events` user events (10,000 users;
//!    registrations, logins, failed logins, renames, email changes).
//! 2. wasm → view: reads the log in batches and applies them with a
//!    [`Projector`] into a fresh RocksDB view (documents + checkpoint per batch).
//! 3. wasm → memory: the same module, documents kept in memory.
//! 4. native: the same projection compiled natively, run by the SDK's harness
//!    over the same batches (the same decoding path as the module).
//!
//! The wasm/native ratio compares 3 with 4 (same sink); 2 adds RocksDB. Each
//! variant runs `--rounds` times, interleaved, and the best rate is shown, so
//! a busy machine skews the figures less.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kiln_sdk::PerStream;
use kiln_sdk::abi::BatchWriter;

use super::ratio;
use crate::runtime::{Instance, Projector, Runtime, RuntimeConfig, encode_event};
use crate::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore, scan_log};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use crate::views::{SharedDocuments, ViewStore};

/// Where `cargo test` (tests/build.rs) leaves the users module.
const DEFAULT_MODULE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/wasm-projections/wasm32-unknown-unknown/release/projection_users.wasm"
);
const USERS: u64 = 10_000;

#[derive(Args, Debug, Clone)]
pub struct ProjectionBenchArgs {
    /// Events to generate and replay.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per batch handed to the projection.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// The users module (built by `cargo test --release`, or
    /// `cargo build --release --target wasm32-unknown-unknown -p projection-users`).
    #[arg(long, default_value = DEFAULT_MODULE)]
    pub module: PathBuf,
    /// Rounds of measurements (the best of each variant is shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Directory for the log and the view (a temp dir, removed afterwards, by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: ProjectionBenchArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("kiln-bench-projection-{}", uuid::Uuid::new_v4()))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &dir).await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn bench(args: &ProjectionBenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let rt = Runtime::new(RuntimeConfig::default())?;
    let module = rt.load_file(&args.module).context(
        "loading the users module (run `cargo test --release` once to build it, or pass --module)",
    )?;
    println!(
        "kiln bench projection — {} events, batches of {}, module {} ({})",
        args.events,
        args.batch,
        module.view_id(),
        args.module.display()
    );
    let mut config = EmbeddedConfig::new(dir.join("log"));
    config.durability = Durability::Buffered;
    let store = EmbeddedStore::open(config).context("opening the embedded store")?;
    let started = Instant::now();
    fill(&store, args.events).await?;
    println!(
        "fill: {} events in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );

    let batch = args.batch.max(1);
    let instance_cost = instantiation_cost(&module, 1000)?;
    let (rounds, dir) = (args.rounds.max(1), dir.to_path_buf());
    let best = tokio::task::spawn_blocking(move || -> anyhow::Result<Rates> {
        let mut best = Rates::default();
        for round in 0..rounds {
            let r = measure(&store, &module, &dir.join(format!("views-{round}")), batch)?;
            best = best.max(&r);
        }
        Ok(best)
    })
    .await??;
    let Rates {
        log_only,
        wasm_view,
        wasm_mem,
        native,
    } = best;
    println!("log read alone (baseline):          {log_only:>10.0} events/s");
    println!("wasm   → RocksDB view + checkpoint: {wasm_view:>10.0} events/s");
    println!("wasm   → in-memory documents:       {wasm_mem:>10.0} events/s");
    println!("native → in-memory documents:       {native:>10.0} events/s  (SDK harness)");
    println!(
        "ratio wasm / native (same sink):      {:.2}  (goal ≥ 0.6)",
        ratio(wasm_mem, native)
    );
    println!(
        "ratio wasm+RocksDB / native:          {:.2}",
        ratio(wasm_view, native)
    );
    let batch_secs = batch as f64 / wasm_mem.max(1.0);
    println!(
        "fresh instance per batch:           {:>10.1} µs each ({:.1}% of a {batch}-event batch's time at the wasm → memory rate)",
        instance_cost * 1e6,
        100.0 * instance_cost / batch_secs
    );
    println!(
        "documents identical (wasm vs native): yes ({rounds} rounds, best of each shown)",
        rounds = args.rounds.max(1)
    );
    Ok(())
}

/// Mean seconds to make a fresh instance of `module` (every batch gets one),
/// over `n` instantiations.
fn instantiation_cost(module: &crate::runtime::Module, n: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    for _ in 0..n {
        Instance::new(module, Box::new(SharedDocuments::default()))?;
    }
    Ok(started.elapsed().as_secs_f64() / f64::from(n))
}

/// events/s of each variant in one round.
#[derive(Default, Clone, Copy)]
struct Rates {
    log_only: f64,
    wasm_view: f64,
    wasm_mem: f64,
    native: f64,
}

impl Rates {
    fn max(&self, o: &Rates) -> Rates {
        Rates {
            log_only: self.log_only.max(o.log_only),
            wasm_view: self.wasm_view.max(o.wasm_view),
            wasm_mem: self.wasm_mem.max(o.wasm_mem),
            native: self.native.max(o.native),
        }
    }
}

/// One round: the log alone, wasm into a fresh RocksDB view, wasm into memory,
/// native into memory; fails if wasm and native documents differ.
fn measure(
    store: &EmbeddedStore,
    module: &crate::runtime::Module,
    views_dir: &std::path::Path,
    batch: usize,
) -> anyhow::Result<Rates> {
    let log_only = replay(store, batch, |_| Ok(()))?;
    let views = ViewStore::open(views_dir)?;
    let mut projector = Projector::open(module, &views)?;
    let wasm_view = replay(store, batch, |events| Ok(projector.apply(events)?))?;

    let docs = SharedDocuments::default();
    let mut instance = Instance::new(module, Box::new(docs.clone()))?;
    let wasm_mem = replay(store, batch, |events| {
        docs.apply(instance.apply(events)?);
        Ok(())
    })?;

    let mut harness = kiln_sdk::Harness::<PerStream<projection_users::Users>>::new();
    let mut writer = BatchWriter::new();
    let native = replay(store, batch, |events| {
        writer.clear();
        for e in events {
            encode_event(&mut writer, e);
        }
        harness
            .apply_encoded(writer.bytes(), events[0].position)
            .map_err(|e| anyhow::anyhow!("native users projection: {e}"))
    })?;
    let wasm_docs = docs.snapshot();
    let same = wasm_docs.len() == harness.documents().len()
        && wasm_docs
            .iter()
            .zip(harness.documents())
            .all(|((k1, v1), (k2, v2))| k1 == k2.as_bytes() && v1 == v2);
    anyhow::ensure!(same, "the wasm and native runs built different documents");
    Ok(Rates {
        log_only,
        wasm_view,
        wasm_mem,
        native,
    })
}

/// Reads the whole log in batches and hands each to `apply`; events/s.
fn replay(
    store: &EmbeddedStore,
    batch: usize,
    mut apply: impl FnMut(&[RecordedEvent]) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut next = 1;
    let mut count = 0u64;
    loop {
        let events = scan_log(store, next, batch)?;
        let Some(last) = events.last() else { break };
        next = last.position + 1;
        count += events.len() as u64;
        apply(&events)?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Appends `total` user events from 16 concurrent writers, 50 per append
/// (also the log of `kiln bench lag`).
pub(super) async fn fill(store: &EmbeddedStore, total: u64) -> anyhow::Result<()> {
    let store: Arc<dyn EventStore> = Arc::new(store.clone());
    const WRITERS: u64 = 16;
    const PER_APPEND: u64 = 50;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let share = total / WRITERS + u64::from(w < total % WRITERS);
                let users: Vec<u64> = (0..USERS).filter(|u| u % WRITERS == w).collect();
                let mut versions = vec![0u64; users.len()];
                let (mut written, mut turn) = (0u64, 0usize);
                while written < share {
                    let slot = turn % users.len().max(1);
                    turn += 1;
                    let n = PER_APPEND.min(share - written);
                    let stream = StreamId::new(format!("user-{}", users[slot]))?;
                    let events = (0..n)
                        .map(|i| user_event(versions[slot] + i, written + i))
                        .collect();
                    store
                        .append(AppendRequest::new(
                            stream,
                            ExpectedVersion::Exact(versions[slot]),
                            events,
                        ))
                        .await?;
                    versions[slot] += n;
                    written += n;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The `version`-th event (0-based) of a user stream.
fn user_event(version: u64, seed: u64) -> NewEvent {
    let v = |value: serde_json::Value, ty: &str| NewEvent::json(ty, &value);
    if version == 0 {
        return v(
            serde_json::json!({"name": format!("user {seed}"), "email": format!("u{seed}@example.com")}),
            "UserRegistered",
        );
    }
    match seed % 10 {
        0 => v(
            serde_json::json!({"name": format!("renamed {seed}")}),
            "UserRenamed",
        ),
        1 => v(
            serde_json::json!({"email": format!("n{seed}@example.com")}),
            "EmailChanged",
        ),
        2 => v(serde_json::json!({}), "LoginFailed"),
        _ => v(serde_json::json!({}), "UserLoggedIn"),
    }
}
