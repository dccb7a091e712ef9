//! The in-process bus: one bounded channel per gateway.

use super::{Bus, BusError, DeliveryStream, PushStream};
use async_trait::async_trait;
use dashmap::DashMap;
use schema::{Delivery, GatewayId, PushJob};
use tokio::sync::mpsc;

/// In-process [`Bus`] for single-process mode.
pub struct LocalBus {
    capacity: usize,
    gateways: DashMap<GatewayId, mpsc::Sender<Delivery>>,
    push: parking_lot::Mutex<Option<mpsc::Sender<PushJob>>>,
}

impl LocalBus {
    /// A bus whose per-gateway queue holds `capacity` deliveries; a publisher waits when it is
    /// full (the gateway's consumer never blocks on clients, so the wait is short).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            gateways: DashMap::new(),
            push: parking_lot::Mutex::new(None),
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, mut delivery: Delivery) -> Result<(), BusError> {
        // In one process the envelope itself carries the trace context to the gateway.
        let (_span, traceparent) = super::publish_span("local.deliver", &delivery.gateway);
        if delivery.traceparent.is_none() {
            delivery.traceparent = traceparent;
        }
        let Some(tx) = self.gateways.get(&delivery.gateway).map(|t| t.clone()) else {
            tracing::debug!(gateway = %delivery.gateway, "delivery for an unknown gateway dropped");
            return Ok(());
        };
        let gateway = delivery.gateway.clone();
        if tx.send(delivery).await.is_err() {
            // The gateway's stream ended: it stopped, and its sessions with it.
            self.gateways.remove_if(&gateway, |_, t| t.is_closed());
        }
        Ok(())
    }

    async fn subscribe(&self, gateway: &GatewayId) -> Result<DeliveryStream, BusError> {
        let (tx, rx) = mpsc::channel(self.capacity);
        self.gateways.insert(gateway.clone(), tx);
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|d| (d, rx))
        })))
    }

    async fn publish_push(&self, mut job: PushJob) -> Result<(), BusError> {
        let tx = self.push.lock().clone();
        let (_span, traceparent) = super::publish_span("local.push", &job.user);
        if job.traceparent.is_none() {
            job.traceparent = traceparent;
        }
        match tx {
            // One process has one push worker; without one there is nobody to push.
            None => Ok(()),
            // Never wait: a slow push provider must not hold back a room's sequencer. A full
            // queue (the worker is far behind) drops the job, loudly.
            Some(tx) => match tx.try_send(job) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(job)) => {
                    tracing::warn!(user = %job.user, room = %job.room, "push queue full: job dropped");
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(BusError::Closed),
            },
        }
    }

    fn wants_push(&self) -> bool {
        self.push.lock().is_some()
    }

    async fn subscribe_push(&self, _group: &str) -> Result<PushStream, BusError> {
        let (tx, rx) = mpsc::channel(self.capacity);
        *self.push.lock() = Some(tx);
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|j| (j, rx))
        })))
    }

    async fn close(&self) {
        self.gateways.clear();
        self.push.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use schema::{Event, Target};

    fn delivery(gw: &str, n: u64) -> Delivery {
        let room = schema::RoomSummary {
            room: schema::Room {
                id: schema::RoomId(n),
                kind: schema::RoomKind::Group,
                name: None,
                created_by: schema::UserId::parse("u").unwrap_or_else(|_| unreachable!()),
                created_at: 0,
                last_seq: 0,
                last_message_id: None,
                avatar: None,
                public: false,
            },
            members: vec![],
            last_message: None,
        };
        Delivery {
            gateway: GatewayId::new(gw),
            target: Target::Users { users: vec![] },
            event: Event::RoomJoined { room },
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn per_gateway_order_and_isolation() {
        let bus = LocalBus::new(16);
        let mut a = bus
            .subscribe(&GatewayId::new("a"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = bus
            .subscribe(&GatewayId::new("b"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for n in 1..=10 {
            bus.publish(delivery("a", n))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        bus.publish(delivery("b", 99))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        bus.publish(delivery("nobody", 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for n in 1..=10 {
            assert_eq!(
                a.next().await.map(|d| d.event.room().map_or(0, |r| r.0)),
                Some(n)
            );
        }
        assert_eq!(
            b.next().await.map(|d| d.event.room().map_or(0, |r| r.0)),
            Some(99)
        );
        bus.close().await;
        assert!(a.next().await.is_none());
    }

    #[tokio::test]
    async fn push_jobs_reach_the_worker_in_order() {
        let bus = LocalBus::new(16);
        let job = |n: u64| PushJob {
            user: schema::UserId::parse("u").unwrap_or_else(|_| unreachable!()),
            room: schema::RoomId(1),
            message: schema::MessageId(n),
            sender: schema::UserId::parse("s").unwrap_or_else(|_| unreachable!()),
            preview: format!("m{n}"),
            kind: "text".into(),
            room_name: None,
            collapse_key: "room-1".into(),
            created_at: 0,
            traceparent: None,
        };
        // Without a worker, jobs go nowhere (and nothing blocks).
        bus.publish_push(job(0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut w = bus
            .subscribe_push("workers")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for n in 1..=5 {
            bus.publish_push(job(n))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        for n in 1..=5 {
            assert_eq!(w.next().await.map(|j| j.message.0), Some(n));
        }
    }
}
