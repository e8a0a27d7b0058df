//! Pure: a Pod's status from what Docker shows of its containers, the way a kubelet
//! writes it: `containerStatuses` (state waiting/running/terminated with reason and
//! exit code, lastState, restartCount, containerID `docker://…`, imageID, ready,
//! started), the phase (the kubelet's `getPhase` over those), the conditions
//! (PodScheduled, PodReadyToStartContainers, Initialized, ContainersReady, Ready;
//! a condition keeps its lastTransitionTime while its status stays), podIP,
//! hostIP and startTime. Tested from YAML fixtures (`src/node/fixtures/*.status.yaml`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, HostIP,
    Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// One Docker container of the Pod (one attempt of one of its containers).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Run {
    pub id: String,
    /// Docker's state: created, running, paused, restarting, exited, dead, removing.
    pub status: String,
    pub exit_code: i64,
    pub oom_killed: bool,
    /// Why Docker could not start it, if it could not.
    pub error: String,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `sha256:…`
    pub image_id: String,
    pub attempt: u32,
}

/// Kubernetes times are whole seconds: a status compares equal to the one read back.
fn seconds(t: chrono::DateTime<chrono::Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or_default())
}

impl Run {
    pub fn is_running(&self) -> bool {
        matches!(self.status.as_str(), "running" | "paused" | "restarting")
    }

    /// Gone for good: exited, dead, or never started because starting failed.
    pub fn is_terminated(&self) -> bool {
        matches!(self.status.as_str(), "exited" | "dead" | "removing")
            || (self.status == "created" && !self.error.is_empty())
    }

    fn terminated(&self) -> ContainerStateTerminated {
        let (exit_code, reason) = if self.status == "created" {
            (128, "StartError")
        } else if self.oom_killed {
            (self.exit_code as i32, "OOMKilled")
        } else if self.exit_code == 0 {
            (0, "Completed")
        } else {
            (self.exit_code as i32, "Error")
        };
        ContainerStateTerminated {
            exit_code,
            reason: Some(reason.to_string()),
            message: (!self.error.is_empty()).then(|| self.error.clone()),
            started_at: self.started_at.map(seconds),
            finished_at: self.finished_at.map(seconds),
            container_id: Some(format!("docker://{}", self.id)),
            signal: None,
        }
    }
}

/// What the node knows of one container of the Pod.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerView {
    /// The latest attempt.
    pub current: Option<Run>,
    /// The one before, kept for `lastState` and `kubectl logs --previous`.
    pub previous: Option<Run>,
    /// Why it is not running (reason, message): ContainerCreating, ErrImagePull,
    /// ImagePullBackOff, CrashLoopBackOff, CreateContainerConfigError, ...
    pub waiting: Option<(String, String)>,
}

/// Everything the status is made of besides the Pod itself.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Observation {
    pub containers: BTreeMap<String, ContainerView>,
    pub sandbox_running: bool,
    pub pod_ip: Option<String>,
    pub host_ip: String,
    /// Set when the Pod cannot run here at all (e.g. init containers): the reason
    /// Initialized is False for, and every container waits.
    pub not_initialized: Option<String>,
}

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let kept =
        previous.iter().find(|c| c.type_ == kind && c.status == status).and_then(|c| c.last_transition_time.clone());
    PodCondition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.map(str::to_string),
        message,
        last_transition_time: Some(kept.unwrap_or_else(|| now.clone())),
        last_probe_time: None,
        observed_generation: None,
    }
}

/// The status to write for `pod`, given what is observed `now`.
pub fn pod_status(pod: &Pod, seen: &Observation, now: chrono::DateTime<chrono::Utc>) -> PodStatus {
    let now = seconds(now);
    let previous = pod.status.clone().unwrap_or_default();
    let previous_conditions = previous.conditions.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut statuses = Vec::new();
    for container in &spec.containers {
        let view = seen.containers.get(&container.name).cloned().unwrap_or_default();
        let current = view.current.as_ref();
        let running = current.filter(|r| r.is_running());
        let last_terminated = |r: Option<&Run>| r.filter(|r| r.is_terminated()).map(Run::terminated);
        let (state, last_state) = match (running, &view.waiting, current) {
            (Some(run), _, _) => (
                ContainerState {
                    running: Some(ContainerStateRunning { started_at: run.started_at.map(seconds) }),
                    ..Default::default()
                },
                last_terminated(view.previous.as_ref()),
            ),
            (None, Some((reason, message)), _) => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: (!message.is_empty()).then(|| message.clone()),
                    }),
                    ..Default::default()
                },
                last_terminated(current).or_else(|| last_terminated(view.previous.as_ref())),
            ),
            (None, None, Some(run)) if run.is_terminated() => (
                ContainerState { terminated: Some(run.terminated()), ..Default::default() },
                last_terminated(view.previous.as_ref()),
            ),
            _ => (
                ContainerState {
                    waiting: Some(ContainerStateWaiting { reason: Some("ContainerCreating".into()), message: None }),
                    ..Default::default()
                },
                None,
            ),
        };
        statuses.push(ContainerStatus {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            image_id: current
                .filter(|r| !r.image_id.is_empty())
                .map(|r| format!("docker://{}", r.image_id))
                .unwrap_or_default(),
            container_id: current.map(|r| format!("docker://{}", r.id)),
            ready: running.is_some(),
            started: Some(running.is_some()),
            restart_count: current.map_or(0, |r| r.attempt as i32),
            state: Some(state),
            last_state: Some(ContainerState { terminated: last_state, ..Default::default() }),
            ..Default::default()
        });
    }

    let phase = phase(&statuses, spec.restart_policy.as_deref().unwrap_or("Always"), seen.not_initialized.is_some());
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let unready: Vec<&str> = statuses.iter().filter(|s| !s.ready).map(|s| s.name.as_str()).collect();
    let ready = unready.is_empty() && !statuses.is_empty();
    let (ready_reason, ready_message) = if terminal {
        (Some("PodCompleted"), None)
    } else if ready {
        (None, None)
    } else {
        (Some("ContainersNotReady"), Some(format!("containers with unready status: [{}]", unready.join(" "))))
    };
    let conditions = vec![
        condition("PodReadyToStartContainers", seen.sandbox_running, None, None, &previous_conditions, &now),
        match &seen.not_initialized {
            Some(why) => {
                condition("Initialized", false, Some("NotSupported"), Some(why.clone()), &previous_conditions, &now)
            }
            None => condition("Initialized", true, None, None, &previous_conditions, &now),
        },
        condition("Ready", ready, ready_reason, ready_message.clone(), &previous_conditions, &now),
        condition("ContainersReady", ready, ready_reason, ready_message, &previous_conditions, &now),
        condition("PodScheduled", true, None, None, &previous_conditions, &now),
    ];
    let pod_ip = seen.pod_ip.clone().filter(|ip| !ip.is_empty());
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        container_statuses: Some(statuses),
        host_ip: Some(seen.host_ip.clone()).filter(|ip| !ip.is_empty()),
        host_ips: Some(vec![HostIP { ip: seen.host_ip.clone() }]).filter(|_| !seen.host_ip.is_empty()),
        pod_ips: pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip,
        start_time: Some(previous.start_time.unwrap_or(now)),
        qos_class: previous.qos_class,
        ..Default::default()
    }
}

/// The kubelet's getPhase: Pending while a container waits to run for the first
/// time; Running while one runs (or all stopped and will restart); Succeeded when
/// all exited 0 and none restarts; Failed when all stopped, one failed and none restarts.
fn phase(statuses: &[ContainerStatus], restart_policy: &str, not_initialized: bool) -> &'static str {
    if not_initialized {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for status in statuses {
        let state = status.state.clone().unwrap_or_default();
        let last = status.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        if state.running.is_some() {
            running += 1;
        } else if let Some(terminated) = &state.terminated {
            stopped += 1;
            if terminated.exit_code == 0 {
                succeeded += 1;
            }
        } else if state.waiting.is_some() {
            if last.is_some() {
                stopped += 1; // restarting after it ran
            } else {
                waiting += 1;
            }
        }
    }
    match () {
        _ if waiting > 0 => "Pending",
        _ if running > 0 => "Running",
        _ if stopped > 0 => {
            if restart_policy == "Always" {
                "Running"
            } else if stopped == succeeded {
                "Succeeded"
            } else if restart_policy == "Never" {
                "Failed"
            } else {
                "Running"
            }
        }
        _ => "Pending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fixture: a Pod and an observation (`in`), the status the node writes
    /// (`out`; new lastTransitionTimes and the startTime are the fixed `now`).
    #[test]
    fn statuses_match_their_fixtures() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:10Z").unwrap().with_timezone(&chrono::Utc);
        super::super::fixtures::check("status", |fixture| {
            let pod: Pod = serde_json::from_value(fixture["pod"].clone()).expect("a Pod");
            let observed: Observation = serde_json::from_value(fixture["observed"].clone()).expect("an observation");
            serde_json::to_value(pod_status(&pod, &observed, now)).unwrap()
        });
    }

    #[test]
    fn phases_follow_the_kubelet() {
        let status = |state: serde_json::Value, last: serde_json::Value| -> ContainerStatus {
            serde_json::from_value(serde_json::json!({"name": "c", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": state, "lastState": last}))
            .unwrap()
        };
        let exited = |code: i32| serde_json::json!({"terminated": {"exitCode": code}});
        let waiting = serde_json::json!({"waiting": {"reason": "ContainerCreating"}});
        assert_eq!(phase(&[status(waiting.clone(), serde_json::json!({}))], "Always", false), "Pending");
        assert_eq!(
            phase(&[status(serde_json::json!({"running": {}}), serde_json::json!({}))], "Never", false),
            "Running"
        );
        assert_eq!(phase(&[status(exited(0), serde_json::json!({}))], "Never", false), "Succeeded");
        assert_eq!(phase(&[status(exited(1), serde_json::json!({}))], "Never", false), "Failed");
        assert_eq!(phase(&[status(exited(1), serde_json::json!({}))], "OnFailure", false), "Running");
        assert_eq!(phase(&[status(waiting, exited(2))], "Always", false), "Running", "CrashLoopBackOff");
    }
}
