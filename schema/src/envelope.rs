//! Bus envelopes: what node actors hand to gateways.

use crate::event::Event;
use crate::ids::{GatewayId, RoomId, UserId};
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
}
