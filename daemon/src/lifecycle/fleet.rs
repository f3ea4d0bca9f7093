//! The lifecycle's side of a fleet: names under `cutover = "fleet"` follow
//! the fleet's decision ([`crate::fleet`] reads it from JetStream KV and
//! hands it here), and their bare name answers only what the fleet decided.
//!
//! **What a fleet name answers.** The decision of a name is `active` (the
//! version the fleet serves) and, while the fleet switches, `next`. Reading
//! the bare name on this instance:
//! - while `next` is set: 503 `fleet_switching` (the name is *fenced*: every
//!   member stops answering the old version before any answers the new one,
//!   so a reader moving between members never goes back);
//! - once `active` is X: X when X is this instance's active version (the
//!   flip is [`Registry::follow_fleet`], one registry write, the same
//!   effects as a promote); 503 `fleet_catching_up` while X is not caught up
//!   here, `fleet_version_missing` while X is not deployed or is retired
//!   here (never an older version instead); X's documents marked stale when
//!   X failed here (the instance's own fallback to an older standby is not
//!   answered: the fleet never goes back without a fleet rollback);
//! - without contact to the fleet (no decision read yet, or the membership
//!   lease lapsed): the version it served, marked stale (`Kiln-Stale`), and
//!   `/readyz` answers 503 so a load balancer stops sending to it.
//!
//! Promote and rollback of a fleet name propose a new decision to the fleet
//! ([`FleetCoordinator`]) and wait, bounded, until this instance follows it.
//! Digests at common positions ([`Lifecycle::digest_at`]) pin the view where
//! it first stands at or past a multiple of `digest_every` (the marks of
//! [`super::compare`]), the same event on every member, and read the pin
//! while the view goes on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::compare::{Gone, Reached};
use super::machine::{Follow, Physical};
use super::registry::Registry;
use super::{CutoverPolicy, Lifecycle, LifecycleError, Resolved, ViewState, now_millis};
use crate::store::Position;
use crate::views::ViewId;
use crate::views::digest::ViewDigest;

/// What [`FleetCoordinator::propose`] is told for a rollback (the fleet
/// holds back the version it leaves).
pub const FLEET_ROLLBACK: &str = "rollback";

/// Longest a promote or rollback of a fleet name waits for this instance to
/// follow the fleet's new decision.
const FOLLOW_WAIT: Duration = Duration::from_secs(20);

/// The fleet's decision for one view name, as its KV entry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetDecision {
    /// The KV revision of the decision (compare-and-set on it).
    pub revision: u64,
    /// The version the fleet serves.
    pub active: Option<ViewId>,
    /// The version the fleet is switching to (members are fenced).
    pub next: Option<ViewId>,
    /// The module fingerprint the fleet runs `next`, else `active`, under
    /// (`None`: a decision of an older kiln, ids only). A version here under
    /// another module is never answered as the fleet's.
    pub fingerprint: Option<String>,
}

/// What a fleet name answers on this instance (published in the membership
/// record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetServing {
    /// The version the bare name answers from, if it answers.
    pub version: Option<String>,
    /// The revision of the fleet decision this instance applied (0: none).
    pub revision: u64,
    /// The bare name answers 503: the fleet switches, or its version is not
    /// caught up here.
    pub fenced: bool,
    /// Answering its last version without contact to the fleet.
    pub stale: bool,
}

/// Proposes decisions to the fleet (implemented by [`crate::fleet`]).
pub trait FleetCoordinator: Send + Sync {
    /// Asks the fleet to make `target` the active version of its name
    /// (compare-and-set on the name's decision); refused when `target` is
    /// not caught up on enough members. The decision's revision that names
    /// it: the one written, or the one found already serving it.
    fn propose(
        &self,
        target: ViewId,
        how: String,
    ) -> BoxFuture<'static, Result<u64, LifecycleError>>;

    /// Writes this instance's record now (what it runs, in what state),
    /// rather than at the next heartbeat: a change the other members must
    /// know before the operator who made it is answered (a retire: a
    /// promote asked next, anywhere, must see it).
    fn announce(&self) -> BoxFuture<'static, Result<(), LifecycleError>>;
}

/// The fleet's side of the lifecycle's state.
#[derive(Default)]
pub(super) struct FleetLink {
    coordinator: Mutex<Option<Arc<dyn FleetCoordinator>>>,
    decisions: Mutex<HashMap<String, FleetDecision>>,
    /// The decisions were read and the membership lease held at the last
    /// heartbeat (a change is logged, and waiters woken).
    in_contact: AtomicBool,
    /// Until when the membership lease holds, by this process's clock (it
    /// runs from when the record was sent, less one heartbeat: always
    /// before the server expires the record). Read on every answer, so
    /// contact ends on time however late the heartbeat task notices. An
    /// atomic ([`since_base`]; 0: none): read without a lock.
    contact_until: AtomicU64,
    /// Bumped on every decision applied (waiters and the heartbeat watch it).
    changed: tokio::sync::watch::Sender<u64>,
}

impl FleetLink {
    fn decisions(&self) -> std::sync::MutexGuard<'_, HashMap<String, FleetDecision>> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn coordinator(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn FleetCoordinator>>> {
        self.coordinator.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// In contact now: the decisions were read and the lease holds.
    fn in_contact(&self) -> bool {
        self.in_contact.load(Ordering::Acquire)
            && since_base(Instant::now()) < self.contact_until.load(Ordering::Acquire)
    }
}

/// `at` as nanoseconds (plus one, so 0 means "none") since a base instant
/// taken once per process: an `Instant` that fits an atomic.
fn since_base(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(base).as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

impl Lifecycle {
    /// Joins this lifecycle to a fleet: promote and rollback of names under
    /// `cutover = "fleet"` go to `coordinator`, and their bare names answer
    /// only what the fleet decided.
    pub fn attach_fleet(&self, coordinator: Arc<dyn FleetCoordinator>) {
        *self.inner.fleet.coordinator() = Some(coordinator);
    }

    /// Leaves the fleet (a graceful stop): the coordinator, which holds this
    /// lifecycle, is dropped, so the lifecycle can be released.
    pub fn detach_fleet(&self) {
        *self.inner.fleet.coordinator() = None;
    }

    fn fleet_coordinator(&self, name: &str) -> Option<Arc<dyn FleetCoordinator>> {
        self.inner.fleet_coordinator(name)
    }

    /// Names under `cutover = "fleet"` with a version here.
    pub fn fleet_names(&self) -> Vec<String> {
        let st = self.inner.lock();
        let mut names: Vec<String> = st
            .registry
            .entries
            .keys()
            .map(|id| id.name().to_string())
            .filter(|n| self.inner.config.policy(n).cutover == CutoverPolicy::Fleet)
            .collect();
        names.dedup();
        names
    }

    /// Contact with the fleet: `Some(until)` once the decisions were read
    /// and the membership lease holds until `until`; `None` (or `until`
    /// passed) makes fleet names answer stale (and `/readyz` 503).
    pub fn set_fleet_contact(&self, until: Option<Instant>) {
        self.inner
            .fleet
            .contact_until
            .store(until.map_or(0, since_base), Ordering::Release);
        let in_contact = until.is_some_and(|u| Instant::now() < u);
        let was = self
            .inner
            .fleet
            .in_contact
            .swap(in_contact, Ordering::AcqRel);
        if was != in_contact {
            if in_contact {
                tracing::info!("in contact with the fleet");
            } else {
                tracing::warn!(
                    "lost contact with the fleet: fleet names answer their last version, marked stale"
                );
            }
            self.inner.fleet.bump();
        }
    }

    /// Does this instance hold its fleet membership lease (and has it read
    /// the fleet's decisions)?
    pub fn fleet_in_contact(&self) -> bool {
        self.inner.fleet.in_contact()
    }

    /// Why this instance should not take traffic for fleet names, if so:
    /// out of contact, or a name whose fleet version is not caught up here.
    pub fn fleet_unready(&self) -> Option<String> {
        self.inner.fleet.coordinator().as_ref()?;
        let names = self.fleet_names();
        if names.is_empty() {
            return None;
        }
        if !self.inner.fleet.in_contact() {
            return Some(
                "out of contact with the fleet: fleet views answer their last version, stale"
                    .into(),
            );
        }
        let serving = self.fleet_serving();
        let behind: Vec<String> = serving
            .iter()
            .filter(|(_, s)| s.fenced && s.version.is_none())
            .filter(|(n, _)| {
                let d = self.inner.fleet.decisions();
                d.get(*n).is_some_and(|d| d.next.is_none())
            })
            .map(|(n, _)| n.clone())
            .collect();
        (!behind.is_empty()).then(|| {
            format!(
                "the fleet's version of {} is not caught up here yet",
                behind.join(", ")
            )
        })
    }

    /// Applies the fleet's decision for `name` (a newer revision than the
    /// one applied, else nothing): fences the name while the fleet switches;
    /// flips to the fleet's active version when it is caught up here.
    ///
    /// The decision already applied (the heartbeat re-reads it every beat)
    /// is only applied again (its version may have caught up since), never
    /// announced as a change: a change wakes the heartbeat loop, which would
    /// read it again, and so on without pause.
    pub async fn follow_fleet(&self, name: &str, decision: FleetDecision) {
        let new = {
            let mut d = self.inner.fleet.decisions();
            match d.get(name) {
                Some(k) if k.revision > decision.revision => return,
                Some(k) if *k == decision => false,
                _ => {
                    d.insert(name.to_string(), decision.clone());
                    true
                }
            }
        };
        if new {
            self.inner.fleet.bump();
        }
        self.apply_fleet(name).await;
    }

    /// Flips `name` to the fleet's active version if it is not yet and can be
    /// (the fleet module calls it again as versions catch up).
    pub async fn apply_fleet(&self, name: &str) {
        let Some(decision) = self.inner.fleet.decisions().get(name).cloned() else {
            return;
        };
        let (None, Some(target)) = (&decision.next, &decision.active) else {
            return;
        };
        if self.inner.check_running().is_err() {
            return;
        }
        let _ops = self.inner.ops.lock().await;
        let mut st = self.inner.lock();
        if let (Some(fleet), Some(e)) = (&decision.fingerprint, st.registry.entries.get(target))
            && e.fingerprint != *fleet
        {
            tracing::warn!(
                view = %target,
                fleet_fingerprint = %fleet,
                fingerprint = %e.fingerprint,
                "the fleet serves this version built from another module: fenced, never answered here"
            );
            return;
        }
        if st.registry.active(name).is_some_and(|a| &a.id == target) {
            return;
        }
        let before = st.registry.clone();
        let how = format!("fleet decision (revision {})", decision.revision);
        match st.registry.follow_fleet(target, now_millis(), &how) {
            Follow::Flipped(previous) => {
                if let Err(e) = self.inner.commit(&mut st, before) {
                    tracing::error!(view = %target, "following the fleet: {e}");
                    return;
                }
                super::log_cutover(target, previous.as_ref(), &how);
                drop(st);
                self.inner.fleet.bump();
            }
            Follow::Already => {}
            Follow::NotLive(state) => {
                // Warm what the fleet serves first.
                let physical = st
                    .registry
                    .entries
                    .get(target)
                    .map(|e| e.physical().clone());
                if let Some(p) = physical.and_then(|p| st.progress.get(&p))
                    && state == ViewState::Warming
                    && !p.fleet_first.swap(true, Ordering::AcqRel)
                {
                    tracing::info!(view = %target, "the fleet serves it: warming it first");
                }
                tracing::debug!(view = %target, %state, "the fleet serves a version not caught up here: fenced");
            }
            Follow::Unknown => {
                tracing::warn!(view = %target, "the fleet serves a version not deployed here: fenced");
            }
        }
    }

    /// What each fleet name answers here now.
    pub fn fleet_serving(&self) -> BTreeMap<String, FleetServing> {
        let names = self.fleet_names();
        let st = self.inner.lock();
        names
            .into_iter()
            .map(|n| {
                let s = match self.fleet_gate(&st.registry, &n) {
                    Ok(Some(r)) => FleetServing {
                        version: Some(r.version.to_string()),
                        revision: 0,
                        fenced: false,
                        stale: r.stale,
                    },
                    Ok(None) | Err(_) => FleetServing {
                        fenced: true,
                        ..FleetServing::default()
                    },
                };
                let revision = self
                    .inner
                    .fleet
                    .decisions()
                    .get(&n)
                    .map_or(0, |d| d.revision);
                (n, FleetServing { revision, ..s })
            })
            .collect()
    }

    /// The version the bare fleet name `name` answers from here, or why not
    /// (see the module docs). `Ok(None)`: no version at all.
    pub(super) fn fleet_gate(
        &self,
        reg: &Registry,
        name: &str,
    ) -> Result<Option<Resolved>, LifecycleError> {
        let local = reg.serving(name).map(|e| Resolved {
            version: e.id.clone(),
            physical: e.physical().clone(),
            stale: e.serving_stale,
        });
        let in_contact = self.inner.fleet.in_contact();
        let decision = self.inner.fleet.decisions().get(name).cloned();
        // The fleet's version under another module here: never its.
        if let Some(o) = decision
            .as_ref()
            .filter(|d| d.next.is_none())
            .and_then(|d| other_logic(reg, d, d.active.as_ref()?))
        {
            return Err(LifecycleError::FleetOtherLogic(Box::new(o)));
        }
        match decision {
            Some(FleetDecision {
                next: Some(next), ..
            }) => Err(LifecycleError::FleetSwitching {
                name: name.to_string(),
                to: next,
            }),
            Some(FleetDecision {
                active: Some(active),
                ..
            }) => match local {
                Some(r) if r.version == active => Ok(Some(Resolved {
                    stale: r.stale || !in_contact,
                    ..r
                })),
                _ => match reg.entries.get(&active) {
                    // The fleet's version failed here (this instance may have
                    // fallen back to an older standby on its own): its
                    // documents as they stood, marked stale, never the older
                    // version.
                    Some(e)
                        if e.state == ViewState::Failed
                            && reg.physical_state(e.physical()) == Physical::Failed =>
                    {
                        Ok(Some(Resolved {
                            version: active.clone(),
                            physical: e.physical().clone(),
                            stale: true,
                        }))
                    }
                    // Retired here, or never deployed: it does not come
                    // back by waiting.
                    None => Err(LifecycleError::FleetVersionMissing {
                        name: name.to_string(),
                        version: active,
                        why: "not deployed",
                    }),
                    Some(e) if e.state == ViewState::Retired => {
                        Err(LifecycleError::FleetVersionMissing {
                            name: name.to_string(),
                            version: active,
                            why: "retired",
                        })
                    }
                    _ => Err(LifecycleError::FleetCatchingUp {
                        name: name.to_string(),
                        version: active,
                    }),
                },
            },
            // No decision yet: what the registry says (stale out of contact).
            _ => Ok(local.map(|r| Resolved {
                stale: r.stale || !in_contact,
                ..r
            })),
        }
    }

    /// A bare name under `cutover = "fleet"` with a fleet attached: what
    /// [`Self::fleet_gate`] says. `None`: not a fleet name.
    pub(super) fn resolve_fleet(
        &self,
        reg: &Registry,
        spec: &str,
    ) -> Option<Result<Resolved, LifecycleError>> {
        if spec.contains('@') || spec.parse::<ViewId>().is_ok() {
            return None;
        }
        self.fleet_coordinator(spec)?;
        Some(match self.fleet_gate(reg, spec) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(if reg.of_name(spec).next().is_some() {
                LifecycleError::NoActiveVersion {
                    name: spec.to_string(),
                }
            } else {
                LifecycleError::UnknownView {
                    spec: spec.to_string(),
                }
            }),
            Err(e) => Err(e),
        })
    }

    /// Promote of a fleet name: proposed to the fleet, then waits until this
    /// instance follows. `None`: not a fleet name.
    pub(super) async fn promote_via_fleet(
        &self,
        id: &ViewId,
        how: &str,
    ) -> Option<Result<(), LifecycleError>> {
        let coordinator = self.fleet_coordinator(id.name())?;
        Some(self.propose_and_follow(coordinator, id, how).await)
    }

    /// Rollback of a fleet name: this instance's rollback target proposed to
    /// the fleet. `None`: not a fleet name.
    pub(super) async fn rollback_via_fleet(
        &self,
        name: &str,
    ) -> Option<Result<ViewId, LifecycleError>> {
        let coordinator = self.fleet_coordinator(name)?;
        // A switch under way is what a rollback undoes: back to the version
        // the fleet still serves (never past it to this instance's standby).
        let pending = self
            .inner
            .fleet
            .decisions()
            .get(name)
            .and_then(|d| d.next.as_ref().and(d.active.clone()));
        let target = {
            let st = self.inner.lock();
            match pending.or_else(|| st.registry.rollback_target(name)) {
                Some(t) => t,
                None if st.registry.of_name(name).next().is_none() => {
                    return Some(Err(LifecycleError::UnknownView {
                        spec: name.to_string(),
                    }));
                }
                None => {
                    return Some(Err(LifecycleError::NoStandby {
                        name: name.to_string(),
                    }));
                }
            }
        };
        Some(
            self.propose_and_follow(coordinator, &target, FLEET_ROLLBACK)
                .await
                .map(|()| target),
        )
    }

    async fn propose_and_follow(
        &self,
        coordinator: Arc<dyn FleetCoordinator>,
        id: &ViewId,
        how: &str,
    ) -> Result<(), LifecycleError> {
        {
            let st = self.inner.lock();
            let Some(e) = st.registry.entries.get(id) else {
                return Err(LifecycleError::UnknownView {
                    spec: id.to_string(),
                });
            };
            let live = st.registry.physical_state(e.physical()) == Physical::Live;
            if !(live
                && matches!(
                    e.state,
                    ViewState::Ready | ViewState::Standby | ViewState::Active
                ))
            {
                return Err(LifecycleError::NotReady {
                    id: id.clone(),
                    state: e.state,
                });
            }
        }
        // The fleet already serves (or switches to) this id built from
        // another module: this instance will never follow it, so say so now
        // rather than after the wait (found by the fleet model, seed 23: a
        // 504 after 20 s on the odd member of a mixed version).
        self.refuse_other_logic(id)?;
        let mut changed = self.inner.fleet.changed.subscribe();
        let ours = coordinator.propose(id.clone(), how.to_string()).await?;
        let deadline = Instant::now() + FOLLOW_WAIT;
        loop {
            {
                let st = self.inner.lock();
                let applied = self.inner.fleet.decisions().get(id.name()).cloned();
                let decided = applied
                    .as_ref()
                    .is_some_and(|d| d.next.is_none() && d.active.as_ref() == Some(id));
                if decided && st.registry.active(id.name()).is_some_and(|a| &a.id == id) {
                    return Ok(());
                }
                // A later decision for another version (a promote or a
                // rollback made meanwhile, anywhere) overtook this one: say
                // so now rather than wait for what will not come (found by
                // the fleet model test, seed 1140: 504 after 20 s).
                if let Some(d) = applied
                    && d.revision > ours
                    && !decided
                    && d.next.as_ref() != Some(id)
                {
                    let other = d.next.as_ref().or(d.active.as_ref());
                    return Err(LifecycleError::FleetRefused {
                        id: id.clone(),
                        reason: format!(
                            "a later decision (revision {}) made the fleet serve {} instead",
                            d.revision,
                            other.map_or("no version".to_string(), |o| o.to_string())
                        ),
                    });
                }
            }
            self.refuse_other_logic(id)?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LifecycleError::FleetPending {
                    id: id.clone(),
                    millis: FOLLOW_WAIT.as_millis() as u64,
                });
            }
            let _ = tokio::time::timeout(left, changed.changed()).await;
        }
    }

    /// `FleetOtherLogic` when the fleet's decision names `id` (as the
    /// version it serves or switches to) under another module than the one
    /// deployed here under it.
    fn refuse_other_logic(&self, id: &ViewId) -> Result<(), LifecycleError> {
        let decision = self.inner.fleet.decisions().get(id.name()).cloned();
        let st = self.inner.lock();
        match decision.and_then(|d| other_logic(&st.registry, &d, id)) {
            Some(o) => Err(LifecycleError::FleetOtherLogic(Box::new(o))),
            None => Ok(()),
        }
    }

    /// Resolves when a fleet decision was applied or contact changed.
    pub fn fleet_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.fleet.changed.subscribe()
    }

    /// The digest of physical view `view` at the first checkpoint it
    /// reaches at or past `at` (a position may be no event's: a tag marker,
    /// a foreign or removed message; every member's view stands at that
    /// same first event after it). Waits, for as long as it takes, for the
    /// view to get there, pins it there (see [`super::compare`]: the view
    /// goes on at once) and digests the pinned documents on a blocking
    /// thread while the view tails on; the time the digest read is returned
    /// with it (`took_ms` in `kiln fleet status`). `DigestMissed` when a
    /// batch under way carried the view past that checkpoint; ends at once
    /// when the view's worker stops or the daemon does.
    pub async fn digest_at(
        &self,
        view: &ViewId,
        at: Position,
    ) -> Result<(ViewDigest, Duration), LifecycleError> {
        let progress = {
            let st = self.inner.lock();
            let live =
                st.registry.physical_state(view) == Physical::Live && st.workers.contains_key(view);
            match st.progress.get(view) {
                Some(p) if live => p.clone(),
                _ => {
                    return Err(LifecycleError::NotComparable {
                        id: view.clone(),
                        state: st
                            .registry
                            .entries
                            .get(view)
                            .map_or(ViewState::Retired, |e| e.state),
                    });
                }
            }
        };
        let mut shutdown = self.inner.shutdown_tx.subscribe();
        let reached = tokio::select! {
            r = self.inner.reach(&progress, view, at) => r,
            _ = shutdown.wait_for(|s| *s) => return Err(LifecycleError::ShuttingDown),
        };
        let pinned = match reached {
            Ok(Reached::Pinned(p)) => p,
            Ok(Reached::Passed(checkpoint)) => {
                return Err(LifecycleError::DigestMissed {
                    view: view.clone(),
                    at,
                    checkpoint,
                });
            }
            Ok(Reached::Unreadable(e)) => {
                return Err(LifecycleError::Internal(format!(
                    "pinning {view} for its digest: {e}"
                )));
            }
            Err(Gone) => {
                return Err(LifecycleError::NotComparable {
                    id: view.clone(),
                    state: self.status_of(view).map_or(ViewState::Retired, |s| s.state),
                });
            }
        };
        let started = Instant::now();
        // At the lowest CPU priority: the live views go first.
        let digest = crate::background::at_lowest_priority("kiln-digest", move || pinned.digest())
            .await
            .ok_or_else(|| LifecycleError::Internal("a digest's thread did not answer".into()))??;
        Ok((digest, started.elapsed()))
    }
}

impl super::Inner {
    /// `"active"` or `"next"` when the fleet's decision applied here names
    /// `id` so (a fleet name, a fleet attached): every member must keep it.
    /// The fleet's coordinator when `name` follows a fleet (`cutover =
    /// "fleet"` and a fleet attached).
    fn fleet_coordinator(&self, name: &str) -> Option<Arc<dyn FleetCoordinator>> {
        if self.config.policy(name).cutover != CutoverPolicy::Fleet {
            return None;
        }
        self.fleet.coordinator().clone()
    }

    pub(super) fn fleet_role(&self, id: &ViewId) -> Option<&'static str> {
        self.fleet_coordinator(id.name())?;
        let d = self.fleet.decisions().get(id.name()).cloned()?;
        if d.next.as_ref() == Some(id) {
            Some("next")
        } else if d.active.as_ref() == Some(id) {
            Some("active")
        } else {
            None
        }
    }

    /// Writes this instance's fleet record now if `id`'s name follows a
    /// fleet, so a member deciding next sees what changed here (bounded
    /// wait; on failure the next heartbeat writes it).
    pub(super) async fn announce(&self, id: &ViewId) {
        let Some(coordinator) = self.fleet_coordinator(id.name()) else {
            return;
        };
        match tokio::time::timeout(ANNOUNCE_WAIT, coordinator.announce()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(view = %id, "telling the fleet: {e}; the next heartbeat will")
            }
            Err(_) => tracing::warn!(
                view = %id,
                "telling the fleet took over {ANNOUNCE_WAIT:?}; the next heartbeat will"
            ),
        }
    }
}

/// How long a change waits for its fleet record to be written.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);

/// `decision` names `id` (as the version it switches to, else the one it
/// serves) under another module than the one deployed here under `id`.
fn other_logic(reg: &Registry, decision: &FleetDecision, id: &ViewId) -> Option<super::OtherLogic> {
    let target = decision.next.as_ref().or(decision.active.as_ref())?;
    let fleet = decision.fingerprint.as_ref()?;
    let here = &reg.entries.get(id)?.fingerprint;
    (target == id && here != fleet).then(|| super::OtherLogic {
        version: id.clone(),
        fleet: fleet.clone(),
        here: here.clone(),
    })
}
