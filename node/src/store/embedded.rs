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
//! grows and the cost of the fsync is shared; idle, a write commits alone at once. Background
//! writes (a user's last-seen time, written when their last session ends) wait in a queue of
//! their own and join a transaction only [`BG_BATCH`] at a time, after every waiting foreground
//! write: ten thousand sessions dropped at once must not put ten thousand writes ahead of the
//! next chat message (it would wait for all of them). Reads run on
//! a small pool of read connections (WAL lets them run beside the writer) on the blocking pool.

use super::{HistoryPage, NewRoom, RoomWrite, Store, StoreError, StoreResult};
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use schema::{
    DeadLetter, Device, Event, Friendship, FriendshipStatus, HistoryQuery, Member, Message,
    MessageContent, MessageId, Millis, Notification, Platform, Profile, Room, RoomId, RoomSummary,
    Upload, User, UserId,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Most background writes (last-seen times, pending notifications) in one transaction.
pub const BG_BATCH: usize = 128;
/// Most runs of pending notifications written in one transaction when the buffer is flushed
/// (see [`PendingBuffer`]): a foreground write waits for one part at most.
const PENDING_PART: usize = 128;
/// Pending notifications wait in memory at most this long before they are written.
const PENDING_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Buffered last-seen times wait at most this long before they are written.
const SEEN_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Most last-seen times written in one transaction.
const SEEN_PART: usize = 1024;
/// Buffered pending notifications beyond which they are written at once.
const PENDING_FLUSH_ROWS: usize = 16_384;
const READERS: usize = 4;
const QUEUE: usize = 8192;
/// Most dead letters kept: adding one beyond this removes the oldest.
pub const DEAD_LETTER_CAP: u32 = 10_000;

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
    CreateRoom(NewRoom),
    GetOrCreateDirect(NewRoom),
    ApplyRoom(RoomId, Box<RoomWrite>),
    SetRead(RoomId, UserId, MessageId),
    PutFriendship(Box<Friendship>),
    DeleteFriendship(UserId, UserId),
    SetBlock(UserId, UserId, bool),
    /// Notifications (references to their messages); kept at most `cap` per user.
    AddPending(Vec<(UserId, NoteRef)>, u32),
    TakePending(UserId),
    AddUpload(Box<Upload>),
    AddMediaPost(String, RoomId),
    AddDevice(Box<Device>),
    /// Removes a device token: only `user`'s when set, else whoever's.
    RemoveDevice(Option<UserId>, String),
    SetMuted(RoomId, UserId, bool),
    AddDeadLetter(Box<DeadLetter>),
}

impl WriteOp {
    /// Background work yields to the foreground: pending notifications (adding and taking
    /// them share the queue, so a take sees every add queued before it).
    fn background(&self) -> bool {
        matches!(self, Self::AddPending(..) | Self::TakePending(..))
    }
}

enum WriteOut {
    User(Box<User>),
    Unit,
    Direct(Box<Room>, bool),
    Pending(Vec<Notification>),
    Removed(bool),
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<StoreResult<WriteOut>>,
}

/// The writer thread's two queues: foreground writes, and background ones that yield to them.
#[derive(Clone)]
struct Queues {
    fg: mpsc::Sender<WriteJob>,
    bg: mpsc::Sender<WriteJob>,
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    writer: Mutex<Option<Queues>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    /// One permit per read connection: a read waits for one here, on the async side, before
    /// it takes a thread of the blocking pool.
    read_slots: tokio::sync::Semaphore,
    /// The checkpointer thread and its signal.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<Checkpoint>, JoinHandle<()>)>>,
    /// Last-seen times not written yet (see [`LastSeenBuffer`]); reads see them.
    seen: Arc<LastSeenBuffer>,
}

/// What the checkpointer is told.
enum Checkpoint {
    /// The writer's log passed [`WAL_RESTART_PAGES`]: copy it now, not at the next tick.
    Now,
    /// Stop (also when every sender is gone).
    Stop,
}

thread_local! {
    /// Pages in the write-ahead log after the last commit on this thread (SQLite's WAL hook
    /// runs on the committing thread; on the writer's, it tells the writer how long the log is).
    static LOG_PAGES: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook: notes the log's length after each commit.
fn note_log_pages(_wal: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    LOG_PAGES.with(|p| p.set(i64::from(pages)));
    Ok(())
}

/// Write-ahead log pages (4 KB) past which the checkpointer restarts the log.
const WAL_RESTART_PAGES: i64 = 4096;
/// Write-ahead log pages past which the checkpointer warns that it cannot keep up.
const WAL_WARN_PAGES: i64 = 64 * 1024;
/// Longest wait of the writer's restarting checkpoint for readers still in the log, during
/// which new writes wait too.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(5);
/// How long a connection waits for a lock another holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the checkpointer copies the write-ahead log into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Most often the writer calls the checkpointer ahead of its tick.
const CHECKPOINT_SOONEST: std::time::Duration = std::time::Duration::from_millis(20);

/// Copies the write-ahead log into the database file every [`CHECKPOINT_EVERY`], on a
/// connection and thread of its own, until `stop` is dropped. SQLite's automatic checkpoint
/// runs inside the commit that crosses 1,000 WAL pages, on the writer's thread: the writes
/// queued behind that commit waited for the copy and its fsync (tens of ms under a write-heavy
/// load). A passive checkpoint runs beside the writer and never blocks it; the log restarts
/// from its beginning at the first commit after a checkpoint that copied all of it.
///
/// Between ticks, the writer calls it as soon as the log passes [`WAL_RESTART_PAGES`] (it
/// learns the log's length from SQLite's WAL hook at each commit): at 20,000 pages a second
/// of writes, 500 ms between checkpoints let the log reach 11,000 pages (45 MB) before each
/// restart.
fn checkpointer(
    conn: Connection,
    signal: std::sync::mpsc::Receiver<Checkpoint>,
    restart: &AtomicBool,
) {
    let took = metrics::histogram!("palaver_store_checkpoint_seconds");
    let pages = metrics::gauge!("palaver_store_wal_pages");
    let mut warned = false;
    while let Ok(Checkpoint::Now) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        signal.recv_timeout(CHECKPOINT_EVERY)
    {
        let started = std::time::Instant::now();
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, copied)) => {
                pages.set(log as f64);
                if log > 0 {
                    took.record(started.elapsed());
                    tracing::trace!(log, copied, "store: checkpoint");
                }
                // The log restarts from its beginning only at a write that finds all of it
                // copied: under a steady stream of writes, one always lands between a passive
                // checkpoint and the next write, and the log would grow without end. Past a
                // bound, the writer restarts it itself, between two transactions (see
                // `restart_log`).
                if log >= WAL_RESTART_PAGES {
                    restart.store(true, Ordering::Relaxed);
                }
                if log > WAL_WARN_PAGES && copied < log && !warned {
                    tracing::warn!(log, copied, "store: the write-ahead log keeps growing");
                }
                warned = log > WAL_WARN_PAGES;
            }
            Err(e) => tracing::warn!(error = %e, "store: checkpoint failed"),
        }
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database `palaver.db` in `dir` and migrates it.
    pub fn open(dir: &Path, durability: Durability) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let path = dir.join("palaver.db");
        let mut conn = open_conn(&path, durability)?;
        migrate(&mut conn)?;
        // The checkpointer copies the log, not the committing writer (see `checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db_err)?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let ckpt = open_conn(&path, durability)?;
        let restart = Arc::new(AtomicBool::new(false));
        let wanted = restart.clone();
        let checkpointer = std::thread::Builder::new()
            .name("palaver-store-checkpoint".into())
            .spawn(move || checkpointer(ckpt, stopped, &wanted))
            .map_err(|e| unavailable(format!("cannot start the checkpoint thread: {e}")))?;
        let readers = (0..READERS)
            .map(|_| open_conn(&path, durability).map(Mutex::new))
            .collect::<StoreResult<Vec<_>>>()?;
        let (fg, fg_rx) = mpsc::channel(QUEUE);
        let (bg, bg_rx) = mpsc::channel(QUEUE);
        let seen = Arc::new(LastSeenBuffer::default());
        let thread = std::thread::Builder::new()
            .name("palaver-store-writer".into())
            .spawn({
                let signal = stop.clone();
                let seen = seen.clone();
                move || writer_loop(conn, durability, fg_rx, bg_rx, &restart, &signal, &seen)
            })
            .map_err(|e| unavailable(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            writer: Mutex::new(Some(Queues { fg, bg })),
            thread: Mutex::new(Some(thread)),
            readers: Arc::new(readers),
            read_slots: tokio::sync::Semaphore::new(READERS),
            checkpointer: Mutex::new(Some((stop, checkpointer))),
            seen,
        })
    }

    /// `user` with the newest last-seen time: the stored one or a buffered one.
    fn seen_in(&self, mut user: User) -> User {
        let buffered = self.seen.get(&user.profile.id);
        user.last_seen = user.last_seen.max(buffered);
        user
    }

    async fn write(&self, op: WriteOp) -> StoreResult<WriteOut> {
        let queues = self.writer.lock().clone().ok_or(StoreError::Closed)?;
        let tx = if op.background() {
            queues.bg
        } else {
            queues.fg
        };
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
        // A storm of reads (ten thousand sessions closing at once, each reading its presence
        // audience) would otherwise start a blocking thread per read, hundreds of them, all
        // but `READERS` parked on a connection's lock: thread churn that takes the cores from
        // the async workers serving everyone else. Waiting here costs nothing.
        let _slot = self
            .read_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
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
            let msg = msg.clone().unwrap_or_else(|| f.to_string());
            // "UNIQUE constraint failed: messages.room, messages.sender, messages.client_ref"
            if msg.contains("messages.client_ref") {
                StoreError::DuplicateRef(msg)
            } else {
                StoreError::Conflict(msg)
            }
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
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA busy_timeout={};
         PRAGMA foreign_keys=ON; PRAGMA cache_size=-16000; PRAGMA temp_store=MEMORY;",
        BUSY_TIMEOUT.as_millis()
    ))
    .map_err(db_err)?;
    Ok(conn)
}

/// Ordered migrations; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    r#"
ALTER TABLE rooms ADD COLUMN avatar TEXT;
ALTER TABLE rooms ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
CREATE TABLE room_log (
    room INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE TABLE read_markers (
    room INTEGER NOT NULL,
    user TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE friendships (
    lo TEXT NOT NULL,
    hi TEXT NOT NULL,
    requester TEXT NOT NULL,
    addressee TEXT NOT NULL,
    status INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (lo, hi)
) WITHOUT ROWID;
CREATE INDEX friendships_by_hi ON friendships(hi, lo);
CREATE TABLE blocks (
    blocker TEXT NOT NULL,
    blocked TEXT NOT NULL,
    PRIMARY KEY (blocker, blocked)
) WITHOUT ROWID;
CREATE INDEX blocks_by_blocked ON blocks(blocked, blocker);
CREATE TABLE pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX pending_by_user ON pending(user, id);
"#,
    r#"
ALTER TABLE users ADD COLUMN language TEXT;
"#,
    r#"
CREATE TABLE uploads (
    path TEXT PRIMARY KEY,
    uploader TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE media_posts (
    path TEXT NOT NULL,
    room INTEGER NOT NULL,
    PRIMARY KEY (path, room)
) WITHOUT ROWID;
CREATE TABLE devices (
    token TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    platform TEXT NOT NULL,
    device_id TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX devices_by_user ON devices(user, created_at);
CREATE TABLE mutes (
    room INTEGER NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    job TEXT NOT NULL,
    device_token TEXT,
    provider TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL
);
CREATE INDEX dead_letters_by_at ON dead_letters(at, id);
"#,
    // Pending notifications numbered per user, clustered by (user, seq): adding one and
    // dropping the oldest are index seeks, not a walk over the user's kept ones.
    r#"
CREATE TABLE pending_v2 (
    user TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
INSERT INTO pending_v2 (user, seq, body) SELECT user, id, body FROM pending;
DROP TABLE pending;
ALTER TABLE pending_v2 RENAME TO pending;
"#,
    // Pending notifications as runs of references to their messages (see `PendingBuffer`);
    // the `pending` table keeps those written before, until their users take them.
    r#"
CREATE TABLE pending_runs (
    user TEXT NOT NULL,
    room INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    cap INTEGER NOT NULL,
    PRIMARY KEY (user, room, first_seq)
) WITHOUT ROWID;
"#,
];

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

/// Last-seen times on their way to the `users` table.
///
/// A user's last-seen time is written when their last session ends. Written one commit per
/// disconnect, with its fsync, a storm of 10,000 dropped connections was about 1,000 small
/// transactions in 0.7 s, each rewriting the pages of the users it touched: tens of megabytes
/// of log, and chat commits beside them waited up to 95 ms for their fsync. So the time goes
/// into this buffer, which reads see at once (`EmbeddedStore::seen_in`), and the writer writes
/// what it holds at most [`SEEN_FLUSH_AFTER`] later, [`SEEN_PART`] users per transaction in
/// the order of the table, when no chat write waits (or with one, once overdue), without an
/// fsync of its own: the next chat commit's covers it. A crash loses at most the last second's
/// times (its users are all offline afterwards anyway); closing the store writes them all.
/// A written time stays here until the flush after, so that a read whose snapshot predates its
/// commit still sees it.
#[derive(Default)]
struct LastSeenBuffer {
    times: Mutex<std::collections::HashMap<UserId, SeenTime>>,
}

#[derive(Clone, Copy)]
struct SeenTime {
    at: Millis,
    written: bool,
}

impl LastSeenBuffer {
    fn note(&self, user: &UserId, at: Millis) {
        let mut times = self.times.lock();
        let t = times
            .entry(user.clone())
            .or_insert(SeenTime { at, written: false });
        if at >= t.at {
            *t = SeenTime { at, written: false };
        }
        metrics::gauge!("palaver_store_last_seen_buffered").set(times.len() as f64);
    }

    fn get(&self, user: &UserId) -> Option<Millis> {
        self.times.lock().get(user).map(|t| t.at)
    }

    /// Drops what was written by the flush before (unless noted again since), then answers up
    /// to `n` times not written yet, in the table's order.
    fn part(&self, n: usize) -> Vec<(UserId, Millis)> {
        let mut times = self.times.lock();
        times.retain(|_, t| !t.written);
        metrics::gauge!("palaver_store_last_seen_buffered").set(times.len() as f64);
        let mut out: Vec<(UserId, Millis)> = times
            .iter()
            .filter(|(_, t)| !t.written)
            .take(n)
            .map(|(u, t)| (u.clone(), t.at))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Marks `part` written, where nothing newer was noted meanwhile.
    fn written(&self, part: &[(UserId, Millis)]) {
        let mut times = self.times.lock();
        for (user, at) in part {
            if let Some(t) = times.get_mut(user)
                && t.at == *at
            {
                t.written = true;
            }
        }
    }

    /// How many times are not written yet.
    fn unwritten(&self) -> usize {
        self.times.lock().values().filter(|t| !t.written).count()
    }
}

/// When the writer next writes the buffered last-seen times, and whether it is at it.
struct SeenFlush {
    next: std::time::Instant,
    /// Times are left over from a part: the next part goes as soon as the writer can.
    more: bool,
}

impl SeenFlush {
    fn new() -> Self {
        Self {
            next: std::time::Instant::now() + SEEN_FLUSH_AFTER,
            more: false,
        }
    }

    fn due(&self) -> bool {
        self.more || std::time::Instant::now() >= self.next
    }

    /// Past its time by a whole period: the foreground never left the writer idle.
    fn overdue(&self) -> bool {
        std::time::Instant::now() >= self.next + SEEN_FLUSH_AFTER
    }

    /// The part to write now (empty when none is due), and when the next is due.
    fn take(&mut self, buffer: &LastSeenBuffer) -> Vec<(UserId, Millis)> {
        let part = buffer.part(SEEN_PART);
        self.more = part.len() == SEEN_PART;
        if !self.more {
            self.next = std::time::Instant::now() + SEEN_FLUSH_AFTER;
        }
        part
    }
}

/// Pending notifications on their way to the `pending_runs` table.
///
/// A message to a room leaves a pending notification for each offline member: a flood into a
/// room of 500 offline members is 500 of them per message. Stored as one row per member and
/// message (with its preview), that was 12,000 rows inserted, and as many trimmed, a second,
/// each user's clustered together: megabytes of log a second, whose pages a chat commit's
/// fsync then waited for (stalls of 70 to 130 ms under such a flood).
///
/// So a notification is stored as a reference to its message, and references as runs: a user
/// who missed messages `first..=last` of a room, one after the other, is one row `(user, room,
/// first, last)`. A flood then rewrites one small row per member and flush. Taking reads the
/// messages themselves: the notification shows a message as it is then (an edit shows the new
/// text; a deleted message is left out). A user who was online for one of the messages, or
/// sent it, is not pending for it, so the run breaks there: runs hold exactly the messages
/// each user missed.
///
/// The writer keeps new ones in memory and writes them at most [`PENDING_FLUSH_AFTER`] later
/// (or at once past [`PENDING_FLUSH_ROWS`] notifications): a user's run is then rewritten once
/// per flush, not once per message. Each run keeps its newest `cap` messages and each user
/// their `cap` newest runs; taking keeps the newest `cap` of what they hold. A flush goes in
/// parts of [`PENDING_PART`] runs, one per transaction, so foreground writes are not held up.
/// Taking a user's notifications takes the buffered ones too; closing the store writes them
/// all. A crash loses at most the last second's pending notifications (never a message).
#[derive(Default)]
struct PendingBuffer {
    users: std::collections::HashMap<UserId, Buffered>,
    /// Notifications buffered, over all users and runs.
    rows: usize,
    /// When the oldest buffered notification came.
    since: Option<std::time::Instant>,
    /// A flush is under way, since then: a part is written whenever the writer has nothing
    /// else to do, and, once the flush is overdue, with every transaction, until the buffer is
    /// empty.
    flushing: Option<std::time::Instant>,
}

/// A pending notification: its message's room, position and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NoteRef {
    room: RoomId,
    seq: u64,
    at: Millis,
}

/// Consecutive messages `first..=last` of a room, pending for one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    room: RoomId,
    first: u64,
    last: u64,
    /// When the last one was accepted.
    last_at: Millis,
}

impl Run {
    fn len(&self) -> usize {
        usize::try_from(self.last - self.first + 1).unwrap_or(usize::MAX)
    }
}

/// One user's buffered runs, in the order they began, and how many notifications to keep.
struct Buffered {
    runs: Vec<Run>,
    cap: usize,
}

impl Buffered {
    /// Adds `note`, as the next of its room's run or the first of a new one; a run keeps its
    /// newest `cap`, and the user their newest `cap` runs. Answers the change in how many
    /// notifications are held.
    fn push(&mut self, note: NoteRef) -> isize {
        let before = self.held();
        match self.runs.iter_mut().rev().find(|r| r.room == note.room) {
            Some(run) if run.last.checked_add(1) == Some(note.seq) => {
                run.last = note.seq;
                run.last_at = note.at;
                let cap = u64::try_from(self.cap.max(1)).unwrap_or(u64::MAX);
                run.first = run.first.max(run.last.saturating_sub(cap - 1));
            }
            _ => self.runs.push(Run {
                room: note.room,
                first: note.seq,
                last: note.seq,
                last_at: note.at,
            }),
        }
        while self.runs.len() > self.cap.max(1) {
            let oldest = self
                .runs
                .iter()
                .enumerate()
                .min_by_key(|(_, r)| (r.last_at, r.room, r.last))
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                self.runs.remove(i);
            }
        }
        isize::try_from(self.held()).unwrap_or(isize::MAX)
            - isize::try_from(before).unwrap_or(isize::MAX)
    }

    fn held(&self) -> usize {
        self.runs.iter().map(Run::len).sum()
    }
}

impl PendingBuffer {
    fn absorb(&mut self, items: &[(UserId, NoteRef)], cap: u32) {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        for (user, note) in items {
            let b = self.users.entry(user.clone()).or_insert_with(|| Buffered {
                runs: Vec::new(),
                cap,
            });
            b.cap = cap;
            let change = b.push(*note);
            self.rows = self.rows.saturating_add_signed(change);
        }
        if self.rows > 0 {
            self.since.get_or_insert_with(std::time::Instant::now);
        }
        if self.rows >= PENDING_FLUSH_ROWS {
            self.flushing.get_or_insert_with(std::time::Instant::now);
        }
        self.settle();
    }

    fn take_user(&mut self, user: &UserId) -> Option<Buffered> {
        let b = self.users.remove(user)?;
        self.rows = self.rows.saturating_sub(b.held());
        self.settle();
        Some(b)
    }

    /// Up to about `runs` runs (whole users), to be written now.
    fn part(&mut self, runs: usize) -> Vec<(UserId, Buffered)> {
        let users: Vec<UserId> = self.users.keys().take(runs).cloned().collect();
        let (mut out, mut n) = (Vec::new(), 0);
        for user in users {
            if n >= runs {
                break;
            }
            if let Some(b) = self.users.remove(&user) {
                n += b.runs.len();
                self.rows = self.rows.saturating_sub(b.held());
                out.push((user, b));
            }
        }
        self.settle();
        out
    }

    fn settle(&mut self) {
        if self.rows == 0 {
            self.users.clear();
            self.since = None;
            self.flushing = None;
        }
        metrics::gauge!("palaver_store_pending_buffered").set(self.rows as f64);
    }

    /// When the next flush must start (`None`: nothing waits, or a flush is under way).
    fn deadline(&self) -> Option<std::time::Instant> {
        if self.flushing.is_some() {
            return None;
        }
        self.since.map(|t| t + PENDING_FLUSH_AFTER)
    }

    /// Whether a part is to be written now (starting a flush whose time has come).
    fn due(&mut self) -> bool {
        if self.flushing.is_none()
            && self
                .since
                .is_some_and(|t| t.elapsed() >= PENDING_FLUSH_AFTER)
        {
            self.flushing = Some(std::time::Instant::now());
        }
        self.flushing.is_some()
    }

    /// Whether the flush under way has taken longer than [`PENDING_FLUSH_AFTER`]: the
    /// foreground never left the writer idle, so parts now go with its transactions too.
    fn overdue(&self) -> bool {
        self.flushing
            .is_some_and(|t| t.elapsed() >= PENDING_FLUSH_AFTER)
    }

    fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// What the writer waits for next.
enum Next {
    Job(bool, Option<WriteJob>),
    /// The buffered pending notifications' time came.
    Flush,
    /// Both queues closed.
    Closed,
}

fn writer_loop(
    mut conn: Connection,
    durability: Durability,
    mut fg: mpsc::Receiver<WriteJob>,
    mut bg: mpsc::Receiver<WriteJob>,
    restart: &AtomicBool,
    checkpointer: &std::sync::mpsc::Sender<Checkpoint>,
    seen: &LastSeenBuffer,
) {
    // The log's length after each commit, for calling the checkpointer between its ticks.
    conn.wal_hook(Some(note_log_pages));
    let mut called: Option<std::time::Instant> = None;
    // A runtime of this thread's own, for waiting on the queues with a deadline.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "store writer: no runtime; the store is closed");
            return;
        }
    };
    let mut pending = PendingBuffer::default();
    let mut seen_flush = SeenFlush::new();
    let mut batch: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH + BG_BATCH);
    let (mut fg_open, mut bg_open) = (true, true);
    let mut retry_restart = false;
    loop {
        // The next job of either queue, the foreground first; or, while a flush of pending
        // notifications is under way, whatever is queued without waiting.
        if !fg_open && !bg_open {
            // Closing (the buffers are written below).
            break;
        }
        let next = if pending.due() || seen_flush.due() {
            match fg.try_recv() {
                Ok(job) => Next::Job(true, Some(job)),
                Err(_) => match bg.try_recv() {
                    Ok(job) => Next::Job(false, Some(job)),
                    Err(_) => Next::Flush,
                },
            }
        } else {
            let deadline = Some(
                pending
                    .deadline()
                    .map_or(seen_flush.next, |d| d.min(seen_flush.next)),
            );
            rt.block_on(async {
                tokio::select! {
                    biased;
                    job = fg.recv(), if fg_open => Next::Job(true, job),
                    job = bg.recv(), if bg_open => Next::Job(false, job),
                    () = sleep_until_some(deadline), if deadline.is_some() => Next::Flush,
                    else => Next::Closed,
                }
            })
        };
        let mut background = match next {
            Next::Closed => break,
            Next::Flush => 0,
            Next::Job(true, None) => {
                fg_open = false;
                continue;
            }
            Next::Job(false, None) => {
                bg_open = false;
                continue;
            }
            Next::Job(is_fg, Some(job)) => {
                batch.push(job);
                usize::from(!is_fg)
            }
        };
        while batch.len() < MAX_BATCH {
            match fg.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let foreground = batch.len() > background;
        while background < BG_BATCH {
            match bg.try_recv() {
                Ok(job) => {
                    batch.push(job);
                    background += 1;
                }
                Err(_) => break,
            }
        }
        // A chat write does not carry a part (its commit would wait for the part's rows and
        // its fsync for their pages): parts are written between foreground transactions, when
        // none waits, unless the flush is overdue because one always waited.
        let flush = Flush {
            pending: if pending.due() && (!foreground || pending.overdue()) {
                pending.part(PENDING_PART)
            } else {
                Vec::new()
            },
            seen: if seen_flush.due() && (!foreground || seen_flush.overdue()) {
                seen_flush.take(seen)
            } else {
                Vec::new()
            },
        };
        let results = if batch.is_empty() {
            if !flush_alone(&mut conn, durability, &mut pending, flush, seen) {
                return;
            }
            Vec::new()
        } else {
            commit_batch(&mut conn, &batch, &mut pending, flush, seen)
        };
        for (job, res) in batch.drain(..).zip(results) {
            // A caller that went away no longer needs its answer; the write stands.
            if job.reply.send(res).is_err() {
                tracing::debug!("store writer: caller dropped before the commit finished");
            }
        }
        if LOG_PAGES.with(std::cell::Cell::get) >= WAL_RESTART_PAGES
            && called.is_none_or(|t| t.elapsed() >= CHECKPOINT_SOONEST)
        {
            // Gone only while closing, when no checkpoint is wanted.
            let _sent = checkpointer.send(Checkpoint::Now);
            called = Some(std::time::Instant::now());
        }
        // Asked by the checkpointer: wait a little for readers. Refused (a reader, or the
        // checkpointer's own passive copy still running): try again after each transaction,
        // without waiting, until the log restarts or the next ask.
        if restart.swap(false, Ordering::Relaxed) {
            retry_restart = !restart_log(&conn, RESTART_WAIT);
        } else if retry_restart {
            retry_restart = !restart_log(&conn, std::time::Duration::ZERO);
        }
    }
    // Closing: every buffered pending notification and last-seen time is written before the
    // last checkpoint.
    while !pending.is_empty() || seen.unwritten() > 0 {
        let unwritten = seen.unwritten();
        let flush = Flush {
            pending: pending.part(PENDING_PART.max(1024)),
            seen: seen.part(SEEN_PART),
        };
        if !flush_alone(&mut conn, durability, &mut pending, flush, seen) {
            return;
        }
        if unwritten > 0 && seen.unwritten() >= unwritten {
            // Not written (logged): give up on them rather than loop.
            tracing::error!(users = unwritten, "store: last-seen times lost at close");
            break;
        }
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "store: final checkpoint failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "store: close failed");
    }
}

/// Restarts the write-ahead log from its beginning, between two of the writer's transactions
/// (the checkpointer asks for it past [`WAL_RESTART_PAGES`], right after a passive checkpoint
/// copied nearly all of it). A restarting checkpoint must hold the write lock: on the
/// checkpointer's own connection it waited for the writer, and every write queued meanwhile
/// waited for both (50 to 70 ms stalls of all chat in a storm of 10,000 sessions, with a
/// 50 ms wait; with a shorter one it rarely got the lock, and the log grew past 100 MB under
/// steady writes). Here the writer has the lock already: the checkpoint copies what the last
/// passive one left, waits at most [`RESTART_WAIT`] for readers still in the log, and the
/// next write starts the log over. Answers whether it did: a restart that could not wait for
/// `wait` is tried again after the next transaction.
fn restart_log(conn: &Connection, wait: std::time::Duration) -> bool {
    if let Err(e) = conn.busy_timeout(wait) {
        tracing::warn!(error = %e, "store: cannot shorten the wait for a log restart");
        return true;
    }
    let done = match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
        Ok(busy) => {
            tracing::trace!(busy, "store: restarting checkpoint");
            busy == 0
        }
        Err(e) => {
            tracing::warn!(error = %e, "store: restarting checkpoint failed");
            true
        }
    };
    if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
        tracing::warn!(error = %e, "store: cannot restore the writer's busy timeout");
    }
    done
}

/// Writes a part of the pending buffer and of the last-seen times in a transaction of its own.
/// Without an fsync: both may lose their last second in a crash anyway, and WAL frames are replayed in
/// order, so a crash can take back only these, never a chat write committed after them (its
/// fsync covers the frames before it).
/// `false`: the connection could not be made durable again, and must not write any more.
#[must_use]
fn flush_alone(
    conn: &mut Connection,
    durability: Durability,
    pending: &mut PendingBuffer,
    flush: Flush,
    seen: &LastSeenBuffer,
) -> bool {
    if flush.pending.is_empty() && flush.seen.is_empty() {
        return true;
    }
    let full = matches!(durability, Durability::Full);
    if full && let Err(e) = conn.pragma_update(None, "synchronous", "NORMAL") {
        tracing::warn!(error = %e, "store: cannot relax synchronous for a pending flush");
    }
    commit_batch(conn, &[], pending, flush, seen);
    if full && let Err(e) = conn.pragma_update(None, "synchronous", "FULL") {
        // Every later commit must be durable: without FULL again, stop writing.
        tracing::error!(error = %e, "store: cannot restore synchronous=FULL; the store closes");
        return false;
    }
    true
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Parts of the buffers the writer keeps, to be written with a transaction.
struct Flush {
    /// Pending notifications.
    pending: Vec<(UserId, Buffered)>,
    /// Last-seen times.
    seen: Vec<(UserId, Millis)>,
}

/// Commits `batch` in one transaction, each job in a savepoint of its own, and `flush` (parts
/// of the writer's buffers) with it.
fn commit_batch(
    conn: &mut Connection,
    batch: &[WriteJob],
    pending: &mut PendingBuffer,
    flush: Flush,
    seen: &LastSeenBuffer,
) -> Vec<StoreResult<WriteOut>> {
    let Flush {
        pending: flush,
        seen: times,
    } = flush;
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // The last-seen times stay buffered, for the next part.
            tracing::warn!(
                users = flush.len(),
                "store: pending notifications not written"
            );
            return batch.iter().map(|_| Err(db_err_ref(&e))).collect();
        }
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let res = match &job.op {
            // Into the buffer, in queue order (a take queued later sees them).
            WriteOp::AddPending(items, cap) => {
                pending.absorb(items, *cap);
                Ok(WriteOut::Unit)
            }
            WriteOp::TakePending(user) => match tx.savepoint() {
                Ok(mut sp) => take_pending(&mut sp, user, pending)
                    .and_then(|out| sp.commit().map(|()| out).map_err(db_err)),
                Err(e) => Err(db_err(e)),
            },
            op => match tx.savepoint() {
                Ok(mut sp) => match apply(&mut sp, op) {
                    Ok(out) => sp.commit().map(|()| out).map_err(db_err),
                    Err(e) => Err(e), // dropping the savepoint rolls it back
                },
                Err(e) => Err(db_err(e)),
            },
        };
        results.push(res);
    }
    if !flush.is_empty() {
        let users = flush.len();
        let res = tx.savepoint().map_err(db_err).and_then(|mut sp| {
            write_pending(&mut sp, &flush)?;
            sp.commit().map_err(db_err)
        });
        if let Err(e) = res {
            tracing::warn!(users, error = %e, "store: pending notifications not written");
        }
    }
    let mut seen_ok = false;
    if !times.is_empty() {
        let res = tx.savepoint().map_err(db_err).and_then(|mut sp| {
            write_last_seen(&mut sp, &times)?;
            sp.commit().map_err(db_err)
        });
        match res {
            Ok(()) => seen_ok = true,
            Err(e) => {
                tracing::warn!(users = times.len(), error = %e, "store: last-seen times not written")
            }
        }
    }
    if let Err(e) = tx.commit() {
        tracing::error!(error = %e, "store: group commit failed");
        return batch.iter().map(|_| Err(db_err_ref(&e))).collect();
    }
    if seen_ok {
        seen.written(&times);
    }
    results
}

/// Writes last-seen times (in the table's order: neighbours share pages).
fn write_last_seen(
    tx: &mut rusqlite::Savepoint<'_>,
    times: &[(UserId, Millis)],
) -> StoreResult<()> {
    let mut st = tx
        .prepare_cached(
            "UPDATE users SET last_seen = max(coalesce(last_seen, 0), ?2) WHERE id = ?1",
        )
        .map_err(db_err)?;
    for (user, at) in times {
        st.execute(params![user.as_str(), at]).map_err(db_err)?;
    }
    Ok(())
}

fn db_err_ref(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Writes flushed runs of pending notifications. A run that continues one already written
/// (its first message follows that one's last) extends it, keeping its newest `cap`; any
/// other is a row of its own, and a user with more than `cap` runs loses the oldest. Each is
/// an index seek on `(user, room)`: no walk over anyone's notifications.
fn write_pending(
    tx: &mut rusqlite::Savepoint<'_>,
    users: &[(UserId, Buffered)],
) -> StoreResult<()> {
    let mut extend = tx
        .prepare_cached(
            "UPDATE pending_runs SET last_seq = ?4, last_at = ?5, cap = ?6,
                 first_seq = max(first_seq, ?4 - ?6 + 1)
             WHERE user = ?1 AND room = ?2 AND last_seq = ?3 - 1",
        )
        .map_err(db_err)?;
    let mut insert = tx
        .prepare_cached(
            "INSERT OR REPLACE INTO pending_runs (user, room, first_seq, last_seq, last_at, cap)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(db_err)?;
    let mut count = tx
        .prepare_cached("SELECT count(*) FROM pending_runs WHERE user = ?1")
        .map_err(db_err)?;
    let mut trim = tx
        .prepare_cached(
            "DELETE FROM pending_runs WHERE user = ?1 AND (room, first_seq) IN (
                 SELECT room, first_seq FROM pending_runs WHERE user = ?1
                 ORDER BY last_at DESC, room DESC, last_seq DESC LIMIT -1 OFFSET ?2)",
        )
        .map_err(db_err)?;
    for (user, b) in users {
        let cap = i64::try_from(b.cap.max(1)).unwrap_or(i64::MAX);
        let mut added = false;
        for run in &b.runs {
            let (room, first, last) = (
                sql_u64(run.room.0)?,
                sql_u64(run.first)?,
                sql_u64(run.last)?,
            );
            let extended = extend
                .execute(params![user.as_str(), room, first, last, run.last_at, cap])
                .map_err(db_err)?;
            if extended == 0 {
                insert
                    .execute(params![user.as_str(), room, first, last, run.last_at, cap])
                    .map_err(db_err)?;
                added = true;
            }
        }
        if added {
            let runs: i64 = count
                .query_row([user.as_str()], |r| r.get(0))
                .map_err(db_err)?;
            if runs > cap {
                trim.execute(params![user.as_str(), cap]).map_err(db_err)?;
            }
        }
    }
    Ok(())
}

fn sql_u64(n: u64) -> StoreResult<i64> {
    i64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{n} does not fit the store")))
}

/// Reads and removes `user`'s pending notifications: written before runs were (the `pending`
/// table, whose rows hold the notification), the written runs and the buffered ones. Each
/// run's messages are read as they are now (deleted ones left out); the newest `cap`
/// are kept, oldest first.
fn take_pending(
    tx: &mut rusqlite::Savepoint<'_>,
    user: &UserId,
    pending: &mut PendingBuffer,
) -> StoreResult<WriteOut> {
    let mut out: Vec<Notification> = tx
        .prepare_cached("SELECT body FROM pending WHERE user = ?1 ORDER BY seq")
        .and_then(|mut s| {
            s.query_map([user.as_str()], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map_err(db_err)?
        .iter()
        .map(|b| serde_json::from_str(b).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect::<StoreResult<_>>()?;
    let mut cap = usize::MAX;
    let mut runs: Vec<Run> = tx
        .prepare_cached(
            "SELECT room, first_seq, last_seq, last_at, cap FROM pending_runs WHERE user = ?1",
        )
        .and_then(|mut s| {
            s.query_map([user.as_str()], |r| {
                Ok((
                    Run {
                        room: RoomId(r.get::<_, i64>(0)? as u64),
                        first: r.get::<_, i64>(1)? as u64,
                        last: r.get::<_, i64>(2)? as u64,
                        last_at: r.get(3)?,
                    },
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(db_err)?
        .into_iter()
        .map(|(run, c)| {
            cap = usize::try_from(c).unwrap_or(usize::MAX);
            run
        })
        .collect();
    if !out.is_empty() || !runs.is_empty() {
        for sql in [
            "DELETE FROM pending WHERE user = ?1",
            "DELETE FROM pending_runs WHERE user = ?1",
        ] {
            tx.prepare_cached(sql)
                .and_then(|mut s| s.execute([user.as_str()]))
                .map_err(db_err)?;
        }
    }
    if let Some(b) = pending.take_user(user) {
        cap = b.cap;
        runs.extend(b.runs);
    }
    let mut read = tx
        .prepare_cached(&format!(
            "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND seq BETWEEN ?2 AND ?3
             ORDER BY seq DESC LIMIT ?4"
        ))
        .map_err(db_err)?;
    let limit = i64::try_from(cap).unwrap_or(i64::MAX);
    for run in &runs {
        let messages = read
            .query_map(
                params![
                    sql_u64(run.room.0)?,
                    sql_u64(run.first)?,
                    sql_u64(run.last)?,
                    limit
                ],
                message_row,
            )
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Message>>>())
            .map_err(db_err)?;
        out.extend(
            messages
                .into_iter()
                .filter(|m| m.deleted_at.is_none())
                .map(|m| super::notification_of(&m)),
        );
    }
    Ok(WriteOut::Pending(super::newest_pending(user, out, cap)))
}

fn apply(tx: &mut rusqlite::Savepoint<'_>, op: &WriteOp) -> StoreResult<WriteOut> {
    match op {
        WriteOp::UpsertUser(p, now) => {
            tx.prepare_cached(
                "INSERT INTO users (id, username, name, avatar, created_at, updated_at, language)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET username=excluded.username, name=excluded.name,
                   avatar=excluded.avatar, updated_at=excluded.updated_at,
                   language=coalesce(excluded.language, users.language)
                 WHERE users.username IS NOT excluded.username OR users.name IS NOT excluded.name
                   OR users.avatar IS NOT excluded.avatar
                   OR (excluded.language IS NOT NULL AND users.language IS NOT excluded.language)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    p.id.as_str(),
                    p.username,
                    p.name,
                    p.avatar,
                    now,
                    p.language
                ])
            })
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
        WriteOp::ApplyRoom(room, w) => {
            apply_room(tx, *room, w)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::SetRead(room, user, id) => {
            tx.prepare_cached(
                "INSERT INTO read_markers (room, user, message_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT(room, user) DO UPDATE SET message_id = excluded.message_id
                 WHERE excluded.message_id > read_markers.message_id",
            )
            .and_then(|mut s| s.execute(params![room.0 as i64, user.as_str(), id.0 as i64]))
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::PutFriendship(f) => {
            let (lo, hi) = pair(&f.requester, &f.addressee);
            tx.prepare_cached(
                "INSERT OR REPLACE INTO friendships
                   (lo, hi, requester, addressee, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    lo,
                    hi,
                    f.requester.as_str(),
                    f.addressee.as_str(),
                    f.status.code(),
                    f.created_at,
                    f.updated_at
                ])
            })
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::DeleteFriendship(a, b) => {
            let (lo, hi) = pair(a, b);
            tx.prepare_cached("DELETE FROM friendships WHERE lo = ?1 AND hi = ?2")
                .and_then(|mut s| s.execute(params![lo, hi]))
                .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::SetBlock(blocker, blocked, on) => {
            let sql = if *on {
                "INSERT OR IGNORE INTO blocks (blocker, blocked) VALUES (?1, ?2)"
            } else {
                "DELETE FROM blocks WHERE blocker = ?1 AND blocked = ?2"
            };
            tx.prepare_cached(sql)
                .and_then(|mut s| s.execute(params![blocker.as_str(), blocked.as_str()]))
                .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        // Handled by `commit_batch` (they need the pending buffer).
        WriteOp::AddPending(..) | WriteOp::TakePending(_) => Err(StoreError::Corrupt(
            "pending notifications outside the writer's batch".into(),
        )),
        WriteOp::AddUpload(u) => {
            tx.prepare_cached(
                "INSERT INTO uploads (path, uploader, kind, size, content_type, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(path) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    u.path,
                    u.uploader.as_str(),
                    u.kind,
                    super::i64_of(u.size),
                    u.content_type,
                    u.created_at
                ])
            })
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::AddMediaPost(path, room) => {
            tx.prepare_cached("INSERT OR IGNORE INTO media_posts (path, room) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![path, super::i64_of(room.0)]))
                .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::AddDevice(d) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO devices (token, user, platform, device_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.token,
                    d.user.as_str(),
                    d.platform.as_str(),
                    d.device_id,
                    d.created_at
                ])
            })
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::RemoveDevice(user, token) => {
            let n = match user {
                Some(user) => tx
                    .prepare_cached("DELETE FROM devices WHERE token = ?1 AND user = ?2")
                    .and_then(|mut s| s.execute(params![token, user.as_str()])),
                None => tx
                    .prepare_cached("DELETE FROM devices WHERE token = ?1")
                    .and_then(|mut s| s.execute(params![token])),
            }
            .map_err(db_err)?;
            Ok(WriteOut::Removed(n > 0))
        }
        WriteOp::SetMuted(room, user, muted) => {
            let sql = if *muted {
                "INSERT OR IGNORE INTO mutes (room, user) VALUES (?1, ?2)"
            } else {
                "DELETE FROM mutes WHERE room = ?1 AND user = ?2"
            };
            tx.prepare_cached(sql)
                .and_then(|mut s| s.execute(params![super::i64_of(room.0), user.as_str()]))
                .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
        WriteOp::AddDeadLetter(l) => {
            let job =
                serde_json::to_string(&l.job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.prepare_cached(
                "INSERT INTO dead_letters (at, job, device_token, provider, reason, attempts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    l.at,
                    job,
                    l.device_token,
                    l.provider,
                    l.reason,
                    l.attempts
                ])
            })
            .map_err(db_err)?;
            // Bounded: everything below the newest DEAD_LETTER_CAP rows goes.
            tx.prepare_cached(
                "DELETE FROM dead_letters WHERE id <=
                   (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )
            .and_then(|mut s| s.execute(params![i64::from(DEAD_LETTER_CAP)]))
            .map_err(db_err)?;
            Ok(WriteOut::Unit)
        }
    }
}

/// A pair of users in canonical order.
fn pair<'a>(a: &'a UserId, b: &'a UserId) -> (&'a str, &'a str) {
    if a <= b {
        (a.as_str(), b.as_str())
    } else {
        (b.as_str(), a.as_str())
    }
}

fn content_json(m: &Message) -> StoreResult<String> {
    serde_json::to_string(&MessageContent::of(m)).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn apply_room(tx: &rusqlite::Savepoint<'_>, room: RoomId, w: &RoomWrite) -> StoreResult<()> {
    let r = room.0 as i64;
    if !w.new_messages.is_empty() {
        let mut ins = tx
            .prepare_cached(
                "INSERT INTO messages (room, id, seq, sender, client_ref, body, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(db_err)?;
        for m in &w.new_messages {
            ins.execute(params![
                r,
                m.id.0 as i64,
                m.seq as i64,
                m.sender.as_str(),
                m.client_ref,
                content_json(m)?,
                m.created_at
            ])
            .map_err(db_err)?;
        }
    }
    if !w.changed_messages.is_empty() {
        let mut upd = tx
            .prepare_cached("UPDATE messages SET body = ?3 WHERE room = ?1 AND id = ?2")
            .map_err(db_err)?;
        for m in &w.changed_messages {
            upd.execute(params![r, m.id.0 as i64, content_json(m)?])
                .map_err(db_err)?;
        }
    }
    if !w.log.is_empty() {
        let mut ins = tx
            .prepare_cached("INSERT INTO room_log (room, seq, event) VALUES (?1, ?2, ?3)")
            .map_err(db_err)?;
        for (seq, e) in &w.log {
            let json = serde_json::to_string(e).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            ins.execute(params![r, *seq as i64, json]).map_err(db_err)?;
        }
    }
    for m in &w.upsert_members {
        tx.prepare_cached(
            "INSERT INTO members (room, user, role, joined_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(room, user) DO UPDATE SET role = excluded.role",
        )
        .and_then(|mut s| {
            s.execute(params![
                r,
                m.user.as_str(),
                super::role_str(m.role),
                m.joined_at
            ])
        })
        .map_err(db_err)?;
    }
    for u in &w.remove_members {
        tx.prepare_cached("DELETE FROM members WHERE room = ?1 AND user = ?2")
            .and_then(|mut s| s.execute(params![r, u.as_str()]))
            .map_err(db_err)?;
        tx.prepare_cached("DELETE FROM read_markers WHERE room = ?1 AND user = ?2")
            .and_then(|mut s| s.execute(params![r, u.as_str()]))
            .map_err(db_err)?;
    }
    if let Some(p) = &w.patch {
        tx.prepare_cached("UPDATE rooms SET name = ?2, avatar = ?3, public = ?4 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![r, p.name, p.avatar, p.public]))
            .map_err(db_err)?;
    }
    let activity = if w.new_messages.is_empty() { 0 } else { w.at };
    tx.prepare_cached(
        "UPDATE rooms SET last_seq = max(last_seq, ?2),
           last_message_id = CASE WHEN ?3 IS NULL THEN last_message_id
             ELSE max(coalesce(last_message_id, 0), ?3) END,
           last_activity = max(last_activity, ?4) WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            r,
            w.last_seq as i64,
            w.last_message_id.map(|m| m.0 as i64),
            activity
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

fn insert_room(
    tx: &rusqlite::Savepoint<'_>,
    new: &NewRoom,
    direct_key: Option<&str>,
) -> StoreResult<()> {
    let r = &new.room;
    tx.prepare_cached(
        "INSERT INTO rooms (id, kind, name, created_by, created_at, direct_key, last_activity,
           avatar, public)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            r.id.0 as i64,
            super::kind_str(r.kind),
            r.name,
            r.created_by.as_str(),
            r.created_at,
            direct_key,
            r.avatar,
            r.public
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

const USER_COLS: &str = "id, username, name, avatar, created_at, updated_at, last_seen, language";
const ROOM_COLS: &str =
    "id, kind, name, created_by, created_at, last_seq, last_message_id, avatar, public";
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
            language: r.get(7)?,
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
        avatar: r.get(7)?,
        public: r.get(8)?,
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
        online: None,
    })
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    let body: String = r.get(5)?;
    let content: MessageContent = serde_json::from_str(&body).map_err(|e| conv(e.to_string()))?;
    let mut m = Message::new(
        MessageId(r.get::<_, i64>(0)? as u64),
        RoomId(r.get::<_, i64>(1)? as u64),
        r.get::<_, i64>(2)? as u64,
        user_id(r.get(3)?)?,
        content.body.clone(),
        r.get(6)?,
    );
    m.client_ref = r.get(4)?;
    content.apply(&mut m);
    Ok(m)
}

const FRIEND_COLS: &str = "requester, addressee, status, created_at, updated_at";
const UPLOAD_COLS: &str = "path, uploader, kind, size, content_type, created_at";
const DEVICE_COLS: &str = "user, platform, token, device_id, created_at";
const DEAD_LETTER_COLS: &str = "job, device_token, provider, reason, attempts, at";

fn upload_row(r: &Row<'_>) -> rusqlite::Result<Upload> {
    Ok(Upload {
        path: r.get(0)?,
        uploader: user_id(r.get(1)?)?,
        kind: r.get(2)?,
        size: super::u64_of(r.get(3)?),
        content_type: r.get(4)?,
        created_at: r.get(5)?,
    })
}

fn device_row(r: &Row<'_>) -> rusqlite::Result<Device> {
    let platform: String = r.get(1)?;
    Ok(Device {
        user: user_id(r.get(0)?)?,
        platform: Platform::parse(&platform)
            .ok_or_else(|| conv(format!("unknown platform {platform:?}")))?,
        token: r.get(2)?,
        device_id: r.get(3)?,
        created_at: r.get(4)?,
    })
}

fn dead_letter_row(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    let job: String = r.get(0)?;
    Ok(DeadLetter {
        job: serde_json::from_str(&job).map_err(|e| conv(format!("dead letter job: {e}")))?,
        device_token: r.get(1)?,
        provider: r.get(2)?,
        reason: r.get(3)?,
        attempts: r.get(4)?,
        at: r.get(5)?,
    })
}

fn friendship_row(r: &Row<'_>) -> rusqlite::Result<Friendship> {
    let code: u8 = r.get(2)?;
    Ok(Friendship {
        requester: user_id(r.get(0)?)?,
        addressee: user_id(r.get(1)?)?,
        status: FriendshipStatus::from_code(code)
            .ok_or_else(|| conv(format!("unknown friendship status {code}")))?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
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
            WriteOut::User(u) => Ok(self.seen_in(*u)),
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
        .map(|u| u.map(|u| self.seen_in(u)))
    }

    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()> {
        // Into the writer's buffer (read by reads at once; written within a second).
        if self.writer.lock().is_none() {
            return Err(StoreError::Closed);
        }
        self.seen.note(id, at);
        Ok(())
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

    async fn member_count_up_to(&self, room: RoomId, limit: usize) -> StoreResult<usize> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM members WHERE room = ?1 LIMIT ?2)",
            )?
            .query_row(params![room.0 as i64, limit], |r| r.get::<_, i64>(0))
            .map(|n| usize::try_from(n).unwrap_or(0))
        })
        .await
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

    async fn presence_audience(&self, user: &UserId, group_max: usize) -> StoreResult<Vec<UserId>> {
        let user = user.clone();
        let max = i64::try_from(group_max).unwrap_or(i64::MAX);
        let accepted = FriendshipStatus::Accepted.code();
        // One query, not the trait's five reads and more: the rooms whose members hear it are
        // the direct ones and the groups without a `max + 1`th member (a big group is never
        // counted through).
        self.read(move |c| {
            c.prepare_cached(
                "WITH blocked(u) AS (
                     SELECT blocked FROM blocks WHERE blocker = ?1
                     UNION SELECT blocker FROM blocks WHERE blocked = ?1
                 ), heard(room) AS (
                     SELECT m.room FROM members m JOIN rooms r ON r.id = m.room
                     WHERE m.user = ?1 AND (r.kind = 'direct' OR NOT EXISTS (
                         SELECT 1 FROM members x WHERE x.room = m.room LIMIT 1 OFFSET ?2))
                 ), audience(u) AS (
                     SELECT hi FROM friendships WHERE lo = ?1 AND status = ?3
                     UNION SELECT lo FROM friendships WHERE hi = ?1 AND status = ?3
                     UNION SELECT o.user FROM heard JOIN members o ON o.room = heard.room
                 )
                 SELECT u FROM audience
                 WHERE u <> ?1 AND u NOT IN (SELECT u FROM blocked)
                 ORDER BY u",
            )?
            .query_map(params![user.as_str(), max, accepted], |r| {
                user_id(r.get(0)?)
            })?
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
                            r.last_message_id, r.avatar, r.public
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

    async fn direct_room(&self, a: &UserId, b: &UserId) -> StoreResult<Option<RoomId>> {
        let key = super::direct_key(a, b);
        self.read(move |c| {
            c.prepare_cached("SELECT id FROM rooms WHERE direct_key = ?1")?
                .query_row([&key], |r| Ok(RoomId(r.get::<_, i64>(0)? as u64)))
                .optional()
        })
        .await
    }

    async fn apply_room(&self, room: RoomId, write: RoomWrite) -> StoreResult<()> {
        self.write(WriteOp::ApplyRoom(room, Box::new(write)))
            .await
            .map(|_| ())
    }

    async fn message(&self, room: RoomId, id: MessageId) -> StoreResult<Option<Message>> {
        self.read(move |c| message_by_id(c, room, id)).await
    }

    async fn messages_after_seq(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {MSG_COLS} FROM messages WHERE room = ?1 AND seq > ?2
                 ORDER BY seq ASC LIMIT ?3"
            ))?
            .query_map(
                params![room.0 as i64, after_seq as i64, i64::from(limit)],
                message_row,
            )?
            .collect()
        })
        .await
    }

    async fn room_log(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Event)>> {
        let rows: Vec<(i64, String)> = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT seq, event FROM room_log WHERE room = ?1 AND seq > ?2
                     ORDER BY seq ASC LIMIT ?3",
                )?
                .query_map(
                    params![room.0 as i64, after_seq as i64, i64::from(limit)],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(seq, json)| {
                serde_json::from_str(&json)
                    .map(|e| (seq as u64, e))
                    .map_err(|e| StoreError::Corrupt(format!("room log: {e}")))
            })
            .collect()
    }

    async fn set_read_marker(
        &self,
        room: RoomId,
        user: &UserId,
        up_to: MessageId,
    ) -> StoreResult<()> {
        self.write(WriteOp::SetRead(room, user.clone(), up_to))
            .await
            .map(|_| ())
    }

    async fn read_marker(&self, room: RoomId, user: &UserId) -> StoreResult<Option<MessageId>> {
        let user = user.clone();
        self.read(move |c| {
            c.prepare_cached("SELECT message_id FROM read_markers WHERE room = ?1 AND user = ?2")?
                .query_row(params![room.0 as i64, user.as_str()], |r| {
                    Ok(MessageId(r.get::<_, i64>(0)? as u64))
                })
                .optional()
        })
        .await
    }

    async fn unread_count(
        &self,
        room: RoomId,
        user: &UserId,
        after: Option<MessageId>,
        cap: u32,
    ) -> StoreResult<u32> {
        let user = user.clone();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT count(*) FROM (SELECT 1 FROM messages
                   WHERE room = ?1 AND id > ?2 AND sender <> ?3
                     AND json_extract(body, '$.type') <> 'deleted' LIMIT ?4)",
            )?
            .query_row(
                params![
                    room.0 as i64,
                    after.map_or(0, |m| m.0 as i64),
                    user.as_str(),
                    i64::from(cap)
                ],
                |r| r.get::<_, u32>(0),
            )
        })
        .await
    }

    async fn friendship(&self, a: &UserId, b: &UserId) -> StoreResult<Option<Friendship>> {
        let (lo, hi) = pair(a, b);
        let (lo, hi) = (lo.to_owned(), hi.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {FRIEND_COLS} FROM friendships WHERE lo = ?1 AND hi = ?2"
            ))?
            .query_row(params![lo, hi], friendship_row)
            .optional()
        })
        .await
    }

    async fn put_friendship(&self, f: &Friendship) -> StoreResult<()> {
        self.write(WriteOp::PutFriendship(Box::new(f.clone())))
            .await
            .map(|_| ())
    }

    async fn delete_friendship(&self, a: &UserId, b: &UserId) -> StoreResult<()> {
        self.write(WriteOp::DeleteFriendship(a.clone(), b.clone()))
            .await
            .map(|_| ())
    }

    async fn friendships_of(&self, user: &UserId) -> StoreResult<Vec<Friendship>> {
        let user = user.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {FRIEND_COLS} FROM friendships WHERE lo = ?1
                 UNION ALL SELECT {FRIEND_COLS} FROM friendships WHERE hi = ?1"
            ))?
            .query_map([user.as_str()], friendship_row)?
            .collect()
        })
        .await
    }

    async fn set_block(&self, blocker: &UserId, blocked: &UserId, on: bool) -> StoreResult<()> {
        self.write(WriteOp::SetBlock(blocker.clone(), blocked.clone(), on))
            .await
            .map(|_| ())
    }

    async fn blocks_of(&self, user: &UserId) -> StoreResult<Vec<(UserId, UserId)>> {
        let user = user.clone();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT blocker, blocked FROM blocks WHERE blocker = ?1
                 UNION ALL SELECT blocker, blocked FROM blocks WHERE blocked = ?1",
            )?
            .query_map([user.as_str()], |r| {
                Ok((user_id(r.get(0)?)?, user_id(r.get(1)?)?))
            })?
            .collect()
        })
        .await
    }

    async fn add_pending(&self, items: Vec<(UserId, Notification)>, cap: u32) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        // A reference to the message: taking reads the message itself.
        let notes = items
            .into_iter()
            .map(|(user, n)| {
                if n.seq == 0 {
                    return Err(StoreError::Corrupt(format!(
                        "pending notification of message {} without its seq",
                        n.message_id
                    )));
                }
                let note = NoteRef {
                    room: n.room,
                    seq: n.seq,
                    at: n.created_at,
                };
                Ok((user, note))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        self.write(WriteOp::AddPending(notes, cap))
            .await
            .map(|_| ())
    }

    async fn take_pending(&self, user: &UserId) -> StoreResult<Vec<Notification>> {
        match self.write(WriteOp::TakePending(user.clone())).await? {
            WriteOut::Pending(p) => Ok(p),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        let name = username.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {USER_COLS} FROM users WHERE username = ?1 ORDER BY updated_at DESC LIMIT 1"
            ))?
            .query_row([name], user_row)
            .optional()
        })
        .await
        .map(|u| u.map(|u| self.seen_in(u)))
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

    // ---- uploads, devices, mutes, push ----

    async fn add_upload(&self, upload: &Upload) -> StoreResult<()> {
        self.write(WriteOp::AddUpload(Box::new(upload.clone())))
            .await
            .map(|_| ())
    }

    async fn upload(&self, path: &str) -> StoreResult<Option<Upload>> {
        let path = path.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE path = ?1"
            ))?
            .query_row([path], upload_row)
            .optional()
        })
        .await
    }

    async fn add_media_post(&self, path: &str, room: RoomId) -> StoreResult<()> {
        self.write(WriteOp::AddMediaPost(path.to_owned(), room))
            .await
            .map(|_| ())
    }

    async fn media_rooms(&self, path: &str) -> StoreResult<Vec<RoomId>> {
        let path = path.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT room FROM media_posts WHERE path = ?1 ORDER BY room")?
                .query_map([path], |r| Ok(RoomId(super::u64_of(r.get(0)?))))?
                .collect()
        })
        .await
    }

    async fn add_device(&self, device: &Device) -> StoreResult<()> {
        self.write(WriteOp::AddDevice(Box::new(device.clone())))
            .await
            .map(|_| ())
    }

    async fn remove_device(&self, user: &UserId, token: &str) -> StoreResult<bool> {
        match self
            .write(WriteOp::RemoveDevice(Some(user.clone()), token.to_owned()))
            .await?
        {
            WriteOut::Removed(removed) => Ok(removed),
            _ => Err(StoreError::Corrupt("unexpected writer answer".into())),
        }
    }

    async fn remove_device_token(&self, token: &str) -> StoreResult<()> {
        self.write(WriteOp::RemoveDevice(None, token.to_owned()))
            .await
            .map(|_| ())
    }

    async fn devices_of(&self, user: &UserId) -> StoreResult<Vec<Device>> {
        let user = user.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE user = ?1 ORDER BY created_at, token"
            ))?
            .query_map([user.as_str()], device_row)?
            .collect()
        })
        .await
    }

    async fn set_muted(&self, room: RoomId, user: &UserId, muted: bool) -> StoreResult<()> {
        self.write(WriteOp::SetMuted(room, user.clone(), muted))
            .await
            .map(|_| ())
    }

    async fn muted_in(&self, room: RoomId) -> StoreResult<Vec<UserId>> {
        self.read(move |c| {
            c.prepare_cached("SELECT user FROM mutes WHERE room = ?1 ORDER BY user")?
                .query_map([super::i64_of(room.0)], |r| user_id(r.get(0)?))?
                .collect()
        })
        .await
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> StoreResult<()> {
        self.write(WriteOp::AddDeadLetter(Box::new(letter.clone())))
            .await
            .map(|_| ())
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {DEAD_LETTER_COLS} FROM dead_letters ORDER BY at DESC, id DESC LIMIT ?1"
            ))?
            .query_map([i64::from(limit)], dead_letter_row)?
            .collect()
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        if self.writer.lock().is_none() {
            return Err(StoreError::Closed);
        }
        self.read(|c| {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
        })
        .await
    }

    async fn close(&self) -> StoreResult<()> {
        // The checkpointer first (the writer's last checkpoint truncates the log).
        let checkpointer = self.checkpointer.lock().take();
        if let Some((stop, t)) = checkpointer {
            // The writer holds a sender too: stopping is said, not only dropped.
            let _sent = stop.send(Checkpoint::Stop);
            drop(stop);
            tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .map_err(|_| unavailable("store checkpoint thread panicked".into()))?;
        }
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
    async fn dead_letters_are_capped_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Normal).expect("open"));
        let letter = |n: u32| DeadLetter {
            job: schema::PushJob {
                user: UserId::parse("u").expect("id"),
                room: RoomId(1),
                message: MessageId(u64::from(n) + 1),
                sender: UserId::parse("s").expect("id"),
                preview: String::new(),
                kind: "text".into(),
                room_name: None,
                collapse_key: "room-1".into(),
                created_at: 0,
                traceparent: None,
            },
            device_token: None,
            provider: "fcm".into(),
            reason: format!("r{n}"),
            attempts: 1,
            at: i64::from(n),
        };
        // The first few go in one by one, so they are the oldest rows.
        for n in 0..5 {
            store.add_dead_letter(&letter(n)).await.expect("add");
        }
        let tasks: Vec<_> = (5..DEAD_LETTER_CAP + 5)
            .map(|n| {
                let store = store.clone();
                let l = letter(n);
                tokio::spawn(async move { store.add_dead_letter(&l).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("add");
        }
        let all = store.dead_letters(u32::MAX).await.expect("read");
        assert_eq!(all.len(), DEAD_LETTER_CAP as usize);
        assert!(all.iter().all(|l| l.at >= 5), "the five oldest are gone");
        assert_eq!(all[0].at, i64::from(DEAD_LETTER_CAP + 4));
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
    /// Thousands of last-seen times noted at once (a storm of disconnects): reads see them at
    /// once; the writer writes them within a flush period, in parts of `SEEN_PART` in the
    /// table's order, and a foreground write meanwhile waits for one part at most; a time
    /// never goes back; what is still buffered at close is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn last_seen_times_are_buffered_and_written_in_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("open");
        let n = 3000;
        for i in 0..n {
            let p = super::super::conformance::profile(&format!("u{i}"), &format!("U{i}"));
            store.upsert_user(&p, 1).await.expect("user");
        }
        let uid = |i: usize| UserId::parse(&format!("u{i}")).expect("id");
        let stored = |i: usize| {
            let id = uid(i);
            store.read(move |c| {
                c.query_row(
                    "SELECT last_seen FROM users WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get::<_, Option<i64>>(0),
                )
            })
        };
        for i in 0..n {
            store
                .set_last_seen(&uid(i), 1_000 + i as i64)
                .await
                .expect("noted");
        }
        // Read at once, before any is written.
        let u = store.user(&uid(7)).await.expect("read").expect("user");
        assert_eq!(u.last_seen, Some(1_007));
        assert_eq!(stored(7).await.expect("row"), None, "not written yet");
        // Written within the flush period (and a little), every one of them.
        let started = std::time::Instant::now();
        let written = || async {
            store
                .read(|c| {
                    c.query_row(
                        "SELECT count(*) FROM users WHERE last_seen IS NOT NULL",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await
                .expect("count")
        };
        while written().await < n as i64 {
            assert!(
                started.elapsed() < SEEN_FLUSH_AFTER * 5,
                "{} of {n} last-seen times written after {:?}",
                written().await,
                started.elapsed()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            stored(n - 1).await.expect("row"),
            Some(1_000 + (n - 1) as i64)
        );
        // An older time does not replace a newer one; a newer one is read at once.
        store.set_last_seen(&uid(1), 5).await.expect("noted");
        store.set_last_seen(&uid(2), 9_000).await.expect("noted");
        assert_eq!(
            store
                .user(&uid(1))
                .await
                .expect("read")
                .expect("user")
                .last_seen,
            Some(1_001)
        );
        assert_eq!(
            store
                .user(&uid(2))
                .await
                .expect("read")
                .expect("user")
                .last_seen,
            Some(9_000)
        );
        // Buffered at close: written, and there after reopening.
        store.set_last_seen(&uid(3), 9_003).await.expect("noted");
        store.close().await.expect("close");
        assert!(store.set_last_seen(&uid(4), 1).await.is_err(), "closed");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("reopen");
        for (i, at) in [(1, 1_001), (2, 9_000), (3, 9_003)] {
            let u = store.user(&uid(i)).await.expect("read").expect("user");
            assert_eq!(u.last_seen, Some(at));
        }
        store.close().await.expect("close");
    }

    /// A storm's last-seen times go in parts when no chat write waits: a chat write queued
    /// while they are written waits for one part, not for all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn last_seen_times_yield_to_foreground_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("open");
        let n = 20_000;
        let batch: Vec<Profile> = (0..n)
            .map(|i| super::super::conformance::profile(&format!("u{i:05}"), "U"))
            .collect();
        for chunk in batch.chunks(500) {
            let writes = chunk.iter().map(|p| store.upsert_user(p, 1));
            for w in futures::future::join_all(writes).await {
                w.expect("user");
            }
        }
        for i in 0..n {
            let id = UserId::parse(&format!("u{i:05}")).expect("id");
            store.set_last_seen(&id, 1_000).await.expect("noted");
        }
        let written = || async {
            store
                .read(|c| {
                    c.query_row(
                        "SELECT count(*) FROM users WHERE last_seen IS NOT NULL",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await
                .expect("count")
        };
        // Once the writer is on them, a foreground write.
        let started = std::time::Instant::now();
        while written().await == 0 {
            assert!(started.elapsed().as_secs() < 30, "no part written");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let p = super::super::conformance::profile("late", "Late");
        store.upsert_user(&p, 1).await.expect("foreground write");
        let done = written().await;
        assert!(
            done < n as i64 / 2,
            "the foreground write waited for {done} of {n} last-seen times"
        );
        store.close().await.expect("close");
    }

    /// The notification of message `i` of room 9 (see [`with_messages`]).
    fn note(i: u64) -> Notification {
        super::super::notification_of(&super::super::conformance::msg(RoomId(9), i, "a", None))
    }

    /// Room 9 with messages 1 to `n` from `a`: what [`note`]s are of.
    async fn with_messages(store: &EmbeddedStore, n: u64) {
        let room = super::super::conformance::seed_room(store, 9).await;
        let batch = (1..=n)
            .map(|i| super::super::conformance::msg(room, i, "a", None))
            .collect();
        store.append_messages(room, batch).await.expect("messages");
    }

    fn pending_rows(store: &Arc<EmbeddedStore>) -> impl std::future::Future<Output = usize> {
        let store = store.clone();
        async move {
            store
                .read(|c| {
                    c.query_row(
                        "SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM pending_runs",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await
                .map(|n| usize::try_from(n).unwrap_or(0))
                .expect("count")
        }
    }

    async fn until_rows(store: &Arc<EmbeddedStore>, n: usize, within: std::time::Duration) {
        let started = std::time::Instant::now();
        while pending_rows(store).await != n {
            assert!(
                started.elapsed() < within,
                "{} of {n} pending notifications written after {within:?}",
                pending_rows(store).await
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A flood's pending notifications for 20,000 offline members (past the buffer's bound, so
    /// written at once) go in parts: a foreground write queued meanwhile waits for one part,
    /// not for all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_rooms_pending_notifications_yield_to_foreground_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        with_messages(&store, 1).await;
        let n = 20_000;
        assert!(n > PENDING_FLUSH_ROWS);
        let items: Vec<(UserId, Notification)> = (0..n)
            .map(|i| (UserId::parse(&format!("p{i}")).expect("id"), note(1)))
            .collect();
        store.add_pending(items, 100).await.expect("buffered");
        // Once the writer is on them, a foreground write.
        let started = std::time::Instant::now();
        while pending_rows(&store).await == 0 {
            assert!(started.elapsed().as_secs() < 30, "no part written");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let p = super::super::conformance::profile("late", "Late");
        store.upsert_user(&p, 1).await.expect("foreground write");
        let done = pending_rows(&store).await;
        assert!(
            done < n / 2,
            "the foreground write waited for {done} of {n} pending notifications"
        );
        until_rows(&store, n, std::time::Duration::from_secs(60)).await;
        let last = UserId::parse(&format!("p{}", n - 1)).expect("id");
        assert_eq!(
            store.take_pending(&last).await.expect("take"),
            vec![note(1)]
        );
    }

    /// Parts of a flush are written when no chat write waits; but chat writes that never
    /// leave the writer idle do not hold the flush back for ever: once it is overdue, parts go
    /// with their transactions, and every notification is written while they go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_is_not_starved_by_chat_writes_that_never_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        with_messages(&store, 1).await;
        let n = 4_000;
        let items: Vec<(UserId, Notification)> = (0..n)
            .map(|i| (UserId::parse(&format!("p{i}")).expect("id"), note(1)))
            .collect();
        store.add_pending(items, 100).await.expect("buffered");
        // More writers than one transaction takes (`MAX_BATCH`): the queue is never empty.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writers: Vec<_> = (0..MAX_BATCH * 2)
            .map(|w| {
                let (store, stop, writes) = (store.clone(), stop.clone(), writes.clone());
                tokio::spawn(async move {
                    let p = super::super::conformance::profile(&format!("w{w}"), "Writer");
                    let mut at = 1;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        store.upsert_user(&p, at).await.expect("foreground write");
                        writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        at += 1;
                    }
                })
            })
            .collect();
        until_rows(&store, n, std::time::Duration::from_secs(60)).await;
        let during = writes.load(std::sync::atomic::Ordering::Relaxed);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }
        assert!(
            during > 0,
            "the notifications were written, but no chat write went on meanwhile"
        );
        store.close().await.expect("close");
    }

    /// Pending notifications wait in memory, at most `PENDING_FLUSH_AFTER`: a flood writes a
    /// user's page once per flush, not once per message. Taking them takes the buffered ones
    /// too, after the written ones and within the cap; closing the store writes them.
    #[tokio::test]
    async fn pending_notifications_are_buffered_briefly_and_written_by_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p1, p2) = (
            UserId::parse("p1").expect("id"),
            UserId::parse("p2").expect("id"),
        );
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        with_messages(&store, 52).await;
        // A flood of 50 messages to two offline members: buffered, then written within the
        // flush time, only the newest `cap` of each.
        for i in 1..=50 {
            store
                .add_pending(vec![(p1.clone(), note(i)), (p2.clone(), note(i))], 3)
                .await
                .expect("add");
        }
        assert_eq!(pending_rows(&store).await, 0, "buffered, not written yet");
        until_rows(&store, 6, PENDING_FLUSH_AFTER * 5).await;
        // Written and buffered together, newest `cap`.
        store
            .add_pending(vec![(p1.clone(), note(51))], 3)
            .await
            .expect("add");
        assert_eq!(
            store.take_pending(&p1).await.expect("take"),
            vec![note(49), note(50), note(51)]
        );
        // Buffered when the store closes: written, and there after reopening.
        store
            .add_pending(vec![(p2.clone(), note(52))], 3)
            .await
            .expect("add");
        store.close().await.expect("close");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("reopen");
        assert_eq!(
            store.take_pending(&p2).await.expect("take"),
            vec![note(49), note(50), note(52)]
        );
        assert!(store.take_pending(&p1).await.expect("take").is_empty());
        store.close().await.expect("close");
    }

    /// A flood stores one row per user and room, not one per message: a user who missed
    /// messages one after the other is a run, extended in place by later flushes; a message
    /// the user did not miss breaks the run. Taking gives exactly the missed messages, oldest
    /// first; a user keeps their newest `cap` runs.
    #[tokio::test]
    async fn pending_notifications_are_runs_of_the_missed_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Full).expect("open"));
        with_messages(&store, 60).await;
        let (p1, p2, p3) = (
            UserId::parse("p1").expect("id"),
            UserId::parse("p2").expect("id"),
            UserId::parse("p3").expect("id"),
        );
        // p1 missed 1 to 50 and 52, 53 (not 51: online then); p2 missed only 51.
        for i in (1..=53).filter(|i| *i != 51) {
            store
                .add_pending(vec![(p1.clone(), note(i))], 100)
                .await
                .expect("add");
        }
        store
            .add_pending(vec![(p2.clone(), note(51))], 100)
            .await
            .expect("add");
        until_rows(&store, 53, PENDING_FLUSH_AFTER * 5).await;
        let runs = || {
            let store = store.clone();
            async move {
                store
                    .read(|c| {
                        c.query_row("SELECT count(*) FROM pending_runs", [], |r| {
                            r.get::<_, i64>(0)
                        })
                    })
                    .await
                    .expect("count")
            }
        };
        assert_eq!(runs().await, 3_i64, "p1: 1..=50 and 52..=53; p2: 51");
        // A later flush extends p1's run in place.
        store
            .add_pending(vec![(p1.clone(), note(54)), (p1.clone(), note(55))], 100)
            .await
            .expect("add");
        until_rows(&store, 55, PENDING_FLUSH_AFTER * 5).await;
        assert_eq!(runs().await, 3_i64);
        let want: Vec<Notification> = (1..=55).filter(|i| *i != 51).map(note).collect();
        assert_eq!(store.take_pending(&p1).await.expect("take"), want);
        assert_eq!(store.take_pending(&p2).await.expect("take"), vec![note(51)]);
        // Three runs for a cap of 2: the newest two stay.
        for i in [1, 3, 5] {
            store
                .add_pending(vec![(p3.clone(), note(i))], 2)
                .await
                .expect("add");
        }
        assert_eq!(
            store.take_pending(&p3).await.expect("take"),
            vec![note(3), note(5)]
        );
        // A notification must name its message's position.
        let mut bare = note(6);
        bare.seq = 0;
        assert!(
            store
                .add_pending(vec![(p3.clone(), bare)], 2)
                .await
                .is_err()
        );
        store.close().await.expect("close");
    }

    /// The write-ahead log reaches the database file through the checkpointer thread, with no
    /// help from the writer (its automatic checkpoint is off) and no close.
    #[tokio::test]
    async fn the_checkpointer_copies_the_log_into_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("open");
        let db = dir.path().join("palaver.db");
        let size = || std::fs::metadata(&db).expect("db file").len();
        let before = size();
        for i in 0..2000 {
            let p = super::super::conformance::profile(&format!("c{i}"), &format!("C{i}"));
            store.upsert_user(&p, 1).await.expect("user");
        }
        let started = std::time::Instant::now();
        while size() <= before {
            assert!(
                started.elapsed() < CHECKPOINT_EVERY * 20,
                "the database file still has {before} bytes: nothing was checkpointed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        store.close().await.expect("close");
    }

    /// A steady stream of writes does not grow the write-ahead log without end: past
    /// `WAL_RESTART_PAGES` the writer calls the checkpointer, which makes the next write
    /// restart it from the beginning (a passive checkpoint alone never would: a write always
    /// lands in between). The log's file stays under twice that (about 18 MB here; 45 to 89 MB
    /// when only the checkpointer's 500 ms tick watched the log).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_stays_bounded_under_steady_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path(), Durability::Normal).expect("open");
        let wal = dir.path().join("palaver.db-wal");
        let bound = u64::try_from(WAL_RESTART_PAGES).expect("pages") * 4096 * 2;
        let (mut frames, mut i) = (0u64, 0u64);
        // Until well past the bound's worth of log (each write appends at least one page).
        while frames < 4 * bound / 4096 {
            let p = super::super::conformance::profile(&format!("w{}", i % 500), &format!("W{i}"));
            store.upsert_user(&p, 1).await.expect("user");
            frames += 1;
            i += 1;
        }
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert!(
            size < bound,
            "the log is {size} bytes after {i} writes (bound {bound})"
        );
        store.close().await.expect("close");
    }

    /// A database written before pending notifications were numbered per user keeps them,
    /// oldest first, and trims them from where they were.
    #[tokio::test]
    async fn pending_notifications_survive_the_migration_to_per_user_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut c = Connection::open(dir.path().join("palaver.db")).expect("open");
            // Up to the one that numbered them per user.
            let before = MIGRATIONS.len() - 2;
            for (i, sql) in MIGRATIONS[..before].iter().enumerate() {
                let tx = c.transaction().expect("tx");
                tx.execute_batch(sql).expect("migration");
                tx.pragma_update(None, "user_version", i + 1)
                    .expect("version");
                tx.commit().expect("commit");
            }
            for (user, i) in [("p1", 1), ("p2", 2), ("p1", 3), ("p1", 4)] {
                c.execute(
                    "INSERT INTO pending (user, body) VALUES (?1, ?2)",
                    params![user, serde_json::to_string(&note(i)).expect("json")],
                )
                .expect("insert");
            }
        }
        let store = EmbeddedStore::open(dir.path(), Durability::Full).expect("open");
        with_messages(&store, 7).await;
        store
            .add_pending(vec![(UserId::parse("p1").expect("id"), note(5))], 3)
            .await
            .expect("add");
        let p1 = UserId::parse("p1").expect("id");
        let p2 = UserId::parse("p2").expect("id");
        assert_eq!(
            store.take_pending(&p1).await.expect("take"),
            vec![note(3), note(4), note(5)]
        );
        assert_eq!(store.take_pending(&p2).await.expect("take"), vec![note(2)]);
        store
            .add_pending(vec![(p1.clone(), note(6)), (p1.clone(), note(7))], 3)
            .await
            .expect("add");
        assert_eq!(
            store.take_pending(&p1).await.expect("take"),
            vec![note(6), note(7)]
        );
        store.close().await.expect("close");
    }
}
