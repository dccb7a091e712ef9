//! Domain types, as the store keeps them and as the native protocol shows them.

use crate::Millis;
use crate::ids::{MessageId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Preferred language for texts the server writes (push notifications), e.g. `en`, `pt-BR`.
    /// Not a claim: set by a dialect whose client sends it (Phoenix `preferred_language`); a
    /// connect that does not say keeps the stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
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
    /// Group avatar URL or upload reference.
    #[serde(default)]
    pub avatar: Option<String>,
    /// Whether anyone may join the group by id (`join`); direct rooms are never public.
    #[serde(default)]
    pub public: bool,
    /// Who created it.
    pub created_by: UserId,
    /// When it was created.
    pub created_at: Millis,
    /// Sequence number of the newest ordered event (message, edit, delete, reaction, membership
    /// change); 0 when nothing happened yet.
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
    /// Whether the member has a connected session; filled in member lists, absent in storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
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

/// What a message says. Tagged by `type` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageBody {
    /// Plain text.
    Text {
        /// The text, 1 to the configured maximum characters.
        text: String,
    },
    /// A picture, by upload reference.
    Image(Media),
    /// A sound or voice note, by upload reference.
    Audio(Media),
    /// A video, by upload reference.
    Video(Media),
    /// Any other file, by upload reference.
    File(Media),
    /// A deleted message's tombstone: it keeps its place in the room's order, nothing else.
    Deleted {},
}

impl MessageBody {
    /// The body's kind, as named on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageBody::Text { .. } => "text",
            MessageBody::Image(_) => "image",
            MessageBody::Audio(_) => "audio",
            MessageBody::Video(_) => "video",
            MessageBody::File(_) => "file",
            MessageBody::Deleted {} => "deleted",
        }
    }

    /// The media of a media message.
    pub fn media(&self) -> Option<&Media> {
        match self {
            MessageBody::Image(m)
            | MessageBody::Audio(m)
            | MessageBody::Video(m)
            | MessageBody::File(m) => Some(m),
            MessageBody::Text { .. } | MessageBody::Deleted {} => None,
        }
    }

    /// A short human preview (notifications, chat lists).
    pub fn preview(&self) -> String {
        match self {
            MessageBody::Text { text } => text.chars().take(100).collect(),
            MessageBody::Deleted {} => "message deleted".into(),
            other => match other.media().and_then(|m| m.caption.as_deref()) {
                Some(c) if !c.is_empty() => c.chars().take(100).collect(),
                _ => format!("[{}]", other.kind()),
            },
        }
    }
}

/// A media attachment: an upload reference (the path `POST /api/chat/uploadFile` or
/// `/v1/uploads` answered) and an optional caption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    /// The upload reference, e.g. `/uploads/chat-messages/images/ab12.webp`.
    pub media: String,
    /// Optional caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Length of audio or video, in seconds, when the client said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u32>,
    /// Size of the stored file in bytes, when known (set when the message is sent along with
    /// its upload, as seed 004's REST does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
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
    /// The message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// Reactions: emoji -> the users who reacted with it, in the order they did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Vec<UserId>>,
    /// When the author last edited it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<Millis>,
    /// When it was deleted (the body is then a tombstone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<Millis>,
    /// The sender's idempotency key, if the client gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ref: Option<String>,
    /// When the room accepted it.
    pub created_at: Millis,
}

impl Message {
    /// A new message with no reply, reactions, edit or deletion.
    pub fn new(
        id: MessageId,
        room: RoomId,
        seq: u64,
        sender: UserId,
        body: MessageBody,
        created_at: Millis,
    ) -> Self {
        Self {
            id,
            room,
            seq,
            sender,
            body,
            reply_to: None,
            reactions: BTreeMap::new(),
            edited_at: None,
            deleted_at: None,
            client_ref: None,
            created_at,
        }
    }
}

/// What a message row keeps besides its identity: the part a store serialises as one JSON
/// column, so that edits, tombstones and reactions rewrite one value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageContent {
    /// The content.
    #[serde(flatten)]
    pub body: MessageBody,
    /// See [`Message::reply_to`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// See [`Message::reactions`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Vec<UserId>>,
    /// See [`Message::edited_at`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<Millis>,
    /// See [`Message::deleted_at`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<Millis>,
}

impl MessageContent {
    /// The content part of `m`.
    pub fn of(m: &Message) -> Self {
        Self {
            body: m.body.clone(),
            reply_to: m.reply_to,
            reactions: m.reactions.clone(),
            edited_at: m.edited_at,
            deleted_at: m.deleted_at,
        }
    }

    /// Puts this content into `m`.
    pub fn apply(self, m: &mut Message) {
        m.body = self.body;
        m.reply_to = self.reply_to;
        m.reactions = self.reactions;
        m.edited_at = self.edited_at;
        m.deleted_at = self.deleted_at;
    }
}

/// The state of a friendship between two users, with Syarah's numeric codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FriendshipStatus {
    /// Requested, awaiting an answer (0).
    Pending,
    /// Friends (1).
    Accepted,
    /// The request was rejected (2).
    Rejected,
    /// One of the two blocked the other (3).
    Blocked,
}

impl FriendshipStatus {
    /// Syarah's number for the status: 0 pending, 1 accepted, 2 rejected, 3 blocked.
    pub fn code(self) -> u8 {
        match self {
            FriendshipStatus::Pending => 0,
            FriendshipStatus::Accepted => 1,
            FriendshipStatus::Rejected => 2,
            FriendshipStatus::Blocked => 3,
        }
    }

    /// The status of a number.
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => FriendshipStatus::Pending,
            1 => FriendshipStatus::Accepted,
            2 => FriendshipStatus::Rejected,
            3 => FriendshipStatus::Blocked,
            _ => return None,
        })
    }
}

/// A friendship (or request) between two users, one row per pair. Blocks are kept apart (a
/// block survives whatever happens to the friendship); a blocked pair shows status `blocked`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Friendship {
    /// Who asked.
    pub requester: UserId,
    /// Who was asked.
    pub addressee: UserId,
    /// Where it stands.
    pub status: FriendshipStatus,
    /// When it was requested.
    pub created_at: Millis,
    /// When the status last changed.
    pub updated_at: Millis,
}

impl Friendship {
    /// The other user of the pair, seen from `me`.
    pub fn other(&self, me: &UserId) -> &UserId {
        if &self.requester == me {
            &self.addressee
        } else {
            &self.requester
        }
    }
}

/// A message waiting for a user who had no session viewing its room: delivered on the user's
/// next connect (Phoenix `pending_notification`), then cleared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The room.
    pub room: RoomId,
    /// The message.
    pub message_id: MessageId,
    /// The message's position in its room (its `seq`; 0 in notifications stored before
    /// 2026-12-08).
    #[serde(default)]
    pub seq: u64,
    /// Who sent it.
    pub sender: UserId,
    /// A short preview of the content.
    pub preview: String,
    /// When the message was accepted.
    pub created_at: Millis,
}

/// One entry of a user's chat list: a room with what a list shows about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// The room.
    #[serde(flatten)]
    pub room: Room,
    /// The caller's role in it.
    pub role: Role,
    /// For a direct room: the other user, with profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<User>,
    /// For a direct room: whether the other user is online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_online: Option<bool>,
    /// For a direct room: the friendship status with the other user, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub friendship: Option<FriendshipStatus>,
    /// Number of members.
    pub member_count: u32,
    /// The newest message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<Message>,
    /// Messages from others, not deleted, newer than the caller's read marker (capped).
    pub unread: u32,
    /// The caller's read marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_up_to: Option<MessageId>,
}

/// A friend as listed: the user, online state and the direct room if one exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FriendView {
    /// The friendship.
    #[serde(flatten)]
    pub friendship: Friendship,
    /// The other user.
    pub user: User,
    /// Whether the other user is online (hidden, so `false`, across a block).
    pub online: bool,
    /// The direct room of the pair, if one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<RoomId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_serializes_flat() {
        let m = Message::new(
            MessageId(10),
            RoomId(3),
            1,
            UserId::parse("42").unwrap_or_else(|_| unreachable!()),
            MessageBody::Text { text: "hi".into() },
            5,
        );
        let v = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(v["type"], "text");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["room"], 3);
        assert!(v.get("client_ref").is_none());
        let back: Message = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, m);
        // Media and tombstones round-trip through the stored content form.
        let mut img = m.clone();
        img.body = MessageBody::Image(Media {
            media: "/uploads/a.webp".into(),
            caption: Some("look".into()),
            duration: None,
            size: None,
        });
        img.reactions.insert("+1".into(), vec![m.sender.clone()]);
        let c = serde_json::to_string(&MessageContent::of(&img)).unwrap_or_default();
        assert!(c.contains(r#""type":"image""#), "{c}");
        let back: MessageContent = serde_json::from_str(&c).unwrap_or_else(|e| panic!("{e}"));
        let mut again = m.clone();
        back.apply(&mut again);
        assert_eq!(again, img);
        // A row written before these fields existed still reads.
        let old: MessageContent =
            serde_json::from_str(r#"{"type":"text","text":"x"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(old.reactions.len(), 0);
        let d = serde_json::to_value(MessageBody::Deleted {}).unwrap_or_default();
        assert_eq!(d, serde_json::json!({"type": "deleted"}));
    }
}

/// Where a device receives push notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Firebase Cloud Messaging (HTTP v1 API); the token is the FCM registration token.
    Fcm,
    /// The configured generic JSON webhook; the token identifies the device to the receiver.
    Webhook,
}

impl Platform {
    /// The name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Webhook => "webhook",
        }
    }

    /// Reads a stored or sent name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fcm" => Some(Platform::Fcm),
            "webhook" => Some(Platform::Webhook),
            _ => None,
        }
    }
}

/// A device registered for push notifications. A token belongs to one user at a time:
/// registering it again (as another user, after a logout and login) moves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Whose device.
    pub user: UserId,
    /// Where it receives pushes.
    pub platform: Platform,
    /// The provider's token for it (FCM registration token), at most 4096 bytes.
    pub token: String,
    /// The client's own device id, when it names one (Phoenix `device_unique_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// When it was registered (or last re-registered).
    pub created_at: Millis,
}

/// A stored upload: who uploaded which file. `GET /uploads/...` serves it to its uploader and
/// to members of the rooms it was posted in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The public path, `/uploads/...`.
    pub path: String,
    /// Who uploaded it.
    pub uploader: UserId,
    /// `image`, `audio`, `video`, `file` or `voice`.
    pub kind: String,
    /// The stored size in bytes.
    pub size: u64,
    /// The stored content's media type.
    pub content_type: String,
    /// When it was stored.
    pub created_at: Millis,
}

/// A push that could not be delivered and will not be retried, kept for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The job.
    pub job: crate::envelope::PushJob,
    /// The device it was for (`None`: the job failed before a device was chosen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_token: Option<String>,
    /// The provider (`fcm`, `webhook`).
    pub provider: String,
    /// Why it was given up.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it was given up.
    pub at: Millis,
}
