//! One side of the two-process append race (`tests/tests/jetstream_race.rs`).
//!
//! `kiln-race <nats-url> <name> <stream-id> <racers>` connects a JetStream store,
//! subscribes to `kiln-race.<name>` and prints `ready`. Each request carries a
//! round number `r`: `racers` tasks append one event each to `stream-id` at
//! expected version `r`, released together by a barrier, and the reply reports
//! `{"wins": w, "conflicts": c, "bad": [...]}` (anything but a win or a version
//! conflict carrying version `r + 1` is "bad"). A request with payload `stop`
//! ends the process.

use std::io::Write;
use std::sync::Arc;

use futures::StreamExt;
use kiln::store::jetstream::{JetStreamConfig, JetStreamStore};
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId};
use tokio::sync::Barrier;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, name, stream, racers] = args.as_slice() else {
        anyhow::bail!("usage: kiln-race <nats-url> <name> <stream-id> <racers>");
    };
    let racers: usize = racers.parse()?;
    let stream = StreamId::new(stream.as_str())?;
    let store = JetStreamStore::connect(JetStreamConfig::new(url.as_str())).await?;
    let client = store.client().clone();
    let mut requests = client.subscribe(format!("kiln-race.{name}")).await?;
    client.flush().await?;
    println!("ready");
    std::io::stdout().flush()?;
    let store: Arc<dyn EventStore> = Arc::new(store);
    while let Some(msg) = requests.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let text = String::from_utf8_lossy(&msg.payload).to_string();
        if text == "stop" {
            client.publish(reply, "bye".into()).await?;
            client.flush().await?;
            break;
        }
        let round: u64 = text.parse()?;
        let barrier = Arc::new(Barrier::new(racers));
        let tasks: Vec<_> = (0..racers)
            .map(|i| {
                let (store, barrier, stream) = (store.clone(), barrier.clone(), stream.clone());
                let ev =
                    NewEvent::json("Raced", &serde_json::json!({ "round": round, "racer": i }))
                        .with_metadata("racer", format!("{name}-{i}"));
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .append(AppendRequest::new(
                            stream,
                            ExpectedVersion::Exact(round),
                            vec![ev],
                        ))
                        .await
                })
            })
            .collect();
        let (mut wins, mut conflicts, mut bad) = (0u64, 0u64, Vec::new());
        for t in tasks {
            match t.await? {
                Ok(r) if r.version == round + 1 => wins += 1,
                Ok(r) => bad.push(format!("won at version {}", r.version)),
                Err(StoreError::VersionConflict { actual, .. }) if actual == round + 1 => {
                    conflicts += 1
                }
                Err(e) => bad.push(e.to_string()),
            }
        }
        let body = serde_json::json!({ "wins": wins, "conflicts": conflicts, "bad": bad });
        client.publish(reply, body.to_string().into()).await?;
    }
    Ok(())
}
