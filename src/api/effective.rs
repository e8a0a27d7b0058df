//! The effective spec: a Workspace's own fields, then its Team's defaults, then the
//! operator's defaults, resolved and parsed. Rules and the runtime only ever see this.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use litemap::LiteMap;
use serde::{Deserialize, Serialize};

use super::{
    EnvFromSource, ImagePullPolicy, OnPause, OnResume, OperatingMode, Security, SuspendTo, UpdatePolicy, WakePolicy,
    WorkspaceSpec, duration, tiers,
};

pub const DEFAULT_STALE_GRACE: Duration = Duration::from_secs(300);
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(60);

/// Operator-wide settings the effective spec depends on.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Image for a runtime; `{runtime}` is replaced. Local mode: `molecule-agent:local`.
    pub image_template: String,
    pub default_runtime: String,
    /// The operator's network for workspaces (`runtime::network`; it sets this from
    /// `--network`). `host` here by default only for what runs without an operator
    /// (tests, the simulated runtime).
    pub network: String,
    pub allow_privileged: bool,
    /// The agents' heartbeat interval: `lifecycle.idleAfter` must be at least twice it.
    pub heartbeat_interval: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            image_template: "molecule-agent:local".into(),
            default_runtime: "langgraph".into(),
            network: "host".into(),
            allow_privileged: false,
            heartbeat_interval: Duration::from_secs(30),
        }
    }
}

/// `spec.lifecycle`, resolved (see `WorkspaceSpec::lifecycle`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveLifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde_opt")]
    pub idle_after: Option<Duration>,
    pub suspend_to: SuspendTo,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde_opt")]
    pub max_lifetime: Option<Duration>,
    pub wake: WakePolicy,
}

impl EffectiveLifecycle {
    /// Whether the autopilot has anything to do for this workspace.
    pub fn enabled(&self) -> bool {
        self.idle_after.is_some() || self.max_lifetime.is_some()
    }

    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveTokenPolicy {
    #[serde(with = "humantime_serde_secs")]
    pub stale_grace: Duration,
    pub on_pause: OnPause,
    #[serde(default)]
    pub on_resume: OnResume,
    #[serde(default, with = "humantime_serde_opt")]
    pub rotate_every: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub max_age: Option<Duration>,
    #[serde(with = "humantime_serde_secs")]
    pub overlap: Duration,
}

/// Serialized (camelCase, durations as text like `5m`) it is also what the admin API
/// shows as a workspace's effective spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSpec {
    pub team: Option<String>,
    pub parent: Option<String>,
    /// Shared by every workspace with the same value (see `source::desired::merge`).
    pub runtime: Arc<str>,
    pub image: Arc<str>,
    pub image_pull_policy: ImagePullPolicy,
    pub tier: u8,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub read_only_root: bool,
    pub tmp_tmpfs_bytes: Option<i64>,
    /// A sorted flat map: a `BTreeMap` with one entry takes a 544-byte node, and the
    /// operator keeps one of these per workspace (bench/scale).
    #[serde(serialize_with = "env_as_map")]
    pub env: LiteMap<String, String>,
    /// Kubernetes Secrets whose keys join `env` (names only; values are read at
    /// reconcile time and never kept in the spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    pub operating_mode: OperatingMode,
    pub restarted_at: Option<DateTime<Utc>>,
    pub update_policy: UpdatePolicy,
    pub token_policy: EffectiveTokenPolicy,
    pub security: Security,
    pub network: Arc<str>,
    /// Files for `/configs` (see `WorkspaceSpec::config_files`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub config_files: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_env: Vec<String>,
    /// `healthPolicy.restartWedgedAfter`: restart an agent wedged this long.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde_opt")]
    pub restart_wedged_after: Option<Duration>,
    /// `warmPool`: the WarmPool (same namespace) a first container is claimed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<String>,
    /// `lifecycle`: idle suspension, lifetime, wake policy.
    #[serde(default, skip_serializing_if = "EffectiveLifecycle::is_default")]
    pub lifecycle: EffectiveLifecycle,
    /// Never serialized (see `WorkspaceSpec::source_secrets`).
    #[serde(skip)]
    pub source_secrets: std::collections::BTreeMap<String, String>,
}

/// Fills every field the workspace leaves out from `defaults` (a Team's `spec.defaults`).
/// A member's own value wins; env maps merge key by key, and `envFrom` lists the
/// team's Secrets before the member's (so the member's keys win).
pub fn inherit(own: &WorkspaceSpec, defaults: Option<&WorkspaceSpec>) -> WorkspaceSpec {
    let Some(d) = defaults else { return own.clone() };
    let mut env = d.env.clone();
    env.extend(own.env.clone());
    let mut env_from = d.env_from.clone();
    env_from.retain(|e| !own.env_from.contains(e));
    env_from.extend(own.env_from.iter().cloned());
    let token_policy = match (&own.token_policy, &d.token_policy) {
        (Some(o), Some(t)) => Some(super::TokenPolicy {
            stale_grace: o.stale_grace.clone().or(t.stale_grace.clone()),
            on_pause: o.on_pause.or(t.on_pause),
            on_resume: o.on_resume.or(t.on_resume),
            rotate_every: o.rotate_every.clone().or(t.rotate_every.clone()),
            max_age: o.max_age.clone().or(t.max_age.clone()),
            overlap: o.overlap.clone().or(t.overlap.clone()),
        }),
        (o, t) => o.clone().or(t.clone()),
    };
    WorkspaceSpec {
        team: own.team.clone().or(d.team.clone()),
        parent: own.parent.clone().or(d.parent.clone()),
        runtime: own.runtime.clone().or(d.runtime.clone()),
        // An explicit image wins over a runtime at the same level only: a member that
        // names its own runtime does not inherit the team's image.
        image: own.image.clone().or(if own.runtime.is_some() { None } else { d.image.clone() }),
        image_pull_policy: own.image_pull_policy.or(d.image_pull_policy),
        tier: own.tier.or(d.tier),
        resources: own.resources.clone().or(d.resources.clone()),
        env,
        env_from,
        operating_mode: own.operating_mode.or(d.operating_mode),
        restarted_at: own.restarted_at.or(d.restarted_at),
        update_policy: own.update_policy.or(d.update_policy),
        token_policy,
        security: own.security.clone().or(d.security.clone()),
        network: own.network.clone().or(d.network.clone()),
        config_files: if own.config_files.is_empty() { d.config_files.clone() } else { own.config_files.clone() },
        required_env: {
            let mut all = d.required_env.clone();
            all.extend(own.required_env.iter().filter(|r| !d.required_env.contains(r)).cloned());
            all
        },
        health_policy: match (&own.health_policy, &d.health_policy) {
            (Some(o), Some(t)) => Some(super::HealthPolicy {
                restart_wedged_after: o.restart_wedged_after.clone().or(t.restart_wedged_after.clone()),
            }),
            (o, t) => o.clone().or(t.clone()),
        },
        warm_pool: own.warm_pool.clone().or(d.warm_pool.clone()),
        lifecycle: match (&own.lifecycle, &d.lifecycle) {
            (Some(o), Some(t)) => Some(super::Lifecycle {
                idle_after: o.idle_after.clone().or(t.idle_after.clone()),
                suspend_to: o.suspend_to.or(t.suspend_to),
                max_lifetime: o.max_lifetime.clone().or(t.max_lifetime.clone()),
                wake: o.wake.or(t.wake),
            }),
            (o, t) => o.clone().or(t.clone()),
        },
        source_secrets: {
            let mut all = d.source_secrets.clone();
            all.extend(own.source_secrets.clone());
            all
        },
    }
}

/// Resolves a (possibly inherited) spec into the effective one. Every problem is
/// reported, each as a sentence naming the field and what to write instead.
pub fn resolve(spec: &WorkspaceSpec, defaults: &Defaults) -> Result<EffectiveSpec, Vec<String>> {
    let mut errors = Vec::new();
    let tier = spec.tier.unwrap_or(tiers::DEFAULT_TIER);
    let limits = tiers::limits(tier).unwrap_or_else(|| {
        errors.push(format!("tier: {tier} is out of range; use 1, 2, 3 or 4"));
        tiers::limits(tiers::DEFAULT_TIER).expect("default tier exists")
    });
    let mut memory_bytes = limits.memory_bytes;
    let mut nano_cpus = limits.nano_cpus;
    if let Some(r) = &spec.resources {
        if let Some(m) = &r.memory {
            match tiers::parse_memory(m) {
                Ok(b) => memory_bytes = b,
                Err(e) => errors.push(e),
            }
        }
        if let Some(c) = r.cpus {
            if !(c > 0.0 && c <= 256.0) {
                errors.push(format!("resources.cpus: {c} is out of range; use a number like 0.5 or 2"));
            } else {
                nano_cpus = (c * 1e9) as i64;
            }
        }
    }
    let tp = spec.token_policy.clone().unwrap_or_default();
    let mut dur = |field: &str, v: &Option<String>| -> Option<Duration> {
        v.as_ref().and_then(|s| duration::parse(field, s).map_err(|e| errors.push(e)).ok())
    };
    let stale_grace = dur("tokenPolicy.staleGrace", &tp.stale_grace).unwrap_or(DEFAULT_STALE_GRACE);
    let rotate_every = dur("tokenPolicy.rotateEvery", &tp.rotate_every);
    let max_age = dur("tokenPolicy.maxAge", &tp.max_age);
    let overlap = dur("tokenPolicy.overlap", &tp.overlap).unwrap_or(DEFAULT_OVERLAP);
    let hp = spec.health_policy.clone().unwrap_or_default();
    let restart_wedged_after = dur("healthPolicy.restartWedgedAfter", &hp.restart_wedged_after);
    let lc = spec.lifecycle.clone().unwrap_or_default();
    let idle_after = dur("lifecycle.idleAfter", &lc.idle_after);
    let max_lifetime = dur("lifecycle.maxLifetime", &lc.max_lifetime);
    if restart_wedged_after.is_some_and(|d| d < Duration::from_secs(1)) {
        errors.push("healthPolicy.restartWedgedAfter: must be at least 1s, e.g. 5m".into());
    }
    if idle_after.is_some_and(|d| d.is_zero()) {
        errors.push("lifecycle.idleAfter: must be longer than zero, e.g. 15m".into());
    } else if let Some(d) = idle_after.filter(|d| *d < defaults.heartbeat_interval * 2) {
        errors.push(format!(
            "lifecycle.idleAfter: {} is shorter than twice the heartbeat interval ({}): an agent reports its \
             tasks only that often; write at least {}",
            humantime::format_duration(d),
            humantime::format_duration(defaults.heartbeat_interval),
            humantime::format_duration(defaults.heartbeat_interval * 2)
        ));
    }
    if max_lifetime.is_some_and(|d| d.is_zero()) {
        errors.push("lifecycle.maxLifetime: must be longer than zero, e.g. 8h".into());
    }
    if rotate_every.is_some_and(|d| d < Duration::from_secs(1)) {
        errors.push("tokenPolicy.rotateEvery: must be at least 1s".into());
    }
    if max_age.is_some_and(|m| m <= overlap) {
        errors.push("tokenPolicy.maxAge: must be longer than tokenPolicy.overlap (the old token lives that long after a rotation)".into());
    }
    let security = spec.security.clone().unwrap_or_default();
    if security.any() && !defaults.allow_privileged {
        errors.push(
            "security: privileged, hostPid and dockerSocket are refused unless the operator runs with --allow-privileged"
                .to_string(),
        );
    }
    let network = spec.network.as_deref().unwrap_or(&defaults.network);
    if network != defaults.network && shares_a_namespace(network) && !defaults.allow_privileged {
        errors.push(format!(
            "network: {network:?} shares another network namespace (the host's loopback and every agent's traffic, \
             or another container's); refused unless the operator runs with --allow-privileged (or --network {network})"
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            errors.push(format!("env: {key:?} is not a valid variable name"));
        }
    }
    for (i, e) in spec.env_from.iter().enumerate() {
        if let Err(why) = super::validate::dns_subdomain(&e.secret_ref.name) {
            errors.push(format!("envFrom[{i}].secretRef.name: {why}"));
        }
        if let Some(p) = e.prefix.as_deref().filter(|p| p.contains('=') || p.contains('\0')) {
            errors.push(format!("envFrom[{i}].prefix: {p:?} cannot be part of a variable name"));
        }
    }
    for path in spec.config_files.keys() {
        if let Err(why) = super::interpolate::config_file_path(path) {
            errors.push(format!("configFiles: {path:?} {why}"));
        }
    }
    for (i, r) in spec.required_env.iter().enumerate() {
        if r.split('|').any(|v| v.is_empty() || v.contains('=') || v.contains('\0')) {
            errors.push(format!("requiredEnv[{i}]: {r:?} is not a variable name (or `A|B` for either)"));
        }
    }
    let runtime = spec.runtime.clone().unwrap_or_else(|| defaults.default_runtime.clone());
    let image = spec.image.clone().unwrap_or_else(|| defaults.image_template.replace("{runtime}", &runtime));
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(EffectiveSpec {
        team: spec.team.clone(),
        parent: spec.parent.clone(),
        runtime: runtime.into(),
        image: image.into(),
        image_pull_policy: spec.image_pull_policy.unwrap_or_default(),
        tier,
        memory_bytes,
        nano_cpus,
        read_only_root: limits.read_only_root,
        tmp_tmpfs_bytes: limits.tmp_tmpfs_bytes,
        env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        env_from: spec.env_from.clone(),
        operating_mode: spec.operating_mode.unwrap_or_default(),
        restarted_at: spec.restarted_at,
        update_policy: spec.update_policy.unwrap_or_default(),
        token_policy: EffectiveTokenPolicy {
            stale_grace,
            on_pause: tp.on_pause.unwrap_or_default(),
            on_resume: tp.on_resume.unwrap_or_default(),
            rotate_every,
            max_age,
            overlap,
        },
        security,
        network: network.into(),
        config_files: spec.config_files.clone(),
        required_env: spec.required_env.clone(),
        restart_wedged_after,
        warm_pool: spec.warm_pool.clone(),
        lifecycle: EffectiveLifecycle {
            idle_after,
            suspend_to: lc.suspend_to.unwrap_or_default(),
            max_lifetime,
            wake: lc.wake.unwrap_or_default(),
        },
        source_secrets: spec.source_secrets.clone(),
    })
}

/// Always a JSON object, as a `BTreeMap` was (`LiteMap` writes an empty one as `[]`).
fn env_as_map<S: serde::Serializer>(env: &LiteMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(env.iter())
}

mod humantime_serde_secs {
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_opt {
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Network modes that put a container in a namespace it shares with others: the
/// host's, or another container's (`container:NAME`). A manifest may ask for one only
/// if it is the operator's own choice or the operator runs with `--allow-privileged`.
pub fn shares_a_namespace(network: &str) -> bool {
    network == "host" || network.starts_with("container:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_container_modes_share_a_namespace() {
        assert!(shares_a_namespace("host"));
        assert!(shares_a_namespace("container:ws-0123"));
        assert!(!shares_a_namespace("molecule-i"));
        assert!(!shares_a_namespace("bridge"));
    }

    #[test]
    fn env_from_lists_the_teams_secrets_first_so_the_members_win_and_names_are_checked() {
        let from = |name: &str| crate::api::EnvFromSource {
            secret_ref: crate::api::SecretEnvSource { name: name.into(), optional: false },
            prefix: None,
        };
        let team = WorkspaceSpec { env_from: vec![from("team-keys"), from("shared")], ..Default::default() };
        let own = WorkspaceSpec { env_from: vec![from("shared"), from("mine")], ..Default::default() };
        let merged = inherit(&own, Some(&team));
        let names: Vec<&str> = merged.env_from.iter().map(|e| e.secret_ref.name.as_str()).collect();
        assert_eq!(names, ["team-keys", "shared", "mine"]);
        let bad = WorkspaceSpec { env_from: vec![from("Bad_Name")], ..Default::default() };
        let errors = resolve(&bad, &Defaults::default()).unwrap_err();
        assert!(errors[0].starts_with("envFrom[0].secretRef.name"), "{errors:?}");
    }

    #[test]
    fn own_values_win_and_env_merges() {
        let team = WorkspaceSpec {
            tier: Some(3),
            env: [("A".into(), "team".into()), ("B".into(), "team".into())].into(),
            ..Default::default()
        };
        let own = WorkspaceSpec { env: [("B".into(), "own".into())].into(), ..Default::default() };
        let merged = inherit(&own, Some(&team));
        assert_eq!(merged.tier, Some(3));
        assert_eq!(merged.env["A"], "team");
        assert_eq!(merged.env["B"], "own");
    }

    #[test]
    fn defaults_and_every_error_reported() {
        let eff = resolve(&WorkspaceSpec::default(), &Defaults::default()).unwrap();
        assert_eq!(eff.tier, 2);
        assert_eq!(&*eff.image, "molecule-agent:local");
        assert_eq!(eff.token_policy.stale_grace, DEFAULT_STALE_GRACE);
        let bad = WorkspaceSpec {
            tier: Some(9),
            token_policy: Some(super::super::TokenPolicy { stale_grace: Some("soon".into()), ..Default::default() }),
            security: Some(Security { privileged: true, ..Default::default() }),
            ..Default::default()
        };
        let errs = resolve(&bad, &Defaults::default()).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn a_manifest_cannot_put_itself_on_the_host_network_unless_the_operator_does() {
        let on_bridge = Defaults { network: "molecule-i".into(), ..Defaults::default() };
        for asked in ["host", "container:ws-0123456789ab"] {
            let spec = WorkspaceSpec { network: Some(asked.into()), ..Default::default() };
            let errs = resolve(&spec, &on_bridge).unwrap_err();
            assert!(errs[0].starts_with("network:") && errs[0].contains("--allow-privileged"), "{errs:?}");
            let allowed = Defaults { allow_privileged: true, ..on_bridge.clone() };
            assert_eq!(&*resolve(&spec, &allowed).unwrap().network, asked);
        }
        let host = WorkspaceSpec { network: Some("host".into()), ..Default::default() };
        let on_host = Defaults { network: "host".into(), ..Defaults::default() };
        assert_eq!(&*resolve(&host, &on_host).unwrap().network, "host", "the operator's own choice");
        let other = WorkspaceSpec { network: Some("lab".into()), ..Default::default() };
        assert_eq!(&*resolve(&other, &on_bridge).unwrap().network, "lab");
        assert_eq!(&*resolve(&WorkspaceSpec::default(), &on_bridge).unwrap().network, "molecule-i");
    }

    #[test]
    fn effective_spec_round_trips_through_json() {
        let spec = WorkspaceSpec {
            token_policy: Some(super::super::TokenPolicy { rotate_every: Some("1h".into()), ..Default::default() }),
            ..Default::default()
        };
        let eff = resolve(&spec, &Defaults::default()).unwrap();
        let json = serde_json::to_value(&eff).unwrap();
        assert_eq!(json["tokenPolicy"]["staleGrace"], "5m");
        assert_eq!(serde_json::from_value::<EffectiveSpec>(json).unwrap(), eff);
    }

    #[test]
    fn image_template_uses_runtime() {
        let d = Defaults {
            image_template: "ghcr.io/molecule-ai/workspace-template-{runtime}:latest".into(),
            ..Default::default()
        };
        let eff = resolve(&WorkspaceSpec { runtime: Some("crewai".into()), ..Default::default() }, &d).unwrap();
        assert_eq!(&*eff.image, "ghcr.io/molecule-ai/workspace-template-crewai:latest");
    }

    #[test]
    fn the_health_policy_is_inherited_and_a_bad_duration_names_its_field() {
        use super::super::HealthPolicy;
        let team = WorkspaceSpec {
            health_policy: Some(HealthPolicy { restart_wedged_after: Some("5m".into()) }),
            ..Default::default()
        };
        let member = inherit(&WorkspaceSpec::default(), Some(&team));
        let eff = resolve(&member, &Defaults::default()).unwrap();
        assert_eq!(eff.restart_wedged_after, Some(Duration::from_secs(300)));
        for bad in ["0s", "soon"] {
            let spec = WorkspaceSpec {
                health_policy: Some(HealthPolicy { restart_wedged_after: Some(bad.into()) }),
                ..Default::default()
            };
            let errs = resolve(&spec, &Defaults::default()).unwrap_err();
            assert!(errs[0].starts_with("healthPolicy.restartWedgedAfter"), "{errs:?}");
        }
    }
}
