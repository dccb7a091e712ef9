//! Trace context across processes: W3C `traceparent` strings in and out of `tracing` spans.
//!
//! Palaver's spans on the message path (`node.call`, `room.send`, `store.write`, `bus.publish`,
//! and the gateway's) are exported by OpenTelemetry when the binary configures an exporter
//! (`palaver_gateway::telemetry`), which then calls [`enable`]. Until then, and always when no
//! exporter is configured, [`span!`](crate::span) makes no span and nothing here formats or
//! parses a `traceparent`: tracing costs one relaxed atomic load per hop.
//!
//! Context travels as a `traceparent` string: in the cluster RPC's `CallRequest`, in Kafka record
//! headers, and in the `traceparent` field of in-process `Delivery`/`PushJob` envelopes. The
//! process-wide OpenTelemetry propagator (W3C Trace Context) formats and parses it.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and field name of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns tracing on for this process (called once an exporter and the OpenTelemetry layer are
/// installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are exported by this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An `info` span when tracing is on, else [`tracing::Span::none`] (nothing is built, no field
/// is formatted).
#[macro_export]
macro_rules! span {
    ($($t:tt)*) => {
        if $crate::trace::enabled() {
            ::tracing::info_span!($($t)*)
        } else {
            ::tracing::Span::none()
        }
    };
}

struct One(Option<String>);

impl Injector for One {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

struct Given<'a>(&'a str);

impl Extractor for Given<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The `traceparent` naming `span` as the parent, or `None` when tracing is off or the span is
/// not recorded.
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = One(None);
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut out));
    out.0
}

/// [`traceparent_of`] the current span.
pub fn current() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent_of(&Span::current())
}

/// Makes `span` a child of the (remote) context named by `traceparent`. A missing or malformed
/// value leaves the span where it is (a new trace, or its local parent).
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    if !enabled() || span.is_disabled() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Given(tp)));
    if cx.span().span_context().is_valid() && span.set_parent(cx).is_err() {
        tracing::debug!("trace parent not set: span already started");
    }
}

/// Adds a link from `span` to `other` (for a batch: the write of several traces' messages is
/// parented to the first and linked to the others).
pub fn link(span: &Span, other: &Span) {
    if !enabled() || span.is_disabled() || other.is_disabled() {
        return;
    }
    let sc = other.context().span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}
