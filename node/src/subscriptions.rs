//! Which gateways host sessions interested in a room.
//!
//! Gateways subscribe a room when their first local session needs it and unsubscribe when the
//! last one goes; the node also subscribes members' gateways when it adds them to a room, so the
//! first message after a room is created reaches them. The table lives on the node that owns the
//! room (the ring decides) and is soft state: gateways re-subscribe after a ring change.

use dashmap::DashMap;
use schema::{GatewayId, RoomId};

/// Room -> gateways.
#[derive(Default)]
pub struct Subscriptions {
    rooms: DashMap<RoomId, Vec<GatewayId>>,
}

impl Subscriptions {
    /// Adds `gateway` to `room`'s subscribers (idempotent).
    pub fn add(&self, room: RoomId, gateway: &GatewayId) {
        let mut e = self.rooms.entry(room).or_default();
        if !e.contains(gateway) {
            e.push(gateway.clone());
        }
    }

    /// Removes `gateway` from `room`'s subscribers.
    pub fn remove(&self, room: RoomId, gateway: &GatewayId) {
        self.rooms.remove_if_mut(&room, |_, gws| {
            gws.retain(|g| g != gateway);
            gws.is_empty()
        });
    }

    /// The gateways subscribed to `room`.
    pub fn gateways(&self, room: RoomId) -> Vec<GatewayId> {
        self.rooms.get(&room).map(|g| g.clone()).unwrap_or_default()
    }

    /// Forgets rooms for which `keep` is false (rooms this node no longer owns).
    pub fn retain(&self, keep: impl Fn(RoomId) -> bool) {
        self.rooms.retain(|r, _| keep(*r));
    }

    /// Number of rooms with at least one subscriber.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Whether no room has a subscriber.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove() {
        let s = Subscriptions::default();
        let (a, b) = (GatewayId::new("a"), GatewayId::new("b"));
        s.add(RoomId(1), &a);
        s.add(RoomId(1), &a);
        s.add(RoomId(1), &b);
        assert_eq!(s.gateways(RoomId(1)), vec![a.clone(), b.clone()]);
        s.remove(RoomId(1), &a);
        assert_eq!(s.gateways(RoomId(1)), vec![b.clone()]);
        s.remove(RoomId(1), &b);
        assert!(s.is_empty());
    }
}
