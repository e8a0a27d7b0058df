//! OpenTelemetry traces (`--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`): each reconcile is a span, with a child span per step
//! (`observe`, `plan`, `execute <action>` for each action carried out), the workspace,
//! and the decision's rule and cause as attributes. They are exported in batches over
//! OTLP/HTTP with JSON bodies (`POST {endpoint}/v1/traces`), which every collector
//! (the OpenTelemetry Collector, Jaeger, Tempo) accepts.
//!
//! Without an endpoint nothing is made: the spans are TRACE-level under the target
//! [`TARGET`], which the log filter leaves out (unless asked for with `RUST_LOG`), so
//! their callsites stay disabled and a reconcile pays nothing for them. With one, the
//! filter enables that target (log lines then carry the span's context).

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The target of the spans that are exported (and only of those).
pub const TARGET: &str = "molecule::otel";
/// The service name the spans carry.
const SERVICE: &str = "molecule-operator";
/// How long an export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last batch may take to go out at shutdown.
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(5);

/// The URL spans are sent to: `endpoint` is the collector's base URL (as
/// OTEL_EXPORTER_OTLP_ENDPOINT is), or already the traces URL.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    match base.ends_with("/v1/traces") {
        true => base.to_string(),
        false => format!("{base}/v1/traces"),
    }
}

/// The exporter, running: its layer goes into the subscriber; `shutdown` sends what
/// is left.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Starts exporting to `endpoint`, labelled with the operator `instance`. Must be
    /// called inside the Tokio runtime (the batches are sent from a task of it).
    pub fn start(endpoint: &str, instance: &str) -> anyhow::Result<Self> {
        let url = traces_url(endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(&url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .with_context(|| format!("--otlp-endpoint {endpoint}: cannot make an OTLP exporter for {url}"))?;
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(SERVICE)
            .with_attributes([
                KeyValue::new("service.instance.id", instance.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
        Ok(Self { provider })
    }

    /// The layer that turns spans into OTel spans: the operator's (target [`TARGET`],
    /// enabled by the log filter when exporting) and any other span the filter lets
    /// through. No per-layer filter: with one, a log line right after a library's
    /// `enabled!` check (sqlx does one per query) was dropped (the HA tests saw the
    /// lease's log lines vanish), so the one filter is the global one.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + use<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(SERVICE))
    }

    /// Sends the spans not sent yet (within a few seconds) and stops.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(SHUTDOWN_WITHIN, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the last traces could not be exported"),
            _ => tracing::warn!("the last traces were not exported within {SHUTDOWN_WITHIN:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_base_url_unless_it_names_the_traces_path() {
        assert_eq!(traces_url("http://collector:4318"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/"), "http://collector:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/v1/traces"), "http://collector:4318/v1/traces");
    }
}
