//! OpenTelemetry traces: an OTLP/HTTP (protobuf) exporter behind a batch span processor,
//! layered under `tracing` with `tracing-opentelemetry`.
//!
//! On only when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (`/v1/traces` appended) is set, and `OTEL_SDK_DISABLED` is not `true` nor
//! `OTEL_TRACES_EXPORTER` `none`. Otherwise no layer is installed, no span of the message path
//! is created ([`node::trace::enabled`] stays false) and no `traceparent` is formatted.
//!
//! The service name is `OTEL_SERVICE_NAME`, default `palaver-<role>`; `service.instance.id` is
//! the gateway or node id. The SDK itself reads the sampler (`OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`), the batch settings (`OTEL_BSP_*`), the exporter's headers and
//! timeout (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`) and `OTEL_RESOURCE_ATTRIBUTES`. The W3C
//! Trace Context propagator is installed process-wide. The exporter posts with the `reqwest`
//! client Palaver already uses (rustls), on the process's tokio runtime.

use bytes::Bytes;
use node::api::NodeApi;
use node::user::{Connected, SessionInfo};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use schema::{Command, Error, GatewayId, Profile, Reply, RoomId, SessionId, UserId};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::Instrument;

/// Largest answer read from a collector.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Where spans go, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Full URL of the traces endpoint.
    pub endpoint: String,
    /// `service.name`.
    pub service_name: String,
    /// Request timeout.
    pub timeout: Duration,
}

fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// Reads the settings: `Ok(None)` when tracing is off, an error naming the variable for a bad
/// value.
pub fn settings(env: &HashMap<String, String>, role: &str) -> Result<Option<Settings>, String> {
    if var(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var(env, "OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let endpoint = if let Some(e) = var(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e)?;
        e.to_owned()
    } else if let Some(e) = var(env, "OTEL_EXPORTER_OTLP_ENDPOINT") {
        check_url("OTEL_EXPORTER_OTLP_ENDPOINT", e)?;
        format!("{}/v1/traces", e.trim_end_matches('/'))
    } else {
        return Ok(None);
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = var(env, name) {
            if p != "http/protobuf" {
                return Err(format!(
                    "{name}={p:?}: only \"http/protobuf\" is supported (point it at the collector's OTLP/HTTP port, usually 4318)"
                ));
            }
            break;
        }
    }
    let timeout = match var(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", v))
        .or_else(|| {
            var(env, "OTEL_EXPORTER_OTLP_TIMEOUT").map(|v| ("OTEL_EXPORTER_OTLP_TIMEOUT", v))
        }) {
        Some((name, v)) => Duration::from_millis(
            v.parse::<u64>()
                .map_err(|e| format!("{name}={v:?}: milliseconds expected: {e}"))?,
        ),
        None => Duration::from_secs(10),
    };
    let service_name =
        var(env, "OTEL_SERVICE_NAME").map_or_else(|| format!("palaver-{role}"), str::to_owned);
    Ok(Some(Settings {
        endpoint,
        service_name,
        timeout,
    }))
}

fn check_url(name: &str, v: &str) -> Result<(), String> {
    match v.parse::<axum::http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Ok(()),
        Ok(_) => Err(format!("{name}={v:?}: an http:// or https:// URL expected")),
        Err(e) => Err(format!("{name}={v:?}: {e}")),
    }
}

/// Builds the exporter and the provider, installs the propagator and the provider globally,
/// and answers the tracer for the `tracing` layer.
pub fn start(settings: &Settings, instance: Option<&str>) -> Result<SdkTracer, String> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "tracing must be started inside the tokio runtime".to_owned())?;
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .build()
        .map_err(|e| format!("OTLP HTTP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp { client, runtime })
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.timeout)
        .build()
        .map_err(|e| format!("OTLP exporter for {}: {e}", settings.endpoint))?;
    let mut resource = Resource::builder().with_service_name(settings.service_name.clone());
    if let Some(id) = instance {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", id.to_owned()));
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("palaver");
    if PROVIDER.set(provider).is_err() {
        return Err("tracing already started".into());
    }
    Ok(tracer)
}

/// Exports the spans still queued and stops the exporter. Call at exit, inside the runtime.
pub async fn shutdown() {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    // The processor's thread waits for exports that run on this runtime: block elsewhere.
    let provider = provider.clone();
    match tokio::task::spawn_blocking(move || provider.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "span exporter shutdown"),
        Err(e) => tracing::warn!(error = %e, "span exporter shutdown task"),
    }
}

/// The OTLP exporter's HTTP client: Palaver's `reqwest` (rustls), run on the process's tokio
/// runtime (the batch processor exports from its own thread).
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let mut resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let mut answer = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                    break;
                }
                answer.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, headers, answer))
        });
        let (status, headers, answer) = task.await??;
        let mut response = Response::new(Bytes::from(answer));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// The gateway's view of the nodes, with a `gateway.receive` span around every command (the
/// root of a message's trace). Installed only when tracing is on.
pub struct Traced(pub Arc<dyn NodeApi>);

/// `node` wrapped in [`Traced`] when tracing is on, else `node` itself.
pub fn traced(node: Arc<dyn NodeApi>) -> Arc<dyn NodeApi> {
    if node::trace::enabled() {
        Arc::new(Traced(node))
    } else {
        node
    }
}

#[async_trait::async_trait]
impl NodeApi for Traced {
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error> {
        self.0.connect(profile, session).await
    }

    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        self.0.import_users(users).await
    }

    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        self.0.disconnect(user, gateway, session).await;
    }

    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        let span = tracing::info_span!(
            "gateway.receive",
            op = cmd.name(),
            user = %caller,
            room = tracing::field::Empty,
        );
        if let Some(room) = cmd.room() {
            span.record("room", room.0);
        }
        self.0.execute(caller, cmd).instrument(span).await
    }

    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.0.subscribe(gateway, rooms).await;
    }

    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.0.unsubscribe(gateway, rooms).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn settings_from_the_standard_variables() {
        assert_eq!(settings(&env(&[]), "node"), Ok(None));
        let s = settings(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]),
            "gateway",
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("on"));
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.service_name, "palaver-gateway");
        assert_eq!(s.timeout, Duration::from_secs(10));
        let s = settings(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:443/custom"),
                ("OTEL_SERVICE_NAME", "chat-eu"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
            "node",
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("on"));
        assert_eq!(
            (s.endpoint.as_str(), s.service_name.as_str(), s.timeout),
            (
                "https://c:443/custom",
                "chat-eu",
                Duration::from_millis(2500)
            )
        );
        let off = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(settings(&env(&off), "node"), Ok(None));
        let bad = settings(
            &env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector")]),
            "node",
        );
        assert!(
            bad.as_ref()
                .is_err_and(|e| e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT=")),
            "{bad:?}"
        );
        let grpc = settings(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
            "node",
        );
        assert!(
            grpc.as_ref()
                .is_err_and(|e| e.contains("OTEL_EXPORTER_OTLP_PROTOCOL")),
            "{grpc:?}"
        );
        let t = settings(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ]),
            "node",
        );
        assert!(t.is_err(), "{t:?}");
    }
}
