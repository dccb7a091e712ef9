//! Bus envelopes: what node actors hand to gateways.

use crate::Millis;
use crate::event::Event;
use crate::ids::{GatewayId, MessageId, RoomId, UserId};
use serde::{Deserialize, Serialize};

/// Who on the receiving gateway gets a [`Delivery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Every local session subscribed to the room.
    Room {
        /// The room.
        room: RoomId,
    },
    /// Every local session of these users.
    Users {
        /// The users.
        users: Vec<UserId>,
    },
}

/// One event for one gateway. A room actor publishes one delivery per gateway hosting sessions
/// of its members, so fan-out cost grows with the gateways involved, not with the cluster size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The gateway that must deliver it.
    pub gateway: GatewayId,
    /// Which of its sessions.
    pub target: Target,
    /// What to tell them.
    pub event: Event,
    /// W3C trace context of the publish, when tracing is on: the gateway's delivery joins the
    /// message's trace. Kafka carries it in a record header instead of the payload; absent from
    /// older producers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A push notification to send to one user's devices. Room actors publish one per member who
/// should be notified; push workers consume them (topic `palaver.push`, keyed by user so one
/// user's jobs keep their order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    /// Who is notified.
    pub user: UserId,
    /// The room the message was posted in.
    pub room: RoomId,
    /// The message.
    pub message: MessageId,
    /// Who sent it.
    pub sender: UserId,
    /// A short preview of the content.
    pub preview: String,
    /// The message's kind (`text`, `image`, `audio`, `video`, `file`), which picks the text of
    /// a media push ("sent a photo") in the recipient's language.
    #[serde(default = "text_kind")]
    pub kind: String,
    /// The group's name (`None` for a direct room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_name: Option<String>,
    /// Notifications with the same key replace each other on a device (one per room).
    pub collapse_key: String,
    /// When the message was accepted.
    pub created_at: Millis,
    /// W3C trace context of the message's publish, when tracing is on: the provider call joins
    /// the message's trace. Kafka carries it in a record header instead of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn text_kind() -> String {
    "text".into()
}
