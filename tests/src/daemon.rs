//! A real `kiln serve` process for end-to-end tests.
//!
//! [`Daemon::start`] runs the daemon binary on a temp data dir (or one you give),
//! a free 127.0.0.1 port, optionally a projections dir and the embedded or
//! JetStream backend, and returns once `GET /healthz` answers. The process is
//! killed and waited for on drop, even when the test panics; its log is kept in
//! the data dir's parent and printed by [`Daemon::log`] for failure messages.
//!
//! Crash tests: [`Daemon::kill9`] sends SIGKILL, [`Daemon::restart`] starts the
//! same daemon again on the same data dir and port.
//!
//! The binary is `kiln-e2e`, this crate's copy of the `kiln` binary (it only calls
//! `kiln::cli::main`). Cargo builds a package's binaries before its integration
//! tests, so the daemon under test is always the current code; `KILN_BIN` points
//! the harness at another binary (e.g. `target/release/kiln`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to answer `/healthz` after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which event store the daemon runs on.
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// The embedded RocksDB log, in the data dir.
    #[default]
    Embedded,
    /// NATS JetStream at this URL (see [`crate::nats::NatsServer`]).
    JetStream { url: String },
}

/// How to start a daemon. `Default` is the embedded store, no projections.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub backend: Backend,
    /// Modules (`*.wasm`) loaded at start and watched.
    pub projections: Option<PathBuf>,
    /// Require this bearer token on admin endpoints.
    pub admin_token: Option<String>,
    /// More `kiln serve` arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Use this data dir instead of a fresh temp dir.
    pub data_dir: Option<PathBuf>,
}

impl Options {
    pub fn projections(mut self, dir: impl Into<PathBuf>) -> Self {
        self.projections = Some(dir.into());
        self
    }

    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_string());
        self
    }

    pub fn jetstream(mut self, url: &str) -> Self {
        self.backend = Backend::JetStream {
            url: url.to_string(),
        };
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }
}

/// A running `kiln serve`, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    options: Options,
    addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The daemon binary (see the module docs).
pub fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    // target/release/deps/<test> → target/release/kiln-e2e
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("kiln-e2e{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build --release -p kiln-tests` or set KILN_BIN",
        bin.display()
    );
    bin
}

/// A free port on 127.0.0.1 (bound and released; the daemon binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl Daemon {
    /// A daemon on the embedded store with no projections.
    pub fn start() -> Daemon {
        Daemon::start_with(Options::default())
    }

    /// A daemon started as `options` say; panics (with its log) if it does not
    /// answer `/healthz` within [`START_TIMEOUT`].
    pub fn start_with(options: Options) -> Daemon {
        let tmp = tempfile::tempdir().expect("temp dir for the daemon");
        let data_dir = options
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.path().join("data"));
        let log_path = tmp.path().join("daemon.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut d = Daemon {
            child: None,
            options,
            addr,
            data_dir,
            log_path,
            _tmp: tmp,
        };
        d.spawn(true);
        d
    }

    /// Starts the process and waits until it answers `/healthz`. On a first
    /// start, a port another process took between [`free_port`] releasing it
    /// and the daemon binding it is replaced by another free one (a few times);
    /// a restart keeps its port.
    fn spawn(&mut self, first: bool) {
        let mut attempt = 0;
        loop {
            let log_from = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
            self.launch();
            let Err(failure) = self.wait_healthy() else {
                return;
            };
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            let this_run = String::from_utf8_lossy(log.get(log_from as usize..).unwrap_or(&[]));
            attempt += 1;
            if !(first && attempt < 5 && this_run.contains("Address already in use")) {
                panic!("{failure}");
            }
            self.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("the daemon's log file");
        let mut cmd = Command::new(kiln_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.addr.to_string());
        match &self.options.projections {
            Some(p) => cmd.arg("--projections").arg(p),
            None => cmd.arg("--no-watch"),
        };
        match &self.options.backend {
            Backend::Embedded => {}
            Backend::JetStream { url } => {
                cmd.args(["--store", "jetstream", "--nats-url", url]);
            }
        }
        if let Some(t) = &self.options.admin_token {
            cmd.arg("--admin-token").arg(t);
        }
        cmd.args(&self.options.args)
            .env("KILN_LOG", "info,kiln=debug")
            .env_remove("KILN_URL")
            .env_remove("KILN_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", kiln_bin().display()));
        self.child = Some(child);
    }

    /// Polls `/healthz`; the failure, with the daemon's log, if it exits or
    /// does not answer within [`START_TIMEOUT`].
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "the daemon exited with {status} before answering /healthz; its log:\n{}",
                    self.log()
                ));
            }
            if matches!(self.get_status("/healthz"), Some(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon did not answer /healthz within {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn at(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, no shutdown: the crash. Waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to 30 s, then SIGKILL): a graceful stop.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Starts the daemon again (killing it first if it runs) on the same data
    /// dir, port and options.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn(false);
    }

    /// SIGKILL, its data directory removed, started again on the same port
    /// and options: a pod replaced on a fresh disk.
    pub fn replace_disk(&mut self) {
        self.kill9();
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir).expect("removing the data dir");
        }
        self.spawn(false);
    }

    /// Copies its data directory into `to` (which must not exist) as it is
    /// at one instant: the process is frozen (SIGSTOP) while `cp -a` runs,
    /// so the copy is what a crash at that instant would leave, as a volume
    /// snapshot of a running pod is.
    pub fn copy_disk(&self, to: &Path) {
        let signal = |sig: &str, pid: u32| {
            let sent = Command::new("kill").args([sig, &pid.to_string()]).status();
            assert!(sent.is_ok_and(|s| s.success()), "kill {sig} {pid}");
        };
        if let Some(pid) = self.pid() {
            signal("-STOP", pid);
            // Every thread stopped before anything is read.
            let stopped = || {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .map(|tasks| {
                        tasks.flatten().all(|t| {
                            std::fs::read_to_string(t.path().join("stat"))
                                .ok()
                                .and_then(|st| {
                                    st.rsplit_once(')')
                                        .map(|(_, rest)| rest.trim_start().starts_with('T'))
                                })
                                .unwrap_or(true)
                        })
                    })
                    .unwrap_or(true)
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !stopped() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&self.data_dir)
            .arg(to)
            .status();
        if let Some(pid) = self.pid() {
            signal("-CONT", pid);
        }
        assert!(
            copied.is_ok_and(|s| s.success()),
            "copying {} to {}",
            self.data_dir.display(),
            to.display()
        );
    }

    /// SIGKILL, its data directory replaced by a copy of `from` (made by
    /// [`Daemon::copy_disk`]), started again on the same port and options:
    /// a pod restored from a volume snapshot.
    pub fn restore_disk(&mut self, from: &Path) {
        self.kill9();
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir).expect("removing the data dir");
        }
        let copied = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(&self.data_dir)
            .status();
        assert!(
            copied.is_ok_and(|s| s.success()),
            "copying {} to {}",
            from.display(),
            self.data_dir.display()
        );
        self.spawn(false);
    }

    /// Blocking `GET path`, returning the status code (None when unreachable).
    /// For polling without an async runtime.
    pub fn get_status(&self, path: &str) -> Option<u16> {
        self.get_raw(path).map(|(status, _)| status)
    }

    /// Blocking `GET path` over a fresh connection: status and body.
    pub fn get_raw(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// Polls `path` until it answers `status`, for at most `timeout`.
    pub fn wait_for_status(&self, path: &str, status: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.get_status(path) == Some(status) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A temp dir holding copies of the given example modules, for `--projections`.
pub fn projections_dir(modules: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp projections dir");
    for m in modules {
        let src = Path::new(m);
        let name = src.file_name().expect("a module file name");
        std::fs::copy(src, dir.path().join(name)).unwrap_or_else(|e| panic!("copying {m}: {e}"));
    }
    dir
}

/// Runs a `kiln` client subcommand against `daemon` and returns (exit code,
/// stdout, stderr).
pub fn kiln_cli(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kiln_bin())
        .args(args)
        .env("KILN_URL", daemon.url())
        .env_remove("KILN_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running the kiln CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A JSON-over-HTTP client for tests: every call returns the status and the
/// body parsed as JSON (`Value::Null` when it is not JSON).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    pub fn new(daemon: &Daemon) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                // Below the daemon's header_timeout (10 s), which closes
                // idle keep-alive connections: never reuse one it closes.
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
            base: daemon.url(),
            token: daemon.options.admin_token.clone(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let res = req.send().await.expect("the daemon answers");
        let status = res.status().as_u16();
        let bytes = res.bytes().await.expect("reading the answer");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POSTs raw bytes with the content type the route takes: a module
    /// (`application/wasm`) to `/admin/views`, JSON anywhere else.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let content_type = if path.starts_with("/admin/views?") || path == "/admin/views" {
            "application/wasm"
        } else {
            "application/json"
        };
        self.post_typed(path, content_type, body).await
    }

    /// POSTs raw bytes with this `Content-Type`.
    pub async fn post_typed(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// Appends one event; returns (status, answer).
    pub async fn append(
        &self,
        stream: &str,
        expected: serde_json::Value,
        event_type: &str,
        data: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.post_json(
            &format!("/streams/{stream}/events"),
            &serde_json::json!({
                "expected_version": expected,
                "events": [{ "type": event_type, "data": data }],
            }),
        )
        .await
    }

    /// Registers user `stream` (a `UserRegistered` event at any version),
    /// asserts the append succeeded and returns its answer.
    pub async fn register_user(&self, stream: &str) -> serde_json::Value {
        let (s, b) = self
            .append(
                stream,
                serde_json::json!("any"),
                "UserRegistered",
                serde_json::json!({ "name": "a", "email": "b" }),
            )
            .await;
        assert_eq!(s, 200, "registering {stream}: {b}");
        b
    }

    /// Deploys a module through the admin API.
    pub async fn deploy(&self, wasm: Vec<u8>) -> (u16, serde_json::Value) {
        self.post_bytes("/admin/views?label=test", wasm).await
    }

    /// `GET /views`' entry of version `id` (`Null` when it is not listed).
    pub async fn view_status(&self, id: &str) -> serde_json::Value {
        let (s, body) = self.get("/views").await;
        assert_eq!(s, 200, "{body}");
        body["views"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["id"] == id))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// Polls `GET /views` until `id` is in `state`, for at most `timeout`.
    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, body) = self.get("/views").await;
            let found = body["views"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["id"] == id))
                .cloned();
            if let Some(v) = &found
                && v["state"] == state
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not become {state} within {timeout:?}; last seen: {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fleet member on the JetStream log at `nats_url`: fleet `fleet`,
/// instance `id`, `users` under `cutover = "fleet"`, a 200 ms heartbeat, a
/// 1.5 s membership TTL, a digest every 10 log positions, standbys kept an
/// hour.
pub fn fleet_member(nats_url: &str, fleet: &str, id: &str) -> Options {
    let mut o = Options::default().jetstream(nats_url);
    for a in [
        "--fleet",
        fleet,
        "--instance-id",
        id,
        "--view",
        "users:cutover=fleet",
        "--fleet-heartbeat-ms",
        "200",
        "--fleet-member-ttl-ms",
        "1500",
        "--fleet-digest-every",
        "10",
        "--standby-grace-secs",
        "3600",
    ] {
        o = o.arg(a);
    }
    o
}

/// `module` with its manifest's version set to `version` and, when `variant` is
/// set, an extra (never appended) event type so its logic fingerprint differs:
/// a genuinely new view version that warms from the first event.
pub fn module_version(module_path: &str, version: &str, variant: Option<&str>) -> Vec<u8> {
    let original = std::fs::read(module_path).expect("reading the module");
    let mut manifest = crate::wasm::manifest_of(&original);
    manifest["version"] = serde_json::Value::from(version);
    if let Some(extra) = variant
        && let Some(events) = manifest["events"].as_array_mut()
    {
        events.push(serde_json::Value::from(extra));
    }
    crate::wasm::with_manifest(&original, &manifest.to_string())
}

/// Options for a daemon whose poison events are parked after a 1 s batch
/// deadline: with [`deploy_slow_warming_chaos`], a version that stays warming
/// for many seconds on any machine.
pub fn slow_warming_options() -> Options {
    Options::default()
        .arg("--poison")
        .arg("park")
        .arg("--batch-deadline-ms")
        .arg("1000")
}

/// Appends `spins` rounds of 40 `Note` events and one `Spin` (which never
/// returns, so each costs the 1 s batch deadline before it is parked), then
/// deploys the `chaos` projection: it warms for at least `spins` seconds while
/// making steady progress between them. Returns its id.
pub async fn deploy_slow_warming_chaos(api: &Api, spins: usize) -> String {
    for s in 0..spins {
        let mut events: Vec<serde_json::Value> = (0..40)
            .map(|i| serde_json::json!({ "type": "Note", "data": { "text": format!("n{s}-{i}") } }))
            .collect();
        events.push(serde_json::json!({ "type": "Spin", "data": {} }));
        let (status, body) = api
            .post_json(
                &format!("/streams/chaos-{s}/events"),
                &serde_json::json!({ "events": events }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let wasm = std::fs::read(crate::wasm::CHAOS).expect("the chaos module");
    let (status, body) = api.deploy(wasm).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["outcome"], "warming", "{body}");
    body["id"].as_str().expect("id").to_string()
}
