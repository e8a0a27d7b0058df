//! `GET pods/NAME/log`: the API server asks the Pod's node for the container's
//! output, as a real one proxies to the kubelet. Here the node is in-process (the
//! local node, src/node), registered with [`super::KubeApi::set_pod_logs`]; without
//! one the answer is 503, saying how to start it.
//!
//! Parameters: `container` (required when the Pod has several and names no
//! default), `follow`, `tailLines`, `timestamps`, `sinceSeconds`, `previous`,
//! `limitBytes`. The answer is the raw text (stdout and stderr interleaved), streamed.

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::status::ApiError;
use super::{Kind, KubeApi, Query};

/// What a log request asks for (PodLogOptions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub container: String,
    pub follow: bool,
    pub tail_lines: Option<i64>,
    pub timestamps: bool,
    pub since_seconds: Option<i64>,
    pub previous: bool,
    pub limit_bytes: Option<u64>,
}

/// A node that can read its Pods' container output.
#[async_trait::async_trait]
pub trait PodLogs: Send + Sync {
    /// The output of `options.container` in `pod` (the stored object). Err is the
    /// message of a 400 the client shows (e.g. the container has not started).
    async fn logs(
        &self,
        pod: &Value,
        options: &LogOptions,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, String>;
}

fn number(query: &Query, key: &str) -> Result<Option<i64>, ApiError> {
    query
        .get(key)
        .map(|v| v.parse::<i64>().map_err(|_| ApiError::bad_request(format!("{key} {v:?} is not a number"))))
        .transpose()
}

/// The container a request means: the named one, the Pod's default-container
/// annotation, or its only container.
fn container(pod: &Value, asked: Option<&str>, name: &str) -> Result<String, ApiError> {
    let names: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str())
        .collect();
    let main: Vec<&str> =
        pod["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    let chosen = match asked.filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => match pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"].as_str() {
            Some(c) => c.to_string(),
            None if main.len() == 1 => main[0].to_string(),
            None => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    main.join(" ")
                )));
            }
        },
    };
    if !names.contains(&chosen.as_str()) {
        return Err(ApiError::bad_request(format!("container {chosen} is not valid for pod {name}")));
    }
    Ok(chosen)
}

pub(crate) async fn serve(api: &KubeApi, ns: &str, name: &str, query: &Query) -> Result<Response, ApiError> {
    let pod = api.current(Kind::Pod, ns, name).await?.body;
    let options = LogOptions {
        container: container(&pod, query.get("container"), name)?,
        follow: query.flag("follow") && query.get("follow").is_some(),
        tail_lines: number(query, "tailLines")?,
        timestamps: query.flag("timestamps") && query.get("timestamps").is_some(),
        since_seconds: number(query, "sinceSeconds")?,
        previous: query.flag("previous") && query.get("previous").is_some(),
        limit_bytes: number(query, "limitBytes")?.map(|n| n.max(0) as u64),
    };
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(format!("pod {name} does not have a host assigned")));
    }
    let Some(node) = api.pod_logs.get() else {
        return Err(ApiError::service_unavailable(
            "no node runs Pods here: start the operator with `--runtime kubernetes` to run them and read their logs",
        ));
    };
    let stream = node.logs(&pod, &options).await.map_err(ApiError::bad_request)?;
    let stream = match options.limit_bytes {
        None => stream,
        Some(limit) => {
            let mut left = limit;
            stream
                .try_take_while(move |_| futures::future::ready(Ok(left > 0)))
                .map_ok(move |chunk| {
                    let keep = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    left -= keep as u64;
                    chunk.slice(..keep)
                })
                .boxed()
        }
    };
    Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("cannot stream the log: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_container_is_named_defaulted_or_the_only_one() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(container(&one, None, "p").unwrap(), "a");
        assert_eq!(container(&one, Some("b"), "p").unwrap_err().code, 400);
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert!(container(&two, None, "p").unwrap_err().message.contains("choose one of: [a b]"));
        assert_eq!(container(&two, Some("b"), "p").unwrap(), "b");
        let annotated = json!({"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "b"}},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(container(&annotated, None, "p").unwrap(), "b");
    }
}
