//! claim: a workspace naming a warm pool (`spec.warmPool`) that needs its first
//! container takes a ready member of the pool instead of a new one, when the pool's
//! template satisfies its spec ([`satisfies`]). The member takes the workspace's
//! identity (the store gives the workspace the member's uid), a new token and the
//! workspace's env overlay are written into its `/configs`, and the waiting agent
//! registers. Nothing is created. When the pool cannot serve it, the provision rule
//! creates a container as usual and its cause says why ([`fallback`]).
//!
//! Only a workspace's first container is claimed (incarnation 0): later provisions
//! (exit, drift, restart) create their own, as members are never returned to a pool.

use super::*;

/// The warm pool a workspace names, as the pass saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum PoolView {
    /// The workspace names no pool, or the pool was not looked at (the resync sweep).
    #[default]
    NotAsked,
    /// The pool's resolved template and its ready (running, unclaimed) members, oldest
    /// first; None when the runtime could not be listed. `files_fixed`: the runtime
    /// fixes a container's config files when it creates it (Kubernetes mounts them
    /// from a Secret), so a claim cannot give a member other files than its template's.
    Offer {
        pool: String,
        template: std::sync::Arc<EffectiveSpec>,
        members: Option<Vec<ContainerInfo>>,
        files_fixed: bool,
    },
}

/// Env a runtime reads when its process starts (the loader, the shell, the
/// interpreter) or the operator sets itself: these must be in the process
/// environment, which a running member cannot change.
fn must_be_in_process_env(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "SHELL",
        "LANG",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "PYTHONHOME",
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "WORKSPACE_ID",
        "WORKSPACE_CONFIG_PATH",
        "PLATFORM_URL",
        "PARENT_ID",
        "TIER",
    ];
    const PREFIXES: &[&str] = &["LD_", "LC_", "MALLOC_", "MOLECULE_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether a member started from `template` can become a workspace of `spec`, and
/// the env overlay it is then given (the workspace's env that the template does not
/// already set to the same value); else why not, as the decision log says it.
///
/// Satisfied means: the same image, tier, memory, CPUs, security, network and
/// parent-less start; and every env var that differs from the template's is one the
/// agent can take from `/configs` (not one that must be in the process environment,
/// see [`must_be_in_process_env`]). The template's other env stays in the process,
/// as a Team's defaults would.
pub fn satisfies(template: &EffectiveSpec, spec: &EffectiveSpec) -> Result<BTreeMap<String, String>, String> {
    if template.image != spec.image {
        return Err(format!("image differs (pool {}, workspace {})", template.image, spec.image));
    }
    if template.tier != spec.tier {
        return Err(format!("tier differs (pool {}, workspace {})", template.tier, spec.tier));
    }
    if (template.memory_bytes, template.nano_cpus) != (spec.memory_bytes, spec.nano_cpus) {
        return Err("resources differ".into());
    }
    if template.security != spec.security {
        return Err("security differs".into());
    }
    if template.network != spec.network {
        return Err(format!("network differs (pool {}, workspace {})", template.network, spec.network));
    }
    if spec.parent.is_some() {
        // PARENT_ID is in the process environment of a workspace with a parent.
        return Err("a workspace with a parent needs PARENT_ID in its process environment".into());
    }
    let mut overlay = BTreeMap::new();
    let mut in_process = Vec::new();
    for (k, v) in spec.env.iter() {
        if template.env.get(k) == Some(v) {
            continue;
        }
        if must_be_in_process_env(k) {
            in_process.push(k.as_str());
        } else {
            overlay.insert(k.clone(), v.clone());
        }
    }
    if !in_process.is_empty() {
        return Err(format!("env {} must be in the process environment", in_process.join(", ")));
    }
    Ok(overlay)
}

/// The member to claim, or why the pool cannot serve this workspace now (None: it
/// names no pool, or needs no container).
#[allow(clippy::type_complexity)]
fn offer<'a>(facts: &Facts<'a>) -> Option<Result<(&'a str, &'a ContainerInfo, BTreeMap<String, String>), String>> {
    let spec = facts.spec()?;
    let pool_name = spec.warm_pool.as_deref()?;
    let PoolView::Offer { pool, template, members, files_fixed } = &facts.observed.pool else { return None };
    let record = facts.observed.record.as_ref()?;
    if !facts.wants_container()? || facts.observed.container().is_some() {
        return None;
    }
    if facts.mode() != Some(OperatingMode::Running) {
        return Some(Err(format!("warm pool {pool_name} serves Running workspaces only")));
    }
    if record.incarnation > 0 {
        return Some(Err(format!(
            "warm pool {pool_name} serves a workspace's first container only (this is incarnation {})",
            record.incarnation + 1
        )));
    }
    let overlay = match satisfies(template, spec) {
        Ok(_) if *files_fixed && template.config_files != spec.config_files => {
            return Some(Err(format!(
                "warm pool {pool} cannot serve it: config files differ (a Pod's are mounted when it is created)"
            )));
        }
        Ok(overlay) => overlay,
        Err(why) => return Some(Err(format!("warm pool {pool} cannot serve it: {why}"))),
    };
    let members = members.as_ref()?;
    // Workspaces claiming at once start from different members (a member taken by
    // another is refused by the store, and that reconcile retries).
    let spread = facts.desired.map_or(0, |d| {
        d.key
            .to_string()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    });
    match members.get((spread % members.len().max(1) as u64) as usize) {
        Some(m) => Some(Ok((pool.as_str(), m, overlay))),
        None => Some(Err(format!("warm pool {pool} has no ready member"))),
    }
}

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    facts.observed.containers.as_ref()?; // listing failed: unknown, do nothing
    if let Some(v) = unfinished(facts) {
        return Some(v);
    }
    if facts.quota_hold().is_some() {
        return None;
    }
    let (pool, member, overlay) = offer(facts)?.ok()?;
    let uid = member.uid()?;
    Some(Verdict::new(
        format!("no container; claiming {} from warm pool {pool}", member.name),
        vec![Action::Claim { pool: pool.to_string(), id: member.id.clone(), uid: uid.to_string(), overlay }],
    ))
}

/// A claim the store holds as pending (the operator stopped, or a write failed, before
/// the identity was in the member's `/configs`): claimed again, which writes every
/// file anew (`Executor::claim`). Only while the member runs as the workspace's
/// container and the pool's template still satisfies the spec (for the overlay);
/// otherwise the agent never registers and the heartbeat rule replaces the member.
fn unfinished(facts: &Facts<'_>) -> Option<Verdict> {
    let record = facts.observed.record.as_ref()?;
    let claim = record.claim.as_ref().filter(|c| c.pending)?;
    let member = facts.observed.current_running().filter(|c| c.id == claim.container_id)?;
    if facts.mode() != Some(OperatingMode::Running) {
        return None;
    }
    let PoolView::Offer { pool, template, .. } = &facts.observed.pool else { return None };
    let overlay = satisfies(template, facts.spec()?).ok()?;
    Some(Verdict::new(
        format!("the claim of {} from warm pool {pool} was not finished; writing its files again", member.name),
        vec![Action::Claim { pool: pool.clone(), id: member.id.clone(), uid: record.uid.clone(), overlay }],
    ))
}

/// Why a workspace that names a pool is provisioned normally instead (for the
/// provision rule's cause).
pub fn fallback(facts: &Facts<'_>) -> Option<String> {
    offer(facts)?.err()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::api::WorkspaceSpec;
    use crate::api::effective::{Defaults, resolve};
    use crate::model::container::labels;

    fn eff(spec: WorkspaceSpec) -> EffectiveSpec {
        resolve(&spec, &Defaults::default()).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_same_image_and_tier_with_plain_env_is_satisfied_and_the_difference_is_the_overlay() {
        let t = eff(WorkspaceSpec { env: env(&[("MODEL", "sonnet"), ("LOG", "info")]), ..Default::default() });
        let ws = eff(WorkspaceSpec { env: env(&[("MODEL", "sonnet"), ("ROLE", "dev")]), ..Default::default() });
        assert_eq!(satisfies(&t, &ws), Ok(env(&[("ROLE", "dev")])));
        assert_eq!(satisfies(&t, &t), Ok(BTreeMap::new()));
    }

    #[test]
    fn image_tier_resources_network_and_process_env_are_not_satisfied_each_saying_why() {
        let t = eff(WorkspaceSpec::default());
        let cases = [
            (WorkspaceSpec { image: Some("other:1".into()), ..Default::default() }, "image differs"),
            (WorkspaceSpec { tier: Some(3), ..Default::default() }, "tier differs"),
            (
                WorkspaceSpec {
                    resources: Some(crate::api::Resources { memory: Some("1Gi".into()), cpus: None }),
                    ..Default::default()
                },
                "resources differ",
            ),
            (WorkspaceSpec { network: Some("other".into()), ..Default::default() }, "network differs"),
            (WorkspaceSpec { env: env(&[("LD_PRELOAD", "/x.so")]), ..Default::default() }, "LD_PRELOAD"),
            (WorkspaceSpec { env: env(&[("PATH", "/bin")]), ..Default::default() }, "PATH"),
            (WorkspaceSpec { parent: Some("pm".into()), ..Default::default() }, "PARENT_ID"),
        ];
        for (spec, want) in cases {
            let why = satisfies(&t, &eff(spec)).unwrap_err();
            assert!(why.contains(want), "{why} !~ {want}");
        }
        // The same process env as the template's is fine.
        let t = eff(WorkspaceSpec { env: env(&[("PATH", "/bin")]), ..Default::default() });
        assert!(satisfies(&t, &t.clone()).is_ok());
    }

    fn member(id: &str) -> ContainerInfo {
        let mut c = container(1, ContainerState::Running).labelled(labels::UID, "member-uid-1");
        c.labels.remove(labels::WORKSPACE);
        c.id = id.into();
        c.name = "ws-member-uid-".into();
        c
    }

    /// The claim of member `m1` of pool `default/p`, with no env overlay.
    fn claim_of_m1() -> Action {
        Action::Claim {
            pool: "default/p".into(),
            id: "m1".into(),
            uid: "member-uid-1".into(),
            overlay: BTreeMap::new(),
        }
    }

    fn pooled(members: Vec<ContainerInfo>) -> (Desired, Observed) {
        let des = desired_with(WorkspaceSpec { warm_pool: Some("p".into()), ..Default::default() });
        let mut obs = healthy().without_container().without_tokens();
        obs.record.as_mut().unwrap().incarnation = 0;
        obs.pool = PoolView::Offer {
            pool: "default/p".into(),
            template: std::sync::Arc::new(eff(WorkspaceSpec::default())),
            members: Some(members),
            files_fixed: false,
        };
        (des, obs)
    }

    #[test]
    fn a_first_container_is_claimed_from_a_ready_member() {
        let (des, obs) = pooled(vec![member("m1")]);
        let s = settings();
        let v = rule(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(v.actions, vec![claim_of_m1()]);
        assert!(!v.creates_container(), "a claim creates no container");
        assert_eq!(fallback(&facts(Some(&des), &obs, &s)), None);
        // plan() picks the claim, not a provision.
        assert_eq!(plan(&facts(Some(&des), &obs, &s)).decision().unwrap().rule, "claim");
    }

    #[test]
    fn an_empty_pool_a_later_incarnation_or_an_unsatisfied_spec_falls_back_with_the_reason() {
        let s = settings();
        let (des, obs) = pooled(vec![]);
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        let d = plan(&facts(Some(&des), &obs, &s)).decision().unwrap();
        assert_eq!(d.rule, "provision");
        assert!(d.cause.contains("warm pool default/p has no ready member"), "{}", d.cause);

        let (des, mut obs) = pooled(vec![member("m1")]);
        obs.record.as_mut().unwrap().incarnation = 2;
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        assert!(fallback(&facts(Some(&des), &obs, &s)).unwrap().contains("first container only"));

        let (_, obs) = pooled(vec![member("m1")]);
        let des = desired_with(WorkspaceSpec { warm_pool: Some("p".into()), tier: Some(4), ..Default::default() });
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        let d = plan(&facts(Some(&des), &obs, &s)).decision().unwrap();
        assert!(d.cause.contains("cannot serve it: tier differs"), "{}", d.cause);
    }

    #[test]
    fn where_config_files_are_fixed_at_creation_other_files_fall_back() {
        let s = settings();
        let files = BTreeMap::from([("prompt.md".to_string(), "hi".to_string())]);
        let (_, mut obs) = pooled(vec![member("m1")]);
        let des = desired_with(WorkspaceSpec {
            warm_pool: Some("p".into()),
            config_files: files.clone(),
            ..Default::default()
        });
        // Docker writes them at the claim.
        assert!(rule(&facts(Some(&des), &obs, &s)).is_some());
        // A Pod mounts its template's: a normal provision, saying why.
        if let PoolView::Offer { files_fixed, .. } = &mut obs.pool {
            *files_fixed = true;
        }
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        assert!(fallback(&facts(Some(&des), &obs, &s)).unwrap().contains("config files differ"));
        // The template's own files are fine.
        let template = eff(WorkspaceSpec { config_files: files, ..Default::default() });
        if let PoolView::Offer { template: t, .. } = &mut obs.pool {
            *t = std::sync::Arc::new(template);
        }
        assert!(rule(&facts(Some(&des), &obs, &s)).is_some());
    }

    #[test]
    fn nothing_is_claimed_while_containers_are_unknown_or_a_container_exists() {
        let s = settings();
        let (des, mut obs) = pooled(vec![member("m1")]);
        obs.containers = None;
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        let (des, mut obs) = pooled(vec![member("m1")]);
        obs.containers = Some(vec![container(0, ContainerState::Running)]);
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
    }

    /// A workspace whose claim of m1 the store holds, pending or complete.
    fn claimed(pending: bool) -> (Desired, Observed) {
        let (des, mut obs) = pooled(vec![]);
        let mut m = member("m1");
        m.labels.insert(labels::WORKSPACE.into(), "default/dev".into());
        obs.containers = Some(vec![m]);
        let r = obs.record.as_mut().unwrap();
        r.uid = "member-uid-1".into();
        r.incarnation = 1;
        r.claim = Some(crate::model::Claim {
            pool: "default/p".into(),
            container_id: "m1".into(),
            spec_hash: "h".into(),
            at: now(),
            pending,
        });
        (des, obs)
    }

    #[test]
    fn a_claim_left_pending_is_carried_out_again_and_a_complete_one_is_not() {
        let s = settings();
        let (des, obs) = claimed(true);
        let v = rule(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(v.actions, vec![claim_of_m1()]);
        assert!(v.cause.contains("not finished"), "{}", v.cause);
        assert_eq!(plan(&facts(Some(&des), &obs, &s)).decision().unwrap().rule, "claim", "before token-file");
        let (des, obs) = claimed(false);
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
        // Not once the member is gone: the provision rule makes a container.
        let (des, mut obs) = claimed(true);
        obs.containers = Some(vec![]);
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
    }
}
