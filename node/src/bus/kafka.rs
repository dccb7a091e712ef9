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
//! Failure handling: the producer is idempotent (`enable.idempotence`, `acks=all`) and
//! librdkafka retries and reconnects by itself. `publish` only enqueues (a room actor never waits
//! for the broker); a delivery the broker never took is logged, and triggers a repair: the topics
//! are re-created (an in-memory broker loses them on restart) and, unless the topic was simply
//! missing, the producer is replaced (a restarted broker no longer knows its producer id). Live
//! delivery is best effort across a broker outage; history is complete.
//!
//! The reader survives broker restarts. A watcher probes the brokers' listeners; when none
//! answers, it unassigns the consumer at once. This works around a crash we found in
//! librdkafka 2.12 against tansu 0.6 with in-memory storage: after a restart that lost the topic,
//! the broker answers the consumer's fetch for the missing partition with a leader-change hint
//! (KIP-951 `CurrentLeader`) carrying neither topic id nor name, and librdkafka dereferences the
//! missing name (`rd_kafka_metadata_update_op` -> `strcmp(NULL)`). Once a broker answers again,
//! the reader re-creates the topics, checks whether the last record it read is still there
//! unchanged (same offset, same payload digest): if so it reads on from there, otherwise the log is
//! new and it reads it from the beginning, so nothing published after the restart is skipped.

use super::{Bus, BusError, DeliveryStream, PushStream};
use async_trait::async_trait;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use schema::{Delivery, GatewayId, PushJob};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// The fan-out topic.
pub const DELIVER_TOPIC: &str = "palaver.deliver";
/// The push-job topic: keyed by user; push workers share it as one consumer group.
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
    me: std::sync::Weak<KafkaBus>,
    repairing: tokio::sync::Mutex<()>,
    config: KafkaConfig,
    producer: parking_lot::RwLock<FutureProducer>,
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
        let producer = new_producer(&config)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(unavailable)?;
        let bus = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            repairing: tokio::sync::Mutex::new(()),
            partitions: std::sync::atomic::AtomicI32::new(config.deliver_partitions),
            config,
            producer: parking_lot::RwLock::new(producer),
            admin,
        });
        bus.ensure_topics().await?;
        Ok(bus)
    }
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, BusError> {
    ClientConfig::new()
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
        .map_err(unavailable)
}

impl KafkaBus {
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
        // librdkafka's metadata call blocks: keep it off the async threads.
        let producer = self.producer.read().clone();
        let n = blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(DELIVER_TOPIC), Duration::from_secs(10))
                .map_err(unavailable)?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == DELIVER_TOPIC)
                .map_or(0, |t| i32::try_from(t.partitions().len()).unwrap_or(0)))
        })
        .await?;
        if n > 0 {
            self.partitions
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// After a failed publish: re-creates the topics (a broker may have lost them) and, unless
    /// the topic was simply missing, replaces the producer (a restarted broker no longer knows the
    /// idempotent producer's id). One repair at a time.
    async fn repair(&self, error: &KafkaError) {
        let Ok(_one) = self.repairing.try_lock() else {
            return;
        };
        if let Err(e) = self.ensure_topics().await {
            tracing::warn!(error = %e, "kafka repair: topics not re-created yet");
            return;
        }
        if !topic_missing(error) {
            match new_producer(&self.config) {
                Ok(p) => *self.producer.write() = p,
                Err(e) => tracing::warn!(error = %e, "kafka repair: new producer failed"),
            }
        }
    }

    /// Enqueues a record in the producer and awaits its delivery report in the background; a
    /// failed report is logged and triggers a [`KafkaBus::repair`].
    fn enqueue(
        &self,
        record: FutureRecord<'_, [u8], Vec<u8>>,
        what: &'static str,
    ) -> Result<(), BusError> {
        let producer = self.producer.read().clone();
        let report = producer
            .send_result(record)
            .map_err(|(e, _)| unavailable(e))?;
        let me = self.me.clone();
        tokio::spawn(async move {
            let failed = match report.await {
                Ok(Ok(_)) => return,
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            };
            tracing::warn!(error = %failed, what, "not published");
            if let Some(bus) = me.upgrade() {
                bus.repair(&failed).await;
            }
        });
        Ok(())
    }

    fn deliver_partitions(&self) -> i32 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Record headers carrying a W3C trace context.
fn trace_headers(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(1).insert(Header {
        key: crate::trace::TRACEPARENT,
        value: Some(traceparent),
    })
}

/// The trace context in a record's headers (only looked for when tracing is on).
fn traceparent_in(m: &impl rdkafka::message::Message) -> Option<String> {
    if !crate::trace::enabled() {
        return None;
    }
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == crate::trace::TRACEPARENT)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

fn topic_missing(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    )
}

#[async_trait]
impl Bus for KafkaBus {
    /// Enqueues the delivery in the producer (in call order, which librdkafka keeps per
    /// partition) and returns; the delivery report is awaited in the background. So a room never
    /// waits for the broker: during an outage its messages are still stored and acknowledged, and
    /// live deliveries that the broker never took are logged and left to history.
    async fn publish(&self, mut delivery: Delivery) -> Result<(), BusError> {
        // The trace context travels in a record header, not in the payload.
        let (_span, traceparent) = super::publish_span(DELIVER_TOPIC, &delivery.gateway);
        let traceparent = delivery.traceparent.take().or(traceparent);
        let payload = serde_json::to_vec(&delivery).map_err(unavailable)?;
        let partition = partition_of(&delivery.gateway, self.deliver_partitions());
        let mut record = FutureRecord::to(DELIVER_TOPIC)
            .key(delivery.gateway.as_str().as_bytes())
            .payload(&payload)
            .partition(partition);
        if let Some(tp) = &traceparent {
            record = record.headers(trace_headers(tp));
        }
        self.enqueue(record, "delivery")
    }

    async fn subscribe(&self, gateway: &GatewayId) -> Result<DeliveryStream, BusError> {
        let partition = partition_of(gateway, self.deliver_partitions());
        let (down_tx, down) = tokio::sync::mpsc::channel::<()>(1);
        // Start at the current end, resolved now rather than at the first fetch, so that every
        // delivery published after `subscribe` returns is read.
        let consumer = Arc::new(self.consumer(gateway)?);
        let (_, high) = watermarks(&consumer, partition).await?;
        assign(&consumer, partition, high)?;
        let consumer: Slot = Arc::new(parking_lot::Mutex::new(consumer));
        let assigned = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // Weakly: the consumer is the reader's, and closes when the reader drops it (see
        // `watch_brokers`).
        let (pause_consumer, pause_flag) = (Arc::downgrade(&consumer), assigned.clone());
        let pause = move || {
            pause_flag.store(false, std::sync::atomic::Ordering::SeqCst);
            let Some(current) = pause_consumer.upgrade().map(|c| c.lock().clone()) else {
                return;
            };
            if let Err(e) = current.unassign() {
                tracing::warn!(error = %e, "deliver consumer: unassign failed");
            }
        };
        tokio::spawn(watch_brokers(
            self.config.brokers.clone(),
            Arc::new(pause),
            down_tx,
        ));
        let state = ReadState {
            admin_config: self.config.clone(),
            gateway: gateway.clone(),
            partition,
            consumer,
            assigned,
            next_offset: high,
            last: None,
            down,
        };
        Ok(futures::stream::unfold(state, |mut st| async move {
            let d = st.next().await;
            Some((d, st))
        })
        .boxed())
    }

    async fn publish_push(&self, mut job: PushJob) -> Result<(), BusError> {
        let (_span, traceparent) = super::publish_span(PUSH_TOPIC, &job.user);
        let traceparent = job.traceparent.take().or(traceparent);
        let payload = serde_json::to_vec(&job).map_err(unavailable)?;
        let mut record = FutureRecord::to(PUSH_TOPIC)
            .key(job.user.as_str().as_bytes())
            .payload(&payload);
        if let Some(tp) = &traceparent {
            record = record.headers(trace_headers(tp));
        }
        self.enqueue(record, "push job")
    }

    async fn subscribe_push(&self, group: &str) -> Result<PushStream, BusError> {
        let consumer = push_consumer(&self.config.brokers, group)?;
        let consumer: Slot = Arc::new(parking_lot::Mutex::new(Arc::new(consumer)));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (down_tx, down) = tokio::sync::mpsc::channel::<()>(1);
        let (pause_consumer, pause_flag) = (Arc::downgrade(&consumer), paused.clone());
        let pause = move || {
            pause_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(current) = pause_consumer.upgrade().map(|c| c.lock().clone()) {
                current.unsubscribe();
            }
        };
        tokio::spawn(watch_brokers(
            self.config.brokers.clone(),
            Arc::new(pause),
            down_tx,
        ));
        let reader = PushReader {
            config: self.config.clone(),
            group: group.to_owned(),
            consumer,
            paused,
            down,
        };
        Ok(futures::stream::unfold(reader, |mut r| async move {
            let job = r.next().await;
            Some((job, r))
        })
        .boxed())
    }

    async fn ping(&self) -> Result<(), BusError> {
        // A metadata round trip: some broker answers. (A broker that lost the topics is
        // repaired on first use, see `repair`.)
        let producer = self.producer.read().clone();
        blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map_err(unavailable)?;
            if md.brokers().is_empty() {
                return Err(BusError::Unavailable("no broker in the metadata".into()));
            }
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        let producer = self.producer.read().clone();
        let flushed =
            blocking(move || producer.flush(Duration::from_secs(5)).map_err(unavailable)).await;
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "kafka producer flush failed");
        }
    }
}

/// Watches the brokers' listeners: librdkafka does not surface a lost connection to a
/// `StreamConsumer`, so a plain TCP probe tells the reader when every broker is gone.
async fn watch_brokers(
    brokers: String,
    pause: Arc<dyn Fn() + Send + Sync>,
    down: tokio::sync::mpsc::Sender<()>,
) {
    let addrs: Vec<String> = brokers.split(',').map(|b| b.trim().to_owned()).collect();
    let mut was_up = true;
    loop {
        let mut up = false;
        for a in &addrs {
            let probe = tokio::net::TcpStream::connect(a.as_str());
            if matches!(
                tokio::time::timeout(Duration::from_millis(300), probe).await,
                Ok(Ok(_))
            ) {
                up = true;
                break;
            }
        }
        if was_up && !up {
            // Stop fetching at once, whether or not the reader is being polled: after a broker
            // restart that lost the topic, librdkafka 2.12 crashes on the broker's fetch answer
            // for the missing partition (a leader-change hint with neither topic id nor name).
            // The reader starts a fresh consumer once the topic exists again.
            // librdkafka's unsubscribe waits for its own threads (a group consumer's revoke,
            // with the brokers gone), and dropping a consumer there may block for good (closing
            // a group consumer waits for its coordinator): off the async threads, and not waited
            // on for long. On a thread of its own, not the runtime's blocking pool: a runtime
            // shutting down waits for its blocking threads, and a test's runtime waited for ever
            // on one stuck closing a consumer whose broker the test had stopped.
            if down.is_closed() {
                return; // the reader is gone, and its consumer with it
            }
            let (done, paused) = tokio::sync::oneshot::channel::<()>();
            let pause = pause.clone();
            let spawned = std::thread::Builder::new()
                .name("palaver-kafka-pause".into())
                .spawn(move || {
                    pause();
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => {
                    if tokio::time::timeout(Duration::from_secs(2), paused)
                        .await
                        .is_err()
                    {
                        tracing::warn!("pausing the Kafka consumer takes over 2 s; going on");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start a thread to pause the consumer"),
            }
            tracing::warn!("every Kafka broker is unreachable; consumer paused");
            if down.send(()).await.is_err() {
                return; // the reader is gone
            }
        }
        was_up = up;
        if down.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

type DeliverConsumer = StreamConsumer;

/// The current consumer of a subscription, shared by its reader and its broker watcher.
type Slot = Arc<parking_lot::Mutex<Arc<DeliverConsumer>>>;

fn assign(c: &DeliverConsumer, partition: i32, offset: i64) -> Result<(), BusError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(DELIVER_TOPIC, partition, Offset::Offset(offset))
        .map_err(unavailable)?;
    c.assign(&tpl).map_err(unavailable)
}

impl KafkaBus {
    fn consumer(&self, gateway: &GatewayId) -> Result<DeliverConsumer, BusError> {
        new_consumer(&self.config.brokers, gateway)
    }
}

fn new_consumer(brokers: &str, gateway: &GatewayId) -> Result<DeliverConsumer, BusError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("palaver-gateway-{gateway}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .set("reconnect.backoff.ms", "500")
        .create()
        .map_err(unavailable)
}

/// The reading side of one gateway's subscription.
struct ReadState {
    admin_config: KafkaConfig,
    gateway: GatewayId,
    partition: i32,
    consumer: Slot,
    assigned: Arc<std::sync::atomic::AtomicBool>,
    /// The offset after the last delivery read.
    next_offset: i64,
    /// Offset and digest of the last record read, to tell a surviving log from a new one.
    last: Option<(i64, u64)>,
    down: tokio::sync::mpsc::Receiver<()>,
}

impl ReadState {
    async fn next(&mut self) -> Delivery {
        loop {
            if !self.assigned.load(std::sync::atomic::Ordering::SeqCst) {
                self.reconnect().await;
                continue;
            }
            let current = self.consumer.lock().clone();
            tokio::select! {
                biased;
                // The watcher paused the consumer: go and reconnect.
                Some(()) = self.down.recv() => {}
                m = current.recv() => match m {
                    Ok(m) => {
                        self.next_offset = m.offset() + 1;
                        self.last = Some((m.offset(), payload_digest(m.payload())));
                        let Some(payload) = m.payload() else { continue };
                        match serde_json::from_slice::<Delivery>(payload) {
                            Ok(mut d) if d.gateway == self.gateway => {
                                if let Some(tp) = traceparent_in(&m) {
                                    d.traceparent = Some(tp);
                                }
                                return d;
                            }
                            Ok(_) => continue, // another gateway sharing the partition
                            Err(e) => tracing::warn!(error = %e, "undecodable delivery skipped"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "deliver consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Waits for the broker and the topic, then reads on: from where it stopped if the log
    /// survived, from the start of the new log if the broker lost it.
    async fn reconnect(&mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_reconnect().await {
                Ok(()) => {
                    while self.down.try_recv().is_ok() {}
                    self.assigned
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deliver consumer: broker not back yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn try_reconnect(&mut self) -> Result<(), BusError> {
        // Re-creates the topics if the broker lost them.
        drop(KafkaBus::connect(self.admin_config.clone()).await?);
        // A fresh consumer: the old one's metadata describes the topic as it was before the
        // restart (see the module documentation). The old one is unassigned and idle; close it
        // off the async threads.
        let fresh = Arc::new(new_consumer(&self.admin_config.brokers, &self.gateway)?);
        let old = std::mem::replace(&mut *self.consumer.lock(), fresh.clone());
        tokio::task::spawn_blocking(move || drop(old));
        let (low, high) = watermarks(&fresh, self.partition).await?;
        // Did the log survive? Only if the last record read is still there, unchanged.
        let survived = match self.last {
            Some((offset, digest)) if high > offset => {
                assign(&fresh, self.partition, offset)?;
                let peek = tokio::time::timeout(Duration::from_secs(5), fresh.recv()).await;
                matches!(peek, Ok(Ok(m)) if m.offset() == offset && payload_digest(m.payload()) == digest)
            }
            Some(_) => false,
            None => high >= self.next_offset,
        };
        let start = if survived { self.next_offset } else { low };
        tracing::info!(start, high, survived, "deliver consumer reconnected");
        self.next_offset = start;
        assign(&fresh, self.partition, start)
    }
}

fn payload_digest(p: Option<&[u8]>) -> u64 {
    let mut h = siphasher::sip::SipHasher::new();
    p.unwrap_or_default().hash(&mut h);
    h.finish()
}

fn push_consumer(brokers: &str, group: &str) -> Result<DeliverConsumer, BusError> {
    let c: DeliverConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("reconnect.backoff.ms", "500")
        .create()
        .map_err(unavailable)?;
    c.subscribe(&[PUSH_TOPIC]).map_err(unavailable)?;
    Ok(c)
}

/// The reading side of a push worker: a member of the worker group on `palaver.push`, paused
/// while no broker answers and replaced by a fresh member once one does (see the deliver reader).
struct PushReader {
    config: KafkaConfig,
    group: String,
    consumer: Slot,
    paused: Arc<std::sync::atomic::AtomicBool>,
    down: tokio::sync::mpsc::Receiver<()>,
}

impl PushReader {
    async fn next(&mut self) -> PushJob {
        loop {
            if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
                self.rejoin().await;
                continue;
            }
            let current = self.consumer.lock().clone();
            tokio::select! {
                biased;
                Some(()) = self.down.recv() => {}
                m = current.recv() => match m {
                    Ok(m) => match m.payload().map(serde_json::from_slice::<PushJob>) {
                        Some(Ok(mut job)) => {
                            if let Some(tp) = traceparent_in(&m) {
                                job.traceparent = Some(tp);
                            }
                            return job;
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "undecodable push job skipped"),
                        None => {}
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "push consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    async fn rejoin(&mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                drop(KafkaBus::connect(self.config.clone()).await?);
                push_consumer(&self.config.brokers, &self.group)
            };
            match attempt.await {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut *self.consumer.lock(), Arc::new(fresh));
                    tokio::task::spawn_blocking(move || drop(old));
                    while self.down.try_recv().is_ok() {}
                    self.paused
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(group = %self.group, "push consumer rejoined");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "push consumer: broker not back yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| unavailable(format!("kafka call failed: {e}")))?
}

/// The low and high watermarks of a `palaver.deliver` partition (a blocking call, run off the
/// async threads).
async fn watermarks(c: &Arc<DeliverConsumer>, partition: i32) -> Result<(i64, i64), BusError> {
    let c = c.clone();
    blocking(move || {
        c.fetch_watermarks(DELIVER_TOPIC, partition, Duration::from_secs(10))
            .map_err(unavailable)
    })
    .await
}
