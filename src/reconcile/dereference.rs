//! Dereference, the first step of a pass: everything the rules will look at, read.
//! The declaration becomes the rules' `Desired` (the workspace's secrets merged into
//! its env, its container config rendered and hashed); the observation becomes their
//! `Observed` (its containers from the cache, its record and live tokens from the
//! store, its token file through the memo, the rest of its team for the quota, the
//! last time heartbeats could not be recorded). IO only: nothing here decides.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{Context, ReconcileError};
use crate::model::{AgentReport, WorkspaceRecord};
use crate::observe::observe;
use crate::rules::quota::{Limits, Member};
use crate::rules::{Desired, Observed, TeamView};
use crate::runtime::render::{AgentEnv, Identity, render};
use crate::source::desired::{DesiredSet, DesiredWorkspace};
use crate::store::StoreError;

/// What one pass reads of one workspace.
pub(super) struct Inputs {
    pub desired: Option<Desired>,
    pub observed: Observed,
    /// The secrets' fingerprint read before the secrets were: a secret changed meanwhile
    /// then counts as changed (see sweep.rs).
    pub secrets_seen: u64,
}

/// Reads what the rules need about `key`, declared as `declared` (None: declared no
/// more) at `now`. None when there is nothing to look at: never seen, not declared,
/// no container.
pub(super) async fn dereference(
    ctx: &Context,
    key: &str,
    set: &DesiredSet,
    declared: Option<&DesiredWorkspace>,
    now: DateTime<Utc>,
) -> Result<Option<Inputs>, ReconcileError> {
    // The record and its agent's report in one query; a declared workspace seen for
    // the first time gets its record (and has no report yet).
    let (record, agent) = match (ctx.store.workspace_with_report(key).await?, declared) {
        (Some((record, agent)), _) => (Some(record), agent),
        (None, Some(_)) => (Some(ctx.store.ensure_workspace(key, now).await?), None),
        (None, None) => (None, None),
    };
    let secrets_seen = ctx.secrets_seen.load(std::sync::atomic::Ordering::SeqCst);
    let desired = match (declared, &record) {
        (Some(d), Some(r)) => Some(resolve(d, secret_env(ctx, d).await?, &ctx.instance, &r.uid, &ctx.agent)),
        _ => None,
    };
    let mut observed = observe_workspace(ctx, key, record, agent).await?;
    // A workspace naming a warm pool, before its first container or while its claim is
    // not finished: what the pool offers.
    if let (Some(d), Some(r)) = (declared, &observed.record)
        && (r.incarnation == 0 || r.claim.as_ref().is_some_and(|c| c.pending))
        && let Some(name) = d.spec.as_ref().ok().and_then(|s| s.warm_pool.as_deref())
    {
        observed.pool = super::pools::view(ctx, set, &d.key.namespace, name).await?;
    }
    if desired.as_ref().is_some_and(|d| d.spec.is_ok()) {
        ctx.token_memo.observe(ctx.runtime.as_ref(), key, &mut observed).await;
    }
    if let (Some(d), Some(_)) = (declared, &observed.containers) {
        observed.team = team_view(ctx, set, d).await?;
    }
    if observed.record.is_none() && observed.containers.as_ref().is_none_or(|c| c.is_empty()) {
        return Ok(None);
    }
    Ok(Some(Inputs { desired, observed, secrets_seen }))
}

/// The workspace's containers, record, agent report and live tokens, as they are now
/// (the token file not read). Also used to show an execution failure in the status.
pub(super) async fn observe_workspace(
    ctx: &Context,
    key: &str,
    record: Option<WorkspaceRecord>,
    agent: Option<AgentReport>,
) -> Result<Observed, StoreError> {
    let mut observed = observe(ctx.store.as_ref(), &ctx.containers, key, record).await?;
    observed.heartbeats_lost_at = ctx.lost_heartbeats.last();
    observed.agent = agent;
    Ok(observed)
}

/// The secrets a workspace receives as env vars: the Kubernetes Secrets its `envFrom`
/// names, then the operator's global, team and own secrets (each overriding the one
/// before). `hold` says why a needed Secret cannot be read.
async fn secret_env(ctx: &Context, d: &DesiredWorkspace) -> Result<crate::secrets::EnvFrom, ReconcileError> {
    use crate::secrets::SecretScope;
    let Ok(spec) = &d.spec else { return Ok(Default::default()) };
    let mut out = crate::secrets::env_from(&d.key.namespace, &spec.env_from, ctx.secret_objects.as_deref());
    let mut scopes = vec![SecretScope::Global];
    if let Some(team) = d.team() {
        scopes.push(SecretScope::Team(format!("{}/{team}", d.key.namespace)));
    }
    scopes.push(SecretScope::Workspace(d.key.to_string()));
    let names: Vec<String> = scopes.iter().map(SecretScope::as_string).collect();
    let rows = ctx.store.secrets(&names).await?;
    if rows.is_empty() {
        out.env.extend(spec.source_secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        return Ok(out);
    }
    let keyring = ctx.keyring.as_ref().ok_or(ReconcileError::NoKeyring)?;
    for scope in &scopes {
        let scope_name = scope.as_string();
        // What the source read with the declaration (an org's .env files) counts as
        // the workspace's secrets, below those set with `secret set`.
        if matches!(scope, SecretScope::Workspace(_)) {
            out.env.extend(spec.source_secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for row in rows.iter().filter(|r| r.scope == scope_name) {
            let sealed = crate::secrets::Sealed {
                key_id: row.key_id.clone(),
                nonce: row.nonce.clone(),
                ciphertext: row.ciphertext.clone(),
            };
            out.env.insert(row.name.clone(), keyring.open(scope, &row.name, &sealed)?);
        }
    }
    Ok(out)
}

/// The declaration as the rules see it: secrets in the env, the config hashed.
fn resolve(
    d: &DesiredWorkspace,
    secrets: crate::secrets::EnvFrom,
    instance: &str,
    uid: &str,
    agent: &AgentEnv,
) -> Desired {
    let key = d.key.to_string();
    // Secrets join the env here only: never in the desired set the API shows. `${VAR}`
    // in env values and config files expands from them; `requiredEnv` is checked last.
    let mut hold = secrets.hold;
    let spec = d.spec.clone().map(|mut s| {
        use crate::api::interpolate::{expand, missing_message, missing_required};
        if !secrets.env.is_empty() {
            for (_, value) in s.env.iter_mut() {
                if value.contains("${") {
                    *value = expand(value, &secrets.env);
                }
            }
            for text in s.config_files.values_mut() {
                if text.contains("${") {
                    *text = expand(text, &secrets.env);
                }
            }
        }
        s.env.extend(secrets.env);
        let missing = match s.required_env.is_empty() {
            true => Vec::new(),
            false => {
                let env: std::collections::BTreeMap<String, String> =
                    s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                missing_required(&s.required_env, &env)
            }
        };
        if !missing.is_empty() {
            let why = missing_message(&missing);
            hold = Some(match hold.take() {
                Some(h) => format!("{h}; {why}"),
                None => why,
            });
        }
        s
    });
    let (spec_hash, applied) = match &spec {
        Ok(spec) => {
            let cs = render(spec, &Identity { instance, key: &key, uid }, agent);
            let hash = cs.labels.get(crate::model::container::labels::SPEC_HASH).cloned().unwrap_or_default();
            (hash, Some(crate::model::container::AppliedConfig::of(&cs)))
        }
        Err(_) => (String::new(), None),
    };
    Desired {
        key: d.key.clone(),
        generation: d.generation,
        spec,
        spec_hash,
        source: d.source.clone(),
        secrets_unreadable: hold,
        applied,
    }
}

/// The team a declared workspace belongs to and its quota limits, if it has any.
pub(super) fn team_limits<'a>(set: &'a DesiredSet, d: &DesiredWorkspace) -> Option<(&'a str, Limits)> {
    let team_name = d.team()?;
    let (key, team) = set.teams.iter().find(|(k, _)| k.namespace == d.key.namespace && k.name == team_name)?;
    let limits = Limits { max_workspaces: team.spec.max_workspaces, max_running: team.spec.max_running };
    (limits != Limits::default()).then_some((key.name.as_str(), limits))
}

/// The other members of `d`'s team, as its quota sees them. Only read for teams that
/// have limits.
async fn team_view(ctx: &Context, set: &DesiredSet, d: &DesiredWorkspace) -> Result<TeamView, StoreError> {
    let Some((team, limits)) = team_limits(set, d) else { return Ok(TeamView::NoQuota) };
    let members: Vec<&DesiredWorkspace> = set
        .workspaces
        .values()
        .filter(|w| w.key.namespace == d.key.namespace && team_limits(set, w).is_some_and(|(t, _)| t == team))
        .collect();
    let mut records: HashMap<String, WorkspaceRecord> =
        ctx.store.list_workspaces().await?.into_iter().map(|r| (r.key.clone(), r)).collect();
    // Every member gets its first-seen time now, so that concurrent reconciles of the
    // team all rank the members the same way and never start more than the quota.
    for w in &members {
        let key = w.key.to_string();
        if let std::collections::hash_map::Entry::Vacant(slot) = records.entry(key.clone()) {
            slot.insert(ctx.store.ensure_workspace(&key, Utc::now()).await?);
        }
    }
    let mut others = Vec::with_capacity(members.len());
    for w in members.into_iter().filter(|w| w.key != d.key) {
        let record = records.get(&w.key.to_string());
        let mine = match record {
            // Unknown (the cache went unknown since this pass observed): never count a
            // member as having no container.
            Some(r) => match ctx.containers.containers_of_uid(&r.uid) {
                Some(mine) => mine,
                None => return Ok(TeamView::Unknown),
            },
            None => Vec::new(),
        };
        let own =
            record.and_then(|r| r.mode_override).or(w.spec.as_ref().ok().map(|s| s.operating_mode)).unwrap_or_default();
        // A member suspended by the lifecycle autopilot wants what its suspension says.
        let suspension = record.zip(w.spec.as_ref().ok()).and_then(|(r, s)| crate::rules::suspend::in_force(r, s));
        let mode = crate::rules::suspend::mode(own, suspension);
        others.push(Member {
            name: w.key.name.clone(),
            first_seen: record.map(|r| r.created_at),
            has_container: !mine.is_empty(),
            running: mine.iter().any(|c| c.state == crate::rules::ContainerState::Running),
            wants_container: w.spec.is_ok() && mode != crate::api::OperatingMode::Stopped,
            wants_running: w.spec.is_ok() && mode == crate::api::OperatingMode::Running,
        });
    }
    Ok(TeamView::Known { team: team.to_string(), limits, others })
}
