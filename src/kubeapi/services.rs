//! Services are stored and listed, not routed: nothing proxies to them. A create
//! gets a cluster IP from 10.96.0.0/16 that no other Service holds, as the API
//! server's allocator gives one, so `kubectl get svc` reads like a cluster's.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::status::ApiError;
use super::{Kind, KubeApi};

/// Fills `spec.clusterIP(s)` and the IP family fields of a new Service.
pub async fn allocate_cluster_ip(api: &KubeApi, service: &mut Value) -> Result<(), ApiError> {
    let spec = &mut service["spec"];
    if spec["type"] == "ExternalName" {
        return Ok(());
    }
    let asked = spec["clusterIP"].as_str().unwrap_or("").to_string();
    let ip = if asked.is_empty() {
        let (services, _) = api.store.list_objects(Kind::Service.name(), None).await?;
        let taken: BTreeSet<String> =
            services.iter().filter_map(|s| s.body["spec"]["clusterIP"].as_str().map(str::to_string)).collect();
        free_ip(&taken).ok_or_else(|| ApiError::internal("no cluster IP is left in 10.96.0.0/16"))?
    } else {
        asked
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    if ip != "None" {
        spec["ipFamilies"] = json!(["IPv4"]);
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    Ok(())
}

/// The first address of 10.96.0.0/16 past the network and the API server's own
/// (10.96.0.1, the `kubernetes` Service of a real cluster) that is not taken.
fn free_ip(taken: &BTreeSet<String>) -> Option<String> {
    (2u32..65535).map(|n| format!("10.96.{}.{}", n / 256, n % 256)).find(|ip| !taken.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ips_are_not_reused() {
        let taken: BTreeSet<String> = ["10.96.0.2".to_string(), "10.96.0.3".to_string()].into();
        assert_eq!(free_ip(&taken).as_deref(), Some("10.96.0.4"));
        assert_eq!(free_ip(&BTreeSet::new()).as_deref(), Some("10.96.0.2"));
    }
}
