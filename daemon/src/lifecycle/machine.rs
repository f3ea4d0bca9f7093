//! The lifecycle's state machine: every transition of the [`Registry`], pure.
//!
//! A transition takes the registry, an operation and the clock's reading,
//! changes the registry, and says what must happen outside it (start a
//! worker, release a column family). Nothing here touches a file, a worker or
//! RocksDB: `mod.rs` runs the effects under its locks, and the tests at the
//! bottom drive thousands of generated sequences of operations through these
//! transitions in milliseconds, checking after every step that:
//!
//! - a name resolves only to a version whose view has caught up (never a
//!   warming one), and at most one version of a name is active;
//! - an alias is never more ready than the view it reads;
//! - when the active version fails, the name falls back to a healthy standby,
//!   or keeps serving the failed version's documents marked stale;
//! - the grace sweep retires a standby only while its name has a healthy
//!   active version;
//! - nothing still read is released.

use super::compare::{CheckResult, CutoverCheck};
use super::registry::{Entry, Registry};
use super::{CutoverPolicy, LifecycleError, ViewState};
use crate::views::ViewId;
use crate::views::diff::DiffReport;

/// Where a physical view (a column family and its worker) stands, as the
/// registry's states imply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Physical {
    /// Replaying the log: not complete yet.
    Warming,
    /// Caught up and tailing live.
    Live,
    /// Its worker stopped on an error; its documents are kept, frozen.
    Failed,
    /// Nothing reads it any more: its column family can go.
    Gone,
}

/// A version to register (see [`Registry::deploy`]).
pub(super) struct NewVersion {
    pub id: ViewId,
    pub fingerprint: String,
    pub content_hash: String,
    /// Where it came from: a file path, `api`, ...
    pub source: String,
    pub now: u64,
}

/// Who asked for a deploy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// An operator (API, CLI, a test): may bring a retired version back.
    Explicit,
    /// The watched directory: never brings back a version an operator
    /// retired or rolled back and let retire.
    Watch,
}

/// What [`Registry::deploy`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum DeployPlan {
    /// The same module is registered already (seen by the watcher, the file
    /// becomes its source, so a renamed file keeps owning its version).
    Already,
    /// The watcher saw a retired version's module: it stays retired.
    StaysRetired,
    /// Registered in `state`. `alias_of`: the view it reads. `start_worker`:
    /// a new physical view whose worker must start (after dropping any stale
    /// column family of the same id).
    Registered {
        alias_of: Option<ViewId>,
        state: ViewState,
        start_worker: bool,
    },
}

/// What a name's cutover policy does when a version of it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Cutover {
    /// Make it active now.
    Promote(ViewId),
    /// Compare its documents with the active version's first (the check is
    /// recorded as pending on `candidate`); [`Registry::compared`] takes the
    /// result, and promotes only when `promote_if_identical` and they are
    /// identical.
    Compare {
        candidate: ViewId,
        against: ViewId,
        promote_if_identical: bool,
    },
}

/// What [`Registry::follow_fleet`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Follow {
    /// The fleet's version is this instance's active one already.
    Already,
    /// Flipped: the fleet's version is active, the previous one standby.
    Flipped(Option<ViewId>),
    /// The fleet's version is here but cannot serve yet (warming, failed,
    /// retired): the name is fenced meanwhile.
    NotLive(ViewState),
    /// The fleet's version is not deployed here.
    Unknown,
}

/// A name that fell back after its active version failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Fallback {
    pub failed: ViewId,
    /// The standby promoted in its place, or `None`: the failed version keeps
    /// serving its documents, marked stale.
    pub to: Option<ViewId>,
}

impl Registry {
    /// The state of physical view `p`, from the entries that read it.
    pub fn physical_state(&self, p: &ViewId) -> Physical {
        let readers = || {
            self.entries
                .values()
                .filter(move |e| e.physical() == p && e.state != ViewState::Retired)
        };
        if let Some(owner) = self.entries.get(p).filter(|e| e.alias_of.is_none())
            && owner.state != ViewState::Retired
        {
            return state_as_physical(owner.state);
        }
        // The owner is retired (kept for its aliases): they tell.
        let mut any = false;
        let mut warming = false;
        for e in readers() {
            any = true;
            match state_as_physical(e.state) {
                Physical::Live => return Physical::Live,
                Physical::Warming => warming = true,
                _ => {}
            }
        }
        match (any, warming) {
            (false, _) => Physical::Gone,
            (true, true) => Physical::Warming,
            (true, false) => Physical::Failed,
        }
    }

    /// Registers a module (the version immutability rule, aliases of
    /// unchanged logic, retired versions coming back only when asked).
    /// `running(p)`: does physical view `p` have a worker?
    pub fn deploy(
        &mut self,
        v: NewVersion,
        origin: Origin,
        running: impl Fn(&ViewId) -> bool,
    ) -> Result<DeployPlan, LifecycleError> {
        if let Some(existing) = self.entries.get_mut(&v.id) {
            if existing.content_hash != v.content_hash {
                return Err(LifecycleError::ImmutableVersion {
                    id: v.id,
                    existing: existing.fingerprint.clone(),
                    new: v.fingerprint,
                });
            }
            if existing.state != ViewState::Retired {
                if origin == Origin::Watch {
                    // The file holding it now owns it (a rename, a copy).
                    existing.source = v.source;
                }
                return Ok(DeployPlan::Already);
            }
            if origin == Origin::Watch {
                return Ok(DeployPlan::StaysRetired);
            }
            let _ = existing;
            // An operator brings a retired version back. Is its view still
            // read (by an alias)? Then it is that view again, as it stands:
            // never rebuilt in place under its readers.
            let read_by_others = self
                .entries
                .values()
                .any(|e| e.id != v.id && e.physical() == &v.id && e.state != ViewState::Retired);
            let is_physical = self
                .entries
                .get(&v.id)
                .is_some_and(|e| e.alias_of.is_none());
            if is_physical && (running(&v.id) || read_by_others) {
                let state = match self.physical_state(&v.id) {
                    Physical::Live => ViewState::Ready,
                    Physical::Warming => ViewState::Warming,
                    Physical::Failed | Physical::Gone => ViewState::Failed,
                };
                let Some(e) = self.entries.get_mut(&v.id) else {
                    return Err(LifecycleError::Internal(format!("{} vanished", v.id)));
                };
                e.state = state;
                e.source = v.source;
                e.deployed_at = v.now;
                e.retired_at = None;
                e.ready_at = (state == ViewState::Ready).then_some(v.now);
                e.activated_at = None;
                e.activated_by = None;
                if state != ViewState::Failed {
                    e.failed_at = None;
                    e.failed_position = None;
                    e.last_error = None;
                }
                return Ok(DeployPlan::Registered {
                    alias_of: None,
                    state,
                    start_worker: false,
                });
            }
            self.entries.remove(&v.id);
        }
        // Unchanged logic: read a view with the same fingerprint that is live
        // (ready at once) or warming (ready when it is), never a failed one.
        let mut target: Option<(ViewId, Physical)> = None;
        for e in self.entries.values() {
            if e.fingerprint != v.fingerprint || e.physical() == &v.id {
                continue;
            }
            let p = e.physical();
            let state = self.physical_state(p);
            let better = match (&target, state) {
                (_, Physical::Failed | Physical::Gone) => false,
                _ if !running(p) => false,
                (None, _) => true,
                (Some((_, Physical::Warming)), Physical::Live) => true,
                _ => false,
            };
            if better {
                target = Some((p.clone(), state));
            }
        }
        let (alias_of, state) = match target {
            Some((p, Physical::Live)) => (Some(p), ViewState::Ready),
            Some((p, _)) => (Some(p), ViewState::Warming),
            None => (None, ViewState::Warming),
        };
        let start_worker = alias_of.is_none();
        self.entries.insert(
            v.id.clone(),
            Entry {
                id: v.id,
                state,
                alias_of: alias_of.clone(),
                fingerprint: v.fingerprint,
                fingerprint_parts: Default::default(),
                deploy_note: None,
                content_hash: v.content_hash,
                source: v.source,
                checkpoint: 0,
                deployed_at: v.now,
                ready_at: (state == ViewState::Ready).then_some(v.now),
                activated_at: None,
                standby_since: None,
                retired_at: None,
                failed_at: None,
                failed_position: None,
                last_error: None,
                serving_stale: false,
                activated_by: None,
                cutover_check: None,
            },
        );
        Ok(DeployPlan::Registered {
            alias_of,
            state,
            start_worker,
        })
    }

    /// Physical view `p` caught up: it and every warming alias of it are
    /// ready (a resumed version that was serving its name stale is active
    /// again). Returns the names touched (for the cutover policy).
    pub fn caught_up(&mut self, p: &ViewId, now: u64) -> Vec<String> {
        let mut names = Vec::new();
        for e in self.entries.values_mut() {
            if e.physical() == p && e.state == ViewState::Warming {
                e.state = ViewState::Ready;
                e.ready_at = Some(now);
                if e.serving_stale {
                    e.serving_stale = false;
                    e.state = ViewState::Active;
                    e.activated_at = Some(now);
                    e.activated_by = Some("resumed after a failure".into());
                }
                names.push(e.id.name().to_string());
            }
        }
        names.dedup();
        names
    }

    /// An operator resumes failed physical view `p` (after dealing with the
    /// cause): every failed version reading it warms again from its
    /// checkpoint, nothing replayed before it. A version serving its name
    /// stale keeps doing so until it has caught up. Returns whether a worker
    /// must start; [`LifecycleError::NotFailed`] if `p` has not failed.
    pub fn resume(&mut self, p: &ViewId) -> Result<(), LifecycleError> {
        if self.physical_state(p) != Physical::Failed {
            let state = self.entries.get(p).map_or(ViewState::Retired, |e| e.state);
            return Err(LifecycleError::NotFailed {
                id: p.clone(),
                state,
            });
        }
        for e in self.entries.values_mut() {
            if e.physical() == p && e.state == ViewState::Failed {
                e.state = ViewState::Warming;
                e.ready_at = None;
                e.failed_at = None;
                e.failed_position = None;
                e.last_error = None;
            }
        }
        Ok(())
    }

    /// Physical view `p`'s worker stopped on an error: every version reading
    /// it fails. A name whose active version failed falls back to its newest
    /// healthy standby, or keeps serving the failed version, marked stale.
    pub fn failed(
        &mut self,
        p: &ViewId,
        position: Option<u64>,
        reason: &str,
        now: u64,
    ) -> Vec<Fallback> {
        let mut was_active = Vec::new();
        for e in self.entries.values_mut() {
            if e.physical() != p || matches!(e.state, ViewState::Retired | ViewState::Failed) {
                continue;
            }
            if e.state == ViewState::Active {
                was_active.push(e.id.clone());
            }
            e.state = ViewState::Failed;
            e.failed_at = Some(now);
            e.failed_position = position;
            e.standby_since = None;
            e.last_error = Some(if &e.id == p {
                reason.to_string()
            } else {
                format!("the view it reads, {p}, failed: {reason}")
            });
        }
        let mut out = Vec::new();
        for failed in was_active {
            let to = self.rollback_target(failed.name());
            match &to {
                Some(to) => {
                    let how = format!("automatic rollback: {failed} failed");
                    // A standby of a live view: promotion cannot be refused.
                    let _ = self.promote(to, now, &how);
                    if let Some(e) = self.entries.get_mut(&failed) {
                        let why = e.last_error.take().unwrap_or_default();
                        e.last_error = Some(format!("{why} (rolled back to {to} automatically)"));
                    }
                }
                None => {
                    if let Some(e) = self.entries.get_mut(&failed) {
                        e.serving_stale = true;
                    }
                }
            }
            out.push(Fallback { failed, to });
        }
        out
    }

    /// The flip: `id` (ready, or a standby) becomes the active version of its
    /// name, the previous active becomes standby. Returns the previous active.
    pub fn promote(
        &mut self,
        id: &ViewId,
        now: u64,
        how: &str,
    ) -> Result<Option<ViewId>, LifecycleError> {
        let Some(entry) = self.entries.get(id) else {
            return Err(LifecycleError::UnknownView {
                spec: id.to_string(),
            });
        };
        match entry.state {
            ViewState::Active => return Ok(None),
            ViewState::Ready | ViewState::Standby
                if self.physical_state(entry.physical()) == Physical::Live => {}
            state => {
                return Err(LifecycleError::NotReady {
                    id: id.clone(),
                    state,
                });
            }
        }
        let name = id.name().to_string();
        let previous = self.active(&name).map(|e| e.id.clone());
        for e in self.entries.values_mut().filter(|e| e.id.name() == name) {
            e.serving_stale = false;
            if Some(&e.id) == previous.as_ref() {
                e.state = ViewState::Standby;
                e.standby_since = Some(now);
            }
            if &e.id == id {
                e.state = ViewState::Active;
                e.activated_at = Some(now);
                e.standby_since = None;
                e.activated_by = Some(how.to_string());
            }
        }
        Ok(previous)
    }

    /// Under the `auto` policy: the newest ready version of `name`, if it is
    /// newer than the active one (or there is no healthy active one).
    pub fn cutover_candidate(&self, name: &str) -> Option<ViewId> {
        let newest_ready = self
            .of_name(name)
            .filter(|e| e.state == ViewState::Ready)
            .map(|e| e.id.clone())
            .max()?;
        match self.active(name) {
            Some(active) if active.id > newest_ready => None,
            _ => Some(newest_ready),
        }
    }

    /// What `policy` does for `name` now that a version of it is ready:
    /// - `auto`: promote the [`Self::cutover_candidate`];
    /// - `auto-if-identical`: promote it when the name has no healthy active
    ///   version (a first deploy) or when it reads the active version's very
    ///   view (an alias: the same documents); else compare it with the active
    ///   version and promote only if identical;
    /// - `manual`: never promote; compare with a healthy active version on
    ///   another view, so the operator sees what a promote would change.
    ///
    /// The candidate gets a pending check when a comparison is asked for.
    pub fn cutover_plan(&mut self, name: &str, policy: CutoverPolicy, now: u64) -> Option<Cutover> {
        if policy == CutoverPolicy::Fleet {
            // The fleet decides ([`Self::follow_fleet`]), never one instance.
            return None;
        }
        let candidate = self.cutover_candidate(name)?;
        let live_active = self
            .active(name)
            .filter(|a| self.physical_state(a.physical()) == Physical::Live)
            .map(|a| (a.id.clone(), a.physical().clone()));
        let same_view = |reg: &Registry, physical: &ViewId| {
            reg.entries
                .get(&candidate)
                .is_some_and(|c| c.physical() == physical)
        };
        let plan = match (policy, live_active) {
            (CutoverPolicy::Auto, _) => Cutover::Promote(candidate),
            (CutoverPolicy::AutoIfIdentical, None) => Cutover::Promote(candidate),
            (CutoverPolicy::AutoIfIdentical, Some((_, p))) if same_view(self, &p) => {
                Cutover::Promote(candidate)
            }
            (CutoverPolicy::Manual | CutoverPolicy::Fleet, None) => return None,
            (CutoverPolicy::Manual, Some((_, p))) if same_view(self, &p) => return None,
            (policy, Some((against, _))) => {
                // Already compared with this active version (or being compared).
                let known = self
                    .entries
                    .get(&candidate)
                    .and_then(|e| e.cutover_check.as_ref());
                if known.is_some_and(|c| c.against == against.to_string()) {
                    return None;
                }
                Cutover::Compare {
                    candidate,
                    against,
                    promote_if_identical: policy == CutoverPolicy::AutoIfIdentical,
                }
            }
        };
        if let Cutover::Compare {
            candidate, against, ..
        } = &plan
            && let Some(e) = self.entries.get_mut(candidate)
        {
            e.cutover_check = Some(CutoverCheck::pending(against, now));
        }
        Some(plan)
    }

    /// A comparison [`Self::cutover_plan`] asked for is over: `outcome` is its
    /// report or why it could not be taken. Recorded on the candidate; the
    /// candidate is promoted only when `promote_if_identical`, the documents
    /// are identical, the candidate is still ready and still the name's
    /// cutover candidate, and `against` is still its active version (else
    /// the operator decides). Returns `Some(previous active)` on a promote.
    pub fn compared(
        &mut self,
        candidate: &ViewId,
        against: &ViewId,
        outcome: Result<DiffReport, String>,
        promote_if_identical: bool,
        now: u64,
    ) -> Option<Option<ViewId>> {
        let entry = self.entries.get_mut(candidate)?;
        let still_pending = entry
            .cutover_check
            .as_ref()
            .is_some_and(|c| c.result == CheckResult::Pending && c.against == against.to_string());
        if !still_pending {
            return None;
        }
        let check = CutoverCheck::done(against, &outcome, now);
        let identical = check.result == CheckResult::Identical;
        entry.cutover_check = Some(check);
        let position = outcome.as_ref().map_or(0, |r| r.position);
        let name = candidate.name().to_string();
        let go = promote_if_identical
            && identical
            && entry.state == ViewState::Ready
            && self.active(&name).is_some_and(|a| &a.id == against)
            && self.cutover_candidate(&name).as_ref() == Some(candidate);
        if !go {
            return None;
        }
        let how =
            format!("auto-if-identical cutover: identical to {against} at position {position}");
        self.promote(candidate, now, &how).ok()
    }

    /// The fleet decided that `target` is its name's active version: the
    /// same flip as a promote when `target` is caught up here (ready, or a
    /// standby, on a live view); else nothing changes and the caller keeps
    /// the name fenced until `target` catches up here
    /// ([`Follow::NotLive`]) or is deployed here ([`Follow::Unknown`]).
    /// Following is idempotent: the active version again is [`Follow::Already`].
    pub fn follow_fleet(&mut self, target: &ViewId, now: u64, how: &str) -> Follow {
        let Some(e) = self.entries.get(target) else {
            return Follow::Unknown;
        };
        if e.state == ViewState::Active {
            return Follow::Already;
        }
        let state = e.state;
        match self.promote(target, now, how) {
            Ok(previous) => Follow::Flipped(previous),
            Err(_) => Follow::NotLive(state),
        }
    }

    /// The standby a rollback of `name` promotes: the most recent one whose
    /// view is live.
    pub fn rollback_target(&self, name: &str) -> Option<ViewId> {
        self.of_name(name)
            .filter(|e| {
                e.state == ViewState::Standby && self.physical_state(e.physical()) == Physical::Live
            })
            .max_by_key(|e| (e.standby_since.unwrap_or(0), e.id.clone()))
            .map(|e| e.id.clone())
    }

    /// Retires `id` (an operator's decision, a removed module file, or the
    /// grace sweep). The active version only when `active_too` (an operator
    /// taking the name down); the daemon on its own (a removed file) never
    /// retires it. Returns the physical view nothing reads any more (its
    /// worker stops and its column family is dropped), if any.
    pub fn retire(
        &mut self,
        id: &ViewId,
        now: u64,
        active_too: bool,
    ) -> Result<Option<ViewId>, LifecycleError> {
        let Some(e) = self.entries.get_mut(id) else {
            return Err(LifecycleError::UnknownView {
                spec: id.to_string(),
            });
        };
        if e.state == ViewState::Retired {
            return Ok(None);
        }
        // What the name serves (active, or failed and serving stale) goes
        // only when an operator says so.
        if (e.state == ViewState::Active || e.serving_stale) && !active_too {
            return Err(LifecycleError::RetireActive { id: id.clone() });
        }
        e.state = ViewState::Retired;
        e.retired_at = Some(now);
        e.standby_since = None;
        e.serving_stale = false;
        let physical = e.physical().clone();
        Ok((!self.needs_physical(&physical)).then_some(physical))
    }

    /// Standbys whose grace period is over at `now`, of names whose active
    /// version is healthy (a standby is kept while it may be needed).
    pub fn expired_standbys(&self, now: u64, grace_ms: impl Fn(&str) -> u64) -> Vec<ViewId> {
        self.entries
            .values()
            .filter(|e| self.standby_expired(e, now, grace_ms(e.id.name())))
            .map(|e| e.id.clone())
            .collect()
    }

    /// Is `e` a standby past its grace whose name has a healthy active version?
    pub fn standby_expired(&self, e: &Entry, now: u64, grace_ms: u64) -> bool {
        e.state == ViewState::Standby
            && e.standby_since
                .is_some_and(|since| now >= since.saturating_add(grace_ms))
            && self
                .active(e.id.name())
                .is_some_and(|a| self.physical_state(a.physical()) == Physical::Live)
    }

    /// The version the bare name `name` serves: the active one, or a failed
    /// one still serving its documents (stale).
    pub fn serving<'a>(&'a self, name: &'a str) -> Option<&'a Entry> {
        self.active(name)
            .or_else(|| self.of_name(name).find(|e| e.serving_stale))
    }
}

fn state_as_physical(s: ViewState) -> Physical {
    match s {
        ViewState::Warming => Physical::Warming,
        ViewState::Ready | ViewState::Active | ViewState::Standby => Physical::Live,
        ViewState::Failed => Physical::Failed,
        ViewState::Retired => Physical::Gone,
    }
}

#[cfg(test)]
mod tests {
    //! Generated sequences of operations through the pure transitions, each
    //! step checked against the invariants (the real, effectful lifecycle is
    //! model-tested in `tests/tests/lifecycle_model.rs`).

    use std::collections::{BTreeSet, HashSet};
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 2] = ["users", "orders"];
    const VERSIONS: [&str; 4] = ["1.0.0", "1.1.0", "1.2.0", "2.0.0"];

    #[derive(Clone, Debug)]
    enum Op {
        /// Deploy name × version with logic `logic` (0..3).
        Deploy(usize, usize, u8, bool),
        CaughtUp(usize),
        Fail(usize),
        Promote(usize, usize),
        Rollback(usize),
        Retire(usize, usize, bool),
        Resume(usize),
        Sweep,
        /// A pending cutover check ends: 0 identical, 1 different, 2 error.
        Compared(usize, u8),
        /// The fleet's decision for name × version arrives (names under
        /// `cutover = "fleet"` only).
        FleetDecides(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, 0..4usize, 0..3u8, any::<bool>()).prop_map(|(n, v, l, w)| Op::Deploy(n, v, l, w)),
            4 => (0..8usize).prop_map(Op::CaughtUp),
            1 => (0..8usize).prop_map(Op::Fail),
            2 => (0..2usize, 0..4usize).prop_map(|(n, v)| Op::Promote(n, v)),
            2 => (0..2usize).prop_map(Op::Rollback),
            2 => (0..2usize, 0..4usize, any::<bool>()).prop_map(|(n, v, a)| Op::Retire(n, v, a)),
            1 => (0..8usize).prop_map(Op::Resume),
            2 => Just(Op::Sweep),
            3 => (0..4usize, 0..3u8).prop_map(|(i, r)| Op::Compared(i, r)),
            3 => (0..2usize, 0..4usize).prop_map(|(n, v)| Op::FleetDecides(n, v)),
        ]
    }

    fn id(n: usize, v: usize) -> ViewId {
        ViewId::from_parts(NAMES[n], VERSIONS[v]).expect("id")
    }

    /// The effects' side: which physical views have a worker.
    struct World {
        reg: Registry,
        workers: HashSet<ViewId>,
        now: u64,
        /// Versions retired by an operator: the watcher never brings them back.
        operator_retired: BTreeSet<ViewId>,
        /// The cutover policy of `orders` (`users` is `auto`).
        orders: CutoverPolicy,
        /// Comparisons asked for and not over: candidate, against, promote.
        pending: Vec<(ViewId, ViewId, bool)>,
    }

    impl World {
        fn run(&mut self, op: &Op) {
            self.now += 1000;
            let now = self.now;
            match *op {
                Op::Deploy(n, v, logic, watch) => {
                    let nv = NewVersion {
                        id: id(n, v),
                        fingerprint: format!("{}-{logic}", NAMES[n]),
                        content_hash: format!("{}-{logic}-{v}", NAMES[n]),
                        source: "file".into(),
                        now,
                    };
                    let origin = if watch {
                        Origin::Watch
                    } else {
                        Origin::Explicit
                    };
                    let was_retired = self
                        .reg
                        .entries
                        .get(&nv.id)
                        .is_some_and(|e| e.state == ViewState::Retired);
                    let workers = self.workers.clone();
                    if let Ok(DeployPlan::Registered { start_worker, .. }) =
                        self.reg.deploy(nv, origin, |p| workers.contains(p))
                    {
                        assert!(
                            !(watch && was_retired),
                            "the watcher brought back a retired version"
                        );
                        if start_worker {
                            self.workers.insert(id(n, v));
                        }
                        self.operator_retired.remove(&id(n, v));
                        self.cutover(NAMES[n]);
                    }
                }
                Op::CaughtUp(i) => {
                    let Some(p) = self.nth_worker(i) else { return };
                    if self.reg.physical_state(&p) != Physical::Warming {
                        return;
                    }
                    for name in self.reg.caught_up(&p, now) {
                        self.cutover(&name);
                    }
                }
                Op::Fail(i) => {
                    let Some(p) = self.nth_worker(i) else { return };
                    // Standbys on another live view survive the failure.
                    let had_standby: Vec<(String, bool)> = NAMES
                        .iter()
                        .map(|n| {
                            let healthy = self.reg.of_name(n).any(|e| {
                                e.state == ViewState::Standby
                                    && e.physical() != &p
                                    && self.reg.physical_state(e.physical()) == Physical::Live
                            });
                            (n.to_string(), healthy)
                        })
                        .collect();
                    self.workers.remove(&p);
                    let fallbacks = self.reg.failed(&p, Some(7), "boom", now);
                    for fb in &fallbacks {
                        let standby = had_standby.iter().any(|(n, s)| n == fb.failed.name() && *s);
                        // I2: a healthy standby takes over; else stale serving.
                        assert_eq!(fb.to.is_some(), standby, "{fb:?}");
                        let serving = self.reg.serving(fb.failed.name()).expect("still served");
                        match &fb.to {
                            Some(to) => assert_eq!(&serving.id, to),
                            None => assert!(serving.serving_stale && serving.id == fb.failed),
                        }
                    }
                }
                Op::Promote(n, v) => {
                    let _ = self.reg.promote(&id(n, v), now, "promote");
                }
                Op::Rollback(n) => {
                    if let Some(t) = self.reg.rollback_target(NAMES[n]) {
                        self.reg
                            .promote(&t, now, "rollback")
                            .expect("a rollback target promotes");
                    }
                }
                Op::Retire(n, v, active_too) => {
                    let was_active = self
                        .reg
                        .entries
                        .get(&id(n, v))
                        .is_some_and(|e| e.state == ViewState::Active || e.serving_stale);
                    let got = self.reg.retire(&id(n, v), now, active_too);
                    if was_active && !active_too {
                        assert!(got.is_err(), "the daemon retired an active version");
                    }
                    if let Ok(Some(p)) = got {
                        self.workers.remove(&p);
                    }
                    if self
                        .reg
                        .entries
                        .get(&id(n, v))
                        .is_some_and(|e| e.state == ViewState::Retired)
                    {
                        self.operator_retired.insert(id(n, v));
                    }
                }
                Op::Resume(i) => {
                    // Any physical view, failed or not (refused unless failed).
                    let mut all: Vec<ViewId> = self
                        .reg
                        .entries
                        .values()
                        .map(|e| e.physical().clone())
                        .collect();
                    all.sort();
                    all.dedup();
                    if all.is_empty() {
                        return;
                    }
                    let p = all[i % all.len()].clone();
                    let failed = self.reg.physical_state(&p) == Physical::Failed;
                    match self.reg.resume(&p) {
                        Ok(()) => {
                            assert!(failed);
                            self.workers.insert(p);
                        }
                        Err(_) => assert!(!failed),
                    }
                }
                Op::Compared(i, result) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let (candidate, against, promote) = self.pending.remove(i % self.pending.len());
                    let name = candidate.name().to_string();
                    let eligible = self.reg.entries.get(&candidate).is_some_and(|e| {
                        e.state == ViewState::Ready
                            && e.cutover_check.as_ref().is_some_and(|c| {
                                c.result == CheckResult::Pending && c.against == against.to_string()
                            })
                    }) && self.reg.active(&name).is_some_and(|a| a.id == against)
                        && self.reg.cutover_candidate(&name).as_ref() == Some(&candidate);
                    let outcome = match result {
                        0 => Ok(DiffReport::default()),
                        1 => Ok(DiffReport {
                            changed: 1,
                            ..DiffReport::default()
                        }),
                        _ => Err("could not meet".to_string()),
                    };
                    let was_active = self.reg.active(&name).map(|a| a.id.clone());
                    let got = self
                        .reg
                        .compared(&candidate, &against, outcome, promote, now);
                    // Promoted exactly when allowed, identical and still current.
                    assert_eq!(
                        got.is_some(),
                        promote && result == 0 && eligible,
                        "{candidate} vs {against}: result {result}, promote {promote}, eligible {eligible}"
                    );
                    if got.is_some() {
                        assert_eq!(
                            self.reg.active(&name).map(|a| a.id.clone()),
                            Some(candidate)
                        );
                    } else {
                        assert_eq!(self.reg.active(&name).map(|a| a.id.clone()), was_active);
                    }
                }
                Op::FleetDecides(n, v) => {
                    if self.policy(NAMES[n]) != CutoverPolicy::Fleet {
                        return;
                    }
                    let target = id(n, v);
                    let before = self.reg.serving(NAMES[n]).map(|e| e.id.clone());
                    let servable = self.reg.entries.get(&target).is_some_and(|e| {
                        matches!(
                            e.state,
                            ViewState::Ready | ViewState::Standby | ViewState::Active
                        ) && self.reg.physical_state(e.physical()) == Physical::Live
                    });
                    let got = self.reg.follow_fleet(&target, now, "fleet");
                    let after = self.reg.serving(NAMES[n]).map(|e| e.id.clone());
                    match got {
                        // The fleet's version serves exactly when it is
                        // caught up here; else nothing moved.
                        Follow::Already | Follow::Flipped(_) => {
                            assert!(servable, "followed onto a version that cannot serve");
                            assert_eq!(after, Some(target));
                        }
                        Follow::NotLive(_) | Follow::Unknown => {
                            assert!(!servable, "{target} could serve but was not followed");
                            assert_eq!(after, before, "a refused follow changed the name");
                        }
                    }
                    if let Follow::Flipped(Some(prev)) = got {
                        assert_eq!(self.reg.entries[&prev].state, ViewState::Standby);
                    }
                }
                Op::Sweep => {
                    for sid in self.reg.expired_standbys(now, |_| 2500) {
                        let e = &self.reg.entries[&sid];
                        assert!(self.reg.standby_expired(e, now, 2500));
                        if let Ok(Some(p)) = self.reg.retire(&sid, now, false) {
                            self.workers.remove(&p);
                        }
                    }
                }
            }
        }

        fn policy(&self, name: &str) -> CutoverPolicy {
            if name == "orders" {
                self.orders
            } else {
                CutoverPolicy::Auto
            }
        }

        fn cutover(&mut self, name: &str) {
            let policy = self.policy(name);
            let live_active = self
                .reg
                .active(name)
                .filter(|a| self.reg.physical_state(a.physical()) == Physical::Live)
                .map(|a| (a.id.clone(), a.physical().clone()));
            let plan = self.reg.cutover_plan(name, policy, self.now);
            if policy == CutoverPolicy::Fleet {
                // Only the fleet's decision flips a fleet name.
                assert_eq!(plan, None, "a fleet name planned a local cutover");
            }
            match plan {
                Some(Cutover::Promote(c)) => {
                    // Never over a live active version on another view,
                    // unless the policy is plain auto.
                    let physical = self.reg.entries[&c].physical().clone();
                    assert!(
                        policy == CutoverPolicy::Auto
                            || (policy == CutoverPolicy::AutoIfIdentical
                                && live_active.as_ref().is_none_or(|(_, p)| *p == physical)),
                        "{policy:?} promoted {c} over {live_active:?}"
                    );
                    self.reg
                        .promote(&c, self.now, "auto cutover")
                        .expect("a candidate promotes");
                }
                Some(Cutover::Compare {
                    candidate,
                    against,
                    promote_if_identical,
                }) => {
                    assert_ne!(policy, CutoverPolicy::Auto);
                    assert_eq!(
                        promote_if_identical,
                        policy == CutoverPolicy::AutoIfIdentical
                    );
                    assert_eq!(live_active.map(|(id, _)| id), Some(against.clone()));
                    self.pending
                        .push((candidate, against, promote_if_identical));
                }
                None => {}
            }
        }

        fn nth_worker(&self, i: usize) -> Option<ViewId> {
            let mut w: Vec<&ViewId> = self.workers.iter().collect();
            w.sort();
            (!w.is_empty()).then(|| w[i % w.len()].clone())
        }

        fn check(&self) {
            for name in NAMES {
                let active: Vec<&Entry> = self
                    .reg
                    .of_name(name)
                    .filter(|e| e.state == ViewState::Active)
                    .collect();
                assert!(active.len() <= 1, "two active versions of {name}");
                let stale = self.reg.of_name(name).filter(|e| e.serving_stale).count();
                assert!(
                    stale <= 1 && (stale == 0 || active.is_empty()),
                    "stale and active"
                );
                if let Some(e) = self.reg.serving(name) {
                    // I1: never a half-built view.
                    let p = self.reg.physical_state(e.physical());
                    if e.serving_stale {
                        // Failed, or resumed and warming back to its name.
                        assert!(
                            matches!(
                                (e.state, p),
                                (ViewState::Failed, Physical::Failed)
                                    | (ViewState::Warming, Physical::Warming)
                            ),
                            "stale {} is {} over a {p:?} view",
                            e.id,
                            e.state
                        );
                    } else {
                        assert_eq!(p, Physical::Live, "{} serves a {p:?} view", e.id);
                        assert!(self.workers.contains(e.physical()));
                    }
                }
            }
            for e in self.reg.entries.values() {
                let p = self.reg.physical_state(e.physical());
                // An alias is never more ready than the view behind it.
                if matches!(
                    e.state,
                    ViewState::Ready | ViewState::Active | ViewState::Standby
                ) {
                    assert_eq!(
                        p,
                        Physical::Live,
                        "{} is {} over a {p:?} view",
                        e.id,
                        e.state
                    );
                }
                if e.state == ViewState::Warming {
                    assert_eq!(p, Physical::Warming, "{} warming over a {p:?} view", e.id);
                }
                // Nothing read is released; nothing running is unread.
                if e.state != ViewState::Retired && p != Physical::Failed {
                    assert!(
                        self.workers.contains(e.physical()),
                        "{} lost its worker",
                        e.id
                    );
                }
                assert_ne!(e.alias_of.as_ref(), Some(&e.id), "alias of itself");
                if let Some(of) = &e.alias_of
                    && e.state != ViewState::Retired
                {
                    let o = self.reg.entries.get(of);
                    assert!(
                        o.is_some_and(|o| o.alias_of.is_none()),
                        "{} reads {of}: {o:?}",
                        e.id
                    );
                }
                if self.operator_retired.contains(&e.id) {
                    assert_eq!(e.state, ViewState::Retired, "{} came back", e.id);
                }
                // A version a check promoted was found identical, while it
                // holds the role that check gave it (a version that warms
                // again after a failure is checked anew; `activated_by` is
                // how it *last* became active).
                if matches!(e.state, ViewState::Active | ViewState::Standby)
                    && e.activated_by
                        .as_deref()
                        .is_some_and(|how| how.starts_with("auto-if-identical cutover: identical"))
                {
                    assert_eq!(
                        e.cutover_check.as_ref().map(|c| c.result),
                        Some(CheckResult::Identical),
                        "{} promoted by a check that did not find it identical",
                        e.id
                    );
                }
            }
            for w in &self.workers {
                assert!(self.reg.needs_physical(w), "worker of unread {w}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn every_sequence_keeps_the_lifecycle_invariants(
            ops in proptest::collection::vec(op(), 1..60),
            orders in prop_oneof![
                Just(CutoverPolicy::Auto),
                Just(CutoverPolicy::Manual),
                Just(CutoverPolicy::AutoIfIdentical),
                Just(CutoverPolicy::Fleet),
            ],
        ) {
            let mut w = World {
                orders,
                ..world()
            };
            for op in &ops {
                w.run(op);
                w.check();
            }
        }
    }

    /// Found by CI's proptest run (shrunk): under `auto-if-identical`, a
    /// check found 2.0.0 identical and promoted it; 2.0.0 then failed with
    /// no healthy standby (served stale), was resumed, and 1.1.0 took the
    /// name while it warmed. Caught up again, 2.0.0 is ready with a new
    /// check against 1.1.0 pending: not active, and its old `activated_by`
    /// is history (the model's invariant had read it as a current claim).
    #[test]
    fn a_resumed_version_is_not_promoted_on_an_old_identical_check() {
        use Op::*;
        let mut w = World {
            orders: CutoverPolicy::AutoIfIdentical,
            ..world()
        };
        for op in [
            Deploy(1, 0, 2, false),
            Deploy(1, 3, 0, false),
            CaughtUp(0),
            CaughtUp(5),
            Compared(0, 0),
            Deploy(0, 0, 0, false),
            Fail(0),
            Fail(0),
            Fail(0),
            Deploy(1, 1, 0, false),
            Deploy(0, 1, 0, false),
            Fail(1),
            Resume(7),
            CaughtUp(2),
            CaughtUp(5),
        ] {
            w.run(&op);
            w.check();
        }
        // 2.0.0 is ready again with a new check pending; what made it
        // active once is history, not a claim about this build.
        let e = &w.reg.entries[&id(1, 3)];
        assert_eq!(e.state, ViewState::Ready);
        assert_eq!(
            e.cutover_check.as_ref().map(|c| c.result),
            Some(CheckResult::Pending)
        );
        assert_eq!(w.pending, vec![(id(1, 3), id(1, 1), true)]);
    }

    fn world() -> World {
        World {
            reg: Registry::empty(Path::new("unused.json")),
            workers: HashSet::new(),
            now: 1,
            operator_retired: BTreeSet::new(),
            orders: CutoverPolicy::Auto,
            pending: Vec::new(),
        }
    }

    #[test]
    fn an_alias_of_a_warming_view_warms_with_it() {
        let mut w = world();
        w.run(&Op::Deploy(0, 0, 0, false));
        w.run(&Op::CaughtUp(0));
        w.run(&Op::Deploy(0, 1, 1, false)); // new logic: warming
        w.run(&Op::Deploy(0, 2, 1, false)); // same logic as 1.1.0
        assert_eq!(w.reg.entries[&id(0, 2)].state, ViewState::Warming);
        assert_eq!(w.reg.serving("users").map(|e| e.id.clone()), Some(id(0, 0)));
        let p = id(0, 1);
        w.reg.caught_up(&p, 10);
        assert_eq!(w.reg.entries[&id(0, 2)].state, ViewState::Ready);
    }

    /// `auto-if-identical`: the first version of a name is promoted like
    /// `auto`; a later one is compared with the active version, promoted
    /// when identical, left ready (with the diff) when not.
    #[test]
    fn auto_if_identical_promotes_on_identical_and_waits_on_different() {
        let mut w = World {
            orders: CutoverPolicy::AutoIfIdentical,
            ..world()
        };
        w.run(&Op::Deploy(1, 0, 0, false));
        w.run(&Op::CaughtUp(0));
        assert_eq!(
            w.reg.serving("orders").unwrap().id,
            id(1, 0),
            "first deploy"
        );
        w.run(&Op::Deploy(1, 1, 1, false));
        w.run(&Op::CaughtUp(1));
        assert_eq!(w.reg.entries[&id(1, 1)].state, ViewState::Ready);
        assert_eq!(w.pending, vec![(id(1, 1), id(1, 0), true)]);
        w.run(&Op::Compared(0, 1));
        let e = &w.reg.entries[&id(1, 1)];
        assert_eq!(e.state, ViewState::Ready, "different: waits");
        assert_eq!(
            e.cutover_check.as_ref().unwrap().result,
            CheckResult::Different
        );
        w.run(&Op::Deploy(1, 2, 2, false));
        w.run(&Op::CaughtUp(2));
        w.run(&Op::Compared(0, 0));
        assert_eq!(
            w.reg.serving("orders").unwrap().id,
            id(1, 2),
            "identical: promoted"
        );
        assert_eq!(w.reg.entries[&id(1, 0)].state, ViewState::Standby);
        w.check();
    }

    #[test]
    fn a_failed_active_falls_back_to_its_standby_or_serves_stale() {
        let mut w = world();
        w.run(&Op::Deploy(0, 0, 0, false));
        w.run(&Op::CaughtUp(0));
        w.run(&Op::Deploy(0, 1, 1, false));
        w.run(&Op::CaughtUp(1));
        assert_eq!(w.reg.serving("users").unwrap().id, id(0, 1));
        let fb = w.reg.failed(&id(0, 1), Some(3), "poison", 99);
        assert_eq!(fb[0].to, Some(id(0, 0)));
        assert_eq!(w.reg.serving("users").unwrap().id, id(0, 0));
        let fb = w.reg.failed(&id(0, 0), Some(4), "poison", 100);
        assert_eq!(fb[0].to, None);
        let s = w.reg.serving("users").unwrap();
        assert!(s.serving_stale && s.id == id(0, 0));
        // No healthy active: the sweep keeps everything.
        assert!(w.reg.expired_standbys(u64::MAX, |_| 0).is_empty());
    }
}

#[cfg(test)]
mod fleet_tests {
    use std::path::Path;

    use super::*;

    fn id(s: &str) -> ViewId {
        s.parse().expect("id")
    }

    fn deploy(reg: &mut Registry, v: &str, logic: &str) {
        let nv = NewVersion {
            id: id(v),
            fingerprint: logic.into(),
            content_hash: format!("{logic}-{v}"),
            source: "file".into(),
            now: 1,
        };
        reg.deploy(nv, Origin::Explicit, |_| true).expect("deploy");
    }

    /// Under `cutover = "fleet"` a ready version waits for the fleet; the
    /// fleet's decision flips it like a promote, a rollback decision flips
    /// back to the standby, and a decision for a version still warming here
    /// changes nothing (the name stays fenced by the caller).
    #[test]
    fn a_fleet_name_flips_only_on_the_fleets_decision() {
        let mut reg = Registry::empty(Path::new("unused.json"));
        deploy(&mut reg, "users-1_0_0", "a");
        reg.caught_up(&id("users-1_0_0"), 2);
        assert_eq!(reg.cutover_plan("users", CutoverPolicy::Fleet, 3), None);
        assert!(reg.serving("users").is_none(), "no local cutover");
        assert_eq!(
            reg.follow_fleet(&id("users-1_0_0"), 4, "fleet"),
            Follow::Flipped(None)
        );
        deploy(&mut reg, "users-1_1_0", "b");
        assert_eq!(
            reg.follow_fleet(&id("users-1_1_0"), 5, "fleet"),
            Follow::NotLive(ViewState::Warming)
        );
        assert_eq!(
            reg.serving("users").map(|e| e.id.clone()),
            Some(id("users-1_0_0"))
        );
        reg.caught_up(&id("users-1_1_0"), 6);
        assert_eq!(reg.cutover_plan("users", CutoverPolicy::Fleet, 7), None);
        assert_eq!(
            reg.follow_fleet(&id("users-1_1_0"), 8, "fleet"),
            Follow::Flipped(Some(id("users-1_0_0")))
        );
        assert_eq!(
            reg.follow_fleet(&id("users-1_1_0"), 9, "fleet"),
            Follow::Already
        );
        // Rolled back by the fleet: the standby is active again.
        assert_eq!(
            reg.follow_fleet(&id("users-1_0_0"), 10, "fleet rollback"),
            Follow::Flipped(Some(id("users-1_1_0")))
        );
        assert_eq!(
            reg.follow_fleet(&id("users-2_0_0"), 11, "fleet"),
            Follow::Unknown
        );
        assert_eq!(
            reg.serving("users").map(|e| e.id.clone()),
            Some(id("users-1_0_0"))
        );
    }
}
