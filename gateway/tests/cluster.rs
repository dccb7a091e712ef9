//! Cluster mode with real processes on loopback: PostgreSQL, tansu, `palaver node` x3,
//! `palaver gateway` x2, real WebSocket clients, and the history checker.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../node/tests/support/kafka.rs"]
mod kafka;
#[path = "../../node/tests/support/pg.rs"]
mod pg;
mod cluster {
    pub mod checker;
    pub mod sandbox;
}

use cluster::checker::{Acked, ClientLog, Seen, check};
use cluster::sandbox::Sandbox;
use common::Client;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn seen(m: &Value) -> Seen {
    Seen {
        room: m["room"].as_u64().unwrap(),
        id: m["id"].as_u64().unwrap(),
        seq: m["seq"].as_u64().unwrap(),
        client_ref: m["client_ref"].as_str().map(str::to_owned),
    }
}

/// Moves buffered `message` events into the log.
fn absorb(c: &mut Client, log: &mut ClientLog) {
    while let Some(e) = c.events.pop_front() {
        if e["event"] == "message" {
            log.received.push(seen(&e["data"]["message"]));
        }
    }
}

/// Sends until acknowledged, retrying with the same client_ref on retryable errors.
async fn send(c: &mut Client, log: &mut ClientLog, room: u64, cref: &str) -> Duration {
    let start = Instant::now();
    loop {
        let r = c
            .request(
                "send",
                json!({"room": room, "text": cref, "client_ref": cref}),
            )
            .await;
        absorb(c, log);
        if r["ok"] == true {
            let m = seen(&r["data"]["message"]);
            log.acked.push(Acked {
                room,
                client_ref: cref.into(),
                id: m.id,
                seq: m.seq,
            });
            return start.elapsed();
        }
        let code = r["error"]["code"].as_str().unwrap_or_default().to_owned();
        assert!(
            ["unavailable", "timeout", "not_owner"].contains(&code.as_str()),
            "send {cref} failed for good: {r}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "send {cref} kept failing: {r}"
        );
    }
}

/// Reads events until none arrives for `quiet`.
async fn drain(c: &mut Client, log: &mut ClientLog, quiet: Duration) {
    absorb(c, log);
    use futures::StreamExt;
    loop {
        match tokio::time::timeout(quiet, c.ws.next()).await {
            Err(_) | Ok(None) => return,
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "event" && v["event"] == "message" {
                    log.received.push(seen(&v["data"]["message"]));
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) => return,
        }
    }
}

/// Reads the whole history of `room`, oldest first.
async fn history(c: &mut Client, room: u64) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let mut q = json!({"room": room, "limit": 200});
        if after > 0 {
            q["after"] = json!(after);
        }
        let d = c.ok("history", q).await;
        let mut page: Vec<Seen> = d["messages"].as_array().unwrap().iter().map(seen).collect();
        page.reverse();
        let Some(last) = page.last() else { break };
        after = last.id;
        out.extend(page);
        if d["has_more"] != true {
            break;
        }
    }
    out
}

/// Fills the log's gaps from history the way a reconnecting client does.
async fn resume(c: &mut Client, log: &mut ClientLog, room: u64) {
    // `seq` tells the client what it has without a gap; it reads everything after the last
    // message of that unbroken run.
    let mut have: Vec<&Seen> = log.received.iter().filter(|s| s.room == room).collect();
    have.sort_by_key(|s| s.seq);
    let mut last_id = 0;
    for (i, s) in have.iter().enumerate() {
        if s.seq != i as u64 + 1 {
            break;
        }
        last_id = s.id;
    }
    let all = history(c, room).await;
    log.resumed
        .extend(all.into_iter().filter(|s| s.id > last_id));
}

fn assert_clean(logs: &[ClientLog], hist: &BTreeMap<u64, Vec<Seen>>) {
    let violations = check(logs, hist);
    assert!(
        violations.is_empty(),
        "checker found:\n{}",
        violations.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_gateways_chat_and_see_one_history() {
    let _one = SERIAL.lock().await;
    let sb = Sandbox::start(3, 3, 2).await;
    let mut a = sb.connect(0, "1").await;
    let mut b = sb.connect(1, "2").await;
    let mut c = sb.connect(1, "3").await;
    // A direct room across gateways.
    let d = a.ok("open_direct", json!({"user": "2"})).await;
    let dm = d["room"]["id"].as_u64().unwrap();
    assert_eq!(b.event_named("room_joined").await["room"], dm);
    let (mut la, mut lb, mut lc) = (
        ClientLog::default(),
        ClientLog::default(),
        ClientLog::default(),
    );
    for i in 0..10 {
        send(&mut a, &mut la, dm, &format!("a-dm-{i}")).await;
    }
    for i in 0..10 {
        let e = b.event_named("message").await;
        assert_eq!(e["seq"], i + 1);
        assert_eq!(e["data"]["message"]["text"], format!("a-dm-{i}"));
    }
    send(&mut b, &mut lb, dm, "b-dm-reply").await;
    // A also gets its own messages (every session of every member gets each one); B's follows.
    loop {
        let e = a.event_named("message").await;
        la.received.push(seen(&e["data"]["message"]));
        if e["data"]["message"]["text"] == "b-dm-reply" {
            break;
        }
    }
    // A group spanning both gateways.
    let g = a
        .ok(
            "create_group",
            json!({"name": "span", "members": ["2", "3"]}),
        )
        .await;
    let room = g["room"]["id"].as_u64().unwrap();
    b.event_named("room_joined").await;
    c.event_named("room_joined").await;
    for i in 0..5 {
        send(&mut a, &mut la, room, &format!("a-g-{i}")).await;
        send(&mut b, &mut lb, room, &format!("b-g-{i}")).await;
        send(&mut c, &mut lc, room, &format!("c-g-{i}")).await;
    }
    for (cl, log) in [(&mut a, &mut la), (&mut b, &mut lb), (&mut c, &mut lc)] {
        drain(cl, log, Duration::from_millis(700)).await;
    }
    // History is identical from both gateways.
    let from0 = history(&mut a, room).await;
    let from1 = history(&mut c, room).await;
    assert_eq!(from0, from1);
    assert_eq!(from0.len(), 15);
    let mut hist = BTreeMap::new();
    hist.insert(room, from0);
    hist.insert(dm, history(&mut b, dm).await);
    for (cl, log) in [(&mut a, &mut la), (&mut b, &mut lb), (&mut c, &mut lc)] {
        for r in [room, dm] {
            if log.received.iter().any(|s| s.room == r) {
                resume(cl, log, r).await;
            }
        }
    }
    let group_logs: Vec<ClientLog> = vec![la, lb, lc];
    assert_clean(&group_logs, &hist);

    // Every process shows its metrics: each node sees the 3-node ring and owns about a third of
    // it (the shares add up to 1); the room writes happened on the nodes; each gateway counts
    // its own sessions.
    let mut shares = 0.0;
    let mut room_writes = 0.0;
    for n in sb.nodes.iter().flatten() {
        let text = metrics_text(&n.http).await;
        assert_eq!(series(&text, "palaver_ring_nodes"), Some(3.0), "{text}");
        let share = series(&text, "palaver_ring_owned_share").unwrap();
        assert!((0.2..0.5).contains(&share), "{share}");
        shares += share;
        room_writes += series(&text, "palaver_store_seconds_count{op=\"apply_room\"}").unwrap();
    }
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");
    assert!(room_writes >= 26.0, "{room_writes}");
    for (j, sessions) in [(0, 1.0), (1, 2.0)] {
        let text = metrics_text(&sb.gateways[j].as_ref().unwrap().http).await;
        assert_eq!(
            series(&text, "palaver_connections{dialect=\"native\"}"),
            Some(sessions),
            "{text}"
        );
        assert!(series(&text, "palaver_send_ack_seconds_count").unwrap() > 0.0);
    }
}

/// `GET /metrics` of a process.
async fn metrics_text(http: &str) -> String {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The value of the sample written exactly `series` (name and labels) in a text exposition.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_under_traffic_loses_nothing() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(3, 3, 2).await;
    let users = ["1", "2", "3", "4"];
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(sb.connect(i % 2, u).await);
    }
    // Several rooms, so that every node owns some.
    let mut rooms = Vec::new();
    for k in 0..6 {
        let g = clients[0]
            .ok(
                "create_group",
                json!({"name": format!("r{k}"), "members": ["2", "3", "4"]}),
            )
            .await;
        rooms.push(g["room"]["id"].as_u64().unwrap());
    }
    let ring = node::cluster::ring_of(
        (0..3)
            .map(|i| schema::NodeId::new(format!("n{i}")))
            .collect(),
    );
    let victim = rooms
        .iter()
        .map(|r| {
            ring.owner(&node::ring::RingKey::Room(schema::RoomId(*r)))
                .unwrap()
                .clone()
        })
        .next()
        .unwrap();
    let victim_idx: usize = victim.as_str()[1..].parse().unwrap();
    let victim_rooms: Vec<u64> = rooms
        .iter()
        .copied()
        .filter(|r| ring.owner(&node::ring::RingKey::Room(schema::RoomId(*r))) == Some(&victim))
        .collect();

    // Steady traffic from every client into every room, with the kill in the middle.
    let mut logs: Vec<ClientLog> = users
        .iter()
        .map(|u| ClientLog {
            name: format!("user{u}"),
            ..Default::default()
        })
        .collect();
    const ROUNDS: usize = 12;
    let mut failover = Duration::ZERO;
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            sb.kill_node(victim_idx);
            // The first send into a room the dead node owned: how long until it serves again.
            let c = &mut clients[0];
            let took = send(
                c,
                &mut logs[0],
                victim_rooms[0],
                &format!("failover-{round}"),
            )
            .await;
            failover = took;
        }
        for (i, c) in clients.iter_mut().enumerate() {
            for &room in &rooms {
                send(c, &mut logs[i], room, &format!("u{i}-r{room}-n{round}")).await;
            }
        }
    }
    println!("failover: rooms of the killed node served again after {failover:?}");
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        drain(c, &mut logs[i], Duration::from_millis(700)).await;
    }
    let mut hist = BTreeMap::new();
    for &room in &rooms {
        hist.insert(room, history(&mut clients[1], room).await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for &room in &rooms {
            resume(c, &mut logs[i], room).await;
        }
    }
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    let stored: usize = hist.values().map(Vec::len).sum();
    assert_eq!(
        acked, stored,
        "every acknowledged message stored once, nothing else"
    );
    assert_clean(&logs, &hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_node_hands_its_rooms_over_before_it_exits() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(3, 3, 2).await;
    let users = ["1", "2", "3", "4"];
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(sb.connect(i % 2, u).await);
    }
    let mut rooms = Vec::new();
    for k in 0..6 {
        let g = clients[0]
            .ok(
                "create_group",
                json!({"name": format!("h{k}"), "members": ["2", "3", "4"]}),
            )
            .await;
        rooms.push(g["room"]["id"].as_u64().unwrap());
    }
    let ring = node::cluster::ring_of(
        (0..3)
            .map(|i| schema::NodeId::new(format!("n{i}")))
            .collect(),
    );
    let owner = |r: u64| {
        ring.owner(&node::ring::RingKey::Room(schema::RoomId(r)))
            .unwrap()
            .clone()
    };
    let victim = owner(rooms[0]);
    let victim_idx: usize = victim.as_str()[1..].parse().unwrap();
    let victim_rooms: Vec<u64> = rooms
        .iter()
        .copied()
        .filter(|r| owner(*r) == victim)
        .collect();
    let survivor = sb.nodes[(victim_idx + 1) % 3]
        .as_ref()
        .unwrap()
        .http
        .clone();
    let mut logs: Vec<ClientLog> = users
        .iter()
        .map(|u| ClientLog {
            name: format!("user{u}"),
            ..Default::default()
        })
        .collect();
    const ROUNDS: usize = 10;
    let mut victim_proc = None;
    let mut slowest_during_drain = Duration::ZERO;
    let mut handed_over_while_running = false;
    // Watches, from the SIGTERM on, for the moment the survivors run the ring without the
    // victim while its process still runs (checked every 10 ms: checked only between rounds
    // of sends, as before, a busy machine could miss the window; a CI run did).
    let mut watcher = None;
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            let p = sb.nodes[victim_idx].take().unwrap();
            p.sigterm();
            let (victim_pid, survivor) = (p.child.id(), survivor.clone());
            watcher = Some(tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while tokio::time::Instant::now() < deadline {
                    let survivors = cluster::sandbox::get_json(&survivor, "/ring").await["nodes"]
                        .as_array()
                        .is_some_and(|n| n.len() == 2);
                    // Alive, and not a zombie waiting to be reaped.
                    let victim_up = std::fs::read_to_string(format!("/proc/{victim_pid}/stat"))
                        .is_ok_and(|st| {
                            st.rsplit_once(") ")
                                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
                        });
                    if survivors && victim_up {
                        return true;
                    }
                    if !victim_up {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }));
            victim_proc = Some(p);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            for &room in &rooms {
                let took = send(c, &mut logs[i], room, &format!("u{i}-r{room}-n{round}")).await;
                if victim_proc.is_some() && victim_rooms.contains(&room) {
                    slowest_during_drain = slowest_during_drain.max(took);
                }
            }
        }
        if let Some(p) = victim_proc.as_mut()
            && p.running()
            && cluster::sandbox::get_json(&survivor, "/ring").await["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2)
        {
            // The survivors already run the ring without the victim, which is still serving
            // (answering not_owner) while it finishes.
            handed_over_while_running = true;
        }
    }
    if let Some(w) = watcher {
        handed_over_while_running |= w.await.unwrap();
    }
    let mut victim_proc = victim_proc.unwrap();
    let code = victim_proc.exit_code(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "a drained node exits 0");
    assert!(
        handed_over_while_running,
        "the ring moved on before the node exited"
    );
    println!("handover: slowest send into the draining node's rooms took {slowest_during_drain:?}");
    assert!(
        slowest_during_drain < Duration::from_secs(1),
        "a graceful handover must not look like a crash: {slowest_during_drain:?}"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        drain(c, &mut logs[i], Duration::from_millis(700)).await;
    }
    let mut hist = BTreeMap::new();
    for &room in &rooms {
        hist.insert(room, history(&mut clients[1], room).await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for &room in &rooms {
            resume(c, &mut logs[i], room).await;
        }
    }
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    let stored: usize = hist.values().map(Vec::len).sum();
    assert_eq!(acked, stored, "every acknowledged message stored once");
    assert_clean(&logs, &hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_and_the_nodes() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(1, 1, 1).await;
    let node_http = sb.nodes[0].as_ref().unwrap().http.clone();
    let gw_http = sb.gateways[0].as_ref().unwrap().http.clone();
    let status = |addr: String| async move {
        let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let until = |addr: String, want: u16| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (s, body) = status(addr.clone()).await;
            if s == want || Instant::now() > deadline {
                return (s, body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(status(node_http.clone()).await.0, 200);
    assert_eq!(status(gw_http.clone()).await.0, 200);
    // The broker goes away: both report the bus.
    sb.broker.kill();
    let (s, body) = until(node_http.clone(), 503).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.starts_with("bus unreachable"), "{body}");
    let (s, body) = until(gw_http.clone(), 503).await;
    assert!(
        s == 503 && body.starts_with("bus unreachable"),
        "{s} {body}"
    );
    sb.broker.restart(Duration::ZERO).await;
    assert_eq!(until(node_http.clone(), 200).await.0, 200);
    assert_eq!(until(gw_http.clone(), 200).await.0, 200);
    // The only node goes away: the gateway has nobody to route to.
    sb.kill_node(0);
    let (s, body) = until(gw_http.clone(), 503).await;
    assert!(
        s == 503 && body.starts_with("nodes unreachable"),
        "{s} {body}"
    );
}

/// Cluster tests start ~7 processes each; on a 2-core machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_clients_move_to_the_other_and_resume_without_gaps() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(3, 3, 2).await;
    let users = ["1", "2", "3", "4"];
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        clients.push(sb.connect(i / 2, u).await); // 1, 2 on g0; 3, 4 on g1
    }
    let g = clients[2]
        .ok(
            "create_group",
            json!({"name": "move", "members": ["1", "2", "4"]}),
        )
        .await;
    let room = g["room"]["id"].as_u64().unwrap();
    let mut logs: Vec<ClientLog> = users
        .iter()
        .map(|u| ClientLog {
            name: format!("user{u}"),
            ..Default::default()
        })
        .collect();
    for round in 0..5 {
        for (i, c) in clients.iter_mut().enumerate() {
            send(c, &mut logs[i], room, &format!("u{i}-pre-{round}")).await;
        }
    }
    // User 1 has a send in flight when its gateway dies.
    clients[0].send_text(json!({"id": "inflight", "op": "send", "room": room, "text": "x", "client_ref": "u0-inflight"}).to_string()).await;
    sb.kill_gateway(0);
    for (i, c) in clients.iter_mut().enumerate().skip(2) {
        drain(c, &mut logs[i], Duration::from_millis(300)).await;
    }
    // Users 1 and 2 reconnect to the other gateway and resume from what they last saw.
    for i in 0..2 {
        absorb(&mut clients[i], &mut logs[i]);
        clients[i] = sb.connect(1, users[i]).await;
        resume(&mut clients[i], &mut logs[i], room).await;
    }
    // The in-flight send is retried with its client_ref: stored once whatever happened to it.
    send(&mut clients[0], &mut logs[0], room, "u0-inflight").await;
    for round in 0..5 {
        for (i, c) in clients.iter_mut().enumerate() {
            send(c, &mut logs[i], room, &format!("u{i}-post-{round}")).await;
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        drain(c, &mut logs[i], Duration::from_millis(700)).await;
    }
    let mut hist = BTreeMap::new();
    hist.insert(room, history(&mut clients[3], room).await);
    for (i, c) in clients.iter_mut().enumerate() {
        resume(c, &mut logs[i], room).await;
    }
    assert_eq!(hist[&room].len(), 41);
    assert_clean(&logs, &hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_delivery_resumes_and_history_keeps_everything() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(3, 3, 2).await;
    let mut a = sb.connect(0, "1").await;
    let mut b = sb.connect(1, "2").await;
    let g = a
        .ok("create_group", json!({"name": "bus", "members": ["2"]}))
        .await;
    let room = g["room"]["id"].as_u64().unwrap();
    b.event_named("room_joined").await;
    let (mut la, mut lb) = (
        ClientLog {
            name: "a".into(),
            ..Default::default()
        },
        ClientLog {
            name: "b".into(),
            ..Default::default()
        },
    );
    for i in 0..5 {
        send(&mut a, &mut la, room, &format!("before-{i}")).await;
    }
    sb.broker.kill();
    let down = Instant::now();
    // Sends are stored and acknowledged while the broker is down.
    for i in 0..5 {
        send(&mut a, &mut la, room, &format!("during-{i}")).await;
    }
    // A broker restart takes seconds; keep it down for two.
    let outage = Duration::from_secs(2).saturating_sub(down.elapsed());
    sb.broker.restart(outage).await;
    // Live delivery comes back: keep sending until B gets a live event sent after the restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    'outer: loop {
        n += 1;
        let cref = format!("after-{n}");
        send(&mut a, &mut la, room, &cref).await;
        let wait = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait {
            drain(&mut b, &mut lb, Duration::from_millis(100)).await;
            if lb.received.iter().any(|s| {
                s.client_ref
                    .as_deref()
                    .is_some_and(|r| r.starts_with("after-"))
            }) {
                break 'outer;
            }
        }
        assert!(
            Instant::now() < deadline,
            "live delivery never resumed after the broker restart"
        );
    }
    drain(&mut b, &mut lb, Duration::from_millis(700)).await;
    drain(&mut a, &mut la, Duration::from_millis(300)).await;
    let mut hist = BTreeMap::new();
    hist.insert(room, history(&mut b, room).await);
    resume(&mut a, &mut la, room).await;
    resume(&mut b, &mut lb, room).await;
    assert_eq!(
        hist[&room].len(),
        la.acked.len(),
        "every acknowledged message is in history"
    );
    assert_clean(&[la, lb], &hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_fourth_node_moves_about_a_quarter_of_the_rooms_and_traffic_continues() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(4, 3, 1).await;
    let mut a = sb.connect(0, "1").await;
    let _b = sb.connect(0, "2").await;
    let mut rooms = Vec::new();
    for k in 0..100 {
        let g = a
            .ok(
                "create_group",
                json!({"name": format!("q{k}"), "members": ["2"]}),
            )
            .await;
        rooms.push(g["room"]["id"].as_u64().unwrap());
    }
    let mut la = ClientLog {
        name: "a".into(),
        ..Default::default()
    };
    for &room in &rooms {
        send(&mut a, &mut la, room, &format!("r{room}-before")).await;
    }
    sb.start_node(3).await;
    sb.wait_ring(4).await;
    let ids = |n: usize| {
        (0..n)
            .map(|i| schema::NodeId::new(format!("n{i}")))
            .collect::<Vec<_>>()
    };
    let (three, four) = (
        node::cluster::ring_of(ids(3)),
        node::cluster::ring_of(ids(4)),
    );
    let key = |r: u64| node::ring::RingKey::Room(schema::RoomId(r));
    let moved: Vec<u64> = rooms
        .iter()
        .copied()
        .filter(|r| three.owner(&key(*r)) != four.owner(&key(*r)))
        .collect();
    println!(
        "{} of {} rooms moved to the new node",
        moved.len(),
        rooms.len()
    );
    // A quarter is expected: 25 of 100; 10 to 40 holds with a probability above 99.9 %.
    assert!(
        (10..=40).contains(&moved.len()),
        "moved {} of 100",
        moved.len()
    );
    assert!(
        moved
            .iter()
            .all(|r| four.owner(&key(*r)) == Some(&schema::NodeId::new("n3")))
    );
    // Every room, moved or not, takes traffic on its new owner and goes on where it stopped.
    for &room in &rooms {
        send(&mut a, &mut la, room, &format!("r{room}-after")).await;
    }
    for a in &la.acked {
        assert!(a.seq <= 2);
    }
    let mut hist = BTreeMap::new();
    for &room in &rooms {
        hist.insert(room, history(&mut a, room).await);
    }
    drain(&mut a, &mut la, Duration::from_millis(500)).await;
    for &room in &rooms {
        resume(&mut a, &mut la, room).await;
    }
    assert_clean(&[la], &hist);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_found_through_a_dns_name_learn_their_ids_by_asking() {
    let _one = SERIAL.lock().await;
    // No static node: the gateway and the node know only `localhost:PORT`, as pods know a
    // headless Service's name. (One node: this machine's `localhost` has one address.)
    let mut sb = Sandbox::start(1, 0, 0).await;
    let port = cluster::sandbox::free_port();
    let mut env = sb.common_env();
    env.retain(|(k, _)| *k != "PALAVER_NODES");
    env.push(("PALAVER_NODES", format!("localhost:{port}")));
    let mut node_env = env.clone();
    node_env.push(("PALAVER_NODE_ID", "palaver-node-0".into()));
    node_env.push(("PALAVER_CLUSTER_ADDR", format!("127.0.0.1:{port}")));
    sb.nodes[0] = Some(cluster::sandbox::spawn(&["node"], node_env).await);
    sb.wait_ring(1).await;
    let ring = cluster::sandbox::get_json(&sb.nodes[0].as_ref().unwrap().http, "/ring").await;
    assert_eq!(ring["nodes"], json!(["palaver-node-0"]));
    let mut gw_env = env;
    gw_env.push(("PALAVER_GATEWAY_ID", "g-dns".into()));
    sb.gateways
        .push(Some(cluster::sandbox::spawn(&["gateway"], gw_env).await));
    let mut a = sb.connect(0, "1").await;
    let _b = sb.connect(0, "2").await;
    let d = a.ok("open_direct", json!({"user": "2"})).await;
    let room = d["room"]["id"].as_u64().unwrap();
    let mut la = ClientLog::default();
    send(&mut a, &mut la, room, "through dns").await;
    assert_eq!(history(&mut a, room).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_restarts_at_once_gets_its_sessions_and_subscriptions_back() {
    let _one = SERIAL.lock().await;
    let mut sb = Sandbox::start(3, 3, 1).await;
    let mut a = sb.connect(0, "1").await;
    let mut b = sb.connect(0, "2").await;
    // A room owned by n1, the node that will restart.
    let ring = node::cluster::ring_of(
        (0..3)
            .map(|i| schema::NodeId::new(format!("n{i}")))
            .collect(),
    );
    let mut room = 0;
    for k in 0..40 {
        let g = a
            .ok(
                "create_group",
                json!({"name": format!("x{k}"), "members": ["2"]}),
            )
            .await;
        let id = g["room"]["id"].as_u64().unwrap();
        if ring.owner(&node::ring::RingKey::Room(schema::RoomId(id)))
            == Some(&schema::NodeId::new("n1"))
        {
            room = id;
            break;
        }
    }
    assert_ne!(room, 0, "no room landed on n1");
    let mut la = ClientLog::default();
    let mut lb = ClientLog::default();
    send(&mut a, &mut la, room, "before").await;
    // Restart n1 as fast as it goes: other processes may never see it gone, yet its session table
    // and subscriptions are empty. Its new incarnation makes everyone re-register with it.
    sb.kill_node(1);
    sb.start_node(1).await;
    sb.wait_ring(3).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    'live: loop {
        n += 1;
        let cref = format!("after-{n}");
        send(&mut a, &mut la, room, &cref).await;
        let wait = Instant::now() + Duration::from_millis(300);
        while Instant::now() < wait {
            drain(&mut b, &mut lb, Duration::from_millis(100)).await;
            if lb
                .received
                .iter()
                .any(|s| s.client_ref.as_deref() == Some(cref.as_str()))
            {
                break 'live;
            }
        }
        assert!(
            Instant::now() < deadline,
            "live delivery never came back after the restart"
        );
    }
}
