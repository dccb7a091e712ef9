//! Consistent-hash ring over the node set.
//!
//! Every call to a room actor, and every connect and disconnect of a user, is routed by
//! [`Ring::owner`], even in single-process mode,
//! so that `serve` and the cluster run the same code path. Each node is placed on the ring at
//! [`Ring::VNODES`] points (virtual nodes) to spread load evenly and to move only about `1/n` of
//! the keys when a node joins or leaves.
//!
//! Hashing is stable across processes and platforms: the `hashring` crate's SipHash with fixed
//! zero keys, fed with explicit little-endian bytes (never `usize`, never `Hash` of integers,
//! which writes native-endian bytes).

use hashring::HashRing;
use schema::{NodeId, RoomId, UserId};
use std::hash::{Hash, Hasher};

/// A key that an actor is responsible for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingKey {
    /// A room actor.
    Room(RoomId),
    /// A user: its sessions and presence.
    User(UserId),
}

impl Hash for RingKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            RingKey::Room(r) => {
                state.write(b"r");
                state.write(&r.0.to_le_bytes());
            }
            RingKey::User(u) => {
                state.write(b"u");
                state.write(u.as_str().as_bytes());
            }
        }
    }
}

/// One point of a node on the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VNode {
    node: NodeId,
    replica: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.node.as_str().as_bytes());
        state.write(b"#");
        state.write(&self.replica.to_le_bytes());
    }
}

/// An immutable ring for one version of the node set. A membership change builds a new ring with
/// a higher version; a routed call carries the version it was routed with.
pub struct Ring {
    version: u64,
    nodes: Vec<NodeId>,
    ring: HashRing<VNode>,
}

impl Ring {
    /// Points per node. 1024 keeps every node's share within a few percent of `1/n`.
    pub const VNODES: u32 = 1024;

    /// Builds the ring for `nodes` (order and duplicates do not matter) at `version`.
    pub fn new(version: u64, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort();
        nodes.dedup();
        let mut ring = HashRing::new();
        for node in &nodes {
            ring.batch_add(
                (0..Self::VNODES)
                    .map(|replica| VNode {
                        node: node.clone(),
                        replica,
                    })
                    .collect(),
            );
        }
        Self {
            version,
            nodes,
            ring,
        }
    }

    /// The node that owns `key`, or `None` for an empty ring.
    pub fn owner(&self, key: &RingKey) -> Option<&NodeId> {
        self.ring.get(key).map(|v| &v.node)
    }

    /// This ring's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The nodes on the ring, sorted.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The fraction of keys `node` owns (0 to 1), estimated from [`Ring::SHARE_SAMPLE`] room
    /// keys (the hash spreads them like any others): 1 for a node alone, about `1/n` with `n`.
    pub fn share(&self, node: &NodeId) -> f64 {
        let owned = (0..Self::SHARE_SAMPLE)
            .filter(|i| self.owner(&RingKey::Room(RoomId(*i))) == Some(node))
            .count();
        owned as f64 / Self::SHARE_SAMPLE as f64
    }

    /// Keys sampled by [`Ring::share`] (its estimate is within about 2% of the true share).
    pub const SHARE_SAMPLE: u64 = 4096;

    /// Shows this ring, as seen by node `me`, in the process's metrics: `palaver_ring_info
    /// {version}` 1 (the `previous` version's series drops to 0), `palaver_ring_nodes` and
    /// `palaver_ring_owned_share`.
    pub fn export_metrics(&self, me: &NodeId, previous: Option<u64>) {
        if let Some(old) = previous
            && old != self.version
        {
            metrics::gauge!("palaver_ring_info", "version" => old.to_string()).set(0.0);
        }
        metrics::gauge!("palaver_ring_info", "version" => self.version.to_string()).set(1.0);
        metrics::gauge!("palaver_ring_nodes").set(self.nodes.len() as f64);
        metrics::gauge!("palaver_ring_owned_share").set(self.share(me));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| NodeId::new(format!("node-{i}"))).collect()
    }

    fn key(i: u64) -> RingKey {
        RingKey::Room(RoomId(1_000_000 + i * 7919))
    }

    #[test]
    fn balanced_within_ten_percent() {
        let ring = Ring::new(1, ids(3));
        let keys = 3_000u64;
        let mut counts: HashMap<NodeId, u64> = HashMap::new();
        for i in 0..keys {
            let owner = ring.owner(&key(i)).cloned();
            *counts
                .entry(owner.unwrap_or_else(|| NodeId::new("none")))
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        for (node, c) in &counts {
            assert!(
                (900..=1100).contains(c),
                "{node} owns {c} of {keys}: {counts:?}"
            );
        }
        // User keys too.
        let mut counts: HashMap<NodeId, u64> = HashMap::new();
        for i in 0..keys {
            let k = RingKey::User(
                UserId::parse(&format!("user-{i}")).unwrap_or_else(|e| panic!("{e}")),
            );
            *counts
                .entry(
                    ring.owner(&k)
                        .cloned()
                        .unwrap_or_else(|| NodeId::new("none")),
                )
                .or_default() += 1;
        }
        for (node, c) in &counts {
            assert!(
                (900..=1100).contains(c),
                "{node} owns {c} of {keys}: {counts:?}"
            );
        }
    }

    #[test]
    fn adding_a_fourth_node_moves_about_a_quarter() {
        let three = Ring::new(1, ids(3));
        let four = Ring::new(2, ids(4));
        let keys = 4_000u64;
        let mut moved = 0;
        for i in 0..keys {
            let before = three.owner(&key(i));
            let after = four.owner(&key(i));
            if before != after {
                moved += 1;
                // A key only ever moves to the new node.
                assert_eq!(after, Some(&NodeId::new("node-3")));
            }
        }
        let share = moved as f64 / keys as f64;
        assert!((0.20..=0.30).contains(&share), "moved {share}");
    }

    #[test]
    fn same_ring_in_every_process_order_independent() {
        let a = Ring::new(1, ids(3));
        let mut rev = ids(3);
        rev.reverse();
        let b = Ring::new(1, rev);
        for i in 0..500 {
            assert_eq!(a.owner(&key(i)), b.owner(&key(i)));
        }
        // Pinned placements: a change in hashing would silently reshuffle every running cluster
        // during a rolling upgrade, so it must fail here first.
        let owners: Vec<_> = (0..5)
            .map(|i| a.owner(&key(i)).map(|n| n.as_str().to_owned()))
            .collect();
        let want = ["node-1", "node-1", "node-1", "node-2", "node-2"];
        assert_eq!(owners, want.map(|s| Some(s.to_owned())));
    }

    #[test]
    fn shares_add_up_to_one() {
        let nodes = ids(3);
        let ring = Ring::new(1, nodes.clone());
        let total: f64 = nodes.iter().map(|n| ring.share(n)).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        for n in &nodes {
            let s = ring.share(n);
            assert!((s - 1.0 / 3.0).abs() < 0.05, "{n}: {s}");
        }
        assert_eq!(Ring::new(1, ids(1)).share(&ids(1)[0]), 1.0);
        assert_eq!(ring.share(&NodeId::new("elsewhere")), 0.0);
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert!(Ring::new(0, Vec::new()).owner(&key(1)).is_none());
    }
}
