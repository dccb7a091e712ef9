//! The canonical client -> server vocabulary.
//!
//! Every dialect decodes its frames into a [`Command`]; the node executes it for the
//! authenticated user (never a user named inside the command) and answers with a [`Reply`] or an
//! [`crate::Error`].

use crate::domain::{
    Chat, FriendView, Friendship, Member, Message, MessageBody, Role, RoomSummary, User,
};
use crate::event::Event;
use crate::ids::{GatewayId, MessageId, RoomId, SessionId, UserId};
use serde::{Deserialize, Serialize};

/// Longest accepted `client_ref`, in bytes.
pub const MAX_CLIENT_REF_LEN: usize = 128;

/// A reference to one client session, filled in by the gateway (never decoded from a client).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionRef {
    /// The gateway holding the socket.
    pub gateway: GatewayId,
    /// The session on it.
    pub session: SessionId,
}

/// What to do to a friendship.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FriendAction {
    /// Ask `peer` to be friends (or accept their pending request).
    Request,
    /// Accept `peer`'s pending request.
    Accept,
    /// Reject `peer`'s pending request.
    Reject,
    /// Withdraw my pending request to `peer`, or end a friendship.
    Cancel,
    /// Block `peer`: no direct messages either way, no presence either way.
    Block,
    /// Lift my block of `peer`.
    Unblock,
}

/// Everything a client can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Get or create the direct room between the caller and `peer` (one per pair).
    OpenDirect {
        /// The other user.
        peer: UserId,
    },
    /// Create a group owned by the caller with the given other members.
    CreateGroup {
        /// Display name, 1 to 100 characters.
        name: String,
        /// Other members; the caller is added as owner.
        members: Vec<UserId>,
        /// Avatar URL or upload reference.
        #[serde(default)]
        avatar: Option<String>,
        /// Whether anyone may join by id.
        #[serde(default)]
        public: bool,
    },
    /// Change a group's name, avatar or visibility (owner or admin).
    UpdateGroup {
        /// The group.
        room: RoomId,
        /// New name.
        #[serde(default)]
        name: Option<String>,
        /// New avatar (empty string clears it).
        #[serde(default)]
        avatar: Option<String>,
        /// New visibility.
        #[serde(default)]
        public: Option<bool>,
    },
    /// Add users to a group (owner or admin).
    AddMembers {
        /// The group.
        room: RoomId,
        /// Who to add.
        users: Vec<UserId>,
    },
    /// Remove a member from a group (owner, or an admin removing a plain member).
    RemoveMember {
        /// The group.
        room: RoomId,
        /// Who to remove.
        user: UserId,
    },
    /// Make a member an admin or a plain member (owner only).
    SetRole {
        /// The group.
        room: RoomId,
        /// The member.
        user: UserId,
        /// `admin` or `member`.
        role: Role,
    },
    /// Join a public group.
    Join {
        /// The group.
        room: RoomId,
    },
    /// Leave a group. An owner leaving hands ownership to the oldest admin, else the oldest
    /// member; the last member leaving leaves the group empty.
    Leave {
        /// The group.
        room: RoomId,
    },
    /// A room (kind, name, members with their online state, newest message): `Reply::Room`
    /// with `created: false`. Members only.
    Room {
        /// The room.
        room: RoomId,
    },
    /// A room's members with their online state.
    Members {
        /// The room.
        room: RoomId,
    },
    /// Post a message. Retrying with the same `client_ref` returns the original message.
    Send {
        /// Target room.
        room: RoomId,
        /// Content.
        body: MessageBody,
        /// Idempotency key chosen by the client, unique per (room, sender).
        client_ref: Option<String>,
        /// The message this one answers.
        #[serde(default)]
        reply_to: Option<MessageId>,
    },
    /// Replace the text or caption of one's own message.
    Edit {
        /// The room.
        room: RoomId,
        /// The message.
        message: MessageId,
        /// New text (text messages) or caption (media messages).
        text: String,
    },
    /// Delete messages (author, or a room owner/admin). Each leaves a tombstone.
    Delete {
        /// The room.
        room: RoomId,
        /// The messages, 1 to 100.
        messages: Vec<MessageId>,
    },
    /// Add or remove the caller's reaction to a message.
    React {
        /// The room.
        room: RoomId,
        /// The message.
        message: MessageId,
        /// The emoji, 1 to 32 bytes.
        emoji: String,
        /// `true` adds, `false` removes.
        add: bool,
    },
    /// Mark the room read up to `message` (the newest message when absent).
    MarkRead {
        /// The room.
        room: RoomId,
        /// Up to which message.
        #[serde(default)]
        message: Option<MessageId>,
    },
    /// Tell the room the caller is (or stopped) typing. Never stored; expires on its own.
    Typing {
        /// The room.
        room: RoomId,
        /// Typing or stopped.
        typing: bool,
    },
    /// The session is (or stopped) viewing the room: a viewing member gets no push and no
    /// pending notification for it.
    View {
        /// The room.
        room: RoomId,
        /// Viewing or not.
        viewing: bool,
        /// The session, set by the gateway.
        #[serde(default)]
        session: Option<SessionRef>,
    },
    /// Read a page of a room's history.
    History {
        /// The room.
        room: RoomId,
        /// Which page.
        query: HistoryQuery,
    },
    /// The events of a room after `after_seq`, in order, to catch up after a reconnect.
    Replay {
        /// The room.
        room: RoomId,
        /// The last sequence number the client saw.
        after_seq: u64,
    },
    /// List the caller's rooms, most recently active first.
    ListRooms,
    /// The caller's chat list: rooms by last activity with peer, last message, unread count.
    Chats {
        /// Only direct rooms.
        #[serde(default)]
        direct_only: bool,
        /// Entries to skip.
        #[serde(default)]
        skip: u32,
        /// Page size (clamped).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Change a friendship with `peer`.
    Friend {
        /// The other user.
        peer: UserId,
        /// What to do.
        action: FriendAction,
    },
    /// The caller's friendships (accepted only, or every state).
    Friendships {
        /// Include pending, rejected and blocked.
        #[serde(default)]
        all: bool,
    },
    /// A user's profile by id or username.
    User {
        /// By id.
        #[serde(default)]
        id: Option<UserId>,
        /// By username.
        #[serde(default)]
        username: Option<String>,
    },
    /// Take (and so clear) the caller's pending notifications: what arrived while they had no
    /// session viewing the room. For a dialect that shows them only once the client asks
    /// (Phoenix, on joining `notifications:<user>`).
    TakePending,
    /// Record an upload the gateway stored for the caller (who must be its uploader).
    AddUpload {
        /// The upload.
        upload: crate::domain::Upload,
    },
    /// May the caller read the media at `path`? Yes (`Done`) for its uploader and for members
    /// of a room it was posted in; otherwise `forbidden` (or `not_found` when no such upload).
    MediaAccess {
        /// The public path, `/uploads/...`.
        path: String,
    },
    /// Register a device of the caller for push notifications.
    AddDevice {
        /// Where it receives pushes.
        platform: crate::domain::Platform,
        /// The provider's token.
        token: String,
        /// The client's own device id, if it has one.
        #[serde(default)]
        device_id: Option<String>,
    },
    /// Remove the caller's device with `token` (`not_found` when the caller has none).
    RemoveDevice {
        /// The provider's token.
        token: String,
    },
    /// Mute (`true`) or unmute a room for the caller: a muted room sends them no push.
    Mute {
        /// The room.
        room: RoomId,
        /// Muted or not.
        muted: bool,
    },
    /// The history of the direct room between the caller and `peer`.
    DirectHistory {
        /// The other user.
        peer: UserId,
        /// Which page.
        query: HistoryQuery,
    },
}

impl Command {
    /// The operation's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::OpenDirect { .. } => "open_direct",
            Command::CreateGroup { .. } => "create_group",
            Command::UpdateGroup { .. } => "update_group",
            Command::AddMembers { .. } => "add_members",
            Command::RemoveMember { .. } => "remove_member",
            Command::SetRole { .. } => "set_role",
            Command::Join { .. } => "join",
            Command::Leave { .. } => "leave",
            Command::Room { .. } => "room",
            Command::Members { .. } => "members",
            Command::Send { .. } => "send",
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
            Command::MarkRead { .. } => "mark_read",
            Command::Typing { .. } => "typing",
            Command::View { .. } => "view",
            Command::History { .. } => "history",
            Command::Replay { .. } => "replay",
            Command::ListRooms => "list_rooms",
            Command::Chats { .. } => "chats",
            Command::Friend { .. } => "friend",
            Command::Friendships { .. } => "friendships",
            Command::User { .. } => "user",
            Command::DirectHistory { .. } => "direct_history",
            Command::TakePending => "take_pending",
            Command::AddUpload { .. } => "add_upload",
            Command::MediaAccess { .. } => "media_access",
            Command::AddDevice { .. } => "add_device",
            Command::RemoveDevice { .. } => "remove_device",
            Command::Mute { .. } => "mute",
        }
    }

    /// The room a command acts on, if it is a room command (routed to the room's owner).
    pub fn room(&self) -> Option<RoomId> {
        match self {
            Command::UpdateGroup { room, .. }
            | Command::AddMembers { room, .. }
            | Command::RemoveMember { room, .. }
            | Command::SetRole { room, .. }
            | Command::Join { room }
            | Command::Leave { room }
            | Command::Members { room }
            | Command::Room { room }
            | Command::Send { room, .. }
            | Command::Edit { room, .. }
            | Command::Delete { room, .. }
            | Command::React { room, .. }
            | Command::MarkRead { room, .. }
            | Command::Typing { room, .. }
            | Command::View { room, .. }
            | Command::History { room, .. }
            | Command::Replay { room, .. }
            | Command::Mute { room, .. } => Some(*room),
            _ => None,
        }
    }
}

/// A page request over a room's history. Pages are returned newest first.
///
/// - neither bound: the newest `limit` messages;
/// - `before`: the `limit` messages just older than `before`;
/// - `after`: the `limit` messages just newer than `after` (the page is anchored at `after`, so
///   paging forward from a last-seen id leaves no gap);
/// - both: messages strictly between them, anchored at `after`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// Exclusive upper bound.
    pub before: Option<MessageId>,
    /// Exclusive lower bound.
    pub after: Option<MessageId>,
    /// Page size; clamped to the configured maximum.
    pub limit: Option<u32>,
    /// Messages to skip from the anchor before the page starts (Syarah `skipCount`), at most
    /// 10 000. Stores never see it: the node pages past the skipped messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<u32>,
}

/// A successful answer to a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// A room (open_direct, create_group).
    Room {
        /// The room with its members and newest message.
        room: RoomSummary,
        /// Whether this call created it.
        created: bool,
    },
    /// The stored message (send); a retry returns the original.
    Message {
        /// The message.
        message: Message,
    },
    /// A page of history, newest first.
    History {
        /// The messages.
        messages: Vec<Message>,
        /// Whether more messages lie beyond the page in the direction it was read.
        has_more: bool,
    },
    /// The caller's rooms.
    Rooms {
        /// Most recently active first.
        rooms: Vec<RoomSummary>,
    },
    /// A room's members.
    Members {
        /// The members, with `online` filled.
        members: Vec<Member>,
    },
    /// Messages changed by the command (edit, delete, react).
    Messages {
        /// The messages as they now are.
        messages: Vec<Message>,
    },
    /// Events to catch up with, in order (replay).
    Replay {
        /// The missed events; empty when `resync` is set.
        events: Vec<Event>,
        /// The client is too far behind: it must page history instead.
        resync: bool,
        /// The room's current sequence number.
        last_seq: u64,
    },
    /// The caller's chat list.
    Chats {
        /// Most recently active first.
        chats: Vec<Chat>,
        /// Whether more entries follow.
        has_more: bool,
    },
    /// A friendship after a change (`None` when it ended).
    Friendship {
        /// The friendship, if one remains.
        friendship: Option<Friendship>,
        /// Whether the caller now blocks the peer.
        blocked: bool,
    },
    /// The caller's friendships.
    Friendships {
        /// Friends with online state and direct room.
        friends: Vec<FriendView>,
    },
    /// A user.
    User {
        /// The user.
        user: User,
        /// Whether they are online (false across a block).
        online: bool,
        /// The friendship status between the caller and them (`blocked` when either blocks the
        /// other), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        friendship: Option<crate::domain::FriendshipStatus>,
    },
    /// Pending notifications, oldest first.
    Notifications {
        /// The notifications.
        notifications: Vec<crate::domain::Notification>,
    },
    /// Done; nothing to return.
    Done,
}

/// Checks a `client_ref`: 1 to [`MAX_CLIENT_REF_LEN`] bytes, printable.
pub fn check_client_ref(r: &str) -> Result<(), &'static str> {
    if r.is_empty() {
        return Err("client_ref must not be empty");
    }
    if r.len() > MAX_CLIENT_REF_LEN {
        return Err("client_ref is longer than 128 bytes");
    }
    if r.chars().any(char::is_control) {
        return Err("client_ref contains control characters");
    }
    Ok(())
}

/// The user a command is executed for, with nothing else trusted from the client.
pub type Caller = UserId;
