//! What a workspace is in Kubernetes, both ways, and pure: the Pod, the
//! PersistentVolumeClaim and the token Secret a rendered `ContainerSpec` becomes, and
//! the `ContainerInfo` the rules see of a Pod (its state, why, its node, its restarts).
//!
//! Every object carries the operator's labels. Label values cannot hold `/`, so the
//! workspace label is the Workspace's name and the namespace is the object's own; the
//! full key, the incarnation and the provisioning time (an RFC 3339 time is no label
//! value either) are annotations, read back into the labels the rules know.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::ImagePullPolicy;
use crate::model::container::{AGENT_UID, CONFIGS_DIR, ContainerInfo, ContainerSpec, ContainerState, labels};

/// Annotation keys (values a label cannot hold).
pub mod annotations {
    /// `namespace/name` of the workspace.
    pub const WORKSPACE: &str = "molecule.ai/workspace";
    pub const INCARNATION: &str = "molecule.ai/incarnation";
    pub const PROVISIONED_AT: &str = "molecule.ai/provisioned-at";
}

/// Where the token Secret is mounted, and the file the agent reads.
pub const TOKEN_DIR: &str = "/var/run/molecule/token";
pub const TOKEN_KEY: &str = "token";
/// The key of the token Secret a claim writes a warm-pool member's identity into (the
/// agent of a member reads `MOLECULE_IDENTITY_FILE`, this key's file in `TOKEN_DIR`).
pub const IDENTITY_KEY: &str = "identity";
/// The agent's container in the Pod.
pub const AGENT_CONTAINER: &str = "agent";
/// The size a config volume claims (it holds the agent's own files; the token is
/// not in it).
pub const CONFIG_VOLUME_SIZE: &str = "1Gi";

/// A size as Kubernetes writes it: in Mi when it is whole mebibytes.
fn bytes_quantity(bytes: i64) -> Quantity {
    const MI: i64 = 1 << 20;
    Quantity(if bytes % MI == 0 { format!("{}Mi", bytes / MI) } else { bytes.to_string() })
}

/// The token Secret of the Pod named `pod` (`ws-<12>-token`).
pub fn token_secret_name(pod: &str) -> String {
    format!("{pod}-token")
}

/// The Secret holding the config files (`spec.configFiles`) of the Pod named `pod`
/// (`ws-<12>-files`): a Secret, not a ConfigMap, because `${VAR}` may have put
/// secrets into them.
pub fn files_secret_name(pod: &str) -> String {
    format!("{pod}-files")
}

/// The key of the `i`-th config file (in path order) in the files Secret: a key
/// cannot hold `/`, so the Pod mounts each key at its path.
fn file_key(i: usize) -> String {
    format!("file-{i}")
}

/// `namespace/name` split, for the workspace key a spec's labels carry.
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}

/// The namespace of a rendered spec's objects: its workspace's, or for a warm-pool
/// member (no workspace yet) its pool's.
pub fn spec_namespace(spec_labels: &BTreeMap<String, String>) -> &str {
    let key = spec_labels.get(labels::WORKSPACE).or_else(|| spec_labels.get(labels::POOL));
    split_key(key.map(String::as_str).unwrap_or_default()).0
}

/// Whether a rendered spec is a warm-pool member's (a pool, no workspace).
pub fn is_member(spec_labels: &BTreeMap<String, String>) -> bool {
    spec_labels.contains_key(labels::POOL) && !spec_labels.contains_key(labels::WORKSPACE)
}

/// The labels every object of a workspace carries: the operator's, with the workspace
/// and pool labels reduced to the name; the incarnation and time stay annotations.
fn object_labels(spec_labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    spec_labels
        .iter()
        .filter(|(k, _)| k.as_str() != labels::PROVISIONED_AT)
        .map(|(k, v)| match k.as_str() {
            labels::WORKSPACE | labels::POOL => (k.clone(), split_key(v).1.to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

fn meta(name: &str, namespace: &str, labels: BTreeMap<String, String>, owner: Option<&OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: owner.map(|o| vec![o.clone()]),
        ..ObjectMeta::default()
    }
}

/// The labels a workspace's volume and Secret carry: those that name it (and, for a
/// warm-pool member, its pool), not the ones of one incarnation.
fn workspace_labels(spec_labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let keep = [labels::MANAGED, labels::INSTANCE, labels::WORKSPACE, labels::UID, labels::POOL];
    object_labels(spec_labels).into_iter().filter(|(k, _)| keep.contains(&k.as_str())).collect()
}

/// The annotations of a workspace's Pod: what a label cannot hold (the workspace's
/// full key, the incarnation, the provisioning time).
fn pod_annotations(spec_labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut notes = BTreeMap::new();
    if let Some(key) = spec_labels.get(labels::WORKSPACE) {
        notes.insert(annotations::WORKSPACE.to_string(), key.clone());
    }
    if let Some(i) = spec_labels.get(labels::INCARNATION) {
        notes.insert(annotations::INCARNATION.into(), i.clone());
    }
    if let Some(at) = spec_labels.get(labels::PROVISIONED_AT) {
        notes.insert(annotations::PROVISIONED_AT.into(), at.clone());
    }
    notes
}

/// The Pod of a rendered workspace container. `owner`: the Workspace object, when there
/// is one (a backstop: deleting the Workspace collects the Pod).
pub fn pod(spec: &ContainerSpec, owner: Option<&OwnerReference>) -> Result<Pod, String> {
    if spec.security.docker_socket {
        return Err("spec.security.dockerSocket needs a Docker host; a Kubernetes Pod cannot have one".into());
    }
    let namespace = spec_namespace(&spec.labels);
    let mut metadata = meta(&spec.name, namespace, object_labels(&spec.labels), owner);
    metadata.annotations = Some(pod_annotations(&spec.labels));

    let mut env: Vec<EnvVar> =
        spec.env.iter().map(|(k, v)| EnvVar { name: k.clone(), value: Some(v.clone()), value_from: None }).collect();
    env.push(EnvVar {
        name: "MOLECULE_TOKEN_FILE".into(),
        value: Some(format!("{TOKEN_DIR}/{TOKEN_KEY}")),
        value_from: None,
    });
    if is_member(&spec.labels) {
        // A member's agent waits for the identity a claim writes into its token Secret.
        env.push(EnvVar {
            name: "MOLECULE_IDENTITY_FILE".into(),
            value: Some(format!("{TOKEN_DIR}/{IDENTITY_KEY}")),
            value_from: None,
        });
    }
    let mut limits = BTreeMap::new();
    if spec.memory_bytes > 0 {
        limits.insert("memory".to_string(), bytes_quantity(spec.memory_bytes));
    }
    if spec.nano_cpus > 0 {
        limits.insert("cpu".to_string(), Quantity(format!("{}m", spec.nano_cpus / 1_000_000)));
    }
    let mut mounts = vec![
        VolumeMount { name: "configs".into(), mount_path: CONFIGS_DIR.into(), ..VolumeMount::default() },
        VolumeMount {
            name: "token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "configs".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: spec.config_volume.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        Volume {
            name: "token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(token_secret_name(&spec.name)),
                // Readable by the agent's group (fsGroup), by no one else.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if !spec.config_files.is_empty() {
        // Each file mounted at its path in /configs, read-only, from the files Secret:
        // the Pod starts once the Secret is there, so the agent finds its files at
        // once, as in Docker mode. A change to them changes the spec: a new Pod.
        for (i, path) in spec.config_files.keys().enumerate() {
            mounts.push(VolumeMount {
                name: "files".into(),
                mount_path: format!("{CONFIGS_DIR}/{path}"),
                sub_path: Some(file_key(i)),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
        volumes.push(Volume {
            name: "files".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(files_secret_name(&spec.name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if let Some(bytes) = spec.tmp_tmpfs_bytes {
        mounts.push(VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() });
        volumes.push(Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(bytes_quantity(bytes)),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let privileged = spec.security.privileged;
    let container = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(
            match spec.image_pull_policy {
                ImagePullPolicy::Always => "Always",
                ImagePullPolicy::IfNotPresent => "IfNotPresent",
                ImagePullPolicy::Never => "Never",
            }
            .into(),
        ),
        env: Some(env),
        // Requests equal limits: the tier's resources are reserved, not hoped for.
        resources: Some(ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(!privileged),
            run_as_user: Some(i64::from(AGENT_UID)),
            run_as_group: Some(i64::from(AGENT_UID)),
            allow_privilege_escalation: Some(privileged),
            privileged: privileged.then_some(true),
            read_only_root_filesystem: Some(spec.read_only_root),
            capabilities: (!privileged).then(|| Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: (spec.network == "host").then_some(true),
            host_pid: spec.security.host_pid.then_some(true),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(5),
            security_context: Some(PodSecurityContext {
                // The config volume and the token file belong to the agent's group.
                fs_group: Some(i64::from(AGENT_UID)),
                run_as_non_root: Some(!privileged),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The workspace's config volume claim.
pub fn config_claim(
    name: &str,
    spec_labels: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(name, spec_namespace(spec_labels), workspace_labels(spec_labels), owner),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(CONFIG_VOLUME_SIZE.into()))])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The token Secret of the Pod `pod` (labelled like it, so it is found and watched).
pub fn token_secret(pod: &Pod, token: &[u8]) -> Secret {
    let keep = [labels::MANAGED, labels::INSTANCE, labels::WORKSPACE, labels::UID];
    let data = BTreeMap::from([(TOKEN_KEY.to_string(), ByteString(token.to_vec()))]);
    pod_secret(pod, token_secret_name(pod.metadata.name.as_deref().unwrap_or_default()), &keep, data)
}

/// The token Secret of a warm-pool member's Pod before a claim: no token (the Pod
/// starts once its Secret exists; the agent waits for its identity).
pub fn member_token_secret(pod: &Pod) -> Secret {
    let keep = [labels::MANAGED, labels::INSTANCE, labels::UID];
    pod_secret(pod, token_secret_name(pod.metadata.name.as_deref().unwrap_or_default()), &keep, BTreeMap::new())
}

/// The identity a claim gives a member, as the part of its token Secret that holds it
/// (applied by a field manager of its own, so token writes keep it: the agent reads it
/// again when it restarts in place).
pub fn identity_secret(pod: &Pod, identity: &[u8]) -> Secret {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = token_secret_name(pod.metadata.name.as_deref().unwrap_or_default());
    Secret {
        metadata: ObjectMeta { name: Some(name), namespace: Some(namespace.to_string()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([(IDENTITY_KEY.to_string(), ByteString(identity.to_vec()))])),
        ..Secret::default()
    }
}

/// The merge patch that makes a claimed member's Pod the workspace's, as rendered in
/// `spec` (its labels, annotations and owner; the pool label stays): to every rule it
/// is then that workspace's Pod.
pub fn claimed_pod_patch(spec: &ContainerSpec, owner: Option<&OwnerReference>) -> serde_json::Value {
    let mut metadata = serde_json::json!({
        "labels": object_labels(&spec.labels),
        "annotations": pod_annotations(&spec.labels),
    });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = serde_json::json!([owner]);
    }
    serde_json::json!({ "metadata": metadata })
}

/// The merge patch that makes a claimed member's config volume claim the workspace's.
pub fn claimed_claim_patch(spec: &ContainerSpec, owner: Option<&OwnerReference>) -> serde_json::Value {
    let mut metadata = serde_json::json!({ "labels": workspace_labels(&spec.labels) });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = serde_json::json!([owner]);
    }
    serde_json::json!({ "metadata": metadata })
}

/// The files Secret of the Pod `pod`, holding `files` (path -> content) under the
/// keys its mounts name. Without the workspace uid label: the runtime's watch reads
/// a change to a labelled Secret as a change to the token.
pub fn files_secret(pod: &Pod, files: &BTreeMap<String, String>) -> Secret {
    let keep = [labels::MANAGED, labels::INSTANCE, labels::WORKSPACE];
    let data = files.values().enumerate().map(|(i, text)| (file_key(i), ByteString(text.as_bytes().to_vec())));
    pod_secret(pod, files_secret_name(pod.metadata.name.as_deref().unwrap_or_default()), &keep, data.collect())
}

/// A Secret beside the Pod `pod`, with the Pod's labels in `keep` and its owner.
fn pod_secret(pod: &Pod, name: String, keep: &[&str], data: BTreeMap<String, ByteString>) -> Secret {
    let labels: BTreeMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    Secret {
        metadata: meta(&name, namespace, labels, pod.metadata.owner_references.as_ref().and_then(|o| o.first())),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// What the runtime saw of a Pod's config volume claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimSeen {
    /// Bound to a volume (or not known to be otherwise: a watch event carries no claim).
    Bound,
    /// Not bound (yet): no PersistentVolume matches it and no StorageClass provides one.
    Unbound,
    /// Being deleted, or gone: the Pod cannot go on with it.
    Deleting,
}

impl ClaimSeen {
    pub fn of(claim: &PersistentVolumeClaim) -> Self {
        match claim.status.as_ref().and_then(|s| s.phase.as_deref()) {
            _ if claim.metadata.deletion_timestamp.is_some() => Self::Deleting,
            Some("Bound") => Self::Bound,
            // Pending (or no status yet), or Lost (its volume is gone).
            _ => Self::Unbound,
        }
    }
}

/// What the rules see of a Pod, given what was seen of its config volume claim.
pub fn container_info(pod: &Pod, claim: ClaimSeen) -> Option<ContainerInfo> {
    let meta = &pod.metadata;
    let id = meta.uid.clone()?;
    let notes = meta.annotations.clone().unwrap_or_default();
    let mut labels_out: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if let Some(name) = labels_out.get(labels::WORKSPACE).cloned() {
        let key = notes.get(annotations::WORKSPACE).cloned().unwrap_or(format!("{namespace}/{name}"));
        labels_out.insert(labels::WORKSPACE.into(), key);
    }
    // A pool's members are in its namespace.
    if let Some(name) = labels_out.get(labels::POOL).cloned() {
        labels_out.insert(labels::POOL.into(), format!("{namespace}/{name}"));
    }
    if let Some(i) = notes.get(annotations::INCARNATION) {
        labels_out.insert(labels::INCARNATION.into(), i.clone());
    }
    if let Some(at) = notes.get(annotations::PROVISIONED_AT) {
        labels_out.insert(labels::PROVISIONED_AT.into(), at.clone());
    }
    let status = pod.status.as_ref();
    let agent =
        status.and_then(|s| s.container_statuses.as_ref()).and_then(|cs| cs.iter().find(|c| c.name == AGENT_CONTAINER));
    let (state, mut detail) = pod_state(pod, claim == ClaimSeen::Deleting);
    // A Pod held for its claim: say which claim, before the scheduler's or kubelet's words.
    if state == ContainerState::Waiting
        && claim == ClaimSeen::Unbound
        && let Some(name) = pod_claim(pod)
    {
        let why = format!(
            "its volume claim {name} is not bound: no PersistentVolume matches it and no StorageClass provides one"
        );
        detail = Some(match detail {
            Some(d) => format!("{why} ({d})"),
            None => why,
        });
    }
    Some(ContainerInfo {
        id,
        name: meta.name.clone().unwrap_or_default(),
        image: pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == AGENT_CONTAINER))
            .and_then(|c| c.image.clone())
            .unwrap_or_default(),
        state,
        labels: labels_out,
        created_at: meta.creation_timestamp.as_ref().and_then(|t| chrono_time(&t.0)),
        started_at: agent
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.as_ref())
            .and_then(|t| chrono_time(&t.0)),
        detail,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        restarts: agent.map_or(0, |c| u32::try_from(c.restart_count).unwrap_or(0)),
        applied: None,
    })
}

/// The state of a Pod as a container state, and why.
fn pod_state(pod: &Pod, claim_deleting: bool) -> (ContainerState, Option<String>) {
    // Terminating: on its way out, whatever its containers do in their grace period.
    // Dead, so it is replaced now (its token revoked, the Pod deleted at once to free
    // its name), as a ReplicaSet replaces a terminating Pod, not when it is gone.
    if pod.metadata.deletion_timestamp.is_some() {
        return (ContainerState::Dead, Some("the Pod is being deleted".into()));
    }
    let claim = pod_claim(pod);
    if claim_deleting {
        let why = format!("its volume claim {} is being deleted", claim.unwrap_or_default());
        return (ContainerState::Dead, Some(why));
    }
    let Some(status) = pod.status.as_ref() else { return (ContainerState::Waiting, Some("not scheduled yet".into())) };
    let said = |reason: &Option<String>, message: &Option<String>| -> Option<String> {
        match (reason, message) {
            (Some(r), Some(m)) if !m.is_empty() => Some(format!("{r}: {m}")),
            (Some(r), _) => Some(r.clone()),
            (None, Some(m)) => Some(m.clone()),
            (None, None) => None,
        }
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    match phase {
        "Failed" => {
            return (ContainerState::Dead, said(&status.reason, &status.message).or(Some("the Pod failed".into())));
        }
        "Succeeded" => return (ContainerState::Exited, Some("the agent exited".into())),
        "Unknown" => return (ContainerState::Dead, Some("the Pod's node cannot be reached".into())),
        _ => {}
    }
    if status.reason.as_deref() == Some("NodeLost") {
        return (ContainerState::Dead, said(&status.reason, &status.message));
    }
    let agent = status.container_statuses.as_ref().and_then(|cs| cs.iter().find(|c| c.name == AGENT_CONTAINER));
    let Some(agent) = agent else {
        // Not started: why the scheduler or the kubelet holds it, if it says.
        let condition = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.status == "False" && (c.type_ == "PodScheduled" || c.type_ == "ContainersReady"));
        let why = condition.and_then(|c| said(&c.reason, &c.message)).unwrap_or_else(|| "starting".into());
        return (ContainerState::Waiting, Some(why));
    };
    let state = agent.state.as_ref();
    if state.and_then(|s| s.running.as_ref()).is_some() {
        return (ContainerState::Running, None);
    }
    if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        return (ContainerState::Waiting, said(&w.reason, &w.message));
    }
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        let why = said(&t.reason, &t.message).unwrap_or_else(|| format!("exit code {}", t.exit_code));
        // The kubelet restarts it (restartPolicy Always): in place, not gone.
        return (ContainerState::Restarting, Some(why));
    }
    (ContainerState::Waiting, Some("starting".into()))
}

/// The config volume claim a Pod mounts.
pub fn pod_claim(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
}

/// A Kubernetes time as the rest of the operator keeps times.
pub fn chrono_time(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().try_into().ok()?)
}

/// The time in a `molecule.ai/provisioned-at`-style annotation.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WorkspaceSpec;
    use crate::api::effective::{Defaults, resolve};
    use crate::runtime::render::{AgentEnv, Identity, render};

    const UID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    fn rendered(spec: WorkspaceSpec) -> ContainerSpec {
        // Pods use the cluster's network unless a workspace asks for the node's.
        let eff = resolve(&spec, &Defaults { network: "pod".into(), ..Defaults::default() }).unwrap();
        let id = Identity { instance: "local-test", key: "team-a/dev", uid: UID };
        let agent =
            AgentEnv { registry_url: "http://molecule-registry.molecule-system:8080".into(), heartbeat_seconds: 30 };
        let mut cs = render(&eff, &id, &agent);
        cs.labels.insert(labels::INCARNATION.into(), "3".into());
        cs.labels.insert(labels::PROVISIONED_AT.into(), "2026-12-06T12:00:00.000Z".into());
        cs
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "molecule.ai/v1alpha1".into(),
            kind: "Workspace".into(),
            name: "dev".into(),
            uid: "11111111-2222-3333-4444-555555555555".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Compares `value` as YAML with the committed fixture `name`; with
    /// `UPDATE_FIXTURES=1` writes it instead (review the diff).
    fn fixture(name: &str, value: &impl serde::Serialize) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube").join(name);
        let yaml = serde_saphyr::to_string(value).expect("serializes as YAML");
        if std::env::var("UPDATE_FIXTURES").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &yaml).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_FIXTURES=1 writes it)", path.display()));
        assert!(yaml == want, "{} differs from what the spec renders to now:\n{yaml}", path.display());
    }

    #[test]
    fn a_tier_2_workspace_renders_to_this_pod_claim_and_secret() {
        let cs = rendered(WorkspaceSpec { env: [("ROLE".into(), "dev".into())].into(), ..Default::default() });
        let pod = pod(&cs, Some(&owner())).unwrap();
        fixture("pod-tier2.yaml", &pod);
        fixture("pvc.yaml", &config_claim(&cs.config_volume, &cs.labels, Some(&owner())));
        let secret = token_secret(&pod, b"not-a-real-token");
        fixture("secret.yaml", &secret);
    }

    #[test]
    fn a_tier_1_workspace_has_a_read_only_root_and_a_memory_tmp() {
        let cs = rendered(WorkspaceSpec { tier: Some(1), ..Default::default() });
        fixture("pod-tier1.yaml", &pod(&cs, None).unwrap());
    }

    #[test]
    fn config_files_are_a_secret_mounted_file_by_file_into_configs() {
        let files = BTreeMap::from([
            ("system-prompt.md".to_string(), "You lead the team.".to_string()),
            ("skills/build/SKILL.md".to_string(), "# Build".to_string()),
        ]);
        let cs = rendered(WorkspaceSpec { tier: Some(2), config_files: files.clone(), ..Default::default() });
        let p = pod(&cs, Some(&owner())).unwrap();
        fixture("pod-config-files.yaml", &p);
        let secret = files_secret(&p, &files);
        fixture("secret-config-files.yaml", &secret);
        // Each mount's key holds the file of its path.
        let mounts = p.spec.as_ref().unwrap().containers[0].volume_mounts.clone().unwrap();
        let data = secret.data.unwrap();
        for (path, text) in &files {
            let m = mounts.iter().find(|m| m.mount_path == format!("/configs/{path}")).expect("a mount per file");
            assert_eq!(m.read_only, Some(true));
            assert_eq!(data[m.sub_path.as_deref().unwrap()].0, text.as_bytes());
        }
        // Not labelled with the workspace uid: the watch reads such Secrets as tokens.
        assert!(!secret.metadata.labels.unwrap().contains_key(labels::UID));
        // No files, no volume.
        let plain = pod(&rendered(WorkspaceSpec::default()), None).unwrap();
        assert!(plain.spec.unwrap().volumes.unwrap().iter().all(|v| v.name != "files"));
    }

    #[test]
    fn every_pod_is_locked_down_unless_privilege_was_allowed_and_asked_for() {
        let p = pod(&rendered(WorkspaceSpec::default()), None).unwrap();
        let spec = p.spec.unwrap();
        let sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(spec.automount_service_account_token, Some(false));
        let mut socket = rendered(WorkspaceSpec::default());
        socket.security.docker_socket = true;
        assert!(pod(&socket, None).unwrap_err().contains("dockerSocket"));
    }

    #[test]
    fn labels_hold_no_slash_and_read_back_as_the_rules_know_them() {
        let cs = rendered(WorkspaceSpec::default());
        let mut p = pod(&cs, None).unwrap();
        assert!(p.metadata.labels.iter().flatten().all(|(_, v)| !v.contains('/') && !v.contains(':')));
        p.metadata.uid = Some("pod-uid".into());
        let info = container_info(&p, ClaimSeen::Bound).unwrap();
        assert_eq!(info.workspace(), Some("team-a/dev"));
        assert_eq!(info.uid(), Some(UID));
        assert_eq!(info.incarnation(), Some(3));
        assert_eq!(info.provisioned_at(), parse_time("2026-12-06T12:00:00.000Z"));
        assert_eq!(info.spec_hash(), cs.labels.get(labels::SPEC_HASH).map(String::as_str));
        assert_eq!((info.state, info.detail.as_deref()), (ContainerState::Waiting, Some("not scheduled yet")));
    }

    #[test]
    fn a_warm_pool_member_is_a_pod_of_its_pool_with_no_workspace_until_a_claim_relabels_it() {
        use crate::runtime::render::render_member;
        let t = resolve(&WorkspaceSpec::default(), &Defaults { network: "pod".into(), ..Defaults::default() }).unwrap();
        let agent = AgentEnv { registry_url: "http://r:8080".into(), heartbeat_seconds: 30 };
        let cs = render_member(&t, "local-test", "team-a/agents", UID, &agent);
        let mut p = pod(&cs, None).unwrap();
        assert_eq!(p.metadata.namespace.as_deref(), Some("team-a"), "in its pool's namespace");
        let labels_of = |p: &Pod| p.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels_of(&p).get(labels::POOL).map(String::as_str), Some("agents"), "no slash in a label");
        assert!(!labels_of(&p).contains_key(labels::WORKSPACE));
        assert!(!p.metadata.annotations.clone().unwrap_or_default().contains_key(annotations::WORKSPACE));
        let env = p.spec.as_ref().unwrap().containers[0].env.clone().unwrap();
        let var = |n: &str| env.iter().find(|e| e.name == n).and_then(|e| e.value.clone());
        assert_eq!(var("MOLECULE_IDENTITY_FILE").as_deref(), Some("/var/run/molecule/token/identity"));
        assert_eq!(var("MOLECULE_POOL").as_deref(), Some("team-a/agents"));
        assert_eq!(var("MOLECULE_WORKSPACE_ID"), None);
        let claim = config_claim(&cs.config_volume, &cs.labels, None);
        assert_eq!(claim.metadata.namespace.as_deref(), Some("team-a"));
        assert_eq!(claim.metadata.labels.unwrap().get(labels::POOL).map(String::as_str), Some("agents"));
        // Its token Secret holds nothing; a claim's identity is a key of its own.
        let empty = member_token_secret(&p);
        assert_eq!(empty.metadata.name.as_deref(), Some("ws-0a1b2c3d-4e5-token"));
        assert!(empty.data.unwrap().is_empty(), "a member holds no token");
        let identity = identity_secret(&p, b"workspace_id=x\nend\n");
        assert_eq!(identity.data.unwrap().keys().collect::<Vec<_>>(), vec![IDENTITY_KEY]);
        assert!(identity.metadata.labels.is_none(), "the identity's manager owns no label");

        p.metadata.uid = Some("pod-uid".into());
        let info = container_info(&p, ClaimSeen::Bound).unwrap();
        assert_eq!(
            (info.label(labels::POOL), info.workspace(), info.incarnation()),
            (Some("team-a/agents"), None, Some(1))
        );

        // The claim: the workspace's labels and annotations, its owner; the pool label stays.
        let mut claimed = rendered(WorkspaceSpec::default());
        claimed.labels.insert(labels::INCARNATION.into(), "1".into());
        let patch = claimed_pod_patch(&claimed, Some(&owner()));
        let mut v = serde_json::to_value(&p).unwrap();
        json_patch::merge(&mut v, &patch);
        p = serde_json::from_value(v).unwrap();
        let info = container_info(&p, ClaimSeen::Bound).unwrap();
        assert_eq!(info.workspace(), Some("team-a/dev"));
        assert_eq!(info.label(labels::POOL), Some("team-a/agents"));
        assert_eq!(info.spec_hash(), claimed.labels.get(labels::SPEC_HASH).map(String::as_str));
        assert_eq!(info.provisioned_at(), parse_time("2026-12-06T12:00:00.000Z"));
        assert_eq!(p.metadata.owner_references.unwrap()[0].kind, "Workspace");
        let claim_patch = claimed_claim_patch(&claimed, None);
        assert_eq!(claim_patch["metadata"]["labels"][labels::WORKSPACE], "dev");
    }

    fn pod_with_status(yaml: &str) -> Pod {
        let mut p = pod(&rendered(WorkspaceSpec::default()), None).unwrap();
        p.metadata.uid = Some("pod-uid".into());
        p.status = Some(serde_saphyr::from_str(yaml).expect("a PodStatus"));
        p
    }

    #[test]
    fn pod_states_read_as_container_states_with_their_cause() {
        let cases = [
            (
                "phase: Running\ncontainerStatuses: [{name: agent, image: i, imageID: '', ready: true, restartCount: 2, state: {running: {startedAt: '2026-12-06T12:00:01Z'}}}]",
                ContainerState::Running,
                None,
            ),
            (
                "phase: Pending\ncontainerStatuses: [{name: agent, image: i, imageID: '', ready: false, restartCount: 0, state: {waiting: {reason: ErrImagePull, message: 'pull access denied'}}}]",
                ContainerState::Waiting,
                Some("ErrImagePull: pull access denied"),
            ),
            (
                "phase: Pending\nconditions: [{type: PodScheduled, status: 'False', reason: Unschedulable, message: 'persistentvolumeclaim \"ws-x-configs\" not bound'}]",
                ContainerState::Waiting,
                Some("Unschedulable: persistentvolumeclaim \"ws-x-configs\" not bound"),
            ),
            (
                "phase: Failed\nreason: Evicted\nmessage: 'The node was low on resource: memory.'",
                ContainerState::Dead,
                Some("Evicted: The node was low on resource: memory."),
            ),
            (
                "phase: Running\ncontainerStatuses: [{name: agent, image: i, imageID: '', ready: false, restartCount: 1, state: {terminated: {exitCode: 137, reason: OOMKilled}}}]",
                ContainerState::Restarting,
                Some("OOMKilled"),
            ),
            ("phase: Unknown", ContainerState::Dead, Some("the Pod's node cannot be reached")),
        ];
        for (status, state, detail) in cases {
            let info = container_info(&pod_with_status(status), ClaimSeen::Bound).unwrap();
            assert_eq!((info.state, info.detail.as_deref()), (state, detail), "{status}");
        }
        let running = container_info(&pod_with_status(cases[0].0), ClaimSeen::Bound).unwrap();
        assert_eq!(running.restarts, 2);
        let deleting = container_info(&pod_with_status(cases[0].0), ClaimSeen::Deleting).unwrap();
        assert_eq!(deleting.state, ContainerState::Dead);
        assert!(deleting.detail.unwrap().contains("is being deleted"));
        let mut terminating = pod_with_status(cases[0].0);
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let info = container_info(&terminating, ClaimSeen::Bound).unwrap();
        assert_eq!(
            (info.state, info.detail.as_deref()),
            (ContainerState::Dead, Some("the Pod is being deleted")),
            "a terminating Pod is replaced at once, not waited for"
        );
    }

    #[test]
    fn a_pod_held_for_a_claim_that_never_binds_names_the_claim() {
        let unschedulable = "phase: Pending\nconditions: [{type: PodScheduled, status: 'False', reason: Unschedulable, \
                             message: 'pod has unbound immediate PersistentVolumeClaims'}]";
        let info = container_info(&pod_with_status(unschedulable), ClaimSeen::Unbound).unwrap();
        assert_eq!(info.state, ContainerState::Waiting, "waiting, not replaced: a new Pod would wait the same");
        assert_eq!(
            info.detail.as_deref(),
            Some(
                "its volume claim ws-0a1b2c3d-4e5-configs is not bound: no PersistentVolume matches it and no \
                 StorageClass provides one (Unschedulable: pod has unbound immediate PersistentVolumeClaims)"
            )
        );
        // Once the Pod runs, the claim is bound whatever the listing said a moment before.
        let running = "phase: Running\ncontainerStatuses: [{name: agent, image: i, imageID: '', ready: true, \
                       restartCount: 0, state: {running: {}}}]";
        assert_eq!(container_info(&pod_with_status(running), ClaimSeen::Unbound).unwrap().detail, None);
        let mut claim = config_claim("c", &BTreeMap::new(), None);
        assert_eq!(ClaimSeen::of(&claim), ClaimSeen::Unbound, "no status yet");
        claim.status = Some(serde_saphyr::from_str("phase: Bound").unwrap());
        assert_eq!(ClaimSeen::of(&claim), ClaimSeen::Bound);
    }
}
