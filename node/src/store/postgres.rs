//! The PostgreSQL store: the shared store for small clusters (and the multi-process tests).
//!
//! Every node and gateway process connects to the same database. Tables mirror the embedded
//! store; migrations are ordered SQL applied at start-up under an advisory lock, so several
//! processes starting together migrate once. Each `apply_room` call (one room's batch from its
//! sequencer: new messages, rewritten messages, log entries, membership and group changes) is one
//! transaction, new messages in one multi-row insert (`UNNEST`), committed with PostgreSQL's
//! default `synchronous_commit = on`: an `Ok` is on disk. Unique constraints on `(room, seq)`,
//! `(room, sender, client_ref)` and the log's `(room, seq)` turn a second writer for one room
//! (possible only for a moment during a ring change) into a `Conflict` instead of a silent fork.
//! Message rows keep their content as `MessageContent` JSON in `body`.

use super::{HistoryPage, NewRoom, RoomWrite, Store, StoreError, StoreResult};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use schema::{
    DeadLetter, Device, Event, Friendship, FriendshipStatus, HistoryQuery, Member, Message,
    MessageContent, MessageId, Millis, Notification, Platform, Profile, Room, RoomId, RoomSummary,
    Upload, User, UserId,
};
use std::collections::HashMap;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

/// Ordered migrations; `palaver_migrations` records which ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT,
    name TEXT,
    avatar TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seen BIGINT
);
CREATE INDEX users_username ON users(username);
CREATE TABLE rooms (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    direct_key TEXT UNIQUE,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_message_id BIGINT,
    last_activity BIGINT NOT NULL
);
CREATE TABLE members (
    room BIGINT NOT NULL REFERENCES rooms(id),
    "user" TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (room, "user")
);
CREATE INDEX members_by_user ON members("user", room);
CREATE TABLE messages (
    room BIGINT NOT NULL,
    id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    client_ref TEXT,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (room, id)
);
CREATE UNIQUE INDEX messages_by_seq ON messages(room, seq);
CREATE UNIQUE INDEX messages_by_client_ref ON messages(room, sender, client_ref)
    WHERE client_ref IS NOT NULL;
"#,
    r#"
ALTER TABLE rooms ADD COLUMN avatar TEXT;
ALTER TABLE rooms ADD COLUMN public BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE room_log (
    room BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (room, seq)
);
CREATE TABLE read_markers (
    room BIGINT NOT NULL,
    "user" TEXT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (room, "user")
);
CREATE TABLE friendships (
    lo TEXT NOT NULL,
    hi TEXT NOT NULL,
    requester TEXT NOT NULL,
    addressee TEXT NOT NULL,
    status SMALLINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (lo, hi)
);
CREATE INDEX friendships_by_hi ON friendships(hi, lo);
CREATE TABLE blocks (
    blocker TEXT NOT NULL,
    blocked TEXT NOT NULL,
    PRIMARY KEY (blocker, blocked)
);
CREATE INDEX blocks_by_blocked ON blocks(blocked, blocker);
CREATE TABLE pending (
    id BIGSERIAL PRIMARY KEY,
    "user" TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX pending_by_user ON pending("user", id);
"#,
    r#"
ALTER TABLE users ADD COLUMN language TEXT;
"#,
    // Device tokens (up to 4096 bytes) and posted media paths (taken from message content) can
    // exceed what a btree index entry holds (about 2.7 kB), so they are keyed by their SHA-256.
    r#"
CREATE TABLE uploads (
    path TEXT PRIMARY KEY,
    uploader TEXT NOT NULL,
    kind TEXT NOT NULL,
    size BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE media_posts (
    path_key BYTEA NOT NULL,
    room BIGINT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (path_key, room)
);
CREATE TABLE devices (
    token_key BYTEA PRIMARY KEY,
    token TEXT NOT NULL,
    "user" TEXT NOT NULL,
    platform TEXT NOT NULL,
    device_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX devices_by_user ON devices("user", created_at);
CREATE TABLE mutes (
    room BIGINT NOT NULL,
    "user" TEXT NOT NULL,
    PRIMARY KEY (room, "user")
);
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    job TEXT NOT NULL,
    device_token TEXT,
    provider TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts BIGINT NOT NULL
);
CREATE INDEX dead_letters_by_at ON dead_letters(at, id);
"#,
    // Pending notifications as runs of references to their messages (see `add_pending`); the
    // `pending` table keeps those stored before, until their users take them.
    r#"
CREATE TABLE pending_runs (
    "user" TEXT NOT NULL,
    room BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    cap BIGINT NOT NULL,
    PRIMARY KEY ("user", room, first_seq)
);
"#,
];

/// Most dead letters kept: adding one beyond this removes the oldest.
pub const DEAD_LETTER_CAP: u32 = 10_000;

/// Serializes migrations across processes (an arbitrary constant key).
const MIGRATION_LOCK: i64 = 0x0070_616c_6176_6572; // "palaver"

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(c)
            if *c == SqlState::UNIQUE_VIOLATION
                && e.as_db_error().and_then(|d| d.constraint())
                    == Some("messages_by_client_ref") =>
        {
            StoreError::DuplicateRef(e.to_string())
        }
        Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::FOREIGN_KEY_VIOLATION => {
            StoreError::Conflict(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        deadpool_postgres::PoolError::Closed => StoreError::Closed,
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt(msg: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(msg.to_string())
}

impl PostgresStore {
    /// Connects to `url` (a libpq-style URL or key=value string) with up to `pool_size`
    /// connections, and migrates the schema.
    pub async fn connect(url: &str, pool_size: usize) -> StoreResult<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_err)?;
        let res = async {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS palaver_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await
            .map_err(pg_err)?;
            let done: i32 = c
                .query_one("SELECT coalesce(max(version), 0) FROM palaver_migrations", &[])
                .await
                .map_err(pg_err)?
                .get(0);
            let done = usize::try_from(done).unwrap_or(0);
            if done > MIGRATIONS.len() {
                return Err(corrupt(format!(
                    "database schema version {done} is newer than this binary ({})",
                    MIGRATIONS.len()
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
                let tx = c.transaction().await.map_err(pg_err)?;
                tx.batch_execute(sql).await.map_err(pg_err)?;
                let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.execute("INSERT INTO palaver_migrations (version) VALUES ($1)", &[&v])
                    .await
                    .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
            }
            Ok(())
        }
        .await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_err)?;
        res
    }
}

const USER_COLS: &str = "id, username, name, avatar, created_at, updated_at, last_seen, language";
const ROOM_COLS: &str =
    "id, kind, name, created_by, created_at, last_seq, last_message_id, avatar, public";
const MSG_COLS: &str = "id, room, seq, sender, client_ref, body, created_at";

fn uid(s: String) -> StoreResult<UserId> {
    UserId::parse(&s).map_err(corrupt)
}

fn user_row(r: &Row) -> StoreResult<User> {
    Ok(User {
        profile: Profile {
            id: uid(r.get(0))?,
            username: r.get(1),
            name: r.get(2),
            avatar: r.get(3),
            language: r.get(7),
        },
        created_at: r.get(4),
        updated_at: r.get(5),
        last_seen: r.get(6),
    })
}

fn room_row(r: &Row) -> StoreResult<Room> {
    let kind: String = r.get(1);
    Ok(Room {
        id: RoomId(super::u64_of(r.get(0))),
        kind: match super::parse_kind(&kind) {
            Some(k) => k,
            None => return Err(corrupt(format!("unknown room kind {:?}", kind))),
        },
        name: r.get(2),
        created_by: uid(r.get(3))?,
        created_at: r.get(4),
        last_seq: super::u64_of(r.get(5)),
        last_message_id: r
            .get::<_, Option<i64>>(6)
            .map(|v| MessageId(super::u64_of(v))),
        avatar: r.get(7),
        public: r.get(8),
    })
}

fn member_row(r: &Row) -> StoreResult<Member> {
    let role: String = r.get(1);
    Ok(Member {
        user: uid(r.get(0))?,
        role: match super::parse_role(&role) {
            Some(r) => r,
            None => return Err(corrupt(format!("unknown role {:?}", role))),
        },
        joined_at: r.get(2),
        online: None,
    })
}

fn message_row(r: &Row) -> StoreResult<Message> {
    let body: String = r.get(5);
    let content: MessageContent = serde_json::from_str(&body).map_err(corrupt)?;
    let mut m = Message::new(
        MessageId(super::u64_of(r.get(0))),
        RoomId(super::u64_of(r.get(1))),
        super::u64_of(r.get(2)),
        uid(r.get(3))?,
        content.body.clone(),
        r.get(6),
    );
    m.client_ref = r.get(4);
    content.apply(&mut m);
    Ok(m)
}

const FRIEND_COLS: &str = "requester, addressee, status, created_at, updated_at";

fn friendship_row(r: &Row) -> StoreResult<Friendship> {
    let code: i16 = r.get(2);
    let status = u8::try_from(code)
        .ok()
        .and_then(FriendshipStatus::from_code)
        .ok_or_else(|| corrupt(format!("unknown friendship status {code}")))?;
    Ok(Friendship {
        requester: uid(r.get(0))?,
        addressee: uid(r.get(1))?,
        status,
        created_at: r.get(3),
        updated_at: r.get(4),
    })
}

const UPLOAD_COLS: &str = "path, uploader, kind, size, content_type, created_at";
const DEVICE_COLS: &str = r#""user", platform, token, device_id, created_at"#;
const DEAD_LETTER_COLS: &str = "job, device_token, provider, reason, attempts, at";

fn upload_row(r: &Row) -> StoreResult<Upload> {
    Ok(Upload {
        path: r.get(0),
        uploader: uid(r.get(1))?,
        kind: r.get(2),
        size: super::u64_of(r.get(3)),
        content_type: r.get(4),
        created_at: r.get(5),
    })
}

fn device_row(r: &Row) -> StoreResult<Device> {
    let platform: String = r.get(1);
    Ok(Device {
        user: uid(r.get(0))?,
        platform: Platform::parse(&platform)
            .ok_or_else(|| corrupt(format!("unknown platform {platform:?}")))?,
        token: r.get(2),
        device_id: r.get(3),
        created_at: r.get(4),
    })
}

fn dead_letter_row(r: &Row) -> StoreResult<DeadLetter> {
    let job: String = r.get(0);
    let attempts: i64 = r.get(4);
    Ok(DeadLetter {
        job: serde_json::from_str(&job).map_err(|e| corrupt(format!("dead letter job: {e}")))?,
        device_token: r.get(1),
        provider: r.get(2),
        reason: r.get(3),
        attempts: u32::try_from(attempts)
            .map_err(|_| corrupt(format!("dead letter attempts {attempts}")))?,
        at: r.get(5),
    })
}

/// A pair of users in canonical order (the key of its one friendship row).
fn pair<'a>(a: &'a UserId, b: &'a UserId) -> (&'a str, &'a str) {
    if a <= b {
        (a.as_str(), b.as_str())
    } else {
        (b.as_str(), a.as_str())
    }
}

/// What a message row keeps in its `body` column.
fn content_json(m: &Message) -> StoreResult<String> {
    serde_json::to_string(&MessageContent::of(m)).map_err(corrupt)
}

async fn insert_room(
    tx: &deadpool_postgres::Transaction<'_>,
    new: &NewRoom,
    direct_key: Option<&str>,
) -> StoreResult<bool> {
    let r = &new.room;
    let inserted = tx
        .execute(
            "INSERT INTO rooms (id, kind, name, created_by, created_at, direct_key, last_activity,
               avatar, public)
             VALUES ($1, $2, $3, $4, $5, $6, $5, $7, $8) ON CONFLICT (direct_key) DO NOTHING",
            &[
                &super::i64_of(r.id.0),
                &super::kind_str(r.kind),
                &r.name,
                &r.created_by.as_str(),
                &r.created_at,
                &direct_key,
                &r.avatar,
                &r.public,
            ],
        )
        .await
        .map_err(pg_err)?;
    if inserted == 0 {
        return Ok(false);
    }
    let rooms: Vec<i64> = vec![super::i64_of(r.id.0); new.members.len()];
    let users: Vec<&str> = new.members.iter().map(|m| m.user.as_str()).collect();
    let roles: Vec<&str> = new
        .members
        .iter()
        .map(|m| super::role_str(m.role))
        .collect();
    let joined: Vec<i64> = new.members.iter().map(|m| m.joined_at).collect();
    tx.execute(
        r#"INSERT INTO members (room, "user", role, joined_at)
           SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[])"#,
        &[&rooms, &users, &roles, &joined],
    )
    .await
    .map_err(pg_err)?;
    Ok(true)
}

#[async_trait]
impl Store for PostgresStore {
    async fn upsert_user(&self, p: &Profile, now: Millis) -> StoreResult<User> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO users (id, username, name, avatar, created_at, updated_at, language)
             VALUES ($1, $2, $3, $4, $5, $5, $6)
             ON CONFLICT (id) DO UPDATE SET username = excluded.username, name = excluded.name,
               avatar = excluded.avatar, updated_at = excluded.updated_at,
               language = coalesce(excluded.language, users.language)
             WHERE (users.username, users.name, users.avatar)
               IS DISTINCT FROM (excluded.username, excluded.name, excluded.avatar)
               OR (excluded.language IS NOT NULL
                   AND users.language IS DISTINCT FROM excluded.language)",
            &[
                &p.id.as_str(),
                &p.username,
                &p.name,
                &p.avatar,
                &now,
                &p.language,
            ],
        )
        .await
        .map_err(pg_err)?;
        let row = c
            .query_one(
                &format!("SELECT {USER_COLS} FROM users WHERE id = $1"),
                &[&p.id.as_str()],
            )
            .await
            .map_err(pg_err)?;
        user_row(&row)
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&id.as_str()])
            .await
            .map_err(pg_err)?
            .map(|r| user_row(&r))
            .transpose()
    }

    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(
            "UPDATE users SET last_seen = $2 WHERE id = $1",
            &[&id.as_str(), &at],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn create_room(&self, new: NewRoom) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        insert_room(&tx, &new, None).await?;
        tx.commit().await.map_err(pg_err)
    }

    async fn get_or_create_direct(&self, candidate: NewRoom) -> StoreResult<(Room, bool)> {
        let [a, b] = match candidate.members.as_slice() {
            [a, b] => [&a.user, &b.user],
            _ => return Err(StoreError::Conflict("a direct room has two members".into())),
        };
        let key = super::direct_key(a, b);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let created = insert_room(&tx, &candidate, Some(&key)).await?;
        let row = tx
            .query_one(
                &format!("SELECT {ROOM_COLS} FROM rooms WHERE direct_key = $1"),
                &[&key],
            )
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok((room_row(&row)?, created))
    }

    async fn room(&self, id: RoomId) -> StoreResult<Option<Room>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE id = $1"))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&super::i64_of(id.0)])
            .await
            .map_err(pg_err)?
            .map(|r| room_row(&r))
            .transpose()
    }

    async fn members(&self, room: RoomId) -> StoreResult<Vec<Member>> {
        let c = self.client().await?;
        let rows = c
            .query(
                r#"SELECT "user", role, joined_at FROM members WHERE room = $1
                   ORDER BY joined_at, "user""#,
                &[&super::i64_of(room.0)],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(member_row).collect()
    }

    async fn member_count_up_to(&self, room: RoomId, limit: usize) -> StoreResult<usize> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let row = c
            .query_one(
                "SELECT COUNT(*) FROM (SELECT 1 FROM members WHERE room = $1 LIMIT $2) AS m",
                &[&super::i64_of(room.0), &limit],
            )
            .await
            .map_err(pg_err)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn presence_audience(&self, user: &UserId, group_max: usize) -> StoreResult<Vec<UserId>> {
        let c = self.client().await?;
        let max = i64::try_from(group_max).unwrap_or(i64::MAX);
        let accepted = i16::from(schema::FriendshipStatus::Accepted.code());
        // One round trip, not the trait's five and more (see the embedded store's).
        let rows = c
            .query(
                r#"WITH blocked(u) AS (
                       SELECT blocked FROM blocks WHERE blocker = $1
                       UNION SELECT blocker FROM blocks WHERE blocked = $1
                   ), heard(room) AS (
                       SELECT m.room FROM members m JOIN rooms r ON r.id = m.room
                       WHERE m."user" = $1 AND (r.kind = 'direct' OR NOT EXISTS (
                           SELECT 1 FROM members x WHERE x.room = m.room LIMIT 1 OFFSET $2))
                   ), audience(u) AS (
                       SELECT hi FROM friendships WHERE lo = $1 AND status = $3
                       UNION SELECT lo FROM friendships WHERE hi = $1 AND status = $3
                       UNION SELECT o."user" FROM heard JOIN members o ON o.room = heard.room
                   )
                   SELECT u FROM audience
                   WHERE u <> $1 AND u NOT IN (SELECT u FROM blocked)
                   ORDER BY u COLLATE "C""#,
                &[&user.as_str(), &max, &accepted],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(|r| uid(r.get(0))).collect()
    }

    async fn room_ids_of(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        let c = self.client().await?;
        let rows = c
            .query(
                r#"SELECT room FROM members WHERE "user" = $1"#,
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| RoomId(super::u64_of(r.get(0))))
            .collect())
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomSummary>> {
        let c = self.client().await?;
        let rows = c
            .query(
                r#"SELECT r.id, r.kind, r.name, r.created_by, r.created_at, r.last_seq,
                          r.last_message_id, r.avatar, r.public
                   FROM members m JOIN rooms r ON r.id = m.room
                   WHERE m."user" = $1 ORDER BY r.last_activity DESC, r.id DESC"#,
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        let rooms: Vec<Room> = rows.iter().map(room_row).collect::<StoreResult<_>>()?;
        let ids: Vec<i64> = rooms.iter().map(|r| super::i64_of(r.id.0)).collect();
        let mut members: HashMap<u64, Vec<Member>> = HashMap::new();
        for r in c
            .query(
                r#"SELECT "user", role, joined_at, room FROM members WHERE room = ANY($1)
                   ORDER BY joined_at, "user""#,
                &[&ids],
            )
            .await
            .map_err(pg_err)?
        {
            members
                .entry(super::u64_of(r.get(3)))
                .or_default()
                .push(member_row(&r)?);
        }
        let last_ids: Vec<i64> = rooms
            .iter()
            .filter_map(|r| r.last_message_id.map(|m| super::i64_of(m.0)))
            .collect();
        let last_rooms: Vec<i64> = rooms
            .iter()
            .filter(|r| r.last_message_id.is_some())
            .map(|r| super::i64_of(r.id.0))
            .collect();
        let mut last: HashMap<u64, Message> = HashMap::new();
        for r in c
            .query(
                &format!(
                    "SELECT {MSG_COLS} FROM messages WHERE (room, id) IN
                     (SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[]))"
                ),
                &[&last_rooms, &last_ids],
            )
            .await
            .map_err(pg_err)?
        {
            let m = message_row(&r)?;
            last.insert(m.room.0, m);
        }
        Ok(rooms
            .into_iter()
            .map(|room| RoomSummary {
                members: members.remove(&room.id.0).unwrap_or_default(),
                last_message: last.remove(&room.id.0),
                room,
            })
            .collect())
    }

    async fn messages_by_client_ref(
        &self,
        room: RoomId,
        keys: Vec<(UserId, String)>,
    ) -> StoreResult<Vec<Message>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let senders: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let refs: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {MSG_COLS} FROM messages WHERE room = $1 AND (sender, client_ref) IN
                     (SELECT * FROM UNNEST($2::TEXT[], $3::TEXT[]))"
                ),
                &[&super::i64_of(room.0), &senders, &refs],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(message_row).collect()
    }

    async fn history(
        &self,
        room: RoomId,
        q: &HistoryQuery,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        let lo = q.after.map_or(0, |m| super::i64_of(m.0));
        let hi = q.before.map_or(i64::MAX, |m| super::i64_of(m.0));
        let fetch = i64::from(limit) + 1;
        let ascending = q.after.is_some();
        let order = if ascending { "ASC" } else { "DESC" };
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room = $1 AND id > $2 AND id < $3
                 ORDER BY id {order} LIMIT $4"
            ))
            .await
            .map_err(pg_err)?;
        let rows = c
            .query(&st, &[&super::i64_of(room.0), &lo, &hi, &fetch])
            .await
            .map_err(pg_err)?;
        let mut messages: Vec<Message> =
            rows.iter().map(message_row).collect::<StoreResult<_>>()?;
        let has_more = messages.len() as i64 > i64::from(limit);
        messages.truncate(limit as usize);
        if ascending {
            messages.reverse();
        }
        Ok(HistoryPage { messages, has_more })
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {USER_COLS} FROM users WHERE username = $1
                 ORDER BY updated_at DESC, id LIMIT 1"
            ))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&username])
            .await
            .map_err(pg_err)?
            .map(|r| user_row(&r))
            .transpose()
    }

    async fn direct_room(&self, a: &UserId, b: &UserId) -> StoreResult<Option<RoomId>> {
        let key = super::direct_key(a, b);
        let c = self.client().await?;
        Ok(
            c.query_opt("SELECT id FROM rooms WHERE direct_key = $1", &[&key])
                .await
                .map_err(pg_err)?
                .map(|r| RoomId(super::u64_of(r.get(0)))),
        )
    }

    async fn apply_room(&self, room: RoomId, w: RoomWrite) -> StoreResult<()> {
        let r = super::i64_of(room.0);
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        if !w.new_messages.is_empty() {
            let n = w.new_messages.len();
            let mut ids = Vec::with_capacity(n);
            let mut seqs = Vec::with_capacity(n);
            let mut senders = Vec::with_capacity(n);
            let mut refs: Vec<Option<&str>> = Vec::with_capacity(n);
            let mut bodies = Vec::with_capacity(n);
            let mut ats = Vec::with_capacity(n);
            for m in &w.new_messages {
                ids.push(super::i64_of(m.id.0));
                seqs.push(super::i64_of(m.seq));
                senders.push(m.sender.as_str());
                refs.push(m.client_ref.as_deref());
                bodies.push(content_json(m)?);
                ats.push(m.created_at);
            }
            let rooms = vec![r; n];
            tx.execute(
                "INSERT INTO messages (room, id, seq, sender, client_ref, body, created_at)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[],
                                      $5::TEXT[], $6::TEXT[], $7::BIGINT[])",
                &[&rooms, &ids, &seqs, &senders, &refs, &bodies, &ats],
            )
            .await
            .map_err(pg_err)?;
        }
        if !w.changed_messages.is_empty() {
            // Rewritten in order, so that a message changed twice in one batch ends as the last.
            let st = tx
                .prepare_cached("UPDATE messages SET body = $3 WHERE room = $1 AND id = $2")
                .await
                .map_err(pg_err)?;
            for m in &w.changed_messages {
                tx.execute(&st, &[&r, &super::i64_of(m.id.0), &content_json(m)?])
                    .await
                    .map_err(pg_err)?;
            }
        }
        if !w.log.is_empty() {
            let seqs: Vec<i64> = w.log.iter().map(|(s, _)| super::i64_of(*s)).collect();
            let events = w
                .log
                .iter()
                .map(|(_, e)| serde_json::to_string(e).map_err(corrupt))
                .collect::<StoreResult<Vec<String>>>()?;
            let rooms = vec![r; seqs.len()];
            tx.execute(
                "INSERT INTO room_log (room, seq, event)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[])",
                &[&rooms, &seqs, &events],
            )
            .await
            .map_err(pg_err)?;
        }
        if !w.upsert_members.is_empty() {
            let st = tx
                .prepare_cached(
                    r#"INSERT INTO members (room, "user", role, joined_at) VALUES ($1, $2, $3, $4)
                       ON CONFLICT (room, "user") DO UPDATE SET role = excluded.role"#,
                )
                .await
                .map_err(pg_err)?;
            for m in &w.upsert_members {
                tx.execute(
                    &st,
                    &[&r, &m.user.as_str(), &super::role_str(m.role), &m.joined_at],
                )
                .await
                .map_err(pg_err)?;
            }
        }
        if !w.remove_members.is_empty() {
            let users: Vec<&str> = w.remove_members.iter().map(UserId::as_str).collect();
            tx.execute(
                r#"DELETE FROM members WHERE room = $1 AND "user" = ANY($2)"#,
                &[&r, &users],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(
                r#"DELETE FROM read_markers WHERE room = $1 AND "user" = ANY($2)"#,
                &[&r, &users],
            )
            .await
            .map_err(pg_err)?;
        }
        if let Some(p) = &w.patch {
            tx.execute(
                "UPDATE rooms SET name = $2, avatar = $3, public = $4 WHERE id = $1",
                &[&r, &p.name, &p.avatar, &p.public],
            )
            .await
            .map_err(pg_err)?;
        }
        // Only new messages move the room in chat lists; greatest() ignores NULLs, so a batch
        // without a newest message leaves last_message_id as it was.
        let activity = if w.new_messages.is_empty() { 0 } else { w.at };
        let last_id = w.last_message_id.map(|m| super::i64_of(m.0));
        tx.execute(
            "UPDATE rooms SET last_seq = greatest(last_seq, $2),
               last_message_id = greatest(last_message_id, $3),
               last_activity = greatest(last_activity, $4) WHERE id = $1",
            &[&r, &super::i64_of(w.last_seq), &last_id, &activity],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn message(&self, room: RoomId, id: MessageId) -> StoreResult<Option<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room = $1 AND id = $2"
            ))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&super::i64_of(room.0), &super::i64_of(id.0)])
            .await
            .map_err(pg_err)?
            .map(|r| message_row(&r))
            .transpose()
    }

    async fn messages_after_seq(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room = $1 AND seq > $2
                 ORDER BY seq ASC LIMIT $3"
            ))
            .await
            .map_err(pg_err)?;
        let rows = c
            .query(
                &st,
                &[
                    &super::i64_of(room.0),
                    &super::i64_of(after_seq),
                    &i64::from(limit),
                ],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(message_row).collect()
    }

    async fn room_log(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Event)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT seq, event FROM room_log WHERE room = $1 AND seq > $2
                 ORDER BY seq ASC LIMIT $3",
            )
            .await
            .map_err(pg_err)?;
        let rows = c
            .query(
                &st,
                &[
                    &super::i64_of(room.0),
                    &super::i64_of(after_seq),
                    &i64::from(limit),
                ],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|row| {
                let json: String = row.get(1);
                let event =
                    serde_json::from_str(&json).map_err(|e| corrupt(format!("room log: {e}")))?;
                Ok((super::u64_of(row.get(0)), event))
            })
            .collect()
    }

    async fn set_read_marker(
        &self,
        room: RoomId,
        user: &UserId,
        up_to: MessageId,
    ) -> StoreResult<()> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                r#"INSERT INTO read_markers (room, "user", message_id) VALUES ($1, $2, $3)
                   ON CONFLICT (room, "user") DO UPDATE SET message_id = excluded.message_id
                   WHERE excluded.message_id > read_markers.message_id"#,
            )
            .await
            .map_err(pg_err)?;
        c.execute(
            &st,
            &[
                &super::i64_of(room.0),
                &user.as_str(),
                &super::i64_of(up_to.0),
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn read_marker(&self, room: RoomId, user: &UserId) -> StoreResult<Option<MessageId>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                r#"SELECT message_id FROM read_markers WHERE room = $1 AND "user" = $2"#,
            )
            .await
            .map_err(pg_err)?;
        Ok(c.query_opt(&st, &[&super::i64_of(room.0), &user.as_str()])
            .await
            .map_err(pg_err)?
            .map(|r| MessageId(super::u64_of(r.get(0)))))
    }

    async fn unread_count(
        &self,
        room: RoomId,
        user: &UserId,
        after: Option<MessageId>,
        cap: u32,
    ) -> StoreResult<u32> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT count(*) FROM (SELECT 1 FROM messages
                   WHERE room = $1 AND id > $2 AND sender <> $3
                     AND (body::jsonb ->> 'type') <> 'deleted' LIMIT $4) AS unread",
            )
            .await
            .map_err(pg_err)?;
        let n: i64 = c
            .query_one(
                &st,
                &[
                    &super::i64_of(room.0),
                    &after.map_or(0, |m| super::i64_of(m.0)),
                    &user.as_str(),
                    &i64::from(cap),
                ],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(u32::try_from(n).unwrap_or(cap))
    }

    async fn friendship(&self, a: &UserId, b: &UserId) -> StoreResult<Option<Friendship>> {
        let (lo, hi) = pair(a, b);
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {FRIEND_COLS} FROM friendships WHERE lo = $1 AND hi = $2"
            ))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&lo, &hi])
            .await
            .map_err(pg_err)?
            .map(|r| friendship_row(&r))
            .transpose()
    }

    async fn put_friendship(&self, f: &Friendship) -> StoreResult<()> {
        let (lo, hi) = pair(&f.requester, &f.addressee);
        let c = self.client().await?;
        c.execute(
            "INSERT INTO friendships (lo, hi, requester, addressee, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (lo, hi) DO UPDATE SET requester = excluded.requester,
               addressee = excluded.addressee, status = excluded.status,
               created_at = excluded.created_at, updated_at = excluded.updated_at",
            &[
                &lo,
                &hi,
                &f.requester.as_str(),
                &f.addressee.as_str(),
                &i16::from(f.status.code()),
                &f.created_at,
                &f.updated_at,
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn delete_friendship(&self, a: &UserId, b: &UserId) -> StoreResult<()> {
        let (lo, hi) = pair(a, b);
        let c = self.client().await?;
        c.execute(
            "DELETE FROM friendships WHERE lo = $1 AND hi = $2",
            &[&lo, &hi],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn friendships_of(&self, user: &UserId) -> StoreResult<Vec<Friendship>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {FRIEND_COLS} FROM friendships WHERE lo = $1 OR hi = $1
                     ORDER BY lo, hi"
                ),
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(friendship_row).collect()
    }

    async fn set_block(&self, blocker: &UserId, blocked: &UserId, on: bool) -> StoreResult<()> {
        let sql = if on {
            "INSERT INTO blocks (blocker, blocked) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM blocks WHERE blocker = $1 AND blocked = $2"
        };
        let c = self.client().await?;
        c.execute(sql, &[&blocker.as_str(), &blocked.as_str()])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn blocks_of(&self, user: &UserId) -> StoreResult<Vec<(UserId, UserId)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT blocker, blocked FROM blocks WHERE blocker = $1 OR blocked = $1
                 ORDER BY blocker, blocked",
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| Ok((uid(r.get(0))?, uid(r.get(1))?)))
            .collect()
    }

    /// Stored as runs: a user who missed messages `first..=last` of a room, one after the
    /// other, is one row of `pending_runs`, extended in place by the next call (a flood into a
    /// room of 500 offline members updates 500 small rows per batch, where a row per member and
    /// message, with a ranking delete over every such user's rows, scanned tens of thousands of
    /// rows per message). Each run keeps its newest `cap`, each user their newest `cap` runs.
    async fn add_pending(&self, items: Vec<(UserId, Notification)>, cap: u32) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let runs = super::pending_runs(items, cap)?;
        let users: Vec<&str> = runs.iter().map(|r| r.user.as_str()).collect();
        let rooms: Vec<i64> = runs.iter().map(|r| super::i64_of(r.room.0)).collect();
        let firsts: Vec<i64> = runs.iter().map(|r| super::i64_of(r.first)).collect();
        let lasts: Vec<i64> = runs.iter().map(|r| super::i64_of(r.last)).collect();
        let ats: Vec<i64> = runs.iter().map(|r| r.last_at).collect();
        let mut distinct = users.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let cap = i64::from(cap.max(1));
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // A run that follows a stored one (its first message is that one's last plus one)
        // extends it; any other is a row of its own.
        tx.execute(
            r#"WITH input AS (
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                                      $5::BIGINT[]) AS t(u, room, f, l, at)),
               extended AS (
                 UPDATE pending_runs p SET last_seq = i.l, last_at = i.at, cap = $6,
                        first_seq = GREATEST(p.first_seq, i.l - $6 + 1)
                 FROM input i
                 WHERE p."user" = i.u AND p.room = i.room AND p.last_seq = i.f - 1
                 RETURNING i.u, i.room, i.f)
               INSERT INTO pending_runs ("user", room, first_seq, last_seq, last_at, cap)
               SELECT i.u, i.room, i.f, i.l, i.at, $6 FROM input i
               WHERE NOT EXISTS (SELECT 1 FROM extended e
                                 WHERE e.u = i.u AND e.room = i.room AND e.f = i.f)
               ON CONFLICT ("user", room, first_seq) DO UPDATE
                 SET last_seq = GREATEST(pending_runs.last_seq, excluded.last_seq),
                     last_at = GREATEST(pending_runs.last_at, excluded.last_at)"#,
            &[&users, &rooms, &firsts, &lasts, &ats, &cap],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            r#"DELETE FROM pending_runs p USING (
                 SELECT "user", room, first_seq, row_number() OVER (
                   PARTITION BY "user" ORDER BY last_at DESC, room DESC, last_seq DESC) AS rank
                 FROM pending_runs WHERE "user" = ANY($1)) r
               WHERE p."user" = r."user" AND p.room = r.room AND p.first_seq = r.first_seq
                 AND r.rank > $2"#,
            &[&distinct, &cap],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn take_pending(&self, user: &UserId) -> StoreResult<Vec<Notification>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // Each statement reads and removes: a notification added meanwhile is either taken
        // here or left for the next call, never lost.
        let mut stored: Vec<(i64, String)> = tx
            .query(
                r#"DELETE FROM pending WHERE "user" = $1 RETURNING id, body"#,
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        stored.sort_unstable_by_key(|r| r.0);
        let runs = tx
            .query(
                r#"DELETE FROM pending_runs WHERE "user" = $1
                   RETURNING room, first_seq, last_seq, cap"#,
                &[&user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        let cap = runs
            .iter()
            .map(|r| r.get::<_, i64>(3))
            .max()
            .map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        let mut found = stored
            .iter()
            .map(|(_, b)| serde_json::from_str(b).map_err(corrupt))
            .collect::<StoreResult<Vec<Notification>>>()?;
        // The stored ones' messages as they are now, and the runs' messages.
        let rooms: Vec<i64> = found.iter().map(|n| super::i64_of(n.room.0)).collect();
        let ids: Vec<i64> = found
            .iter()
            .map(|n| super::i64_of(n.message_id.0))
            .collect();
        let current = if found.is_empty() {
            Vec::new()
        } else {
            tx.query(
                &format!(
                    "SELECT {MSG_COLS} FROM messages
                     WHERE (room, id) IN (SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[]))"
                ),
                &[&rooms, &ids],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(message_row)
            .collect::<StoreResult<Vec<Message>>>()?
        };
        found = super::refresh_notifications(found, &current);
        if !runs.is_empty() {
            let rooms: Vec<i64> = runs.iter().map(|r| r.get(0)).collect();
            let firsts: Vec<i64> = runs.iter().map(|r| r.get(1)).collect();
            let lasts: Vec<i64> = runs.iter().map(|r| r.get(2)).collect();
            let rows = tx
                .query(
                    &format!(
                        "SELECT {cols} FROM messages m
                         JOIN UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS r(room, f, l)
                           ON m.room = r.room AND m.seq BETWEEN r.f AND r.l",
                        cols = MSG_COLS
                            .split(", ")
                            .map(|c| format!("m.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[&rooms, &firsts, &lasts],
                )
                .await
                .map_err(pg_err)?;
            for r in &rows {
                let m = message_row(r)?;
                if m.deleted_at.is_none() {
                    found.push(super::notification_of(&m));
                }
            }
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(super::newest_pending(user, found, cap))
    }

    // ---- uploads, devices, mutes, push ----

    async fn add_upload(&self, u: &Upload) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO uploads (path, uploader, kind, size, content_type, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (path) DO NOTHING",
            &[
                &u.path,
                &u.uploader.as_str(),
                &u.kind,
                &super::i64_of(u.size),
                &u.content_type,
                &u.created_at,
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn upload(&self, path: &str) -> StoreResult<Option<Upload>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE path = $1"
            ))
            .await
            .map_err(pg_err)?;
        c.query_opt(&st, &[&path])
            .await
            .map_err(pg_err)?
            .map(|r| upload_row(&r))
            .transpose()
    }

    async fn add_media_post(&self, path: &str, room: RoomId) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO media_posts (path_key, room, path)
             VALUES (sha256(convert_to($1, 'UTF8')), $2, $1) ON CONFLICT DO NOTHING",
            &[&path, &super::i64_of(room.0)],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn media_rooms(&self, path: &str) -> StoreResult<Vec<RoomId>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT room FROM media_posts
                 WHERE path_key = sha256(convert_to($1, 'UTF8')) AND path = $1 ORDER BY room",
            )
            .await
            .map_err(pg_err)?;
        Ok(c.query(&st, &[&path])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| RoomId(super::u64_of(r.get(0))))
            .collect())
    }

    async fn add_device(&self, d: &Device) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(
            r#"INSERT INTO devices (token_key, token, "user", platform, device_id, created_at)
               VALUES (sha256(convert_to($1, 'UTF8')), $1, $2, $3, $4, $5)
               ON CONFLICT (token_key) DO UPDATE SET token = excluded.token,
                 "user" = excluded."user", platform = excluded.platform,
                 device_id = excluded.device_id, created_at = excluded.created_at"#,
            &[
                &d.token,
                &d.user.as_str(),
                &d.platform.as_str(),
                &d.device_id,
                &d.created_at,
            ],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn remove_device(&self, user: &UserId, token: &str) -> StoreResult<bool> {
        let c = self.client().await?;
        let n = c
            .execute(
                r#"DELETE FROM devices WHERE token_key = sha256(convert_to($1, 'UTF8'))
                   AND token = $1 AND "user" = $2"#,
                &[&token, &user.as_str()],
            )
            .await
            .map_err(pg_err)?;
        Ok(n > 0)
    }

    async fn remove_device_token(&self, token: &str) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(
            "DELETE FROM devices WHERE token_key = sha256(convert_to($1, 'UTF8')) AND token = $1",
            &[&token],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn devices_of(&self, user: &UserId) -> StoreResult<Vec<Device>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                r#"SELECT {DEVICE_COLS} FROM devices WHERE "user" = $1
                   ORDER BY created_at, token COLLATE "C""#
            ))
            .await
            .map_err(pg_err)?;
        c.query(&st, &[&user.as_str()])
            .await
            .map_err(pg_err)?
            .iter()
            .map(device_row)
            .collect()
    }

    async fn set_muted(&self, room: RoomId, user: &UserId, muted: bool) -> StoreResult<()> {
        let c = self.client().await?;
        let sql = if muted {
            r#"INSERT INTO mutes (room, "user") VALUES ($1, $2) ON CONFLICT DO NOTHING"#
        } else {
            r#"DELETE FROM mutes WHERE room = $1 AND "user" = $2"#
        };
        c.execute(sql, &[&super::i64_of(room.0), &user.as_str()])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn muted_in(&self, room: RoomId) -> StoreResult<Vec<UserId>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(r#"SELECT "user" FROM mutes WHERE room = $1"#)
            .await
            .map_err(pg_err)?;
        let mut users = c
            .query(&st, &[&super::i64_of(room.0)])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| uid(r.get(0)))
            .collect::<StoreResult<Vec<_>>>()?;
        // Byte order, whatever the database's collation.
        users.sort_unstable();
        Ok(users)
    }

    async fn add_dead_letter(&self, l: &DeadLetter) -> StoreResult<()> {
        let job = serde_json::to_string(&l.job).map_err(corrupt)?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO dead_letters (at, job, device_token, provider, reason, attempts)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &l.at,
                &job,
                &l.device_token,
                &l.provider,
                &l.reason,
                &i64::from(l.attempts),
            ],
        )
        .await
        .map_err(pg_err)?;
        // Bounded: everything below the newest DEAD_LETTER_CAP rows goes.
        tx.execute(
            "DELETE FROM dead_letters WHERE id <=
               (SELECT id FROM dead_letters ORDER BY id DESC OFFSET $1 LIMIT 1)",
            &[&i64::from(DEAD_LETTER_CAP)],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {DEAD_LETTER_COLS} FROM dead_letters ORDER BY at DESC, id DESC LIMIT $1"
            ))
            .await
            .map_err(pg_err)?;
        c.query(&st, &[&i64::from(limit)])
            .await
            .map_err(pg_err)?
            .iter()
            .map(dead_letter_row)
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        self.client()
            .await?
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(pg_err)
    }

    async fn close(&self) -> StoreResult<()> {
        self.pool.close();
        Ok(())
    }
}
