//! `kiln bench projection`: replays generated events from the embedded log
//! through the `users` (or `orders`) projection, as wasm and natively, in the
//! same run, for each log layout asked for:
//!
//! - `runs`: streams written 50 events at a time (the best case for the
//!   SDK's per-stream batch memo);
//! - `interleaved`: one event per append, streams in turn, so a batch of
//!   1024 touches 1024 streams;
//! - `zipf`: one event per append, the stream drawn by a Zipf law (s = 1.1):
//!   a few hot streams, a long tail, as in real systems.
//!
//! 1. Fills a fresh embedded log with `--events` events: `users` over 10,000
//!    users (registrations, logins, failed logins, renames, email changes),
//!    `orders` over `events / 3` orders of 1,000 customers (placed, paid,
//!    shipped or cancelled; each event writes the order and its customer's
//!    totals, read back in the same batch).
//! 2. wasm → view: reads the log in batches and applies them with a
//!    [`Projector`] into a fresh RocksDB view (documents + checkpoint per batch).
//! 3. wasm → memory: the same module, documents kept in memory.
//! 4. native: the same projection compiled natively, run by the SDK's harness
//!    over the same batches (the same decoding path as the module).
//!
//! With `--compare <module>` (e.g. `users-as`, the AssemblyScript port of
//! `users`), 2 and 3 run for that module too, in the same rounds, its documents
//! must equal the native ones, and its rates are shown as a ratio to `--module`'s.
//!
//! The wasm/native ratio compares 3 with 4 (same sink); 2 adds RocksDB. Each
//! variant runs `--rounds` times, interleaved, and the best rate is shown, so
//! a busy machine skews the figures less.
//!
//! With `--nats-url`, each layout is also written to a JetStream stream of its
//! own (`KILNBENCH_<random>`, deleted afterwards) and the warm-up's read path
//! is measured there: the log read alone through kiln's JetStream tail, and
//! wasm → RocksDB view fed by that tail, next to the embedded figures.

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

const USERS: u64 = 10_000;
/// Customers of the generated orders.
const CUSTOMERS: u64 = 1_000;

/// How the generated log orders its streams' events (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Runs,
    Interleaved,
    Zipf,
}

/// Which example projection the bench replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Users,
    Orders,
}

impl Which {
    /// Where `cargo test` (tests/build.rs) leaves its module.
    pub const fn module_path(self) -> &'static str {
        match self {
            Which::Users => concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/wasm-projections/wasm32-unknown-unknown/release/projection_users.wasm"
            ),
            Which::Orders => concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/wasm-projections/wasm32-unknown-unknown/release/projection_orders.wasm"
            ),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProjectionBenchArgs {
    /// Events to generate and replay.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per batch handed to the projection.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// The projection: users or orders.
    #[arg(long, value_enum, default_value = "users")]
    pub projection: Which,
    /// Log layouts to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "runs,interleaved,zipf"
    )]
    pub layout: Vec<Layout>,
    /// The module (by default the example built by `cargo test --release`,
    /// or `cargo build --release --target wasm32-unknown-unknown -p projection-<name>`).
    #[arg(long)]
    pub module: Option<PathBuf>,
    /// Other modules of the same projection (another language, another build)
    /// to measure in the same run, each next to `--module` (repeatable).
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// Rounds of measurements (the best of each variant is shown).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Directory for the log and the view (a temp dir, removed afterwards, by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also measure the warm-up reading from JetStream on this NATS server
    /// (e.g. `nats://127.0.0.1:4222`; a stream of its own, deleted afterwards).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// `users` only: also measure wasm → in-memory documents with the log
    /// read in windows of this many MiB, each window's events grouped by
    /// stream (log order kept within each stream), as a grouped warm-up of a
    /// `per_stream` projection would (issue 28); 0: skip.
    #[arg(long, default_value_t = 64)]
    pub group_window_mib: usize,
    /// Replicas of that stream (3 with the comma-separated URLs of a 3-node
    /// cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Also run the daemon's own warm-up (a lifecycle deploys the module
    /// and replays the log) with these worker counts, comma-separated, each
    /// in log order and in windows of `--group-window-mib` grouped by
    /// stream (`warmup_group_mib`); empty: skip.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub warmup_workers: Vec<usize>,
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
    let path = args
        .module
        .clone()
        .unwrap_or_else(|| PathBuf::from(args.projection.module_path()));
    let module = rt.load_file(&path).context(
        "loading the module (run `cargo test --release` once to build the examples, or pass --module)",
    )?;
    println!(
        "kiln bench projection — {} events, batches of {}, module {} ({})",
        args.events,
        args.batch,
        module.view_id(),
        path.display()
    );
    let instance_cost = instantiation_cost(&module, 1000)?;
    let mut others = Vec::new();
    for other in &args.compare {
        let m = rt
            .load_file(other)
            .with_context(|| format!("loading {}", other.display()))?;
        println!("  compared with {} ({})", m.view_id(), other.display());
        others.push(m);
    }
    let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // Per layout: the daemon's grouped warm-up rates (one per worker count).
    let mut warmups: Vec<(Layout, Vec<f64>)> = Vec::new();
    for layout in &args.layout {
        let log_dir = dir.join(format!("{layout:?}"));
        let mut config = EmbeddedConfig::new(log_dir.join("log"));
        config.durability = Durability::Buffered;
        let store = Arc::new(EmbeddedStore::open(config).context("opening the embedded store")?);
        let started = Instant::now();
        fill_layout(&store, args.events, *layout, args.projection).await?;
        println!(
            "\nlayout {layout:?}: {} events written in {:.1} s",
            args.events,
            started.elapsed().as_secs_f64()
        );
        let batch = args.batch.max(1);
        let (rounds, which, main) = (args.rounds.max(1), args.projection, module.clone());
        let group_window = args.group_window_mib << 20;
        let others_here = others.clone();
        let shared = store.clone();
        let log_dir_here = log_dir.clone();
        let (best, best_others) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Rates, Vec<Rates>)> {
                let mut best = Rates::default();
                let mut best_others = vec![Rates::default(); others_here.len()];
                let (store, log_dir) = (shared, log_dir_here);
                for round in 0..rounds {
                    let views = log_dir.join(format!("views-{round}"));
                    let (r, native_docs) =
                        measure(&store, &main, &views, batch, which, group_window)?;
                    best = best.max(&r);
                    for (i, other) in others_here.iter().enumerate() {
                        let views = log_dir.join(format!("views-{round}-compare-{i}"));
                        let (wasm_view, wasm_mem) =
                            measure_wasm(&store, other, &views, batch, &native_docs)?;
                        best_others[i] = best_others[i].max(&Rates {
                            wasm_view,
                            wasm_mem,
                            ..r
                        });
                    }
                }
                Ok((best, best_others))
            })
            .await??;
        let Rates {
            log_only,
            wasm_view,
            wasm_claimed,
            wasm_mem,
            wasm_grouped,
            native,
        } = best;
        let goal = match (layout, which) {
            (Layout::Interleaved, Which::Users) => "  (goal ≥ 0.7)",
            (Layout::Interleaved, Which::Orders) => "  (goal ≥ 0.5)",
            _ => "",
        };
        println!("  log read alone (baseline):          {log_only:>10.0} events/s");
        println!(
            "  wasm   → RocksDB view + checkpoint: {wasm_view:>10.0} events/s  = {:.2} × the log read{goal}",
            ratio(wasm_view, log_only)
        );
        println!(
            "  wasm   → view, documents claimed:   {wasm_claimed:>10.0} events/s  = {:.2} × unclaimed (a split warm-up's per_stream check)",
            ratio(wasm_claimed, wasm_view)
        );
        println!("  wasm   → in-memory documents:       {wasm_mem:>10.0} events/s");
        if wasm_grouped > 0.0 {
            println!(
                "  wasm   → in-memory, grouped by stream per {} MiB window: {wasm_grouped:>10.0} events/s  = {:.2} × ungrouped   documents identical: yes",
                args.group_window_mib,
                ratio(wasm_grouped, wasm_mem)
            );
        }
        println!("  native → in-memory documents:       {native:>10.0} events/s  (SDK harness)");
        println!(
            "  ratio wasm / native (same sink):      {:.2}   documents identical: yes",
            ratio(wasm_mem, native)
        );
        for (other, r) in others.iter().zip(&best_others) {
            println!("  {} (compared):", other.view_id());
            println!(
                "    wasm → RocksDB view + checkpoint: {:>10.0} events/s  = {:.2} × {}'s",
                r.wasm_view,
                ratio(r.wasm_view, wasm_view),
                module.view_id()
            );
            println!(
                "    wasm → in-memory documents:       {:>10.0} events/s  = {:.2} × {}'s   documents identical to native: yes",
                r.wasm_mem,
                ratio(r.wasm_mem, wasm_mem),
                module.view_id()
            );
        }
        let batch_secs = batch as f64 / wasm_mem.max(1.0);
        println!(
            "  fresh instance per batch:           {:>10.1} µs each ({:.1}% of a {batch}-event batch's time at the wasm → memory rate)",
            instance_cost * 1e6,
            100.0 * instance_cost / batch_secs
        );
        if !args.warmup_workers.is_empty() {
            let mut rates = Vec::new();
            for &workers in &args.warmup_workers {
                let runs = [(0, "log order"), (args.group_window_mib, "grouped")];
                let mut pair = [0.0; 2];
                for (i, (mib, what)) in runs.into_iter().enumerate() {
                    let data = log_dir.join(format!("daemon-{workers}-{mib}"));
                    let (rate, peak) =
                        daemon_warmup(store.clone(), &wasm, &data, mib << 20, workers).await?;
                    let _ = std::fs::remove_dir_all(&data);
                    pair[i] = rate;
                    println!(
                        "  daemon warm-up, {workers} worker(s), {what:<9}     {rate:>10.0} events/s  = {:.2} × the log read{}{}",
                        ratio(rate, log_only),
                        if i == 1 {
                            format!(", {:.2} × log order", ratio(rate, pair[0]))
                        } else {
                            String::new()
                        },
                        peak.map_or(String::new(), |mib| format!("; peak RSS {mib:.0} MiB"))
                    );
                }
                rates.push(pair[1]);
            }
            if let [one, more @ ..] = &rates[..] {
                for (w, r) in args.warmup_workers.iter().skip(1).zip(more) {
                    println!("  grouped warm-up, {w} workers / 1: {:.2}", ratio(*r, *one));
                }
            }
            warmups.push((*layout, rates));
        }
        if let Some(url) = &args.nats_url {
            let views = dir.join(format!("{layout:?}-jetstream-views"));
            jetstream(url, args, *layout, &module, &views, log_only, wasm_view).await?;
        }
    }
    if let Some((_, runs)) = warmups.iter().find(|(l, _)| *l == Layout::Runs) {
        for (layout, rates) in warmups.iter().filter(|(l, _)| *l != Layout::Runs) {
            for ((w, r), base) in args.warmup_workers.iter().zip(rates).zip(runs) {
                println!(
                    "daemon grouped warm-up, {layout:?} / runs, {w} worker(s): {:.2}  (goal ≥ 0.8)",
                    ratio(*r, *base)
                );
            }
        }
    }
    Ok(())
}

/// The daemon's warm-up of `wasm` over `store`: a lifecycle in `data`
/// deploys it and replays the whole log with `workers` workers and grouped
/// windows of `group_bytes` (0: log order). Events/s from the deploy to
/// the end of the warm-up, and the process's peak RSS meanwhile (MiB; the
/// peak is reset first where Linux allows it).
async fn daemon_warmup(
    store: Arc<EmbeddedStore>,
    wasm: &[u8],
    data: &std::path::Path,
    group_bytes: usize,
    workers: usize,
) -> anyhow::Result<(f64, Option<f64>)> {
    use crate::lifecycle::{CutoverPolicy, Lifecycle, LifecycleConfig, ViewPolicy};
    let mut lc = LifecycleConfig::new(data);
    lc.warmup_group_bytes = group_bytes;
    lc.warmup_workers = workers.max(1);
    lc.default_policy = ViewPolicy {
        cutover: CutoverPolicy::Manual,
        ..ViewPolicy::default()
    };
    let store: Arc<dyn EventStore> = store;
    let lifecycle = Lifecycle::start(lc, store, Runtime::new(RuntimeConfig::default())?)
        .await
        .context("starting the lifecycle")?;
    // Reset the peak RSS (Linux: "5" to clear_refs), so it is this run's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let id = lifecycle.deploy(wasm, "bench").await?.id().clone();
    super::lag::wait_while_warming(&lifecycle, &id).await?;
    let took = started.elapsed().as_secs_f64();
    let applied = lifecycle.status_of(&id).map_or(0, |s| s.checkpoint);
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
        });
    lifecycle.shutdown().await;
    Ok((applied as f64 / took, peak))
}

/// The warm-up's read path on JetStream: the layout written to a stream of
/// its own, read alone through kiln's tail, then through the tail into a
/// [`Projector`]; printed next to the embedded figures of the same layout.
async fn jetstream(
    url: &str,
    args: &ProjectionBenchArgs,
    layout: Layout,
    module: &crate::runtime::Module,
    views_dir: &std::path::Path,
    embedded_read: f64,
    embedded_view: f64,
) -> anyhow::Result<()> {
    use crate::store::jetstream::{JetStreamConfig, JetStreamStore};
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut config = JetStreamConfig::new(url);
    config.servers = url.split(',').map(|u| u.trim().to_string()).collect();
    config.replicas = args.replicas;
    config.stream = format!("KILNBENCH_{tag}");
    config.subject_prefix = format!("kilnbench{tag}");
    let js = JetStreamStore::connect(config.clone())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let context = js.context().clone();
    let client = js.client().clone();
    let filter = js.subjects().events_filter();
    let store: Arc<dyn EventStore> = Arc::new(js);
    let result = async {
        let started = Instant::now();
        fill_into(store.clone(), args.events, layout, args.projection).await?;
        let head = store.head().await?;
        println!(
            "  JetStream ({url}, stream {}): {} events written in {:.1} s",
            config.stream,
            args.events,
            started.elapsed().as_secs_f64()
        );
        let mut read = 0.0f64;
        let mut view = 0.0f64;
        let (mut raw_ordered, mut raw_direct, mut raw_all) = (0.0f64, 0.0f64, 0.0f64);
        for round in 0..args.rounds.max(1) {
            raw_ordered = raw_ordered.max(raw_ordered_read(&context, &config.stream, &filter, head).await?);
            raw_all = raw_all.max(raw_ordered_read(&context, &config.stream, "", head).await?);
            raw_direct = raw_direct.max(raw_direct_read(&client, &config.stream, &filter, head).await?);
            read = read.max(replay_tail(&store, head, |_| Ok(())).await?);
            let views = ViewStore::open(views_dir.join(format!("{round}")))?;
            let mut projector = Projector::open(module, &views)?;
            let rate = replay_tail(&store, head, |events| {
                tokio::task::block_in_place(|| projector.apply(events).map_err(anyhow::Error::from))
            })
            .await?;
            view = view.max(rate);
        }
        let raw = raw_ordered.max(raw_direct).max(raw_all);
        println!(
            "  raw async-nats readers, same stream: ordered consumer on the event subjects {raw_ordered:.0} msgs/s, on the whole stream {raw_all:.0} msgs/s; batched direct get {raw_direct:.0} msgs/s"
        );
        println!(
            "  JetStream log read alone (tail):    {read:>10.0} events/s  = {:.2} × the fastest raw reader (goal ≥ 0.8), {:.2} × the embedded log read",
            ratio(read, raw),
            ratio(read, embedded_read)
        );
        println!(
            "  JetStream → RocksDB view + checkpoint: {view:>8.0} events/s  = {:.2} × the JetStream log read, {:.2} × the embedded warm-up",
            ratio(view, read),
            ratio(view, embedded_view)
        );
        anyhow::Ok(())
    }
    .await;
    drop(store);
    for name in [config.stream.clone(), config.snapshot_stream()] {
        let _ = context.delete_stream(&name).await;
    }
    result
}

/// The baseline a tail is held to: an async-nats ordered pull consumer (the
/// library's defaults) reading the subjects `filter` matches (`""`: the whole
/// stream) up to `head`, counting messages without decoding them; messages/s.
async fn raw_ordered_read(
    context: &async_nats::jetstream::Context,
    stream: &str,
    filter: &str,
    head: u64,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    use futures::StreamExt;
    let started = Instant::now();
    let consumer = context
        .get_stream(stream)
        .await?
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut count = 0u64;
    while let Some(m) = messages.next().await {
        let m = m?;
        count += 1;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        if seq >= head {
            break;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The other baseline: batched direct gets (nats-server 2.11+), one request
/// of 1000 messages after another, counting them undecoded; messages/s.
async fn raw_direct_read(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    head: u64,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let started = Instant::now();
    let (mut seq, mut count) = (1u64, 0u64);
    let api = format!("$JS.API.DIRECT.GET.{stream}");
    while seq <= head {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await?;
        let body = serde_json::json!({ "seq": seq, "next_by_subj": filter, "batch": 1000 });
        client
            .publish_with_reply(api.clone(), inbox, body.to_string().into())
            .await?;
        let mut last = None;
        while let Some(m) = sub.next().await {
            if m.status.is_some() {
                break;
            }
            let s = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Sequence"))
                .and_then(|v| v.as_str().parse::<u64>().ok());
            count += 1;
            last = s.or(last);
        }
        match last {
            Some(l) => seq = l + 1,
            None => break,
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Reads the log through the store's tail up to `head`, handing each batch
/// to `apply`; events/s.
async fn replay_tail(
    store: &Arc<dyn EventStore>,
    head: u64,
    mut apply: impl FnMut(&[RecordedEvent]) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    use futures::StreamExt;
    let started = Instant::now();
    let mut tail = store.tail(1);
    let mut count = 0u64;
    while let Some(batch) = tail.next().await {
        let batch = batch?;
        let Some(last) = batch.last().map(|e| e.position) else {
            continue;
        };
        count += batch.len() as u64;
        apply(&batch)?;
        if last >= head {
            break;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
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
    /// The same into a view warming split (one partition of one): every
    /// batch's documents claimed (`views::owners`), as a split warm-up does.
    wasm_claimed: f64,
    wasm_mem: f64,
    /// The same, each window of the log grouped by stream (0: not measured).
    wasm_grouped: f64,
    native: f64,
}

impl Rates {
    fn max(&self, o: &Rates) -> Rates {
        Rates {
            log_only: self.log_only.max(o.log_only),
            wasm_view: self.wasm_view.max(o.wasm_view),
            wasm_claimed: self.wasm_claimed.max(o.wasm_claimed),
            wasm_mem: self.wasm_mem.max(o.wasm_mem),
            wasm_grouped: self.wasm_grouped.max(o.wasm_grouped),
            native: self.native.max(o.native),
        }
    }
}

/// One round: the log alone, wasm into a fresh RocksDB view, wasm into memory,
/// native into memory; fails if wasm and native documents differ. Returns the
/// rates and the native documents.
fn measure(
    store: &EmbeddedStore,
    module: &crate::runtime::Module,
    views_dir: &std::path::Path,
    batch: usize,
    which: Which,
    group_window: usize,
) -> anyhow::Result<(Rates, NativeDocs)> {
    let log_only = replay(store, batch, |_| Ok(()))?;
    let (native, native_docs) = match which {
        Which::Users => native(
            store,
            batch,
            kiln_sdk::Harness::<PerStream<projection_users::Users>>::new(),
        )?,
        Which::Orders => native(
            store,
            batch,
            kiln_sdk::Harness::<projection_orders::Orders>::new(),
        )?,
    };
    let (wasm_view, wasm_mem) = measure_wasm(store, module, views_dir, batch, &native_docs)?;
    let wasm_claimed = measure_claimed(store, module, &views_dir.with_extension("claimed"), batch)?;
    let wasm_grouped = match which {
        Which::Users if group_window > 0 => {
            measure_grouped(store, module, batch, group_window, &native_docs)?
        }
        _ => 0.0,
    };
    let rates = Rates {
        log_only,
        wasm_view,
        wasm_claimed,
        wasm_mem,
        wasm_grouped,
        native,
    };
    Ok((rates, native_docs))
}

/// `module` into a fresh RocksDB view split into one partition: each batch
/// claims the documents it read and wrote, as every partition of a split
/// warm-up does (the check of `per_stream`, `views::owners`).
fn measure_claimed(
    store: &EmbeddedStore,
    module: &crate::runtime::Module,
    views_dir: &std::path::Path,
    batch: usize,
) -> anyhow::Result<f64> {
    let views = ViewStore::open(views_dir)?;
    views.create(module.view_id())?;
    views.split(module.view_id(), 1)?;
    let slot = crate::views::Slot::Partition { index: 0, of: 1 };
    let mut projector = Projector::open_at(module, &views, slot)?;
    replay(store, batch, |events| Ok(projector.apply(events)?))
}

/// `module` into a fresh RocksDB view, then into memory: both rates; fails
/// unless its documents are `native_docs`, byte for byte.
fn measure_wasm(
    store: &EmbeddedStore,
    module: &crate::runtime::Module,
    views_dir: &std::path::Path,
    batch: usize,
    native_docs: &NativeDocs,
) -> anyhow::Result<(f64, f64)> {
    let views = ViewStore::open(views_dir)?;
    let mut projector = Projector::open(module, &views)?;
    let wasm_view = replay(store, batch, |events| Ok(projector.apply(events)?))?;
    let docs = SharedDocuments::default();
    let mut instance = Instance::new(module, Box::new(docs.clone()))?;
    let wasm_mem = replay(store, batch, |events| {
        docs.apply(instance.apply(events)?);
        Ok(())
    })?;
    let wasm_docs = docs.snapshot();
    let same = same_documents(&wasm_docs, native_docs);
    anyhow::ensure!(
        same,
        "{} built documents other than the native projection's",
        module.view_id()
    );
    Ok((wasm_view, wasm_mem))
}

/// `module` into memory with the log read in windows of `window` bytes of
/// events, each window's events grouped by stream (stable: log order within
/// each stream) and handed over in batches of `batch`; events/s. Fails
/// unless its documents are `native_docs`, byte for byte (grouping is sound
/// only for a projection whose documents depend on their own stream's events).
fn measure_grouped(
    store: &EmbeddedStore,
    module: &crate::runtime::Module,
    batch: usize,
    window: usize,
    native_docs: &NativeDocs,
) -> anyhow::Result<f64> {
    let docs = SharedDocuments::default();
    let mut instance = Instance::new(module, Box::new(docs.clone()))?;
    let started = Instant::now();
    let (mut next, mut count) = (1, 0u64);
    let mut ended = false;
    while !ended {
        let (mut group, mut bytes) = (Vec::new(), 0usize);
        while bytes < window {
            let events = scan_log(store, next, batch)?;
            let Some(last) = events.last() else {
                ended = true;
                break;
            };
            next = last.position + 1;
            bytes += events
                .iter()
                .map(|e| e.data.len() + e.event_type.len() + e.stream.as_str().len() + 64)
                .sum::<usize>();
            group.extend(events);
        }
        // By a hash of the stream id, then log order: each stream's events
        // together and in order (two streams sharing a hash interleave, in
        // log order, which is as sound); sorting 16-byte keys, not events.
        let mut order: Vec<(u64, usize)> = group
            .iter()
            .enumerate()
            .map(|(i, e)| {
                use std::hash::{BuildHasher, BuildHasherDefault};
                let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                    .hash_one(&e.stream);
                (h, i)
            })
            .collect();
        order.sort_unstable();
        let mut slots: Vec<Option<RecordedEvent>> = group.into_iter().map(Some).collect();
        let group: Vec<RecordedEvent> = order
            .into_iter()
            .filter_map(|(_, i)| slots[i].take())
            .collect();
        count += group.len() as u64;
        for chunk in group.chunks(batch) {
            docs.apply(instance.apply(chunk)?);
        }
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let wasm_docs = docs.snapshot();
    let same = same_documents(&wasm_docs, native_docs);
    anyhow::ensure!(
        same,
        "{} grouped by stream built documents other than the native projection's",
        module.view_id()
    );
    Ok(rate)
}

/// Whether `wasm` (by key) are `native`, byte for byte.
fn same_documents(
    wasm: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    native: &NativeDocs,
) -> bool {
    wasm.len() == native.len()
        && wasm
            .iter()
            .zip(native)
            .all(|((k1, v1), (k2, v2))| k1 == k2.as_bytes() && v1 == v2)
}

/// Documents a native run built, by key.
type NativeDocs = Vec<(String, Vec<u8>)>;

/// The projection compiled natively, run by the SDK's harness over the
/// same encoded batches: events/s and the documents it built.
fn native<P: kiln_sdk::Projection>(
    store: &EmbeddedStore,
    batch: usize,
    mut harness: kiln_sdk::Harness<P>,
) -> anyhow::Result<(f64, NativeDocs)> {
    let mut writer = BatchWriter::new();
    let rate = replay(store, batch, |events| {
        writer.clear();
        for e in events {
            encode_event(&mut writer, e);
        }
        harness
            .apply_encoded(writer.bytes(), events[0].position)
            .map_err(|e| anyhow::anyhow!("native projection: {e}"))
    })?;
    let docs = harness
        .documents()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((rate, docs))
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

/// Appends `total` events of `which` in `layout` from 16 concurrent writers,
/// each owning every 16th stream (so each knows its streams' versions).
pub(super) async fn fill_layout(
    store: &EmbeddedStore,
    total: u64,
    layout: Layout,
    which: Which,
) -> anyhow::Result<()> {
    fill_into(Arc::new(store.clone()), total, layout, which).await
}

/// [`fill_layout`] into any store.
async fn fill_into(
    store: Arc<dyn EventStore>,
    total: u64,
    layout: Layout,
    which: Which,
) -> anyhow::Result<()> {
    const WRITERS: u64 = 16;
    let (streams, cap) = match which {
        Which::Users => (USERS, u64::MAX),
        // Room for every writer's share: a writer owns every 16th order.
        Which::Orders => (total.div_ceil(ORDER_EVENTS) + WRITERS, ORDER_EVENTS),
    };
    let per_append = if layout == Layout::Runs { 50 } else { 1 };
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let share = total / WRITERS + u64::from(w < total % WRITERS);
                let mine: Vec<u64> = (0..streams).filter(|s| s % WRITERS == w).collect();
                let zipf = Zipf::new(mine.len(), 1.1);
                let mut rng = SplitMix(w + 1);
                let mut versions = vec![0u64; mine.len()];
                let (mut written, mut turn) = (0u64, 0usize);
                while written < share {
                    let mut slot = match layout {
                        Layout::Zipf => zipf.sample(&mut rng),
                        _ => {
                            turn += 1;
                            (turn - 1) % mine.len().max(1)
                        }
                    };
                    // A full stream (an order has its 3 events) passes the turn on.
                    let mut tries = 0;
                    while versions[slot] >= cap && tries < mine.len() {
                        slot = (slot + 1) % mine.len();
                        tries += 1;
                    }
                    anyhow::ensure!(tries < mine.len(), "every stream is full");
                    let n = per_append.min(share - written).min(cap - versions[slot]);
                    let s = mine[slot];
                    let events = (0..n)
                        .map(|i| match which {
                            Which::Users => user_event(versions[slot] + i, written + i),
                            Which::Orders => order_event(s, versions[slot] + i, written + i),
                        })
                        .collect();
                    let stream = StreamId::new(match which {
                        Which::Users => format!("user-{s}"),
                        Which::Orders => format!("order-{s}"),
                    })?;
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

/// Events of one generated order: placed, paid, then shipped or cancelled.
const ORDER_EVENTS: u64 = 3;

/// The `version`-th event (0-based) of order `order`.
fn order_event(order: u64, version: u64, seed: u64) -> NewEvent {
    let customer = format!("c{}", order % CUSTOMERS);
    let event = match version {
        0 => (
            "OrderPlaced",
            serde_json::json!({"customer": customer, "lines": [
                {"sku": format!("sku-{}", seed % 500), "qty": 1 + seed % 3, "unit_cents": 250 + seed % 1000},
                {"sku": format!("sku-{}", (seed / 7) % 500), "qty": 1, "unit_cents": 999},
            ]}),
        ),
        1 => ("OrderPaid", serde_json::json!({})),
        _ if seed.is_multiple_of(5) => (
            "OrderCancelled",
            serde_json::json!({"reason": "changed their mind"}),
        ),
        _ => ("OrderShipped", serde_json::json!({})),
    };
    NewEvent::json(event.0, &event.1)
}

/// A deterministic generator (SplitMix64) for the bench's draws.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf's law over `n` ranks: rank `i` is drawn with weight `1 / (i+1)^s`.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 0..n {
            sum += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut SplitMix) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|c| *c < u)
            .min(self.cdf.len().saturating_sub(1))
    }
}
