//! The canonical server -> client vocabulary.

use crate::domain::{Message, RoomSummary};
use crate::ids::RoomId;
use serde::{Deserialize, Serialize};

/// Everything a client can be told without asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A new message in a room the client's user belongs to. `message.seq` is the room sequence.
    Message {
        /// The message.
        message: Message,
    },
    /// The user became a member of a room (a group they were added to, a direct room opened
    /// with them).
    RoomJoined {
        /// The room.
        room: RoomSummary,
    },
}

impl Event {
    /// The event's name on the native wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Message { .. } => "message",
            Event::RoomJoined { .. } => "room_joined",
        }
    }

    /// The room the event belongs to.
    pub fn room(&self) -> RoomId {
        match self {
            Event::Message { message } => message.room,
            Event::RoomJoined { room } => room.room.id,
        }
    }

    /// The room sequence number the event carries, if it is part of the room's ordered stream.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::Message { message } => Some(message.seq),
            Event::RoomJoined { .. } => None,
        }
    }
}
