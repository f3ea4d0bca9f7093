//! Two OS processes race on one JetStream stream: the optimistic-concurrency check
//! is the server's, so exactly one append wins each round across both processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kiln::store::EventStore;
use kiln::store::jetstream::{JetStreamConfig, JetStreamStore};
use kiln_tests::conformance::sid;
use kiln_tests::nats::NatsServer;

const PROCESSES: usize = 2;
const RACERS: usize = 25;
const ROUNDS: u64 = 100;

/// A `kiln-race` child process, killed on drop.
struct Racer {
    child: Child,
    name: String,
}

impl Racer {
    fn spawn(url: &str, name: &str) -> Racer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-race"))
            .args([url, name, "race-1", &RACERS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kiln-race");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        let racer = Racer {
            child,
            name: name.to_string(),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(line)) if line == "ready" => racer,
            other => panic!("kiln-race {name} did not get ready: {other:?}"),
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_fifty_racers_one_winner() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let store = JetStreamStore::connect(JetStreamConfig::new(server.url()))
        .await
        .expect("connect");
    let racers: Vec<Racer> = (0..PROCESSES)
        .map(|i| Racer::spawn(&server.url(), &format!("p{i}")))
        .collect();
    let client = store.client().clone();
    for round in 0..ROUNDS {
        // Both processes get the go at once; each releases its racers together.
        let replies = futures::future::join_all(racers.iter().map(|r| {
            let client = client.clone();
            let subject = format!("kiln-race.{}", r.name);
            async move {
                let reply = tokio::time::timeout(
                    Duration::from_secs(60),
                    client.request(subject, round.to_string().into()),
                )
                .await
                .expect("a round finishes within 60 s")
                .expect("racer replies");
                serde_json::from_slice::<serde_json::Value>(&reply.payload).expect("JSON reply")
            }
        }))
        .await;
        let wins: u64 = replies.iter().map(|r| r["wins"].as_u64().unwrap()).sum();
        let conflicts: u64 = replies
            .iter()
            .map(|r| r["conflicts"].as_u64().unwrap())
            .sum();
        for r in &replies {
            assert_eq!(r["bad"], serde_json::json!([]), "round {round}: {r}");
        }
        assert_eq!(
            (wins, conflicts),
            (1, (PROCESSES * RACERS) as u64 - 1),
            "round {round}: {replies:?}"
        );
        assert_eq!(
            store.latest_version(&sid("race-1")).await.unwrap(),
            round + 1
        );
    }
    for r in &racers {
        let _ = client
            .request(format!("kiln-race.{}", r.name), "stop".into())
            .await;
    }
    let events = store.read_stream(&sid("race-1"), 1, 1000).await.unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=ROUNDS).collect::<Vec<_>>());
    for r in &racers {
        let won = events
            .iter()
            .filter(|e| {
                e.metadata
                    .get("racer")
                    .is_some_and(|w| w.starts_with(&format!("{}-", r.name)))
            })
            .count();
        eprintln!("process {} won {won} of {ROUNDS} rounds", r.name);
    }
}
