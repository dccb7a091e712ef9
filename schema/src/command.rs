//! The canonical client -> server vocabulary.
//!
//! Every dialect decodes its frames into a [`Command`]; the node executes it for the
//! authenticated user (never a user named inside the command) and answers with a [`Reply`] or an
//! [`crate::Error`].

use crate::domain::{Message, MessageBody, RoomSummary};
use crate::ids::{MessageId, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// Longest accepted `client_ref`, in bytes.
pub const MAX_CLIENT_REF_LEN: usize = 128;

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
    },
    /// Post a message. Retrying with the same `client_ref` returns the original message.
    Send {
        /// Target room.
        room: RoomId,
        /// Content.
        body: MessageBody,
        /// Idempotency key chosen by the client, unique per (room, sender).
        client_ref: Option<String>,
    },
    /// Read a page of a room's history.
    History {
        /// The room.
        room: RoomId,
        /// Which page.
        query: HistoryQuery,
    },
    /// List the caller's rooms, most recently active first.
    ListRooms,
}

impl Command {
    /// The operation's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::OpenDirect { .. } => "open_direct",
            Command::CreateGroup { .. } => "create_group",
            Command::Send { .. } => "send",
            Command::History { .. } => "history",
            Command::ListRooms => "list_rooms",
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
