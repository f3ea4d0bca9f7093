//! `kiln bench store --backend jetstream`: the store's figures on a NATS server,
//! each next to the naive or raw JetStream way of doing the same on that server.
//!
//! - `latest_version` (one direct get of the stream subject's last message) at 1
//!   and at `--events` events, and the same read done by creating a consumer with
//!   deliver-last per call (then deleting it), at both sizes.
//! - Append throughput with 1 and 64 appenders (expected-version appends, one
//!   event each), and a raw publish loop (no headers, no guard) with 1 and 64
//!   publishers.
//! - Multi-event appends of `--batch-sizes` events with `--writers` writers,
//!   next to a raw async-nats atomic batch publisher doing the same.
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
use crate::store::{AppendRequest, EventStore, ExpectedVersion, StreamId};

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
    raw_publish_bench(js_store, args, one, many).await?;
    multi_event_bench(js_store, store, args).await
}

/// Multi-event appends (one stream per writer, expected-version guarded,
/// `n` events each) next to a raw async-nats atomic batch publisher writing
/// as many messages of the same size per batch, plain (no headers) and
/// checked (what the server checks on kiln's: a message id on every message,
/// the subject's last sequence on the first), for each batch size and writer
/// count: events/s and their ratios.
async fn multi_event_bench(
    js_store: &JetStreamStore,
    store: &Arc<dyn EventStore>,
    args: &StoreBenchArgs,
) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(args.seconds);
    println!(
        "multi-event appends, events/s (raw: async-nats atomic batches of as many messages, \
         plain and checked = ids + guard):"
    );
    println!(
        "{:>6} {:>7} {:>10} {:>10} {:>10} {:>11} {:>10} {:>12}",
        "events", "writers", "kiln", "raw", "raw ckd", "appends/s", "kiln/raw", "kiln/raw ckd"
    );
    for &n in &args.batch_sizes {
        for &writers in &args.writers {
            let kiln = super::super::rate_of_workers(writers, window, |i, deadline| {
                let store = store.clone();
                async move {
                    let stream = StreamId::new(format!("bench-multi{n}w{writers}x{i}"))?;
                    let (mut version, mut events) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let batch = (0..n as u64).map(|k| payload(version + k)).collect();
                        store
                            .append(AppendRequest::new(
                                stream.clone(),
                                ExpectedVersion::Exact(version),
                                batch,
                            ))
                            .await?;
                        version += n as u64;
                        events += n as u64;
                    }
                    Ok(events)
                }
            })
            .await?;
            let mut raw = [0.0; 2];
            for (checked, rate) in [false, true].into_iter().zip(raw.iter_mut()) {
                *rate = super::super::rate_of_workers(writers, window, |i, deadline| {
                    let client = js_store.client().clone();
                    let subject = StreamId::new(format!("raw-multi{n}w{writers}c{checked}x{i}"))
                        .map(|s| js_store.subjects().event(&s));
                    async move {
                        let subject = subject?;
                        let (mut events, mut last) = (0u64, 0u64);
                        let mut guard = checked.then_some(&mut last);
                        while Instant::now() < deadline {
                            if raw_atomic_batch(&client, &subject, n, events, guard.as_deref_mut())
                                .await?
                            {
                                events += n as u64;
                            }
                        }
                        Ok(events)
                    }
                })
                .await?;
            }
            println!(
                "{n:>6} {writers:>7} {kiln:>10.0} {:>10.0} {:>10.0} {:>11.0} {:>10.2} {:>12.2}",
                raw[0],
                raw[1],
                kiln / n as f64,
                ratio(kiln, raw[0]),
                ratio(kiln, raw[1])
            );
        }
    }
    Ok(())
}

/// One atomic batch of `n` messages on `subject`, published the plain way:
/// all but the last without waiting, the last (the commit) as a request.
/// With `guard` (the subject's last sequence, updated), every message also
/// carries a message id and the first the guard. `false` when the server
/// refused it as too many batches in flight (it allows 50 per stream): the
/// caller tries again.
async fn raw_atomic_batch(
    client: &async_nats::Client,
    subject: &str,
    n: usize,
    first: u64,
    guard: Option<&mut u64>,
) -> anyhow::Result<bool> {
    use async_nats::HeaderMap;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let checked = guard.is_some();
    let expected = guard.as_deref().copied();
    let headers = |k: usize| {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", k.to_string().as_str());
        if checked {
            h.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
        }
        if let (1, Some(last)) = (k, expected) {
            h.insert(
                "Nats-Expected-Last-Subject-Sequence",
                last.to_string().as_str(),
            );
        }
        h
    };
    for k in 1..n {
        client
            .publish_with_headers(
                subject.to_string(),
                headers(k),
                payload(first + k as u64 - 1).data,
            )
            .await?;
    }
    let mut h = headers(n);
    h.insert("Nats-Batch-Commit", "1");
    let reply = client
        .request_with_headers(subject.to_string(), h, payload(first + n as u64 - 1).data)
        .await?;
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    // Too many batches in flight on the stream (10210), or a batch whose
    // first messages the server dropped for that reason (10176).
    if ack["error"]["err_code"] == 10210 || ack["error"]["err_code"] == 10176 {
        return Ok(false);
    }
    anyhow::ensure!(
        ack["error"].is_null() && ack["count"] == n as u64,
        "a raw atomic batch of {n} was not committed: {ack}"
    );
    if let (Some(last), Some(seq)) = (guard, ack["seq"].as_u64()) {
        *last = seq;
    }
    Ok(true)
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
    let one = raw_publishers(js_store, 1, window, false).await?;
    println!("raw publish throughput, 1 publisher:    {one:>10.0} msgs/s");
    let many = raw_publishers(js_store, 64, window, false).await?;
    println!("raw publish throughput, 64 publishers:  {many:>10.0} msgs/s");
    println!(
        "kiln append / raw publish:  {:.2} (1),  {:.2} (64)",
        ratio(kiln_one, one),
        ratio(kiln_many, many)
    );
    let g_one = raw_publishers(js_store, 1, window, true).await?;
    let g_many = raw_publishers(js_store, 64, window, true).await?;
    println!(
        "raw guarded publish (Nats-Msg-Id + expected last subject sequence): {g_one:.0} msgs/s (1), {g_many:.0} msgs/s (64)"
    );
    println!(
        "kiln append / raw guarded publish:  {:.2} (1),  {:.2} (64)",
        ratio(kiln_one, g_one),
        ratio(kiln_many, g_many)
    );
    Ok(())
}

/// Raw publishes, plain or `checked`: carrying what the server checks on a
/// kiln append, a message id (dedupe) and the subject's last sequence (the
/// version guard).
async fn raw_publishers(
    js_store: &JetStreamStore,
    n: usize,
    window: Duration,
    checked: bool,
) -> anyhow::Result<f64> {
    super::super::rate_of_workers(n, window, |i, deadline| {
        let js = js_store.context().clone();
        let stream = js_store.config().stream.clone();
        let subject =
            StreamId::new(format!("raw-{n}c{checked}x{i}")).map(|s| js_store.subjects().event(&s));
        async move {
            let subject = subject?;
            let stream = js.get_stream(&stream).await?;
            let (mut count, mut last) = (0u64, 0u64);
            while Instant::now() < deadline {
                let data = payload(count).data;
                let ack = if checked {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
                    h.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        last.to_string().as_str(),
                    );
                    match js
                        .publish_with_headers(subject.clone(), h, data)
                        .await?
                        .await
                    {
                        Ok(ack) => ack,
                        // A cluster's leader can refuse a guard it has not applied
                        // yet: read the subject's last sequence, as kiln does, and
                        // try again.
                        Err(e) if e.to_string().contains("wrong last sequence") => {
                            last = match stream.direct_get_last_for_subject(subject.clone()).await
                            {
                                Ok(m) => m.sequence,
                                Err(e)
                                    if e.kind()
                                        == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
                                {
                                    0
                                }
                                Err(e) => return Err(e.into()),
                            };
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    js.publish(subject.clone(), data).await?.await?
                };
                last = ack.sequence;
                count += 1;
            }
            Ok(count)
        }
    })
    .await
}
