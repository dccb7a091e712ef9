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
//! A batch is written as: claim the sequence range (the compare-and-set above), then write the
//! messages and their idempotency rows in one logged batch, retried. If that write still fails,
//! the claimed numbers stay unused: a gap in `seq` is possible after a storage failure, never a
//! duplicate or a reordering.
//!
//! Not verified on this project's machines: ScyllaDB and Cassandra cannot be installed there.
//! The conformance suite runs against a real cluster when `PALAVER_TEST_SCYLLA_NODES` is set.

use super::{HistoryPage, NewRoom, Store, StoreError, StoreResult};
use async_trait::async_trait;
use schema::{
    HistoryQuery, Member, Message, MessageBody, MessageId, Millis, Profile, Room, RoomId, RoomKind,
    RoomSummary, User, UserId,
};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
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
            session.query_unpaged(stmt, ()).await.map_err(unavailable)?;
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

struct Prepared {
    user_get: PreparedStatement,
    user_insert: PreparedStatement,
    user_update: PreparedStatement,
    user_seen: PreparedStatement,
    room_get: PreparedStatement,
    room_insert: PreparedStatement,
    room_cas: PreparedStatement,
    direct_claim: PreparedStatement,
    direct_get: PreparedStatement,
    member_insert: PreparedStatement,
    members_get: PreparedStatement,
    user_room_insert: PreparedStatement,
    user_rooms_get: PreparedStatement,
    msg_insert: PreparedStatement,
    ref_insert: PreparedStatement,
    ref_get: PreparedStatement,
    msg_get: PreparedStatement,
    page_desc: PreparedStatement,
    page_asc: PreparedStatement,
}

/// The ScyllaDB store.
pub struct ScyllaStore {
    session: Session,
    st: Prepared,
}

const USER_COLS: &str = "id, username, name, avatar, created_at, updated_at, last_seen";
const ROOM_COLS: &str =
    "id, kind, name, created_by, created_at, last_seq, last_message_id, last_activity";
const MSG_COLS: &str = "id, room, seq, sender, client_ref, body, created_at";

type UserRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    Option<i64>,
);
type RoomRow = (
    i64,
    String,
    Option<String>,
    String,
    i64,
    i64,
    Option<i64>,
    i64,
);
type MsgRow = (i64, i64, i64, String, Option<String>, String, i64);

fn user_of(r: UserRow) -> StoreResult<User> {
    Ok(User {
        profile: Profile {
            id: UserId::parse(&r.0).map_err(corrupt)?,
            username: r.1,
            name: r.2,
            avatar: r.3,
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
            kind: match r.1.as_str() {
                "direct" => RoomKind::Direct,
                "group" => RoomKind::Group,
                o => return Err(corrupt(format!("unknown room kind {o:?}"))),
            },
            name: r.2,
            created_by: UserId::parse(&r.3).map_err(corrupt)?,
            created_at: r.4,
            last_seq: super::u64_of(r.5),
            last_message_id: r.6.map(|v| MessageId(super::u64_of(v))),
        },
        r.7,
    ))
}

fn msg_of(r: MsgRow) -> StoreResult<Message> {
    let body: MessageBody = serde_json::from_str(&r.5).map_err(corrupt)?;
    Ok(Message {
        id: MessageId(super::u64_of(r.0)),
        room: RoomId(super::u64_of(r.1)),
        seq: super::u64_of(r.2),
        sender: UserId::parse(&r.3).map_err(corrupt)?,
        client_ref: r.4,
        body,
        created_at: r.6,
    })
}

/// Whether a lightweight transaction applied (its first column, `[applied]`).
fn applied(row: Option<Row>) -> bool {
    matches!(
        row.and_then(|r| r.columns.into_iter().next().flatten()),
        Some(CqlValue::Boolean(true))
    )
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
            user_insert: p("INSERT INTO users (id, username, name, avatar, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)".into()).await?,
            user_update: p("UPDATE users SET username = ?, name = ?, avatar = ?, updated_at = ? WHERE id = ?".into()).await?,
            user_seen: p("UPDATE users SET last_seen = ? WHERE id = ?".into()).await?,
            room_get: p(format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?")).await?,
            room_insert: p("INSERT INTO rooms (id, kind, name, created_by, created_at, last_seq, last_activity) VALUES (?, ?, ?, ?, ?, 0, ?)".into()).await?,
            room_cas: p("UPDATE rooms SET last_seq = ?, last_message_id = ?, last_activity = ? WHERE id = ? IF last_seq = ?".into()).await?,
            direct_claim: p("INSERT INTO direct_rooms (direct_key, room) VALUES (?, ?) IF NOT EXISTS".into()).await?,
            direct_get: p("SELECT room FROM direct_rooms WHERE direct_key = ?".into()).await?,
            member_insert: p("INSERT INTO members (room, user, role, joined_at) VALUES (?, ?, ?, ?)".into()).await?,
            members_get: p("SELECT user, role, joined_at FROM members WHERE room = ?".into()).await?,
            user_room_insert: p("INSERT INTO user_rooms (user, room) VALUES (?, ?)".into()).await?,
            user_rooms_get: p("SELECT room FROM user_rooms WHERE user = ?".into()).await?,
            msg_insert: p("INSERT INTO messages (room, bucket, id, seq, sender, client_ref, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)".into()).await?,
            ref_insert: p("INSERT INTO messages_by_ref (room, sender, client_ref, id) VALUES (?, ?, ?, ?)".into()).await?,
            ref_get: p("SELECT id FROM messages_by_ref WHERE room = ? AND sender = ? AND client_ref = ?".into()).await?,
            msg_get: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id = ?")).await?,
            page_desc: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id DESC LIMIT ?")).await?,
            page_asc: p(format!("SELECT {MSG_COLS} FROM messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id ASC LIMIT ?")).await?,
        };
        Ok(Self { session, st })
    }

    async fn rows<R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
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
        values: impl scylla::serialize::row::SerializeRow,
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

    async fn exec(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> StoreResult<()> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(unavailable)
            .map(|_| ())
    }

    async fn lwt(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> StoreResult<bool> {
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

    async fn room_with_activity(&self, id: RoomId) -> StoreResult<Option<(Room, i64)>> {
        self.rows::<RoomRow>(&self.st.room_get, (super::i64_of(id.0),))
            .await?
            .into_iter()
            .next()
            .map(room_of)
            .transpose()
    }

    async fn message(&self, room: RoomId, id: u64) -> StoreResult<Option<Message>> {
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
}

#[async_trait]
impl Store for ScyllaStore {
    async fn upsert_user(&self, p: &Profile, now: Millis) -> StoreResult<User> {
        match self.user(&p.id).await? {
            None => {
                self.exec(
                    &self.st.user_insert,
                    (p.id.as_str(), &p.username, &p.name, &p.avatar, now, now),
                )
                .await?;
                Ok(User {
                    profile: p.clone(),
                    created_at: now,
                    updated_at: now,
                    last_seen: None,
                })
            }
            Some(u) if &u.profile == p => Ok(u),
            Some(mut u) => {
                self.exec(
                    &self.st.user_update,
                    (&p.username, &p.name, &p.avatar, now, p.id.as_str()),
                )
                .await?;
                u.profile = p.clone();
                u.updated_at = now;
                Ok(u)
            }
        }
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
                Some(m) => self.message(id, m.0).await?,
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

    async fn append_messages(&self, room: RoomId, batch: Vec<Message>) -> StoreResult<()> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(());
        };
        let max_at = batch.iter().map(|m| m.created_at).max().unwrap_or(0);
        // Claim the sequence range: fails if another writer moved the room meanwhile.
        let claimed = self
            .lwt(
                &self.st.room_cas,
                (
                    super::i64_of(last.seq),
                    super::i64_of(last.id.0),
                    max_at,
                    super::i64_of(room.0),
                    super::i64_of(first.seq.saturating_sub(1)),
                ),
            )
            .await?;
        if !claimed {
            return Err(StoreError::Conflict(format!(
                "room {room} moved past seq {} (another writer)",
                first.seq.saturating_sub(1)
            )));
        }
        let mut b = Batch::new(BatchType::Logged);
        b.set_consistency(Consistency::LocalQuorum);
        let mut values = Vec::new();
        for m in &batch {
            let body = serde_json::to_string(&m.body).map_err(corrupt)?;
            b.append_statement(self.st.msg_insert.clone());
            values.push(MsgValues::Msg((
                super::i64_of(room.0),
                bucket_of(m.id.0),
                super::i64_of(m.id.0),
                super::i64_of(m.seq),
                m.sender.as_str().to_owned(),
                m.client_ref.clone(),
                body,
                m.created_at,
            )));
            if let Some(r) = &m.client_ref {
                b.append_statement(self.st.ref_insert.clone());
                values.push(MsgValues::Ref((
                    super::i64_of(room.0),
                    m.sender.as_str().to_owned(),
                    r.clone(),
                    super::i64_of(m.id.0),
                )));
            }
        }
        let mut last_err = None;
        for _ in 0..3 {
            match self.session.batch(&b, &values).await {
                Ok(_) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
        }
        Err(unavailable(format!(
            "messages of room {room} not written: {last_err:?}"
        )))
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
                && let Some(m) = self.message(room, super::u64_of(id)).await?
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
        let first_bucket = bucket_of(r.id.0.min(r.last_message_id.map_or(r.id.0, |m| m.0)));
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

    async fn close(&self) -> StoreResult<()> {
        Ok(())
    }
}

type MsgTuple = (i64, i32, i64, i64, String, Option<String>, String, i64);
type RefTuple = (i64, String, String, i64);

/// A batch's per-statement values: a message row or an idempotency row.
enum MsgValues {
    Msg(MsgTuple),
    Ref(RefTuple),
}

impl scylla::serialize::row::SerializeRow for MsgValues {
    fn serialize(
        &self,
        ctx: &scylla::serialize::row::RowSerializationContext<'_>,
        writer: &mut scylla::serialize::writers::RowWriter,
    ) -> Result<(), scylla::serialize::SerializationError> {
        match self {
            MsgValues::Msg(t) => t.serialize(ctx, writer),
            MsgValues::Ref(t) => t.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
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
