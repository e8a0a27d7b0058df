//! The desired store: merges every source's snapshot into one resolved view.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Snapshot, SourceObject};
use crate::api::effective::{self, Defaults};
use crate::api::validate::{self, Declared};
use crate::api::{EffectiveSpec, ObjectKey, OperatingMode, SourceRef, Team, WorkspaceSpec};
use crate::compact::Interner;

/// One workspace as the operator should make it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredWorkspace {
    pub key: ObjectKey,
    /// Bumps whenever the resolved spec changes (in memory; starts at 1).
    pub generation: i64,
    /// Effective spec (own fields, then team defaults, then operator defaults), or every
    /// reason it is invalid.
    pub spec: Result<EffectiveSpec, Vec<String>>,
    /// Shared by the workspaces one file (or row, or object version) declared.
    pub source: Arc<SourceRef>,
    /// Set when another source declares the same name: names the losing source.
    pub conflict: Option<String>,
    /// The Team that generated it from `spec.workspaces`, if any.
    pub owner_team: Option<String>,
    /// Set when its declaration was deleted but workspaces that still name it as their
    /// parent remain: it is kept as it was (the original platform's 409 on deleting a
    /// parent without confirm, made declarative), and this says why.
    pub deletion_refused: Option<String>,
}

impl DesiredWorkspace {
    /// The Team it belongs to: the one that generated it, else its `spec.team`.
    pub fn team(&self) -> Option<&str> {
        self.owner_team.as_deref().or_else(|| self.spec.as_ref().ok().and_then(|s| s.team.as_deref()))
    }
}

/// One warm pool as the operator should keep it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredPool {
    pub key: ObjectKey,
    pub size: u32,
    /// The resolved template, or every reason it is invalid (each naming its field).
    pub template: Result<Arc<EffectiveSpec>, Vec<String>>,
    pub source: SourceRef,
    /// `metadata.generation` of the object (a Kubernetes WarmPool's; None elsewhere).
    pub generation: Option<i64>,
}

/// Everything declared, merged from all sources.
#[derive(Clone, Debug, Default)]
pub struct DesiredSet {
    pub workspaces: BTreeMap<ObjectKey, DesiredWorkspace>,
    pub teams: BTreeMap<ObjectKey, Team>,
    /// Warm pools (the first source that declares a name wins).
    pub pools: BTreeMap<ObjectKey, DesiredPool>,
    /// Source-level problems (e.g. a file that does not parse), each naming file and line.
    pub errors: Vec<String>,
    /// False until every source has delivered its first snapshot: nothing is removed
    /// before the operator has seen everything that is declared.
    pub complete: bool,
}

/// Merges the sources' snapshots (in precedence order: the first source that declares
/// a name wins) into the desired set:
/// - a Team's inline members become Workspaces named `<team>-<member>`;
/// - every member (inline or by `spec.team`) inherits the team's `defaults`, and a
///   team that is Paused or Stopped pauses or stops all of them;
/// - each spec is resolved against the operator `defaults` and checked (names,
///   parents, team references); any problem makes it `Err`, which the reconciler
///   shows as InvalidSpec and acts on no further;
/// - `generation` is carried over from `previous` while the resolved spec is unchanged.
///
/// A Team that cannot be read keeps its last known members (from `previous`), each
/// marked invalid: a typo in a team file never reads as "delete the team".
pub fn merge(snapshots: &[Snapshot], defaults: &Defaults, previous: &DesiredSet) -> DesiredSet {
    let mut errors: Vec<String> = snapshots.iter().flat_map(|s| s.errors.iter().cloned()).collect();
    let teams = claim_teams(snapshots);
    let candidates = claim_workspaces(snapshots, &teams, previous);

    // Apply team defaults and modes, so the set-level checks see the parents and
    // teams each workspace will really have.
    let inherited: BTreeMap<&ObjectKey, Inherited> = candidates
        .iter()
        .map(|(key, c)| {
            let entry = match &c.body {
                Body::Invalid(errs) => Err(errs.clone()),
                Body::Spec(own) => Ok(inherit_from_team(key, own, &teams)),
            };
            (key, entry)
        })
        .collect();
    let declared: Vec<Declared<'_>> = inherited
        .iter()
        .map(|(key, entry)| {
            let spec = entry.as_ref().ok().map(|(spec, _)| spec);
            Declared { key, parent: spec.and_then(|s| s.parent.as_deref()), team: spec.and_then(|s| s.team.as_deref()) }
        })
        .collect();
    // A parent whose declaration went away while its children stay is kept.
    let refused = refused_deletions(previous, &inherited);
    let declared: Vec<Declared<'_>> = declared
        .into_iter()
        .chain(refused.iter().map(|(key, (prev, _))| {
            let spec = prev.spec.as_ref().ok();
            Declared { key, parent: spec.and_then(|s| s.parent.as_deref()), team: spec.and_then(|s| s.team.as_deref()) }
        }))
        .collect();
    let team_keys: BTreeSet<ObjectKey> = teams.keys().cloned().collect();
    let mut set_errors = validate::set_errors(&declared, &team_keys);

    let mut declared_workspaces = Vec::with_capacity(inherited.len());
    // What most workspaces have in common is kept once (bench/scale: at 10,000
    // workspaces these were a tenth of the desired set).
    let mut sources = Interner::<SourceRef>::default();
    let mut texts = Interner::<str>::default();
    for (key, entry) in inherited {
        let c = &candidates[key];
        let spec = match entry {
            Err(errs) => Err(errs),
            Ok((spec, mut problems)) => {
                if c.owner_team.is_none() {
                    problems.extend(validate::dns1123_label(&key.name).err().map(|e| format!("metadata.name: {e}")));
                }
                problems
                    .extend(validate::dns1123_label(&key.namespace).err().map(|e| format!("metadata.namespace: {e}")));
                problems.extend(set_errors.remove(key).unwrap_or_default());
                match effective::resolve(&spec, defaults) {
                    Ok(mut eff) if problems.is_empty() => {
                        for text in [&mut eff.runtime, &mut eff.image, &mut eff.network] {
                            *text = texts.share(text.clone());
                        }
                        Ok(eff)
                    }
                    Ok(_) => Err(problems),
                    Err(mut resolve_errors) => {
                        resolve_errors.extend(problems);
                        Err(resolve_errors)
                    }
                }
            }
        };
        let generation = match previous.workspaces.get(key) {
            Some(p) if p.spec == spec => p.generation,
            Some(p) => p.generation + 1,
            None => 1,
        };
        let conflict = (!c.conflicts.is_empty()).then(|| c.conflicts.join("; "));
        declared_workspaces.push((
            key.clone(),
            DesiredWorkspace {
                key: key.clone(),
                generation,
                spec,
                source: sources.get(&c.source, || Arc::new(c.source.clone())),
                conflict,
                owner_team: c.owner_team.clone(),
                deletion_refused: None,
            },
        ));
    }
    // Built at once rather than inserted one by one in key order, which leaves every
    // node of the map half empty: a DesiredWorkspace is most of a kilobyte, and at
    // 10,000 workspaces the slack was 4 MB.
    let mut workspaces: BTreeMap<ObjectKey, DesiredWorkspace> = declared_workspaces.into_iter().collect();
    for (key, (prev, children)) in refused {
        let message = format!(
            "deleting {key} is refused: {} still name{} it as parent; delete or re-parent {} in the same change",
            children.join(", "),
            if children.len() == 1 { "s" } else { "" },
            if children.len() == 1 { "it" } else { "them" },
        );
        errors.push(message.clone());
        workspaces.insert(key, DesiredWorkspace { deletion_refused: Some(message), ..prev });
    }

    let mut team_objects = BTreeMap::new();
    for (key, claim) in &teams {
        if !claim.conflicts.is_empty() {
            errors.push(format!("Team {key}: {}; the first source wins", claim.conflicts.join("; ")));
        }
        match &claim.body {
            TeamBody::Valid(team) => {
                team_objects.insert(key.clone(), (*team).clone());
            }
            TeamBody::Invalid(error) => {
                errors.push(error.clone());
                if let Some(last) = previous.teams.get(key) {
                    team_objects.insert(key.clone(), last.clone());
                }
            }
        }
    }

    let pools = merge_pools(snapshots, defaults, &mut errors);
    check_pool_references(&mut workspaces, &pools, previous);
    DesiredSet { workspaces, teams: team_objects, pools, errors, complete: true }
}

/// Every declared WarmPool, its template resolved; the first source wins a name.
fn merge_pools(
    snapshots: &[Snapshot],
    defaults: &Defaults,
    errors: &mut Vec<String>,
) -> BTreeMap<ObjectKey, DesiredPool> {
    let mut pools = BTreeMap::new();
    for snap in snapshots {
        for o in &snap.objects {
            let (key, size, template, source, generation) = match o {
                SourceObject::WarmPool { object, source } => {
                    let key = ObjectKey::new(
                        object.metadata.namespace.clone().unwrap_or_else(|| crate::api::DEFAULT_NAMESPACE.into()),
                        object.metadata.name.clone().unwrap_or_default(),
                    );
                    let template = match validate::dns1123_label(&key.name) {
                        Err(e) => Err(vec![format!("metadata.name: {e}")]),
                        Ok(()) => crate::api::pool::resolve_template(&object.spec, defaults).map(Arc::new),
                    };
                    (key, object.spec.size, template, source, object.metadata.generation)
                }
                SourceObject::Invalid { kind, key, source, error } if kind == "WarmPool" => {
                    (key.clone(), 0, Err(vec![error.clone()]), source, None)
                }
                _ => continue,
            };
            if let Err(errs) = &template {
                errors.push(format!("WarmPool {key}: {}", errs.join("; ")));
            }
            if pools.contains_key(&key) {
                errors.push(format!("WarmPool {key}: also declared by {}; the first source wins", snap.source));
                continue;
            }
            pools.insert(key.clone(), DesiredPool { key, size, template, source: source.clone(), generation });
        }
    }
    pools
}

/// A workspace naming a pool that is not declared, or whose template is invalid, is
/// invalid itself (InvalidSpec naming `spec.warmPool`); nothing else is affected.
fn check_pool_references(
    workspaces: &mut BTreeMap<ObjectKey, DesiredWorkspace>,
    pools: &BTreeMap<ObjectKey, DesiredPool>,
    previous: &DesiredSet,
) {
    for (key, w) in workspaces.iter_mut() {
        let Some(name) = w.spec.as_ref().ok().and_then(|s| s.warm_pool.clone()) else { continue };
        let why = match pools.get(&ObjectKey::new(&key.namespace, &name)) {
            None => format!(
                "spec.warmPool: no WarmPool {name} in namespace {}; declare it or remove the field",
                key.namespace
            ),
            Some(p) => match &p.template {
                Ok(_) => continue,
                Err(errs) => format!("spec.warmPool: WarmPool {} is invalid: {}", p.key, errs.join("; ")),
            },
        };
        w.spec = Err(vec![why]);
        w.generation = match previous.workspaces.get(key) {
            Some(p) if p.spec == w.spec => p.generation,
            Some(p) => p.generation + 1,
            None => 1,
        };
    }
}

/// Workspaces declared before but not now whose children (declared now, or kept by
/// this same rule) still name them as parent, with those children's names. Removing a
/// parent together with all its children is allowed.
fn refused_deletions(
    previous: &DesiredSet,
    inherited: &BTreeMap<&ObjectKey, Inherited>,
) -> BTreeMap<ObjectKey, (DesiredWorkspace, Vec<String>)> {
    let parent_of_now = |k: &ObjectKey| -> Option<String> {
        inherited.get(k).and_then(|e| e.as_ref().ok()).and_then(|(s, _)| s.parent.clone())
    };
    let mut refused: BTreeMap<ObjectKey, (DesiredWorkspace, Vec<String>)> = BTreeMap::new();
    loop {
        let mut changed = false;
        for (key, prev) in &previous.workspaces {
            if inherited.contains_key(key) || refused.contains_key(key) {
                continue;
            }
            let named_by = |child: &ObjectKey, parent: Option<String>| {
                child.namespace == key.namespace && parent.as_deref() == Some(key.name.as_str())
            };
            let mut children: Vec<String> =
                inherited.keys().filter(|c| named_by(c, parent_of_now(c))).map(|c| c.name.clone()).collect();
            children.extend(
                refused
                    .iter()
                    .filter(|(c, (p, _))| named_by(c, p.spec.as_ref().ok().and_then(|s| s.parent.clone())))
                    .map(|(c, _)| c.name.clone()),
            );
            if !children.is_empty() {
                refused.insert(key.clone(), (prev.clone(), children));
                changed = true;
            }
        }
        if !changed {
            return refused;
        }
    }
}

/// Where an object was declared, as a conflict message names it.
fn declared_by(snapshot: &Snapshot, source: &SourceRef) -> String {
    format!("also declared by {} ({})", snapshot.source, source.reference)
}

enum TeamBody<'a> {
    Valid(&'a Team),
    Invalid(String),
}

struct TeamClaim<'a> {
    body: TeamBody<'a>,
    source: &'a SourceRef,
    /// (snapshot, object) index of the winning declaration.
    at: (usize, usize),
    conflicts: Vec<String>,
}

/// Every declared team; the first declaration of a name wins.
fn claim_teams(snapshots: &[Snapshot]) -> BTreeMap<ObjectKey, TeamClaim<'_>> {
    let mut teams: BTreeMap<ObjectKey, TeamClaim<'_>> = BTreeMap::new();
    for (si, snapshot) in snapshots.iter().enumerate() {
        for (oi, object) in snapshot.objects.iter().enumerate() {
            let (key, body, source) = match object {
                SourceObject::Team { object, source } => {
                    let key = team_key(object);
                    let body = match validate::dns1123_label(&key.name) {
                        Ok(()) => TeamBody::Valid(object),
                        Err(e) => TeamBody::Invalid(format!("Team {key}: metadata.name: {e}")),
                    };
                    (key, body, source)
                }
                SourceObject::Invalid { kind, key, source, error } if kind == "Team" => {
                    (key.clone(), TeamBody::Invalid(error.clone()), source)
                }
                _ => continue,
            };
            match teams.get_mut(&key) {
                Some(claim) => claim.conflicts.push(declared_by(snapshot, source)),
                None => {
                    teams.insert(key, TeamClaim { body, source, at: (si, oi), conflicts: Vec::new() });
                }
            }
        }
    }
    teams
}

fn team_key(team: &Team) -> ObjectKey {
    ObjectKey::new(
        team.metadata.namespace.as_deref().unwrap_or(crate::api::DEFAULT_NAMESPACE),
        team.metadata.name.as_deref().unwrap_or_default(),
    )
}

enum Body {
    /// The workspace's own spec (for inline members: with `team` set to their team).
    Spec(Box<WorkspaceSpec>),
    /// Could not be read; these are the reasons.
    Invalid(Vec<String>),
}

/// A spec after team inheritance with the team problems found on the way, or the
/// reasons the object could not be read at all.
type Inherited = Result<(WorkspaceSpec, Vec<String>), Vec<String>>;

struct Candidate {
    body: Body,
    source: SourceRef,
    owner_team: Option<String>,
    conflicts: Vec<String>,
}

/// Every declared workspace (standalone, or expanded from a winning Team), the first
/// declaration of a key winning; later ones are recorded as conflicts.
fn claim_workspaces(
    snapshots: &[Snapshot],
    teams: &BTreeMap<ObjectKey, TeamClaim<'_>>,
    previous: &DesiredSet,
) -> BTreeMap<ObjectKey, Candidate> {
    let mut out: BTreeMap<ObjectKey, Candidate> = BTreeMap::new();
    let mut claim = |key: ObjectKey, candidate: Candidate, snapshot: &Snapshot| match out.get_mut(&key) {
        Some(winner) => winner.conflicts.push(declared_by(snapshot, &candidate.source)),
        None => {
            out.insert(key, candidate);
        }
    };
    for (si, snapshot) in snapshots.iter().enumerate() {
        for (oi, object) in snapshot.objects.iter().enumerate() {
            match object {
                SourceObject::Workspace { object, source } => {
                    let key = ObjectKey::new(
                        object.metadata.namespace.as_deref().unwrap_or(crate::api::DEFAULT_NAMESPACE),
                        object.metadata.name.as_deref().unwrap_or_default(),
                    );
                    let candidate = Candidate {
                        body: Body::Spec(Box::new(object.spec.clone())),
                        source: source.clone(),
                        owner_team: None,
                        conflicts: Vec::new(),
                    };
                    claim(key, candidate, snapshot);
                }
                SourceObject::Invalid { kind, key, source, error } if kind == "Workspace" => {
                    let candidate = Candidate {
                        body: Body::Invalid(vec![error.clone()]),
                        source: source.clone(),
                        owner_team: None,
                        conflicts: Vec::new(),
                    };
                    claim(key.clone(), candidate, snapshot);
                }
                SourceObject::Team { object, source } => {
                    let team_key = team_key(object);
                    let Some(team_claim) = teams.get(&team_key).filter(|c| c.at == (si, oi)) else {
                        continue; // a losing declaration of the team: its members are not expanded
                    };
                    let TeamBody::Valid(team) = team_claim.body else {
                        claim_members_of_invalid_team(&team_key, team_claim, previous, &mut claim, snapshot);
                        continue;
                    };
                    for (key, body) in expand_members(&team_key, team) {
                        let conflicts =
                            team_claim.conflicts.iter().map(|c| format!("team {}: {c}", team_key.name)).collect();
                        let candidate = Candidate {
                            body,
                            source: source.clone(),
                            owner_team: Some(team_key.name.clone()),
                            conflicts,
                        };
                        claim(key, candidate, snapshot);
                    }
                }
                SourceObject::Invalid { kind, key, .. } if kind == "Team" => {
                    if let Some(team_claim) = teams.get(key).filter(|c| c.at == (si, oi)) {
                        claim_members_of_invalid_team(key, team_claim, previous, &mut claim, snapshot);
                    }
                }
                // Warm pools are merged apart (merge_pools).
                SourceObject::WarmPool { .. } | SourceObject::Invalid { .. } => {}
            }
        }
    }
    out
}

/// A team that cannot be read keeps the members it had, each invalid (so nothing is
/// changed for them) until the team is fixed.
fn claim_members_of_invalid_team(
    team_key: &ObjectKey,
    team_claim: &TeamClaim<'_>,
    previous: &DesiredSet,
    claim: &mut impl FnMut(ObjectKey, Candidate, &Snapshot),
    snapshot: &Snapshot,
) {
    let TeamBody::Invalid(error) = &team_claim.body else { return };
    for (key, last) in &previous.workspaces {
        if key.namespace == team_key.namespace && last.owner_team.as_deref() == Some(team_key.name.as_str()) {
            let reason = format!("team {} is invalid, so this member is left as it is: {error}", team_key.name);
            let candidate = Candidate {
                body: Body::Invalid(vec![reason]),
                source: team_claim.source.clone(),
                owner_team: Some(team_key.name.clone()),
                conflicts: Vec::new(),
            };
            claim(key.clone(), candidate, snapshot);
        }
    }
}

/// A team's inline members as workspaces `<team>-<member>` with `spec.team` set.
fn expand_members(team_key: &ObjectKey, team: &Team) -> Vec<(ObjectKey, Body)> {
    let team_name = &team_key.name;
    team.spec
        .workspaces
        .iter()
        .map(|member| {
            let fallback = format!("{team_name}-{}", member.name);
            match validate::member_name(team_name, &member.name) {
                Err(e) => (ObjectKey::new(&team_key.namespace, fallback), Body::Invalid(vec![e])),
                Ok(name) => {
                    let key = ObjectKey::new(&team_key.namespace, name);
                    match member.spec.team.as_deref() {
                        Some(other) if other != team_name => {
                            let e = format!(
                                "spec.team: member `{}` of team {team_name} names team {other}; remove spec.team from the member",
                                member.name
                            );
                            (key, Body::Invalid(vec![e]))
                        }
                        _ => {
                            let spec = WorkspaceSpec { team: Some(team_name.clone()), ..member.spec.clone() };
                            (key, Body::Spec(Box::new(spec)))
                        }
                    }
                }
            }
        })
        .collect()
}

/// The spec after the team's defaults and operating mode, plus problems with the
/// team reference that only the merge can see (a team that is declared but invalid).
fn inherit_from_team(
    key: &ObjectKey,
    own: &WorkspaceSpec,
    teams: &BTreeMap<ObjectKey, TeamClaim<'_>>,
) -> (WorkspaceSpec, Vec<String>) {
    let Some(team_name) = own.team.as_deref() else { return (own.clone(), Vec::new()) };
    match teams.get(&ObjectKey::new(&key.namespace, team_name)).map(|c| &c.body) {
        Some(TeamBody::Valid(team)) => {
            let mut spec = effective::inherit(own, team.spec.defaults.as_ref());
            spec.team = Some(team_name.to_string());
            // Paused/Stopped on the team wins; Running leaves each member's own mode.
            if let Some(mode @ (OperatingMode::Paused | OperatingMode::Stopped)) = team.spec.operating_mode {
                spec.operating_mode = Some(mode);
            }
            (spec, Vec::new())
        }
        Some(TeamBody::Invalid(e)) => {
            (own.clone(), vec![format!("spec.team: team {team_name} is invalid; fix it first: {e}")])
        }
        None => (own.clone(), Vec::new()), // reported by the set-level checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest;

    fn snapshot(name: &str, files: &[(&str, &str)]) -> Snapshot {
        let mut snap = Snapshot { source: name.to_string(), ..Default::default() };
        for (file, text) in files {
            let source = SourceRef { kind: "dir".into(), reference: format!("{file}@test") };
            let (objects, errors) = manifest::parse_documents(text, file, &source);
            snap.objects.extend(objects);
            snap.errors.extend(errors);
        }
        snap
    }

    fn merge1(files: &[(&str, &str)]) -> DesiredSet {
        merge(&[snapshot("dir:org", files)], &Defaults::default(), &DesiredSet::default())
    }

    fn ws(name: &str, spec: &str) -> String {
        format!("apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    }

    fn team(name: &str, spec: &str) -> String {
        format!("apiVersion: molecule.ai/v1alpha1\nkind: Team\nmetadata: {{name: {name}}}\nspec:\n{spec}\n---\n")
    }

    fn eff<'a>(set: &'a DesiredSet, name: &str) -> &'a EffectiveSpec {
        match &set.workspaces[&ObjectKey::new("default", name)].spec {
            Ok(s) => s,
            Err(e) => panic!("{name} is invalid: {e:?}"),
        }
    }

    fn errs<'a>(set: &'a DesiredSet, name: &str) -> &'a [String] {
        match &set.workspaces[&ObjectKey::new("default", name)].spec {
            Ok(s) => panic!("{name} is valid: {s:?}"),
            Err(e) => e,
        }
    }

    const ENG: &str = "  defaults: {tier: 1, env: {TEAM: eng, ROLE: member}, tokenPolicy: {staleGrace: 2m}}\n  workspaces:\n  - {name: dev, env: {ROLE: dev}}\n  - {name: qa, tier: 2}";

    fn pool(name: &str, spec: &str) -> String {
        format!("apiVersion: molecule.ai/v1alpha1\nkind: WarmPool\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    }

    #[test]
    fn a_missing_pool_or_an_invalid_template_makes_the_workspace_invalid_naming_the_field_and_nothing_else() {
        let set = merge1(&[(
            "a.yaml",
            &[
                pool("good", "{size: 2, template: {tier: 1}}"),
                pool("bad", "{size: 1, template: {tier: 9}}"),
                ws("a", "{warmPool: good, tier: 1}"),
                ws("b", "{warmPool: nope}"),
                ws("c", "{warmPool: bad}"),
                ws("d", "{}"),
            ]
            .concat(),
        )]);
        assert_eq!(eff(&set, "a").warm_pool.as_deref(), Some("good"));
        assert!(errs(&set, "b")[0].starts_with("spec.warmPool: no WarmPool nope"), "{:?}", errs(&set, "b"));
        let c = errs(&set, "c");
        assert!(c[0].starts_with("spec.warmPool: WarmPool default/bad is invalid: spec.template.tier"), "{c:?}");
        eff(&set, "d");
        let good = &set.pools[&ObjectKey::new("default", "good")];
        assert_eq!((good.size, good.template.as_ref().unwrap().tier), (2, 1));
        assert!(
            set.errors.iter().any(|e| e.starts_with("WarmPool default/bad: spec.template.tier")),
            "{:?}",
            set.errors
        );
    }

    #[test]
    fn team_members_expand_and_inherit_defaults() {
        let set = merge1(&[("eng.yaml", &team("eng", ENG)), ("pm.yaml", &ws("pm", "{team: eng, tier: 2}"))]);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        assert_eq!(set.workspaces.len(), 3);
        let dev = &set.workspaces[&ObjectKey::new("default", "eng-dev")];
        assert_eq!(dev.owner_team.as_deref(), Some("eng"));
        assert_eq!(dev.generation, 1);
        let dev = eff(&set, "eng-dev");
        assert_eq!((dev.tier, dev.team.as_deref()), (1, Some("eng")));
        assert_eq!(dev.env.get("ROLE").unwrap(), "dev");
        assert_eq!(dev.env.get("TEAM").unwrap(), "eng");
        assert_eq!(dev.token_policy.stale_grace, std::time::Duration::from_secs(120));
        assert_eq!(eff(&set, "eng-qa").tier, 2);
        let pm = eff(&set, "pm");
        assert_eq!((pm.tier, pm.env.get("TEAM").unwrap().as_str()), (2, "eng"));
        assert_eq!(set.workspaces[&ObjectKey::new("default", "pm")].owner_team, None);
        assert!(set.teams.contains_key(&ObjectKey::new("default", "eng")));
        assert!(set.complete);
    }

    #[test]
    fn team_mode_paused_or_stopped_overrides_members_and_running_restores_their_own() {
        for (team_mode, expect_dev, expect_qa) in [
            ("Paused", OperatingMode::Paused, OperatingMode::Paused),
            ("Stopped", OperatingMode::Stopped, OperatingMode::Stopped),
            ("Running", OperatingMode::Running, OperatingMode::Stopped),
        ] {
            let spec = format!(
                "  operatingMode: {team_mode}\n  workspaces:\n  - {{name: dev}}\n  - {{name: qa, operatingMode: Stopped}}"
            );
            let set = merge1(&[("eng.yaml", &team("eng", &spec))]);
            assert_eq!(eff(&set, "eng-dev").operating_mode, expect_dev, "{team_mode}");
            assert_eq!(eff(&set, "eng-qa").operating_mode, expect_qa, "{team_mode}");
        }
    }

    #[test]
    fn missing_team_missing_parent_and_cycles_are_invalid_spec() {
        let set = merge1(&[(
            "a.yaml",
            &[
                ws("lonely", "{team: ghosts}"),
                ws("orphan", "{parent: nobody}"),
                ws("a", "{parent: b}"),
                ws("b", "{parent: a}"),
                ws("ok", "{parent: a}"),
            ]
            .concat(),
        )]);
        assert!(errs(&set, "lonely")[0].contains("team ghosts is not declared"));
        assert!(errs(&set, "orphan")[0].contains("workspace nobody is not declared"));
        assert!(errs(&set, "a")[0].contains("parent cycle: a -> b -> a"), "{:?}", errs(&set, "a"));
        assert!(errs(&set, "b")[0].contains("parent cycle: b -> a -> b"));
        eff(&set, "ok");
    }

    #[test]
    fn invalid_names_and_resolve_errors_are_all_reported() {
        let set = merge1(&[
            ("a.yaml", &ws("Dev_Lead", "{tier: 9, parent: nobody}")),
            ("t.yaml", &team("eng", "  workspaces:\n  - {name: Bad}\n  - {name: ok, team: other}")),
        ]);
        let e = errs(&set, "Dev_Lead");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("tier: 9 is out of range"), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("metadata.name: `Dev_Lead` is not a valid name")), "{e:?}");
        assert!(errs(&set, "eng-Bad")[0].contains("team eng member `Bad`"));
        assert!(errs(&set, "eng-ok")[0].contains("names team other"));
    }

    #[test]
    fn invalid_source_objects_become_invalid_workspaces() {
        let set = merge1(&[("a.yaml", &[ws("good", "{}"), ws("bad", "{tierr: 1}")].concat())]);
        eff(&set, "good");
        let e = errs(&set, "bad");
        assert!(e[0].starts_with("a.yaml:9:") && e[0].contains("unknown field `tierr`"), "{e:?}");
    }

    #[test]
    fn first_source_wins_and_the_other_is_named_in_conflict() {
        let first = snapshot("dir:org", &[("pm.yaml", &ws("pm", "{tier: 1}"))]);
        let second = snapshot("postgres", &[("row-7", &ws("pm", "{tier: 3}"))]);
        let set = merge(&[first, second], &Defaults::default(), &DesiredSet::default());
        let pm = &set.workspaces[&ObjectKey::new("default", "pm")];
        assert_eq!(eff(&set, "pm").tier, 1);
        assert_eq!(pm.source.reference, "pm.yaml@test");
        assert_eq!(pm.conflict.as_deref(), Some("also declared by postgres (row-7@test)"));
    }

    #[test]
    fn team_declared_twice_expands_only_the_winner_and_marks_members() {
        let first = snapshot("dir:org", &[("eng.yaml", &team("eng", "  workspaces:\n  - {name: dev}"))]);
        let second = snapshot("kubernetes", &[("eng", &team("eng", "  workspaces:\n  - {name: other}"))]);
        let set = merge(&[first, second], &Defaults::default(), &DesiredSet::default());
        assert_eq!(set.workspaces.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["eng-dev"]);
        let dev = &set.workspaces[&ObjectKey::new("default", "eng-dev")];
        assert_eq!(dev.conflict.as_deref(), Some("team eng: also declared by kubernetes (eng@test)"));
        assert!(
            set.errors.iter().any(|e| e.starts_with("Team default/eng: also declared by kubernetes")),
            "{:?}",
            set.errors
        );
    }

    #[test]
    fn generation_carries_over_until_the_resolved_spec_changes() {
        let d = Defaults::default();
        let v1 = merge(&[snapshot("dir", &[("a.yaml", &ws("a", "{tier: 1}"))])], &d, &DesiredSet::default());
        let key = ObjectKey::new("default", "a");
        assert_eq!(v1.workspaces[&key].generation, 1);
        // Same spec written differently (an explicit default): same resolved spec.
        let v2 = merge(&[snapshot("dir", &[("a.yaml", &ws("a", "{tier: 1, operatingMode: Running}"))])], &d, &v1);
        assert_eq!(v2.workspaces[&key].generation, 1);
        let v3 = merge(&[snapshot("dir", &[("a.yaml", &ws("a", "{tier: 2}"))])], &d, &v2);
        assert_eq!(v3.workspaces[&key].generation, 2);
        let v4 = merge(&[snapshot("dir", &[("a.yaml", &ws("a", "{tier: 7}"))])], &d, &v3);
        assert_eq!(v4.workspaces[&key].generation, 3);
        // A team default changing a member's resolved spec bumps it too.
        let t = |tier: u8| team("eng", &format!("  defaults: {{tier: {tier}}}\n  workspaces:\n  - {{name: dev}}"));
        let t1 = merge(&[snapshot("dir", &[("t.yaml", &t(1))])], &d, &DesiredSet::default());
        let t2 = merge(&[snapshot("dir", &[("t.yaml", &t(2))])], &d, &t1);
        assert_eq!(t2.workspaces[&ObjectKey::new("default", "eng-dev")].generation, 2);
    }

    #[test]
    fn an_invalid_team_keeps_its_last_members_as_invalid_and_its_users_are_invalid() {
        let d = Defaults::default();
        let good = team("eng", "  workspaces:\n  - {name: dev}");
        let v1 = merge(
            &[snapshot("dir", &[("t.yaml", &good), ("pm.yaml", &ws("pm", "{team: eng}"))])],
            &d,
            &DesiredSet::default(),
        );
        eff(&v1, "eng-dev");
        let broken = team("eng", "  workspaces:\n  - {name: dev}\n  maxWorkspacez: 3");
        let v2 = merge(&[snapshot("dir", &[("t.yaml", &broken), ("pm.yaml", &ws("pm", "{team: eng}"))])], &d, &v1);
        let e = errs(&v2, "eng-dev");
        assert!(e[0].contains("team eng is invalid") && e[0].contains("maxWorkspacez"), "{e:?}");
        assert_eq!(v2.workspaces[&ObjectKey::new("default", "eng-dev")].owner_team.as_deref(), Some("eng"));
        assert!(errs(&v2, "pm")[0].contains("team eng is invalid"), "{:?}", errs(&v2, "pm"));
        assert!(v2.teams.contains_key(&ObjectKey::new("default", "eng")), "last good team kept");
        assert!(v2.errors.iter().any(|e| e.contains("maxWorkspacez")), "{:?}", v2.errors);
        // Fixed again: converges.
        let v3 = merge(&[snapshot("dir", &[("t.yaml", &good), ("pm.yaml", &ws("pm", "{team: eng}"))])], &d, &v2);
        eff(&v3, "eng-dev");
        eff(&v3, "pm");
        assert!(v3.errors.is_empty());
    }

    #[test]
    fn snapshot_errors_are_collected() {
        let set = merge1(&[("a.yaml", "a: [b\n"), ("b.yaml", &ws("b", "{}"))]);
        assert_eq!(set.errors.len(), 1);
        assert!(set.errors[0].starts_with("a.yaml:"), "{:?}", set.errors);
        eff(&set, "b");
    }

    #[test]
    fn namespaces_are_separate() {
        let text = "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: a, namespace: x}\nspec: {parent: root}\n---\n\
                    apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: root}\n";
        let set = merge1(&[("a.yaml", text)]);
        let a = &set.workspaces[&ObjectKey::new("x", "a")];
        assert!(a.spec.as_ref().unwrap_err()[0].contains("not declared in namespace x"));
    }
}

#[cfg(test)]
mod deletion_tests {
    use super::*;
    use crate::api::Workspace;

    fn ws(name: &str, parent: Option<&str>) -> SourceObject {
        let mut w = Workspace::new(name, WorkspaceSpec { parent: parent.map(str::to_string), ..Default::default() });
        w.metadata.namespace = Some("default".into());
        SourceObject::Workspace {
            object: Box::new(w),
            source: SourceRef { kind: "dir".into(), reference: format!("{name}.yaml") },
        }
    }

    fn set(objects: Vec<SourceObject>, previous: &DesiredSet) -> DesiredSet {
        let snap = Snapshot { source: "dir:x".into(), objects, errors: vec![] };
        merge(&[snap], &Defaults::default(), previous)
    }

    #[test]
    fn deleting_a_parent_whose_children_stay_is_refused_and_it_is_kept() {
        let before = set(vec![ws("pm", None), ws("dev", Some("pm")), ws("qa", Some("dev"))], &DesiredSet::default());
        let after = set(vec![ws("qa", Some("dev"))], &before);
        let pm = &after.workspaces[&ObjectKey::new("default", "pm")];
        let dev = &after.workspaces[&ObjectKey::new("default", "dev")];
        assert!(dev.deletion_refused.as_deref().unwrap().contains("qa"), "{dev:?}");
        assert!(pm.deletion_refused.as_deref().unwrap().contains("dev"), "{pm:?}");
        assert!(after.workspaces.values().all(|w| w.spec.is_ok()), "children stay valid: {after:?}");
        assert_eq!(pm.spec, before.workspaces[&ObjectKey::new("default", "pm")].spec);
    }

    #[test]
    fn deleting_a_parent_together_with_its_children_is_allowed() {
        let before = set(vec![ws("pm", None), ws("dev", Some("pm")), ws("other", None)], &DesiredSet::default());
        let after = set(vec![ws("other", None)], &before);
        assert_eq!(after.workspaces.len(), 1);
        assert!(after.errors.is_empty());
    }

    #[test]
    fn re_parenting_the_children_lets_the_parent_go() {
        let before = set(vec![ws("pm", None), ws("dev", Some("pm")), ws("lead", None)], &DesiredSet::default());
        let after = set(vec![ws("dev", Some("lead")), ws("lead", None)], &before);
        assert!(!after.workspaces.contains_key(&ObjectKey::new("default", "pm")));
    }
}
