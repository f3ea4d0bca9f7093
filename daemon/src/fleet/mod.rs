//! A fleet: kiln instances beside the replicas of one service, sharing one
//! JetStream, that behave as one daemon. Coordination goes through two KV
//! buckets and their watches, never through a consensus of kiln's own:
//!
//! - `kiln-fleet-<fleet>-members`: one key per instance (its id), rewritten
//!   every `heartbeat_ms` with its [`Member`] record (versions, states,
//!   checkpoints, lag, what its fleet names serve, its digests). The
//!   bucket's `max_age` is `member_ttl_ms`: an instance that stops
//!   heartbeating drops out within that time, by the server's clock.
//! - `kiln-fleet-<fleet>-decisions`: one key per view name under
//!   `cutover = "fleet"`, its [`Decision`]: the version the fleet serves
//!   and, while switching, the next one. Changed only by compare-and-set on
//!   the key's revision (create when absent, update at the revision read),
//!   so two members racing to change it leave exactly one change.
//!
//! **A cutover is two writes.** (1) `next = X` (proposed by `kiln promote`
//! or `rollback` on any member, or by any member's driver once X is ready on
//! every live member or `quorum` of them). Every member seeing it *fences*
//! the name (its bare name answers 503 `fleet_switching`) and says so in its
//! record. (2) Once every live member's record shows the fence at that
//! revision, any member's driver writes `active = X`; each member flips (one
//! local registry write through the lifecycle's state machine) as soon as X
//! is caught up there. No member answers X before every live member stopped
//! answering the previous version, so a reader going from member to member
//! never sees a version older than one it has seen. A member that cannot
//! renew its record within its lease (`member_ttl_ms` less one heartbeat,
//! by its own clock, shorter than the server's expiry) answers its last
//! version marked stale and fails `/readyz`.
//!
//! **Digests.** Every `digest_every` log positions each member digests each
//! live view at the first checkpoint it reaches at or past the multiple of
//! `digest_every` (a multiple may be no event's position: a tag marker, a
//! foreign or removed message; the first event after it is the same on
//! every member). The view is pinned there (the marks of
//! `lifecycle/compare.rs`: one RocksDB snapshot, the view goes on at once),
//! the digest (`views/digest.rs`) reads the pin, and the member publishes
//! it in its record with that position; [`FleetStatus`] flags a member
//! whose digest differs at the same position for the same fingerprint.

pub mod record;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::lifecycle::{
    FLEET_ROLLBACK, FleetCoordinator, FleetDecision, Lifecycle, LifecycleError, ViewState,
    ViewStatus,
};
use crate::views::ViewId;
pub use record::{Decision, DigestAt, FleetStatus, Member, MemberView, Revised};

/// Digests kept per view in a member's record.
const DIGESTS_KEPT: usize = 6;

/// `[fleet]`: the fleet this instance belongs to (JetStream only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet's name (letters, digits, `-`, `_`); instances with the same
    /// name on the same JetStream form one fleet. Empty: no fleet.
    pub name: String,
    /// This instance's id in the fleet; empty: the host name.
    pub instance_id: String,
    /// How often this instance rewrites its membership record.
    pub heartbeat_ms: u64,
    /// A member whose record is older than this has left the fleet.
    pub member_ttl_ms: u64,
    /// Members that must have a version ready before the fleet switches to
    /// it automatically, or for a promote; 0: every live member.
    pub quorum: usize,
    /// Members digest their views at every multiple of this log position;
    /// 0: no digests.
    pub digest_every: u64,
    /// Replicas of the fleet's KV buckets (1, 3 or 5).
    pub replicas: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            name: String::new(),
            instance_id: String::new(),
            heartbeat_ms: 1_000,
            member_ttl_ms: 5_000,
            quorum: 0,
            digest_every: 100_000,
            replicas: 1,
        }
    }
}

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), FleetError> {
        let bad = |key: &str, why: String| FleetError::Config {
            key: key.to_string(),
            why,
        };
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "fleet.name",
                format!("{:?}: letters, digits, - and _ only", self.name),
            ));
        }
        if !self.instance_id.is_empty() && !valid_key(&self.instance_id) {
            return Err(bad(
                "fleet.instance_id",
                format!(
                    "{:?}: letters, digits, -, _, = and inner dots only",
                    self.instance_id
                ),
            ));
        }
        if self.heartbeat_ms == 0 || self.member_ttl_ms < 3 * self.heartbeat_ms {
            return Err(bad(
                "fleet.member_ttl_ms",
                format!(
                    "{} ms must be at least 3 heartbeats ({} ms each, above 0)",
                    self.member_ttl_ms, self.heartbeat_ms
                ),
            ));
        }
        if !matches!(self.replicas, 1 | 3 | 5) {
            return Err(bad(
                "fleet.replicas",
                format!("{}: 1, 3 or 5", self.replicas),
            ));
        }
        Ok(())
    }

    /// The instance id: the configured one, else the host name.
    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let cleaned: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if cleaned.is_empty() {
            "kiln".into()
        } else {
            cleaned
        }
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with('.')
        && !k.ends_with('.')
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.'))
}

/// What can go wrong with the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{key}: {why}")]
    Config { key: String, why: String },
    #[error("fleet {fleet}: {what}: {source}")]
    Kv {
        fleet: String,
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(
        "fleet {fleet}: another process took over instance id {instance} (started at {other_started_at} ms): this one left the fleet; give each process its own --instance-id"
    )]
    Superseded {
        fleet: String,
        instance: String,
        other_started_at: u64,
    },
    #[error("fleet {fleet}: the record of member {instance} is not one kiln wrote: {reason}")]
    Record {
        fleet: String,
        instance: String,
        reason: String,
    },
}

/// A running fleet membership. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    config: FleetConfig,
    instance: String,
    api: String,
    lifecycle: Lifecycle,
    members: kv::Store,
    decisions: kv::Store,
    started_at: u64,
    /// Digests taken here, per physical view, oldest first.
    digests: Mutex<HashMap<String, VecDeque<DigestAt>>>,
    /// Until when this instance's record is surely in the bucket.
    lease_until: Mutex<Option<Instant>>,
    /// This process (a uuid in its record): two processes under one
    /// instance id tell each other apart by it.
    incarnation: String,
    /// The revision of our record as we last wrote it.
    revision: Mutex<Option<u64>>,
    /// One record write at a time (the heartbeat, or an announcement the
    /// lifecycle asks for): each compares-and-sets on the last revision.
    beat: tokio::sync::Mutex<()>,
    /// Another process (started at this time, ms) took our instance id
    /// over: we left the fleet.
    superseded: Mutex<Option<u64>>,
    poke: tokio::sync::Notify,
    /// The background tasks, aborted when the fleet is left.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Fleet {
    /// Opens (creating when missing) the fleet's buckets on `js`, reads every
    /// decision and applies it, writes this instance's first record, and
    /// starts the heartbeat, the decisions watch and the digests. The
    /// lifecycle's fleet names then follow the fleet.
    pub async fn start(
        config: FleetConfig,
        js: &async_nats::jetstream::Context,
        memory_storage: bool,
        lifecycle: Lifecycle,
        api: String,
    ) -> Result<Fleet, FleetError> {
        config.validate()?;
        let kv_err = |what: &str, e: async_nats::Error| FleetError::Kv {
            fleet: config.name.clone(),
            what: what.to_string(),
            source: e,
        };
        let storage = if memory_storage {
            async_nats::jetstream::stream::StorageType::Memory
        } else {
            async_nats::jetstream::stream::StorageType::File
        };
        let members = js
            .create_or_update_key_value(kv::Config {
                bucket: format!("kiln-fleet-{}-members", config.name),
                description: format!("kiln fleet {}: one record per live member", config.name),
                history: 1,
                max_age: Duration::from_millis(config.member_ttl_ms),
                storage,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| kv_err("opening the members bucket", Box::new(e)))?;
        let decisions = js
            .create_or_update_key_value(kv::Config {
                bucket: format!("kiln-fleet-{}-decisions", config.name),
                description: format!(
                    "kiln fleet {}: the active version of each fleet view name",
                    config.name
                ),
                history: 16,
                storage,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| kv_err("opening the decisions bucket", Box::new(e)))?;
        let instance = config.instance();
        let inner = Arc::new(Inner {
            config,
            instance,
            api,
            lifecycle: lifecycle.clone(),
            members,
            decisions,
            started_at: now_millis(),
            digests: Mutex::new(HashMap::new()),
            lease_until: Mutex::new(None),
            incarnation: uuid::Uuid::new_v4().to_string(),
            revision: Mutex::new(None),
            beat: tokio::sync::Mutex::new(()),
            superseded: Mutex::new(None),
            poke: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let fleet = Fleet { inner };
        lifecycle.attach_fleet(Arc::new(fleet.clone()));
        // Before anything is served: the fleet's decisions, then our record.
        let names = lifecycle.fleet_names();
        for name in &names {
            if let Some(r) = fleet.inner.decision(name).await? {
                fleet.inner.follow(name, &r).await;
            }
        }
        match fleet.inner.heartbeat().await {
            Ok(()) => lifecycle.set_fleet_contact(fleet.inner.lease_until()),
            Err(e) => tracing::warn!("fleet: first heartbeat failed, serving stale: {e}"),
        }
        tracing::info!(
            fleet = %fleet.inner.config.name,
            instance = %fleet.inner.instance,
            names = ?names,
            "joined the fleet"
        );
        let mut tasks = vec![
            tokio::spawn(fleet.inner.clone().run()).abort_handle(),
            tokio::spawn(fleet.inner.clone().watch()).abort_handle(),
        ];
        if fleet.inner.config.digest_every > 0 {
            tasks.push(tokio::spawn(fleet.inner.clone().digests_loop()).abort_handle());
        }
        *fleet.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(fleet)
    }

    /// The fleet now: every live member's record, every decision, and the
    /// digests that disagree.
    pub async fn status(&self) -> Result<FleetStatus, FleetError> {
        let i = &self.inner;
        let (members, unreadable) = i.scan_members().await?;
        let mut decisions = BTreeMap::new();
        for name in i.keys(&i.decisions, "listing decisions").await? {
            if let Some(r) = i.decision(&name).await? {
                decisions.insert(name, r);
            }
        }
        Ok(FleetStatus::new(
            &i.config.name,
            &i.instance,
            (
                i.config.member_ttl_ms,
                i.config.quorum,
                i.config.digest_every,
            ),
            members,
            unreadable,
            decisions,
        ))
    }

    /// Leaves the fleet at once (a graceful stop): its record is deleted
    /// rather than left to expire.
    /// Its tasks stop and the lifecycle is detached from it.
    pub async fn leave(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.inner.lifecycle.detach_fleet();
        // Only our own record: another process may have taken the id over.
        let inner = self.inner.clone();
        let delete_ours = async move {
            let entry = inner.members.entry(&inner.instance).await?;
            let ours = entry.as_ref().is_some_and(|e| {
                serde_json::from_slice::<Member>(&e.value)
                    .is_ok_and(|m| m.incarnation == inner.incarnation)
            });
            match entry {
                Some(e) if ours => inner
                    .members
                    .delete_expect_revision(&inner.instance, Some(e.revision))
                    .await
                    .map_err(async_nats::Error::from),
                _ => {
                    tracing::info!(instance = %inner.instance, "our member record is another process's now: left it");
                    Ok(())
                }
            }
        };
        match tokio::time::timeout(
            Duration::from_millis(self.inner.config.member_ttl_ms / 3),
            delete_ours,
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(instance = %self.inner.instance, "left the fleet"),
            Ok(Err(e)) => tracing::warn!("fleet: deleting this member's record: {e}"),
            Err(_) => tracing::warn!("fleet: deleting this member's record: no answer"),
        }
    }
}

impl Inner {
    fn err(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> FleetError {
        FleetError::Kv {
            fleet: self.config.name.clone(),
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    /// The keys of `store`, from the stream's subjects (one request; no
    /// consumer, unlike `kv::Store::keys`, so polling it every heartbeat
    /// leaves nothing behind on the server). Deleted keys are listed too:
    /// their `get` is `None`.
    async fn keys(&self, store: &kv::Store, what: &str) -> Result<Vec<String>, FleetError> {
        let mut subjects = store
            .stream
            .info_with_subjects(format!("{}>", store.prefix))
            .await
            .map_err(|e| self.err(what, e))?;
        let mut keys = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(|e| self.err(what, e))?;
            if let Some(k) = subject.strip_prefix(store.prefix.as_str()) {
                keys.push(k.to_string());
            }
        }
        Ok(keys)
    }

    /// The decision of `name` and its revision, if the fleet has one.
    async fn decision(&self, name: &str) -> Result<Option<Revised>, FleetError> {
        let entry = self
            .decisions
            .entry(name)
            .await
            .map_err(|e| self.err(&format!("reading the decision of {name}"), e))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        match serde_json::from_slice::<Decision>(&entry.value) {
            Ok(decision) => Ok(Some(Revised {
                revision: entry.revision,
                decision,
            })),
            Err(e) => {
                tracing::error!(
                    name,
                    revision = entry.revision,
                    "fleet: a decision kiln cannot read: {e}"
                );
                Ok(None)
            }
        }
    }

    /// Hands a decision to the lifecycle.
    async fn follow(&self, name: &str, r: &Revised) {
        let parse = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<ViewId>().ok());
        self.lifecycle
            .follow_fleet(
                name,
                FleetDecision {
                    revision: r.revision,
                    active: parse(&r.decision.active),
                    next: parse(&r.decision.next),
                    fingerprint: r.decision.fingerprint.clone(),
                },
            )
            .await;
    }

    /// Every live member's record, and the ids of records that do not parse
    /// (a newer kiln's, or foreign): the fleet cannot tell what those serve,
    /// so no cutover is proposed or completed while one is there.
    async fn scan_members(&self) -> Result<(Vec<Member>, Vec<String>), FleetError> {
        let ids = self.keys(&self.members, "listing members").await?;
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for id in ids {
            let Some(bytes) = self
                .members
                .get(&id)
                .await
                .map_err(|e| self.err(&format!("reading member {id}"), e))?
            else {
                continue;
            };
            match serde_json::from_slice::<Member>(&bytes) {
                Ok(m) => out.push(m),
                Err(e) => {
                    let e = FleetError::Record {
                        fleet: self.config.name.clone(),
                        instance: id.clone(),
                        reason: e.to_string(),
                    };
                    tracing::warn!("{e}; no cutover proceeds while it is there");
                    unreadable.push(id);
                }
            }
        }
        Ok((out, unreadable))
    }

    /// This instance's record now.
    fn record(&self) -> Member {
        let status = self.lifecycle.status();
        let head = status.iter().map(|s| s.head).max().unwrap_or(0);
        let digests = {
            let d = self.digests.lock().unwrap_or_else(|p| p.into_inner());
            let mut all: Vec<DigestAt> = d.values().flatten().cloned().collect();
            all.sort_by(|a, b| (&a.view, a.position).cmp(&(&b.view, b.position)));
            all
        };
        Member {
            incarnation: self.incarnation.clone(),
            instance: self.instance.clone(),
            api: self.api.clone(),
            started_at: self.started_at,
            heartbeat_at: now_millis(),
            head,
            format: record::RECORD_FORMAT,
            // Retired versions too: `retired_on` must see them.
            views: status
                .iter()
                .map(|s| MemberView {
                    id: s.id.clone(),
                    state: s.state,
                    checkpoint: s.checkpoint,
                    lag: s.lag,
                    fingerprint: s.fingerprint.clone(),
                    alias_of: s.alias_of.clone(),
                })
                .collect(),
            serving: self.lifecycle.fleet_serving(),
            digests,
        }
    }

    /// Writes this instance's record; on success the lease runs from the
    /// moment it was sent.
    ///
    /// Our record is rewritten by compare-and-set on the revision we last
    /// wrote. When that fails because another process (another incarnation)
    /// wrote under our instance id since, that process has taken the id
    /// over (the newest start wins: a crashed process restarted takes its
    /// own id back at once): this one leaves the fleet for good, fenced and
    /// not ready, rather than let two processes speak as one member.
    async fn heartbeat(&self) -> Result<(), FleetError> {
        let _one = self.beat.lock().await;
        if let Some(e) = self.superseded() {
            return Err(e);
        }
        let sent = Instant::now();
        let record = self.record();
        let bytes: bytes::Bytes = serde_json::to_vec(&record)
            .map_err(|e| self.err("encoding our record", e))?
            .into();
        let last = *self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let updated = match last {
            Some(r) => self
                .members
                .update(&self.instance, bytes.clone(), r)
                .await
                .ok(),
            None => None,
        };
        let revision = match updated {
            Some(rev) => rev,
            None => {
                if last.is_some()
                    && let Ok(Some(entry)) = self.members.entry(&self.instance).await
                    && entry.operation == kv::Operation::Put
                    && let Ok(other) = serde_json::from_slice::<Member>(&entry.value)
                    && other.incarnation != self.incarnation
                {
                    *self.superseded.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(other.started_at);
                    *self.lease_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    self.lifecycle.set_fleet_contact(None);
                    let e = FleetError::Superseded {
                        fleet: self.config.name.clone(),
                        instance: self.instance.clone(),
                        other_started_at: other.started_at,
                    };
                    tracing::error!("{e}");
                    return Err(e);
                }
                // First beat, or our record lapsed or was removed: write it.
                self.members
                    .put(&self.instance, bytes)
                    .await
                    .map_err(|e| self.err("writing our record", e))?
            }
        };
        *self.revision.lock().unwrap_or_else(|p| p.into_inner()) = Some(revision);
        let lease = Duration::from_millis(
            self.config
                .member_ttl_ms
                .saturating_sub(self.config.heartbeat_ms),
        );
        *self.lease_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent + lease);
        Ok(())
    }

    /// Why this process left the fleet, if another took its instance id.
    fn superseded(&self) -> Option<FleetError> {
        let other = (*self.superseded.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(FleetError::Superseded {
            fleet: self.config.name.clone(),
            instance: self.instance.clone(),
            other_started_at: other,
        })
    }

    /// Until when this instance's membership lease holds (its last
    /// heartbeat's send time, plus the TTL less one heartbeat).
    fn lease_until(&self) -> Option<Instant> {
        *self.lease_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_holds(&self) -> bool {
        self.lease_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    /// Heartbeat, decisions re-read and followed, the cutover driven: every
    /// `heartbeat_ms`, and at once when a decision was applied here.
    async fn run(self: Arc<Self>) {
        let period = Duration::from_millis(self.config.heartbeat_ms);
        // A call to the server that takes longer counts as failed: the lease
        // is judged at least this often, whatever the client's own timeouts.
        let patience = Duration::from_millis(self.config.member_ttl_ms / 3);
        let mut changes = self.lifecycle.fleet_changes();
        loop {
            // Out of contact, a member comes back only once it has read the
            // decisions again (`drive`): one taken while it was out is
            // followed before it answers unmarked.
            let rejoining = !self.lifecycle.fleet_in_contact();
            let mut beat = false;
            match tokio::time::timeout(patience, self.heartbeat()).await {
                Ok(Ok(())) => {
                    beat = true;
                    if !rejoining {
                        self.lifecycle.set_fleet_contact(self.lease_until());
                    }
                }
                failed => {
                    match failed {
                        Ok(Err(e)) => tracing::warn!("fleet heartbeat: {e}"),
                        _ => tracing::warn!("fleet heartbeat: no answer within {patience:?}"),
                    }
                    if !self.lease_holds() {
                        self.lifecycle.set_fleet_contact(None);
                    }
                }
            }
            if self.superseded().is_some() {
                // Left the fleet: never write a decision again.
                self.lifecycle.set_fleet_contact(None);
                tokio::time::sleep(period).await;
                continue;
            }
            match tokio::time::timeout(patience, self.drive()).await {
                Ok(Err(e)) => tracing::debug!("fleet: {e}"),
                Err(_) => tracing::debug!("fleet: driving the cutover took over {patience:?}"),
                Ok(Ok(())) if rejoining && beat => {
                    self.lifecycle.set_fleet_contact(self.lease_until());
                }
                Ok(Ok(())) => {}
            }
            if !self.lease_holds() {
                self.lifecycle.set_fleet_contact(None);
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.poke.notified() => {}
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }

    /// Re-reads the decision of each fleet name (the watch may have missed
    /// one), follows it, and writes the next step of its cutover if any.
    async fn drive(&self) -> Result<(), FleetError> {
        let names = self.lifecycle.fleet_names();
        if names.is_empty() {
            return Ok(());
        }
        let (members, unreadable) = self.scan_members().await?;
        for name in names {
            let current = self.decision(&name).await?;
            if let Some(r) = &current {
                self.follow(&name, r).await;
                self.lifecycle.apply_fleet(&name).await;
            }
            let step = record::drive(
                &name,
                current.as_ref(),
                &members,
                &unreadable,
                self.config.quorum,
                &self.instance,
                now_millis(),
            );
            if let Some(step) = step {
                self.write(&name, step).await;
            }
        }
        Ok(())
    }

    /// Writes a step by compare-and-set; losing the race is fine (another
    /// member wrote it, or something newer).
    /// The revision written, or `None`.
    async fn write(&self, name: &str, step: record::Step) -> Option<u64> {
        let (revision, decision) = match &step {
            record::Step::Create(d) => (None, d),
            record::Step::Update(r, d) => (Some(*r), d),
        };
        let Ok(bytes) = serde_json::to_vec(decision) else {
            return None;
        };
        let written = match revision {
            None => self
                .decisions
                .create(name, bytes.into())
                .await
                .map_err(|e| e.to_string()),
            Some(r) => self
                .decisions
                .update(name, bytes.into(), r)
                .await
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(rev) => {
                tracing::info!(
                    name,
                    revision = rev,
                    active = ?decision.active,
                    next = ?decision.next,
                    reason = %decision.reason,
                    "fleet decision written"
                );
                Some(rev)
            }
            Err(e) => {
                tracing::debug!(
                    name,
                    "fleet decision not written (another member's won?): {e}"
                );
                None
            }
        }
    }

    /// Follows every change of the decisions bucket as it happens; the
    /// heartbeat loop re-reads them too, so a broken watch only delays.
    async fn watch(self: Arc<Self>) {
        loop {
            match self.decisions.watch_all().await {
                Ok(mut w) => {
                    while let Some(entry) = w.next().await {
                        let Ok(entry) = entry else { break };
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        let Ok(decision) = serde_json::from_slice::<Decision>(&entry.value) else {
                            continue;
                        };
                        let r = Revised {
                            revision: entry.revision,
                            decision,
                        };
                        if self.lifecycle.fleet_names().contains(&entry.key) {
                            self.follow(&entry.key, &r).await;
                        }
                    }
                }
                Err(e) => tracing::debug!("fleet: watching decisions: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(self.config.heartbeat_ms)).await;
        }
    }

    /// Keeps one digest task per live physical view (see [`Self::digests_of`]).
    async fn digests_loop(self: Arc<Self>) {
        /// Aborts the digest tasks when this loop is aborted.
        struct Tasks(HashMap<String, tokio::task::JoinHandle<()>>);
        impl Drop for Tasks {
            fn drop(&mut self) {
                for t in self.0.values() {
                    t.abort();
                }
            }
        }
        let mut tasks = Tasks(HashMap::new());
        let tasks = &mut tasks.0;
        loop {
            tasks.retain(|_, t| !t.is_finished());
            for s in self.lifecycle.status().iter().filter(|s| digestible(s)) {
                if !tasks.contains_key(&s.id) {
                    let this = self.clone();
                    let id = s.id.clone();
                    tasks.insert(s.id.clone(), tokio::spawn(this.digests_of(id)));
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Digests physical view `id` at every multiple of `digest_every`: at
    /// the first checkpoint it reaches at or past the next multiple ahead of
    /// its checkpoint (its worker cuts its batch there, pins it and goes
    /// on), then at the next multiple. Ends when the view no longer tails
    /// live.
    async fn digests_of(self: Arc<Self>, id: String) {
        let k = self.config.digest_every;
        let Ok(view) = id.parse::<ViewId>() else {
            return;
        };
        let mut done = 0;
        loop {
            let Some(s) = self.lifecycle.status_of(&view).filter(digestible) else {
                return;
            };
            // The multiple of K at or ahead of the checkpoint, past the last done.
            let at = s.checkpoint.div_ceil(k).max(done / k + 1) * k;
            match self.lifecycle.digest_at(&view, at).await {
                Ok((d, took)) => {
                    done = d.position;
                    tracing::debug!(view = %view, position = d.position, digest = %d.digest, took_ms = took.as_millis() as u64, "digest taken");
                    let mut all = self.digests.lock().unwrap_or_else(|p| p.into_inner());
                    let q = all.entry(id.clone()).or_default();
                    q.push_back(DigestAt {
                        view: id.clone(),
                        fingerprint: s.fingerprint.clone(),
                        position: d.position,
                        documents: d.documents,
                        bytes: d.bytes,
                        digest: d.digest,
                        took_ms: took.as_millis() as u64,
                        built_by: self.lifecycle.lineage_of(&view),
                    });
                    while q.len() > DIGESTS_KEPT {
                        q.pop_front();
                    }
                    drop(all);
                    self.poke.notify_one();
                }
                // Carried past it by a batch under way when the mark was
                // put: the next multiple.
                Err(LifecycleError::DigestMissed { .. }) => done = at,
                Err(e) => {
                    tracing::debug!(view = %view, position = at, "digests stop: {e}");
                    return;
                }
            }
        }
    }
}

/// A physical view tailing live.
fn digestible(s: &ViewStatus) -> bool {
    s.alias_of.is_none()
        && matches!(
            s.state,
            ViewState::Ready | ViewState::Active | ViewState::Standby
        )
}

impl FleetCoordinator for Fleet {
    fn announce(&self) -> BoxFuture<'static, Result<(), LifecycleError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner
                .heartbeat()
                .await
                .map_err(|e| LifecycleError::FleetUnavailable(e.to_string()))?;
            inner.poke.notify_one();
            Ok(())
        })
    }

    fn propose(
        &self,
        target: ViewId,
        how: String,
    ) -> BoxFuture<'static, Result<u64, LifecycleError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let name = target.name().to_string();
            let unavailable = |e: FleetError| LifecycleError::FleetUnavailable(e.to_string());
            for _ in 0..5 {
                let (members, unreadable) = inner.scan_members().await.map_err(unavailable)?;
                if !unreadable.is_empty() {
                    return Err(LifecycleError::FleetRefused {
                        id: target.clone(),
                        reason: format!(
                            "the record of member(s) {} cannot be read (a newer kiln?): what they serve is unknown",
                            unreadable.join(", ")
                        ),
                    });
                }
                let retired = record::retired_on(&target, &members);
                if !retired.is_empty() {
                    return Err(LifecycleError::FleetRefused {
                        id: target.clone(),
                        reason: format!(
                            "it is retired on {}: deploy it there again first",
                            retired.join(", ")
                        ),
                    });
                }
                let logic = record::logic_of(&target, &members);
                if logic.len() > 1 {
                    return Err(LifecycleError::FleetRefused {
                        id: target.clone(),
                        reason: format!(
                            "members run different modules under this version id ({}): deploy one build everywhere under a new version",
                            record::logic_words(&logic)
                        ),
                    });
                }
                let (ready, not) = record::readiness(&target, &members);
                let with_name = ready.len() + not.len();
                let need = record::needed(inner.config.quorum, with_name);
                if ready.len() < need {
                    return Err(LifecycleError::FleetRefused {
                        id: target.clone(),
                        reason: format!(
                            "it is caught up on {} of the {need} member(s) needed; not on {}",
                            ready.len(),
                            not.join(", ")
                        ),
                    });
                }
                let current = inner.decision(&name).await.map_err(unavailable)?;
                let target_s = target.to_string();
                // Never overwrite a switch under way with another promote
                // (two operators at once: the second is told, not silently
                // undone). A rollback may: it cancels the switch.
                if how != FLEET_ROLLBACK
                    && let Some(c) = &current
                    && let Some(next) = &c.decision.next
                    && *next != target_s
                {
                    return Err(LifecycleError::FleetRefused {
                        id: target.clone(),
                        reason: format!(
                            "the fleet is switching to {next} ({}, by {}): promote again once it has switched, or roll it back",
                            c.decision.reason, c.decision.by
                        ),
                    });
                }
                if let Some(c) = &current
                    && c.decision.next.is_none()
                    && c.decision.active.as_deref() == Some(&target_s)
                {
                    return Ok(c.revision);
                }
                let decision = Decision::proposed(
                    current.as_ref().map(|c| &c.decision),
                    (&target_s, logic.into_keys().next()),
                    how == FLEET_ROLLBACK,
                    &inner.instance,
                    format!("{how} on {}", inner.instance),
                    now_millis(),
                );
                let step = match &current {
                    None => record::Step::Create(decision),
                    Some(c) => record::Step::Update(c.revision, decision),
                };
                if let Some(revision) = inner.write(&name, step).await {
                    inner.poke.notify_one();
                    return Ok(revision);
                }
            }
            Err(LifecycleError::FleetUnavailable(format!(
                "the decision of {name} kept changing under five compare-and-set attempts"
            )))
        })
    }
}
