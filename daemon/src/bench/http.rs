//! `kiln bench http`: the HTTP API on loopback, in-tree load generator.
//!
//! Starts a daemon in this process (embedded store in a temp dir, the `users`
//! module deployed, the API on 127.0.0.1:<free port>), then:
//!
//! 1. **Appends through the API**: `--appenders` concurrent clients each append
//!    single-event registrations (one new stream each) for `--users` events in
//!    all; printed next to the same appends straight into the store (baseline)
//!    and their ratio.
//! 2. **Queries at a fixed rate**: `GET /views/users/{key}` at `--rate` requests
//!    per second for `--secs` seconds over `--connections` keep-alive
//!    connections, keys drawn round-robin. Latency is measured from each request's
//!    *scheduled* time, so a stall counts against every request it delays
//!    (no coordinated omission). Prints achieved throughput, p50 / p99 / p99.9
//!    and max, next to the in-process `Lifecycle::get` baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;

use super::{micros, ratio};
use crate::api::{self, ApiConfig};
use crate::lifecycle::{Lifecycle, LifecycleConfig};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};

#[derive(Args, Debug, Clone)]
pub struct HttpBenchArgs {
    /// Users to register (one append each) before querying.
    #[arg(long, default_value_t = 20_000)]
    pub users: u64,
    /// Concurrent API clients appending.
    #[arg(long, default_value_t = 32)]
    pub appenders: usize,
    /// Query rate, requests per second (fixed, open loop).
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Query phase length, in seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Keep-alive connections issuing queries.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// The users module (build it with `cargo build --release --target
    /// wasm32-unknown-unknown -p projection-users`, or run the tests once).
    #[arg(long, default_value = super::projection::Which::Users.module_path())]
    pub module: std::path::PathBuf,
}

pub async fn run(args: HttpBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.users > 0 && args.rate > 0 && args.connections > 0 && args.appenders > 0,
        "--users, --rate, --connections and --appenders must be positive"
    );
    let dir = tempfile_dir()?;
    let result = bench(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-http-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

async fn bench(args: &HttpBenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("reading the users module {}", args.module.display()))?;
    let store: Arc<dyn EventStore> =
        Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.join("log")))?);
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let lifecycle = Lifecycle::start(
        LifecycleConfig::new(dir.join("data")),
        store.clone(),
        runtime,
    )
    .await
    .context("starting the lifecycle")?;
    let id = lifecycle.deploy(&wasm, "users.wasm").await?.id().clone();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let lifecycle = lifecycle.clone();
        async move {
            let config = ApiConfig::default();
            api::serve_on(listener, None, lifecycle, &config, async {
                let _ = stop_rx.await;
            })
            .await
        }
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections.max(args.appenders))
        .build()?;

    println!(
        "kiln bench http: {} users, {} appenders; queries at {} req/s for {} s over {} connections (loopback)",
        args.users, args.appenders, args.rate, args.secs, args.connections
    );

    // 1. Appends: through the API, then straight into the store (baseline).
    let api_rate = append_via_api(&client, &base, args, "user").await?;
    let direct_rate = append_direct(&store, args, "direct").await?;
    println!("append via HTTP API:        {api_rate:>10.0} appends/s");
    println!("append straight to store:   {direct_rate:>10.0} appends/s (baseline)");
    println!(
        "ratio API / store:          {:>10.2}",
        ratio(api_rate, direct_rate)
    );

    // The view must have applied every registration before we query it.
    let head = store.head().await?;
    lifecycle
        .wait_for_position(&id, head, Duration::from_secs(600))
        .await
        .context("waiting for the users view to catch up")?;

    // 2. Baseline: the same gets, in process.
    let mut base_hist = Histogram::<u64>::new(3)?;
    let probes = 100_000.min(args.users * 10);
    for i in 0..probes {
        let key = format!("user-{}", i % args.users);
        let t = Instant::now();
        let doc = lifecycle.get(&id, key.as_bytes())?;
        base_hist.record(t.elapsed().as_nanos() as u64)?;
        anyhow::ensure!(doc.is_some(), "{key} is missing from {id}");
    }

    // 3. Fixed-rate queries over HTTP.
    let hist = query_at_rate(&client, &base, args).await?;
    let total = hist.len();
    let achieved = total as f64 / args.secs as f64;
    let q = |h: &Histogram<u64>, p: f64| micros(Duration::from_nanos(h.value_at_quantile(p)));
    println!(
        "GET /views/users/{{key}}:    {achieved:>10.0} req/s achieved of {} offered ({total} requests)",
        args.rate
    );
    println!(
        "  latency from schedule:   p50 {}  p99 {}  p99.9 {}  max {}",
        q(&hist, 0.5),
        q(&hist, 0.99),
        q(&hist, 0.999),
        micros(Duration::from_nanos(hist.max()))
    );
    println!(
        "  in-process get baseline: p50 {}  p99 {}",
        q(&base_hist, 0.5),
        q(&base_hist, 0.99)
    );
    println!(
        "ratio p99 HTTP / in-process:{:>10.1}",
        ratio(
            hist.value_at_quantile(0.99) as f64,
            base_hist.value_at_quantile(0.99) as f64
        )
    );

    let _ = stop_tx.send(());
    server.await??;
    lifecycle.shutdown().await;
    Ok(())
}

/// Registers users `0..users` from `appenders` concurrent workers (worker `a`
/// takes users `a, a + appenders, ...`) and returns users registered per second.
async fn register_users<F, Fut>(args: &HttpBenchArgs, register: F) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let (users, appenders) = (args.users, args.appenders as u64);
    let tasks: Vec<_> = (0..appenders)
        .map(|a| {
            let register = register.clone();
            tokio::spawn(async move {
                for i in (a..users).step_by(appenders as usize) {
                    register(i).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(users as f64 / started.elapsed().as_secs_f64())
}

fn registration(i: u64) -> serde_json::Value {
    serde_json::json!({ "name": format!("User {i}"), "email": format!("u{i}@x.io") })
}

async fn append_via_api(
    client: &reqwest::Client,
    base: &str,
    args: &HttpBenchArgs,
    category: &str,
) -> anyhow::Result<f64> {
    let (client, base, category) = (client.clone(), base.to_string(), category.to_string());
    register_users(args, move |i| {
        let (client, base, category) = (client.clone(), base.clone(), category.clone());
        async move {
            let body = serde_json::json!({
                "expected_version": "no_stream",
                "events": [{ "type": "UserRegistered", "data": registration(i) }],
            });
            let res = client
                .post(format!("{base}/streams/{category}-{i}/events"))
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(
                res.status().is_success(),
                "append to {category}-{i}: {}",
                res.text().await.unwrap_or_default()
            );
            Ok(())
        }
    })
    .await
}

async fn append_direct(
    store: &Arc<dyn EventStore>,
    args: &HttpBenchArgs,
    category: &str,
) -> anyhow::Result<f64> {
    let (store, category) = (store.clone(), category.to_string());
    register_users(args, move |i| {
        let (store, category) = (store.clone(), category.clone());
        async move {
            let ev = NewEvent::json("UserRegistered", &registration(i));
            let stream = StreamId::new(format!("{category}-{i}"))?;
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::NoStream,
                    vec![ev],
                ))
                .await?;
            Ok(())
        }
    })
    .await
}

/// Open-loop load: request `n` is due at `start + n / rate`; connection `c`
/// sends requests `c, c + C, c + 2C, ...`, each when due (or at once if late),
/// and its latency is measured from when it was due.
async fn query_at_rate(
    client: &reqwest::Client,
    base: &str,
    args: &HttpBenchArgs,
) -> anyhow::Result<Histogram<u64>> {
    let total = args.rate * args.secs;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for c in 0..args.connections as u64 {
        let (client, base) = (client.clone(), base.to_string());
        let (users, conns) = (args.users, args.connections as u64);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut n = c;
            while n < total {
                let due = start + interval.mul_f64(n as f64);
                tokio::time::sleep_until(due).await;
                let key = format!("user-{}", n % users);
                let res = client
                    .get(format!("{base}/views/users/{key}"))
                    .send()
                    .await?;
                anyhow::ensure!(res.status().is_success(), "GET {key}: {}", res.status());
                let _ = res.bytes().await?;
                hist.record(due.elapsed().as_nanos() as u64)?;
                n += conns;
            }
            anyhow::Ok(hist)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok(all)
}
