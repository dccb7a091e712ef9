//! A [`Store`] decorator that measures every call, whatever the backend: the time of each
//! operation (`palaver_store_seconds{op}`, a histogram) and its failures
//! (`palaver_store_errors_total{op}`) and the calls in flight (`palaver_store_inflight{op}`: one
//! that stays up names a stuck store call). [`StoreError::DuplicateRef`] is not a failure: it is how a
//! backend answers a retried send, and the room handles it.
//!
//! The metric handles are registered once, when the decorator is built, so a call costs two
//! clock reads and one histogram record. Built without a metrics recorder installed (node tests),
//! the handles do nothing.

use super::{HistoryPage, NewRoom, RoomWrite, Store, StoreError, StoreResult};
use async_trait::async_trait;
use metrics::{Counter, Gauge, Histogram};
use schema::{
    DeadLetter, Device, Event, Friendship, HistoryQuery, Member, Message, MessageId, Millis,
    Notification, Profile, Room, RoomId, RoomSummary, Upload, User, UserId,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// The time, failures and calls in flight of one store operation.
struct Op {
    seconds: Histogram,
    errors: Counter,
    inflight: Gauge,
}

/// Counts a call in flight until dropped (also when the caller gives up on it).
struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Op {
    fn new(op: &'static str) -> Self {
        Self {
            seconds: metrics::histogram!("palaver_store_seconds", "op" => op),
            errors: metrics::counter!("palaver_store_errors_total", "op" => op),
            inflight: metrics::gauge!("palaver_store_inflight", "op" => op),
        }
    }

    async fn time<T>(&self, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let started = Instant::now();
        self.inflight.increment(1.0);
        let _inflight = InFlight(&self.inflight);
        let res = call.await;
        self.seconds.record(started.elapsed());
        if let Err(e) = &res
            && !matches!(e, StoreError::DuplicateRef(_))
        {
            self.errors.increment(1);
        }
        res
    }
}

/// One handle pair per operation of the [`Store`] trait.
struct Ops {
    upsert_user: Op,
    user: Op,
    set_last_seen: Op,
    user_by_username: Op,
    create_room: Op,
    get_or_create_direct: Op,
    room: Op,
    members: Op,
    room_ids_of: Op,
    presence_audience: Op,
    rooms_of: Op,
    direct_room: Op,
    apply_room: Op,
    append_messages: Op,
    message: Op,
    messages_after_seq: Op,
    room_log: Op,
    messages_by_client_ref: Op,
    history: Op,
    set_read_marker: Op,
    read_marker: Op,
    unread_count: Op,
    friendship: Op,
    put_friendship: Op,
    delete_friendship: Op,
    friendships_of: Op,
    set_block: Op,
    blocks_of: Op,
    add_pending: Op,
    take_pending: Op,
    add_upload: Op,
    upload: Op,
    add_media_post: Op,
    media_rooms: Op,
    add_device: Op,
    remove_device: Op,
    remove_device_token: Op,
    devices_of: Op,
    set_muted: Op,
    muted_in: Op,
    add_dead_letter: Op,
    dead_letters: Op,
    ping: Op,
    close: Op,
}

impl Ops {
    fn new() -> Self {
        Self {
            upsert_user: Op::new("upsert_user"),
            user: Op::new("user"),
            set_last_seen: Op::new("set_last_seen"),
            user_by_username: Op::new("user_by_username"),
            create_room: Op::new("create_room"),
            get_or_create_direct: Op::new("get_or_create_direct"),
            room: Op::new("room"),
            members: Op::new("members"),
            room_ids_of: Op::new("room_ids_of"),
            presence_audience: Op::new("presence_audience"),
            rooms_of: Op::new("rooms_of"),
            direct_room: Op::new("direct_room"),
            apply_room: Op::new("apply_room"),
            append_messages: Op::new("append_messages"),
            message: Op::new("message"),
            messages_after_seq: Op::new("messages_after_seq"),
            room_log: Op::new("room_log"),
            messages_by_client_ref: Op::new("messages_by_client_ref"),
            history: Op::new("history"),
            set_read_marker: Op::new("set_read_marker"),
            read_marker: Op::new("read_marker"),
            unread_count: Op::new("unread_count"),
            friendship: Op::new("friendship"),
            put_friendship: Op::new("put_friendship"),
            delete_friendship: Op::new("delete_friendship"),
            friendships_of: Op::new("friendships_of"),
            set_block: Op::new("set_block"),
            blocks_of: Op::new("blocks_of"),
            add_pending: Op::new("add_pending"),
            take_pending: Op::new("take_pending"),
            add_upload: Op::new("add_upload"),
            upload: Op::new("upload"),
            add_media_post: Op::new("add_media_post"),
            media_rooms: Op::new("media_rooms"),
            add_device: Op::new("add_device"),
            remove_device: Op::new("remove_device"),
            remove_device_token: Op::new("remove_device_token"),
            devices_of: Op::new("devices_of"),
            set_muted: Op::new("set_muted"),
            muted_in: Op::new("muted_in"),
            add_dead_letter: Op::new("add_dead_letter"),
            dead_letters: Op::new("dead_letters"),
            ping: Op::new("ping"),
            close: Op::new("close"),
        }
    }
}

/// A [`Store`] that forwards every call to `inner` and measures it.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    ops: Ops,
}

impl MeteredStore {
    /// Wraps `inner`; its metric handles are registered now.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            ops: Ops::new(),
        }
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn upsert_user(&self, profile: &Profile, now: Millis) -> StoreResult<User> {
        self.ops
            .upsert_user
            .time(self.inner.upsert_user(profile, now))
            .await
    }

    async fn user(&self, id: &UserId) -> StoreResult<Option<User>> {
        self.ops.user.time(self.inner.user(id)).await
    }

    async fn set_last_seen(&self, id: &UserId, at: Millis) -> StoreResult<()> {
        self.ops
            .set_last_seen
            .time(self.inner.set_last_seen(id, at))
            .await
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        self.ops
            .user_by_username
            .time(self.inner.user_by_username(username))
            .await
    }

    async fn create_room(&self, new: NewRoom) -> StoreResult<()> {
        self.ops.create_room.time(self.inner.create_room(new)).await
    }

    async fn get_or_create_direct(&self, candidate: NewRoom) -> StoreResult<(Room, bool)> {
        self.ops
            .get_or_create_direct
            .time(self.inner.get_or_create_direct(candidate))
            .await
    }

    async fn room(&self, id: RoomId) -> StoreResult<Option<Room>> {
        self.ops.room.time(self.inner.room(id)).await
    }

    async fn members(&self, room: RoomId) -> StoreResult<Vec<Member>> {
        self.ops.members.time(self.inner.members(room)).await
    }

    async fn member_count_up_to(&self, room: RoomId, limit: usize) -> StoreResult<usize> {
        self.ops
            .members
            .time(self.inner.member_count_up_to(room, limit))
            .await
    }

    async fn room_ids_of(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        self.ops
            .room_ids_of
            .time(self.inner.room_ids_of(user))
            .await
    }

    async fn presence_audience(&self, user: &UserId, group_max: usize) -> StoreResult<Vec<UserId>> {
        self.ops
            .presence_audience
            .time(self.inner.presence_audience(user, group_max))
            .await
    }

    async fn rooms_of(&self, user: &UserId) -> StoreResult<Vec<RoomSummary>> {
        self.ops.rooms_of.time(self.inner.rooms_of(user)).await
    }

    async fn direct_room(&self, a: &UserId, b: &UserId) -> StoreResult<Option<RoomId>> {
        self.ops
            .direct_room
            .time(self.inner.direct_room(a, b))
            .await
    }

    async fn apply_room(&self, room: RoomId, write: RoomWrite) -> StoreResult<()> {
        self.ops
            .apply_room
            .time(self.inner.apply_room(room, write))
            .await
    }

    async fn append_messages(&self, room: RoomId, batch: Vec<Message>) -> StoreResult<()> {
        self.ops
            .append_messages
            .time(self.inner.append_messages(room, batch))
            .await
    }

    async fn message(&self, room: RoomId, id: MessageId) -> StoreResult<Option<Message>> {
        self.ops.message.time(self.inner.message(room, id)).await
    }

    async fn messages_after_seq(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        self.ops
            .messages_after_seq
            .time(self.inner.messages_after_seq(room, after_seq, limit))
            .await
    }

    async fn room_log(
        &self,
        room: RoomId,
        after_seq: u64,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Event)>> {
        self.ops
            .room_log
            .time(self.inner.room_log(room, after_seq, limit))
            .await
    }

    async fn messages_by_client_ref(
        &self,
        room: RoomId,
        keys: Vec<(UserId, String)>,
    ) -> StoreResult<Vec<Message>> {
        self.ops
            .messages_by_client_ref
            .time(self.inner.messages_by_client_ref(room, keys))
            .await
    }

    async fn history(
        &self,
        room: RoomId,
        query: &HistoryQuery,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        self.ops
            .history
            .time(self.inner.history(room, query, limit))
            .await
    }

    async fn set_read_marker(
        &self,
        room: RoomId,
        user: &UserId,
        up_to: MessageId,
    ) -> StoreResult<()> {
        self.ops
            .set_read_marker
            .time(self.inner.set_read_marker(room, user, up_to))
            .await
    }

    async fn read_marker(&self, room: RoomId, user: &UserId) -> StoreResult<Option<MessageId>> {
        self.ops
            .read_marker
            .time(self.inner.read_marker(room, user))
            .await
    }

    async fn unread_count(
        &self,
        room: RoomId,
        user: &UserId,
        after: Option<MessageId>,
        cap: u32,
    ) -> StoreResult<u32> {
        self.ops
            .unread_count
            .time(self.inner.unread_count(room, user, after, cap))
            .await
    }

    async fn friendship(&self, a: &UserId, b: &UserId) -> StoreResult<Option<Friendship>> {
        self.ops.friendship.time(self.inner.friendship(a, b)).await
    }

    async fn put_friendship(&self, f: &Friendship) -> StoreResult<()> {
        self.ops
            .put_friendship
            .time(self.inner.put_friendship(f))
            .await
    }

    async fn delete_friendship(&self, a: &UserId, b: &UserId) -> StoreResult<()> {
        self.ops
            .delete_friendship
            .time(self.inner.delete_friendship(a, b))
            .await
    }

    async fn friendships_of(&self, user: &UserId) -> StoreResult<Vec<Friendship>> {
        self.ops
            .friendships_of
            .time(self.inner.friendships_of(user))
            .await
    }

    async fn set_block(&self, blocker: &UserId, blocked: &UserId, on: bool) -> StoreResult<()> {
        self.ops
            .set_block
            .time(self.inner.set_block(blocker, blocked, on))
            .await
    }

    async fn blocks_of(&self, user: &UserId) -> StoreResult<Vec<(UserId, UserId)>> {
        self.ops.blocks_of.time(self.inner.blocks_of(user)).await
    }

    async fn add_pending(&self, items: Vec<(UserId, Notification)>, cap: u32) -> StoreResult<()> {
        self.ops
            .add_pending
            .time(self.inner.add_pending(items, cap))
            .await
    }

    async fn take_pending(&self, user: &UserId) -> StoreResult<Vec<Notification>> {
        self.ops
            .take_pending
            .time(self.inner.take_pending(user))
            .await
    }

    async fn add_upload(&self, upload: &Upload) -> StoreResult<()> {
        self.ops
            .add_upload
            .time(self.inner.add_upload(upload))
            .await
    }

    async fn upload(&self, path: &str) -> StoreResult<Option<Upload>> {
        self.ops.upload.time(self.inner.upload(path)).await
    }

    async fn add_media_post(&self, path: &str, room: RoomId) -> StoreResult<()> {
        self.ops
            .add_media_post
            .time(self.inner.add_media_post(path, room))
            .await
    }

    async fn media_rooms(&self, path: &str) -> StoreResult<Vec<RoomId>> {
        self.ops
            .media_rooms
            .time(self.inner.media_rooms(path))
            .await
    }

    async fn add_device(&self, device: &Device) -> StoreResult<()> {
        self.ops
            .add_device
            .time(self.inner.add_device(device))
            .await
    }

    async fn remove_device(&self, user: &UserId, token: &str) -> StoreResult<bool> {
        self.ops
            .remove_device
            .time(self.inner.remove_device(user, token))
            .await
    }

    async fn remove_device_token(&self, token: &str) -> StoreResult<()> {
        self.ops
            .remove_device_token
            .time(self.inner.remove_device_token(token))
            .await
    }

    async fn devices_of(&self, user: &UserId) -> StoreResult<Vec<Device>> {
        self.ops.devices_of.time(self.inner.devices_of(user)).await
    }

    async fn set_muted(&self, room: RoomId, user: &UserId, muted: bool) -> StoreResult<()> {
        self.ops
            .set_muted
            .time(self.inner.set_muted(room, user, muted))
            .await
    }

    async fn muted_in(&self, room: RoomId) -> StoreResult<Vec<UserId>> {
        self.ops.muted_in.time(self.inner.muted_in(room)).await
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> StoreResult<()> {
        self.ops
            .add_dead_letter
            .time(self.inner.add_dead_letter(letter))
            .await
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        self.ops
            .dead_letters
            .time(self.inner.dead_letters(limit))
            .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.ops.ping.time(self.inner.ping()).await
    }

    async fn close(&self) -> StoreResult<()> {
        self.ops.close.time(self.inner.close()).await
    }
}
