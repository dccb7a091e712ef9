//! The bus: how node actors hand events to gateways.
//!
//! A [`Bus`] carries [`Delivery`] envelopes addressed to one gateway each, and [`PushJob`]s for
//! push workers. Per gateway, deliveries
//! arrive in the order they were published, which keeps one order per room. Backends: [`local`]
//! (in-process channels, for `palaver serve`); the Kafka backend of the cluster implements the
//! same trait.

pub mod kafka;
pub mod local;
pub mod metered;

use async_trait::async_trait;
use futures::stream::BoxStream;
use schema::{Delivery, GatewayId, PushJob};

/// The `bus.publish` span of one envelope sent to `destination`, and the trace context the
/// envelope carries on (both empty when tracing is off: nothing is formatted).
pub(crate) fn publish_span(
    destination: &'static str,
    key: &dyn std::fmt::Display,
) -> (tracing::Span, Option<String>) {
    let span = crate::span!(
        "bus.publish",
        messaging.destination.name = destination,
        messaging.key = %key,
    );
    let traceparent = crate::trace::traceparent_of(&span);
    (span, traceparent)
}

/// Bus failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus cannot take the delivery now.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The bus has been closed.
    #[error("bus is closed")]
    Closed,
}

/// The deliveries for one gateway, in publish order.
pub type DeliveryStream = BoxStream<'static, Delivery>;

/// The push jobs one worker of a group receives.
pub type PushStream = BoxStream<'static, PushJob>;

/// Carries deliveries from node actors to gateways.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes one delivery to `delivery.gateway`. Waits (bounded) when that gateway is behind.
    /// A delivery to a gateway that is not subscribed is dropped: it has no sessions to serve.
    async fn publish(&self, delivery: Delivery) -> Result<(), BusError>;

    /// Starts receiving the deliveries addressed to `gateway`. A second call for the same gateway
    /// replaces the first stream.
    async fn subscribe(&self, gateway: &GatewayId) -> Result<DeliveryStream, BusError>;

    /// Publishes a push job. Jobs of one user keep their order.
    async fn publish_push(&self, job: PushJob) -> Result<(), BusError>;

    /// Whether the bus can carry messages now (for readiness checks). Default: yes.
    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Whether push jobs can reach a worker at all. A room skips building jobs when not (one
    /// process with no push provider configured has nobody to push). Default: yes.
    fn wants_push(&self) -> bool {
        true
    }

    /// Starts receiving push jobs as a worker of `group`: the workers of one group share the
    /// jobs, each job going to one of them.
    async fn subscribe_push(&self, group: &str) -> Result<PushStream, BusError>;

    /// Stops the bus; open streams end.
    async fn close(&self);
}
