//! Domain types, as the store keeps them and as the native protocol shows them.

use crate::Millis;
use crate::ids::{MessageId, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// What a token says about its user; applied to the stored [`User`] on every connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The `sub` claim.
    pub id: UserId,
    /// The `username` claim (the type-tagged dialect addresses people by it).
    pub username: Option<String>,
    /// The `name` claim: a display name.
    pub name: Option<String>,
    /// The `picture` claim: an avatar URL.
    pub avatar: Option<String>,
}

/// A user as stored: the last profile seen plus bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Profile fields from the latest token.
    #[serde(flatten)]
    pub profile: Profile,
    /// First time this user was seen.
    pub created_at: Millis,
    /// When the profile last changed.
    pub updated_at: Millis,
    /// When the user's last session closed; `None` while never disconnected.
    pub last_seen: Option<Millis>,
}

/// The two kinds of room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    /// A conversation between exactly two users; one per pair.
    Direct,
    /// A named group with roles.
    Group,
}

/// A member's role in a room. Direct rooms have two plain members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Created the group; every right.
    Owner,
    /// Manages members and moderates messages.
    Admin,
    /// Reads and writes.
    Member,
}

/// A room: direct or group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// The room's id.
    pub id: RoomId,
    /// Direct or group.
    pub kind: RoomKind,
    /// Group name; `None` for direct rooms.
    pub name: Option<String>,
    /// Who created it.
    pub created_by: UserId,
    /// When it was created.
    pub created_at: Millis,
    /// Sequence number of the newest message; 0 when empty.
    pub last_seq: u64,
    /// Id of the newest message.
    pub last_message_id: Option<MessageId>,
}

/// A user's membership of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member.
    pub user: UserId,
    /// Their role.
    pub role: Role,
    /// When they joined.
    pub joined_at: Millis,
}

/// A room as listed for one of its members: the room, its members and its newest message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room.
    #[serde(flatten)]
    pub room: Room,
    /// Its members.
    pub members: Vec<Member>,
    /// Its newest message, if any.
    pub last_message: Option<Message>,
}

/// What a message says. Tagged by `type` on the wire; more kinds (media, system notices) join here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageBody {
    /// Plain text.
    Text {
        /// The text, 1 to the configured maximum characters.
        text: String,
    },
}

/// A stored message. `(room, seq)` and `id` both give the room's one order: `seq` is dense
/// (1, 2, 3, ... with no gaps) so a client can see a gap, `id` is unique across the system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id, increasing within the room.
    pub id: MessageId,
    /// The room it was posted in.
    pub room: RoomId,
    /// Position in the room: 1 for the first message, no gaps.
    pub seq: u64,
    /// Who sent it (always the authenticated user).
    pub sender: UserId,
    /// The content.
    #[serde(flatten)]
    pub body: MessageBody,
    /// The sender's idempotency key, if the client gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ref: Option<String>,
    /// When the room accepted it.
    pub created_at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_serializes_flat() {
        let m = Message {
            id: MessageId(10),
            room: RoomId(3),
            seq: 1,
            sender: UserId::parse("42").unwrap_or_else(|_| unreachable!()),
            body: MessageBody::Text { text: "hi".into() },
            client_ref: None,
            created_at: 5,
        };
        let v = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(v["type"], "text");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["room"], 3);
        assert!(v.get("client_ref").is_none());
        let back: Message = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, m);
    }
}
