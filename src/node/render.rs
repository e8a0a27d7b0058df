//! Pure: a Pod's containers as Docker containers. [`sandbox`] is the container that
//! holds the Pod's network namespace (hostname, network, `host.docker.internal`,
//! host ports); [`container`] one of the Pod's containers, which joins it. Inputs
//! that need IO (Secret values, volume paths) are resolved first ([`resolve_env`],
//! and the caller's [`VolumeSource`]s), so everything here is tested from YAML
//! fixtures (`src/node/fixtures/`) without Docker.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTmpfsOptions, MountType, PortBinding};
use k8s_openapi::api::core::v1::{Container, Pod, Secret};

use super::labels;
use crate::kubeapi::quantity;

/// Where a Pod volume's content lives on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// A directory this node keeps (an emptyDir), bind-mounted.
    HostDir(PathBuf),
    /// A Secret volume's directory: always mounted read-only.
    Secret(PathBuf),
    /// A Docker named volume (a PVC); `host_path` is its directory when this process
    /// can reach it (for subPath mounts and fsGroup).
    Named { name: String, host_path: Option<PathBuf> },
    /// An emptyDir with `medium: Memory`: a tmpfs (per container here).
    Tmpfs { size_bytes: Option<i64> },
}

/// What a container needs that is not in the Pod: resolved before rendering.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// The sandbox whose network the container joins.
    pub sandbox_id: String,
    /// Which start of the container this is (0, then one more per restart).
    pub attempt: u32,
    pub env: Vec<(String, String)>,
    pub volumes: BTreeMap<String, VolumeSource>,
}

/// What the node is: for labels and the Pod's view of its node.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    /// The operator instance: `ai.molecule.node=<instance>` on everything it makes.
    pub instance: String,
    /// `host` or the node's bridge network.
    pub network: String,
    /// The image the sandbox runs (`molecule-agent pause`).
    pub sandbox_image: String,
}

/// `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`, as dockershim named them.
pub fn docker_name(pod: &Pod, container: &str, attempt: u32) -> String {
    let meta = &pod.metadata;
    format!(
        "k8s_{container}_{}_{}_{}_{attempt}",
        meta.name.as_deref().unwrap_or(""),
        meta.namespace.as_deref().unwrap_or(""),
        meta.uid.as_deref().unwrap_or("")
    )
}

/// The labels every container of `pod` carries.
pub fn pod_labels(node: &NodeIdentity, pod: &Pod, container: &str, attempt: u32) -> HashMap<String, String> {
    let meta = &pod.metadata;
    let kind = if container == labels::SANDBOX { "podsandbox" } else { "container" };
    [
        (labels::NODE, node.instance.clone()),
        (labels::POD_NAMESPACE, meta.namespace.clone().unwrap_or_default()),
        (labels::POD_NAME, meta.name.clone().unwrap_or_default()),
        (labels::POD_UID, meta.uid.clone().unwrap_or_default()),
        (labels::CONTAINER_NAME, container.to_string()),
        (labels::ATTEMPT, attempt.to_string()),
        (labels::DOCKER_TYPE, kind.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The sandbox of `pod`: the agent image in pause mode, hardened, holding the network.
pub fn sandbox(node: &NodeIdentity, pod: &Pod, attempt: u32) -> ContainerCreateBody {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
        .chars()
        .take(63)
        .collect::<String>();
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for port in container.ports.iter().flatten() {
            if let Some(host_port) = port.host_port.filter(|_| !host_network) {
                let protocol = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
                port_bindings.insert(
                    format!("{}/{protocol}", port.container_port),
                    Some(vec![PortBinding { host_ip: port.host_ip.clone(), host_port: Some(host_port.to_string()) }]),
                );
            }
        }
    }
    let host_config = HostConfig {
        init: Some(true),
        network_mode: Some(if host_network { "host".to_string() } else { node.network.clone() }),
        // Docker 20.10's name for the host's address on the bridge: Pods reach a
        // registry (or the operator) on the host as `host.docker.internal`.
        extra_hosts: (!host_network).then(|| vec!["host.docker.internal:host-gateway".to_string()]),
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".to_string()]),
        security_opt: Some(vec!["no-new-privileges:true".to_string()]),
        memory: Some(32 << 20),
        ..Default::default()
    };
    let mut body = ContainerCreateBody {
        image: Some(node.sandbox_image.clone()),
        cmd: Some(vec!["pause".to_string()]),
        hostname: (!host_network).then_some(hostname),
        user: Some(format!("{}:{}", crate::model::container::AGENT_UID, crate::model::container::AGENT_UID)),
        host_config: Some(host_config),
        ..Default::default()
    };
    // What the sandbox is apart from its Pod's identity (the labels): the key under
    // which a kept sandbox may pass to a next Pod of the same name.
    // (Through a Value: its maps are sorted, so the port bindings' order does not count.)
    let mut tags = pod_labels(node, pod, labels::SANDBOX, attempt);
    if !host_network {
        use sha2::Digest as _;
        let made_as = serde_json::to_value(&body).and_then(|v| serde_json::to_vec(&v)).unwrap_or_default();
        tags.insert(labels::SANDBOX_HASH.to_string(), hex::encode(&sha2::Sha256::digest(&made_as)[..12]));
    }
    body.labels = Some(tags);
    body
}

/// Why a container cannot be made as specified: a CreateContainerConfigError.
pub type ConfigError = String;

/// One of the Pod's containers, joined to the sandbox's network.
pub fn container(
    node: &NodeIdentity,
    pod: &Pod,
    spec: &Container,
    resolved: &Resolved,
) -> Result<ContainerCreateBody, ConfigError> {
    let pod_spec = pod.spec.as_ref();
    let pod_security = pod_spec.and_then(|s| s.security_context.as_ref());
    let security = spec.security_context.as_ref();
    let run_as_user = security.and_then(|s| s.run_as_user).or(pod_security.and_then(|s| s.run_as_user));
    let run_as_group = security.and_then(|s| s.run_as_group).or(pod_security.and_then(|s| s.run_as_group));
    let user = match (run_as_user, run_as_group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(_)) => {
            return Err(format!(
                "container {:?}: runAsGroup without runAsUser is not supported by the local node",
                spec.name
            ));
        }
        (None, None) => None,
    };
    let mut group_add: Vec<String> = pod_security
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .iter()
        .map(i64::to_string)
        .collect();
    if let Some(fs_group) = pod_security.and_then(|s| s.fs_group) {
        group_add.push(fs_group.to_string());
    }

    let resources = spec.resources.as_ref();
    let quantity_of = |part: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
                       name: &str| { part.and_then(|m| m.get(name)).map(|q| q.0.clone()) };
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let memory = match quantity_of(limits, "memory") {
        Some(q) => Some(quantity::bytes(&q).map_err(|e| format!("limits.memory: {e}"))?),
        None => None,
    };
    let nano_cpus = match quantity_of(limits, "cpu") {
        Some(q) => Some(quantity::millis(&q).map_err(|e| format!("limits.cpu: {e}"))? * 1_000_000),
        None => None,
    };
    // The kubelet's CPU shares: 1024 per requested core, at least 2.
    let cpu_shares = match quantity_of(requests, "cpu") {
        Some(q) => Some((quantity::millis(&q).map_err(|e| format!("requests.cpu: {e}"))? * 1024 / 1000).max(2)),
        None => None,
    };

    let caps = security.and_then(|s| s.capabilities.as_ref());
    let privileged = security.and_then(|s| s.privileged).unwrap_or(false);
    let mut security_opt = Vec::new();
    if security.and_then(|s| s.allow_privilege_escalation) == Some(false) {
        security_opt.push("no-new-privileges:true".to_string());
    }
    let seccomp =
        security.and_then(|s| s.seccomp_profile.as_ref()).or(pod_security.and_then(|s| s.seccomp_profile.as_ref()));
    match seccomp.map(|p| p.type_.as_str()) {
        // Unset or RuntimeDefault: Docker's default profile.
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => security_opt.push("seccomp=unconfined".to_string()),
        Some(other) => {
            return Err(format!("seccompProfile {other} is not supported by the local node (use RuntimeDefault)"));
        }
    }

    let mut mounts = Vec::new();
    for mount in spec.volume_mounts.iter().flatten() {
        let source = resolved
            .volumes
            .get(&mount.name)
            .ok_or_else(|| format!("volume {:?} was not prepared for container {:?}", mount.name, spec.name))?;
        let sub_path = mount.sub_path.as_deref().filter(|p| !p.is_empty());
        if sub_path.is_some_and(|p| p.starts_with('/') || p.split('/').any(|part| part == "..")) {
            return Err(format!("volumeMount {:?}: subPath must be a relative path without '..'", mount.name));
        }
        let read_only = mount.read_only.unwrap_or(false);
        let docker_mount = match (source, sub_path) {
            (VolumeSource::HostDir(dir), sub) => Mount {
                typ: Some(MountType::BIND),
                source: Some(sub.map_or(dir.clone(), |p| dir.join(p)).display().to_string()),
                target: Some(mount.mount_path.clone()),
                read_only: Some(read_only),
                ..Default::default()
            },
            // A subPath of a Secret volume is one file, which (as in Kubernetes) keeps
            // the content it had when the container started.
            (VolumeSource::Secret(dir), sub) => Mount {
                typ: Some(MountType::BIND),
                source: Some(sub.map_or(dir.clone(), |p| dir.join("..data").join(p)).display().to_string()),
                target: Some(mount.mount_path.clone()),
                read_only: Some(true),
                ..Default::default()
            },
            (VolumeSource::Named { name, .. }, None) => Mount {
                typ: Some(MountType::VOLUME),
                source: Some(name.clone()),
                target: Some(mount.mount_path.clone()),
                read_only: Some(read_only),
                ..Default::default()
            },
            (VolumeSource::Named { host_path: Some(dir), .. }, Some(sub)) => Mount {
                typ: Some(MountType::BIND),
                source: Some(dir.join(sub).display().to_string()),
                target: Some(mount.mount_path.clone()),
                read_only: Some(read_only),
                ..Default::default()
            },
            (VolumeSource::Named { host_path: None, .. }, Some(_)) => {
                return Err(format!(
                    "volumeMount {:?}: subPath on a PersistentVolumeClaim needs the volume's directory, which this process cannot reach",
                    mount.name
                ));
            }
            (VolumeSource::Tmpfs { size_bytes }, _) => Mount {
                typ: Some(MountType::TMPFS),
                target: Some(mount.mount_path.clone()),
                tmpfs_options: Some(MountTmpfsOptions {
                    size_bytes: *size_bytes,
                    mode: Some(0o1777),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        mounts.push(docker_mount);
    }

    let host_config = HostConfig {
        // docker-init as PID 1: signals reach the process, a stop takes as long as it needs.
        init: Some(true),
        network_mode: Some(format!("container:{}", resolved.sandbox_id)),
        memory,
        nano_cpus,
        cpu_shares,
        readonly_rootfs: Some(security.and_then(|s| s.read_only_root_filesystem).unwrap_or(false)),
        cap_add: caps.and_then(|c| c.add.clone()).filter(|c| !c.is_empty()),
        cap_drop: caps.and_then(|c| c.drop.clone()).filter(|c| !c.is_empty()),
        privileged: Some(privileged),
        security_opt: (!security_opt.is_empty()).then_some(security_opt),
        group_add: (!group_add.is_empty()).then_some(group_add),
        mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: spec.image.clone(),
        entrypoint: spec.command.clone(),
        cmd: spec.args.clone(),
        working_dir: spec.working_dir.clone(),
        env: Some(resolved.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        user,
        tty: spec.tty,
        open_stdin: spec.stdin,
        labels: Some(pod_labels(node, pod, &spec.name, resolved.attempt)),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// A container's environment: `value`s, `valueFrom` (secretKeyRef; fieldRef to
/// metadata.name/namespace/uid, spec.nodeName, status.podIP/hostIP) and `envFrom`
/// secretRefs. `secret` looks a Secret of the Pod's namespace up by name.
pub fn resolve_env<'a>(
    pod: &Pod,
    spec: &Container,
    secret: impl Fn(&str) -> Option<&'a Secret>,
    pod_ip: &str,
    host_ip: &str,
) -> Result<Vec<(String, String)>, ConfigError> {
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or("");
    let decode = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    };
    for from in spec.env_from.iter().flatten() {
        if let Some(reference) = &from.secret_ref {
            let name = reference.name.as_str();
            match secret(name) {
                Some(s) => {
                    for (key, value) in s.data.iter().flatten() {
                        set(&mut env, format!("{}{key}", from.prefix.as_deref().unwrap_or("")), decode(&value.0));
                    }
                }
                None if reference.optional == Some(true) => {}
                None => return Err(format!("secret \"{name}\" not found")),
            }
        } else if from.config_map_ref.is_some() {
            return Err("envFrom configMapRef: ConfigMaps are not served by the local Kubernetes API".into());
        }
    }
    for var in spec.env.iter().flatten() {
        let value = match &var.value_from {
            None => var.value.clone().unwrap_or_default(),
            Some(from) => {
                if let Some(key_ref) = &from.secret_key_ref {
                    let optional = key_ref.optional == Some(true);
                    match secret(&key_ref.name).map(|s| s.data.as_ref().and_then(|d| d.get(&key_ref.key))) {
                        Some(Some(value)) => decode(&value.0),
                        _ if optional => continue,
                        Some(None) => {
                            return Err(format!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                key_ref.key, key_ref.name
                            ));
                        }
                        None => return Err(format!("secret \"{}\" not found", key_ref.name)),
                    }
                } else if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => meta.name.clone().unwrap_or_default(),
                        "metadata.namespace" => namespace.to_string(),
                        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
                        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                        "spec.serviceAccountName" => {
                            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default()
                        }
                        "status.podIP" => pod_ip.to_string(),
                        "status.hostIP" => host_ip.to_string(),
                        path => {
                            let label = path
                                .strip_prefix("metadata.labels['")
                                .and_then(|rest| rest.strip_suffix("']"))
                                .and_then(|key| meta.labels.as_ref()?.get(key).cloned());
                            match label {
                                Some(value) => value,
                                None => return Err(format!("fieldRef {path} is not supported by the local node")),
                            }
                        }
                    }
                } else {
                    return Err(format!(
                        "env {}: only value, secretKeyRef and fieldRef are supported by the local node",
                        var.name
                    ));
                }
            }
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

/// The bytes a Secret volume's files hold: key -> (relative path, content, mode).
pub fn secret_files(
    secret: &Secret,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    default_mode: i32,
) -> Result<Vec<(String, Vec<u8>, u32)>, ConfigError> {
    let data = secret.data.clone().unwrap_or_default();
    let mut files = Vec::new();
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    format!(
                        "couldn't find key {} in Secret {}/{}",
                        item.key,
                        secret.metadata.namespace.as_deref().unwrap_or(""),
                        secret.metadata.name.as_deref().unwrap_or("")
                    )
                })?;
                let mode = item.mode.unwrap_or(default_mode);
                files.push((item.path.clone(), value.0.clone(), (mode & 0o777) as u32));
            }
        }
        _ => {
            for (key, value) in data {
                files.push((key, value.0, (default_mode & 0o777) as u32));
            }
        }
    }
    for (path, _, _) in &files {
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|p| p == ".." || p.is_empty())
            || path.starts_with("..")
        {
            return Err(format!("the path {path:?} of a Secret volume item is not a plain relative path"));
        }
    }
    Ok(files)
}

/// The memory limit of an emptyDir with `medium: Memory`, if it sets one.
pub fn tmpfs_size(size_limit: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> Option<i64> {
    size_limit.and_then(|q| quantity::bytes(&q.0).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    fn node() -> NodeIdentity {
        NodeIdentity {
            instance: "test".into(),
            network: "molecule-node-test".into(),
            sandbox_image: "molecule-agent:local".into(),
        }
    }

    /// Each fixture holds a Pod and the Secrets it uses (`in`) and the Docker
    /// create bodies of its sandbox and containers (`out`), so a change to the
    /// rendering shows as a readable diff.
    #[test]
    fn pods_render_as_their_fixtures() {
        super::super::fixtures::check("render", |fixture| {
            let pod: Pod = serde_json::from_value(fixture["pod"].clone()).expect("a Pod");
            let secrets: Vec<Secret> = serde_json::from_value(fixture["secrets"].clone()).unwrap_or_default();
            let mut out = serde_json::Map::new();
            out.insert("sandbox".into(), serde_json::to_value(sandbox(&node(), &pod, 0)).unwrap());
            for spec in &pod.spec.as_ref().unwrap().containers {
                let env = resolve_env(
                    &pod,
                    spec,
                    |n| secrets.iter().find(|s| s.metadata.name.as_deref() == Some(n)),
                    "10.0.0.2",
                    "10.0.0.1",
                );
                let volumes = pod
                    .spec
                    .as_ref()
                    .unwrap()
                    .volumes
                    .iter()
                    .flatten()
                    .map(|v| {
                        let source = if let Some(claim) = &v.persistent_volume_claim {
                            VolumeSource::Named { name: format!("pvc-of-{}", claim.claim_name), host_path: None }
                        } else if v.secret.is_some() {
                            VolumeSource::Secret(PathBuf::from(format!("/node/pods/uid/volumes/{}", v.name)))
                        } else if v.empty_dir.as_ref().is_some_and(|e| e.medium.as_deref() == Some("Memory")) {
                            VolumeSource::Tmpfs {
                                size_bytes: tmpfs_size(v.empty_dir.as_ref().unwrap().size_limit.as_ref()),
                            }
                        } else {
                            VolumeSource::HostDir(PathBuf::from(format!("/node/pods/uid/volumes/{}", v.name)))
                        };
                        (v.name.clone(), source)
                    })
                    .collect();
                let rendered = env.and_then(|env| {
                    container(
                        &node(),
                        &pod,
                        spec,
                        &Resolved { sandbox_id: "sandbox-id".into(), attempt: 0, env, volumes },
                    )
                });
                let value = match rendered {
                    Ok(body) => serde_json::to_value(body).unwrap(),
                    Err(e) => serde_json::json!({"error": e}),
                };
                out.insert(spec.name.clone(), value);
            }
            serde_json::Value::Object(out)
        });
    }

    #[test]
    fn env_needs_its_secrets_unless_optional() {
        let pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"containers": [{"name": "c", "env": [
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]}]}}))
            .unwrap();
        let spec = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(resolve_env(&pod, spec, |_| None, "", "").unwrap_err(), "secret \"s\" not found");
        let secret: Secret =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}, "data": {"other": b64("x")}}))
                .unwrap();
        assert_eq!(
            resolve_env(&pod, spec, |_| Some(&secret), "", "").unwrap_err(),
            "couldn't find key token in Secret ns/s"
        );
        let secret: Secret =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}, "data": {"token": b64("t0k")}}))
                .unwrap();
        assert_eq!(
            resolve_env(&pod, spec, |_| Some(&secret), "", "").unwrap(),
            vec![("T".to_string(), "t0k".to_string())]
        );
    }

    #[test]
    fn secret_items_pick_keys_paths_and_modes() {
        let secret: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "s"},
            "data": {"a": b64("1"), "b": b64("2")}}))
        .unwrap();
        let all = secret_files(&secret, None, 0o644).unwrap();
        assert_eq!(all, vec![("a".into(), b"1".to_vec(), 0o644), ("b".into(), b"2".to_vec(), 0o644)]);
        let items: Vec<k8s_openapi::api::core::v1::KeyToPath> =
            serde_json::from_value(serde_json::json!([{"key": "b", "path": "dir/b.txt", "mode": 0o400}])).unwrap();
        assert_eq!(
            secret_files(&secret, Some(&items), 0o644).unwrap(),
            vec![("dir/b.txt".into(), b"2".to_vec(), 0o400)]
        );
        let escape: Vec<k8s_openapi::api::core::v1::KeyToPath> =
            serde_json::from_value(serde_json::json!([{"key": "b", "path": "../b"}])).unwrap();
        assert!(secret_files(&secret, Some(&escape), 0o644).is_err());
    }

    #[test]
    fn a_sandbox_is_hashed_by_what_it_is_not_by_whose_it_is() {
        let node = NodeIdentity { instance: "i".into(), network: "net".into(), sandbox_image: "img".into() };
        let pod = |uid: &str, ports: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "ws-a", "namespace": "ns", "uid": uid},
                "spec": {"containers": [{"name": "agent", "ports": ports}]}}))
            .unwrap()
        };
        let hash = |p: &Pod| sandbox(&node, p, 0).labels.unwrap()[labels::SANDBOX_HASH].clone();
        let ports =
            serde_json::json!([{"containerPort": 80, "hostPort": 8080}, {"containerPort": 81, "hostPort": 8081}]);
        // The next Pod of the name (another uid) would get the same sandbox: the same hash,
        // however often it is rendered (the port bindings are a map).
        assert_eq!(hash(&pod("u1", ports.clone())), hash(&pod("u2", ports.clone())));
        // Another published port is another sandbox.
        let fewer = serde_json::json!([{"containerPort": 80, "hostPort": 8080}]);
        assert_ne!(hash(&pod("u1", ports)), hash(&pod("u2", fewer)));
    }
}
