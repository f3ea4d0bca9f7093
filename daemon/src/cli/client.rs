//! The client subcommands — `kiln status`, `deploy`, `promote`, `rollback`,
//! `retire`, `resume`, `diff`, `append`, `get`, `ls`, `tail` — talking to a running daemon over its
//! HTTP API (`--url`, or `KILN_URL`; default `http://127.0.0.1:7070`).
//!
//! Output is for people by default; `--json` prints the daemon's JSON answer as
//! is, one document per line, for scripts. Exit codes are stable:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | any other error (bad input refused by the daemon, server error, I/O) |
//! | 2 | bad command line (clap) |
//! | 3 | conflict: version conflict on append, not-ready promote, immutable version |
//! | 4 | not found: unknown view, version, key or stream |
//! | 5 | the daemon is unreachable |
//! | 6 | timed out: a read-your-writes wait, or `deploy --wait` / `status --wait` |
//! | 7 | a view version failed (`deploy --wait`) |
//! | 8 | unauthorized: the admin token is missing or wrong |
//! | 9 | `kiln diff`: the two versions' documents differ (0: identical); `kiln fleet status`: members' digests disagree |

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Exit codes of the client subcommands (see the module docs).
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const CONFLICT: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const UNREACHABLE: u8 = 5;
    pub const TIMEOUT: u8 = 6;
    pub const FAILED: u8 = 7;
    pub const UNAUTHORIZED: u8 = 8;
    pub const DIFFERENT: u8 = 9;
}

/// The daemon's URL when neither `--url` nor `KILN_URL` says: where
/// `kiln serve` listens by default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Where the daemon is and how to talk to it; every client subcommand takes these.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The daemon's base URL.
    #[arg(long, env = "KILN_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token for admin commands (deploy, promote, rollback, retire).
    #[arg(long, env = "KILN_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the daemon's JSON answers instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Every view and version: state, position, lag, events/s; progress bars with
    /// ETA while versions warm.
    Status(StatusArgs),
    /// Upload a projection module (.wasm); the new version warms in the background.
    Deploy(DeployArgs),
    /// Make a ready version the active one for its name (blue-green cutover).
    Promote(IdArgs),
    /// Make the standby (previous active) version of a view active again.
    Rollback(RollbackArgs),
    /// Stop a version and drop its documents.
    Retire(IdArgs),
    /// Resume a failed version from its checkpoint (after dealing with the cause).
    Resume(IdArgs),
    /// Compare the documents of two versions at one log position: keys only
    /// in A, only in B, changed (with field paths). Exit 0 when identical, 9
    /// when they differ.
    Diff(DiffArgs),
    /// Snapshot a version's view now and publish it to the snapshot store
    /// (other instances bootstrap from it instead of replaying). Takes an
    /// exact id, `name@<semver req>`, or a bare name (what the name serves).
    Snapshot(IdArgs),
    /// List the view snapshots in the snapshot store.
    Snapshots(ConnArgs),
    /// Append one event to a stream, optionally with an expected version.
    Append(AppendArgs),
    /// Read one document of a view.
    Get(GetArgs),
    /// List documents of a view by key prefix or range, in key order.
    Ls(LsArgs),
    /// Print the event log as it grows (or up to its head with --no-follow).
    Tail(TailArgs),
    /// Have the daemon write a consistent backup of its embedded data
    /// directory into <dir> while it runs (restore with `kiln restore`).
    Backup(BackupArgs),
    /// The fleet this daemon belongs to (`kiln fleet status`).
    #[command(subcommand)]
    Fleet(FleetCommand),
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Where the daemon writes the backup: an absolute path on the daemon's
    /// machine, absent or empty, outside its data directory.
    pub dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Every live member, its versions, their lag, each fleet view's
    /// decision, and the members whose view digests disagree (exit 9 when
    /// some do).
    Status(FleetStatusArgs),
}

#[derive(Args, Debug)]
pub struct FleetStatusArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Keep redrawing until no version is warming and no module file the
    /// daemon's directory watcher has seen change is waiting to deploy.
    #[arg(long, short)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit code 6).
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The module to upload.
    pub module: PathBuf,
    /// Show progress and wait until the new version is ready (or failed).
    #[arg(long, short)]
    pub wait: bool,
    /// After it is ready, promote it (implies --wait).
    #[arg(long)]
    pub promote: bool,
    /// With --wait: give up after this many seconds (exit code 6).
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct ConnArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The version: an exact id (users-2_0_0) or a requirement (users@^2).
    pub id: String,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Version A (usually the active one): a name, an exact id or users@^1.
    pub a: String,
    /// Version B (usually the new one).
    pub b: String,
    /// Only keys starting with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Examples shown of each kind.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Longest wait for the two versions to meet at one position (ms).
    #[arg(long)]
    pub wait_ms: Option<u64>,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The view's name (users).
    pub name: String,
}

#[derive(Args, Debug)]
pub struct AppendArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The stream, e.g. user-42.
    pub stream: String,
    /// The event type, e.g. UserRegistered.
    pub event_type: String,
    /// The event's data as JSON ("-" reads standard input; default {}).
    pub data: Option<String>,
    /// Expected version: a number, any, no_stream or exists.
    #[arg(long, short = 'e', default_value = "any")]
    pub expect: String,
    /// The event's id (a UUID) to make retries idempotent; generated when absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Metadata entries, key=value (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Tags (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
}

/// Read-your-writes options shared by `get` and `ls`.
#[derive(Args, Debug)]
pub struct Consistency {
    /// Wait until the view has applied this stream's latest event.
    #[arg(long, value_name = "STREAM")]
    pub after_stream: Option<String>,
    /// Wait until the view has applied this log position.
    #[arg(long, value_name = "POSITION")]
    pub after_position: Option<u64>,
    /// Longest wait, in milliseconds (the daemon caps it).
    #[arg(long)]
    pub wait_ms: Option<u64>,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The view: name (active version), exact id (users-1_2_0) or users@^1.2.
    pub view: String,
    /// The document's key.
    pub key: String,
    #[command(flatten)]
    pub consistency: Consistency,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The view: name (active version), exact id (users-1_2_0) or users@^1.2.
    pub view: String,
    /// Only keys starting with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Range: keys from this one (inclusive) ...
    #[arg(long)]
    pub from: Option<String>,
    /// ... up to this one (exclusive).
    #[arg(long)]
    pub to: Option<String>,
    /// Start after this key (the `next` cursor of a previous page).
    #[arg(long)]
    pub after: Option<String>,
    /// Documents per page.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Follow the pages to the end.
    #[arg(long)]
    pub all: bool,
    /// Print keys only.
    #[arg(long)]
    pub keys: bool,
    #[command(flatten)]
    pub consistency: Consistency,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// First log position to print.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Stop at the log's current head instead of waiting for new events.
    #[arg(long)]
    pub no_follow: bool,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    /// The daemon's error body, printed as is under `--json`.
    pub body: Option<Value>,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            body: None,
        }
    }
}

type Outcome = Result<(), Failure>;

/// Runs a client subcommand; the exit code follows the table in the module docs.
pub fn main(cmd: ClientCommand) -> ExitCode {
    let json = match &cmd {
        ClientCommand::Status(a) => a.conn.json,
        ClientCommand::Deploy(a) => a.conn.json,
        ClientCommand::Promote(a) | ClientCommand::Retire(a) | ClientCommand::Resume(a) => {
            a.conn.json
        }
        ClientCommand::Rollback(a) => a.conn.json,
        ClientCommand::Snapshot(a) => a.conn.json,
        ClientCommand::Snapshots(a) => a.conn.json,
        ClientCommand::Diff(a) => a.conn.json,
        ClientCommand::Append(a) => a.conn.json,
        ClientCommand::Get(a) => a.conn.json,
        ClientCommand::Ls(a) => a.conn.json,
        ClientCommand::Tail(a) => a.conn.json,
        ClientCommand::Backup(a) => a.conn.json,
        ClientCommand::Fleet(FleetCommand::Status(a)) => a.conn.json,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let result = rt.block_on(async move {
        match cmd {
            ClientCommand::Status(a) => status(a).await,
            ClientCommand::Deploy(a) => deploy(a).await,
            ClientCommand::Promote(a) => promote(a).await,
            ClientCommand::Rollback(a) => rollback(a).await,
            ClientCommand::Retire(a) => retire(a).await,
            ClientCommand::Resume(a) => resume(a).await,
            ClientCommand::Diff(a) => diff(a).await,
            ClientCommand::Snapshot(a) => snapshot(a).await,
            ClientCommand::Snapshots(a) => snapshots(a).await,
            ClientCommand::Append(a) => append(a).await,
            ClientCommand::Get(a) => get(a).await,
            ClientCommand::Ls(a) => ls(a).await,
            ClientCommand::Tail(a) => tail(a).await,
            ClientCommand::Backup(a) => backup(a).await,
            ClientCommand::Fleet(FleetCommand::Status(a)) => fleet_status(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        // Not an error: `kiln diff` printed its answer already.
        Err(f) if f.code == exit::DIFFERENT => ExitCode::from(f.code),
        Err(f) => {
            if json {
                let body = f.body.unwrap_or_else(
                    || json!({ "error": { "code": "client", "message": f.message } }),
                );
                println!("{body}");
            }
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A small JSON-over-HTTP client for one daemon.
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(conn: &Conn) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Below the daemon's header_timeout (10 s), which closes idle
            // keep-alive connections (`status --wait` polls on one).
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Failure::new(exit::ERROR, format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: conn.url.trim_end_matches('/').to_string(),
            token: conn.token.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let res = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = res.status();
        let bytes = res.bytes().await.map_err(|e| self.unreachable(e))?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            json!({ "error": { "code": "not_json", "message": String::from_utf8_lossy(&bytes) } })
        });
        if status.is_success() {
            return Ok(body);
        }
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        let message = body["error"]["message"]
            .as_str()
            .map_or_else(|| format!("the daemon answered {status}"), str::to_string);
        let exit = match status.as_u16() {
            401 | 403 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            409 => exit::CONFLICT,
            504 => exit::TIMEOUT,
            _ => exit::ERROR,
        };
        Err(Failure {
            code: exit,
            message: if code.is_empty() {
                message
            } else {
                format!("{message} ({code})")
            },
            body: Some(body),
        })
    }

    async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    async fn post(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.request(reqwest::Method::POST, path)).await
    }

    fn unreachable(&self, e: reqwest::Error) -> Failure {
        Failure::new(
            exit::UNREACHABLE,
            format!(
                "cannot reach the kiln daemon at {} ({e}); is `kiln serve` running? (set --url or KILN_URL)",
                self.base
            ),
        )
    }
}

/// Percent-encodes one path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_json(v: &Value) {
    println!("{v}");
}

// ---- fleet status ---------------------------------------------------------

async fn fleet_status(a: FleetStatusArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client.get("/fleet").await?;
    if a.conn.json {
        print_json(&body);
    } else {
        print!("{}", super::fleet::render(&body));
    }
    let mismatches = body["mismatches"].as_array().map_or(0, Vec::len);
    let logic = body["logic_mismatches"].as_array().map_or(0, Vec::len);
    if mismatches + logic > 0 {
        return Err(Failure::new(
            exit::DIFFERENT,
            format!(
                "{mismatches} view digest(s) disagree across the fleet; {logic} version(s) run under different modules"
            ),
        ));
    }
    Ok(())
}

// ---- status ---------------------------------------------------------------

async fn status(a: StatusArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let tty = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    loop {
        let body = client.get("/views").await?;
        let views = body["views"].as_array().cloned().unwrap_or_default();
        // A module file just copied into the watched directory is waited
        // for too (older daemons do not report it: 0).
        let pending = body["deploys_pending"].as_u64().unwrap_or(0);
        let warming = pending > 0 || views.iter().any(|v| v["state"] == "warming");
        if a.conn.json {
            print_json(&body);
        } else {
            let mut text = status_table(&views);
            if pending > 0 {
                text.push_str(&format!(
                    "{pending} changed module file(s) in the projections directory, not deployed yet\n"
                ));
            }
            let mut out = std::io::stdout().lock();
            if tty && drawn > 0 {
                // Move up over the previous frame and clear it, like a package manager.
                let _ = write!(out, "\x1b[{drawn}A\x1b[J");
            }
            let _ = write!(out, "{text}");
            let _ = out.flush();
            drawn = text.lines().count();
        }
        if !a.wait || !warming {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(
                exit::TIMEOUT,
                if pending > 0 {
                    format!(
                        "module files in the projections directory still not deployed after {} s (still being written?)",
                        a.timeout_secs
                    )
                } else {
                    format!("versions still warming after {} s", a.timeout_secs)
                },
            ));
        }
        tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 1000 })).await;
    }
}

/// `[#########...........]  45%`
fn bar(done: u64, total: u64, width: usize) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        frac * 100.0
    )
}

fn eta_text(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s.is_finite() && s < 60.0 => format!("ETA {}s", s.ceil() as u64),
        Some(s) if s.is_finite() && s < 3600.0 => {
            format!("ETA {}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
        }
        Some(s) if s.is_finite() => format!(
            "ETA {}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
        _ => "ETA ?".into(),
    }
}

fn status_table(views: &[Value]) -> String {
    if views.is_empty() {
        return "no views deployed (deploy one with `kiln deploy <module.wasm>`)\n".into();
    }
    let width = views
        .iter()
        .filter_map(|v| v["id"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(10);
    let mut out = String::new();
    for v in views {
        let id = v["id"].as_str().unwrap_or("?");
        let state = v["state"].as_str().unwrap_or("?");
        let checkpoint = v["checkpoint"].as_u64().unwrap_or(0);
        let head = v["head"].as_u64().unwrap_or(0);
        let lag = v["lag"].as_u64().unwrap_or(0);
        let rate = v["events_per_sec"].as_f64().unwrap_or(0.0);
        let mut line = format!("{id:<width$}  {state:<8} ");
        if state == "warming" {
            line.push_str(&format!(
                "{}  {checkpoint}/{head}  {rate:.0} ev/s  {}",
                bar(checkpoint, head, 24),
                eta_text(v["eta_secs"].as_f64())
            ));
        } else {
            line.push_str(&format!("position {checkpoint}  lag {lag}"));
            if rate > 0.0 {
                line.push_str(&format!("  {rate:.0} ev/s"));
            }
        }
        if let Some(of) = v["alias_of"].as_str() {
            line.push_str(&format!("  (alias of {of})"));
        }
        if let Some(n) = v["parked"].as_u64().filter(|n| *n > 0) {
            line.push_str(&format!("  {n} parked"));
        }
        if v["serving_stale"].as_bool() == Some(true) {
            line.push_str("  (its name serves it, stale)");
        }
        if let Some(p) = v["paused"].as_str() {
            line.push_str(&format!("  paused: {p}"));
        }
        if let Some(w) = v["warning"].as_str() {
            line.push_str(&format!("  warning: {w}"));
        }
        if state == "ready"
            && let Some(c) = v.get("cutover_check").filter(|c| !c.is_null())
        {
            line.push_str(&format!("  {}", check_text(c)));
        }
        if let Some(e) = v["last_error"].as_str() {
            line.push_str(&format!("  error: {e}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A ready version's cutover check, in one line: `vs users-1_0_0 at 120:
/// 2 changed, 0 removed, 1 added (user-7 /logins)`.
fn check_text(c: &Value) -> String {
    let against = c["against"].as_str().unwrap_or("?");
    let r = &c["summary"];
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    match c["result"].as_str() {
        Some("pending") => format!("comparing with {against}..."),
        Some("identical") => format!("identical to {against} at position {}", n("position")),
        Some("different") => {
            let mut text = format!(
                "vs {against} at position {}: {} changed, {} only in {against}, {} only here; promote to apply",
                n("position"),
                n("changed"),
                n("only_in_a"),
                n("only_in_b")
            );
            if let Some(c) = r["examples"]["changed"].get(0) {
                let paths: Vec<&str> = c["fields"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f["path"].as_str())
                    .collect();
                text.push_str(&format!(
                    " (e.g. {} {})",
                    c["key"].as_str().unwrap_or("?"),
                    paths.join(" ")
                ));
            }
            text
        }
        _ => format!(
            "could not compare with {against}: {}; promote by hand",
            c["error"].as_str().unwrap_or("?")
        ),
    }
}

// ---- admin ----------------------------------------------------------------

async fn deploy(a: DeployArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let wasm = std::fs::read(&a.module).map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("reading the module {}: {e}", a.module.display()),
        )
    })?;
    let label = a
        .module
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "module".into());
    let req = client
        .request(
            reqwest::Method::POST,
            &format!("/admin/views?label={}", enc(&label)),
        )
        .header("content-type", "application/wasm")
        .body(wasm);
    let body = client.send(req).await?;
    let id = body["id"].as_str().unwrap_or("?").to_string();
    if a.conn.json {
        print_json(&body);
    } else {
        match body["outcome"].as_str() {
            Some("warming") => println!("deployed {id}: warming"),
            Some("alias") => println!(
                "deployed {id}: same logic as {}, reads its view, nothing replayed (alias, {})",
                body["of"].as_str().unwrap_or("?"),
                match body["state"].as_str() {
                    Some("warming") => "warming with it: ready when it is",
                    Some(s) => s,
                    None => "ready",
                }
            ),
            Some("already_deployed") => println!("{id} was already deployed; nothing changed"),
            Some("restored") => {
                println!("{id} was retired and its view still live: back, nothing replayed")
            }
            _ => println!("deployed {id}"),
        }
        if let Some(why) = body["why"].as_str() {
            println!("  why: {why}");
        }
    }
    if !(a.wait || a.promote) {
        return Ok(());
    }
    wait_ready(&client, &id, a.timeout_secs, a.conn.json).await?;
    if a.promote {
        let body = client
            .post(&format!("/admin/views/{}/promote", enc(&id)))
            .await?;
        if a.conn.json {
            print_json(&body);
        } else {
            println!("promoted {id}: it is now the active version");
        }
    }
    Ok(())
}

/// Draws a progress bar for `id` until it is servable; fails on `failed`.
async fn wait_ready(client: &Client, id: &str, timeout_secs: u64, json: bool) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let tty = std::io::stderr().is_terminal() && !json;
    loop {
        let body = client.get("/views").await?;
        let Some(v) = body["views"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["id"] == id))
            .cloned()
        else {
            return Err(Failure::new(
                exit::NOT_FOUND,
                format!("{id} is not in the daemon's views any more"),
            ));
        };
        let state = v["state"].as_str().unwrap_or("?");
        let checkpoint = v["checkpoint"].as_u64().unwrap_or(0);
        let head = v["head"].as_u64().unwrap_or(0);
        if tty {
            eprint!(
                "\r\x1b[K{id} {state} {} {checkpoint}/{head} {:.0} ev/s {}",
                bar(checkpoint, head, 30),
                v["events_per_sec"].as_f64().unwrap_or(0.0),
                if state == "warming" {
                    eta_text(v["eta_secs"].as_f64())
                } else {
                    String::new()
                }
            );
        }
        match state {
            "ready" | "active" | "standby" => {
                if tty {
                    eprintln!();
                }
                if !json {
                    println!("{id} is {state} at position {checkpoint}");
                }
                return Ok(());
            }
            "failed" | "retired" => {
                if tty {
                    eprintln!();
                }
                let message = format!(
                    "{id} is {state}: {}",
                    v["last_error"].as_str().unwrap_or("no error recorded")
                );
                // The documented error object, with the version's status.
                let code = if state == "failed" {
                    "version_failed"
                } else {
                    "version_retired"
                };
                return Err(Failure {
                    code: exit::FAILED,
                    body: Some(json!({
                        "error": { "code": code, "message": message.clone(), "view": v }
                    })),
                    message,
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            return Err(Failure::new(
                exit::TIMEOUT,
                format!("{id} is still {state} after {timeout_secs} s (at {checkpoint}/{head})"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn backup(a: BackupArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    // The path is the daemon's: made absolute here only when the daemon is
    // this machine's; a relative one is refused there with the reason.
    let local = ["://127.0.0.1", "://localhost", "://[::1]"]
        .iter()
        .any(|h| client.base.contains(h));
    let dir = if a.dir.is_relative() && local {
        std::env::current_dir().map_or(a.dir.clone(), |cwd| cwd.join(&a.dir))
    } else {
        a.dir.clone()
    };
    let body = client
        .send(
            client
                .request(reqwest::Method::POST, "/admin/backup")
                .json(&json!({ "dir": dir })),
        )
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!(
            "backup written to {} (on the daemon's machine): log head {}, {} views, {} files, \
             {} bytes, in {} ms; restore with `kiln restore {} --data-dir <empty dir>`",
            body["dir"].as_str().unwrap_or("?"),
            body["log_head"],
            body["views"].as_array().map_or(0, Vec::len),
            body["files"],
            body["bytes"],
            body["took_ms"],
            body["dir"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

async fn promote(a: IdArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client
        .post(&format!("/admin/views/{}/promote", enc(&a.id)))
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!(
            "{} is now the active version of {}",
            body["active"].as_str().unwrap_or("?"),
            body["name"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

async fn rollback(a: RollbackArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client
        .post(&format!("/admin/views/{}/rollback", enc(&a.name)))
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!(
            "rolled back {}: {} is active again",
            a.name,
            body["active"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

async fn retire(a: IdArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client
        .post(&format!("/admin/views/{}/retire", enc(&a.id)))
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!("retired {}", body["retired"].as_str().unwrap_or("?"));
    }
    Ok(())
}

async fn snapshot(a: IdArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client
        .post(&format!("/admin/views/{}/snapshot", enc(&a.id)))
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        let m = &body["snapshot"];
        println!(
            "snapshot of {} at position {}: {} documents, {} bytes in {} ({})",
            m["view"].as_str().unwrap_or("?"),
            m["position"],
            m["documents"],
            snapshot_bytes(m),
            body["store"].as_str().unwrap_or("?"),
            m["digest"].as_str().map_or("?", |d| &d[..d.len().min(16)]),
        );
    }
    Ok(())
}

/// Bytes of a snapshot manifest's files.
fn snapshot_bytes(m: &Value) -> u64 {
    m["files"]
        .as_array()
        .map_or(0, |f| f.iter().filter_map(|f| f["size"].as_u64()).sum())
}

async fn snapshots(a: ConnArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client.get("/admin/snapshots").await?;
    if a.conn.json {
        print_json(&body);
        return Ok(());
    }
    println!("{}", body["store"].as_str().unwrap_or("?"));
    let all = body["snapshots"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        println!("no snapshots");
    }
    for m in all {
        println!(
            "{:<24} at {:>10}  {:>9} docs  {:>12} bytes  by {}  logic {}",
            m["view"].as_str().unwrap_or("?"),
            m["position"],
            m["documents"],
            snapshot_bytes(&m),
            m["instance"].as_str().unwrap_or("?"),
            m["fingerprint"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

async fn resume(a: IdArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let body = client
        .post(&format!("/admin/views/{}/resume", enc(&a.id)))
        .await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!(
            "resumed {} from its checkpoint: {}",
            body["resumed"].as_str().unwrap_or("?"),
            body["state"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

async fn diff(a: DiffArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let mut q = vec![format!("limit={}", a.limit)];
    if let Some(p) = &a.prefix {
        q.push(format!("prefix={}", enc(p)));
    }
    if let Some(w) = a.wait_ms {
        q.push(format!("wait_ms={w}"));
    }
    let path = with_query(format!("/admin/views/{}/diff/{}", enc(&a.a), enc(&a.b)), &q);
    let body = client.get(&path).await?;
    if a.conn.json {
        print_json(&body);
    } else {
        print!("{}", diff_text(&body));
    }
    if body["identical"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(Failure {
            code: exit::DIFFERENT,
            message: "the versions' documents differ".into(),
            // Printed already.
            body: None,
        })
    }
}

/// A diff answer for people: the counts, then the examples.
fn diff_text(d: &Value) -> String {
    let s = |k: &str| d[k].as_str().unwrap_or("?").to_string();
    let n = |k: &str| d[k].as_u64().unwrap_or(0);
    let (a, b) = (s("a"), s("b"));
    let mut out = format!(
        "{a} vs {b} at position {}: {} compared, {} same, {} changed, {} only in {a}, {} only in {b}\n",
        n("position"),
        n("compared"),
        n("same"),
        n("changed"),
        n("only_in_a"),
        n("only_in_b"),
    );
    if d["identical"].as_bool() == Some(true) {
        out.push_str("identical\n");
        return out;
    }
    let ex = &d["examples"];
    let list = |k: &str| ex[k].as_array().cloned().unwrap_or_default();
    let changed = list("changed");
    if !changed.is_empty() {
        out.push_str(&format!("changed (first {}):\n", changed.len()));
        for c in &changed {
            out.push_str(&format!("  {}\n", c["key"].as_str().unwrap_or("?")));
            for f in c["fields"].as_array().into_iter().flatten() {
                let shown = |v: &Value| {
                    if v.is_null() {
                        "(absent)".to_string()
                    } else {
                        v.to_string()
                    }
                };
                let path = f["path"].as_str().unwrap_or("");
                out.push_str(&format!(
                    "    {}: {} -> {}\n",
                    if path.is_empty() {
                        "(whole document)"
                    } else {
                        path
                    },
                    shown(&f["old"]),
                    shown(&f["new"])
                ));
            }
            if let Some(m) = c["more_fields"].as_u64().filter(|m| *m > 0) {
                out.push_str(&format!("    ... {m} more fields\n"));
            }
        }
    }
    for (kind, side) in [("only_in_a", &a), ("only_in_b", &b)] {
        let docs = list(kind);
        if !docs.is_empty() {
            out.push_str(&format!("only in {side} (first {}):\n", docs.len()));
            for k in &docs {
                out.push_str(&format!(
                    "  {}  {}\n",
                    k["key"].as_str().unwrap_or("?"),
                    k["doc"]
                ));
            }
        }
    }
    out
}

// ---- data -----------------------------------------------------------------

async fn append(a: AppendArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let data_text = match a.data.as_deref() {
        None => "{}".to_string(),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Failure::new(exit::ERROR, format!("reading standard input: {e}")))?;
            s
        }
        Some(s) => s.to_string(),
    };
    let data: Value = serde_json::from_str(&data_text).map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("the event data is not JSON ({e}): {data_text}"),
        )
    })?;
    let mut metadata = serde_json::Map::new();
    for kv in &a.metadata {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(Failure::new(
                exit::ERROR,
                format!("--meta {kv:?} is not KEY=VALUE"),
            ));
        };
        metadata.insert(k.to_string(), Value::from(v));
    }
    let mut event =
        json!({ "type": a.event_type, "data": data, "metadata": metadata, "tags": a.tags });
    if let Some(id) = &a.id {
        event["id"] = Value::from(id.as_str());
    }
    let req = client
        .request(
            reqwest::Method::POST,
            &format!("/streams/{}/events", enc(&a.stream)),
        )
        .header("kiln-expected-version", a.expect.as_str())
        .json(&json!({ "events": [event] }));
    let body = client.send(req).await?;
    if a.conn.json {
        print_json(&body);
    } else {
        println!(
            "appended to {} at position {}, version {}",
            a.stream,
            body["position"].as_u64().unwrap_or(0),
            body["version"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}

fn consistency_query(c: &Consistency) -> Vec<String> {
    let mut q = Vec::new();
    if let Some(s) = &c.after_stream {
        q.push(format!("stream={}", enc(s)));
    }
    if let Some(p) = c.after_position {
        q.push(format!("position={p}"));
    }
    if let Some(w) = c.wait_ms {
        q.push(format!("wait_ms={w}"));
    }
    q
}

fn with_query(path: String, q: &[String]) -> String {
    if q.is_empty() {
        path
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

async fn get(a: GetArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let path = with_query(
        format!("/views/{}/{}", enc(&a.view), enc(&a.key)),
        &consistency_query(&a.consistency),
    );
    let body = client.get(&path).await?;
    if a.conn.json {
        print_json(&body);
    } else {
        if body["stale"].as_bool() == Some(true) {
            eprintln!(
                "warning: {} failed; this is its last document (stale)",
                body["view"].as_str().unwrap_or("the view")
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&body["doc"]).unwrap_or_default()
        );
    }
    Ok(())
}

async fn ls(a: LsArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let mut after = a.after.clone();
    loop {
        let mut q = consistency_query(&a.consistency);
        q.push(format!("limit={}", a.limit));
        for (k, v) in [("prefix", &a.prefix), ("from", &a.from), ("to", &a.to)] {
            if let Some(v) = v {
                q.push(format!("{k}={}", enc(v)));
            }
        }
        if let Some(after) = &after {
            q.push(format!("after={}", enc(after)));
        }
        if a.keys {
            q.push("keys_only=true".into());
        }
        let body = client
            .get(&with_query(format!("/views/{}", enc(&a.view)), &q))
            .await?;
        if a.conn.json {
            print_json(&body);
        } else {
            let mut out = std::io::stdout().lock();
            for item in body["items"].as_array().into_iter().flatten() {
                let key = item["key"].as_str().unwrap_or("?");
                let line = if a.keys {
                    writeln!(out, "{key}")
                } else {
                    writeln!(out, "{key}\t{}", item["doc"])
                };
                if line.is_err() {
                    return Ok(()); // stdout closed (e.g. piped into head)
                }
            }
        }
        match body["next"].as_str() {
            Some(next) if a.all => after = Some(next.to_string()),
            Some(next) => {
                if !a.conn.json {
                    eprintln!("more: kiln ls {} --after {next:?} (or --all)", a.view);
                }
                return Ok(());
            }
            None => return Ok(()),
        }
    }
}

async fn tail(a: TailArgs) -> Outcome {
    let client = Client::new(&a.conn)?;
    let path = format!("/events?from={}&follow={}", a.from, !a.no_follow);
    let res = client
        .request(reqwest::Method::GET, &path)
        .send()
        .await
        .map_err(|e| client.unreachable(e))?;
    if !res.status().is_success() {
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        return Err(Failure {
            code: exit::ERROR,
            message: body["error"]["message"]
                .as_str()
                .map_or_else(|| format!("the daemon answered {status}"), str::to_string),
            body: Some(body),
        });
    }
    let mut res = res;
    let mut pending = Vec::new();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = res.chunk().await.map_err(|e| client.unreachable(e))? {
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let printed = if a.conn.json {
                writeln!(out, "{text}")
            } else {
                let e: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                writeln!(
                    out,
                    "{:>8}  {}@{}  {}  {}",
                    e["position"],
                    e["stream"].as_str().unwrap_or("?"),
                    e["version"],
                    e["type"].as_str().unwrap_or("?"),
                    e["data"]
                )
            };
            if printed.and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(bar(0, 10, 10), "[..........]   0%");
        assert_eq!(bar(5, 10, 10), "[#####.....]  50%");
        assert_eq!(bar(10, 10, 10), "[##########] 100%");
        assert_eq!(bar(0, 0, 4), "[####] 100%");
    }

    #[test]
    fn encoding_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(enc("users@^1.2"), "users%40%5E1.2");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
    }
}
