//! The canonical server -> client vocabulary.
//!
//! Events that change a room's state (messages, edits, deletions, reactions, membership and
//! group changes) are the room's **ordered stream**: each carries the room sequence number `seq`
//! (1, 2, 3, ... without gaps), one order seen identically by every member in every dialect. A
//! reconnecting client replays the stream from the last `seq` it saw. The other events (typing,
//! read markers, presence, friendships, notifications, `room_joined`/`room_left`) are
//! ephemeral or addressed to one user and carry no `seq`.

use crate::Millis;
use crate::domain::{Friendship, Member, Message, Notification, Room, RoomSummary};
use crate::ids::{MessageId, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// Everything a client can be told without asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A new message. `message.seq` is its place in the room's stream.
    Message {
        /// The message.
        message: Message,
    },
    /// A message was edited; carries the message as it now is.
    MessageEdited {
        /// Position in the room's stream.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// A message was deleted (one event per message, even when several went at once).
    MessageDeleted {
        /// Position in the room's stream.
        seq: u64,
        /// The room.
        room: RoomId,
        /// The message (now a tombstone).
        message_id: MessageId,
        /// Who deleted it.
        by: UserId,
    },
    /// A reaction was added or removed; carries the message with its reactions as they now are.
    Reaction {
        /// Position in the room's stream.
        seq: u64,
        /// The message.
        message: Message,
        /// Who reacted.
        user: UserId,
        /// The emoji.
        emoji: String,
        /// Added (`true`) or removed.
        added: bool,
    },
    /// Someone became a member of the room (Syarah `onMemberJoin`).
    MemberJoined {
        /// Position in the room's stream.
        seq: u64,
        /// The room.
        room: RoomId,
        /// The new member.
        member: Member,
        /// Who added them (themselves when they joined a public group).
        by: UserId,
    },
    /// Someone stopped being a member (left or removed).
    MemberLeft {
        /// Position in the room's stream.
        seq: u64,
        /// The room.
        room: RoomId,
        /// The former member.
        user: UserId,
        /// Who removed them (themselves when they left).
        by: UserId,
    },
    /// A member's role changed.
    MemberUpdated {
        /// Position in the room's stream.
        seq: u64,
        /// The room.
        room: RoomId,
        /// The member as now.
        member: Member,
    },
    /// A group's name, avatar or visibility changed.
    RoomUpdated {
        /// Position in the room's stream.
        seq: u64,
        /// The room as now.
        room: Room,
    },
    /// The user became a member of a room (a group they were added to or joined, a direct
    /// room opened with them). Addressed to that user's sessions.
    RoomJoined {
        /// The room.
        room: RoomSummary,
    },
    /// The user is no longer a member (left or removed). Addressed to that user's sessions.
    RoomLeft {
        /// The room.
        room: RoomId,
    },
    /// A member marked the room read up to a message.
    Read {
        /// The room.
        room: RoomId,
        /// Who read.
        user: UserId,
        /// Up to which message.
        message_id: MessageId,
    },
    /// A member is (or stopped) typing. `typing: false` also comes when a typing state expired.
    Typing {
        /// The room.
        room: RoomId,
        /// Who.
        user: UserId,
        /// Their display name, if known.
        name: Option<String>,
        /// Typing or stopped.
        typing: bool,
    },
    /// A user came online or went offline (to friends, direct peers and small groups).
    Presence {
        /// Who.
        user: UserId,
        /// Online now.
        online: bool,
        /// When their last session closed (when offline).
        last_seen: Option<Millis>,
    },
    /// A friendship changed. Addressed to both users.
    Friendship {
        /// The friendship as now (`None`: it ended).
        friendship: Option<Friendship>,
        /// The pair.
        users: [UserId; 2],
    },
    /// A message in a room the user is not viewing (live), or one that arrived while the user
    /// had no session viewing its room (`pending`, on the next connect).
    Notification {
        /// The notification.
        notification: Notification,
        /// Recorded while away, delivered on connect.
        pending: bool,
    },
}

impl Event {
    /// The event's name on the native wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Message { .. } => "message",
            Event::MessageEdited { .. } => "message_edited",
            Event::MessageDeleted { .. } => "message_deleted",
            Event::Reaction { .. } => "reaction",
            Event::MemberJoined { .. } => "member_joined",
            Event::MemberLeft { .. } => "member_left",
            Event::MemberUpdated { .. } => "member_updated",
            Event::RoomUpdated { .. } => "room_updated",
            Event::RoomJoined { .. } => "room_joined",
            Event::RoomLeft { .. } => "room_left",
            Event::Read { .. } => "read",
            Event::Typing { .. } => "typing",
            Event::Presence { .. } => "presence",
            Event::Friendship { .. } => "friendship",
            Event::Notification { .. } => "notification",
        }
    }

    /// The room the event belongs to, if any.
    pub fn room(&self) -> Option<RoomId> {
        match self {
            Event::Message { message }
            | Event::MessageEdited { message, .. }
            | Event::Reaction { message, .. } => Some(message.room),
            Event::MessageDeleted { room, .. }
            | Event::MemberJoined { room, .. }
            | Event::MemberLeft { room, .. }
            | Event::MemberUpdated { room, .. }
            | Event::RoomLeft { room }
            | Event::Read { room, .. }
            | Event::Typing { room, .. } => Some(*room),
            Event::RoomUpdated { room, .. } => Some(room.id),
            Event::RoomJoined { room } => Some(room.room.id),
            Event::Notification { notification, .. } => Some(notification.room),
            Event::Presence { .. } | Event::Friendship { .. } => None,
        }
    }

    /// The room sequence number the event carries, if it is part of the room's ordered stream.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::Message { message } => Some(message.seq),
            Event::MessageEdited { seq, .. }
            | Event::MessageDeleted { seq, .. }
            | Event::Reaction { seq, .. }
            | Event::MemberJoined { seq, .. }
            | Event::MemberLeft { seq, .. }
            | Event::MemberUpdated { seq, .. }
            | Event::RoomUpdated { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
