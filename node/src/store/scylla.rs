//! The ScyllaDB store (`scylla` driver): message history and chat state at scale.
//!
//! Schema: `schema/cql/` (applied by `palaver migrate`). History is partitioned by room and 30-day
//! time bucket and clustered by id descending, so a page is one partition slice and a room's
//! partitions stay bounded however old it gets. A user's room list is a partition of
//! `user_rooms`, ordered by the rooms' last activity when read.
//!
//! Consistency: reads and writes at `LOCAL_QUORUM`; the two lightweight transactions at
//! `LOCAL_SERIAL`: claiming a direct room's pair (`INSERT ... IF NOT EXISTS`) and advancing a
//! room's position (`UPDATE rooms SET last_seq ... IF last_seq = ?`), which fences a second writer
//! during a ring change the way PostgreSQL's unique constraints do. Every statement is prepared,
//! so the driver routes it token-aware to a replica of its partition; large partitions (a group's
//! members, a user's rooms) are read in pages of 1000 rows.
//!
//! A room write (`apply_room`) is: check the new messages' idempotency keys (a repeat fails the
//! write with `Conflict` before anything is written), claim the sequence range (the
//! compare-and-set above, from the write's first `seq` minus one to its `last_seq`), then write
//! messages, `seq -> id` index rows, idempotency rows, rewritten messages, log rows, membership
//! and group changes in one logged batch, retried. If that write still fails, the claimed numbers
//! stay unused: a gap in `seq` is possible after a storage failure, never a duplicate or a
//! reordering. A write with nothing sequenced (no new message, no log entry) claims nothing.
//!
//! Domain tables (`0002_domain.cql`): the room log by `(room, seq chunk)`; read markers one
//! partition per `(room, user)`, the greatest clustering row being the marker (so it only moves
//! forward without a lightweight transaction); friendships and blocks written under both users;
//! pending notifications by user, clustered by a time-ordered id and trimmed to the cap with a
//! range delete; usernames in a lookup table kept with the profile.
//!
//! Push and upload tables (`0004_push_uploads.cql`): uploads by path (first record wins, a
//! lightweight transaction); media posts by path clustered by room; devices by token (the truth)
//! plus `devices_by_user`, whose rows are checked against `devices` when read; a device is
//! removed with `USING TIMESTAMP` of the registration that was read, so a newer registration of
//! the same token survives a concurrent removal; mutes by room clustered by user; dead letters by
//! hour of `at`, newest first, with a one-partition list of the hours, kept 30 days (TTL).

//! Not verified on this project's machines: ScyllaDB and Cassandra cannot be installed there.
//! The conformance suite runs against a real cluster when `PALAVER_TEST_SCYLLA_NODES` is set.

use super::{HistoryPage, NewRoom, RoomWrite, Store, StoreError, StoreResult};
use async_trait::async_trait;
use schema::{
    DeadLetter, Device, Event, Friendship, FriendshipStatus, HistoryQuery, Member, Message,
    MessageContent, MessageId, Millis, Notification, Platform, Profile, Room, RoomId, RoomSummary,
    Upload, User, UserId,
};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use std::time::Duration;

/// Days of history per partition.
const BUCKET_DAYS: u64 = 30;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The time bucket of an id (ids carry milliseconds since 2025 above their low 12 bits).
pub fn bucket_of(id: u64) -> i32 {
    let ms = id >> 12;
    i32::try_from(ms / (BUCKET_DAYS * 24 * 3600 * 1000)).unwrap_or(i32::MAX)
}

/// Settings of the ScyllaDB store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace. Default `palaver`.
    pub keyspace: String,
    /// Replication map used when `migrate` creates the keyspace.
    pub replication: String,
}

/// Connects and applies the CQL migrations the keyspace has not seen (`palaver migrate`).
pub async fn migrate(config: &ScyllaConfig) -> StoreResult<u32> {
    let session = connect_session(&config.nodes).await?;
    let ks = &config.keyspace;
    check_ident(ks)?;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
                config.replication
            ),
            (),
        )
        .await
        .map_err(unavailable)?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.palaver_migrations (version int PRIMARY KEY, applied_at bigint)"
            ),
            (),
        )
        .await
        .map_err(unavailable)?;
    session.use_keyspace(ks, false).await.map_err(unavailable)?;
    let done = applied_version(&session).await?;
    let mut last = done;
    for (version, cql) in schema::CQL_MIGRATIONS {
        if *version <= done {
            continue;
        }
        for stmt in statements(cql) {
            if let Err(e) = session.query_unpaged(stmt.as_str(), ()).await {
                // `ALTER TABLE ... ADD` has no `IF NOT EXISTS`: a migration interrupted after it
                // ran finds the column there on its next attempt, which is what it wanted.
                if is_add_column(&stmt) && column_exists(&e.to_string()) {
                    tracing::info!(statement = %stmt, "migrate: column exists already");
                    continue;
                }
                return Err(unavailable(format!("{stmt}: {e}")));
            }
        }
        session
            .query_unpaged(
                "INSERT INTO palaver_migrations (version, applied_at) VALUES (?, ?)",
                (
                    i32::try_from(*version).unwrap_or(i32::MAX),
                    crate::ids::unix_ms(),
                ),
            )
            .await
            .map_err(unavailable)?;
        last = *version;
    }
    Ok(last)
}

/// The statements of a migration file: split on `;`, comments and blank lines dropped.
pub fn statements(cql: &str) -> Vec<String> {
    let code: String = cql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn is_add_column(stmt: &str) -> bool {
    let s = stmt.to_ascii_uppercase();
    s.starts_with("ALTER TABLE") && s.contains(" ADD ")
}

/// Whether an error says the column to add exists (ScyllaDB: "conflicts with an existing
/// column"; Cassandra: "already exists").
fn column_exists(err: &str) -> bool {
    let e = err.to_ascii_lowercase();
    e.contains("existing column") || e.contains("already exist")
}

fn check_ident(ks: &str) -> StoreResult<()> {
    if ks.is_empty() || !ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::Unavailable(format!(
            "invalid keyspace name {ks:?}"
        )));
    }
    Ok(())
}

async fn connect_session(nodes: &[String]) -> StoreResult<Session> {
    SessionBuilder::new()
        .known_nodes(nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .map_err(unavailable)
}

async fn applied_version(session: &Session) -> StoreResult<u32> {
    let rows = session
        .query_unpaged("SELECT version FROM palaver_migrations", ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(unavailable)?;
    let mut max = 0u32;
    for r in rows.rows::<(i32,)>().map_err(corrupt)? {
        let (v,) = r.map_err(corrupt)?;
        max = max.max(u32::try_from(v).unwrap_or(0));
    }
    Ok(max)
}

/// Sequence numbers per `message_seqs` partition.
const SEQ_CHUNK_BITS: u32 = 16;
/// Sequence numbers per `room_log` partition (log rows carry whole messages, so fewer).
const LOG_CHUNK_BITS: u32 = 14;

fn seq_chunk(seq: u64) -> i64 {
    super::i64_of(seq >> SEQ_CHUNK_BITS)
}

fn log_chunk(seq: u64) -> i64 {
    super::i64_of(seq >> LOG_CHUNK_BITS)
}

struct Prepared {
    user_get: PreparedStatement,
    user_insert: PreparedStatement,
    user_update: PreparedStatement,
    user_seen: PreparedStatement,
    username_put: PreparedStatement,
    username_delete: PreparedStatement,
    username_get: PreparedStatement,
    room_get: PreparedStatement,
    room_insert: PreparedStatement,
    room_cas: PreparedStatement,
    room_cas_seq: PreparedStatement,
    room_patch: PreparedStatement,
    direct_claim: PreparedStatement,
    direct_get: PreparedStatement,
    member_insert: PreparedStatement,
    member_get: PreparedStatement,
    member_delete: PreparedStatement,
    members_get: PreparedStatement,
    user_room_insert: PreparedStatement,
    user_room_delete: PreparedStatement,
    user_rooms_get: PreparedStatement,
    msg_insert: PreparedStatement,
    ref_insert: PreparedStatement,
    ref_get: PreparedStatement,
    msg_get: PreparedStatement,
    page_desc: PreparedStatement,
    page_asc: PreparedStatement,
    unread_scan: PreparedStatement,
    seq_insert: PreparedStatement,
    seq_after: PreparedStatement,
    log_insert: PreparedStatement,
    log_after: PreparedStatement,
    marker_insert: PreparedStatement,
    marker_trim: PreparedStatement,
    marker_get: PreparedStatement,
    marker_clear: PreparedStatement,
    friend_put: PreparedStatement,
    friend_get: PreparedStatement,
    friends_of: PreparedStatement,
    friend_delete: PreparedStatement,
    block_put: PreparedStatement,
    block_delete: PreparedStatement,
    blocks_of: PreparedStatement,
    pending_put: PreparedStatement,
    pending_newest: PreparedStatement,
    pending_get: PreparedStatement,
    pending_trim: PreparedStatement,
    upload_put: PreparedStatement,
    upload_get: PreparedStatement,
    media_put: PreparedStatement,
    media_get: PreparedStatement,
    device_put: PreparedStatement,
    device_get: PreparedStatement,
    device_owner: PreparedStatement,
    device_delete: PreparedStatement,
    device_index_put: PreparedStatement,
    device_index_delete: PreparedStatement,
    device_index_delete_at: PreparedStatement,
    device_index_get: PreparedStatement,
    mute_put: PreparedStatement,
    mute_delete: PreparedStatement,
    mutes_get: PreparedStatement,
    dead_put: PreparedStatement,
    dead_bucket_put: PreparedStatement,
    dead_buckets_get: PreparedStatement,
    dead_get: PreparedStatement,
}

/// The ScyllaDB store.
pub struct ScyllaStore {
    session: Session,
    st: Prepared,
    pending_ids: PendingIds,
}

/// Ids of pending notifications: microseconds since the Unix epoch (never repeating, never going
/// backwards within this process) above a random 10-bit tag of this process, so that two nodes
/// adding for one user in the same microsecond do not overwrite each other.
struct PendingIds {
    last_micros: parking_lot::Mutex<i64>,
    tag: i64,
}

impl PendingIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        let tag = RandomState::new().hash_one(std::process::id()) & 0x3ff;
        Self {
            last_micros: parking_lot::Mutex::new(0),
            tag: i64::try_from(tag).unwrap_or(0),
        }
    }

    fn next(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX >> 10))
            .unwrap_or(0);
        let mut last = self.last_micros.lock();
        *last = now.max(*last + 1);
        (*last << 10) | self.tag
    }
}

/// Whether storing `new` over `old` changes nothing (no language in `new` keeps the old one).
fn same_profile(old: &Profile, new: &Profile) -> bool {
    old.id == new.id
        && old.username == new.username
        && old.name == new.name
        && old.avatar == new.avatar
        && (new.language.is_none() || new.language == old.language)
}

const USER_COLS: &str = "id, username, name, avatar, created_at, updated_at, last_seen, language";
const ROOM_COLS: &str = "id, kind, name, created_by, created_at, last_seq, last_message_id, \
                         last_activity, avatar, public";
const MSG_COLS: &str = "id, room, seq, sender, client_ref, body, created_at";
const FRIEND_COLS: &str = "requester, addressee, status, created_at, updated_at";

type UserRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);
type RoomRow = (
    i64,
    String,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<bool>,
);
type MsgRow = (i64, i64, i64, String, Option<String>, String, i64);
type FriendRow = (String, String, i32, i64, i64);

const UPLOAD_COLS: &str = "path, uploader, kind, size, content_type, created_at";
const DEAD_LETTER_COLS: &str = "at, job, device_token, provider, reason, attempts";
/// Milliseconds per `dead_letters` partition (an hour).
const DEAD_LETTER_BUCKET_MS: i64 = 3_600_000;

type UploadRow = (String, String, String, i64, String, i64);
type DeviceRow = (String, String, Option<String>, i64);
type DeadLetterRow = (i64, String, Option<String>, String, String, i64);

fn upload_of(r: UploadRow) -> StoreResult<Upload> {
    Ok(Upload {
        path: r.0,
        uploader: UserId::parse(&r.1).map_err(corrupt)?,
        kind: r.2,
        size: super::u64_of(r.3),
        content_type: r.4,
        created_at: r.5,
    })
}

fn device_of(token: String, r: DeviceRow) -> StoreResult<Device> {
    Ok(Device {
        user: UserId::parse(&r.0).map_err(corrupt)?,
        platform: Platform::parse(&r.1)
            .ok_or_else(|| corrupt(format!("unknown platform {:?}", r.1)))?,
        token,
        device_id: r.2,
        created_at: r.3,
    })
}

fn dead_letter_of(r: DeadLetterRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        at: r.0,
        job: serde_json::from_str(&r.1).map_err(|e| corrupt(format!("dead letter job: {e}")))?,
        device_token: r.2,
        provider: r.3,
        reason: r.4,
        attempts: u32::try_from(r.5)
            .map_err(|_| corrupt(format!("dead letter attempts {}", r.5)))?,
    })
}

/// The `dead_letters` partition of an instant.
fn dead_letter_bucket(at: Millis) -> i64 {
    at.div_euclid(DEAD_LETTER_BUCKET_MS)
}

fn user_of(r: UserRow) -> StoreResult<User> {
    Ok(User {
        profile: Profile {
            id: UserId::parse(&r.0).map_err(corrupt)?,
            username: r.1,
            name: r.2,
            avatar: r.3,
            language: r.7,
        },
        created_at: r.4,
        updated_at: r.5,
        last_seen: r.6,
    })
}

fn room_of(r: RoomRow) -> StoreResult<(Room, i64)> {
    Ok((
        Room {
            id: RoomId(super::u64_of(r.0)),
            kind: match super::parse_kind(&r.1) {
                Some(k) => k,
                None => return Err(corrupt(format!("unknown room kind {:?}", r.1))),
            },
            name: r.2,
            created_by: UserId::parse(&r.3).map_err(corrupt)?,
            created_at: r.4,
            last_seq: super::u64_of(r.5.unwrap_or(0)),
            last_message_id: r.6.map(|v| MessageId(super::u64_of(v))),
            avatar: r.8,
            public: r.9.unwrap_or(false),
        },
        r.7.unwrap_or(r.4),
    ))
}

fn msg_of(r: MsgRow) -> StoreResult<Message> {
    let content: MessageContent = serde_json::from_str(&r.5).map_err(corrupt)?;
    let mut m = Message::new(
        MessageId(super::u64_of(r.0)),
        RoomId(super::u64_of(r.1)),
        super::u64_of(r.2),
        UserId::parse(&r.3).map_err(corrupt)?,
        content.body.clone(),
        r.6,
    );
    m.client_ref = r.4;
    content.apply(&mut m);
    Ok(m)
}

fn friendship_of(r: FriendRow) -> StoreResult<Friendship> {
    let status = u8::try_from(r.2)
        .ok()
        .and_then(FriendshipStatus::from_code)
        .ok_or_else(|| corrupt(format!("unknown friendship status {}", r.2)))?;
    Ok(Friendship {
        requester: UserId::parse(&r.0).map_err(corrupt)?,
        addressee: UserId::parse(&r.1).map_err(corrupt)?,
        status,
        created_at: r.3,
        updated_at: r.4,
    })
}

/// What a message row keeps in its `body` column.
fn content_json(m: &Message) -> StoreResult<String> {
    serde_json::to_string(&MessageContent::of(m)).map_err(corrupt)
}

/// The one field of a stored body that unread counts look at.
#[derive(serde::Deserialize)]
struct BodyKind {
    #[serde(rename = "type")]
    kind: String,
}

fn is_deleted(body: &str) -> StoreResult<bool> {
    serde_json::from_str::<BodyKind>(body)
        .map(|b| b.kind == "deleted")
        .map_err(corrupt)
}

/// Whether a lightweight transaction applied (its first column, `[applied]`).
fn applied(row: Option<Row>) -> bool {
    matches!(
        row.and_then(|r| r.columns.into_iter().next().flatten()),
        Some(CqlValue::Boolean(true))
    )
}

/// The values of one statement of a batch whose statements differ.
type BatchRow = Box<dyn SerializeRow + Send + Sync>;

/// A batch under construction: statements and their values, side by side.
struct BatchBuilder {
    batch: Batch,
    values: Vec<BatchRow>,
}

impl BatchBuilder {
    fn new(kind: BatchType) -> Self {
        let mut batch = Batch::new(kind);
        batch.set_consistency(Consistency::LocalQuorum);
        Self {
            batch,
            values: Vec::new(),
        }
    }

    fn push(&mut self, st: &PreparedStatement, values: impl SerializeRow + Send + Sync + 'static) {
        self.batch.append_statement(st.clone());
        self.values.push(Box::new(values));
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl ScyllaStore {
    /// Connects to `config.keyspace`, which `palaver migrate` must have prepared.
    pub async fn connect(config: &ScyllaConfig) -> StoreResult<Self> {
        check_ident(&config.keyspace)?;
        let session = connect_session(&config.nodes).await?;
        session
            .use_keyspace(&config.keyspace, false)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "keyspace {}: {e}; run `palaver migrate`",
                    config.keyspace
                ))
            })?;
        let have = applied_version(&session).await?;
        let want = schema::CQL_MIGRATIONS.last().map_or(0, |m| m.0);
        if have < want {
            return Err(StoreError::Unavailable(format!(
                "keyspace {} is at schema version {have}, this binary needs {want}: run `palaver migrate`",
                config.keyspace
            )));
        }
        let p = |q: String| {
            let session = &session;
            async move {
                let mut s = session.prepare(q).await.map_err(unavailable)?;
                s.set_consistency(Consistency::LocalQuorum);
                s.set_page_size(1000);
                s.set_serial_consistency(Some(SerialConsistency::LocalSerial));
                Ok::<_, StoreError>(s)
            }
        };
        let st = Prepared {
            user_get: p(format!("SELECT {USER_COLS} FROM users WHERE id = ?")).await?,
            user_insert: p("INSERT INTO users (id, username, name, avatar, created_at, updated_at, language) VALUES (?, ?, ?, ?, ?, ?, ?)".into()).await?,
            user_update: p("UPDATE users SET username = ?, name = ?, avatar = ?, updated_at = ?, language = ? WHERE id = ?".into()).await?,
            user_seen: p("UPDATE users SET last_seen = ? WHERE id = ?".into()).await?,
            username_put: p("INSERT INTO users_by_username (username, id) VALUES (?, ?)".into()).await?,
            username_delete: p("DELETE FROM users_by_username WHERE username = ? AND id = ?".into()).await?,
            username_get: p("SELECT id FROM users_by_username WHERE username = ?".into()).await?,
            room_get: p(format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?")).await?,
            room_insert: p("INSERT INTO rooms (id, kind, name, created_by, created_at, last_seq, last_activity, avatar, public) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)".into()).await?,
            room_cas: p("UPDATE rooms SET last_seq = ?, last_message_id = ?, last_activity = ? WHERE id = ? IF last_seq = ?".into()).await?,
            room_cas_seq: p("UPDATE rooms SET last_seq = ? WHERE id = ? IF last_seq = ?".into()).await?,
            room_patch: p("UPDATE rooms SET name = ?, avatar = ?, public = ? WHERE id = ?".into()).await?,
            direct_claim: p("INSERT INTO direct_rooms (direct_key, room) VALUES (?, ?) IF NOT EXISTS".into()).await?,
            direct_get: p("SELECT room FROM direct_rooms WHERE direct_key = ?".into()).await?,
            member_insert: p("INSERT INTO members (room, user, role, joined_at) VALUES (?, ?, ?, ?)".into()).await?,
            member_get: p("SELECT joined_at FROM members WHERE room = ? AND user = ?".into()).await?,
            member_delete: p("DELETE FROM members WHERE room = ? AND user = ?".into()).await?,
            members_get: p("SELECT user, role, joined_at FROM members WHERE room = ?".into()).await?,
            user_room_insert: p("INSERT INTO user_rooms (user, room) VALUES (?, ?)".into()).await?,
            user_room_delete: p("DELETE FROM user_rooms WHERE user = ? AND room = ?".into()).await?,
            user_rooms_get: p("SELECT room FROM user_rooms WHERE user = ?".into()).await?,
            msg_insert: p("INSERT INTO messages (room, bucket, id, seq, sender, client_ref, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)".into()).await?,
            ref_insert: p("INSERT INTO messages_by_ref (room, sender, client_ref, id) VALUES (?, ?, ?, ?)".into()).await?,
            ref_get: p("SELECT id FROM messages_by_ref WHERE room = ? AND sender = ? AND client_ref = ?".into()).await?,
            msg_get: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id = ?")).await?,
            page_desc: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id DESC LIMIT ?")).await?,
            page_asc: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id ASC LIMIT ?")).await?,
            unread_scan: p("SELECT id, sender, body FROM messages WHERE room = ? AND bucket = ? AND id > ? ORDER BY id DESC".into()).await?,
            seq_insert: p("INSERT INTO message_seqs (room, chunk, seq, id) VALUES (?, ?, ?, ?)".into()).await?,
            seq_after: p("SELECT seq, id FROM message_seqs WHERE room = ? AND chunk = ? AND seq > ? ORDER BY seq ASC LIMIT ?".into()).await?,
            log_insert: p("INSERT INTO room_log (room, chunk, seq, event) VALUES (?, ?, ?, ?)".into()).await?,
            log_after: p("SELECT seq, event FROM room_log WHERE room = ? AND chunk = ? AND seq > ? ORDER BY seq ASC LIMIT ?".into()).await?,
            marker_insert: p("INSERT INTO read_markers (room, user, message_id) VALUES (?, ?, ?)".into()).await?,
            marker_trim: p("DELETE FROM read_markers WHERE room = ? AND user = ? AND message_id < ?".into()).await?,
            marker_get: p("SELECT message_id FROM read_markers WHERE room = ? AND user = ? LIMIT 1".into()).await?,
            marker_clear: p("DELETE FROM read_markers WHERE room = ? AND user = ?".into()).await?,
            friend_put: p("INSERT INTO friendships (user, other, requester, addressee, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)".into()).await?,
            friend_get: p(format!("SELECT {FRIEND_COLS} FROM friendships WHERE user = ? AND other = ?")).await?,
            friends_of: p(format!("SELECT {FRIEND_COLS} FROM friendships WHERE user = ?")).await?,
            friend_delete: p("DELETE FROM friendships WHERE user = ? AND other = ?".into()).await?,
            block_put: p("INSERT INTO blocks (user, blocker, blocked) VALUES (?, ?, ?)".into()).await?,
            block_delete: p("DELETE FROM blocks WHERE user = ? AND blocker = ? AND blocked = ?".into()).await?,
            blocks_of: p("SELECT blocker, blocked FROM blocks WHERE user = ?".into()).await?,
            pending_put: p("INSERT INTO pending (user, id, body) VALUES (?, ?, ?)".into()).await?,
            pending_newest: p("SELECT id FROM pending WHERE user = ? ORDER BY id DESC LIMIT ?".into()).await?,
            pending_get: p("SELECT id, body FROM pending WHERE user = ?".into()).await?,
            pending_trim: p("DELETE FROM pending WHERE user = ? AND id <= ?".into()).await?,
            upload_put: p(format!("INSERT INTO uploads ({UPLOAD_COLS}) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS")).await?,
            upload_get: p(format!("SELECT {UPLOAD_COLS} FROM uploads WHERE path = ?")).await?,
            media_put: p("INSERT INTO media_posts (path, room) VALUES (?, ?)".into()).await?,
            media_get: p("SELECT room FROM media_posts WHERE path = ?".into()).await?,
            device_put: p("INSERT INTO devices (token, user, platform, device_id, created_at) VALUES (?, ?, ?, ?, ?)".into()).await?,
            device_get: p("SELECT user, platform, device_id, created_at FROM devices WHERE token = ?".into()).await?,
            device_owner: p("SELECT user, WRITETIME(user) FROM devices WHERE token = ?".into()).await?,
            device_delete: p("DELETE FROM devices USING TIMESTAMP ? WHERE token = ?".into()).await?,
            device_index_put: p("INSERT INTO devices_by_user (user, token) VALUES (?, ?)".into()).await?,
            device_index_delete: p("DELETE FROM devices_by_user WHERE user = ? AND token = ?".into()).await?,
            device_index_delete_at: p("DELETE FROM devices_by_user USING TIMESTAMP ? WHERE user = ? AND token = ?".into()).await?,
            device_index_get: p("SELECT token FROM devices_by_user WHERE user = ?".into()).await?,
            mute_put: p("INSERT INTO mutes (room, user) VALUES (?, ?)".into()).await?,
            mute_delete: p("DELETE FROM mutes WHERE room = ? AND user = ?".into()).await?,
            mutes_get: p("SELECT user FROM mutes WHERE room = ?".into()).await?,
            dead_put: p(format!("INSERT INTO dead_letters (bucket, id, {DEAD_LETTER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")).await?,
            dead_bucket_put: p("INSERT INTO dead_letter_buckets (k, bucket) VALUES (0, ?)".into()).await?,
            dead_buckets_get: p("SELECT bucket FROM dead_letter_buckets WHERE k = 0".into()).await?,
            dead_get: p(format!("SELECT {DEAD_LETTER_COLS} FROM dead_letters WHERE bucket = ? LIMIT ?")).await?,
        };
        Ok(Self {
            session,
            st,
            pending_ids: PendingIds::new(),
        })
    }

    async fn rows<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let res = self
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        res.rows::<R>()
            .map_err(corrupt)?
            .map(|r| r.map_err(corrupt))
            .collect()
    }

    /// Like `rows`, but fetched page by page (for partitions that can be large: a group's
    /// members, a user's rooms).
    async fn rows_paged<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + Send + 'static,
    {
        use futures::TryStreamExt;
        self.session
            .execute_iter(st.clone(), values)
            .await
            .map_err(unavailable)?
            .rows_stream::<R>()
            .map_err(corrupt)?
            .map_err(unavailable)
            .try_collect()
            .await
    }

    async fn exec(&self, st: &PreparedStatement, values: impl SerializeRow) -> StoreResult<()> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(unavailable)
            .map(|_| ())
    }

    async fn lwt(&self, st: &PreparedStatement, values: impl SerializeRow) -> StoreResult<bool> {
        let res = self
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let row = res.maybe_first_row::<Row>().map_err(corrupt)?;
        Ok(applied(row))
    }

    /// Runs a batch, retried: every statement Palaver batches is idempotent.
    async fn run_batch(&self, b: &BatchBuilder, what: &str) -> StoreResult<()> {
        if b.is_empty() {
            return Ok(());
        }
        let mut last_err = None;
        for _ in 0..3 {
            match self.session.batch(&b.batch, &b.values).await {
                Ok(_) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
        }
        Err(unavailable(format!("{what} not written: {last_err:?}")))
    }

    async fn room_with_activity(&self, id: RoomId) -> StoreResult<Option<(Room, i64)>> {
        self.rows::<RoomRow>(&self.st.room_get, (super::i64_of(id.0),))
            .await?
            .into_iter()
            .next()
            .map(room_of)
            .transpose()
    }

    async fn message_at(&self, room: RoomId, id: u64) -> StoreResult<Option<Message>> {
        self.rows::<MsgRow>(
            &self.st.msg_get,
            (super::i64_of(room.0), bucket_of(id), super::i64_of(id)),
        )
        .await?
        .into_iter()
        .next()
        .map(msg_of)
        .transpose()
    }

    /// The first history bucket of a room (its messages' ids are never older than the room).
    fn first_bucket(room: &Room) -> i32 {
        bucket_of(
            room.id
                .0
                .min(room.last_message_id.map_or(room.id.0, |m| m.0)),
        )
    }

    async fn write_room(&self, new: &NewRoom) -> StoreResult<()> {
        let r = &new.room;
        self.exec(
            &self.st.room_insert,
            (
                super::i64_of(r.id.0),
                super::kind_str(r.kind),
                &r.name,
                r.created_by.as_str(),
                r.created_at,
                r.created_at,
                &r.avatar,
                r.public,
            ),
        )
        .await?;
        for m in &new.members {
            self.exec(
                &self.st.member_insert,
                (
                    super::i64_of(r.id.0),
                    m.user.as_str(),
                    super::role_str(m.role),
                    m.joined_at,
                ),
            )
            .await?;
            self.exec(
                &self.st.user_room_insert,
                (m.user.as_str(), super::i64_of(r.id.0)),
            )
            .await?;
        }
        Ok(())
    }

    /// Fails with `Conflict` when a new message repeats a `(sender, client_ref)` of the batch,
    /// and with `DuplicateRef` when it repeats one stored in the room. Checked before anything is written; the room's single writer (fenced by the
    /// sequence claim) makes check-then-write safe.
    async fn check_client_refs(&self, room: RoomId, new: &[Message]) -> StoreResult<()> {
        let mut keys: Vec<(&str, &str)> = new
            .iter()
            .filter_map(|m| m.client_ref.as_deref().map(|r| (m.sender.as_str(), r)))
            .collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(StoreError::Conflict(format!(
                "room {room}: a client_ref repeats within one batch"
            )));
        }
        let r = super::i64_of(room.0);
        let found = futures::future::try_join_all(
            keys.iter()
                .map(|(sender, cref)| self.rows::<(i64,)>(&self.st.ref_get, (r, *sender, *cref))),
        )
        .await?;
        if let Some(((sender, cref), _)) = keys.iter().zip(&found).find(|(_, f)| !f.is_empty()) {
            return Err(StoreError::DuplicateRef(format!(
                "room {room}: client_ref {cref:?} of {sender} is stored already"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for ScyllaStore {
    async fn upsert_user(&self, p: &Profile, now: Millis) -> StoreResult<User> {
        let id = p.id.as_str().to_owned();
        let mut b = BatchBuilder::new(BatchType::Logged);
        let user = match self.user(&p.id).await? {
            None => {
                b.push(
                    &self.st.user_insert,
                    (
                        id.clone(),
                        p.username.clone(),
                        p.name.clone(),
                        p.avatar.clone(),
                        now,
                        now,
                        p.language.clone(),
                    ),
                );
                User {
                    profile: p.clone(),
                    created_at: now,
                    updated_at: now,
                    last_seen: None,
                }
            }
            Some(u) if same_profile(&u.profile, p) => return Ok(u),
            Some(mut u) => {
                // A connect that does not say which language keeps the stored one.
                let language = p.language.clone().or_else(|| u.profile.language.clone());
                b.push(
                    &self.st.user_update,
                    (
                        p.username.clone(),
                        p.name.clone(),
                        p.avatar.clone(),
                        now,
                        language.clone(),
                        id.clone(),
                    ),
                );
                if let Some(old) = &u.profile.username
                    && Some(old) != p.username.as_ref()
                {
                    b.push(&self.st.username_delete, (old.clone(), id.clone()));
                }
                u.profile = Profile {
                    language,
                    ..p.clone()
                };
                u.updated_at = now;
                u
            }
        };
        if let Some(name) = &p.username {
            b.push(&self.st.username_put, (name.clone(), id));
        }
        self.run_batch(&b, "user").await?;
        Ok(user)
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        self.rows::<UserRow>(&self.st.user_get, (id.as_str(),))
            .await?
            .into_iter()
            .next()
            .map(user_of)
            .transpose()
    }

    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()> {
        self.exec(&self.st.user_seen, (at, id.as_str())).await
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let ids = self
            .rows_paged::<(String,)>(&self.st.username_get, (username,))
            .await?;
        let users = futures::future::try_join_all(ids.iter().map(|(id,)| async move {
            match UserId::parse(id) {
                Ok(id) => self.user(&id).await,
                Err(e) => Err(corrupt(e)),
            }
        }))
        .await?;
        // The profile is the truth (an index row may outlive a rename that failed half-way);
        // several users may carry one username: the most recently updated wins.
        Ok(users
            .into_iter()
            .flatten()
            .filter(|u| u.profile.username.as_deref() == Some(username))
            .max_by(|a, b| {
                a.updated_at
                    .cmp(&b.updated_at)
                    .then_with(|| b.profile.id.cmp(&a.profile.id))
            }))
    }

    async fn create_room(&self, new: NewRoom) -> StoreResult<()> {
        if self.room_with_activity(new.room.id).await?.is_some() {
            return Err(StoreError::Conflict(format!("room {} exists", new.room.id)));
        }
        self.write_room(&new).await
    }

    async fn get_or_create_direct(&self, candidate: NewRoom) -> StoreResult<(Room, bool)> {
        let [a, b] = match candidate.members.as_slice() {
            [a, b] => [&a.user, &b.user],
            _ => return Err(StoreError::Conflict("a direct room has two members".into())),
        };
        let key = super::direct_key(a, b);
        if self
            .lwt(
                &self.st.direct_claim,
                (&key, super::i64_of(candidate.room.id.0)),
            )
            .await?
        {
            self.write_room(&candidate).await?;
            return Ok((candidate.room, true));
        }
        let id = self
            .rows::<(i64,)>(&self.st.direct_get, (&key,))
            .await?
            .into_iter()
            .next()
            .map(|r| RoomId(super::u64_of(r.0)))
            .ok_or_else(|| StoreError::Unavailable("direct room claim vanished".into()))?;
        // The winner writes the room right after its claim; wait a little for it, and if it never
        // comes (the winner died in between), write it ourselves under the winner's id.
        for _ in 0..5 {
            if let Some((room, _)) = self.room_with_activity(id).await? {
                return Ok((room, false));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut fill = candidate;
        fill.room.id = id;
        self.write_room(&fill).await?;
        Ok((fill.room, false))
    }

    async fn room(&self, id: RoomId) -> StoreResult<Option<Room>> {
        Ok(self.room_with_activity(id).await?.map(|r| r.0))
    }

    async fn members(&self, room: RoomId) -> StoreResult<Vec<Member>> {
        let mut out = Vec::new();
        for (user, role, joined_at) in self
            .rows_paged::<(String, String, i64)>(&self.st.members_get, (super::i64_of(room.0),))
            .await?
        {
            out.push(Member {
                user: UserId::parse(&user).map_err(corrupt)?,
                role: match super::parse_role(&role) {
                    Some(r) => r,
                    None => return Err(corrupt(format!("unknown role {:?}", role))),
                },
                joined_at,
                online: None,
            });
        }
        out.sort_by(|x, y| {
            x.joined_at
                .cmp(&y.joined_at)
                .then_with(|| x.user.cmp(&y.user))
        });
        Ok(out)
    }

    async fn room_ids_of(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        Ok(self
            .rows_paged::<(i64,)>(&self.st.user_rooms_get, (user.as_str(),))
            .await?
            .into_iter()
            .map(|r| RoomId(super::u64_of(r.0)))
            .collect())
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomSummary>> {
        let ids = self.room_ids_of(user).await?;
        let loads = ids.into_iter().map(|id| async move {
            let Some((room, activity)) = self.room_with_activity(id).await? else {
                return Ok::<_, StoreError>(None);
            };
            let members = self.members(id).await?;
            let last_message = match room.last_message_id {
                Some(m) => self.message_at(id, m.0).await?,
                None => None,
            };
            Ok(Some((
                activity,
                RoomSummary {
                    room,
                    members,
                    last_message,
                },
            )))
        });
        let mut rooms: Vec<(i64, RoomSummary)> = futures::future::try_join_all(loads)
            .await?
            .into_iter()
            .flatten()
            .collect();
        rooms.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.room.id.cmp(&a.1.room.id)));
        Ok(rooms.into_iter().map(|r| r.1).collect())
    }

    async fn direct_room(&self, a: &UserId, b: &UserId) -> StoreResult<Option<RoomId>> {
        let key = super::direct_key(a, b);
        Ok(self
            .rows::<(i64,)>(&self.st.direct_get, (&key,))
            .await?
            .into_iter()
            .next()
            .map(|r| RoomId(super::u64_of(r.0))))
    }

    async fn apply_room(&self, room: RoomId, w: RoomWrite) -> StoreResult<()> {
        let r = super::i64_of(room.0);
        self.check_client_refs(room, &w.new_messages).await?;
        // A role change keeps the member's original joined_at, as the SQL stores' upsert does.
        let joined = futures::future::try_join_all(
            w.upsert_members
                .iter()
                .map(|m| self.rows::<(Option<i64>,)>(&self.st.member_get, (r, m.user.as_str()))),
        )
        .await?;
        // Claim the sequence range: the write's events follow the room's current last_seq, so
        // the compare-and-set fails if another writer moved the room meanwhile. A write without
        // sequenced content (no new message, no log entry) claims nothing and moves no position.
        let first_seq = w
            .new_messages
            .iter()
            .map(|m| m.seq)
            .chain(w.log.iter().map(|(s, _)| *s))
            .min();
        if let Some(first) = first_seq {
            let prev = super::i64_of(first.saturating_sub(1));
            let last_seq = super::i64_of(w.last_seq.max(first));
            let claimed = if w.new_messages.is_empty() {
                // Only new messages move the newest message and the activity time.
                self.lwt(&self.st.room_cas_seq, (last_seq, r, prev)).await?
            } else {
                let newest = w
                    .new_messages
                    .iter()
                    .map(|m| m.id)
                    .chain(w.last_message_id)
                    .max()
                    .map_or(0, |m| super::i64_of(m.0));
                self.lwt(&self.st.room_cas, (last_seq, newest, w.at, r, prev))
                    .await?
            };
            if !claimed {
                return Err(StoreError::Conflict(format!(
                    "room {room} moved past seq {prev} (another writer)"
                )));
            }
        }
        let mut b = BatchBuilder::new(BatchType::Logged);
        for m in w.new_messages.iter().chain(&w.changed_messages) {
            // A changed message is rewritten whole (same key, same identity columns).
            b.push(
                &self.st.msg_insert,
                (
                    r,
                    bucket_of(m.id.0),
                    super::i64_of(m.id.0),
                    super::i64_of(m.seq),
                    m.sender.as_str().to_owned(),
                    m.client_ref.clone(),
                    content_json(m)?,
                    m.created_at,
                ),
            );
        }
        for m in &w.new_messages {
            b.push(
                &self.st.seq_insert,
                (
                    r,
                    seq_chunk(m.seq),
                    super::i64_of(m.seq),
                    super::i64_of(m.id.0),
                ),
            );
            if let Some(cref) = &m.client_ref {
                b.push(
                    &self.st.ref_insert,
                    (
                        r,
                        m.sender.as_str().to_owned(),
                        cref.clone(),
                        super::i64_of(m.id.0),
                    ),
                );
            }
        }
        for (seq, event) in &w.log {
            let json = serde_json::to_string(event).map_err(corrupt)?;
            b.push(
                &self.st.log_insert,
                (r, log_chunk(*seq), super::i64_of(*seq), json),
            );
        }
        for (m, stored) in w.upsert_members.iter().zip(joined) {
            let joined_at = stored.first().and_then(|j| j.0).unwrap_or(m.joined_at);
            b.push(
                &self.st.member_insert,
                (
                    r,
                    m.user.as_str().to_owned(),
                    super::role_str(m.role),
                    joined_at,
                ),
            );
            b.push(&self.st.user_room_insert, (m.user.as_str().to_owned(), r));
        }
        // Same batch, same timestamp: a removal of a member upserted above wins, as in SQL where
        // removals run after upserts.
        for u in &w.remove_members {
            b.push(&self.st.member_delete, (r, u.as_str().to_owned()));
            b.push(&self.st.user_room_delete, (u.as_str().to_owned(), r));
            b.push(&self.st.marker_clear, (r, u.as_str().to_owned()));
        }
        if let Some(p) = &w.patch {
            b.push(
                &self.st.room_patch,
                (p.name.clone(), p.avatar.clone(), p.public, r),
            );
        }
        self.run_batch(&b, &format!("changes of room {room}")).await
    }

    async fn message(&self, room: RoomId, id: MessageId) -> StoreResult<Option<Message>> {
        self.message_at(room, id.0).await
    }

    async fn messages_after_seq(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        let Some((r, _)) = self.room_with_activity(room).await? else {
            return Ok(Vec::new());
        };
        if want == 0 || after_seq >= r.last_seq {
            return Ok(Vec::new());
        }
        let rid = super::i64_of(room.0);
        // seq -> id from the index, then the messages by id range (seq and id share one order).
        let mut ids: Vec<i64> = Vec::new();
        for chunk in seq_chunk(after_seq.saturating_add(1))..=seq_chunk(r.last_seq) {
            let left = i32::try_from(want - ids.len()).unwrap_or(i32::MAX);
            for (_, id) in self
                .rows::<(i64, i64)>(
                    &self.st.seq_after,
                    (rid, chunk, super::i64_of(after_seq), left),
                )
                .await?
            {
                ids.push(id);
            }
            if ids.len() >= want {
                break;
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut rest = ids.as_slice();
        while let Some(&first) = rest.first() {
            let bucket = bucket_of(super::u64_of(first));
            let n = rest
                .iter()
                .take_while(|id| bucket_of(super::u64_of(**id)) == bucket)
                .count();
            let last = rest[n - 1];
            for row in self
                .rows::<MsgRow>(
                    &self.st.page_asc,
                    (
                        rid,
                        bucket,
                        first - 1,
                        last.saturating_add(1),
                        i32::try_from(n).unwrap_or(i32::MAX),
                    ),
                )
                .await?
            {
                out.push(msg_of(row)?);
            }
            rest = &rest[n..];
        }
        Ok(out)
    }

    async fn room_log(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Event)>> {
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        let Some((r, _)) = self.room_with_activity(room).await? else {
            return Ok(Vec::new());
        };
        // The sequence claim precedes the log rows, so last_seq bounds every logged seq.
        if want == 0 || after_seq >= r.last_seq {
            return Ok(Vec::new());
        }
        let rid = super::i64_of(room.0);
        let mut out = Vec::new();
        for chunk in log_chunk(after_seq.saturating_add(1))..=log_chunk(r.last_seq) {
            let left = i32::try_from(want - out.len()).unwrap_or(i32::MAX);
            for (seq, json) in self
                .rows::<(i64, String)>(
                    &self.st.log_after,
                    (rid, chunk, super::i64_of(after_seq), left),
                )
                .await?
            {
                let event =
                    serde_json::from_str(&json).map_err(|e| corrupt(format!("room log: {e}")))?;
                out.push((super::u64_of(seq), event));
            }
            if out.len() >= want {
                break;
            }
        }
        Ok(out)
    }

    async fn messages_by_client_ref(
        &self,
        room: RoomId,
        keys: Vec<(UserId, String)>,
    ) -> StoreResult<Vec<Message>> {
        let mut out = Vec::new();
        for (sender, cref) in keys {
            let ids = self
                .rows::<(i64,)>(
                    &self.st.ref_get,
                    (super::i64_of(room.0), sender.as_str(), cref.as_str()),
                )
                .await?;
            if let Some((id,)) = ids.into_iter().next()
                && let Some(m) = self.message_at(room, super::u64_of(id)).await?
            {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn history(
        &self,
        room: RoomId,
        q: &HistoryQuery,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        let Some((r, _)) = self.room_with_activity(room).await? else {
            return Ok(HistoryPage::default());
        };
        let lo = q.after.map_or(0, |m| m.0);
        let hi = q.before.map_or(u64::MAX >> 11, |m| m.0);
        let first_bucket = Self::first_bucket(&r);
        let last_bucket = r.last_message_id.map_or(first_bucket, |m| bucket_of(m.0));
        let want = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let ascending = q.after.is_some();
        let buckets: Vec<i32> = if ascending {
            (bucket_of(lo).max(first_bucket)..=bucket_of(hi).min(last_bucket)).collect()
        } else {
            (bucket_of(lo).max(first_bucket)..=bucket_of(hi).min(last_bucket))
                .rev()
                .collect()
        };
        let st = if ascending {
            &self.st.page_asc
        } else {
            &self.st.page_desc
        };
        let mut messages = Vec::new();
        for bucket in buckets {
            let left = want - messages.len();
            let rows = self
                .rows::<MsgRow>(
                    st,
                    (
                        super::i64_of(room.0),
                        bucket,
                        super::i64_of(lo),
                        super::i64_of(hi),
                        i32::try_from(left).unwrap_or(i32::MAX),
                    ),
                )
                .await?;
            for row in rows {
                messages.push(msg_of(row)?);
            }
            if messages.len() >= want {
                break;
            }
        }
        let has_more = messages.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        messages.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        if ascending {
            messages.reverse();
        }
        Ok(HistoryPage { messages, has_more })
    }

    async fn set_read_marker(
        &self,
        room: RoomId,
        user: &UserId,
        up_to: MessageId,
    ) -> StoreResult<()> {
        // One partition, so the unlogged batch is atomic: add the new row, drop the rows below.
        // The marker is the greatest row, so a smaller concurrent mark can never win.
        let (r, u, id) = (
            super::i64_of(room.0),
            user.as_str().to_owned(),
            super::i64_of(up_to.0),
        );
        let mut b = BatchBuilder::new(BatchType::Unlogged);
        b.push(&self.st.marker_insert, (r, u.clone(), id));
        b.push(&self.st.marker_trim, (r, u, id));
        self.run_batch(&b, &format!("read marker in room {room}"))
            .await
    }

    async fn read_marker(&self, room: RoomId, user: &UserId) -> StoreResult<Option<MessageId>> {
        Ok(self
            .rows::<(i64,)>(&self.st.marker_get, (super::i64_of(room.0), user.as_str()))
            .await?
            .into_iter()
            .next()
            .map(|r| MessageId(super::u64_of(r.0))))
    }

    async fn unread_count(
        &self,
        room: RoomId,
        user: &UserId,
        after: Option<MessageId>,
        cap: u32,
    ) -> StoreResult<u32> {
        use futures::TryStreamExt;
        if cap == 0 {
            return Ok(0);
        }
        let Some((r, _)) = self.room_with_activity(room).await? else {
            return Ok(0);
        };
        let Some(newest) = r.last_message_id else {
            return Ok(0);
        };
        let lo = after.map_or(0, |m| m.0);
        if lo >= newest.0 {
            return Ok(0);
        }
        // Newest first, bucket by bucket, page by page, until `cap` counted messages.
        let mut count = 0u32;
        for bucket in (bucket_of(lo).max(Self::first_bucket(&r))..=bucket_of(newest.0)).rev() {
            let mut rows = self
                .session
                .execute_iter(
                    self.st.unread_scan.clone(),
                    (super::i64_of(room.0), bucket, super::i64_of(lo)),
                )
                .await
                .map_err(unavailable)?
                .rows_stream::<(i64, String, String)>()
                .map_err(corrupt)?;
            while let Some((_, sender, body)) = rows.try_next().await.map_err(unavailable)? {
                if sender != user.as_str() && !is_deleted(&body)? {
                    count += 1;
                    if count >= cap {
                        return Ok(count);
                    }
                }
            }
        }
        Ok(count)
    }

    async fn friendship(&self, a: &UserId, b: &UserId) -> StoreResult<Option<Friendship>> {
        self.rows::<FriendRow>(&self.st.friend_get, (a.as_str(), b.as_str()))
            .await?
            .into_iter()
            .next()
            .map(friendship_of)
            .transpose()
    }

    async fn put_friendship(&self, f: &Friendship) -> StoreResult<()> {
        let (a, b) = (f.requester.as_str(), f.addressee.as_str());
        let status = i32::from(f.status.code());
        let mut batch = BatchBuilder::new(BatchType::Logged);
        for (user, other) in [(a, b), (b, a)] {
            batch.push(
                &self.st.friend_put,
                (
                    user.to_owned(),
                    other.to_owned(),
                    a.to_owned(),
                    b.to_owned(),
                    status,
                    f.created_at,
                    f.updated_at,
                ),
            );
        }
        self.run_batch(&batch, "friendship").await
    }

    async fn delete_friendship(&self, a: &UserId, b: &UserId) -> StoreResult<()> {
        let mut batch = BatchBuilder::new(BatchType::Logged);
        for (user, other) in [(a, b), (b, a)] {
            batch.push(
                &self.st.friend_delete,
                (user.as_str().to_owned(), other.as_str().to_owned()),
            );
        }
        self.run_batch(&batch, "friendship removal").await
    }

    async fn friendships_of(&self, user: &UserId) -> StoreResult<Vec<Friendship>> {
        self.rows_paged::<FriendRow>(&self.st.friends_of, (user.as_str(),))
            .await?
            .into_iter()
            .map(friendship_of)
            .collect()
    }

    async fn set_block(&self, blocker: &UserId, blocked: &UserId, on: bool) -> StoreResult<()> {
        let st = if on {
            &self.st.block_put
        } else {
            &self.st.block_delete
        };
        let mut batch = BatchBuilder::new(BatchType::Logged);
        let mut users = vec![blocker];
        if blocked != blocker {
            users.push(blocked);
        }
        for user in users {
            batch.push(
                st,
                (
                    user.as_str().to_owned(),
                    blocker.as_str().to_owned(),
                    blocked.as_str().to_owned(),
                ),
            );
        }
        self.run_batch(&batch, "block").await
    }

    async fn blocks_of(&self, user: &UserId) -> StoreResult<Vec<(UserId, UserId)>> {
        self.rows_paged::<(String, String)>(&self.st.blocks_of, (user.as_str(),))
            .await?
            .into_iter()
            .map(|(a, b)| {
                Ok((
                    UserId::parse(&a).map_err(corrupt)?,
                    UserId::parse(&b).map_err(corrupt)?,
                ))
            })
            .collect()
    }

    async fn add_pending(&self, items: Vec<(UserId, Notification)>, cap: u32) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        // One single-partition batch per user (atomic), ids increasing in the order of `items`.
        let mut per_user: Vec<(UserId, BatchBuilder)> = Vec::new();
        for (user, n) in items {
            let body = serde_json::to_string(&n).map_err(corrupt)?;
            let row = (user.as_str().to_owned(), self.pending_ids.next(), body);
            match per_user.iter_mut().find(|(u, _)| *u == user) {
                Some((_, b)) => b.push(&self.st.pending_put, row),
                None => {
                    let mut b = BatchBuilder::new(BatchType::Unlogged);
                    b.push(&self.st.pending_put, row);
                    per_user.push((user, b));
                }
            }
        }
        let keep = i32::try_from(cap.saturating_add(1)).unwrap_or(i32::MAX);
        futures::future::try_join_all(per_user.iter().map(|(user, b)| async move {
            self.run_batch(b, "pending notifications").await?;
            // Keep the newest `cap`: delete everything up to the (cap+1)-th newest.
            let newest = self
                .rows::<(i64,)>(&self.st.pending_newest, (user.as_str(), keep))
                .await?;
            if let Some((cut,)) = newest.get(usize::try_from(cap).unwrap_or(usize::MAX)) {
                self.exec(&self.st.pending_trim, (user.as_str(), *cut))
                    .await?;
            }
            Ok::<_, StoreError>(())
        }))
        .await?;
        Ok(())
    }

    async fn take_pending(&self, user: &UserId) -> StoreResult<Vec<Notification>> {
        let rows = self
            .rows_paged::<(i64, String)>(&self.st.pending_get, (user.as_str(),))
            .await?;
        let Some((last, _)) = rows.last() else {
            return Ok(Vec::new());
        };
        // Remove what was read, by id: a notification added meanwhile (a newer id) stays for the
        // next call.
        self.exec(&self.st.pending_trim, (user.as_str(), *last))
            .await?;
        let taken = rows
            .iter()
            .map(|(_, body)| serde_json::from_str(body).map_err(corrupt))
            .collect::<StoreResult<Vec<Notification>>>()?;
        // Their messages as they are now.
        let mut current = Vec::new();
        for n in &taken {
            if let Some(m) = self.message(n.room, n.message_id).await? {
                current.push(m);
            }
        }
        Ok(super::refresh_notifications(taken, &current))
    }

    // ---- uploads, devices, mutes, push ----

    async fn add_upload(&self, u: &Upload) -> StoreResult<()> {
        // IF NOT EXISTS: the path's first record stays (whether it applied does not matter).
        self.lwt(
            &self.st.upload_put,
            (
                u.path.as_str(),
                u.uploader.as_str(),
                u.kind.as_str(),
                super::i64_of(u.size),
                u.content_type.as_str(),
                u.created_at,
            ),
        )
        .await
        .map(|_| ())
    }

    async fn upload(&self, path: &str) -> StoreResult<Option<Upload>> {
        self.rows::<UploadRow>(&self.st.upload_get, (path,))
            .await?
            .into_iter()
            .next()
            .map(upload_of)
            .transpose()
    }

    async fn add_media_post(&self, path: &str, room: RoomId) -> StoreResult<()> {
        self.exec(&self.st.media_put, (path, super::i64_of(room.0)))
            .await
    }

    async fn media_rooms(&self, path: &str) -> StoreResult<Vec<RoomId>> {
        // Clustered by room ascending: already in order.
        Ok(self
            .rows_paged::<(i64,)>(&self.st.media_get, (path.to_owned(),))
            .await?
            .into_iter()
            .map(|(r,)| RoomId(super::u64_of(r)))
            .collect())
    }

    async fn add_device(&self, d: &Device) -> StoreResult<()> {
        let token = d.token.clone();
        let user = d.user.as_str().to_owned();
        let previous = self
            .rows::<(String, i64)>(&self.st.device_owner, (token.as_str(),))
            .await?;
        let mut b = BatchBuilder::new(BatchType::Logged);
        if let Some((old, _)) = previous.into_iter().next()
            && old != user
        {
            // The token moves: it leaves the previous owner's list.
            b.push(&self.st.device_index_delete, (old, token.clone()));
        }
        b.push(
            &self.st.device_put,
            (
                token.clone(),
                user.clone(),
                d.platform.as_str(),
                d.device_id.clone(),
                d.created_at,
            ),
        );
        b.push(&self.st.device_index_put, (user, token));
        self.run_batch(&b, "device").await
    }

    async fn remove_device(&self, user: &UserId, token: &str) -> StoreResult<bool> {
        let owner = self
            .rows::<(String, i64)>(&self.st.device_owner, (token,))
            .await?
            .into_iter()
            .next();
        match owner {
            Some((owner, written)) if owner == user.as_str() => {
                // At the registration's own timestamp: a newer registration of the token (by
                // anyone) written meanwhile survives.
                self.exec(&self.st.device_delete, (written, token)).await?;
                self.exec(
                    &self.st.device_index_delete_at,
                    (written, user.as_str(), token),
                )
                .await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn remove_device_token(&self, token: &str) -> StoreResult<()> {
        let owner = self
            .rows::<(String, i64)>(&self.st.device_owner, (token,))
            .await?
            .into_iter()
            .next();
        if let Some((owner, written)) = owner {
            self.exec(&self.st.device_delete, (written, token)).await?;
            self.exec(
                &self.st.device_index_delete_at,
                (written, owner.as_str(), token),
            )
            .await?;
        }
        Ok(())
    }

    async fn devices_of(&self, user: &UserId) -> StoreResult<Vec<Device>> {
        let tokens = self
            .rows_paged::<(String,)>(&self.st.device_index_get, (user.as_str().to_owned(),))
            .await?;
        // `devices` is the truth: a token that moved to another user meanwhile is not theirs.
        let rows = futures::future::try_join_all(tokens.into_iter().map(|(token,)| async move {
            let row = self
                .rows::<DeviceRow>(&self.st.device_get, (token.as_str(),))
                .await?
                .into_iter()
                .next();
            Ok::<_, StoreError>(row.map(|r| (token, r)))
        }))
        .await?;
        let mut devices = rows
            .into_iter()
            .flatten()
            .filter(|(_, r)| r.0 == user.as_str())
            .map(|(token, r)| device_of(token, r))
            .collect::<StoreResult<Vec<_>>>()?;
        devices.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.token.cmp(&b.token))
        });
        Ok(devices)
    }

    async fn set_muted(&self, room: RoomId, user: &UserId, muted: bool) -> StoreResult<()> {
        let st = if muted {
            &self.st.mute_put
        } else {
            &self.st.mute_delete
        };
        self.exec(st, (super::i64_of(room.0), user.as_str())).await
    }

    async fn muted_in(&self, room: RoomId) -> StoreResult<Vec<UserId>> {
        let mut users = self
            .rows_paged::<(String,)>(&self.st.mutes_get, (super::i64_of(room.0),))
            .await?
            .into_iter()
            .map(|(u,)| UserId::parse(&u).map_err(corrupt))
            .collect::<StoreResult<Vec<_>>>()?;
        users.sort_unstable();
        Ok(users)
    }

    async fn add_dead_letter(&self, l: &DeadLetter) -> StoreResult<()> {
        let job = serde_json::to_string(&l.job).map_err(corrupt)?;
        let bucket = dead_letter_bucket(l.at);
        let mut b = BatchBuilder::new(BatchType::Logged);
        b.push(&self.st.dead_bucket_put, (bucket,));
        b.push(
            &self.st.dead_put,
            (
                bucket,
                self.pending_ids.next(),
                l.at,
                job,
                l.device_token.clone(),
                l.provider.clone(),
                l.reason.clone(),
                i64::from(l.attempts),
            ),
        );
        self.run_batch(&b, "dead letter").await
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        if want == 0 {
            return Ok(out);
        }
        // Hours newest first (at most 720 rows: they expire after 30 days).
        let buckets = self
            .rows_paged::<(i64,)>(&self.st.dead_buckets_get, ())
            .await?;
        for (bucket,) in buckets {
            let left = i32::try_from(want - out.len()).unwrap_or(i32::MAX);
            for r in self
                .rows::<DeadLetterRow>(&self.st.dead_get, (bucket, left))
                .await?
            {
                out.push(dead_letter_of(r)?);
            }
            if out.len() >= want {
                break;
            }
        }
        out.truncate(want);
        Ok(out)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn close(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_split_into_statements() {
        let (_, cql) = schema::CQL_MIGRATIONS[0];
        let st = statements(cql);
        assert_eq!(st.len(), 7);
        assert!(
            st.iter()
                .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")),
            "{st:?}"
        );
        assert!(
            st.iter()
                .any(|s| s.contains("CLUSTERING ORDER BY (id DESC)"))
        );
    }

    #[test]
    fn domain_migration_splits_into_statements() {
        assert_eq!(
            schema::CQL_MIGRATIONS
                .iter()
                .map(|m| m.0)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        let st = statements(schema::CQL_MIGRATIONS[2].1);
        assert_eq!(st, vec!["ALTER TABLE users ADD language text".to_owned()]);
        assert!(is_add_column(&st[0]));
        let (_, cql) = schema::CQL_MIGRATIONS[1];
        let st = statements(cql);
        assert_eq!(st.len(), 9, "{st:?}");
        assert!(st.iter().all(|s| !s.contains(';')));
        assert_eq!(st.iter().filter(|s| is_add_column(s)).count(), 2);
        for table in [
            "users_by_username",
            "message_seqs",
            "room_log",
            "read_markers",
            "friendships",
            "blocks",
            "pending",
        ] {
            assert!(
                st.iter()
                    .any(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} ("))),
                "{table}"
            );
        }
        assert!(column_exists(
            "Invalid column name avatar because it conflicts with an existing column"
        ));
        assert!(!column_exists("Keyspace palaver does not exist"));
    }

    #[test]
    fn push_uploads_migration_splits_into_statements() {
        let (version, cql) = schema::CQL_MIGRATIONS[3];
        assert_eq!(version, 4);
        let st = statements(cql);
        assert_eq!(st.len(), 7, "{st:?}");
        assert!(st.iter().all(|s| !s.contains(';') && !s.contains("--")));
        for table in [
            "uploads",
            "media_posts",
            "devices",
            "devices_by_user",
            "mutes",
            "dead_letters",
            "dead_letter_buckets",
        ] {
            assert!(
                st.iter()
                    .any(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} ("))),
                "{table}"
            );
        }
        assert!(
            st.iter()
                .any(|s| s.contains("CLUSTERING ORDER BY (at DESC, id DESC)"))
        );
    }

    #[test]
    fn dead_letter_buckets_are_hours() {
        assert_eq!(dead_letter_bucket(0), 0);
        assert_eq!(dead_letter_bucket(3_599_999), 0);
        assert_eq!(dead_letter_bucket(3_600_000), 1);
        assert_eq!(dead_letter_bucket(-1), -1);
    }

    #[test]
    fn pending_ids_increase() {
        let ids = PendingIds::new();
        let mut last = ids.next();
        for _ in 0..1000 {
            let id = ids.next();
            assert!(id > last);
            last = id;
        }
    }

    #[test]
    fn buckets_follow_time() {
        let day_ms: u64 = 24 * 3600 * 1000;
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of((29 * day_ms) << 12), 0);
        assert_eq!(bucket_of((30 * day_ms) << 12), 1);
        let g = crate::ids::IdGenerator::new(0);
        let now = bucket_of(g.next());
        assert!(now > 0 && now < 1000, "{now}");
    }
}
