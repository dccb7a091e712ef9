//! Id generation: unique, below 2^53, and increasing within a room.
//!
//! Layout of a 53-bit id: 41 bits of milliseconds since 2025-01-01 (good until 2094), 6 bits of
//! generator slot (one per node, so ids from different nodes never collide), 6 bits of sequence.
//! The millisecond part is a hybrid logical clock: it never goes backwards, it moves past any id
//! it is told about ([`IdGenerator::next_after`]), and when 64 ids were handed out in one
//! millisecond it borrows the next one. So a room that moves to a node whose clock is behind
//! still gets increasing ids.

use parking_lot::Mutex;
use schema::ids::MAX_SAFE_ID;
use std::time::{SystemTime, UNIX_EPOCH};

/// 2025-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: i64 = 1_735_689_600_000;
const SLOT_BITS: u32 = 6;
const SEQ_BITS: u32 = 6;
/// Number of generator slots (distinct nodes that may generate ids at once).
pub const SLOTS: u16 = 1 << SLOT_BITS;

/// A thread-safe id generator for one node.
pub struct IdGenerator {
    slot: u64,
    state: Mutex<(u64, u64)>, // (logical ms since EPOCH, next sequence)
}

impl IdGenerator {
    /// A generator for `slot` (0..64).
    pub fn new(slot: u16) -> Self {
        Self {
            slot: u64::from(slot % SLOTS),
            state: Mutex::new((0, 0)),
        }
    }

    /// A fresh id, greater than every id this generator returned before.
    pub fn next(&self) -> u64 {
        self.next_after(0)
    }

    /// A fresh id greater than `floor` and than every id this generator returned before.
    pub fn next_after(&self, floor: u64) -> u64 {
        let now = now_ms();
        let floor_ms = floor >> (SLOT_BITS + SEQ_BITS);
        let mut st = self.state.lock();
        let (ref mut ms, ref mut seq) = *st;
        let target = now.max(floor_ms);
        if target > *ms {
            *ms = target;
            *seq = 0;
        }
        loop {
            if *seq >= (1 << SEQ_BITS) {
                *ms += 1;
                *seq = 0;
            }
            let id = (*ms << (SLOT_BITS + SEQ_BITS)) | (self.slot << SEQ_BITS) | *seq;
            *seq += 1;
            if id > floor {
                debug_assert!(id <= MAX_SAFE_ID);
                return id;
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    u64::try_from(unix_ms() - EPOCH_MS).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increasing_unique_and_js_safe() {
        let g = IdGenerator::new(3);
        let mut last = 0;
        for _ in 0..100_000 {
            let id = g.next();
            assert!(id > last);
            assert!(id <= MAX_SAFE_ID);
            assert_eq!((id >> SEQ_BITS) & 63, 3);
            last = id;
        }
    }

    #[test]
    fn moves_past_a_floor_from_another_node() {
        let a = IdGenerator::new(1);
        let b = IdGenerator::new(2);
        // An id from a node whose clock is an hour ahead.
        let ahead = (now_ms() + 3_600_000) << 12 | (5 << 6);
        let id = b.next_after(ahead);
        assert!(id > ahead);
        assert!(
            b.next() > id,
            "the generator's clock moved forward with the floor"
        );
        assert_ne!(a.next(), id);
    }

    #[test]
    fn different_slots_never_collide() {
        let gens: Vec<_> = (0..4).map(IdGenerator::new).collect();
        let mut all = std::collections::HashSet::new();
        for _ in 0..5_000 {
            for g in &gens {
                assert!(all.insert(g.next()));
            }
        }
    }
}
