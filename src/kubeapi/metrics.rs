//! `GET /apis/metrics.k8s.io/v1beta1/[namespaces/NS/]pods`: PodMetrics, as
//! metrics-server serves them in a cluster, for the local node's Pods. The API asks the
//! node (in-process, as metrics-server asks kubelets), registered with
//! [`super::KubeApi::set_pod_usage`]; without one the group is not served (404), as in a
//! cluster without metrics-server. `labelSelector` selects by the Pods' labels. Only
//! running Pods the node could read are listed.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::selector::Selector;
use super::status::ApiError;
use super::{Kind, KubeApi, Query, json_response};

/// One container's usage, as the node read it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerUsage {
    pub container: String,
    /// Cores, averaged over `window` seconds.
    pub cores: Option<f64>,
    pub window: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub at: DateTime<Utc>,
}

/// A node that can read its Pods' usage.
#[async_trait::async_trait]
pub trait PodUsage: Send + Sync {
    /// Its running Pods' containers, by Pod uid.
    async fn usage(&self) -> Result<HashMap<String, Vec<ContainerUsage>>, String>;
}

pub(crate) async fn serve(
    api: &KubeApi,
    ns: Option<&str>,
    query: &Query,
    path: &str,
) -> Result<axum::response::Response, ApiError> {
    let Some(node) = api.pod_usage.get() else {
        return Err(ApiError::not_found_path(path));
    };
    let selector = Selector::parse(Kind::Pod, query)?;
    let (pods, _) = api.store.list_objects(Kind::Pod.name(), ns).await?;
    let usage = node.usage().await.map_err(ApiError::service_unavailable)?;
    let items: Vec<Value> = pods
        .iter()
        .filter(|p| selector.matches(&p.body))
        .filter_map(|p| Some(pod_metrics(&p.body, usage.get(&p.uid)?)))
        .collect();
    Ok(json_response(
        200,
        &json!({"kind": "PodMetricsList", "apiVersion": "metrics.k8s.io/v1beta1", "metadata": {}, "items": items}),
    ))
}

/// One PodMetrics: CPU in nanocores, memory in KiB, as metrics-server writes them.
pub fn pod_metrics(pod: &Value, containers: &[ContainerUsage]) -> Value {
    let at = containers.iter().map(|c| c.at).max().unwrap_or_else(Utc::now);
    let window = containers.iter().filter_map(|c| c.window).fold(0.0, f64::max);
    json!({
        "metadata": {
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "labels": pod["metadata"]["labels"],
            "creationTimestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        },
        "timestamp": at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "window": format!("{window:.3}s"),
        "containers": containers.iter().map(|c| json!({
            "name": c.container,
            "usage": {
                "cpu": format!("{}n", (c.cores.unwrap_or(0.0) * 1e9).round() as u64),
                "memory": format!("{}Ki", c.memory_bytes.unwrap_or(0) / 1024),
            },
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_metrics_read_back_as_the_runtime_reads_metrics_server() {
        let pod = json!({"metadata": {"name": "ws-1", "namespace": "default", "labels": {"a": "b"}}});
        let at = "2026-03-01T12:00:00Z".parse().unwrap();
        let m = pod_metrics(
            &pod,
            &[ContainerUsage {
                container: "agent".into(),
                cores: Some(0.0025),
                window: Some(15.0),
                memory_bytes: Some(3 << 20),
                at,
            }],
        );
        assert_eq!(m["containers"][0]["usage"], json!({"cpu": "2500000n", "memory": "3072Ki"}));
        assert_eq!(m["metadata"]["labels"], json!({"a": "b"}));
        let list = json!({"items": [m]});
        let read = crate::runtime::kubernetes::metrics::pod_usages(&list);
        assert_eq!(read[0].name, "ws-1");
        assert!((read[0].cores.unwrap() - 0.0025).abs() < 1e-12);
        assert_eq!((read[0].memory_bytes, read[0].window, read[0].at), (Some(3 << 20), Some(15.0), Some(at)));
    }
}
