//! Renders an effective spec plus identity into a `ContainerSpec`, and hashes the
//! parts that matter. The spec hash covers the rendered config (image, env, limits,
//! network, security), not the raw YAML, so cosmetic edits never restart anything.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::api::EffectiveSpec;
use crate::model::container::{ContainerSpec, labels};

/// Who the container is for.
#[derive(Clone, Debug)]
pub struct Identity<'a> {
    pub instance: &'a str,
    pub key: &'a str,
    pub uid: &'a str,
}

/// Operator-provided environment every agent needs.
#[derive(Clone, Debug)]
pub struct AgentEnv {
    /// URL the agent registers at, e.g. http://172.18.0.1:8080 (the gateway of the
    /// workspaces' network; runtime::network).
    pub registry_url: String,
    pub heartbeat_seconds: u64,
}

/// `ws-` plus the first 12 characters of the uid, as the original platform.
pub fn container_name(uid: &str) -> String {
    format!("ws-{}", &uid[..uid.len().min(12)])
}

pub fn config_volume_name(uid: &str) -> String {
    format!("{}-configs", container_name(uid))
}

/// Renders the container for `spec`; labels carry everything but the incarnation
/// (the executor stamps it when it creates the container).
pub fn render(spec: &EffectiveSpec, id: &Identity<'_>, agent: &AgentEnv) -> ContainerSpec {
    let mut env: BTreeMap<String, String> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.insert("MOLECULE_WORKSPACE_ID".into(), id.uid.into());
    env.insert("WORKSPACE_ID".into(), id.uid.into());
    env.insert("MOLECULE_WORKSPACE_NAME".into(), id.key.into());
    env.insert("MOLECULE_REGISTRY_URL".into(), agent.registry_url.clone());
    // The original platform's names (its buildContainerEnv), so its runtimes run as
    // they are: MOLECULE_URL always equals PLATFORM_URL. PARENT_ID is the parent's
    // name, not its id (discovery accepts either); MODEL and MOLECULE_AGENT_ROLE pass
    // through `env` when declared.
    env.insert("PLATFORM_URL".into(), agent.registry_url.clone());
    env.insert("MOLECULE_URL".into(), agent.registry_url.clone());
    env.insert("MOLECULE_HEARTBEAT_SECONDS".into(), agent.heartbeat_seconds.to_string());
    env.insert("WORKSPACE_CONFIG_PATH".into(), crate::model::container::CONFIGS_DIR.into());
    env.insert("TIER".into(), spec.tier.to_string());
    if let Some(p) = &spec.parent {
        env.insert("PARENT_ID".into(), p.clone());
    }
    let mut spec_out = ContainerSpec {
        name: container_name(id.uid),
        image: spec.image.to_string(),
        image_pull_policy: spec.image_pull_policy,
        env,
        labels: BTreeMap::new(),
        memory_bytes: spec.memory_bytes,
        nano_cpus: spec.nano_cpus,
        read_only_root: spec.read_only_root,
        tmp_tmpfs_bytes: spec.tmp_tmpfs_bytes,
        network: spec.network.to_string(),
        config_volume: config_volume_name(id.uid),
        security: spec.security.clone(),
        config_files: spec.config_files.clone(),
    };
    let hash = spec_hash(&spec_out);
    let l = &mut spec_out.labels;
    l.insert(labels::MANAGED.into(), "true".into());
    l.insert(labels::INSTANCE.into(), id.instance.into());
    l.insert(labels::WORKSPACE.into(), id.key.into());
    l.insert(labels::UID.into(), id.uid.into());
    l.insert(labels::SPEC_HASH.into(), hash);
    if let Some(t) = &spec.team {
        l.insert(labels::TEAM.into(), t.clone());
    }
    spec_out
}

/// A warm-pool member of `pool` from its template: the agent's env without any
/// workspace identity (`MOLECULE_POOL` instead: the agent waits for a claim), labelled
/// with the pool and no workspace, incarnation 1 (what a claiming workspace's record
/// becomes). Its spec hash leaves the uid out, so every member of one template has
/// the same one and a template change shows on each.
pub fn render_member(
    template: &EffectiveSpec,
    instance: &str,
    pool: &str,
    uid: &str,
    agent: &AgentEnv,
) -> ContainerSpec {
    let mut env: BTreeMap<String, String> = template.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.insert("MOLECULE_POOL".into(), pool.into());
    env.insert("MOLECULE_REGISTRY_URL".into(), agent.registry_url.clone());
    env.insert("PLATFORM_URL".into(), agent.registry_url.clone());
    env.insert("MOLECULE_URL".into(), agent.registry_url.clone());
    env.insert("MOLECULE_HEARTBEAT_SECONDS".into(), agent.heartbeat_seconds.to_string());
    env.insert("WORKSPACE_CONFIG_PATH".into(), crate::model::container::CONFIGS_DIR.into());
    env.insert("TIER".into(), template.tier.to_string());
    let mut out = ContainerSpec {
        name: String::new(),
        image: template.image.to_string(),
        image_pull_policy: template.image_pull_policy,
        env,
        labels: BTreeMap::new(),
        memory_bytes: template.memory_bytes,
        nano_cpus: template.nano_cpus,
        read_only_root: template.read_only_root,
        tmp_tmpfs_bytes: template.tmp_tmpfs_bytes,
        network: template.network.to_string(),
        config_volume: String::new(),
        security: template.security.clone(),
        config_files: template.config_files.clone(),
    };
    let hash = spec_hash(&out);
    out.name = container_name(uid);
    out.config_volume = config_volume_name(uid);
    let l = &mut out.labels;
    l.insert(labels::MANAGED.into(), "true".into());
    l.insert(labels::INSTANCE.into(), instance.into());
    l.insert(labels::UID.into(), uid.into());
    l.insert(labels::POOL.into(), pool.into());
    l.insert(labels::INCARNATION.into(), "1".into());
    l.insert(labels::SPEC_HASH.into(), hash);
    out
}

/// The spec hash of every member of `template` in `pool` (see `render_member`).
pub fn member_hash(template: &EffectiveSpec, instance: &str, pool: &str, agent: &AgentEnv) -> String {
    render_member(template, instance, pool, "", agent).labels.remove(labels::SPEC_HASH).unwrap_or_default()
}

/// The identity file a claim writes (see src/bin/molecule-agent.rs): the workspace's
/// id and name, its env overlay (newlines and backslashes escaped), and `end`.
pub fn identity_file(uid: &str, key: &str, overlay: &BTreeMap<String, String>) -> String {
    let mut out = format!("workspace_id={uid}\nworkspace_name={key}\n");
    for (k, v) in overlay {
        let v = v.replace('\\', "\\\\").replace('\n', "\\n");
        out.push_str(&format!("env.{k}={v}\n"));
    }
    out.push_str("end\n");
    out
}

/// sha256 of the canonical JSON of the rendered config (labels excluded), hex, first 16 chars.
pub fn spec_hash(spec: &ContainerSpec) -> String {
    let canonical = serde_json::to_vec(spec).expect("ContainerSpec serializes");
    hex::encode(Sha256::digest(&canonical))[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WorkspaceSpec;
    use crate::api::effective::{Defaults, resolve};

    fn rendered(spec: WorkspaceSpec) -> ContainerSpec {
        let eff = resolve(&spec, &Defaults::default()).unwrap();
        let id = Identity { instance: "t", key: "default/a", uid: "0123456789abcdef-0000" };
        render(&eff, &id, &AgentEnv { registry_url: "http://127.0.0.1:1".into(), heartbeat_seconds: 5 })
    }

    #[test]
    fn a_member_has_no_identity_and_one_hash_per_template() {
        let t = resolve(&WorkspaceSpec::default(), &Defaults::default()).unwrap();
        let agent = AgentEnv { registry_url: "http://127.0.0.1:1".into(), heartbeat_seconds: 5 };
        let a = render_member(&t, "i", "default/p", "aaaaaaaaaaaa-1", &agent);
        let b = render_member(&t, "i", "default/p", "bbbbbbbbbbbb-2", &agent);
        assert_eq!(a.labels[labels::SPEC_HASH], b.labels[labels::SPEC_HASH]);
        assert_eq!(a.labels[labels::SPEC_HASH], member_hash(&t, "i", "default/p", &agent));
        assert!(!a.env.contains_key("MOLECULE_WORKSPACE_ID") && !a.labels.contains_key(labels::WORKSPACE));
        assert_eq!((a.name.as_str(), a.env["MOLECULE_POOL"].as_str()), ("ws-aaaaaaaaaaaa", "default/p"));
        let id = identity_file("u", "default/w", &[("A".to_string(), "x\ny".to_string())].into());
        assert_eq!(id, "workspace_id=u\nworkspace_name=default/w\nenv.A=x\\ny\nend\n");
    }

    #[test]
    fn names_follow_the_original_platform() {
        assert_eq!(container_name("abc123de-f456-7890"), "ws-abc123de-f45");
        assert_eq!(config_volume_name("abc123de-f456-7890"), "ws-abc123de-f45-configs");
    }

    #[test]
    fn hash_changes_with_env_and_not_with_team_label() {
        let a = rendered(WorkspaceSpec::default());
        let b = rendered(WorkspaceSpec { env: [("X".into(), "1".into())].into(), ..Default::default() });
        let c = rendered(WorkspaceSpec { team: Some("eng".into()), ..Default::default() });
        assert_ne!(a.labels[labels::SPEC_HASH], b.labels[labels::SPEC_HASH]);
        assert_eq!(a.labels[labels::SPEC_HASH], c.labels[labels::SPEC_HASH]);
        assert_eq!(a.labels[labels::INSTANCE], "t");
        assert_eq!(a.env["MOLECULE_WORKSPACE_ID"], "0123456789abcdef-0000");
    }

    #[test]
    fn the_original_platforms_env_names_are_set() {
        let spec = WorkspaceSpec {
            parent: Some("pm".into()),
            tier: Some(3),
            env: [("MODEL".into(), "sonnet".into()), ("MOLECULE_AGENT_ROLE".into(), "reviewer".into())].into(),
            ..Default::default()
        };
        let env = rendered(spec).env;
        let want = [
            ("WORKSPACE_ID", "0123456789abcdef-0000"),
            ("WORKSPACE_CONFIG_PATH", "/configs"),
            ("PLATFORM_URL", "http://127.0.0.1:1"),
            ("MOLECULE_URL", "http://127.0.0.1:1"),
            ("TIER", "3"),
            ("PARENT_ID", "pm"),
            ("MODEL", "sonnet"),
            ("MOLECULE_AGENT_ROLE", "reviewer"),
        ];
        for (name, value) in want {
            assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
        }
        assert!(!rendered(WorkspaceSpec::default()).env.contains_key("PARENT_ID"), "a root has no PARENT_ID");
    }
}
