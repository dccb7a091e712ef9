//! Logging: human-readable lines by default, JSON with `PALAVER_LOG_FORMAT=json`; the filter
//! comes from `PALAVER_LOG` (or `RUST_LOG`), default `info`. Traces: [`otel`] exports
//! `tracing` spans over OTLP when an endpoint is configured, and then every log line made inside
//! a span carries its `trace_id` and `span_id`. Prometheus metrics: [`metrics`].

pub mod metrics;
pub mod otel;

use crate::config::LogFormat;
use opentelemetry::trace::TraceContextExt;
use std::collections::HashMap;
use std::sync::OnceLock;
use tracing::dispatcher::WeakDispatch;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// The installed subscriber, for reading the OpenTelemetry context of a log line's span.
static DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// Installs the global subscriber (once; later calls are no-ops): logs on stderr, and spans
/// exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set (see
/// [`otel`]). `role` names the process (`serve`, `gateway`, `node`, `push-worker`) for the
/// default service name, `instance` its gateway or node id. Call inside the tokio runtime. A bad
/// `OTEL_*` value is an error naming it (logs are installed anyway).
pub fn init(
    format: LogFormat,
    role: &str,
    instance: Option<&str>,
    env: &HashMap<String, String>,
) -> Result<(), String> {
    let filter = env
        .get("PALAVER_LOG")
        .or_else(|| env.get("RUST_LOG"))
        .map_or("info", String::as_str);
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (tracer, failed) = match otel::settings(env, role) {
        Ok(Some(settings)) => match otel::start(&settings, instance) {
            Ok(tracer) => (Some(tracer), None),
            Err(e) => (None, Some(e)),
        },
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };
    let traced = tracer.is_some();
    // Palaver's spans only: dependencies' spans would flood the traces.
    let otel_layer = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("palaver_node", tracing::Level::INFO)
                    .with_target("palaver_gateway", tracing::Level::INFO)
                    .with_target("palaver", tracing::Level::INFO),
            )
    });
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .event_format(TraceIds {
                inner: tracing_subscriber::fmt::format(),
                json: false,
            })
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .event_format(TraceIds {
                inner: tracing_subscriber::fmt::format().json().flatten_event(true),
                json: true,
            })
            .boxed(),
    };
    let res = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init();
    if res.is_err() {
        tracing::debug!("log subscriber already installed");
    } else {
        tracing::dispatcher::get_default(|d| DISPATCH.set(d.downgrade()).is_ok());
        if traced {
            node::trace::enable();
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Exports the spans still queued; call at exit (no-op when tracing is off).
pub async fn shutdown() {
    otel::shutdown().await;
}

/// A log line formatter that adds the trace and span ids of the line's span, when tracing is
/// on: fields `trace_id` and `span_id` first in a JSON line, `trace_id=... span_id=...` at the
/// end of a text line.
struct TraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = if node::trace::enabled() {
            ids_of(ctx)
        } else {
            None
        };
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        if self.json
            && let Some(rest) = line.strip_prefix('{')
        {
            write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            )
        } else {
            let line = line.strip_suffix('\n').unwrap_or(&line);
            writeln!(writer, "{line} trace_id={trace_id} span_id={span_id}")
        }
    }
}

/// The OpenTelemetry ids of the innermost span around the event that has them.
fn ids_of<S, N>(
    ctx: &FmtContext<'_, S, N>,
) -> Option<(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let dispatch = DISPATCH.get()?.upgrade()?;
    for span in ctx.event_scope()? {
        let Some(cx) = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch) else {
            continue;
        };
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some((sc.trace_id(), sc.span_id()));
        }
    }
    None
}
