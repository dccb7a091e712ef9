//! A [`Bus`] decorator that measures it, whatever the backend: the time of each publish
//! (`palaver_bus_publish_seconds{topic}`), failed publishes and subscriptions
//! (`palaver_bus_errors_total{topic}`) and the envelopes consumed from its streams
//! (`palaver_bus_consumed_total{topic}`). `topic` is the Kafka topic name, also in one process:
//! `palaver.deliver` (deliveries to gateways) or `palaver.push` (push jobs).
//!
//! The handles are registered once, when the decorator is built.

use super::{Bus, BusError, DeliveryStream, PushStream};
use async_trait::async_trait;
use futures::StreamExt;
use metrics::{Counter, Histogram};
use schema::{Delivery, GatewayId, PushJob};
use std::sync::Arc;
use std::time::Instant;

/// The `topic` label of deliveries.
pub const DELIVER: &str = "palaver.deliver";
/// The `topic` label of push jobs.
pub const PUSH: &str = "palaver.push";

/// The instruments of one topic.
struct Topic {
    publish: Histogram,
    errors: Counter,
    consumed: Counter,
}

impl Topic {
    fn new(topic: &'static str) -> Self {
        Self {
            publish: metrics::histogram!("palaver_bus_publish_seconds", "topic" => topic),
            errors: metrics::counter!("palaver_bus_errors_total", "topic" => topic),
            consumed: metrics::counter!("palaver_bus_consumed_total", "topic" => topic),
        }
    }

    fn published(&self, started: Instant, res: &Result<(), BusError>) {
        self.publish.record(started.elapsed());
        if res.is_err() {
            self.errors.increment(1);
        }
    }
}

/// A [`Bus`] that forwards to `inner` and measures it.
pub struct MeteredBus {
    inner: Arc<dyn Bus>,
    deliver: Topic,
    push: Topic,
}

impl MeteredBus {
    /// Wraps `inner`; its metric handles are registered now.
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        Self {
            inner,
            deliver: Topic::new(DELIVER),
            push: Topic::new(PUSH),
        }
    }
}

#[async_trait]
impl Bus for MeteredBus {
    async fn publish(&self, delivery: Delivery) -> Result<(), BusError> {
        let started = Instant::now();
        let res = self.inner.publish(delivery).await;
        self.deliver.published(started, &res);
        res
    }

    async fn subscribe(&self, gateway: &GatewayId) -> Result<DeliveryStream, BusError> {
        match self.inner.subscribe(gateway).await {
            Ok(stream) => {
                let consumed = self.deliver.consumed.clone();
                Ok(stream.inspect(move |_| consumed.increment(1)).boxed())
            }
            Err(e) => {
                self.deliver.errors.increment(1);
                Err(e)
            }
        }
    }

    async fn publish_push(&self, job: PushJob) -> Result<(), BusError> {
        let started = Instant::now();
        let res = self.inner.publish_push(job).await;
        self.push.published(started, &res);
        res
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.inner.ping().await
    }

    fn wants_push(&self) -> bool {
        self.inner.wants_push()
    }

    async fn subscribe_push(&self, group: &str) -> Result<PushStream, BusError> {
        match self.inner.subscribe_push(group).await {
            Ok(stream) => {
                let consumed = self.push.consumed.clone();
                Ok(stream.inspect(move |_| consumed.increment(1)).boxed())
            }
            Err(e) => {
                self.push.errors.increment(1);
                Err(e)
            }
        }
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::local::LocalBus;
    use schema::{Event, RoomId, Target};

    /// The decorator changes nothing of what the bus carries.
    #[tokio::test]
    async fn forwards_deliveries_in_order() {
        let bus = MeteredBus::new(Arc::new(LocalBus::new(16)));
        let gw = GatewayId::new("g");
        let mut stream = bus.subscribe(&gw).await.expect("subscribe");
        for room in 1..=3 {
            bus.publish(Delivery {
                gateway: gw.clone(),
                target: Target::Room { room: RoomId(room) },
                event: Event::Typing {
                    room: RoomId(room),
                    user: schema::UserId::parse("1").expect("uid"),
                    name: None,
                    typing: true,
                },
                traceparent: None,
            })
            .await
            .expect("publish");
        }
        for room in 1..=3 {
            let d = stream.next().await.expect("a delivery");
            assert!(
                matches!(d.target, Target::Room { room: r } if r == RoomId(room)),
                "{:?}",
                d.target
            );
        }
    }
}
