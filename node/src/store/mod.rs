//! Storage: the `Store` trait and its backends.
//!
//! The store is the truth; actors are caches and sequencers in front of it. Methods are grouped
//! by aggregate (users, rooms, messages) in create/read/update order. Every backend runs the same
//! [`conformance`] suite.
//!
//! Backends: [`embedded`] (SQLite, the default for `palaver serve`). The PostgreSQL and ScyllaDB
//! backends of the cluster implement the same trait. [`metered::MeteredStore`] wraps any of them
//! and measures each call.

pub mod conformance;
pub mod embedded;
pub mod metered;
pub mod postgres;
pub mod scylla;

use async_trait::async_trait;
use schema::{
    DeadLetter, Device, Event, Friendship, HistoryQuery, Member, Message, MessageId, Millis,
    Notification, Profile, Role, Room, RoomId, RoomKind, RoomSummary, Upload, User, UserId,
};

/// Store failures. All are server-side: a client sees them as `unavailable` or `internal`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or refused the operation; retrying may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A write contradicts stored data (for example a `client_ref` stored twice): a second
    /// writer for one room, which the ring prevents; the room actor restarts and reloads.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// A new message repeats a `(sender, client_ref)` already stored in its room; nothing of
    /// the write was stored. Every backend checks this atomically with the write, so a room's
    /// writer need not look the key up first: it writes, and only on this error reads the
    /// stored message to answer the retry with it.
    #[error("client_ref already stored: {0}")]
    DuplicateRef(String),
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
}

impl From<StoreError> for schema::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(_) | StoreError::Conflict(_) | StoreError::DuplicateRef(_) => {
                schema::Error::internal(e.to_string())
            }
            StoreError::Unavailable(_) | StoreError::Closed => {
                schema::Error::unavailable(e.to_string())
            }
        }
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A new room with its initial members.
#[derive(Clone, Debug)]
pub struct NewRoom {
    /// The room (its `last_*` fields are ignored).
    pub room: Room,
    /// Initial members, including the creator.
    pub members: Vec<Member>,
}

/// A group's name, avatar or visibility after a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomPatch {
    /// Name.
    pub name: Option<String>,
    /// Avatar.
    pub avatar: Option<String>,
    /// Visibility.
    pub public: bool,
}

/// One atomic batch of changes to a room, written by its single writer (the room's sequencer)
/// in sequence order.
///
/// Contract every backend keeps (the conformance suite checks it): the sequence numbers of the
/// batch (its new messages and log entries) continue directly from the room's stored `last_seq`
/// (a backend may refuse anything else with `Conflict`, ScyllaDB does: it fences a second
/// writer that way); a member upsert of an existing member changes the role only and keeps
/// `joined_at`; `last_message_id` only moves with new messages.
#[derive(Clone, Debug, Default)]
pub struct RoomWrite {
    /// New messages; a `(sender, client_ref)` already stored fails the whole write with
    /// [`StoreError::DuplicateRef`].
    pub new_messages: Vec<Message>,
    /// Messages whose content changed (edit, tombstone, reactions), rewritten whole.
    pub changed_messages: Vec<Message>,
    /// The ordered events other than new messages, kept for replay: `(seq, event)`.
    pub log: Vec<(u64, Event)>,
    /// Members added, or whose role changed.
    pub upsert_members: Vec<Member>,
    /// Members removed.
    pub remove_members: Vec<UserId>,
    /// The group's new name/avatar/visibility.
    pub patch: Option<RoomPatch>,
    /// The room's sequence number after the batch.
    pub last_seq: u64,
    /// Its newest message after the batch.
    pub last_message_id: Option<MessageId>,
    /// When the batch happened (orders chat lists by last activity; only new messages move it).
    pub at: Millis,
}

/// A page of history, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// The messages, newest first.
    pub messages: Vec<Message>,
    /// Whether more messages exist beyond the page in the direction it was read.
    pub has_more: bool,
}

/// Persistent state of Palaver. Implementations must be safe to call concurrently; a write that
/// returned `Ok` is durable (it survives `kill -9` of the process).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- users ----

    /// Creates the user or refreshes its profile; returns the stored user.
    async fn upsert_user(&self, profile: &Profile, now: Millis) -> StoreResult<User>;

    /// Reads a user.
    async fn user(&self, id: &UserId) -> StoreResult<Option<User>>;

    /// Records when the user's last session closed. A later read of the user sees it; a store
    /// may write it a moment later (the embedded store within a second, see its
    /// `LastSeenBuffer`), and a crash may lose that moment's times, never an older one's.
    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()>;

    /// Finds a user by username (exact match).
    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>>;

    // ---- rooms ----

    /// Creates a room with its members.
    async fn create_room(&self, new: NewRoom) -> StoreResult<()>;

    /// Returns the direct room of the pair, creating `candidate` (with both users as members) if
    /// there is none. Atomic: concurrent calls for one pair return the same room. The bool tells
    /// whether this call created it.
    async fn get_or_create_direct(&self, candidate: NewRoom) -> StoreResult<(Room, bool)>;

    /// Reads a room.
    async fn room(&self, id: RoomId) -> StoreResult<Option<Room>>;

    /// Reads a room's members.
    async fn members(&self, room: RoomId) -> StoreResult<Vec<Member>>;

    /// How many members a room has, counting no further than `limit` (so the answer is
    /// `min(members, limit)`, in time bounded by `limit` where the backend can count).
    async fn member_count_up_to(&self, room: RoomId, limit: usize) -> StoreResult<usize> {
        Ok(self.members(room).await?.len().min(limit))
    }

    /// The ids of the rooms `user` belongs to.
    async fn room_ids_of(&self, user: &UserId) -> StoreResult<Vec<RoomId>>;

    /// Who hears about `user`'s presence: accepted friends, the other member of each direct
    /// room, and the members of each group of at most `group_max` members; without `user`
    /// and without anyone with a block between them and `user`. Sorted, each once.
    ///
    /// Read at every connect and disconnect. This default composes the other reads (five
    /// round trips and more); a backend that can answer in one query should (the embedded
    /// store does: ten thousand sessions closing at once were fifty thousand reads).
    async fn presence_audience(&self, user: &UserId, group_max: usize) -> StoreResult<Vec<UserId>> {
        presence_audience_by_parts(self, user, group_max).await
    }

    /// The rooms `user` belongs to with members and newest message, most recently active first.
    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomSummary>>;

    /// The direct room of the pair, if one exists.
    async fn direct_room(&self, a: &UserId, b: &UserId) -> StoreResult<Option<RoomId>>;

    /// Applies a batch of changes to a room atomically (see [`RoomWrite`]) and advances its
    /// `last_seq` / `last_message_id`.
    async fn apply_room(&self, room: RoomId, write: RoomWrite) -> StoreResult<()>;

    // ---- messages ----

    /// Appends messages of one room in one atomic, durable write and advances the room's
    /// `last_seq`/`last_message_id`. The caller (the room's single writer) has assigned ids and
    /// sequence numbers; a `(room, sender, client_ref)` already stored makes the whole call fail
    /// with [`StoreError::DuplicateRef`].
    async fn append_messages(&self, room: RoomId, batch: Vec<Message>) -> StoreResult<()> {
        let Some(last) = batch.iter().max_by_key(|m| m.seq) else {
            return Ok(());
        };
        let write = RoomWrite {
            last_seq: last.seq,
            last_message_id: Some(last.id),
            at: last.created_at,
            new_messages: batch,
            ..RoomWrite::default()
        };
        self.apply_room(room, write).await
    }

    /// Reads one message.
    async fn message(&self, room: RoomId, id: MessageId) -> StoreResult<Option<Message>>;

    /// Messages of `room` with `seq > after_seq`, oldest first, at most `limit`.
    async fn messages_after_seq(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;

    /// Logged ordered events of `room` with `seq > after_seq`, oldest first, at most `limit`.
    async fn room_log(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Event)>>;

    /// Finds stored messages of `room` by `(sender, client_ref)`.
    async fn messages_by_client_ref(
        &self,
        room: RoomId,
        keys: Vec<(UserId, String)>,
    ) -> StoreResult<Vec<Message>>;

    /// Reads a page of history (see [`HistoryQuery`] for the bounds); `limit` is already clamped.
    async fn history(
        &self,
        room: RoomId,
        query: &HistoryQuery,
        limit: u32,
    ) -> StoreResult<HistoryPage>;

    // ---- read markers ----

    /// Moves `user`'s read marker in `room` forward to `up_to` (never backwards).
    async fn set_read_marker(
        &self,
        room: RoomId,
        user: &UserId,
        up_to: MessageId,
    ) -> StoreResult<()>;

    /// `user`'s read marker in `room`.
    async fn read_marker(&self, room: RoomId, user: &UserId) -> StoreResult<Option<MessageId>>;

    /// Messages of `room` newer than `after` (all when `None`), not sent by `user` and not
    /// deleted, counted up to `cap`.
    async fn unread_count(
        &self,
        room: RoomId,
        user: &UserId,
        after: Option<MessageId>,
        cap: u32,
    ) -> StoreResult<u32>;

    // ---- friendships and blocks ----

    /// The friendship of a pair, whichever asked.
    async fn friendship(&self, a: &UserId, b: &UserId) -> StoreResult<Option<Friendship>>;

    /// Creates or replaces the friendship of the pair `f.requester`, `f.addressee`.
    async fn put_friendship(&self, f: &Friendship) -> StoreResult<()>;

    /// Removes the friendship of a pair.
    async fn delete_friendship(&self, a: &UserId, b: &UserId) -> StoreResult<()>;

    /// Every friendship (any status) `user` is part of.
    async fn friendships_of(&self, user: &UserId) -> StoreResult<Vec<Friendship>>;

    /// Records (`on`) or lifts a block of `blocked` by `blocker`.
    async fn set_block(&self, blocker: &UserId, blocked: &UserId, on: bool) -> StoreResult<()>;

    /// Every block `user` is part of, either way, as `(blocker, blocked)`.
    async fn blocks_of(&self, user: &UserId) -> StoreResult<Vec<(UserId, UserId)>>;

    // ---- pending notifications ----

    /// Records notifications for users, keeping at most `cap` per user (the oldest go). Each
    /// names its message's `seq` (1 or more).
    async fn add_pending(&self, items: Vec<(UserId, Notification)>, cap: u32) -> StoreResult<()>;

    /// Takes (reads and removes) `user`'s pending notifications, oldest first. Each shows its
    /// message as it is now: an edited one's preview is the new text, a deleted one is left
    /// out (see [`refresh_notifications`]).
    async fn take_pending(&self, user: &UserId) -> StoreResult<Vec<Notification>>;

    // ---- uploads ----

    /// Records a stored upload (its path is unique; recording it again changes nothing).
    async fn add_upload(&self, upload: &Upload) -> StoreResult<()>;

    /// The upload stored at public path `path`, if any.
    async fn upload(&self, path: &str) -> StoreResult<Option<Upload>>;

    /// Records that the media at `path` was posted in `room` (idempotent).
    async fn add_media_post(&self, path: &str, room: RoomId) -> StoreResult<()>;

    /// The rooms the media at `path` was posted in.
    async fn media_rooms(&self, path: &str) -> StoreResult<Vec<RoomId>>;

    // ---- devices, mutes and push ----

    /// Registers `device` (keyed by its token: a token registered again, by the same or another
    /// user, replaces the earlier registration).
    async fn add_device(&self, device: &Device) -> StoreResult<()>;

    /// Removes `user`'s device with `token`; false when `user` has no such device.
    async fn remove_device(&self, user: &UserId, token: &str) -> StoreResult<bool>;

    /// Removes a token whoever it belongs to (the provider said it is no longer valid).
    async fn remove_device_token(&self, token: &str) -> StoreResult<()>;

    /// `user`'s devices, oldest registration first.
    async fn devices_of(&self, user: &UserId) -> StoreResult<Vec<Device>>;

    /// Mutes (`true`) or unmutes `room` for `user`: a muted room sends them no push.
    async fn set_muted(&self, room: RoomId, user: &UserId, muted: bool) -> StoreResult<()>;

    /// The members who muted `room`.
    async fn muted_in(&self, room: RoomId) -> StoreResult<Vec<UserId>>;

    /// Keeps a push that will not be retried.
    async fn add_dead_letter(&self, letter: &DeadLetter) -> StoreResult<()>;

    /// The newest `limit` dead letters, newest first.
    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>>;

    // ---- lifecycle ----

    /// A round trip to the backend (a trivial read), for readiness checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Flushes everything written and releases the backend; later calls fail with `Closed`.
    async fn close(&self) -> StoreResult<()>;
}

/// The canonical key of a direct room between two users: the pair in sorted order.
pub fn direct_key(a: &UserId, b: &UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    // Lengths make the key unambiguous whatever characters the ids contain.
    format!("{}:{}:{}", lo.as_str().len(), lo, hi)
}

/// [`Store::presence_audience`] composed of the other reads: the trait's default, kept apart so
/// that the conformance suite holds every backend's own answer to it.
pub async fn presence_audience_by_parts<S: Store + ?Sized>(
    store: &S,
    user: &UserId,
    group_max: usize,
) -> StoreResult<Vec<UserId>> {
    let blocked: std::collections::HashSet<UserId> = store
        .blocks_of(user)
        .await?
        .into_iter()
        .map(|(a, b)| if &a == user { b } else { a })
        .collect();
    let mut audience: std::collections::BTreeSet<UserId> = store
        .friendships_of(user)
        .await?
        .iter()
        .filter(|f| f.status == schema::FriendshipStatus::Accepted)
        .map(|f| f.other(user).clone())
        .collect();
    for room in store.room_ids_of(user).await? {
        let Some(r) = store.room(room).await? else {
            continue;
        };
        // Counted (no further than the limit) before read: a big group's members are
        // never loaded here (they were, at every connect of every member: 5,000 members
        // of a 200,000-member group coming online read a billion rows).
        if r.kind == RoomKind::Direct
            || store
                .member_count_up_to(room, group_max.saturating_add(1))
                .await?
                <= group_max
        {
            audience.extend(store.members(room).await?.into_iter().map(|m| m.user));
        }
    }
    audience.remove(user);
    Ok(audience
        .into_iter()
        .filter(|u| !blocked.contains(u))
        .collect())
}

/// How a room kind is stored.
/// Taken notifications as their messages are now (`current`: the stored messages they name,
/// in any order): an edited message's preview is its new text, a deleted message is left out.
/// A notification whose message is not among them keeps what was stored.
pub(crate) fn refresh_notifications(
    taken: Vec<Notification>,
    current: &[Message],
) -> Vec<Notification> {
    let by_id: std::collections::HashMap<(RoomId, MessageId), &Message> =
        current.iter().map(|m| ((m.room, m.id), m)).collect();
    taken
        .into_iter()
        .filter_map(|mut n| match by_id.get(&(n.room, n.message_id)) {
            Some(m) if m.deleted_at.is_some() => None,
            Some(m) => {
                n.preview = m.body.preview();
                Some(n)
            }
            None => Some(n),
        })
        .collect()
}

/// The notification of a message, as the room actor makes it.
pub(crate) fn notification_of(m: &Message) -> Notification {
    Notification {
        room: m.room,
        message_id: m.id,
        seq: m.seq,
        sender: m.sender.clone(),
        preview: m.body.preview(),
        created_at: m.created_at,
    }
}

/// Messages `first..=last` of `room`, pending for `user` one after the other (the last
/// accepted at `last_at`): how the embedded and PostgreSQL stores keep pending notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PendingRun {
    pub user: UserId,
    pub room: RoomId,
    pub first: u64,
    pub last: u64,
    pub last_at: Millis,
}

/// `items` as runs, in order: a notification that follows the last one of its user and room
/// (the next `seq`) extends that run; each run keeps its newest `cap`. A notification without
/// its message's `seq` is refused.
pub(crate) fn pending_runs(
    items: Vec<(UserId, Notification)>,
    cap: u32,
) -> StoreResult<Vec<PendingRun>> {
    let keep = u64::from(cap.max(1));
    let mut runs: Vec<PendingRun> = Vec::new();
    let mut latest: std::collections::HashMap<(UserId, RoomId), usize> =
        std::collections::HashMap::new();
    for (user, n) in items {
        if n.seq == 0 {
            return Err(StoreError::Corrupt(format!(
                "pending notification of message {} without its seq",
                n.message_id
            )));
        }
        let key = (user, n.room);
        match latest.get(&key).and_then(|i| runs.get_mut(*i)) {
            Some(run) if run.last.checked_add(1) == Some(n.seq) => {
                run.last = n.seq;
                run.last_at = n.created_at;
                run.first = run.first.max(run.last.saturating_sub(keep - 1));
            }
            _ => {
                latest.insert(key.clone(), runs.len());
                runs.push(PendingRun {
                    user: key.0,
                    room: n.room,
                    first: n.seq,
                    last: n.seq,
                    last_at: n.created_at,
                });
            }
        }
    }
    Ok(runs)
}

/// What a user takes of `found` (notifications of their runs' messages, read now, and older
/// ones stored whole): without the user's own messages, oldest first, the newest `cap`.
pub(crate) fn newest_pending(
    user: &UserId,
    mut found: Vec<Notification>,
    cap: usize,
) -> Vec<Notification> {
    found.retain(|n| &n.sender != user);
    // A stable sort: older ones stored whole come first among equals.
    found.sort_by_key(|n| (n.created_at, n.room, n.seq));
    let over = found.len().saturating_sub(cap);
    found.drain(..over);
    found
}

pub(crate) fn kind_str(k: RoomKind) -> &'static str {
    match k {
        RoomKind::Direct => "direct",
        RoomKind::Group => "group",
    }
}

/// Reads a stored room kind.
pub(crate) fn parse_kind(s: &str) -> Option<RoomKind> {
    match s {
        "direct" => Some(RoomKind::Direct),
        "group" => Some(RoomKind::Group),
        _ => None,
    }
}

/// How a role is stored.
pub(crate) fn role_str(r: Role) -> &'static str {
    match r {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

/// Reads a stored role.
pub(crate) fn parse_role(s: &str) -> Option<Role> {
    match s {
        "owner" => Some(Role::Owner),
        "admin" => Some(Role::Admin),
        "member" => Some(Role::Member),
        _ => None,
    }
}

/// An id as a signed 64-bit column (ids stay below 2^53, so nothing is lost).
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A signed 64-bit column as an id or counter.
pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
