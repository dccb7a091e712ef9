//! Per-room ordering of live deliveries at a gateway.
//!
//! A room's ordered stream (events with a `seq`) reaches a gateway from whichever node owns the
//! room. Within one owner, the bus keeps order. Across an ownership change it cannot: the old
//! owner's producer may still hold deliveries (a paused broker, retries) when the new owner
//! publishes the next ones, and the two producers' records land in the gateway's partition in
//! either order. The randomized cluster fault runs saw exactly that (seed 22415: a connection got
//! seq 59, then 68 to 80, then 60).
//!
//! So the gateway hands a room's sequenced events to its sessions in `seq` order:
//! - the next `seq` (last + 1) goes out at once, with any held successors it unblocks;
//! - a later one is held, up to `hold` (the gap is usually the other producer catching up);
//!   when the hold expires, or too many are held, the held events go out in order and the gap is
//!   left: clients see it by `seq` and read the missing part from history, as after any loss of
//!   live delivery;
//! - an earlier or equal one is dropped (a duplicate, or one already skipped as a gap).
//!
//! A room's position is forgotten when no local session follows it any more, so a room that
//! gains sessions again starts from whatever arrives first. Events without a `seq` (typing,
//! presence, events addressed to users) are not ordered here.

use schema::{Delivery, RoomId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Most events held for one room before they are released past the gap regardless.
pub const MAX_HELD: usize = 1024;

/// The default hold (`PALAVER_REORDER_HOLD_MS`).
pub const DEFAULT_HOLD: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Stream {
    /// Highest `seq` handed out.
    last: u64,
    /// Held events by `seq`.
    held: BTreeMap<u64, Delivery>,
    /// When the oldest held event must go out.
    deadline: Option<Instant>,
}

/// What happened to one delivery (for metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handed out now (with any successors it unblocked).
    InOrder,
    /// Held for a missing predecessor.
    Held,
    /// Dropped: its `seq` was already handed out or skipped.
    Stale,
}

/// The ordering state of every room with a position at this gateway.
pub struct Reorder {
    hold: Duration,
    rooms: HashMap<RoomId, Stream>,
    /// Rooms holding events (so the next deadline is found without scanning every room).
    holding: HashSet<RoomId>,
}

impl Reorder {
    /// Holds out-of-order events up to `hold` (zero: never hold, only drop stale ones).
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            rooms: HashMap::new(),
            holding: HashSet::new(),
        }
    }

    /// Takes one delivery of `room`'s stream at position `seq`; pushes onto `out`, in order,
    /// whatever may go out now.
    pub fn accept(
        &mut self,
        room: RoomId,
        seq: u64,
        d: Delivery,
        now: Instant,
        out: &mut Vec<Delivery>,
    ) -> Outcome {
        let Some(s) = self.rooms.get_mut(&room) else {
            self.rooms.insert(
                room,
                Stream {
                    last: seq,
                    ..Stream::default()
                },
            );
            out.push(d);
            return Outcome::InOrder;
        };
        if seq <= s.last {
            return Outcome::Stale;
        }
        if seq == s.last + 1 {
            s.last = seq;
            out.push(d);
            drain_ready(s, out);
            if s.held.is_empty() {
                s.deadline = None;
                self.holding.remove(&room);
            }
            return Outcome::InOrder;
        }
        if self.hold.is_zero() {
            s.last = seq;
            out.push(d);
            return Outcome::InOrder;
        }
        s.held.insert(seq, d);
        if s.held.len() > MAX_HELD {
            release(s, out);
            self.holding.remove(&room);
            return Outcome::Held;
        }
        s.deadline.get_or_insert(now + self.hold);
        self.holding.insert(room);
        Outcome::Held
    }

    /// Releases, in order and past their gaps, the held events of every room whose hold expired
    /// by `now`; the number of gaps skipped.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Delivery>) -> usize {
        let due: Vec<RoomId> = self
            .holding
            .iter()
            .filter(|r| {
                self.rooms
                    .get(r)
                    .and_then(|s| s.deadline)
                    .is_none_or(|d| d <= now)
            })
            .copied()
            .collect();
        for room in &due {
            self.holding.remove(room);
            if let Some(s) = self.rooms.get_mut(room) {
                release(s, out);
            }
        }
        due.len()
    }

    /// The earliest hold deadline, if any room holds events.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.holding
            .iter()
            .filter_map(|r| self.rooms.get(r).and_then(|s| s.deadline))
            .min()
    }

    /// Forgets `room`'s position (no local session follows it any more); held events are
    /// dropped with it, as nobody here would receive them.
    pub fn forget(&mut self, room: RoomId) {
        self.rooms.remove(&room);
        self.holding.remove(&room);
    }

    /// Rooms with a position here.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Whether no room has a position here.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// Hands out the held events that directly follow `last`.
fn drain_ready(s: &mut Stream, out: &mut Vec<Delivery>) {
    while let Some(entry) = s.held.first_entry() {
        if *entry.key() != s.last + 1 {
            break;
        }
        s.last = *entry.key();
        out.push(entry.remove());
    }
}

/// Hands out every held event in order, skipping the gaps.
fn release(s: &mut Stream, out: &mut Vec<Delivery>) {
    for (seq, d) in std::mem::take(&mut s.held) {
        s.last = seq;
        out.push(d);
    }
    s.deadline = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Event, GatewayId, Target, UserId};

    const ROOM: RoomId = RoomId(7);

    fn d(seq: u64) -> Delivery {
        Delivery {
            gateway: GatewayId::new("g"),
            target: Target::Room { room: ROOM },
            event: Event::MemberLeft {
                seq,
                room: ROOM,
                user: UserId::parse("1").expect("uid"),
                by: UserId::parse("1").expect("uid"),
            },
            traceparent: None,
        }
    }

    fn seqs(out: &[Delivery]) -> Vec<u64> {
        out.iter().filter_map(|d| d.event.seq()).collect()
    }

    #[test]
    fn a_late_predecessor_is_put_back_in_order() {
        let mut r = Reorder::new(Duration::from_millis(500));
        let t = Instant::now();
        let mut out = Vec::new();
        for s in [59, 68, 69, 60, 61, 62, 63, 64, 65, 66, 67, 70] {
            r.accept(ROOM, s, d(s), t, &mut out);
        }
        assert_eq!(seqs(&out), (59..=70).collect::<Vec<_>>());
        assert_eq!(r.next_deadline(), None, "nothing left held");
    }

    #[test]
    fn a_gap_that_never_fills_is_skipped_when_the_hold_expires() {
        let mut r = Reorder::new(Duration::from_millis(500));
        let t = Instant::now();
        let mut out = Vec::new();
        r.accept(ROOM, 10, d(10), t, &mut out);
        assert_eq!(r.accept(ROOM, 13, d(13), t, &mut out), Outcome::Held);
        assert_eq!(r.accept(ROOM, 12, d(12), t, &mut out), Outcome::Held);
        assert_eq!(seqs(&out), [10]);
        assert_eq!(r.next_deadline(), Some(t + Duration::from_millis(500)));
        assert_eq!(r.expire(t + Duration::from_millis(499), &mut out), 0);
        assert_eq!(r.expire(t + Duration::from_millis(500), &mut out), 1);
        assert_eq!(seqs(&out), [10, 12, 13]);
        // The skipped one, arriving at last, is stale; the stream goes on after 13.
        assert_eq!(r.accept(ROOM, 11, d(11), t, &mut out), Outcome::Stale);
        assert_eq!(r.accept(ROOM, 14, d(14), t, &mut out), Outcome::InOrder);
        assert_eq!(seqs(&out), [10, 12, 13, 14]);
    }

    #[test]
    fn duplicates_are_dropped_and_a_forgotten_room_starts_afresh() {
        let mut r = Reorder::new(Duration::from_millis(500));
        let t = Instant::now();
        let mut out = Vec::new();
        for s in [1, 2, 2, 1, 3] {
            r.accept(ROOM, s, d(s), t, &mut out);
        }
        assert_eq!(seqs(&out), [1, 2, 3]);
        r.accept(ROOM, 9, d(9), t, &mut out);
        r.forget(ROOM);
        assert!(r.is_empty());
        assert_eq!(r.next_deadline(), None);
        assert_eq!(r.accept(ROOM, 5, d(5), t, &mut out), Outcome::InOrder);
        assert_eq!(seqs(&out), [1, 2, 3, 5]);
    }

    #[test]
    fn too_many_held_go_out_at_once_and_a_zero_hold_never_holds() {
        let mut r = Reorder::new(Duration::from_secs(60));
        let t = Instant::now();
        let mut out = Vec::new();
        r.accept(ROOM, 1, d(1), t, &mut out);
        for s in 3..(3 + MAX_HELD as u64 + 1) {
            r.accept(ROOM, s, d(s), t, &mut out);
        }
        assert_eq!(out.len(), MAX_HELD + 2, "all released past the gap");
        assert_eq!(r.next_deadline(), None);

        let mut r = Reorder::new(Duration::ZERO);
        let mut out = Vec::new();
        for s in [1, 4, 3, 5] {
            r.accept(ROOM, s, d(s), t, &mut out);
        }
        assert_eq!(seqs(&out), [1, 4, 5]);
    }
}
