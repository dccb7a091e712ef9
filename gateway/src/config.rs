//! Configuration in two steps: a [`ConfigBuilder`] read from an optional TOML file (unknown keys
//! are refused), overridden by `PALAVER_*` environment variables from an env map passed in (so
//! tests pass their own), then validated into the final [`Config`].

use node::NodeConfig;
use node::store::embedded::Durability;
use schema::{GatewayId, NodeId};
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Configuration errors, each naming the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the builder.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or unparsable.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The setting (environment variable name).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// The raw settings, every field optional. In TOML the keys are the field names; in the
/// environment they are `PALAVER_` + the field name in upper case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigBuilder {
    /// Address for every HTTP and WebSocket route. Default `127.0.0.1:8080`.
    pub http_addr: Option<String>,
    /// Embedded store and uploaded files. Default `./data`.
    pub data_dir: Option<PathBuf>,
    /// HS256 secret. With no secret and no public key, a random secret is created once in the
    /// data dir.
    pub jwt_secret: Option<String>,
    /// PEM public key (the PEM text, or a path to a PEM file) for RS256, ES256 or EdDSA tokens.
    pub jwt_public_key: Option<String>,
    /// Pins the algorithm of `jwt_public_key` (`RS256`, `RS384`, `RS512`, `PS256`, `ES256`,
    /// `ES384`, `EdDSA`). Default: derived from the key type.
    pub jwt_algorithm: Option<String>,
    /// This gateway's id. Default `gateway-local`.
    pub gateway_id: Option<String>,
    /// This node's id. Default `local`.
    pub node_id: Option<String>,
    /// Largest accepted WebSocket frame or message, in bytes. Default 65536.
    pub max_frame_bytes: Option<usize>,
    /// Events queued for one session before it is disconnected as too slow. Default 1024.
    pub outbound_queue: Option<usize>,
    /// Open TCP connections per client IP address on this gateway (0: no limit). Default 2000.
    pub max_connections_per_ip: Option<usize>,
    /// Sessions per user on this gateway, in all dialects together (0: no limit). Default 32.
    pub max_connections_per_user: Option<usize>,
    /// Seconds a client has to send a complete HTTP request head (and between requests of a
    /// keep-alive connection). Default 30.
    pub header_timeout_secs: Option<u64>,
    /// The kernel send buffer (`SO_SNDBUF`, in bytes) of a connection once it is upgraded to a
    /// WebSocket (0: the kernel's autotuning, up to `net.ipv4.tcp_wmem`'s maximum). Default 262144.
    pub ws_send_buffer: Option<usize>,
    /// Milliseconds a room's live event may wait at the gateway for a missing predecessor
    /// before it is delivered past the gap (0: never wait). Default 500.
    pub reorder_hold_ms: Option<u64>,
    /// Local sessions of one room above which the room's events are handed on by a delivery
    /// lane of their own (0: never). Default 256.
    pub fanout_lane_sessions: Option<usize>,
    /// Session openings (hub, node, store) that run at once; more wait their turn. Default 4
    /// per CPU core.
    pub session_openings: Option<usize>,
    /// Session teardowns (hub, node, store) that run at once; more wait their turn. Default 8
    /// per CPU core.
    pub session_teardowns: Option<usize>,
    /// Deliveries per second one room may cause: a room takes at most this divided by its
    /// member count messages per second (0: unlimited). Default 50 000.
    pub room_fanout_per_second: Option<usize>,
    /// Seconds between server pings; a client silent for two intervals is disconnected.
    /// Default 25.
    pub ping_interval_secs: Option<u64>,
    /// Seconds SIGTERM waits for sessions to close before exiting anyway. Default 10.
    pub shutdown_grace_secs: Option<u64>,
    /// `full` (fsync every commit, default) or `normal` (survives process crash only).
    pub store_durability: Option<String>,
    /// Seconds an idle room actor lives. Default 300.
    pub actor_idle_secs: Option<u64>,
    /// Accepted and ignored, so that older configurations still load: it bounded the life of
    /// an idle online user's actor, and users have no actor any more.
    pub user_idle_secs: Option<u64>,
    /// Most members in a group. Default 10000.
    pub group_max_members: Option<usize>,
    /// Largest history page. Default 200.
    pub history_max_limit: Option<u32>,
    /// Longest text message in characters. Default 4096.
    pub max_text_chars: Option<usize>,
    /// Longest media caption, in characters. Default 1024.
    pub max_caption_chars: Option<usize>,
    /// Largest uploaded file (any type), in bytes; also audio when `upload_max_audio_bytes` is
    /// unset. Default 50 MiB.
    pub upload_max_file_bytes: Option<usize>,
    /// Largest uploaded audio, in bytes. Default `upload_max_file_bytes`, else 50 MiB.
    pub upload_max_audio_bytes: Option<usize>,
    /// Largest uploaded voice message, in bytes. Default 20 MiB.
    pub upload_max_voice_bytes: Option<usize>,
    /// Largest uploaded video, in bytes. Default 500 MiB.
    pub upload_max_video_bytes: Option<usize>,
    /// Largest uploaded image (before conversion to WebP), in bytes. Default 10 MiB.
    pub upload_max_image_bytes: Option<usize>,
    /// Keep uploads in this S3-compatible bucket instead of `<data_dir>/uploads`; credentials
    /// from the standard `AWS_*` environment variables.
    pub upload_s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible store other than AWS (`http://` or `https://`).
    pub upload_s3_endpoint: Option<String>,
    /// Region of the bucket.
    pub upload_s3_region: Option<String>,
    /// Most rooms one user may belong to. Default 10000.
    pub max_rooms_per_user: Option<usize>,
    /// Messages per second per user (a burst of twice that is allowed). Default 20.
    pub messages_per_second: Option<usize>,
    /// Typing events per second per user (bursts of 5). Default 2.
    pub typing_per_second: Option<usize>,
    /// Presence changes reach co-members of groups up to this size. Default 50.
    pub presence_group_max: Option<usize>,
    /// Pending notifications kept per user. Default 100.
    pub pending_per_user: Option<usize>,
    /// Pending notifications are recorded in rooms up to this many members (0: never).
    /// Default 1000.
    pub pending_room_max: Option<usize>,
    /// Milliseconds a typing state lasts without a refresh. Default 5000.
    pub typing_ttl_ms: Option<u64>,
    /// Most events one replay (or `resume` of one room) returns; further behind, the client is
    /// told to resync. Default 1000.
    pub replay_max: Option<u32>,
    /// Bearer token of the admin REST endpoints (`/v1/admin/...`), at least 16 bytes; unset,
    /// they answer 403.
    pub admin_token: Option<String>,
    /// `text` (default) or `json` logs.
    pub log_format: Option<String>,
    /// PostgreSQL connection string (URL or `key=value` form); when set, the PostgreSQL store
    /// replaces the embedded one.
    pub postgres_url: Option<String>,
    /// Connections in the PostgreSQL pool. Default 16.
    pub postgres_pool: Option<usize>,
    /// ScyllaDB contact points `host:port,...`; when set, the ScyllaDB store replaces the
    /// embedded one.
    pub scylla_nodes: Option<String>,
    /// ScyllaDB keyspace. Default `palaver`.
    pub scylla_keyspace: Option<String>,
    /// Replication map `palaver migrate` creates the keyspace with. Default
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub scylla_replication: Option<String>,
    /// Kafka bootstrap brokers `host:port,...`; when set, the Kafka bus replaces the in-process
    /// one (required by `node` and `gateway`).
    pub kafka_brokers: Option<String>,
    /// Partitions of `palaver.deliver` when Palaver creates it. Default 64.
    pub kafka_partitions: Option<i32>,
    /// The cluster's nodes, `id@host:port,...`, or `dns-name:port` of a headless Service listing
    /// them (required by `node` and `gateway`).
    pub nodes: Option<String>,
    /// Where a node's cluster service listens (required by `node`).
    pub cluster_addr: Option<String>,
    /// Dedicated listeners serving one dialect at `/`, as some seeds' clients expect:
    /// `name=addr,...` with names `rt-chat`, `rt-presence` and `events`, e.g.
    /// `rt-chat=0.0.0.0:4000,rt-presence=0.0.0.0:5000`.
    pub compat_listen: Option<String>,
    /// Path of an FCM service-account JSON key (`project_id`, `client_email`, `private_key`,
    /// `token_uri`); when set, devices with platform `fcm` get pushes (FCM HTTP v1).
    pub push_fcm_credentials: Option<PathBuf>,
    /// FCM API base URL. Default `https://fcm.googleapis.com`.
    pub push_fcm_endpoint: Option<String>,
    /// URL the webhook provider POSTs notifications to (devices with platform `webhook`).
    pub push_webhook_url: Option<String>,
    /// HMAC-SHA256 key of the webhook's `X-Palaver-Signature`, at least 16 bytes (required
    /// with `push_webhook_url`).
    pub push_webhook_secret: Option<String>,
    /// Attempts per push before it becomes a dead letter. Default 5.
    pub push_max_attempts: Option<u32>,
    /// First retry delay in milliseconds (doubling, with jitter). Default 500.
    pub push_retry_base_ms: Option<u64>,
    /// Longest retry delay in milliseconds, also the cap of a `Retry-After`. Default 60000.
    pub push_retry_max_ms: Option<u64>,
    /// Push jobs handled at once by one worker. Default 64.
    pub push_concurrency: Option<usize>,
    /// Timeout of one request to a push provider, in milliseconds. Default 10000.
    pub push_timeout_ms: Option<u64>,
    /// Pushes are decided in rooms up to this many members (0: never). Default 10000.
    pub push_room_max: Option<usize>,
}

/// A dialect that can be served at `/` on a listener of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompatDialect {
    /// The type-tagged chat socket (`/rt/chat`).
    RtChat,
    /// The type-tagged presence feed (`/rt/presence`).
    RtPresence,
    /// The event/data socket (`/events`).
    Events,
}

impl CompatDialect {
    /// The name used in `PALAVER_COMPAT_LISTEN`.
    pub fn name(self) -> &'static str {
        match self {
            CompatDialect::RtChat => "rt-chat",
            CompatDialect::RtPresence => "rt-presence",
            CompatDialect::Events => "events",
        }
    }
}

/// Parses `PALAVER_COMPAT_LISTEN`: `name=addr,...`, each name once.
pub fn parse_compat_listen(v: &str) -> Result<Vec<(CompatDialect, SocketAddr)>, String> {
    let mut out: Vec<(CompatDialect, SocketAddr)> = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected name=host:port"))?;
        let dialect = match name.trim() {
            "rt-chat" => CompatDialect::RtChat,
            "rt-presence" => CompatDialect::RtPresence,
            "events" => CompatDialect::Events,
            other => {
                return Err(format!(
                    "{other:?}: unknown dialect; use rt-chat, rt-presence or events"
                ));
            }
        };
        let addr: SocketAddr = addr.trim().parse().map_err(|e| format!("{addr:?}: {e}"))?;
        if out.iter().any(|(d, _)| *d == dialect) {
            return Err(format!("{name:?} is given twice"));
        }
        out.push((dialect, addr));
    }
    Ok(out)
}

/// Where tokens are verified from.
#[derive(Clone, Debug)]
pub enum JwtKey {
    /// HS256 with this secret.
    Secret(String),
    /// No secret configured: use (or create) the one in the data dir.
    SecretFile,
    /// Asymmetric: PEM text and the pinned algorithm name, if configured.
    PublicKey {
        /// PEM text.
        pem: String,
        /// Pinned algorithm, if configured.
        algorithm: Option<String>,
    },
}

/// Which store backend to run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// SQLite in the data dir (default).
    Embedded,
    /// A ScyllaDB cluster.
    Scylla(node::store::scylla::ScyllaConfig),
    /// A shared PostgreSQL database.
    Postgres {
        /// Connection string.
        url: String,
        /// Pool size.
        pool: usize,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub http_addr: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Token verification key.
    pub jwt: JwtKey,
    /// Gateway id.
    pub gateway_id: GatewayId,
    /// Frame limit in bytes.
    pub max_frame_bytes: usize,
    /// Per-session outbound queue.
    pub outbound_queue: usize,
    /// Open TCP connections per client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Sessions per user on this gateway (0: no limit).
    pub max_connections_per_user: usize,
    /// Longest wait for a complete HTTP request head.
    pub header_timeout: Duration,
    /// `SO_SNDBUF` of an upgraded WebSocket connection (0: the kernel's autotuning).
    pub ws_send_buffer: usize,
    /// Longest wait of a live room event for its missing predecessor.
    pub reorder_hold: Duration,
    /// Local sessions of one room above which it gets a delivery lane (0: never).
    pub fanout_lane_sessions: usize,
    /// Session openings that run at once (at least 1).
    pub session_openings: usize,
    /// Session teardowns that run at once (at least 1).
    pub session_teardowns: usize,
    /// Keepalive ping interval.
    pub ping_interval: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Store durability.
    pub durability: Durability,
    /// Log format.
    pub log_format: LogFormat,
    /// Which store backend.
    pub store: StoreChoice,
    /// Kafka bus settings, if configured.
    pub kafka: Option<node::bus::kafka::KafkaConfig>,
    /// How the cluster's nodes are found, if configured.
    pub nodes: Option<node::cluster::Discovery>,
    /// Where this node's cluster service listens, if configured.
    pub cluster_addr: Option<SocketAddr>,
    /// Node tunables.
    pub node: NodeConfig,
    /// Bearer token of the admin endpoints, if enabled.
    pub admin_token: Option<String>,
    /// Upload size limits.
    pub uploads: crate::uploads::UploadLimits,
    /// Where uploaded files are kept.
    pub upload_storage: crate::uploads::UploadStorage,
    /// Dedicated dialect listeners.
    pub compat_listen: Vec<(CompatDialect, SocketAddr)>,
    /// Push providers, retries and worker bounds.
    pub push: crate::push::PushConfig,
}

fn env_parse<T: FromStr>(
    env: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Invalid {
                key,
                reason: format!("{v:?}: {e}"),
            }),
    }
}

impl ConfigBuilder {
    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies `PALAVER_*` overrides from `env`.
    pub fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        macro_rules! over {
            ($field:ident, $key:literal) => {
                if let Some(v) = env_parse(env, $key)? {
                    self.$field = Some(v);
                }
            };
        }
        over!(http_addr, "PALAVER_HTTP_ADDR");
        over!(data_dir, "PALAVER_DATA_DIR");
        over!(jwt_secret, "PALAVER_JWT_SECRET");
        over!(jwt_public_key, "PALAVER_JWT_PUBLIC_KEY");
        over!(jwt_algorithm, "PALAVER_JWT_ALGORITHM");
        over!(max_caption_chars, "PALAVER_MAX_CAPTION_CHARS");
        over!(upload_max_file_bytes, "PALAVER_UPLOAD_MAX_FILE_BYTES");
        over!(upload_max_audio_bytes, "PALAVER_UPLOAD_MAX_AUDIO_BYTES");
        over!(upload_max_voice_bytes, "PALAVER_UPLOAD_MAX_VOICE_BYTES");
        over!(upload_s3_bucket, "PALAVER_UPLOAD_S3_BUCKET");
        over!(upload_s3_endpoint, "PALAVER_UPLOAD_S3_ENDPOINT");
        over!(upload_s3_region, "PALAVER_UPLOAD_S3_REGION");
        over!(upload_max_video_bytes, "PALAVER_UPLOAD_MAX_VIDEO_BYTES");
        over!(upload_max_image_bytes, "PALAVER_UPLOAD_MAX_IMAGE_BYTES");
        over!(max_rooms_per_user, "PALAVER_MAX_ROOMS_PER_USER");
        over!(messages_per_second, "PALAVER_MESSAGES_PER_SECOND");
        over!(typing_per_second, "PALAVER_TYPING_PER_SECOND");
        over!(presence_group_max, "PALAVER_PRESENCE_GROUP_MAX");
        over!(pending_per_user, "PALAVER_PENDING_PER_USER");
        over!(pending_room_max, "PALAVER_PENDING_ROOM_MAX");
        over!(typing_ttl_ms, "PALAVER_TYPING_TTL_MS");
        over!(replay_max, "PALAVER_REPLAY_MAX");
        over!(admin_token, "PALAVER_ADMIN_TOKEN");
        over!(gateway_id, "PALAVER_GATEWAY_ID");
        over!(node_id, "PALAVER_NODE_ID");
        over!(max_frame_bytes, "PALAVER_MAX_FRAME_BYTES");
        over!(outbound_queue, "PALAVER_OUTBOUND_QUEUE");
        over!(max_connections_per_ip, "PALAVER_MAX_CONNECTIONS_PER_IP");
        over!(max_connections_per_user, "PALAVER_MAX_CONNECTIONS_PER_USER");
        over!(header_timeout_secs, "PALAVER_HEADER_TIMEOUT_SECS");
        over!(ws_send_buffer, "PALAVER_WS_SEND_BUFFER");
        over!(reorder_hold_ms, "PALAVER_REORDER_HOLD_MS");
        over!(fanout_lane_sessions, "PALAVER_FANOUT_LANE_SESSIONS");
        over!(session_openings, "PALAVER_SESSION_OPENINGS");
        over!(session_teardowns, "PALAVER_SESSION_TEARDOWNS");
        over!(room_fanout_per_second, "PALAVER_ROOM_FANOUT_PER_SECOND");
        over!(ping_interval_secs, "PALAVER_PING_INTERVAL_SECS");
        over!(shutdown_grace_secs, "PALAVER_SHUTDOWN_GRACE_SECS");
        over!(store_durability, "PALAVER_STORE_DURABILITY");
        over!(actor_idle_secs, "PALAVER_ACTOR_IDLE_SECS");
        over!(user_idle_secs, "PALAVER_USER_IDLE_SECS");
        over!(group_max_members, "PALAVER_GROUP_MAX_MEMBERS");
        over!(history_max_limit, "PALAVER_HISTORY_MAX_LIMIT");
        over!(max_text_chars, "PALAVER_MAX_TEXT_CHARS");
        over!(log_format, "PALAVER_LOG_FORMAT");
        over!(postgres_url, "PALAVER_POSTGRES_URL");
        over!(postgres_pool, "PALAVER_POSTGRES_POOL");
        over!(scylla_nodes, "PALAVER_SCYLLA_NODES");
        over!(scylla_keyspace, "PALAVER_SCYLLA_KEYSPACE");
        over!(scylla_replication, "PALAVER_SCYLLA_REPLICATION");
        over!(kafka_brokers, "PALAVER_KAFKA_BROKERS");
        over!(kafka_partitions, "PALAVER_KAFKA_PARTITIONS");
        over!(nodes, "PALAVER_NODES");
        over!(cluster_addr, "PALAVER_CLUSTER_ADDR");
        over!(compat_listen, "PALAVER_COMPAT_LISTEN");
        over!(push_fcm_credentials, "PALAVER_PUSH_FCM_CREDENTIALS");
        over!(push_fcm_endpoint, "PALAVER_PUSH_FCM_ENDPOINT");
        over!(push_webhook_url, "PALAVER_PUSH_WEBHOOK_URL");
        over!(push_webhook_secret, "PALAVER_PUSH_WEBHOOK_SECRET");
        over!(push_max_attempts, "PALAVER_PUSH_MAX_ATTEMPTS");
        over!(push_retry_base_ms, "PALAVER_PUSH_RETRY_BASE_MS");
        over!(push_retry_max_ms, "PALAVER_PUSH_RETRY_MAX_MS");
        over!(push_concurrency, "PALAVER_PUSH_CONCURRENCY");
        over!(push_timeout_ms, "PALAVER_PUSH_TIMEOUT_MS");
        over!(push_room_max, "PALAVER_PUSH_ROOM_MAX");
        Ok(())
    }

    /// Validates into a [`Config`].
    pub fn build(self) -> Result<Config, ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        let compat_listen = match self.compat_listen.as_deref() {
            None => Vec::new(),
            Some(v) => parse_compat_listen(v).map_err(|e| invalid("PALAVER_COMPAT_LISTEN", &e))?,
        };
        let http_addr = self.http_addr.as_deref().unwrap_or("127.0.0.1:8080");
        let http_addr = http_addr
            .parse()
            .map_err(|e| invalid("PALAVER_HTTP_ADDR", &format!("{http_addr:?}: {e}")))?;
        let jwt = match (self.jwt_secret, self.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "PALAVER_JWT_SECRET",
                    "set either a secret or a public key, not both",
                ));
            }
            (Some(s), None) if s.len() < 16 => {
                return Err(invalid("PALAVER_JWT_SECRET", "must be at least 16 bytes"));
            }
            (Some(s), None) => JwtKey::Secret(s),
            (None, Some(k)) => JwtKey::PublicKey {
                pem: if k.trim_start().starts_with("-----BEGIN") {
                    k
                } else {
                    std::fs::read_to_string(&k).map_err(|e| {
                        invalid("PALAVER_JWT_PUBLIC_KEY", &format!("cannot read {k}: {e}"))
                    })?
                },
                algorithm: self.jwt_algorithm,
            },
            (None, None) => JwtKey::SecretFile,
        };
        let positive = |v: Option<usize>, d: usize, key| match v {
            Some(0) => Err(invalid(key, "must be greater than 0")),
            Some(n) => Ok(n),
            None => Ok(d),
        };
        let max_frame_bytes = positive(self.max_frame_bytes, 64 * 1024, "PALAVER_MAX_FRAME_BYTES")?;
        if max_frame_bytes < 1024 {
            return Err(invalid("PALAVER_MAX_FRAME_BYTES", "must be at least 1024"));
        }
        let outbound_queue = positive(self.outbound_queue, 1024, "PALAVER_OUTBOUND_QUEUE")?;
        let secs = |v: Option<u64>, d: u64, key| match v {
            Some(0) => Err(invalid(key, "must be greater than 0")),
            v => Ok(Duration::from_secs(v.unwrap_or(d))),
        };
        let at_least_one = |v: Option<usize>, d: usize, key| match v {
            Some(0) => Err(invalid(key, "must be greater than 0")),
            v => Ok(v.unwrap_or(d)),
        };
        let durability = match self.store_durability.as_deref() {
            None | Some("full") => Durability::Full,
            Some("normal") => Durability::Normal,
            Some(o) => {
                return Err(invalid(
                    "PALAVER_STORE_DURABILITY",
                    &format!("{o:?}: expected full or normal"),
                ));
            }
        };
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(o) => {
                return Err(invalid(
                    "PALAVER_LOG_FORMAT",
                    &format!("{o:?}: expected text or json"),
                ));
            }
        };
        let scylla = self.scylla_nodes.filter(|n| !n.trim().is_empty());
        let postgres = self.postgres_url.filter(|u| !u.trim().is_empty());
        let store = match (scylla, postgres) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "PALAVER_SCYLLA_NODES",
                    "set either PALAVER_SCYLLA_NODES or PALAVER_POSTGRES_URL, not both",
                ));
            }
            (Some(nodes), None) => StoreChoice::Scylla(node::store::scylla::ScyllaConfig {
                nodes: nodes
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect(),
                keyspace: self.scylla_keyspace.unwrap_or_else(|| "palaver".into()),
                replication: self.scylla_replication.unwrap_or_else(|| {
                    "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into()
                }),
            }),
            (None, Some(url)) => StoreChoice::Postgres {
                url,
                pool: positive(self.postgres_pool, 16, "PALAVER_POSTGRES_POOL")?,
            },
            (None, None) => StoreChoice::Embedded,
        };
        let kafka = match self.kafka_brokers.filter(|b| !b.trim().is_empty()) {
            None => None,
            Some(b) => {
                let mut k = node::bus::kafka::KafkaConfig::new(b);
                if let Some(p) = self.kafka_partitions {
                    if p <= 0 {
                        return Err(invalid(
                            "PALAVER_KAFKA_PARTITIONS",
                            "must be greater than 0",
                        ));
                    }
                    k.deliver_partitions = p;
                }
                Some(k)
            }
        };
        let nodes = match self.nodes.filter(|n| !n.trim().is_empty()) {
            None => None,
            Some(n) => {
                Some(node::cluster::parse_nodes(&n).map_err(|e| invalid("PALAVER_NODES", &e))?)
            }
        };
        let cluster_addr = match self.cluster_addr {
            None => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|e| invalid("PALAVER_CLUSTER_ADDR", &format!("{a:?}: {e}")))?,
            ),
        };
        let mut node = NodeConfig {
            idle_timeout: secs(self.actor_idle_secs, 300, "PALAVER_ACTOR_IDLE_SECS")?,
            group_max_members: positive(
                self.group_max_members,
                10_000,
                "PALAVER_GROUP_MAX_MEMBERS",
            )?,
            max_text_chars: positive(self.max_text_chars, 4096, "PALAVER_MAX_TEXT_CHARS")?,
            max_caption_chars: positive(self.max_caption_chars, 1024, "PALAVER_MAX_CAPTION_CHARS")?,
            max_rooms_per_user: positive(
                self.max_rooms_per_user,
                10_000,
                "PALAVER_MAX_ROOMS_PER_USER",
            )?,
            presence_group_max: positive(
                self.presence_group_max,
                50,
                "PALAVER_PRESENCE_GROUP_MAX",
            )?,
            ..NodeConfig::default()
        };
        let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let mps = to_u32(positive(
            self.messages_per_second,
            20,
            "PALAVER_MESSAGES_PER_SECOND",
        )?);
        node.messages_per_second = mps;
        node.message_burst = mps.saturating_mul(2);
        node.typing_per_second = to_u32(positive(
            self.typing_per_second,
            2,
            "PALAVER_TYPING_PER_SECOND",
        )?);
        node.typing_burst = node.typing_per_second.max(5);
        if let Some(n) = self.room_fanout_per_second {
            node.room_fanout_per_second = to_u32(n);
        }
        node.pending_per_user = to_u32(positive(
            self.pending_per_user,
            100,
            "PALAVER_PENDING_PER_USER",
        )?);
        // A connect queues the user's pending notifications at once, before the session's
        // writer runs: more than the queue holds would cut every such session off as a slow
        // consumer as it opens, and the client, reconnecting, would be cut again. Half, as a
        // resume leaves the other half for live events.
        if node.pending_per_user as usize > outbound_queue / 2 {
            return Err(invalid(
                "PALAVER_PENDING_PER_USER",
                &format!(
                    "must be at most half of PALAVER_OUTBOUND_QUEUE ({outbound_queue}): a \
                     connect queues every pending notification at once"
                ),
            ));
        }
        if let Some(n) = self.pending_room_max {
            node.pending_room_max = n;
        }
        if let Some(ms) = self.typing_ttl_ms {
            if ms == 0 {
                return Err(invalid("PALAVER_TYPING_TTL_MS", "must be greater than 0"));
            }
            node.typing_ttl = Duration::from_millis(ms);
        }
        if let Some(n) = self.replay_max {
            if n == 0 {
                return Err(invalid("PALAVER_REPLAY_MAX", "must be greater than 0"));
            }
            node.replay_max = n;
        }
        let upload_defaults = crate::uploads::UploadLimits::default();
        let upload_bytes = |v: Option<usize>, d: u64, key| {
            positive(v, usize::try_from(d).unwrap_or(usize::MAX), key).map(|n| n as u64)
        };
        let max_file_bytes = upload_bytes(
            self.upload_max_file_bytes,
            upload_defaults.max_file_bytes,
            "PALAVER_UPLOAD_MAX_FILE_BYTES",
        )?;
        let uploads = crate::uploads::UploadLimits {
            max_file_bytes,
            // Audio used to share the file limit: it still does unless set on its own.
            max_audio_bytes: upload_bytes(
                self.upload_max_audio_bytes,
                if self.upload_max_file_bytes.is_some() {
                    max_file_bytes
                } else {
                    upload_defaults.max_audio_bytes
                },
                "PALAVER_UPLOAD_MAX_AUDIO_BYTES",
            )?,
            max_voice_bytes: upload_bytes(
                self.upload_max_voice_bytes,
                upload_defaults.max_voice_bytes,
                "PALAVER_UPLOAD_MAX_VOICE_BYTES",
            )?,
            max_video_bytes: upload_bytes(
                self.upload_max_video_bytes,
                upload_defaults.max_video_bytes,
                "PALAVER_UPLOAD_MAX_VIDEO_BYTES",
            )?,
            max_image_bytes: upload_bytes(
                self.upload_max_image_bytes,
                upload_defaults.max_image_bytes,
                "PALAVER_UPLOAD_MAX_IMAGE_BYTES",
            )?,
        };
        let upload_storage = upload_storage(
            self.upload_s3_bucket,
            self.upload_s3_endpoint,
            self.upload_s3_region,
        )?;
        let admin_token = self.admin_token.filter(|t| !t.is_empty());
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("PALAVER_ADMIN_TOKEN", "must be at least 16 bytes"));
        }
        if let Some(id) = self.node_id {
            node.node_id = NodeId::new(id);
        }
        if let Some(n) = self.history_max_limit {
            if n == 0 {
                return Err(invalid(
                    "PALAVER_HISTORY_MAX_LIMIT",
                    "must be greater than 0",
                ));
            }
            node.history_max_limit = n;
            node.history_default_limit = node.history_default_limit.min(n);
        }
        if let Some(n) = self.push_room_max {
            node.push_room_max = n;
        }
        let push = crate::push::PushConfig::from_settings(crate::push::PushSettings {
            fcm_credentials: self.push_fcm_credentials,
            fcm_endpoint: self.push_fcm_endpoint,
            webhook_url: self.push_webhook_url,
            webhook_secret: self.push_webhook_secret,
            max_attempts: self.push_max_attempts,
            retry_base_ms: self.push_retry_base_ms,
            retry_max_ms: self.push_retry_max_ms,
            concurrency: self.push_concurrency,
            timeout_ms: self.push_timeout_ms,
        })
        .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
        Ok(Config {
            http_addr,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("./data")),
            jwt,
            gateway_id: GatewayId::new(self.gateway_id.unwrap_or_else(|| "gateway-local".into())),
            max_frame_bytes,
            outbound_queue,
            ping_interval: secs(self.ping_interval_secs, 25, "PALAVER_PING_INTERVAL_SECS")?,
            max_connections_per_ip: self.max_connections_per_ip.unwrap_or(2000),
            max_connections_per_user: self.max_connections_per_user.unwrap_or(32),
            header_timeout: secs(self.header_timeout_secs, 30, "PALAVER_HEADER_TIMEOUT_SECS")?,
            ws_send_buffer: match self.ws_send_buffer {
                None => 256 * 1024,
                Some(n) if n != 0 && !(4096..=64 * 1024 * 1024).contains(&n) => {
                    return Err(invalid(
                        "PALAVER_WS_SEND_BUFFER",
                        "must be 0 (the kernel's autotuning) or from 4096 to 67108864 bytes",
                    ));
                }
                Some(n) => n,
            },
            reorder_hold: Duration::from_millis(self.reorder_hold_ms.unwrap_or(500)),
            fanout_lane_sessions: self.fanout_lane_sessions.unwrap_or(256),
            session_openings: at_least_one(
                self.session_openings,
                crate::server::default_openings(),
                "PALAVER_SESSION_OPENINGS",
            )?,
            session_teardowns: at_least_one(
                self.session_teardowns,
                crate::server::default_teardowns(),
                "PALAVER_SESSION_TEARDOWNS",
            )?,
            shutdown_grace: secs(self.shutdown_grace_secs, 10, "PALAVER_SHUTDOWN_GRACE_SECS")?,
            durability,
            log_format,
            store,
            kafka,
            nodes,
            cluster_addr,
            node,
            admin_token,
            uploads,
            upload_storage,
            compat_listen,
            push,
        })
    }
}

/// Where uploads are kept: an S3-compatible bucket when `PALAVER_UPLOAD_S3_BUCKET` is set
/// (endpoint and region then optional), else the local data dir.
fn upload_storage(
    bucket: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
) -> Result<crate::uploads::UploadStorage, ConfigError> {
    let invalid = |key, reason: &str| ConfigError::Invalid {
        key,
        reason: reason.to_owned(),
    };
    let set = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let (bucket, endpoint, region) = (set(bucket), set(endpoint), set(region));
    let Some(bucket) = bucket else {
        if endpoint.is_some() {
            return Err(invalid(
                "PALAVER_UPLOAD_S3_ENDPOINT",
                "needs PALAVER_UPLOAD_S3_BUCKET",
            ));
        }
        if region.is_some() {
            return Err(invalid(
                "PALAVER_UPLOAD_S3_REGION",
                "needs PALAVER_UPLOAD_S3_BUCKET",
            ));
        }
        return Ok(crate::uploads::UploadStorage::Local);
    };
    if let Some(e) = &endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(invalid(
            "PALAVER_UPLOAD_S3_ENDPOINT",
            &format!("{e:?}: must start with http:// or https://"),
        ));
    }
    Ok(crate::uploads::UploadStorage::S3(
        crate::uploads::S3Storage {
            bucket,
            endpoint,
            region,
        },
    ))
}

impl Config {
    /// Loads the configuration: the optional file, then the environment `env`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut b = match file {
            Some(p) => ConfigBuilder::from_file(p)?,
            None => ConfigBuilder::default(),
        };
        b.apply_env(env)?;
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, &HashMap::new()).expect("defaults");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_frame_bytes, 65536);
        assert!(matches!(c.jwt, JwtKey::SecretFile));
        assert_eq!(c.durability, Durability::Full);
    }

    #[test]
    fn compat_listeners() {
        let mut b = ConfigBuilder::default();
        b.apply_env(&env(&[(
            "PALAVER_COMPAT_LISTEN",
            " rt-chat=127.0.0.1:4000, rt-presence=0.0.0.0:5000,events=[::1]:8089 ",
        )]))
        .unwrap();
        let c = b.build().unwrap();
        assert_eq!(
            c.compat_listen,
            vec![
                (CompatDialect::RtChat, "127.0.0.1:4000".parse().unwrap()),
                (CompatDialect::RtPresence, "0.0.0.0:5000".parse().unwrap()),
                (CompatDialect::Events, "[::1]:8089".parse().unwrap()),
            ]
        );
        assert!(
            ConfigBuilder::default()
                .build()
                .unwrap()
                .compat_listen
                .is_empty()
        );
        for (bad, why) in [
            ("rt-chat", "expected name=host:port"),
            ("phoenix=127.0.0.1:1", "unknown dialect"),
            ("rt-chat=localhost", "\"localhost\""),
            ("events=127.0.0.1:1,events=127.0.0.1:2", "given twice"),
        ] {
            let mut b = ConfigBuilder::default();
            b.apply_env(&env(&[("PALAVER_COMPAT_LISTEN", bad)]))
                .unwrap();
            let e = b.build().unwrap_err().to_string();
            assert!(
                e.contains("PALAVER_COMPAT_LISTEN") && e.contains(why),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn session_opening_and_teardown_slots() {
        let c = Config::load(None, &HashMap::new()).expect("defaults");
        assert_eq!(
            (c.session_openings, c.session_teardowns),
            (
                crate::server::default_openings(),
                crate::server::default_teardowns()
            )
        );
        let c = Config::load(
            None,
            &env(&[
                ("PALAVER_SESSION_OPENINGS", "3"),
                ("PALAVER_SESSION_TEARDOWNS", "5"),
            ]),
        )
        .expect("set");
        assert_eq!((c.session_openings, c.session_teardowns), (3, 5));
        for key in ["PALAVER_SESSION_OPENINGS", "PALAVER_SESSION_TEARDOWNS"] {
            // No slot at all would park every session for ever.
            let e = Config::load(None, &env(&[(key, "0")]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("greater than 0"), "{e}");
        }
    }

    #[test]
    fn pending_notifications_fit_half_the_outbound_queue() {
        let c = Config::load(None, &HashMap::new()).expect("defaults");
        assert!(c.node.pending_per_user as usize <= c.outbound_queue / 2);
        let ok = env(&[
            ("PALAVER_PENDING_PER_USER", "512"),
            ("PALAVER_OUTBOUND_QUEUE", "1024"),
        ]);
        assert!(Config::load(None, &ok).is_ok());
        for (pending, queue) in [("513", "1024"), ("100", "100"), ("5000", "1024")] {
            let e = Config::load(
                None,
                &env(&[
                    ("PALAVER_PENDING_PER_USER", pending),
                    ("PALAVER_OUTBOUND_QUEUE", queue),
                ]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("PALAVER_PENDING_PER_USER") && e.contains("PALAVER_OUTBOUND_QUEUE"),
                "{pending}/{queue}: {e}"
            );
        }
    }

    #[test]
    fn websocket_send_buffer() {
        let c = Config::load(None, &HashMap::new()).expect("defaults");
        assert_eq!(c.ws_send_buffer, 256 * 1024);
        for (v, want) in [("0", 0), ("4096", 4096), ("1048576", 1 << 20)] {
            let c = Config::load(None, &env(&[("PALAVER_WS_SEND_BUFFER", v)])).expect(v);
            assert_eq!(c.ws_send_buffer, want);
        }
        for v in ["100", "4095", "67108865", "-1", "lots"] {
            let e = Config::load(None, &env(&[("PALAVER_WS_SEND_BUFFER", v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("PALAVER_WS_SEND_BUFFER"), "{v}: {e}");
        }
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "http_addr = \"127.0.0.1:1\"\nmax_frame_bytes = 2048\n").expect("w");
        let c = Config::load(Some(&p), &env(&[("PALAVER_HTTP_ADDR", "127.0.0.1:2")])).expect("c");
        assert_eq!(c.http_addr.port(), 2);
        assert_eq!(c.max_frame_bytes, 2048);
    }

    #[test]
    fn refuses_bad_values_with_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "http_adr = \"x\"\n").expect("w");
        assert!(matches!(
            Config::load(Some(&p), &HashMap::new()),
            Err(ConfigError::Parse { .. })
        ));
        let e = Config::load(None, &env(&[("PALAVER_MAX_FRAME_BYTES", "lots")])).unwrap_err();
        assert!(e.to_string().contains("PALAVER_MAX_FRAME_BYTES"), "{e}");
        let e = Config::load(None, &env(&[("PALAVER_JWT_SECRET", "short")])).unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        let c = Config::load(None, &env(&[("PALAVER_SCYLLA_NODES", "s1:9042, s2:9042")]))
            .expect("scylla");
        assert!(
            matches!(&c.store, StoreChoice::Scylla(s) if s.nodes.len() == 2 && s.keyspace == "palaver")
        );
        let e = Config::load(
            None,
            &env(&[
                ("PALAVER_SCYLLA_NODES", "s:9042"),
                ("PALAVER_POSTGRES_URL", "host=/x"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = Config::load(None, &env(&[("PALAVER_NODES", "a@h:1,a@h:2")])).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let c = Config::load(
            None,
            &env(&[
                ("PALAVER_NODES", "a@h:1, b@h:2"),
                ("PALAVER_KAFKA_BROKERS", "k:9092"),
            ]),
        )
        .expect("cluster");
        assert!(matches!(c.nodes, Some(node::cluster::Discovery::Static(ref m)) if m.len() == 2));
        assert!(c.kafka.is_some());
        let c = Config::load(
            None,
            &env(&[("PALAVER_NODES", "palaver-nodes.default.svc:7000")]),
        )
        .expect("dns");
        assert!(matches!(
            c.nodes,
            Some(node::cluster::Discovery::Dns { port: 7000, .. })
        ));
        let c = Config::load(
            None,
            &env(&[("PALAVER_POSTGRES_URL", "host=/tmp dbname=x")]),
        )
        .expect("postgres");
        assert!(matches!(c.store, StoreChoice::Postgres { pool: 16, .. }));
    }
}
