//! The fleet, model-tested: seeded random sequences of operations against
//! three real `kiln serve` processes on one nats-server (one JetStream log,
//! one fleet, one shared snapshot directory), each step checked against the
//! fleet's invariants (ARCHITECTURE.md, "The fleet's invariants") and a small
//! model of what the operator decided:
//!
//! - **F1 reads never go back**: a reader going round the members all along
//!   never sees an older version unmarked than one it saw before, between
//!   two operator decisions (a rollback or a promote of an older version is
//!   the only way back);
//! - **F2 documents are right**: once the log is quiet, every version a
//!   member serves or may serve (ready, active, standby) holds exactly the
//!   documents a clean in-process rebuild of its module over the log gives,
//!   however it was built (replay, alias, snapshot bootstrap), and the
//!   fleet's digests found no mismatch;
//! - **F3 views keep moving**: once the log is quiet, every such version on
//!   every member reaches the log's last event within a bound;
//! - **F4 nothing is ahead of its log**: after every step, no member has a
//!   version whose checkpoint is past the log's head;
//! - **F5 decisions hold**: once quiet, every member answers the version the
//!   model says the fleet decided (the operator's last promote or rollback,
//!   or the newest version ready everywhere that no rollback held back and no
//!   member retired), and `GET /fleet` agrees.
//!
//! Operations: appends (plain, atomic multi-event, tagged) through any
//! member; a foreign message and a removed message, at any position and at
//! digest positions (multiples of 10); deploy a version everywhere (each
//! version's logic drawn per sequence, so some alias and some warm); promote
//! and rollback asked of any member, and two promotes at once; a version
//! deployed with another module on one member (F6: **one version id, one
//! logic**: never proposed, flagged in `GET /fleet`, and never answered by
//! a member whose module is not the fleet's); retire a version on one
//! member; snapshot a member's active version; crash a member (SIGKILL,
//! restart); freeze a member past its membership TTL (SIGSTOP, SIGCONT);
//! replace a member's disk (its modules deployed again, it bootstraps from
//! the shared snapshots); cut a member's connection to nats-server (each
//! member reaches it through its own TCP proxy) past its TTL while the
//! others append, and sometimes take a promote or rollback it cannot hear
//! of (F1: out of contact it may answer its last version only marked
//! stale); copy a member's data directory (a volume snapshot, taken with
//! the process frozen) and later restore it (the member's views, registry
//! and records go back while the fleet went on); a snapshot lease holder
//! alive but stuck (F7: **no lease outlives its holder's progress**: a
//! member whose guest spins keeps refreshing its lease, yet another member
//! builds the version well before the spin ends); a byte flipped in a
//! published snapshot's file (refused by whoever tries it, never served:
//! F2); and "quiet", where F2, F3, F5 and F6 are checked.
//!
//! `KILN_FLEET_MODEL_SEQUENCES` (default 45, about seven minutes) sequences of
//! `KILN_FLEET_MODEL_STEPS` (default 14) steps run in the normal test
//! command; `KILN_FLEET_MODEL_SEED=<n>` replays the one a failure names.

// Members are indices into `members`, `apis` and `MEMBERS` alike.
#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln::runtime::{Module, Runtime, RuntimeConfig};
use kiln::store::EventStore;
use kiln::views::ViewId;
use kiln_tests::daemon::{Api, Daemon, Options, fleet_member};
use kiln_tests::lifecycle::{read_log, rebuild};
use kiln_tests::nats::{NatsServer, connect_when_ready, test_config};
use kiln_tests::proxy::Proxy;
use kiln_tests::rng::Rng;
use kiln_tests::wasm::users_module;
use serde_json::{Value, json};

const VERSIONS: [&str; 3] = ["1.0.0", "1.1.0", "1.2.0"];
const MEMBERS: [&str; 3] = ["a", "b", "c"];
const USERS: u64 = 5;
/// How long the fleet may take to settle once the log is quiet.
const SETTLE: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Debug)]
enum Op {
    Append(usize, u64),
    AppendMulti(usize, u64),
    AppendTagged(usize),
    /// A foreign message; `true`: at a digest position (a multiple of 10).
    Foreign(bool),
    /// A foreign message, then removed from the stream.
    Removed(bool),
    Deploy(usize),
    /// The version everywhere, but on one member with the other logic (a
    /// second build under the same id): never served (F6).
    DeployMixed(usize, usize),
    Promote(usize, usize),
    /// Two promotes asked of two members at once.
    TwoPromotes(usize, usize, usize, usize),
    Rollback(usize),
    Retire(usize, usize),
    Snapshot(usize),
    Crash(usize),
    /// SIGSTOP past the membership TTL, then SIGCONT: a member that froze
    /// (GC pause, a stopped VM) and wakes up believing what it knew.
    Freeze(usize),
    ReplaceDisk(usize),
    /// One member's NATS connection cut (its proxy closes every connection
    /// and refuses new ones) past the membership TTL while the others
    /// append; `true`: the others also take a decision (a promote or a
    /// rollback) while it is out. Healed afterwards.
    Partition(usize, bool),
    /// F7: `chaos` deployed on a first, which takes the snapshot lease and
    /// reaches a guest that spins to a's 8 s batch deadline three times (a
    /// stays alive and keeps refreshing its lease), then on b and c (2 s
    /// deadlines): one of them must build while a is still stuck. Once per
    /// sequence.
    Stuck,
    /// One byte flipped in a file of a published snapshot in the shared
    /// directory (a bad disk, a bad copy): every instance that tries it
    /// refuses it and replays; none serves its documents (F2).
    CorruptSnapshot,
    /// A copy of one member's data directory as it is now (a volume
    /// snapshot: the process frozen while it is copied).
    CopyDisk(usize),
    /// The member's data directory replaced by its last copy (each member's
    /// disk is copied once the sequence has started) and the member started
    /// again: its views, registry and
    /// records go back while the fleet went on. Its modules are deployed
    /// again as after `ReplaceDisk`.
    RestoreDisk(usize),
    Quiet,
}

fn gen_op(rng: &mut Rng) -> Op {
    let m = rng.below(MEMBERS.len() as u64) as usize;
    let v = rng.below(VERSIONS.len() as u64) as usize;
    match rng.below(109) {
        0..=19 => Op::Append(m, 1 + rng.below(8)),
        20..=26 => Op::AppendMulti(m, 2 + rng.below(3)),
        27..=32 => Op::AppendTagged(m),
        33..=37 => Op::Foreign(rng.below(2) == 0),
        38..=41 => Op::Removed(rng.below(2) == 0),
        42..=51 => Op::Deploy(v),
        52..=55 => Op::DeployMixed(v, m),
        56..=58 => Op::Promote(v, m),
        59..=61 => Op::TwoPromotes(
            v,
            m,
            rng.below(VERSIONS.len() as u64) as usize,
            rng.below(MEMBERS.len() as u64) as usize,
        ),
        62..=66 => Op::Rollback(m),
        67..=71 => Op::Retire(v, m),
        72..=77 => Op::Snapshot(m),
        78..=80 => Op::Crash(m),
        81..=83 => Op::Freeze(m),
        84..=88 => Op::ReplaceDisk(m),
        89..=92 => Op::Partition(m, rng.below(2) == 0),
        93..=94 => Op::Stuck,
        100..=103 => Op::CopyDisk(m),
        104..=106 => Op::RestoreDisk(m),
        107..=108 => Op::CorruptSnapshot,
        _ => Op::Quiet,
    }
}

fn vid(v: usize) -> String {
    format!("users-{}", VERSIONS[v].replace('.', "_"))
}

fn index_of(id: &str) -> Option<usize> {
    (0..VERSIONS.len()).find(|v| vid(*v) == id)
}

/// What the reader saw: per read, the decision epoch when it was sent and
/// answered, and the version that answered unmarked (None: refused,
/// unreachable, or answered marked stale, which F1 allows).
type Reads = Arc<std::sync::Mutex<Vec<(u64, u64, Option<String>)>>>;

struct Run {
    seed: u64,
    nats: NatsServer,
    log: Arc<dyn EventStore>,
    snapshots: tempfile::TempDir,
    /// Each member's way to nats-server (cut by `Partition`).
    proxies: Vec<Arc<Proxy>>,
    members: Vec<Daemon>,
    apis: Vec<Api>,
    /// Each version's logic in this sequence (`true`: without LoginFailed).
    changed: [bool; 3],
    /// Each version in each logic (`true`: without LoginFailed).
    modules: BTreeMap<(usize, bool), Module>,
    /// Model: versions deployed on every member.
    deployed: BTreeSet<usize>,
    /// Model: the fleet's active version.
    active: Option<usize>,
    /// Model: versions that have been active (standby now, never proposed).
    was_active: BTreeSet<usize>,
    /// Model: versions a rollback (or promote of an older one) held back.
    held_back: BTreeSet<usize>,
    /// Model: versions deployed with another logic on one member (F6).
    mixed: BTreeMap<usize, usize>,
    /// Model: version → members it is retired on.
    retired_on: BTreeMap<usize, BTreeSet<usize>>,
    /// Bumped around every operator decision: F1 compares reads of one epoch.
    epoch: Arc<AtomicU64>,
    reads: Reads,
    stop_reader: Arc<AtomicBool>,
    reader: Option<tokio::task::JoinHandle<()>>,
    foreign: u64,
    steps: Vec<String>,
    /// Versions seen bootstrapped from a snapshot when the log was quiet.
    bootstrapped: u64,
    /// `chaos` deployed (by `Stuck`).
    chaos: bool,
    /// Holds `stall_after_secs = 2` for every member.
    config: tempfile::NamedTempFile,
    /// Each member's last `CopyDisk`, and the log's head then.
    copies: Vec<Option<(tempfile::TempDir, u64)>>,
    /// Restores of a copy older than the log's head.
    restored: u64,
    /// Snapshot files corrupted.
    corrupted: u64,
    /// Versions seen with a snapshot refused when the log was quiet.
    refused: u64,
}

impl Run {
    async fn new(seed: u64, runtime: &Runtime, rng: &mut Rng) -> Run {
        let nats = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .expect("nats-server");
        let log: Arc<dyn EventStore> =
            Arc::new(connect_when_ready(&test_config(&nats.url())).await);
        let snapshots = tempfile::tempdir().expect("snapshot dir");
        let changed = [rng.below(2) == 1, rng.below(2) == 1, rng.below(2) == 1];
        let mut modules = BTreeMap::new();
        for v in 0..VERSIONS.len() {
            for c in [false, true] {
                let module = runtime
                    .load("model", &users_module(VERSIONS[v], c))
                    .expect("users loads");
                modules.insert((v, c), module);
            }
        }
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], nats.port()));
        let proxies = MEMBERS
            .iter()
            .map(|_| Arc::new(Proxy::start(target).expect("a proxy to nats-server")))
            .collect();
        let mut config = tempfile::NamedTempFile::new().expect("a config file");
        std::io::Write::write_all(&mut config, b"stall_after_secs = 2\n").expect("config");
        let mut run = Run {
            seed,
            nats,
            log,
            snapshots,
            proxies,
            members: Vec::new(),
            apis: Vec::new(),
            changed,
            modules,
            deployed: BTreeSet::new(),
            active: None,
            was_active: BTreeSet::new(),
            held_back: BTreeSet::new(),
            mixed: BTreeMap::new(),
            retired_on: BTreeMap::new(),
            epoch: Arc::new(AtomicU64::new(0)),
            reads: Reads::default(),
            stop_reader: Arc::new(AtomicBool::new(false)),
            reader: None,
            foreign: 0,
            steps: Vec::new(),
            bootstrapped: 0,
            chaos: false,
            config,
            copies: MEMBERS.iter().map(|_| None).collect(),
            restored: 0,
            corrupted: 0,
            refused: 0,
        };
        for id in MEMBERS {
            let o = run.options(id);
            let d = tokio::task::spawn_blocking(move || Daemon::start_with(o))
                .await
                .expect("a member starts");
            run.apis.push(Api::new(&d));
            run.members.push(d);
        }
        run.start_reader();
        run
    }

    fn options(&self, id: &str) -> Options {
        let snapshots = self.snapshots.path().display().to_string();
        let m = MEMBERS.iter().position(|x| *x == id).unwrap_or(0);
        // a's guests may run 8 s before they are stopped (a stuck lease
        // holder, `Stuck`: a batch, then the event alone twice, 24 s in all),
        // b's and c's 2 s; chaos' stopped events parked.
        let deadline = if m == 0 { "8000" } else { "2000" };
        fleet_member(&self.proxies[m].nats_url(), "model", id)
            .arg("--snapshot-dir")
            .arg(&snapshots)
            .arg("--config")
            .arg(&self.config.path().display().to_string())
            .arg("--batch-deadline-ms")
            .arg(deadline)
            .arg("--view")
            .arg("chaos:poison=park")
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let logs: Vec<String> = self
            .members
            .iter()
            .zip(MEMBERS)
            .map(|(d, id)| {
                let log = d.log();
                let tail = log_tail(&log, LOG_LINES);
                format!("--- member {id} (last {LOG_LINES} lines, repeats folded) ---\n{tail}")
            })
            .collect();
        panic!(
            "seed {}: {what}\nlogic changed per version: {:?}\nsteps:\n  {}\n{}\n\
             seed {}: {what}\n\
             replay: KILN_FLEET_MODEL_SEED={} cargo test --release -p kiln-tests --test fleet_model",
            self.seed,
            self.changed,
            self.steps.join("\n  "),
            logs.join("\n"),
            self.seed,
            self.seed
        );
    }

    /// Reads `user-0` through the bare name from each member in turn until
    /// stopped (F1); a member down answers nothing.
    fn start_reader(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let bases: Vec<String> = self.apis.iter().map(|a| a.base.clone()).collect();
        let (epoch, reads, stop) = (
            self.epoch.clone(),
            self.reads.clone(),
            self.stop_reader.clone(),
        );
        self.reader = Some(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let before = epoch.load(Ordering::SeqCst);
                let url = format!("{}/views/users/user-0", bases[i % bases.len()]);
                let version = match http.get(&url).send().await {
                    Ok(r) if r.status().as_u16() == 200 => r
                        .json::<Value>()
                        .await
                        .ok()
                        .filter(|b| b["stale"] != true)
                        .and_then(|b| b["view"].as_str().map(str::to_string)),
                    Ok(_) => None,
                    Err(_) => None,
                };
                let after = epoch.load(Ordering::SeqCst);
                if let Ok(mut r) = reads.lock() {
                    r.push((before, after, version));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    /// F1: within one epoch, no read answers an older version than one
    /// answered before it. Checked reads are forgotten.
    fn check_reads(&self) {
        let reads = std::mem::take(&mut *self.reads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut newest: Option<(u64, ViewId)> = None;
        for (n, (before, after, v)) in reads.iter().enumerate() {
            let Some(v) = v else { continue };
            // Odd: an operator decision was in flight (see `new_epoch`).
            if before != after || before % 2 == 1 {
                newest = None;
                continue;
            }
            let id: ViewId = match v.parse() {
                Ok(id) => id,
                Err(e) => self.fail(format!("F1: a read answered {v:?}, no view id: {e}")),
            };
            match &newest {
                Some((epoch, top)) if *epoch == *before && id < *top => self.fail(format!(
                    "F1: read {n} answered {id} after an earlier read (same decision) answered {top}"
                )),
                Some((epoch, top)) if *epoch == *before && id <= *top => {}
                _ => newest = Some((*before, id)),
            }
        }
    }

    /// Called as an operator decision begins (the epoch turns odd) and once
    /// every member answers it (even again): reads sent or answered in an
    /// odd epoch, or across two, are not compared.
    fn new_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    async fn head(&self) -> u64 {
        match self.log.head().await {
            Ok(h) => h,
            Err(e) => self.fail(format!("the log's head: {e}")),
        }
    }

    /// A raw (foreign) publish on an event subject; its stream position.
    async fn publish_foreign(&mut self) -> u64 {
        self.foreign += 1;
        let client = async_nats::connect(self.nats.url()).await.expect("client");
        let reply = client
            .request(
                format!("kiln.zz.zz-{}", self.foreign),
                "not a kiln event".into(),
            )
            .await
            .expect("foreign publish");
        let ack: Value = serde_json::from_slice(&reply.payload).expect("ack");
        ack["seq"].as_u64().expect("stored")
    }

    /// Appends plain events until the next message lands on a multiple of 10.
    async fn align_to_digest(&mut self) {
        loop {
            let head = self.head().await;
            if (head + 1).is_multiple_of(10) {
                return;
            }
            self.append(
                0,
                "user-0",
                &[json!({ "type": "UserLoggedIn", "data": {} })],
                None,
            )
            .await;
        }
    }

    async fn append(&self, m: usize, stream: &str, events: &[Value], tag: Option<&str>) {
        let mut events = events.to_vec();
        if let Some(t) = tag {
            for e in &mut events {
                e["tags"] = json!([t]);
            }
        }
        let (s, b) = self.apis[m]
            .post_json(
                &format!("/streams/{stream}/events"),
                &json!({ "events": events }),
            )
            .await;
        if s != 200 {
            self.fail(format!(
                "appending to {stream} through {}: {s} {b}",
                MEMBERS[m]
            ));
        }
    }

    fn event(rng: &mut Rng, u: u64) -> Value {
        match rng.below(4) {
            0 => {
                json!({ "type": "UserRegistered", "data": { "name": format!("n{u}"), "email": "e" } })
            }
            1 => {
                json!({ "type": "UserRenamed", "data": { "name": format!("r{}", rng.below(100)) } })
            }
            2 => json!({ "type": "UserLoggedIn", "data": {} }),
            _ => json!({ "type": "LoginFailed", "data": {} }),
        }
    }

    async fn step(&mut self, op: &Op, rng: &mut Rng) {
        match *op {
            Op::Append(m, n) => {
                for _ in 0..n {
                    let u = rng.below(USERS);
                    let e = Run::event(rng, u);
                    self.append(m, &format!("user-{u}"), &[e], None).await;
                }
            }
            Op::AppendMulti(m, n) => {
                let u = rng.below(USERS);
                let events: Vec<Value> = (0..n).map(|_| Run::event(rng, u)).collect();
                self.append(m, &format!("user-{u}"), &events, None).await;
            }
            Op::AppendTagged(m) => {
                let u = rng.below(USERS);
                let e = Run::event(rng, u);
                let tag = format!("account-{}", rng.below(3));
                self.append(m, &format!("user-{u}"), &[e], Some(&tag)).await;
            }
            Op::Foreign(at_digest) => {
                if at_digest {
                    self.align_to_digest().await;
                }
                self.publish_foreign().await;
            }
            Op::Removed(at_digest) => {
                if at_digest {
                    self.align_to_digest().await;
                }
                let seq = self.publish_foreign().await;
                let client = async_nats::connect(self.nats.url()).await.expect("client");
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream("KILN").await.expect("the KILN stream");
                stream.delete_message(seq).await.expect("removed");
            }
            Op::Deploy(v) if self.mixed.contains_key(&v) => {
                // Deploying it again changes nothing: the odd member keeps
                // its other module under the id (or refuses the new one).
                let odd = self.mixed[&v];
                let (s, b) = self.apis[odd]
                    .deploy(users_module(VERSIONS[v], self.changed[v]))
                    .await;
                if s >= 500 {
                    self.fail(format!("deploying {} on {}: {s} {b}", vid(v), MEMBERS[odd]));
                }
            }
            Op::Deploy(v) => {
                // Every member, in a random order.
                let mut order: Vec<usize> = (0..MEMBERS.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for m in order {
                    let (s, b) = self.apis[m]
                        .deploy(users_module(VERSIONS[v], self.changed[v]))
                        .await;
                    if s != 202 && s != 200 {
                        self.fail(format!("deploying {} on {}: {s} {b}", vid(v), MEMBERS[m]));
                    }
                }
                self.deployed.insert(v);
                self.retired_on.remove(&v);
                self.expected_active().await;
                self.settle_decision().await;
            }
            Op::DeployMixed(v, odd) => {
                if self.deployed.contains(&v) || self.mixed.contains_key(&v) {
                    return;
                }
                for m in 0..MEMBERS.len() {
                    let changed = self.changed[v] != (m == odd);
                    let (s, b) = self.apis[m]
                        .deploy(users_module(VERSIONS[v], changed))
                        .await;
                    if s != 202 && s != 200 {
                        self.fail(format!("deploying {} on {}: {s} {b}", vid(v), MEMBERS[m]));
                    }
                }
                self.mixed.insert(v, odd);
                // Give the fleet the time it would take to switch to it.
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Op::Promote(v, m) => {
                // A mixed version: refused while the odd member's record
                // shows it; accepted only for the other members' build (the
                // odd one then never answers it, see `settle_decision`).
                // What the fleet serves first: it may have switched to a
                // mixed version while the odd member was out (seed 64).
                self.expected_active().await;
                self.new_epoch();
                let (s, b) = self.apis[m]
                    .post_json(&format!("/admin/views/{}/promote", vid(v)), &json!({}))
                    .await;
                if s < 300 {
                    if let Some(a) = self.active
                        && v < a
                    {
                        self.held_back.insert(a);
                    }
                    self.held_back.remove(&v);
                    self.set_active(v);
                    self.settle_decision().await;
                } else if s >= 500 && s != 503 || b["error"]["code"].as_str().is_none() {
                    self.fail(format!("promote {} on {}: {s} {b}", vid(v), MEMBERS[m]));
                }
                self.new_epoch();
            }
            Op::TwoPromotes(v1, m1, v2, m2) => {
                if v1 == v2 {
                    return;
                }
                self.new_epoch();
                let promote = |v: usize, m: usize| {
                    let api = self.apis[m].clone();
                    async move {
                        api.post_json(&format!("/admin/views/{}/promote", vid(v)), &json!({}))
                            .await
                    }
                };
                let (r1, r2) = tokio::join!(promote(v1, m1), promote(v2, m2));
                let mut accepted = BTreeSet::new();
                for (v, (s, b)) in [(v1, r1), (v2, r2)] {
                    if s < 300 {
                        accepted.insert(v);
                    } else if s >= 500 && s != 503 || b["error"]["code"].as_str().is_none() {
                        self.fail(format!(
                            "F5: of two promotes at once, {}'s answered {s} {b}",
                            vid(v)
                        ));
                    }
                }
                if !accepted.is_empty() {
                    // The fleet settles on one of them, and says which.
                    let mut d = self.decision(0).await;
                    let deadline = Instant::now() + SETTLE;
                    while !d["next"].is_null() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        d = self.decision(0).await;
                    }
                    let Some(a) = d["active"].as_str().and_then(index_of) else {
                        self.fail(format!("after two promotes the decision is {d}"));
                    };
                    if !accepted.contains(&a) {
                        self.fail(format!(
                            "F5: two promotes ({} and {}) were answered {accepted:?} and the fleet serves {}",
                            vid(v1),
                            vid(v2),
                            vid(a)
                        ));
                    }
                    self.held_back = d["held_back"]
                        .as_array()
                        .map(|h| {
                            h.iter()
                                .filter_map(|x| x.as_str().and_then(index_of))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.set_active(a);
                    self.settle_decision().await;
                }
                self.new_epoch();
            }
            Op::Rollback(m) => {
                self.expected_active().await;
                self.new_epoch();
                let (s, b) = self.apis[m]
                    .post_json("/admin/views/users/rollback", &json!({}))
                    .await;
                if s < 300 {
                    let from = self.active;
                    let d = self.decision(m).await;
                    let to = d["next"]
                        .as_str()
                        .or(d["active"].as_str())
                        .and_then(index_of);
                    let Some(to) = to else {
                        self.fail(format!("after a rollback the decision is {d}"));
                    };
                    if Some(to) == from || !self.was_active.contains(&to) {
                        self.fail(format!(
                            "a rollback from {:?} went to {} (was active: {:?}): {b}",
                            from.map(vid),
                            vid(to),
                            self.was_active
                        ));
                    }
                    if let Some(f) = from {
                        self.held_back.insert(f);
                    }
                    self.held_back.remove(&to);
                    self.set_active(to);
                    self.settle_decision().await;
                } else if s >= 500 && s != 503 || b["error"]["code"].as_str().is_none() {
                    self.fail(format!("rollback on {}: {s} {b}", MEMBERS[m]));
                }
                self.new_epoch();
            }
            Op::Retire(v, m) => {
                if Some(v) == self.active
                    || !self.deployed.contains(&v)
                    || self.mixed.contains_key(&v)
                {
                    return;
                }
                let (s, b) = self.apis[m]
                    .post_json(&format!("/admin/views/{}/retire", vid(v)), &json!({}))
                    .await;
                if s < 300 {
                    self.retired_on.entry(v).or_default().insert(m);
                } else if b["error"]["code"].as_str().is_none() {
                    self.fail(format!("retire {} on {}: {s} {b}", vid(v), MEMBERS[m]));
                }
            }
            Op::Snapshot(m) => {
                let Some(a) = self.active else { return };
                let (s, b) = self.apis[m]
                    .post_json(&format!("/admin/views/{}/snapshot", vid(a)), &json!({}))
                    .await;
                if s >= 500 && s != 503 {
                    self.fail(format!("snapshot {} on {}: {s} {b}", vid(a), MEMBERS[m]));
                }
            }
            Op::Crash(m) => {
                let d = &mut self.members[m];
                tokio::task::block_in_place(|| d.restart());
            }
            Op::Freeze(m) => {
                let Some(pid) = self.members[m].pid() else {
                    return;
                };
                let signal = |sig: &str| {
                    let ok = std::process::Command::new("kill")
                        .args([sig, &pid.to_string()])
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        self.fail(format!("kill {sig} {pid} failed"));
                    }
                };
                signal("-STOP");
                // Past the membership TTL (1.5 s): the others drop it.
                tokio::time::sleep(Duration::from_millis(2000)).await;
                signal("-CONT");
            }
            Op::CopyDisk(m) => self.copy_disk(m).await,
            Op::CorruptSnapshot => self.corrupt_snapshot(rng),
            Op::RestoreDisk(m) => {
                let Some((copy, at)) = &self.copies[m] else {
                    return;
                };
                if *at < self.head().await {
                    self.restored += 1;
                }
                let from = copy.path().join("data");
                let d = &mut self.members[m];
                tokio::task::block_in_place(|| d.restore_disk(&from));
                self.redeploy(m).await;
            }
            Op::ReplaceDisk(m) => {
                let d = &mut self.members[m];
                tokio::task::block_in_place(|| d.replace_disk());
                self.redeploy(m).await;
            }
            Op::Partition(m, decide) => {
                let other = (m + 1) % MEMBERS.len();
                self.proxies[m].cut();
                for _ in 0..3 {
                    let u = rng.below(USERS);
                    let e = Run::event(rng, u);
                    self.append(other, &format!("user-{u}"), &[e], None).await;
                }
                // Past the membership TTL (1.5 s): the others drop it.
                tokio::time::sleep(Duration::from_millis(2000)).await;
                if !decide {
                    self.proxies[m].heal();
                    return;
                }
                // A decision the member cannot hear of: it comes back (its
                // connection healed a moment later) to a fleet that moved.
                let proxy = self.proxies[m].clone();
                let heal = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    proxy.heal();
                });
                let decision = match self.active {
                    Some(a) if rng.below(2) == 0 && a > 0 => Op::Rollback(other),
                    _ => Op::Promote(rng.below(VERSIONS.len() as u64) as usize, other),
                };
                if let Some(s) = self.steps.last_mut() {
                    s.push_str(&format!(" [{decision:?}]"));
                }
                Box::pin(self.step(&decision, rng)).await;
                let _ = heal.await;
                self.proxies[m].heal();
            }
            Op::Stuck if self.chaos => {}
            Op::Stuck => self.stuck().await,
            Op::Quiet => self.quiet().await,
        }
    }

    /// A member back with a disk of its own (fresh or restored) is given the
    /// modules again, as a pod is by its projections directory; nothing is
    /// retired there afterwards.
    async fn redeploy(&mut self, m: usize) {
        for v in self.deployed.clone() {
            let (s, b) = self.apis[m]
                .deploy(users_module(VERSIONS[v], self.changed[v]))
                .await;
            if s != 202 && s != 200 {
                self.fail(format!("deploying {} on {}: {s} {b}", vid(v), MEMBERS[m]));
            }
        }
        // A mixed version too, in the logic this member had.
        for (v, odd) in self.mixed.clone() {
            let changed = self.changed[v] != (odd == m);
            let (s, b) = self.apis[m]
                .deploy(users_module(VERSIONS[v], changed))
                .await;
            if s != 202 && s != 200 {
                self.fail(format!("deploying {} on {}: {s} {b}", vid(v), MEMBERS[m]));
            }
        }
        for on in self.retired_on.values_mut() {
            on.remove(&m);
        }
        self.retired_on.retain(|_, on| !on.is_empty());
    }

    /// Flips a byte in the middle of one data file of one published
    /// snapshot (one whose manifest is written), if there is any.
    fn corrupt_snapshot(&mut self, rng: &mut Rng) {
        let dirs = |p: &std::path::Path| -> Vec<std::path::PathBuf> {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        let mut files = Vec::new();
        for key in dirs(self.snapshots.path()).iter().filter(|p| p.is_dir()) {
            for at in dirs(key)
                .iter()
                .filter(|p| p.join(kiln::snapshots::MANIFEST).is_file())
            {
                files.extend(dirs(at).into_iter().filter(|f| {
                    f.file_name()
                        .is_some_and(|n| n != kiln::snapshots::MANIFEST)
                        && f.metadata().is_ok_and(|m| m.is_file() && m.len() > 0)
                }));
            }
        }
        if files.is_empty() {
            return;
        }
        let f = &files[rng.below(files.len() as u64) as usize];
        let Ok(mut bytes) = std::fs::read(f) else {
            return; // Removed meanwhile (a newer snapshot, a refusal).
        };
        let i = bytes.len() / 2;
        bytes[i] ^= 0x5a;
        // In place (a snapshot file may be a hard link of another's: both
        // go bad, as on a bad disk).
        if std::fs::write(f, &bytes).is_ok() {
            self.corrupted += 1;
        }
    }

    async fn copy_disk(&mut self, m: usize) {
        let dir = tempfile::tempdir().expect("a dir for the copy");
        let head = self.head().await;
        let d = &self.members[m];
        tokio::task::block_in_place(|| d.copy_disk(&dir.path().join("data")));
        self.copies[m] = Some((dir, head));
    }

    /// `chaos-1_0_0`'s status on member `m`, if it has it.
    async fn chaos_on(&self, m: usize) -> Option<Value> {
        self.views(m)
            .await
            .into_iter()
            .find(|v| v["id"] == "chaos-1_0_0")
    }

    /// F7: a lease holder alive but stuck lets another member build.
    async fn stuck(&mut self) {
        self.chaos = true;
        let notes = |n: usize, at: &str| -> Vec<Value> {
            (0..n)
                .map(|i| json!({ "type": "Note", "data": { "text": format!("{at}{i}") } }))
                .collect()
        };
        self.append(1, "chaos-0", &notes(20, "before"), None).await;
        self.append(
            1,
            "chaos-spin",
            &[json!({ "type": "Spin", "data": {} })],
            None,
        )
        .await;
        let spin = self.head().await;
        self.append(1, "chaos-1", &notes(20, "after"), None).await;
        // Only the `chaos` streams' events reach it (not the users').
        let chaos = std::fs::read(kiln_tests::wasm::CHAOS).expect("the chaos module");
        let mut manifest = kiln_tests::wasm::manifest_of(&chaos);
        manifest["categories"] = json!(["chaos"]);
        let chaos = kiln_tests::wasm::with_manifest(&chaos, &manifest.to_string());
        let (s, b) = self.apis[0].deploy(chaos.clone()).await;
        if s != 202 {
            self.fail(format!("deploying chaos on a: {s} {b}"));
        }
        // a holds the lease and builds: its first batch holds the spin (its
        // guest spins to its 8 s deadline, then on the event alone, twice:
        // a stays short of the spin for 24 s).
        self.until("chaos on a building", || async {
            let v = self.chaos_on(0).await?;
            (v["snapshot"]["state"] == "building").then_some(())
        })
        .await;
        let stuck_at = Instant::now();
        for m in [1, 2] {
            let (s, b) = self.apis[m].deploy(chaos.clone()).await;
            if s != 202 {
                self.fail(format!("deploying chaos on {}: {s} {b}", MEMBERS[m]));
            }
        }
        // a notices it made no progress for 2 s and lets go; b or c builds
        // (its 2 s spins parked) well before a's spin is parked.
        loop {
            let mut built = None;
            for m in [1, 2] {
                if let Some(v) = self.chaos_on(m).await
                    && matches!(v["state"].as_str(), Some("ready" | "active"))
                {
                    built = Some(m);
                }
            }
            if let Some(m) = built {
                let a = self.chaos_on(0).await.unwrap_or(Value::Null);
                if a["checkpoint"].as_u64().is_none_or(|c| c >= spin) {
                    self.fail(format!(
                        "F7: a was to be stuck short of {} for 24 s, yet got past it \
                         ({:.1} s after it began) before {} built: {a}",
                        spin,
                        stuck_at.elapsed().as_secs_f64(),
                        MEMBERS[m]
                    ));
                }
                return;
            }
            if stuck_at.elapsed() > Duration::from_secs(18) {
                let (b, c) = (self.chaos_on(1).await, self.chaos_on(2).await);
                self.fail(format!(
                    "F7: 18 s after a began building chaos (stuck at a spin), neither b nor c \
                     built it: b {b:?}, c {c:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn set_active(&mut self, v: usize) {
        self.active = Some(v);
        self.was_active.insert(v);
    }

    /// After a deploy or an operator decision: every member answers what
    /// the fleet decided (F5) before the next step; the odd member of a
    /// mixed version refuses it, naming why (F6).
    async fn settle_decision(&self) {
        let Some(a) = self.active else { return };
        let odd = self.mixed.get(&a).copied();
        self.until(&format!("F5: every member answers {}", vid(a)), || async {
            for (m, api) in self.apis.iter().enumerate() {
                let (s, b) = api.get("/views/users/user-0").await;
                if Some(m) == odd {
                    // Out of contact it may still answer the version it
                    // last served, marked stale; never the fleet's.
                    if s == 200 && b["view"].as_str() == Some(vid(a).as_str()) {
                        self.fail(format!(
                            "F6: {} answered {b} with another module under {}",
                            MEMBERS[m],
                            vid(a)
                        ));
                    }
                    if s == 200 && b["stale"] != true {
                        self.fail(format!(
                            "F1: {}, whose module under {} is not the fleet's, answered another \
                             version unmarked: {b}",
                            MEMBERS[m],
                            vid(a)
                        ));
                    }
                    if b["error"]["code"] != "fleet_other_logic" {
                        return None;
                    }
                } else if s != 200 || b["view"].as_str() != Some(vid(a).as_str()) {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// The version the model says the fleet serves once it settled. A
    /// mixed version may have been proposed: when the member with the other
    /// module was out of the fleet (frozen past its TTL, or on a fresh disk
    /// before its modules arrived), the others agreed without it. The
    /// fleet's decision says whether; if so, it must have been eligible.
    async fn expected_active(&mut self) -> Option<usize> {
        let d = self.decision(0).await;
        let fleet = d["next"]
            .as_str()
            .or(d["active"].as_str())
            .and_then(index_of);
        if let Some(f) = fleet
            && self.mixed.contains_key(&f)
            && Some(f) != self.active
            && self.candidate(&BTreeSet::from([f])).is_some()
        {
            self.set_active(f);
        }
        if let Some(c) = self.candidate(&self.deployed.clone()) {
            self.set_active(c);
        }
        self.active
    }

    /// The newest version of `pool` the fleet proposes on its own.
    fn candidate(&self, pool: &BTreeSet<usize>) -> Option<usize> {
        pool.iter()
            .copied()
            .filter(|v| self.active.is_none_or(|a| *v > a))
            .filter(|v| !self.was_active.contains(v))
            // Nothing at or below a version a rollback held back.
            .filter(|v| self.held_back.iter().all(|h| v > h))
            .filter(|v| !self.retired_on.contains_key(v))
            .max()
    }

    async fn decision(&self, m: usize) -> Value {
        let (s, b) = self.apis[m].get("/fleet").await;
        if s != 200 {
            self.fail(format!("GET /fleet on {}: {s} {b}", MEMBERS[m]));
        }
        b["decisions"]["users"].clone()
    }

    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<()>>,
    {
        let deadline = Instant::now() + SETTLE;
        loop {
            if check().await.is_some() {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!("{what}: not within {SETTLE:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every member's `GET /views` entries.
    async fn views(&self, m: usize) -> Vec<Value> {
        let (s, b) = self.apis[m].get("/views").await;
        if s != 200 {
            self.fail(format!("GET /views on {}: {s} {b}", MEMBERS[m]));
        }
        b["views"].as_array().cloned().unwrap_or_default()
    }

    /// F4, after every step: no version's checkpoint is past the log's head.
    async fn check_not_ahead(&self) {
        for m in 0..MEMBERS.len() {
            let views = self.views(m).await;
            let head = self.head().await;
            for v in &views {
                let c = v["checkpoint"].as_u64().unwrap_or(0);
                if c > head && v["state"] != "retired" {
                    self.fail(format!(
                        "F4: {} on {} is at {c}, past the log's head {head}: {v}",
                        v["id"], MEMBERS[m]
                    ));
                }
            }
        }
    }

    /// The log is quiet: F3, F5, F2.
    async fn quiet(&mut self) {
        let expected = self.expected_active().await;
        let events = read_log(&self.log).await;
        let last = events.last().map_or(0, |e| e.position);
        let live = |v: &Value| matches!(v["state"].as_str(), Some("ready" | "active" | "standby"));
        // F3: every caught-up version on every member reaches the last event.
        for m in 0..MEMBERS.len() {
            self.until(
                &format!("F3: every version on {} reaches {last}", MEMBERS[m]),
                || async {
                    let views = self.views(m).await;
                    views
                        .iter()
                        .filter(|v| v["state"] != "retired")
                        .all(|v| live(v) && v["checkpoint"].as_u64() == Some(last))
                        .then_some(())
                },
            )
            .await;
        }
        // F5: every member answers what the fleet decided, and says so.
        if let Some(a) = expected {
            self.settle_decision().await;
            for m in 0..MEMBERS.len() {
                let d = self.decision(m).await;
                if d["active"].as_str() != Some(vid(a).as_str()) || !d["next"].is_null() {
                    self.fail(format!(
                        "F5: the model says the fleet serves {}; {}'s GET /fleet: {d}",
                        vid(a),
                        MEMBERS[m]
                    ));
                }
            }
        }
        // F2: documents, on every member, for every version that may serve.
        for m in 0..MEMBERS.len() {
            let users = |v: &Value| v["id"].as_str().is_some_and(|id| id.starts_with("users-"));
            for v in self.views(m).await.iter().filter(|v| live(v) && users(v)) {
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let Some(i) = index_of(&id) else {
                    self.fail(format!("a version the model never deployed: {v}"));
                };
                // The odd member of a mixed version runs the other logic.
                let changed = self.changed[i] != (self.mixed.get(&i) == Some(&m));
                let want: BTreeMap<String, Value> =
                    rebuild(&self.modules[&(i, changed)], &events, last)
                        .into_iter()
                        .map(|(k, d)| {
                            (
                                String::from_utf8_lossy(&k).into_owned(),
                                serde_json::from_slice(&d).unwrap_or(Value::Null),
                            )
                        })
                        .collect();
                let got = self.documents(m, &id).await;
                if got != want {
                    self.fail(format!(
                        "F2: {id} on {} (at {last}, {v}) differs from a clean rebuild: \
                         {} documents, the rebuild has {}; got {got:?}, want {want:?}",
                        MEMBERS[m],
                        got.len(),
                        want.len()
                    ));
                }
            }
        }
        for m in 0..MEMBERS.len() {
            let views = self.views(m).await;
            self.bootstrapped += views
                .iter()
                .filter(|v| v["snapshot"]["state"] == "bootstrapped")
                .count() as u64;
            self.refused += views
                .iter()
                .filter(|v| v["snapshot"]["state"] == "refused")
                .count() as u64;
        }
        // Every member back in the fleet's membership (one just healed
        // writes its record at its next heartbeat; seed 40 looked first).
        self.until("F6: every member listed in GET /fleet", || async {
            let (_, fleet) = self.apis[0].get("/fleet").await;
            let listed: BTreeSet<&str> = fleet["members"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["instance"].as_str()).collect())
                .unwrap_or_default();
            MEMBERS.iter().all(|m| listed.contains(m)).then_some(())
        })
        .await;
        let (s, fleet) = self.apis[0].get("/fleet").await;
        if s != 200 || fleet["mismatches"] != json!([]) {
            self.fail(format!("F2: the fleet's digests disagree: {s} {fleet}"));
        }
        // F6: every mixed version is flagged, nothing else.
        let flagged: BTreeSet<String> = fleet["logic_mismatches"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["view"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mixed: BTreeSet<String> = self.mixed.keys().map(|v| vid(*v)).collect();
        if flagged != mixed {
            self.fail(format!(
                "F6: GET /fleet flags {flagged:?} as run with other logic on some member; the model: {mixed:?}: {fleet}"
            ));
        }
    }

    async fn documents(&self, m: usize, id: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/views/{id}?limit=1000&after={a}"),
                None => format!("/views/{id}?limit=1000"),
            };
            let (s, b) = self.apis[m].get(&path).await;
            if s != 200 {
                self.fail(format!("GET {path} on {}: {s} {b}", MEMBERS[m]));
            }
            for item in b["items"].as_array().cloned().unwrap_or_default() {
                let key = item["key"].as_str().unwrap_or_default().to_string();
                out.insert(key, item["doc"].clone());
            }
            match b["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return out,
            }
        }
    }

    /// Checks the quiet fleet a last time and stops it; how many versions
    /// were seen bootstrapped from a snapshot, and how many members were
    /// restored from a copy older than the log.
    async fn finish(mut self) -> Seen {
        self.quiet().await;
        self.stop_reader.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        self.check_reads();
        let members = std::mem::take(&mut self.members);
        tokio::task::spawn_blocking(move || drop(members))
            .await
            .expect("members stop");
        Seen {
            bootstrapped: self.bootstrapped,
            restored: self.restored,
            corrupted: self.corrupted,
            refused: self.refused,
        }
    }
}

/// What the sequences reached, summed (each must be reached in a run of
/// 20 sequences or more).
#[derive(Default)]
struct Seen {
    /// Versions seen bootstrapped from a snapshot when the log was quiet.
    bootstrapped: u64,
    /// Members restored from a copy of their disk older than the log.
    restored: u64,
    /// Snapshot files corrupted.
    corrupted: u64,
    /// Versions seen with a snapshot refused when the log was quiet.
    refused: u64,
}

async fn run_sequence(seed: u64, steps: u64, runtime: &Runtime) -> Seen {
    let mut rng = Rng(seed);
    let mut run = Run::new(seed, runtime, &mut rng).await;
    // Something to serve from the start; user-0 is what the reader reads.
    run.apis[0].register_user("user-0").await;
    run.step(&Op::Append(0, 5), &mut rng).await;
    run.step(&Op::Deploy(0), &mut rng).await;
    // Every member's disk as it starts: what a `RestoreDisk` before any
    // `CopyDisk` of it goes back to.
    for m in 0..MEMBERS.len() {
        run.copy_disk(m).await;
    }
    for _ in 0..steps {
        let op = gen_op(&mut rng);
        run.steps.push(format!("{op:?}"));
        let started = Instant::now();
        run.step(&op, &mut rng).await;
        run.check_not_ahead().await;
        run.check_reads();
        if let Some(s) = run.steps.last_mut() {
            s.push_str(&format!(" ({:?})", started.elapsed()));
        }
    }
    eprintln!("seed {seed}: {}", run.steps.join(", "));
    run.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_fleet_sequences_keep_the_fleet_invariants() {
    let cache = tempfile::tempdir().expect("cache dir");
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let steps = env_u64("KILN_FLEET_MODEL_STEPS", 14);
    if let Ok(seed) = std::env::var("KILN_FLEET_MODEL_SEED") {
        let seed = seed.parse().expect("KILN_FLEET_MODEL_SEED is a number");
        run_sequence(seed, steps, &runtime).await;
        return;
    }
    let sequences = env_u64("KILN_FLEET_MODEL_SEQUENCES", 45);
    let base = env_u64("KILN_FLEET_MODEL_BASE", 1);
    let mut seen = Seen::default();
    for seed in base..base + sequences {
        let started = Instant::now();
        let s = run_sequence(seed, steps, &runtime).await;
        seen.bootstrapped += s.bootstrapped;
        seen.restored += s.restored;
        seen.corrupted += s.corrupted;
        seen.refused += s.refused;
        eprintln!("seed {seed}: {steps} steps in {:?}", started.elapsed());
    }
    eprintln!(
        "{sequences} sequences; versions seen bootstrapped from a snapshot: {}; members restored from an older copy of their disk: {}; snapshot files corrupted: {}, versions seen refusing a snapshot: {}",
        seen.bootstrapped, seen.restored, seen.corrupted, seen.refused
    );
    // The generator reaches snapshot bootstraps (a disk replaced after a
    // snapshot), not only replays.
    if sequences >= 20 {
        assert!(
            seen.bootstrapped > 0,
            "no sequence bootstrapped from a snapshot"
        );
        assert!(seen.corrupted > 0, "no snapshot was corrupted");
        assert!(
            seen.restored > 0,
            "no member was restored from a copy older than the log"
        );
    }
}

/// How many lines of each member's log a failure shows.
const LOG_LINES: usize = 60;

/// The last `n` lines of `log`, a line repeating one of the three before
/// it (but for its timestamp) folded into a count, so a burst of warnings
/// does not hide what came before it.
fn log_tail(log: &str, n: usize) -> String {
    let mut folded: Vec<(String, usize)> = Vec::new();
    for line in log.lines() {
        // Drop ANSI colours, then the timestamp (the first word).
        let mut plain = String::with_capacity(line.len());
        let mut in_escape = false;
        for c in line.chars() {
            match (in_escape, c) {
                (false, '\x1b') => in_escape = true,
                (true, 'm') => in_escape = false,
                (false, c) => plain.push(c),
                _ => {}
            }
        }
        let message = plain.split_once(' ').map_or("", |(_, m)| m).to_string();
        let recent = folded.len().saturating_sub(3);
        match folded[recent..]
            .iter_mut()
            .find(|(last, _)| last.split_once(' ').map_or("", |(_, m)| m) == message)
        {
            Some((_, count)) => *count += 1,
            None => folded.push((plain, 1)),
        }
    }
    let start = folded.len().saturating_sub(n);
    folded[start..]
        .iter()
        .map(|(line, count)| match count {
            1 => line.clone(),
            c => format!("{line}   [x{c}]"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
