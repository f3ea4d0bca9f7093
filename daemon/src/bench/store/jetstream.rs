//! `kiln bench store --backend jetstream`: the store's figures on a NATS server,
//! each next to the naive or raw JetStream way of doing the same on that server.
//!
//! - `latest_version` (one direct get of the stream subject's last message) at 1
//!   and at `--events` events, and the same read done by creating a consumer with
//!   deliver-last per call (then deleting it), at both sizes.
//! - Append throughput with 1 and 64 appenders (expected-version appends, one
//!   event each), and a raw publish loop (no headers, no guard) with 1 and 64
//!   publishers.
//!
//! It runs on a stream and subject prefix of its own (`KILNBENCH_<random>`),
//! deleted afterwards, so it can point at a shared server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream as JsStream;
use futures::StreamExt;

use super::super::{Samples, micros, ratio};
use super::{StoreBenchArgs, append_bench, latest_version_bench, payload};
use crate::store::jetstream::{JetStreamConfig, JetStreamStore};
use crate::store::{EventStore, StreamId};

pub async fn run(args: StoreBenchArgs) -> anyhow::Result<()> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut config = JetStreamConfig::new(args.nats_url.clone());
    config.servers = args
        .nats_url
        .split(',')
        .map(|u| u.trim().to_string())
        .collect();
    config.replicas = args.replicas;
    config.stream = format!("KILNBENCH_{tag}");
    config.subject_prefix = format!("kilnbench{tag}");
    let js_store = JetStreamStore::connect(config.clone()).await.with_context(|| {
        format!(
            "connecting to {} (start a server with `nats-server -js -sd <dir>`, or pass --nats-url)",
            args.nats_url
        )
    })?;
    println!(
        "kiln bench store — backend: jetstream, server: {}, stream: {} ({} replica(s))",
        args.nats_url, config.stream, config.replicas
    );
    let store: Arc<dyn EventStore> = Arc::new(js_store.clone());
    let result = measure(&js_store, &store, &args).await;
    let js = js_store.context().clone();
    drop(store);
    drop(js_store);
    for name in [config.stream.clone(), config.snapshot_stream()] {
        let _ = js.delete_stream(&name).await;
    }
    result
}

async fn measure(
    js_store: &JetStreamStore,
    store: &Arc<dyn EventStore>,
    args: &StoreBenchArgs,
) -> anyhow::Result<()> {
    let (m1, m2) = latest_version_bench(store, args).await?;
    // A baseline only: on a cluster, consumers created per call can be
    // refused (503) while the previous ones are still being removed.
    if let Err(e) = consumer_per_call_bench(js_store, args, m1, m2).await {
        println!("consumer-per-call baseline skipped: {e:#}");
    }
    let (one, many) = append_bench(store, args).await?;
    raw_publish_bench(js_store, args, one, many).await
}

/// The approach kiln avoids: a consumer with deliver-last created per call.
async fn consumer_per_call_bench(
    js_store: &JetStreamStore,
    args: &StoreBenchArgs,
    direct_short: Duration,
    direct_long: Duration,
) -> anyhow::Result<()> {
    let stream = js_store
        .context()
        .get_stream(&js_store.config().stream)
        .await
        .context("opening the bench stream")?;
    let samples = args.samples.min(1000);
    let subjects = js_store.subjects();
    let short = subjects.event(&StreamId::new("bench-short")?);
    let long = subjects.event(&StreamId::new("bench-long")?);
    let (mut s_short, mut s_long) = (
        Samples::with_capacity(samples),
        Samples::with_capacity(samples),
    );
    for _ in 0..samples {
        let t = Instant::now();
        let v = latest_by_consumer(&stream, &short).await?;
        s_short.push(t.elapsed());
        anyhow::ensure!(
            v == 1,
            "short stream at version {v} by consumer, expected 1"
        );
        let t = Instant::now();
        let v = latest_by_consumer(&stream, &long).await?;
        s_long.push(t.elapsed());
        anyhow::ensure!(v == args.events, "long stream at version {v} by consumer");
    }
    let (c1, c2) = (s_short.quantile(0.5), s_long.quantile(0.5));
    println!(
        "consumer-per-call latest median, 1 event:        {}",
        micros(c1)
    );
    println!(
        "consumer-per-call latest median, {} events: {}",
        args.events,
        micros(c2)
    );
    println!(
        "consumer-per-call / direct get (1 event):         {:.1}x",
        ratio(c1.as_secs_f64(), direct_short.as_secs_f64())
    );
    println!(
        "consumer-per-call / direct get ({} events): {:.1}x",
        args.events,
        ratio(c2.as_secs_f64(), direct_long.as_secs_f64())
    );
    Ok(())
}

/// Creates a consumer delivering the subject's last message, reads its version,
/// deletes the consumer.
async fn latest_by_consumer(stream: &JsStream, subject: &str) -> anyhow::Result<u64> {
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::Last,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .context("creating a deliver-last consumer")?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .context("fetching from the consumer")?;
    let msg = batch
        .next()
        .await
        .context("the consumer delivered nothing")?
        .map_err(|e| anyhow::anyhow!("fetching the last message: {e}"))?;
    let version = msg
        .headers
        .as_ref()
        .and_then(|h| h.get_last("Kiln-Version"))
        .and_then(|v| v.as_str().parse().ok())
        .context("the last message has no Kiln-Version header")?;
    let name = consumer.cached_info().name.clone();
    stream
        .delete_consumer(&name)
        .await
        .context("deleting the consumer")?;
    Ok(version)
}

/// Raw JetStream publishes (no headers, no guard) with 1 and 64 publishers.
async fn raw_publish_bench(
    js_store: &JetStreamStore,
    args: &StoreBenchArgs,
    kiln_one: f64,
    kiln_many: f64,
) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(args.seconds);
    let one = raw_publishers(js_store, 1, window).await?;
    println!("raw publish throughput, 1 publisher:    {one:>10.0} msgs/s");
    let many = raw_publishers(js_store, 64, window).await?;
    println!("raw publish throughput, 64 publishers:  {many:>10.0} msgs/s");
    println!(
        "kiln append / raw publish:  {:.2} (1),  {:.2} (64)",
        ratio(kiln_one, one),
        ratio(kiln_many, many)
    );
    Ok(())
}

async fn raw_publishers(
    js_store: &JetStreamStore,
    n: usize,
    window: Duration,
) -> anyhow::Result<f64> {
    super::super::rate_of_workers(n, window, |i, deadline| {
        let js = js_store.context().clone();
        let subject = StreamId::new(format!("raw-{n}x{i}")).map(|s| js_store.subjects().event(&s));
        async move {
            let subject = subject?;
            let mut count = 0u64;
            while Instant::now() < deadline {
                js.publish(subject.clone(), payload(count).data)
                    .await?
                    .await?;
                count += 1;
            }
            Ok(count)
        }
    })
    .await
}
