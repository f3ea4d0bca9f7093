//! What the fleet's KV buckets hold, and the pure decisions taken from them:
//! a member's record (its versions, what its fleet names serve, its digests),
//! a view name's decision, the next step of a name's cutover ([`drive`]), and
//! the fleet's status with the digests that disagree ([`FleetStatus::new`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::lifecycle::{FleetServing, ViewState};
use crate::views::ViewId;

/// The record format this kiln writes. 2: `views` lists retired versions
/// too. A format-1 record (an older kiln's, without the field) leaves them
/// out: a version absent there may be retired or never deployed, and is
/// taken as not deployed (not caught up, never counted ready).
pub const RECORD_FORMAT: u32 = 2;

fn record_format_1() -> u32 {
    1
}

/// One member's record: the value of its key (its instance id) in the
/// members bucket, rewritten every heartbeat; the bucket's `max_age` drops
/// it when the heartbeats stop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// [`RECORD_FORMAT`] of the kiln that wrote it.
    #[serde(default = "record_format_1")]
    pub format: u32,
    pub instance: String,
    /// The process that wrote it (a uuid per start; empty from older kilns).
    #[serde(default)]
    pub incarnation: String,
    /// Its HTTP API address, as it listens.
    #[serde(default)]
    pub api: String,
    /// When it started and last wrote this record (ms since the epoch, its clock).
    pub started_at: u64,
    pub heartbeat_at: u64,
    /// The log head it has seen.
    pub head: u64,
    /// Every version it has, retired ones included (format 2).
    pub views: Vec<MemberView>,
    /// What its fleet names (`cutover = "fleet"`) answer.
    #[serde(default)]
    pub serving: BTreeMap<String, FleetServing>,
    /// Its latest digests, per physical view, at multiples of `digest_every`.
    #[serde(default)]
    pub digests: Vec<DigestAt>,
}

/// One version on a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    pub state: ViewState,
    pub checkpoint: u64,
    pub lag: u64,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
}

/// A view's digest at a common position, as a member published it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestAt {
    /// The physical view.
    pub view: String,
    /// Its module fingerprint: only equal fingerprints must agree.
    pub fingerprint: String,
    pub position: u64,
    pub documents: u64,
    pub bytes: u64,
    pub digest: String,
    /// How long the view was held while the digest read it, in ms.
    pub took_ms: u64,
    /// The instance whose replay built the view's documents, when the view
    /// was filled from its snapshot (absent: replayed by this member). One
    /// lineage is one witness in the vote, however many members share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_by: Option<String>,
}

/// A view name's decision: the value of its key (the name) in the
/// decisions bucket, changed only by compare-and-set on its revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The version the fleet serves.
    pub active: Option<String>,
    /// The version the fleet is switching to: every member fences the name
    /// (answers 503) until all live members did, then `active` becomes it.
    #[serde(default)]
    pub next: Option<String>,
    /// Which member wrote it, why, when (ms since the epoch).
    pub by: String,
    pub reason: String,
    pub at: u64,
    /// Versions an operator rolled the fleet back from: never proposed
    /// again on their own (a member that joins later, or every member
    /// replaced, may have them ready), only by an explicit promote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_back: Vec<String>,
    /// The module fingerprint the fleet runs `next` (while switching) or
    /// `active` under: a member with another module under that version id
    /// never answers it (absent in decisions of older kilns: ids only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl Decision {
    /// The decision an operator's promote (`rollback: false`) or rollback
    /// of `target` proposes over `current`: a rollback, or a promote to an
    /// older version, holds back the version it leaves; either releases
    /// `target`.
    pub fn proposed(
        current: Option<&Decision>,
        (target, fingerprint): (&str, Option<String>),
        rollback: bool,
        by: &str,
        reason: String,
        at: u64,
    ) -> Decision {
        let active = current.and_then(|c| c.active.clone());
        let mut held_back: Vec<String> = current.map(|c| c.held_back.clone()).unwrap_or_default();
        // A rollback during a switch leaves the version switched to.
        if rollback
            && let Some(next) = current.and_then(|c| c.next.as_ref())
            && next != target
            && !held_back.contains(next)
        {
            held_back.push(next.clone());
        }
        // A promote to an older version than the active one is a rollback
        // by another name: what it leaves is held back too (else a member
        // with it ready, on a fresh disk, would have it proposed again).
        let older = |a: &str, b: &str| match (a.parse::<ViewId>(), b.parse::<ViewId>()) {
            (Ok(a), Ok(b)) => a < b,
            _ => false,
        };
        if let Some(left) = &active
            && (rollback || older(target, left))
            && left != target
            && !held_back.contains(left)
        {
            held_back.push(left.clone());
        }
        held_back.retain(|h| h != target);
        Decision {
            active,
            next: Some(target.to_string()),
            by: by.to_string(),
            reason,
            at,
            held_back,
            fingerprint,
        }
    }
}

/// A decision with its KV revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revised {
    pub revision: u64,
    #[serde(flatten)]
    pub decision: Decision,
}

/// The next write to a name's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the key (it must not exist yet).
    Create(Decision),
    /// Replace the decision at this revision.
    Update(u64, Decision),
}

/// How many live members with versions of a name must agree: `quorum`, or
/// all of them when `quorum` is 0 (never more than there are).
pub fn needed(quorum: usize, members: usize) -> usize {
    match quorum {
        0 => members,
        q => q.min(members),
    }
}

/// The next step of `name`'s cutover, from its decision and the live
/// members' records (`me` writes it):
/// - switching to `next`, and every live member has fenced the name at this
///   revision (or moved past it): `next` becomes `active`;
/// - a member's record cannot be read (`unreadable`): nothing;
/// - not switching: the newest version **ready** on the needed number of
///   members (`quorum`), newer than `active`, is proposed as `next` (when
///   there is no decision yet, an active version counts as ready: a fleet
///   adopting what its members already serve). A standby is never
///   proposed on its own, so a rollback sticks.
pub fn drive(
    name: &str,
    current: Option<&Revised>,
    members: &[Member],
    unreadable: &[String],
    quorum: usize,
    me: &str,
    now: u64,
) -> Option<Step> {
    // A member whose record cannot be read may answer anything: neither
    // begin a switch (it would fence the name everywhere) nor end one.
    if !unreadable.is_empty() {
        return None;
    }
    let with_name: Vec<&Member> = members.iter().filter(|m| follows(m, name)).collect();
    if let Some(Revised {
        revision,
        decision: d,
    }) = current
        && let Some(next) = &d.next
    {
        // Retired on a member meanwhile (its retire and the promote crossed):
        // it would never answer there. The switch is called off, and the
        // version held back until an operator promotes it again.
        let retired = next
            .parse::<ViewId>()
            .map(|n| retired_on(&n, members))
            .unwrap_or_default();
        if !retired.is_empty() {
            let mut held_back = d.held_back.clone();
            held_back.retain(|h| Some(h) != d.active.as_ref());
            if !held_back.contains(next) {
                held_back.push(next.clone());
            }
            let fingerprint = d
                .active
                .as_deref()
                .and_then(|a| a.parse::<ViewId>().ok())
                .map(|a| logic_of(&a, members))
                .filter(|l| l.len() == 1)
                .and_then(|l| l.into_keys().next());
            return Some(Step::Update(
                *revision,
                Decision {
                    active: d.active.clone(),
                    next: None,
                    by: me.to_string(),
                    reason: format!(
                        "switch to {next} called off: it is retired on {} (deploy it there again, then promote it)",
                        retired.join(", ")
                    ),
                    at: now,
                    held_back,
                    fingerprint,
                },
            ));
        }
        if !with_name.iter().all(|m| has_fenced(m, name, *revision)) {
            return None;
        }
        return Some(Step::Update(
            *revision,
            Decision {
                active: Some(next.clone()),
                next: None,
                by: me.to_string(),
                reason: format!(
                    "switched to {next}: {} live member(s) stopped answering the previous version",
                    with_name.len()
                ),
                at: now,
                held_back: d.held_back.clone(),
                fingerprint: d.fingerprint.clone(),
            },
        ));
    }
    if with_name.is_empty() {
        return None;
    }
    let need = needed(quorum, with_name.len());
    let counts_as_ready =
        |s: ViewState| s == ViewState::Ready || (current.is_none() && s == ViewState::Active);
    let mut ready: BTreeMap<ViewId, usize> = BTreeMap::new();
    for m in &with_name {
        let mine: BTreeSet<ViewId> = m
            .views
            .iter()
            .filter(|v| counts_as_ready(v.state))
            .filter_map(|v| v.id.parse::<ViewId>().ok())
            .filter(|id| id.name() == name)
            .collect();
        for id in mine {
            *ready.entry(id).or_default() += 1;
        }
    }
    let active: Option<ViewId> = current
        .and_then(|c| c.decision.active.as_deref())
        .and_then(|a| a.parse().ok());
    let held_back: &[String] = current.map_or(&[], |c| &c.decision.held_back);
    let (candidate, n) = ready
        .into_iter()
        .filter(|(id, n)| *n >= need && active.as_ref().is_none_or(|a| id > a))
        // Held back, or older than a version held back: after a rollback
        // from 1.2.0 to 1.0.0, a 1.1.0 deployed meanwhile is no more wanted
        // than 1.2.0 (found by the fleet model test: it was proposed at once,
        // overturning the rollback). Only a newer version, or a promote.
        .filter(|(id, _)| {
            held_back
                .iter()
                .filter_map(|h| h.parse::<ViewId>().ok())
                .all(|h| *id > h)
        })
        .filter(|(id, _)| retired_on(id, members).is_empty())
        // One version id, one logic: never proposed while members run
        // different modules under it.
        .filter(|(id, _)| logic_of(id, members).len() == 1)
        .max_by(|a, b| a.0.cmp(&b.0))?;
    let fingerprint = logic_of(&candidate, members).into_keys().next();
    let decision = Decision {
        active: active.map(|a| a.to_string()),
        next: Some(candidate.to_string()),
        by: me.to_string(),
        reason: format!(
            "auto: {candidate} ready on {n} of {} live member(s)",
            with_name.len()
        ),
        at: now,
        held_back: held_back.to_vec(),
        fingerprint,
    };
    Some(match current {
        None => Step::Create(decision),
        Some(c) => Step::Update(c.revision, decision),
    })
}

/// The module fingerprints members run `target` under (retired copies
/// aside), each with the members running it: one entry when they agree.
pub fn logic_of(target: &ViewId, members: &[Member]) -> BTreeMap<String, Vec<String>> {
    let id = target.to_string();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in members {
        for v in m
            .views
            .iter()
            .filter(|v| v.id == id && v.state != ViewState::Retired)
        {
            out.entry(v.fingerprint.clone())
                .or_default()
                .push(m.instance.clone());
        }
    }
    out
}

/// `logic_of` as a refusal's words: "a, b run v3:ab12…; c runs v3:cd34…".
pub fn logic_words(logic: &BTreeMap<String, Vec<String>>) -> String {
    logic
        .iter()
        .map(|(fp, ms)| {
            let short: String = fp.chars().take(16).collect();
            format!("{} run(s) {short}…", ms.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The members on which `target` is caught up (ready, active or standby),
/// and those on which it is not (with its state there), among the members
/// taking part in its name's cutover.
pub fn readiness(target: &ViewId, members: &[Member]) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut not) = (Vec::new(), Vec::new());
    let name = target.name();
    for m in members.iter().filter(|m| follows(m, name)) {
        let state = m
            .views
            .iter()
            .find(|v| v.id == target.to_string())
            .map(|v| v.state);
        match state {
            Some(ViewState::Ready | ViewState::Active | ViewState::Standby) => {
                ok.push(m.instance.clone())
            }
            Some(s) => not.push(format!("{} ({s})", m.instance)),
            None => not.push(format!("{} (not deployed)", m.instance)),
        }
    }
    (ok, not)
}

/// Has member `m` stopped answering `name`'s previous version for the
/// switch decided at `revision` (fenced it, or moved past that decision)?
fn has_fenced(m: &Member, name: &str, revision: u64) -> bool {
    m.serving
        .get(name)
        .is_some_and(|s| s.revision >= revision && (s.fenced || s.version.is_none()))
}

/// A name the fleet is switching, and the live members it waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Switching {
    pub name: String,
    pub next: String,
    /// When the switch was decided (ms since the epoch, the deciding member's clock).
    pub since: u64,
    /// Live members taking part that have not yet stopped answering the
    /// previous version: the switch completes when this is empty.
    pub waiting_on: Vec<String>,
}

/// The members taking part in `target`'s name on which `target` is
/// retired: they could never follow a decision for it (it would stay
/// fenced there), so it is not proposed while there are any.
pub fn retired_on(target: &ViewId, members: &[Member]) -> Vec<String> {
    let id = target.to_string();
    members
        .iter()
        .filter(|m| follows(m, target.name()))
        .filter(|m| {
            m.views
                .iter()
                .any(|v| v.id == id && v.state == ViewState::Retired)
        })
        .map(|m| m.instance.clone())
        .collect()
}

/// Does member `m` take part in `name`'s cutover? It has versions of it
/// under `cutover = "fleet"` (its record says what the name serves there).
/// A member running the name under another policy neither blocks nor
/// counts towards the fleet's cutover.
fn follows(m: &Member, name: &str) -> bool {
    m.serving.contains_key(name)
}

/// Members' digests of one view (same fingerprint) at one position that
/// are not all equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DigestMismatch {
    pub view: String,
    pub fingerprint: String,
    pub position: u64,
    /// instance → digest.
    pub digests: BTreeMap<String, String>,
    /// instance → the instance whose replay built its documents, for the
    /// members whose view was filled from a snapshot.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub built_by: BTreeMap<String, String>,
    /// Members whose digest differs from the one most lineages agree on
    /// (all of them when no digest has more): members that bootstrapped
    /// from one snapshot count as that snapshot's builder, once, so a
    /// corrupt publisher and those who took its snapshot do not outvote
    /// the member that replayed the log itself.
    pub suspects: Vec<String>,
}

/// The fleet as `GET /fleet` and `kiln fleet status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    pub fleet: String,
    /// The instance that answered.
    pub instance: String,
    pub member_ttl_ms: u64,
    pub quorum: usize,
    pub digest_every: u64,
    pub members: Vec<Member>,
    /// Members whose records do not parse: no cutover proceeds meanwhile.
    pub unreadable: Vec<String>,
    pub decisions: BTreeMap<String, Revised>,
    /// Digests that disagree, by view, fingerprint and position.
    pub mismatches: Vec<DigestMismatch>,
    /// Positions at which two or more members' digests were compared and agreed.
    pub digests_agreeing: usize,
    /// Names being switched, with the members each switch waits for.
    pub switching: Vec<Switching>,
    /// Versions members run under different modules (never proposed, never
    /// answered where the module is not the fleet's).
    pub logic_mismatches: Vec<LogicMismatch>,
}

/// One version id under which members run different modules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicMismatch {
    pub view: String,
    /// Fingerprint → the members running it.
    pub fingerprints: BTreeMap<String, Vec<String>>,
}

impl FleetStatus {
    pub fn new(
        fleet: &str,
        instance: &str,
        (member_ttl_ms, quorum, digest_every): (u64, usize, u64),
        mut members: Vec<Member>,
        unreadable: Vec<String>,
        decisions: BTreeMap<String, Revised>,
    ) -> FleetStatus {
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        // (view, fingerprint, position) → instance → (digest, lineage).
        type At = BTreeMap<(String, String, u64), BTreeMap<String, (String, Option<String>)>>;
        let mut at: At = BTreeMap::new();
        for m in &members {
            for d in &m.digests {
                at.entry((d.view.clone(), d.fingerprint.clone(), d.position))
                    .or_default()
                    .insert(m.instance.clone(), (d.digest.clone(), d.built_by.clone()));
            }
        }
        let mut mismatches = Vec::new();
        let mut digests_agreeing = 0;
        for ((view, fingerprint, position), seen) in at {
            if seen.len() < 2 {
                continue;
            }
            // Each digest's witnesses: the distinct lineages holding it.
            let mut lineages: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (instance, (d, built_by)) in &seen {
                lineages
                    .entry(d.as_str())
                    .or_default()
                    .insert(built_by.as_deref().unwrap_or(instance));
            }
            if lineages.len() == 1 {
                digests_agreeing += 1;
                continue;
            }
            let counts: BTreeMap<&str, usize> =
                lineages.iter().map(|(d, l)| (*d, l.len())).collect();
            let top = counts.values().copied().max().unwrap_or(0);
            let majority: Vec<&str> = counts
                .iter()
                .filter(|(_, n)| **n == top)
                .map(|(d, _)| *d)
                .collect();
            let suspects = seen
                .iter()
                .filter(|(_, (d, _))| majority.len() > 1 || d.as_str() != majority[0])
                .map(|(i, _)| i.clone())
                .collect();
            let built_by = seen
                .iter()
                .filter_map(|(i, (_, b))| b.clone().map(|b| (i.clone(), b)))
                .collect();
            let digests = seen.into_iter().map(|(i, (d, _))| (i, d)).collect();
            mismatches.push(DigestMismatch {
                view,
                fingerprint,
                position,
                digests,
                built_by,
                suspects,
            });
        }
        let switching = decisions
            .iter()
            .filter_map(|(name, r)| {
                let next = r.decision.next.clone()?;
                let waiting_on = members
                    .iter()
                    .filter(|m| follows(m, name) && !has_fenced(m, name, r.revision))
                    .map(|m| m.instance.clone())
                    .collect();
                Some(Switching {
                    name: name.clone(),
                    next,
                    since: r.decision.at,
                    waiting_on,
                })
            })
            .collect();
        let ids: BTreeSet<ViewId> = members
            .iter()
            .flat_map(|m| m.views.iter().filter_map(|v| v.id.parse::<ViewId>().ok()))
            .collect();
        let logic_mismatches = ids
            .into_iter()
            .filter_map(|id| {
                let fingerprints = logic_of(&id, &members);
                (fingerprints.len() > 1).then(|| LogicMismatch {
                    view: id.to_string(),
                    fingerprints,
                })
            })
            .collect();
        FleetStatus {
            unreadable,
            switching,
            logic_mismatches,
            fleet: fleet.to_string(),
            instance: instance.to_string(),
            member_ttl_ms,
            quorum,
            digest_every,
            members,
            decisions,
            mismatches,
            digests_agreeing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(instance: &str, views: &[(&str, ViewState)]) -> Member {
        let serving = if views.is_empty() {
            BTreeMap::new()
        } else {
            BTreeMap::from([("users".to_string(), FleetServing::default())])
        };
        Member {
            format: RECORD_FORMAT,
            incarnation: String::new(),
            instance: instance.into(),
            api: String::new(),
            started_at: 0,
            heartbeat_at: 0,
            head: 0,
            views: views
                .iter()
                .map(|(id, state)| MemberView {
                    id: id.to_string(),
                    state: *state,
                    checkpoint: 0,
                    lag: 0,
                    fingerprint: "f".into(),
                    alias_of: None,
                })
                .collect(),
            serving,
            digests: Vec::new(),
        }
    }

    /// Adds version `id`, ready, to every member.
    fn with_ready(ms: &mut [Member], id: &str) {
        for m in ms {
            m.views.push(MemberView {
                id: id.into(),
                state: ViewState::Ready,
                checkpoint: 0,
                lag: 0,
                fingerprint: "f".into(),
                alias_of: None,
            });
        }
    }

    fn fenced(m: &mut Member, name: &str, revision: u64) {
        m.serving.insert(
            name.into(),
            FleetServing {
                version: None,
                revision,
                fenced: true,
                stale: false,
            },
        );
    }

    use ViewState::*;

    #[test]
    fn a_version_is_proposed_once_ready_everywhere_then_switched_once_all_fenced() {
        let active = Revised {
            revision: 4,
            decision: Decision {
                active: Some("users-1_0_0".into()),
                next: None,
                by: "a".into(),
                reason: String::new(),
                at: 0,
                held_back: Vec::new(),
                fingerprint: None,
            },
        };
        let mut ms = vec![
            member("a", &[("users-1_0_0", Active), ("users-1_1_0", Ready)]),
            member("b", &[("users-1_0_0", Active), ("users-1_1_0", Warming)]),
        ];
        assert_eq!(drive("users", Some(&active), &ms, &[], 0, "a", 1), None);
        // With a quorum of one, a's readiness is enough.
        let Some(Step::Update(4, d)) = drive("users", Some(&active), &ms, &[], 1, "a", 1) else {
            panic!("a quorum of one proposes");
        };
        assert_eq!(d.next.as_deref(), Some("users-1_1_0"));
        ms[1].views[1].state = Ready;
        let Some(Step::Update(4, d)) = drive("users", Some(&active), &ms, &[], 0, "b", 1) else {
            panic!("ready everywhere: proposed");
        };
        let switching = Revised {
            revision: 5,
            decision: d,
        };
        fenced(&mut ms[0], "users", 5);
        assert_eq!(
            drive("users", Some(&switching), &ms, &[], 0, "a", 2),
            None,
            "b serves 1.0.0 still"
        );
        let status = FleetStatus::new(
            "f",
            "a",
            (1, 0, 10),
            ms.clone(),
            Vec::new(),
            BTreeMap::from([("users".to_string(), switching.clone())]),
        );
        assert_eq!(
            status.switching,
            vec![Switching {
                name: "users".into(),
                next: "users-1_1_0".into(),
                since: 1,
                waiting_on: vec!["b".into()],
            }]
        );
        fenced(&mut ms[1], "users", 5);
        // Regression (found by reading): a member whose record does not
        // parse was left out, so the switch ended while it may still have
        // answered the old version.
        assert_eq!(
            drive(
                "users",
                Some(&switching),
                &ms,
                &["x".to_string()],
                0,
                "a",
                2
            ),
            None
        );
        let Some(Step::Update(5, d)) = drive("users", Some(&switching), &ms, &[], 0, "a", 2) else {
            panic!("all fenced: switched");
        };
        assert_eq!((d.active.as_deref(), d.next), (Some("users-1_1_0"), None));
    }

    /// Found by the fleet model test (seed 24): a retire on one member and
    /// a promote on another crossed; the switch ended, and the member with
    /// the version retired answered 503 for good.
    #[test]
    fn a_switch_to_a_version_retired_on_a_member_is_called_off() {
        let switching = Revised {
            revision: 7,
            decision: Decision {
                active: Some("users-1_0_0".into()),
                next: Some("users-1_1_0".into()),
                by: "c".into(),
                reason: "promote on c".into(),
                at: 0,
                held_back: vec!["users-1_0_0".into()],
                fingerprint: Some("f".into()),
            },
        };
        let mut ms = vec![
            member("a", &[("users-1_0_0", Active), ("users-1_1_0", Retired)]),
            member("b", &[("users-1_0_0", Active), ("users-1_1_0", Ready)]),
        ];
        fenced(&mut ms[0], "users", 7);
        fenced(&mut ms[1], "users", 7);
        let Some(Step::Update(7, d)) = drive("users", Some(&switching), &ms, &[], 0, "b", 9) else {
            panic!("the switch is called off");
        };
        assert_eq!(d.active.as_deref(), Some("users-1_0_0"));
        assert_eq!(d.next, None);
        assert!(d.reason.contains("retired on a"), "{}", d.reason);
        // Held back: not proposed again on its own once deployed again.
        assert_eq!(d.held_back, vec!["users-1_1_0".to_string()]);
        assert_eq!(d.fingerprint.as_deref(), Some("f"));
        ms[0].views[1].state = Ready;
        let called_off = Revised {
            revision: 8,
            decision: d,
        };
        assert_eq!(
            drive("users", Some(&called_off), &ms, &[], 0, "a", 10),
            None
        );
        // Not retired anywhere: the switch ends as before.
        let Some(Step::Update(7, d)) = drive("users", Some(&switching), &ms, &[], 0, "a", 9) else {
            panic!("switched");
        };
        assert_eq!(d.active.as_deref(), Some("users-1_1_0"));
    }

    #[test]
    fn a_rolled_back_version_is_not_proposed_again() {
        let rolled_back = Revised {
            revision: 9,
            decision: Decision {
                active: Some("users-1_0_0".into()),
                next: None,
                by: "a".into(),
                reason: "rollback".into(),
                at: 0,
                held_back: vec!["users-1_1_0".into()],
                fingerprint: None,
            },
        };
        let ms = vec![
            member("a", &[("users-1_0_0", Active), ("users-1_1_0", Standby)]),
            member("b", &[("users-1_0_0", Active), ("users-1_1_0", Standby)]),
        ];
        assert_eq!(
            drive("users", Some(&rolled_back), &ms, &[], 0, "a", 1),
            None
        );
        // Regression (found by reading): members that have the rolled-back
        // version *ready* (a member that joined after the rollback, or every
        // member replaced on fresh disks) do not propose it again.
        let fresh = vec![
            member("c", &[("users-1_0_0", Active), ("users-1_1_0", Ready)]),
            member("d", &[("users-1_0_0", Active), ("users-1_1_0", Ready)]),
        ];
        for quorum in [0, 1] {
            assert_eq!(
                drive("users", Some(&rolled_back), &fresh, &[], quorum, "c", 1),
                None
            );
        }
        // Regression (found by reading): with a quorum below the member
        // count, a version retired on one member was proposed, and that
        // member stayed fenced for good.
        let mut one_retired = fresh.clone();
        one_retired[0].views[0].state = Active;
        with_ready(&mut one_retired, "users-1_3_0");
        one_retired[1].views[2].state = Retired;
        let v13: ViewId = "users-1_3_0".parse().expect("id");
        assert_eq!(retired_on(&v13, &one_retired), vec!["d".to_string()]);
        assert_eq!(
            drive("users", Some(&rolled_back), &one_retired, &[], 1, "c", 1),
            None
        );
        // A newer version is proposed as usual, and still holds 1.1.0 back.
        let mut newer = fresh.clone();
        with_ready(&mut newer, "users-1_2_0");
        let Some(Step::Update(9, d)) = drive("users", Some(&rolled_back), &newer, &[], 0, "c", 1)
        else {
            panic!("a newer version is proposed");
        };
        assert_eq!(d.next.as_deref(), Some("users-1_2_0"));
        assert_eq!(d.held_back, vec!["users-1_1_0".to_string()]);
        // Regression (fleet model test, seed 16): a version older than the
        // one rolled back from, ready everywhere, was proposed at once and
        // overturned the rollback.
        let mut between = fresh.clone();
        with_ready(&mut between, "users-1_0_5");
        assert_eq!(
            drive("users", Some(&rolled_back), &between, &[], 0, "c", 1),
            None
        );
        // An explicit promote releases it; a rollback adds what it leaves.
        let promoted = Decision::proposed(
            Some(&rolled_back.decision),
            ("users-1_1_0", None),
            false,
            "c",
            "promote".into(),
            2,
        );
        assert_eq!(
            (promoted.next.as_deref(), promoted.held_back.len()),
            (Some("users-1_1_0"), 0)
        );
        let mut on_1_1 = promoted.clone();
        on_1_1.active = Some("users-1_1_0".into());
        on_1_1.next = None;
        let back = Decision::proposed(
            Some(&on_1_1),
            ("users-1_0_0", None),
            true,
            "c",
            "rollback".into(),
            3,
        );
        assert_eq!(back.held_back, vec!["users-1_1_0".to_string()]);
        // Regression (found by reading): a promote to an older version held
        // nothing back, so a member on a fresh disk with the newer one ready
        // had it proposed again, undoing the operator's decision.
        let promoted_back = Decision::proposed(
            Some(&on_1_1),
            ("users-1_0_0", None),
            false,
            "c",
            "promote".into(),
            3,
        );
        assert_eq!(promoted_back.held_back, vec!["users-1_1_0".to_string()]);
        let forward = Decision::proposed(
            Some(&on_1_1),
            ("users-1_2_0", None),
            false,
            "c",
            "promote".into(),
            3,
        );
        assert_eq!(forward.held_back, Vec::<String>::new());
        // Regression (issue 25 item 8): a rollback during a switch from
        // 1.1.0 to 1.2.0 goes back to 1.1.0 (the lifecycle proposes the
        // active version, not its own standby) and holds 1.2.0 back.
        let mut switching = on_1_1.clone();
        switching.next = Some("users-1_2_0".into());
        let cancelled = Decision::proposed(
            Some(&switching),
            ("users-1_1_0", None),
            true,
            "c",
            "rollback".into(),
            4,
        );
        assert_eq!(cancelled.next.as_deref(), Some("users-1_1_0"));
        assert_eq!(cancelled.held_back, vec!["users-1_2_0".to_string()]);
        // A member running users under another policy neither blocks nor counts.
        let mut other = member("x", &[("users-2_0_0", Ready)]);
        other.serving.clear();
        let mut with_other = ms.clone();
        with_other.push(other);
        assert_eq!(
            drive("users", Some(&rolled_back), &with_other, &[], 0, "a", 1),
            None
        );
        // A first decision adopts what the members serve.
        let Some(Step::Create(d)) = drive("users", None, &ms, &[], 0, "a", 1) else {
            panic!("created");
        };
        assert_eq!(d.next.as_deref(), Some("users-1_0_0"));
    }

    #[test]
    fn an_older_record_reads_as_format_1_and_records_carry_their_format() {
        let mut old = serde_json::to_value(member("a", &[("users-1_0_0", Active)])).expect("json");
        old.as_object_mut().expect("object").remove("format");
        let read: Member = serde_json::from_value(old).expect("an older record parses");
        assert_eq!(read.format, 1);
        let new = serde_json::to_value(member("a", &[("users-1_0_0", Retired)])).expect("json");
        assert_eq!(new["format"], RECORD_FORMAT);
        assert_eq!(new["views"][0]["state"], "retired");
    }

    /// Regression (issue 25 item 6, found again by the fleet model test):
    /// two builds under one version id were proposed and served as one.
    #[test]
    fn one_version_id_under_two_modules_is_never_proposed_and_is_flagged() {
        let mut ms = vec![
            member("a", &[("users-1_0_0", Active)]),
            member("b", &[("users-1_0_0", Active)]),
        ];
        let current = Revised {
            revision: 3,
            decision: Decision {
                active: Some("users-1_0_0".into()),
                next: None,
                by: "a".into(),
                reason: "auto".into(),
                at: 0,
                held_back: Vec::new(),
                fingerprint: Some("f".into()),
            },
        };
        with_ready(&mut ms, "users-1_1_0");
        ms[1].views[1].fingerprint = "g".into();
        let v11: ViewId = "users-1_1_0".parse().expect("id");
        assert_eq!(logic_of(&v11, &ms).len(), 2);
        assert!(logic_words(&logic_of(&v11, &ms)).contains("b run(s) g"));
        assert_eq!(drive("users", Some(&current), &ms, &[], 0, "a", 1), None);
        let status = FleetStatus::new("t", "a", (1, 0, 10), ms.clone(), vec![], BTreeMap::new());
        assert_eq!(status.logic_mismatches.len(), 1);
        assert_eq!(status.logic_mismatches[0].view, "users-1_1_0");
        // One build everywhere: proposed, its fingerprint in the decision.
        ms[1].views[1].fingerprint = "f".into();
        let Some(Step::Update(3, d)) = drive("users", Some(&current), &ms, &[], 0, "a", 1) else {
            panic!("proposed");
        };
        assert_eq!(
            (d.next.as_deref(), d.fingerprint.as_deref()),
            (Some("users-1_1_0"), Some("f"))
        );
        let status = FleetStatus::new("t", "a", (1, 0, 10), ms, vec![], BTreeMap::new());
        assert!(status.logic_mismatches.is_empty());
    }

    #[test]
    fn the_odd_digest_out_is_the_suspect() {
        let mut ms = vec![member("a", &[]), member("b", &[]), member("c", &[])];
        for (m, d) in ms.iter_mut().zip(["x", "x", "y"]) {
            for position in [10, 20] {
                m.digests.push(DigestAt {
                    view: "users-1_0_0".into(),
                    fingerprint: "f".into(),
                    position,
                    documents: 1,
                    bytes: 1,
                    digest: if position == 10 { "x".into() } else { d.into() },
                    took_ms: 0,
                    built_by: None,
                });
            }
        }
        let s = FleetStatus::new("f", "a", (1, 0, 10), ms, Vec::new(), BTreeMap::new());
        assert_eq!(s.digests_agreeing, 1);
        assert_eq!(s.mismatches.len(), 1);
        assert_eq!(s.mismatches[0].position, 20);
        assert_eq!(s.mismatches[0].suspects, vec!["c".to_string()]);
    }

    /// Issue 25, item 7: c replayed the log; a published a corrupt
    /// snapshot, which b and d bootstrapped from. Counted per member, three
    /// against one blamed c, the healthy one. Counted per lineage it is one
    /// against one: both are suspects, and the record says who built what.
    /// With a second member replaying on its own, the corrupt lineage is
    /// the odd one out.
    #[test]
    fn members_filled_from_one_snapshot_are_one_witness_in_the_digest_vote() {
        let digest = |d: &str, built_by: Option<&str>| DigestAt {
            view: "users-1_0_0".into(),
            fingerprint: "f".into(),
            position: 20,
            documents: 1,
            bytes: 1,
            digest: d.into(),
            took_ms: 0,
            built_by: built_by.map(str::to_string),
        };
        let fleet = |seen: &[(&str, &str, Option<&str>)]| {
            let ms = seen
                .iter()
                .map(|(i, d, b)| {
                    let mut m = member(i, &[]);
                    m.digests.push(digest(d, *b));
                    m
                })
                .collect();
            FleetStatus::new("f", "a", (1, 0, 10), ms, Vec::new(), BTreeMap::new())
        };
        let s = fleet(&[
            ("a", "bad", None),
            ("b", "bad", Some("a")),
            ("c", "good", None),
            ("d", "bad", Some("a")),
        ]);
        assert_eq!(s.mismatches.len(), 1);
        assert_eq!(s.mismatches[0].suspects, ["a", "b", "c", "d"]);
        assert_eq!(
            s.mismatches[0].built_by,
            BTreeMap::from([("b".into(), "a".into()), ("d".into(), "a".into())])
        );
        let s = fleet(&[
            ("a", "bad", None),
            ("b", "bad", Some("a")),
            ("c", "good", None),
            ("d", "bad", Some("a")),
            ("e", "good", None),
        ]);
        assert_eq!(s.mismatches[0].suspects, ["a", "b", "d"]);
        // Members bootstrapped from the healthy replay agree with it.
        let s = fleet(&[("c", "good", None), ("b", "good", Some("c"))]);
        assert!(s.mismatches.is_empty());
        assert_eq!(s.digests_agreeing, 1);
    }
}
