//! The Kafka bus against a real Kafka-protocol broker (tansu).
#![allow(clippy::unwrap_used)]

mod support {
    pub mod kafka;
}

use futures::StreamExt;
use palaver_node::bus::Bus;
use palaver_node::bus::kafka::{KafkaBus, KafkaConfig, partition_of};
use schema::{Delivery, Event, GatewayId, Message, MessageBody, MessageId, RoomId, Target, UserId};
use std::time::Duration;

fn delivery(gw: &str, room: u64, seq: u64) -> Delivery {
    Delivery {
        gateway: GatewayId::new(gw),
        target: Target::Room { room: RoomId(room) },
        event: Event::Message {
            message: Message {
                id: MessageId(room * 1000 + seq),
                room: RoomId(room),
                seq,
                sender: UserId::parse("u").unwrap(),
                body: MessageBody::Text {
                    text: format!("m{seq}"),
                },
                client_ref: None,
                created_at: 0,
            },
        },
    }
}

fn seq_of(d: &Delivery) -> u64 {
    d.event.seq().unwrap()
}

async fn next(s: &mut palaver_node::bus::DeliveryStream) -> Delivery {
    tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .expect("no delivery in time")
        .expect("stream ended")
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_reach_only_their_gateway_in_order() {
    let broker = support::kafka::TestBroker::start().await;
    let mut config = KafkaConfig::new(broker.brokers());
    config.deliver_partitions = 8;
    let bus = KafkaBus::connect(config).await.unwrap();
    // Two gateways on different partitions.
    let g1 = "gateway-a";
    let g2 = (0..100)
        .map(|i| format!("gateway-{i}"))
        .find(|g| {
            partition_of(&GatewayId::new(g.as_str()), 8) != partition_of(&GatewayId::new(g1), 8)
        })
        .unwrap();
    let mut s1 = bus.subscribe(&GatewayId::new(g1)).await.unwrap();
    let mut s2 = bus.subscribe(&GatewayId::new(g2.as_str())).await.unwrap();
    for seq in 1..=150 {
        bus.publish(delivery(g1, 7, seq)).await.unwrap();
        bus.publish(delivery(&g2, 9, seq)).await.unwrap();
    }
    for seq in 1..=150 {
        let d = next(&mut s1).await;
        assert_eq!(
            (d.gateway.as_str(), d.event.room().0, seq_of(&d)),
            (g1, 7, seq)
        );
        let d = next(&mut s2).await;
        assert_eq!(
            (d.gateway.as_str(), d.event.room().0, seq_of(&d)),
            (g2.as_str(), 9, seq)
        );
    }
    bus.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_resumes_after_a_broker_restart_that_lost_every_topic() {
    let mut broker = support::kafka::TestBroker::start().await;
    let mut config = KafkaConfig::new(broker.brokers());
    config.deliver_partitions = 4;
    config.publish_timeout = Duration::from_secs(5);
    let bus = KafkaBus::connect(config).await.unwrap();
    let gw = GatewayId::new("gw-restart");
    let mut s = bus.subscribe(&gw).await.unwrap();
    bus.publish(delivery("gw-restart", 1, 1)).await.unwrap();
    assert_eq!(seq_of(&next(&mut s).await), 1);
    broker.restart(Duration::from_secs(2)).await;
    // Publishing goes on; once the bus has repaired itself (topics re-created, new producer) and
    // the consumer is back, deliveries arrive again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seq = 1;
    loop {
        seq += 1;
        bus.publish(delivery("gw-restart", 1, seq)).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), s.next()).await {
            Ok(Some(d)) => {
                assert!(
                    seq_of(&d) >= 2,
                    "a delivery from before the restart came again"
                );
                break;
            }
            Ok(None) => panic!("stream ended"),
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "delivery never resumed"
            ),
        }
    }
    // And in order from then on.
    let mut last = 0;
    for extra in 1..=5 {
        bus.publish(delivery("gw-restart", 1, seq + extra))
            .await
            .unwrap();
    }
    while last < seq + 5 {
        let d = next(&mut s).await;
        assert!(seq_of(&d) > last, "order");
        last = seq_of(&d);
    }
    bus.close().await;
}
