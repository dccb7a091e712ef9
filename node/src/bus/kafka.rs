//! The Kafka bus (`rdkafka`): fan-out between processes of a cluster.
//!
//! Topic `palaver.deliver` carries [`Delivery`] envelopes. Each delivery is addressed to one
//! gateway and produced once, keyed by the gateway id, to the partition that gateway reads
//! (`partition_of(gateway)`, a stable hash of its id), so a message crosses once to each gateway
//! hosting members of its room, never to every gateway, and all deliveries to one gateway (so
//! all of one room's messages for it) stay in one partition, in order. A gateway reads its
//! partition by direct assignment (no consumer-group rebalancing on its hot path), starting at the
//! end (the high watermark when it subscribes): it only needs what is published while it runs; what it missed, its clients read from
//! history. Gateways whose ids hash to the same partition share it and drop deliveries addressed to
//! the other, so give the topic several times more partitions than gateways.
//!
//! Failure handling: the producer is idempotent (`enable.idempotence`) with unlimited in-flight
//! retries bounded by `delivery.timeout.ms`; librdkafka reconnects by itself. After a broker
//! restart that lost its topics (in-memory brokers), producing fails with an unknown topic, so
//! the bus re-creates its topics and retries; consumers whose offset no longer exists restart at
//! the beginning of the new log (`auto.offset.reset = earliest`), so nothing produced after the
//! restart is skipped.

use super::{Bus, BusError, DeliveryStream};
use async_trait::async_trait;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use schema::{Delivery, GatewayId};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// The fan-out topic.
pub const DELIVER_TOPIC: &str = "palaver.deliver";
/// The push-job topic.
pub const PUSH_TOPIC: &str = "palaver.push";

/// Kafka bus settings.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port,...` bootstrap brokers.
    pub brokers: String,
    /// Partitions of `palaver.deliver` when the bus creates it. Default 64.
    pub deliver_partitions: i32,
    /// Partitions of `palaver.push` when the bus creates it. Default 16.
    pub push_partitions: i32,
    /// Replication factor of topics the bus creates. Default 1.
    pub replication: i32,
    /// How long a publish may take before it fails. Default 10 s.
    pub publish_timeout: Duration,
}

impl KafkaConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            deliver_partitions: 64,
            push_partitions: 16,
            replication: 1,
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// The Kafka [`Bus`].
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    partitions: std::sync::atomic::AtomicI32,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// The partition of `palaver.deliver` that `gateway` reads, among `partitions`.
pub fn partition_of(gateway: &GatewayId, partitions: i32) -> i32 {
    let mut h = siphasher::sip::SipHasher::new();
    gateway.as_str().as_bytes().hash(&mut h);
    let n = u64::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(h.finish() % n).unwrap_or(0)
}

impl KafkaBus {
    /// Connects, creates the topics if they are missing, and reads the partition count.
    pub async fn connect(config: KafkaConfig) -> Result<Arc<Self>, BusError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("compression.type", "none")
            .set(
                "delivery.timeout.ms",
                config.publish_timeout.as_millis().to_string(),
            )
            .set(
                "message.timeout.ms",
                config.publish_timeout.as_millis().to_string(),
            )
            .create()
            .map_err(unavailable)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(unavailable)?;
        let bus = Arc::new(Self {
            partitions: std::sync::atomic::AtomicI32::new(config.deliver_partitions),
            config,
            producer,
            admin,
        });
        bus.ensure_topics().await?;
        Ok(bus)
    }

    /// Creates the topics if missing and refreshes the partition count of `palaver.deliver`.
    async fn ensure_topics(&self) -> Result<(), BusError> {
        let topics = [
            NewTopic::new(
                DELIVER_TOPIC,
                self.config.deliver_partitions,
                TopicReplication::Fixed(self.config.replication),
            ),
            NewTopic::new(
                PUSH_TOPIC,
                self.config.push_partitions,
                TopicReplication::Fixed(self.config.replication),
            ),
        ];
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        for res in self
            .admin
            .create_topics(&topics, &opts)
            .await
            .map_err(unavailable)?
        {
            match res {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(unavailable(format!("cannot create topic {topic}: {code}")));
                }
            }
        }
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(DELIVER_TOPIC), Duration::from_secs(10))
            .map_err(unavailable)?;
        if let Some(t) = md.topics().iter().find(|t| t.name() == DELIVER_TOPIC) {
            let n = i32::try_from(t.partitions().len()).unwrap_or(0);
            if n > 0 {
                self.partitions
                    .store(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn deliver_partitions(&self) -> i32 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn topic_missing(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    )
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, delivery: Delivery) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&delivery).map_err(unavailable)?;
        let key = delivery.gateway.as_str().as_bytes();
        for attempt in 0..3 {
            let partition = partition_of(&delivery.gateway, self.deliver_partitions());
            let record = FutureRecord::to(DELIVER_TOPIC)
                .key(key)
                .payload(&payload)
                .partition(partition);
            match self
                .producer
                .send(record, self.config.publish_timeout)
                .await
            {
                Ok(_) => return Ok(()),
                Err((e, _)) if topic_missing(&e) && attempt < 2 => {
                    tracing::warn!(error = %e, "deliver topic missing; re-creating it");
                    self.ensure_topics().await?;
                }
                Err((e, _)) => return Err(unavailable(e)),
            }
        }
        Err(unavailable("deliver topic keeps disappearing"))
    }

    async fn subscribe(&self, gateway: &GatewayId) -> Result<DeliveryStream, BusError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", format!("palaver-gateway-{gateway}"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .set("topic.metadata.refresh.interval.ms", "2000")
            .create()
            .map_err(unavailable)?;
        let mut tpl = TopicPartitionList::new();
        let partition = partition_of(gateway, self.deliver_partitions());
        // Start at the current end, resolved now rather than at the first fetch, so that every
        // delivery published after `subscribe` returns is read.
        let (_, high) = consumer
            .fetch_watermarks(DELIVER_TOPIC, partition, Duration::from_secs(10))
            .map_err(unavailable)?;
        tpl.add_partition_offset(DELIVER_TOPIC, partition, Offset::Offset(high))
            .map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;
        let me = gateway.clone();
        let consumer = Arc::new(consumer);
        let stream = futures::stream::unfold(consumer, move |consumer| {
            let me = me.clone();
            async move {
                loop {
                    match consumer.recv().await {
                        Ok(m) => {
                            let Some(payload) = m.payload() else { continue };
                            match serde_json::from_slice::<Delivery>(payload) {
                                Ok(d) if d.gateway == me => return Some((d, consumer.clone())),
                                Ok(_) => continue, // another gateway sharing the partition
                                Err(e) => {
                                    tracing::warn!(error = %e, "undecodable delivery skipped");
                                }
                            }
                        }
                        Err(e) => {
                            // librdkafka reconnects by itself; keep polling.
                            tracing::warn!(error = %e, "deliver consumer error");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn close(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "kafka producer flush failed");
        }
    }
}
