//! The embedded store: SQLite (through `rusqlite`, bundled), the default for `palaver serve`.
//!
//! Why SQLite: it is the most proven embedded engine there is, its write-ahead log with
//! `synchronous=FULL` makes a committed transaction survive `kill -9` and power loss, and SQL
//! indexes give every query the later issues need (history pages, unread counts, lookups by
//! username) without hand-built secondary indexes as a key-value engine would need.
//!
//! Concurrency: one writer thread owns the write connection and does **group commit**: it takes
//! every write waiting in its queue (up to [`MAX_BATCH`]), runs each inside its own savepoint of
//! one transaction, commits once (one fsync), then answers all of them. Under load the batch
//! grows and the cost of the fsync is shared; idle, a write commits alone at once. Reads run on
//! a small pool of read connections (WAL lets them run beside the writer) on the blocking pool.

use super::{HistoryPage, NewRoom, Store, StoreError, StoreResult};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use schema::{
    HistoryQuery, Member, Message, MessageBody, MessageId, Millis, Profile, Room, RoomId,
    RoomSummary, User, UserId,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 1024;
const READERS: usize = 4;
const QUEUE: usize = 8192;

/// How hard a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: survives process crash and power loss (default).
    Full,
    /// fsync at checkpoints only: survives a process crash (`kill -9`), may lose the last
    /// commits on power loss.
    Normal,
}

enum WriteOp {
    UpsertUser(Profile, Millis),
    SetLastSeen(UserId, Millis),
    CreateRoom(NewRoom),
    GetOrCreateDirect(NewRoom),
    Append(RoomId, Vec<Message>),
}

enum WriteOut {
    User(Box<User>),
    Unit,
    Direct(Box<Room>, bool),
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<StoreResult<WriteOut>>,
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    writer: Mutex<Option<mpsc::Sender<WriteJob>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Vec<Mutex<Connection>>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database `palaver.db` in `dir` and migrates it.
    pub fn open(dir: &Path, durability: Durability) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let path = dir.join("palaver.db");
        let mut conn = open_conn(&path, durability)?;
        migrate(&mut conn)?;
        let readers = (0..READERS)
            .map(|_| open_conn(&path, durability).map(Mutex::new))
            .collect::<StoreResult<Vec<_>>>()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("palaver-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| unavailable(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            readers: Arc::new(readers),
        })
    }

    async fn write(&self, op: WriteOp) -> StoreResult<WriteOut> {
        let tx = self.writer.lock().clone().ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(WriteJob { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        if self.writer.lock().is_none() {
            return Err(StoreError::Closed);
        }
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            // Take a free connection if there is one, else wait on one.
            let guard = readers
                .iter()
                .find_map(|c| c.try_lock())
                .unwrap_or_else(|| readers[fastrand_index(readers.len())].lock());
            f(&guard).map_err(db_err)
        })
        .await
        .map_err(|e| unavailable(format!("read task failed: {e}")))?
    }
}

fn fastrand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(std::thread::current().id()) as usize) % n.max(1)
}

fn unavailable(msg: String) -> StoreError {
    StoreError::Unavailable(msg)
}

fn db_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, ref msg)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(msg.clone().unwrap_or_else(|| f.to_string()))
        }
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
            StoreError::Corrupt(e.to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn open_conn(path: &PathBuf, durability: Durability) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout=10000;
         PRAGMA foreign_keys=ON; PRAGMA cache_size=-16000;"
    ))
    .map_err(db_err)?;
    Ok(conn)
}

/// Ordered migrations; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username TEXT,
    name TEXT,
    avatar TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seen INTEGER
) WITHOUT ROWID;
CREATE INDEX users_username ON users(username);
CREATE TABLE rooms (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    direct_key TEXT UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_message_id INTEGER,
    last_activity INTEGER NOT NULL
);
CREATE TABLE members (
    room INTEGER NOT NULL REFERENCES rooms(id),
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user, room);
CREATE TABLE messages (
    room INTEGER NOT NULL,
    id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    client_ref TEXT,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_seq ON messages(room, seq);
CREATE UNIQUE INDEX messages_by_client_ref ON messages(room, sender, client_ref)
    WHERE client_ref IS NOT NULL;
"#];

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let done: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    if done > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {done} is newer than this binary ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    Ok(())
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteJob>) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &batch);
        for (job, res) in batch.drain(..).zip(results) {
            // A caller that went away no longer needs its answer; the write stands.
            if job.reply.send(res).is_err() {
                tracing::debug!("store writer: caller dropped before the commit finished");
            }
        }
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "store: final checkpoint failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "store: close failed");
    }
}

fn commit_batch(conn: &mut Connection, batch: &[WriteJob]) -> Vec<StoreResult<WriteOut>> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return batch.iter().map(|_| Err(db_err_ref(&e))).collect(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let res = match tx.savepoint() {
            Ok(mut sp) => match apply(&mut sp, &job.op) {
                Ok(out) => sp.commit().map(|()| out).map_err(db_err),
                Err(e) => Err(e), // dropping the savepoint rolls it back
            },
            Err(e) => Err(db_err(e)),
        };
        results.push(res);
    }
    if let Err(e) = tx.commit() {
        tracing::error!(error = %e, "store: group commit failed");
        return batch.iter().map(|_| Err(db_err_ref(&e))).collect();
    }
    results
}

fn db_err_ref(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn apply(tx: &mut rusqlite::Savepoint<'_>, op: &WriteOp) -> StoreResult<WriteOut> {
    match op {
        WriteOp::UpsertUser(p, now) => {
            tx.prepare_cached(
                "INSERT INTO users (id, username, name, avatar, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(id) DO UPDATE SET username=excluded.username, name=excluded.name,
                   avatar=excluded.avatar, updated_at=excluded.updated_at
                 WHERE users.username IS NOT excluded.username OR users.name IS NOT excluded.name
                   OR users.avatar IS NOT excluded.avatar",
            )
            .and_then(|mut s| s.execute(params![p.id.as_str(), p.username, p.name, p.avatar, now]))
            .map_err(db_err)?;
            let user = tx
                .query_row(
                    &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                    [p.id.as_str()],
                    user_row,
                )
                .map_err(db_err)?;
            Ok(WriteOut::User(Box::new(user)))
        }
        WriteOp::SetLastSeen(id, at) => {
            tx.prepare_cached("UPDATE users SET last_seen = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id.as_str(), at]))
                .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::CreateRoom(new) => {
            insert_room(tx, new, None)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::GetOrCreateDirect(new) => {
            let [a, b] = match new.members.as_slice() {
                [a, b] => [&a.user, &b.user],
                _ => return Err(StoreError::Conflict("a direct room has two members".into())),
            };
            let key = super::direct_key(a, b);
            let existing = tx
                .query_row(
                    &format!("SELECT {ROOM_COLS} FROM rooms WHERE direct_key = ?1"),
                    [&key],
                    room_row,
                )
                .optional()
                .map_err(db_err)?;
            match existing {
                Some(room) => Ok(WriteOut::Direct(Box::new(room), false)),
                None => {
                    insert_room(tx, new, Some(&key))?;
                    Ok(WriteOut::Direct(Box::new(new.room.clone()), true))
                }
            }
        }
        WriteOp::Append(room, msgs) => {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO messages (room, id, seq, sender, client_ref, body, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(db_err)?;
            let (mut last_seq, mut last_id, mut last_at) = (0u64, 0u64, 0i64);
            for m in msgs {
                let body = serde_json::to_string(&m.body)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                ins.execute(params![
                    room.0 as i64,
                    m.id.0 as i64,
                    m.seq as i64,
                    m.sender.as_str(),
                    m.client_ref,
                    body,
                    m.created_at
                ])
                .map_err(db_err)?;
                last_seq = last_seq.max(m.seq);
                last_id = last_id.max(m.id.0);
                last_at = last_at.max(m.created_at);
            }
            drop(ins);
            tx.prepare_cached(
                "UPDATE rooms SET last_seq = max(last_seq, ?2),
                   last_message_id = max(coalesce(last_message_id, 0), ?3),
                   last_activity = max(last_activity, ?4) WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    room.0 as i64,
                    last_seq as i64,
                    last_id as i64,
                    last_at
                ])
            })
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
    }
}

fn insert_room(
    tx: &rusqlite::Savepoint<'_>,
    new: &NewRoom,
    direct_key: Option<&str>,
) -> StoreResult<()> {
    let r = &new.room;
    tx.prepare_cached(
        "INSERT INTO rooms (id, kind, name, created_by, created_at, direct_key, last_activity)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            r.id.0 as i64,
            super::kind_str(r.kind),
            r.name,
            r.created_by.as_str(),
            r.created_at,
            direct_key
        ])
    })
    .map_err(db_err)?;
    let mut ins = tx
        .prepare_cached("INSERT INTO members (room, user, role, joined_at) VALUES (?1, ?2, ?3, ?4)")
        .map_err(db_err)?;
    for m in &new.members {
        ins.execute(params![
            r.id.0 as i64,
            m.user.as_str(),
            super::role_str(m.role),
            m.joined_at
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

const USER_COLS: &str = "id, username, name, avatar, created_at, updated_at, last_seen";
const ROOM_COLS: &str = "id, kind, name, created_by, created_at, last_seq, last_message_id";
const MSG_COLS: &str = "id, room, seq, sender, client_ref, body, created_at";

fn user_id(s: String) -> rusqlite::Result<UserId> {
    UserId::parse(&s).map_err(|e| conv(e.to_string()))
}

fn conv(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, msg.into())
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        profile: Profile {
            id: user_id(r.get(0)?)?,
            username: r.get(1)?,
            name: r.get(2)?,
            avatar: r.get(3)?,
        },
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        last_seen: r.get(6)?,
    })
}

fn room_row(r: &Row<'_>) -> rusqlite::Result<Room> {
    let kind: String = r.get(1)?;
    Ok(Room {
        id: RoomId(r.get::<_, i64>(0)? as u64),
        kind: match super::parse_kind(&kind) {
            Some(k) => k,
            None => return Err(conv(format!("unknown room kind {:?}", kind))),
        },
        name: r.get(2)?,
        created_by: user_id(r.get(3)?)?,
        created_at: r.get(4)?,
        last_seq: r.get::<_, i64>(5)? as u64,
        last_message_id: r.get::<_, Option<i64>>(6)?.map(|v| MessageId(v as u64)),
    })
}

fn member_row(r: &Row<'_>) -> rusqlite::Result<Member> {
    let role: String = r.get(1)?;
    Ok(Member {
        user: user_id(r.get(0)?)?,
        role: match super::parse_role(&role) {
            Some(r) => r,
            None => return Err(conv(format!("unknown role {:?}", role))),
        },
        joined_at: r.get(2)?,
    })
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    let body: String = r.get(5)?;
    let body: MessageBody = serde_json::from_str(&body).map_err(|e| conv(e.to_string()))?;
    Ok(Message {
        id: MessageId(r.get::<_, i64>(0)? as u64),
        room: RoomId(r.get::<_, i64>(1)? as u64),
        seq: r.get::<_, i64>(2)? as u64,
        sender: user_id(r.get(3)?)?,
        body,
        client_ref: r.get(4)?,
        created_at: r.get(6)?,
    })
}

fn members_of(c: &Connection, room: RoomId) -> rusqlite::Result<Vec<Member>> {
    let mut st = c.prepare_cached(
        "SELECT user, role, joined_at FROM members WHERE room = ?1 ORDER BY joined_at, user",
    )?;
    st.query_map([room.0 as i64], member_row)?.collect()
}

fn message_by_id(c: &Connection, room: RoomId, id: MessageId) -> rusqlite::Result<Option<Message>> {
    c.prepare_cached(&format!(
        "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND id = ?2"
    ))?
    .query_row(params![room.0 as i64, id.0 as i64], message_row)
    .optional()
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn upsert_user(&self, profile: &Profile, now: Millis) -> StoreResult<User> {
        match self
            .write(WriteOp::UpsertUser(profile.clone(), now))
            .await?
        {
            WriteOut::User(u) => Ok(*u),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        let id = id.clone();
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"))?
                .query_row([id.as_str()], user_row)
                .optional()
        })
        .await
    }

    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()> {
        self.write(WriteOp::SetLastSeen(id.clone(), at))
            .await
            .map(|_| ())
    }

    async fn create_room(&self, new: NewRoom) -> StoreResult<()> {
        self.write(WriteOp::CreateRoom(new)).await.map(|_| ())
    }

    async fn get_or_create_direct(&self, candidate: NewRoom) -> StoreResult<(Room, bool)> {
        match self.write(WriteOp::GetOrCreateDirect(candidate)).await? {
            WriteOut::Direct(room, created) => Ok((*room, created)),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn room(&self, id: RoomId) -> StoreResult<Option<Room>> {
        self.read(move |c| {
            c.prepare_cached(&format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?1"))?
                .query_row([id.0 as i64], room_row)
                .optional()
        })
        .await
    }

    async fn members(&self, room: RoomId) -> StoreResult<Vec<Member>> {
        self.read(move |c| members_of(c, room)).await
    }

    async fn room_ids_of(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        let user = user.clone();
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT room FROM members WHERE user = ?1")?;
            st.query_map([user.as_str()], |r| Ok(RoomId(r.get::<_, i64>(0)? as u64)))?
                .collect()
        })
        .await
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomSummary>> {
        let user = user.clone();
        self.read(move |c| {
            let rooms: Vec<Room> = c
                .prepare_cached(
                    "SELECT r.id, r.kind, r.name, r.created_by, r.created_at, r.last_seq,
                            r.last_message_id
                     FROM members m JOIN rooms r ON r.id = m.room
                     WHERE m.user = ?1 ORDER BY r.last_activity DESC, r.id DESC",
                )?
                .query_map([user.as_str()], room_row)?
                .collect::<rusqlite::Result<_>>()?;
            rooms
                .into_iter()
                .map(|room| {
                    let members = members_of(c, room.id)?;
                    let last_message = match room.last_message_id {
                        Some(id) => message_by_id(c, room.id, id)?,
                        None => None,
                    };
                    Ok(RoomSummary {
                        room,
                        members,
                        last_message,
                    })
                })
                .collect()
        })
        .await
    }

    async fn append_messages(&self, room: RoomId, batch: Vec<Message>) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Append(room, batch)).await.map(|_| ())
    }

    async fn messages_by_client_ref(
        &self,
        room: RoomId,
        keys: Vec<(UserId, String)>,
    ) -> StoreResult<Vec<Message>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND sender = ?2 AND client_ref = ?3"
            ))?;
            let mut found = Vec::new();
            for (sender, cref) in &keys {
                if let Some(m) = st
                    .query_row(params![room.0 as i64, sender.as_str(), cref], message_row)
                    .optional()?
                {
                    found.push(m);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn history(
        &self,
        room: RoomId,
        query: &HistoryQuery,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        let q = query.clone();
        self.read(move |c| {
            let lo = q.after.map_or(0, |m| m.0 as i64);
            let hi = q.before.map_or(i64::MAX, |m| m.0 as i64);
            let fetch = i64::from(limit) + 1;
            let ascending = q.after.is_some();
            let sql = if ascending {
                format!(
                    "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND id > ?2 AND id < ?3
                     ORDER BY id ASC LIMIT ?4"
                )
            } else {
                format!(
                    "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND id > ?2 AND id < ?3
                     ORDER BY id DESC LIMIT ?4"
                )
            };
            let mut messages: Vec<Message> = c
                .prepare_cached(&sql)?
                .query_map(params![room.0 as i64, lo, hi, fetch], message_row)?
                .collect::<rusqlite::Result<_>>()?;
            let has_more = messages.len() as i64 > i64::from(limit);
            messages.truncate(limit as usize);
            if ascending {
                messages.reverse();
            }
            Ok(HistoryPage { messages, has_more })
        })
        .await
    }

    async fn close(&self) -> StoreResult<()> {
        // Dropping the last sender lets the writer finish its queue, checkpoint and exit.
        drop(self.writer.lock().take());
        let thread = self.thread.lock().take();
        if let Some(t) = thread {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .map_err(|_| unavailable("store writer thread panicked".into()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        super::super::conformance::run_all(store.clone()).await;
        store.close().await.expect("close");
        assert!(matches!(
            store.room(RoomId(1)).await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("open");
        let room = super::super::conformance::seed_room(&store, 77).await;
        super::super::conformance::append_n(&store, room, 1, 10).await;
        store.close().await.expect("close");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("reopen");
        let page = store
            .history(room, &HistoryQuery::default(), 100)
            .await
            .expect("history");
        assert_eq!(page.messages.len(), 10);
        assert_eq!(
            store.room(room).await.expect("room").map(|r| r.last_seq),
            Some(10)
        );
    }

    #[tokio::test]
    async fn group_commit_batches_concurrent_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let room = super::super::conformance::seed_room(&*store, 1000 + i).await;
                super::super::conformance::append_n(&*store, room, 1, 5).await;
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let page = store
            .history(RoomId(1199), &HistoryQuery::default(), 10)
            .await
            .expect("h");
        assert_eq!(page.messages.len(), 5);
    }
}
