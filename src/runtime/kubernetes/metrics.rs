//! Pods' usage from the resource metrics API (`metrics.k8s.io/v1beta1`, served by
//! metrics-server where a cluster runs one; nothing guarantees it). One list per
//! namespace that holds workspaces, selected by the instance label; the API already
//! averages CPU over its window, so one reading is a rate. Where the API is not
//! served, usage is not shown, and the API is asked again only after [`RETRY`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::Client;

use super::objects::split_key;
use crate::model::container::{ContainerInfo, labels};
use crate::model::usage::{Cpu, Reading, duration_seconds, quantity};

/// How long a cluster that did not serve the metrics API is left alone.
pub const RETRY: Duration = Duration::from_secs(300);

/// One Pod's usage as the API reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodUsage {
    pub name: String,
    pub cores: Option<f64>,
    pub window: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub at: Option<DateTime<Utc>>,
}

/// The Pods of a `PodMetricsList`, their containers summed.
pub fn pod_usages(list: &serde_json::Value) -> Vec<PodUsage> {
    let items = list.get("items").and_then(|i| i.as_array()).map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .filter_map(|item| {
            let name = item.pointer("/metadata/name")?.as_str()?.to_string();
            let containers = item.get("containers").and_then(|c| c.as_array()).map(Vec::as_slice).unwrap_or_default();
            let sum = |resource: &str| -> Option<f64> {
                let values: Vec<f64> = containers
                    .iter()
                    .filter_map(|c| c.pointer(&format!("/usage/{resource}"))?.as_str().and_then(quantity))
                    .collect();
                (!values.is_empty()).then(|| values.iter().sum())
            };
            Some(PodUsage {
                name,
                cores: sum("cpu"),
                window: item.get("window").and_then(|w| w.as_str()).and_then(duration_seconds),
                memory_bytes: sum("memory").map(|b| b.max(0.0) as u64),
                at: item.get("timestamp").and_then(|t| t.as_str()).and_then(|t| t.parse().ok()),
            })
        })
        .collect()
}

/// Reads the metrics API for the runtime; remembers when it was not served.
#[derive(Debug, Default)]
pub struct MetricsApi {
    unserved_until: Mutex<Option<Instant>>,
}

impl MetricsApi {
    /// Readings of `containers` (Pods); None when the cluster serves no metrics API.
    pub async fn read(&self, client: &Client, instance: &str, containers: &[ContainerInfo]) -> Option<Vec<Reading>> {
        if self.unserved_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let mut by_namespace: BTreeMap<&str, HashMap<&str, &str>> = BTreeMap::new();
        for c in containers {
            let (ns, _) = split_key(c.workspace().unwrap_or_default());
            by_namespace.entry(ns).or_default().insert(c.name.as_str(), c.id.as_str());
        }
        let mut out = Vec::new();
        for (ns, pods) in by_namespace {
            let selector = format!("{}={instance}", labels::INSTANCE);
            let url =
                format!("/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods?labelSelector={}", url_escape(&selector));
            let request = match axum::http::Request::get(url).body(Vec::new()) {
                Ok(r) => r,
                Err(_) => continue,
            };
            let list: serde_json::Value = match client.request(request).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::debug!(error = %e, "the resource metrics API (metrics.k8s.io) does not answer: no usage shown");
                    *self.unserved_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + RETRY);
                    return None;
                }
            };
            for p in pod_usages(&list) {
                let Some(id) = pods.get(p.name.as_str()) else { continue };
                out.push(Reading {
                    container_id: (*id).to_string(),
                    cpu: p.cores.map(|cores| Cpu::Rate { cores, window: p.window }),
                    memory_bytes: p.memory_bytes,
                    at: p.at.unwrap_or_else(Utc::now),
                });
            }
        }
        Some(out)
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_metrics_list_as_metrics_server_answers() {
        let list = serde_json::json!({
            "kind": "PodMetricsList",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "items": [
                {
                    "metadata": {"name": "ws-0123456789ab", "namespace": "default"},
                    "timestamp": "2026-03-01T12:00:00Z",
                    "window": "15.01s",
                    "containers": [
                        {"name": "agent", "usage": {"cpu": "2500000n", "memory": "3000Ki"}},
                        {"name": "sidecar", "usage": {"cpu": "1m", "memory": "1Mi"}}
                    ]
                },
                {"metadata": {"name": "ws-empty"}, "containers": []},
                {"containers": []}
            ]
        });
        let got = pod_usages(&list);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "ws-0123456789ab");
        assert!((got[0].cores.unwrap() - 0.0035).abs() < 1e-9);
        assert_eq!(got[0].memory_bytes, Some(3000 * 1024 + 1024 * 1024));
        assert_eq!(got[0].window, Some(15.01));
        assert_eq!(got[0].at, Some("2026-03-01T12:00:00Z".parse().unwrap()));
        assert_eq!((got[1].cores, got[1].memory_bytes), (None, None));
        assert!(pod_usages(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn selectors_are_escaped() {
        assert_eq!(url_escape("ai.molecule.instance=a b"), "ai.molecule.instance%3Da%20b");
    }
}
