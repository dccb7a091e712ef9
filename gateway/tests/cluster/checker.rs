//! The history checker: reads every client's send and receive logs and the final history of each
//! room, and reports loss, duplication and order violations.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

/// One acknowledged send.
#[derive(Clone, Debug)]
pub struct Acked {
    pub room: u64,
    pub client_ref: String,
    pub id: u64,
    pub seq: u64,
}

/// One message as stored or delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub room: u64,
    pub id: u64,
    pub seq: u64,
    pub client_ref: Option<String>,
}

/// What one client did and saw.
#[derive(Default, Debug)]
pub struct ClientLog {
    pub name: String,
    pub acked: Vec<Acked>,
    /// Live events, in arrival order.
    pub received: Vec<Seen>,
    /// What the client fetched from history to fill gaps after reconnecting or at the end.
    pub resumed: Vec<Seen>,
}

/// Checks every invariant; returns the violations (empty: none).
pub fn check(logs: &[ClientLog], history: &BTreeMap<u64, Vec<Seen>>) -> Vec<String> {
    let mut v = Vec::new();
    // History: one dense order per room, ids increasing, no client_ref twice.
    for (room, msgs) in history {
        for (i, m) in msgs.iter().enumerate() {
            if m.seq != i as u64 + 1 {
                v.push(format!("room {room}: position {i} has seq {}", m.seq));
                break;
            }
        }
        if msgs.windows(2).any(|w| w[0].id >= w[1].id) {
            v.push(format!("room {room}: ids do not increase with seq"));
        }
        let mut refs = HashSet::new();
        for m in msgs {
            if let Some(r) = &m.client_ref
                && !refs.insert(r.clone())
            {
                v.push(format!(
                    "room {room}: client_ref {r} stored twice (duplicate)"
                ));
            }
        }
    }
    let by_id: HashMap<(u64, u64), &Seen> = history
        .iter()
        .flat_map(|(room, msgs)| msgs.iter().map(move |m| ((*room, m.id), m)))
        .collect();
    for log in logs {
        // Every acknowledged message is in history, once, as acknowledged.
        for a in &log.acked {
            match by_id.get(&(a.room, a.id)) {
                None => v.push(format!(
                    "{}: acked {} (room {}, id {}) lost",
                    log.name, a.client_ref, a.room, a.id
                )),
                Some(m)
                    if m.seq != a.seq || m.client_ref.as_deref() != Some(a.client_ref.as_str()) =>
                {
                    v.push(format!(
                        "{}: acked {} differs in history: {m:?}",
                        log.name, a.client_ref
                    ));
                }
                Some(_) => {}
            }
        }
        // Live events: per room strictly increasing, each one as stored.
        let mut last: HashMap<u64, u64> = HashMap::new();
        for r in &log.received {
            if let Some(prev) = last.insert(r.room, r.seq)
                && r.seq <= prev
            {
                v.push(format!(
                    "{}: room {} event seq {} after {prev} (reorder or duplicate)",
                    log.name, r.room, r.seq
                ));
            }
            match by_id.get(&(r.room, r.id)) {
                Some(m) if m.seq == r.seq => {}
                other => v.push(format!(
                    "{}: received {r:?} but history has {other:?}",
                    log.name
                )),
            }
        }
        // Resume: what was received live plus what was fetched covers the whole room, no gaps.
        let mut covered: HashMap<u64, HashSet<u64>> = HashMap::new();
        for s in log.received.iter().chain(&log.resumed) {
            covered.entry(s.room).or_default().insert(s.seq);
        }
        for (room, seqs) in covered {
            let n = history.get(&room).map_or(0, Vec::len) as u64;
            let missing: Vec<u64> = (1..=n).filter(|s| !seqs.contains(s)).collect();
            if !missing.is_empty() {
                v.push(format!(
                    "{}: room {room} resume left gaps {missing:?}",
                    log.name
                ));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(room: u64, seq: u64, r: &str) -> Seen {
        Seen {
            room,
            id: 100 + seq,
            seq,
            client_ref: Some(r.into()),
        }
    }

    #[test]
    fn the_checker_finds_what_it_must() {
        let mut history = BTreeMap::new();
        history.insert(1, vec![seen(1, 1, "a"), seen(1, 2, "b"), seen(1, 3, "a")]);
        let log = ClientLog {
            name: "c".into(),
            acked: vec![Acked {
                room: 1,
                client_ref: "z".into(),
                id: 999,
                seq: 9,
            }],
            received: vec![seen(1, 2, "b"), seen(1, 1, "a")],
            resumed: vec![],
        };
        let v = check(&[log], &history);
        let all = v.join("\n");
        assert!(all.contains("stored twice"), "{all}");
        assert!(all.contains("lost"), "{all}");
        assert!(all.contains("reorder"), "{all}");
        assert!(all.contains("gaps [3]"), "{all}");
        let ok = ClientLog {
            name: "ok".into(),
            received: vec![seen(1, 1, "a"), seen(1, 2, "b"), seen(1, 3, "c")],
            ..Default::default()
        };
        let mut good = BTreeMap::new();
        good.insert(1, vec![seen(1, 1, "a"), seen(1, 2, "b"), seen(1, 3, "c")]);
        assert!(check(&[ok], &good).is_empty());
    }
}
