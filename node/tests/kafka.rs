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
            message: Message::new(
                MessageId(room * 1000 + seq),
                RoomId(room),
                seq,
                UserId::parse("u").unwrap(),
                MessageBody::Text {
                    text: format!("m{seq}"),
                },
                0,
            ),
        },
        traceparent: None,
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
            (
                d.gateway.as_str(),
                d.event.room().map_or(0, |r| r.0),
                seq_of(&d)
            ),
            (g1, 7, seq)
        );
        let d = next(&mut s2).await;
        assert_eq!(
            (
                d.gateway.as_str(),
                d.event.room().map_or(0, |r| r.0),
                seq_of(&d)
            ),
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

fn job(user: u64, n: u64) -> schema::PushJob {
    schema::PushJob {
        user: UserId::parse(&format!("user{user}")).unwrap(),
        room: RoomId(7),
        message: MessageId(user * 1000 + n),
        sender: UserId::parse("s").unwrap(),
        preview: format!("m{n}"),
        kind: "text".into(),
        room_name: None,
        collapse_key: "room-7".into(),
        created_at: 0,
        traceparent: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_workers_of_one_group_share_the_jobs_once_each_in_user_order() {
    let broker = support::kafka::TestBroker::start().await;
    let mut config = KafkaConfig::new(broker.brokers());
    config.push_partitions = 4;
    let bus = KafkaBus::connect(config).await.unwrap();
    let mut w1 = bus.subscribe_push("push-workers").await.unwrap();
    let mut w2 = bus.subscribe_push("push-workers").await.unwrap();
    for n in 1..=10 {
        for user in 1..=8 {
            bus.publish_push(job(user, n)).await.unwrap();
        }
    }
    // Both workers are polled (a group rebalance completes only while its members poll).
    let mut got: Vec<(usize, schema::PushJob)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 80 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 80 jobs arrived",
            got.len()
        );
        tokio::select! {
            Some(j) = w1.next() => got.push((1, j)),
            Some(j) = w2.next() => got.push((2, j)),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let mut ids: Vec<u64> = got.iter().map(|(_, j)| j.message.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 80, "every job exactly once");
    // One user's jobs keep their order (they share a partition, so one worker).
    for user in 1..=8u64 {
        let mine: Vec<(usize, u64)> = got
            .iter()
            .filter(|(_, j)| j.user.as_str() == format!("user{user}"))
            .map(|(w, j)| (*w, j.message.0 % 1000))
            .collect();
        assert!(
            mine.windows(2).all(|p| p[0].1 < p[1].1),
            "user{user}: {mine:?}"
        );
    }
    bus.close().await;
}
