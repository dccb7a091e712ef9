//! The native protocol against a real server over real WebSockets.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn status_of(url: &str, bearer: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn token_is_checked_before_the_upgrade() {
    let s = TestServer::start().await;
    let ws = s.url("/ws");
    assert_eq!(status_of(&ws, None).await, 401, "no token");
    assert_eq!(
        status_of(&format!("{ws}?token=garbage"), None).await,
        401,
        "garbage"
    );
    let expired = token_with("1", palaver_gateway::auth::now_secs() - 3600);
    assert_eq!(
        status_of(&format!("{ws}?token={expired}"), None).await,
        401,
        "expired"
    );
    assert_eq!(status_of(&ws, Some("nope")).await, 401, "bad bearer");
    // Valid, by header and by query.
    assert_eq!(status_of(&ws, Some(&s.token("1"))).await, 101);
    assert_eq!(
        status_of(&format!("{ws}?token={}", s.token("1")), None).await,
        101
    );
    // The 401 says why, as JSON.
    let body = reqwest_like_get(&s.http("/ws"), None).await;
    assert!(body.contains("\"unauthorized\""), "{body}");
    s.shutdown().await;
}

/// Minimal HTTP/1.1 GET over a raw socket (no extra HTTP client dependency); returns the body.
async fn reqwest_like_get(url: &str, bearer: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut sock = tokio::net::TcpStream::connect(host).await.unwrap();
    let auth = bearer
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET /{path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    assert!(
        reqwest_like_get(&s.http("/healthz"), None)
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        reqwest_like_get(&s.http("/readyz"), None)
            .await
            .starts_with("HTTP/1.1 200")
    );
    s.shutdown().await;
}

#[tokio::test]
async fn direct_rooms_are_one_per_pair() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let d = a.ok("open_direct", json!({"user": "2"})).await;
    assert_eq!(d["created"], true);
    assert_eq!(d["room"]["kind"], "direct");
    let room = d["room"]["id"].as_u64().unwrap();
    assert!(room < (1 << 53));
    // The peer is told, and opening from their side finds the same room.
    let joined = b.event_named("room_joined").await;
    assert_eq!(joined["room"], room);
    let again = b.ok("open_direct", json!({"user": "1"})).await;
    assert_eq!(
        (again["room"]["id"].as_u64(), &again["created"]),
        (Some(room), &json!(false))
    );
    let members: Vec<&str> = again["room"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 2);
    assert!(members.contains(&"1") && members.contains(&"2"));
    // Unknown peer, and yourself.
    assert_eq!(
        a.err("open_direct", json!({"user": "999"})).await.0,
        "not_found"
    );
    assert_eq!(
        a.err("open_direct", json!({"user": "1"})).await.0,
        "invalid_field"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn groups_announce_and_enforce_limits() {
    let s = TestServer::start_with(|b| b.group_max_members = Some(3)).await;
    let mut owner = s.connect("10").await;
    let mut m1 = s.connect("11").await;
    let _m2 = s.connect("12").await;
    let _m3 = s.connect("13").await;
    let d = owner
        .ok(
            "create_group",
            json!({"name": "  crew ", "members": ["11", "12"]}),
        )
        .await;
    assert_eq!(d["room"]["name"], "crew");
    assert_eq!(d["room"]["kind"], "group");
    let roles: Vec<(String, String)> = d["room"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(roles.contains(&("10".into(), "owner".into())), "{roles:?}");
    assert!(roles.contains(&("11".into(), "member".into())), "{roles:?}");
    let e = m1.event_named("room_joined").await;
    assert_eq!(e["data"]["room"]["name"], "crew");
    assert_eq!(
        owner
            .err(
                "create_group",
                json!({"name": "big", "members": ["11", "12", "13"]})
            )
            .await
            .0,
        "group_full"
    );
    assert_eq!(
        owner
            .err("create_group", json!({"name": "", "members": []}))
            .await
            .0,
        "invalid_field"
    );
    assert_eq!(
        owner
            .err("create_group", json!({"name": "x", "members": ["404"]}))
            .await
            .0,
        "not_found"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn messages_reach_every_session_of_every_member_and_nobody_else() {
    let s = TestServer::start().await;
    let mut a1 = s.connect("1").await;
    let mut a2 = s.connect("1").await; // second device
    let mut b = s.connect("2").await;
    let mut outsider = s.connect("3").await;
    let room = group(&mut a1, "pair", &["2"]).await;
    b.event_named("room_joined").await;
    a2.event_named("room_joined").await;
    a1.event_named("room_joined").await;

    let sent = b
        .ok(
            "send",
            json!({"room": room, "text": "hello", "client_ref": "c-1"}),
        )
        .await;
    let m = &sent["message"];
    assert_eq!(
        (m["seq"].as_u64(), m["sender"].as_str(), m["text"].as_str()),
        (Some(1), Some("2"), Some("hello"))
    );
    assert_eq!(m["client_ref"], "c-1");
    for c in [&mut a1, &mut a2, &mut b] {
        let e = c.event_named("message").await;
        assert_eq!(
            (e["room"].as_u64(), e["seq"].as_u64()),
            (Some(room), Some(1))
        );
        assert_eq!(e["data"]["message"]["id"], m["id"]);
    }
    outsider.no_event_within(Duration::from_millis(300)).await;
    // A sender without client_ref gets no invented one back.
    let sent = a2.ok("send", json!({"room": room, "text": "second"})).await;
    assert!(sent["message"].get("client_ref").is_none(), "{sent}");
    let e = b.event_named("message").await;
    assert!(e["data"]["message"].get("client_ref").is_none(), "{e}");
    s.shutdown().await;
}

#[tokio::test]
async fn retry_with_the_same_client_ref_returns_the_original() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    b.event_named("room_joined").await;
    let first = a
        .ok(
            "send",
            json!({"room": room, "text": "once", "client_ref": "k"}),
        )
        .await;
    let again = a
        .ok(
            "send",
            json!({"room": room, "text": "once", "client_ref": "k"}),
        )
        .await;
    assert_eq!(first, again);
    // Concurrent retries of a fresh key from a second device: still one message.
    let mut a2 = s.connect("1").await;
    let (x, y) = tokio::join!(
        a.ok(
            "send",
            json!({"room": room, "text": "dup", "client_ref": "k2"})
        ),
        a2.ok(
            "send",
            json!({"room": room, "text": "dup", "client_ref": "k2"})
        ),
    );
    assert_eq!(x["message"]["id"], y["message"]["id"]);
    // The same key from another sender is another message.
    let other = b
        .ok(
            "send",
            json!({"room": room, "text": "mine", "client_ref": "k"}),
        )
        .await;
    assert_ne!(other["message"]["id"], first["message"]["id"]);
    let h = a.ok("history", json!({"room": room})).await;
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 2, 1]);
    // B saw each message once.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(b.event_named("message").await["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![1, 2, 3]);
    b.no_event_within(Duration::from_millis(300)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn history_pages_and_room_list() {
    let s = TestServer::start_with(|b| b.history_max_limit = Some(5)).await;
    let mut a = s.connect("1").await;
    let _b = s.connect("2").await;
    let r1 = group(&mut a, "one", &["2"]).await;
    let r2 = group(&mut a, "two", &["2"]).await;
    let mut ids = Vec::new();
    for i in 1..=12 {
        let d = a
            .ok("send", json!({"room": r1, "text": format!("m{i}")}))
            .await;
        ids.push(d["message"]["id"].as_u64().unwrap());
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase within a room"
    );
    let seqs = |d: &Value| -> Vec<u64> {
        d["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    let d = a.ok("history", json!({"room": r1, "limit": 3})).await;
    assert_eq!(
        (seqs(&d), d["has_more"].clone()),
        (vec![12, 11, 10], json!(true))
    );
    let d = a.ok("history", json!({"room": r1, "limit": 100})).await;
    assert_eq!(seqs(&d), vec![12, 11, 10, 9, 8], "limit is capped at 5");
    let d = a.ok("history", json!({"room": r1, "before": ids[3]})).await;
    assert_eq!(
        (seqs(&d), d["has_more"].clone()),
        (vec![3, 2, 1], json!(false))
    );
    let d = a
        .ok("history", json!({"room": r1, "after": ids[1], "limit": 2}))
        .await;
    assert_eq!(seqs(&d), vec![4, 3], "after anchors the page at the cursor");
    let d = a
        .ok(
            "history",
            json!({"room": r1, "after": ids[2], "before": ids[5]}),
        )
        .await;
    assert_eq!(seqs(&d), vec![5, 4]);
    // skip (Syarah skipCount) pages past messages from the anchor, across store pages.
    let d = a
        .ok("history", json!({"room": r1, "skip": 7, "limit": 3}))
        .await;
    assert_eq!(
        (seqs(&d), d["has_more"].clone()),
        (vec![5, 4, 3], json!(true))
    );
    let d = a
        .ok(
            "history",
            json!({"room": r1, "after": ids[0], "skip": 6, "limit": 2}),
        )
        .await;
    assert_eq!(seqs(&d), vec![9, 8], "forward skip from the anchor");
    let d = a.ok("history", json!({"room": r1, "skip": 12})).await;
    assert_eq!((seqs(&d), d["has_more"].clone()), (vec![], json!(false)));
    assert_eq!(
        a.err("history", json!({"room": r1, "skip": 10_001}))
            .await
            .0,
        "invalid_field"
    );
    assert_eq!(
        a.err("history", json!({"room": r1, "limit": 0})).await.0,
        "invalid_field"
    );
    assert_eq!(
        a.err(
            "history",
            json!({"room": r1, "after": ids[5], "before": ids[2]})
        )
        .await
        .0,
        "invalid_field"
    );
    a.ok("send", json!({"room": r2, "text": "latest"})).await;
    let d = a.ok("rooms", json!({})).await;
    let rooms = d["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 2);
    assert_eq!(
        rooms[0]["id"].as_u64(),
        Some(r2),
        "most recently active first"
    );
    assert_eq!(rooms[0]["last_message"]["text"], "latest");
    assert_eq!(rooms[1]["last_seq"], 12);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_the_connection_survives() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut c = s.connect("3").await;
    let room = group(&mut a, "g", &[]).await;
    let cases: Vec<(String, &str, &str)> = vec![
        ("{oops".into(), "malformed_json", "not valid JSON"),
        ("42".into(), "malformed_json", "JSON object"),
        (
            r#"{"op":"rooms"}"#.into(),
            "invalid_field",
            "missing field `id`",
        ),
        (r#"{"id":1}"#.into(), "invalid_field", "missing field `op`"),
        (
            r#"{"id":1,"op":"teleport"}"#.into(),
            "unknown_op",
            "teleport",
        ),
        (
            r#"{"id":1,"op":"send","text":"x"}"#.into(),
            "invalid_field",
            "missing field `room`",
        ),
        (
            format!(r#"{{"id":1,"op":"send","room":"{room}","text":"x"}}"#),
            "invalid_field",
            "invalid type",
        ),
        (
            format!(r#"{{"id":1,"op":"send","room":{room},"text":7}}"#),
            "invalid_field",
            "invalid type",
        ),
        (
            format!(r#"{{"id":1,"op":"send","room":{room},"text":"   "}}"#),
            "invalid_field",
            "empty",
        ),
        (
            format!(r#"{{"id":1,"op":"send","room":{room},"text":"x","client_ref":""}}"#),
            "invalid_field",
            "client_ref",
        ),
        (
            format!(r#"{{"id":1,"op":"send","room":{room},"text":"x","extra":1}}"#),
            "invalid_field",
            "unknown field",
        ),
        (
            r#"{"id":1,"op":"send","room":123456789,"text":"x"}"#.into(),
            "not_found",
            "does not exist",
        ),
    ];
    for (frame, code, needle) in cases {
        a.send_text(frame.clone()).await;
        let r = a.next_reply().await;
        assert_eq!(r["ok"], false, "{frame} -> {r}");
        assert_eq!(r["error"]["code"], code, "{frame} -> {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{frame} -> {msg}");
    }
    // The id is echoed when it could be read.
    a.send_text(r#"{"id":"x-9","op":"nope"}"#.into()).await;
    assert_eq!(a.next_reply().await["id"], "x-9");
    // Binary frames are refused, politely.
    a.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(a.next_reply().await["error"]["code"], "malformed_json");
    // A non-member can neither send nor read.
    assert_eq!(
        c.err("send", json!({"room": room, "text": "hi"})).await.0,
        "not_member"
    );
    assert_eq!(
        c.err("history", json!({"room": room})).await.0,
        "not_member"
    );
    // Both connections still work.
    a.ok("ping", json!({})).await;
    c.ok("ping", json!({})).await;
    a.ok("send", json!({"room": room, "text": "still here"}))
        .await;
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_are_refused_from_their_header_and_the_connection_survives() {
    let s = TestServer::start_with(|b| b.max_frame_bytes = Some(4096)).await;
    let mut a = s.connect("1").await;
    let room = group(&mut a, "g", &[]).await;
    // Just under the limit is fine.
    let text = "x".repeat(3000);
    a.ok("send", json!({"room": room, "text": text})).await;
    // Over it: discarded unread, answered, and the connection goes on.
    let big = json!({"id": 1, "op": "send", "room": room, "text": "y".repeat(10_000)}).to_string();
    let big_len = big.len();
    a.send_text(big).await;
    let r = a.next_reply().await;
    assert_eq!(r["error"]["code"], "frame_too_large", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("4096") && msg.contains(&big_len.to_string()),
        "{msg}"
    );
    a.ok("ping", json!({})).await;
    a.ok("send", json!({"room": room, "text": "after"})).await;
    let h = a.ok("history", json!({"room": room})).await;
    assert_eq!(
        h["messages"].as_array().unwrap().len(),
        2,
        "nothing of the big frame was stored"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn frames_far_beyond_the_limit_and_overgrown_fragmented_messages_close_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = TestServer::start_with(|b| b.max_frame_bytes = Some(4096)).await;
    // A frame declaring 20x the limit is not worth reading: reply, then close.
    let mut a = s.connect("1").await;
    a.send_text("z".repeat(4096 * 20)).await;
    let r = a.next_reply().await;
    assert_eq!(r["error"]["code"], "frame_too_large", "{r}");
    let (code, reason) = a.closed().await.expect("a close frame");
    assert_eq!(code, 1009);
    assert!(reason.contains("4096"), "{reason}");
    // A fragmented message whose fragments fit but whose total does not.
    let mut b = s.connect("1").await;
    let first = Frame::message(vec![b'a'; 3000], OpCode::Data(Data::Text), false);
    let rest = Frame::message(vec![b'b'; 3000], OpCode::Data(Data::Continue), true);
    b.ws.send(Message::Frame(first)).await.unwrap();
    b.ws.send(Message::Frame(rest)).await.unwrap();
    let r = b.next_reply().await;
    assert_eq!(r["error"]["code"], "frame_too_large", "{r}");
    assert_eq!(b.closed().await.map(|c| c.0), Some(1009));
    s.shutdown().await;
}

#[tokio::test]
async fn one_order_per_room_under_concurrent_senders() {
    let s = TestServer::start().await;
    let users = ["1", "2", "3", "4", "5"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(s.connect(u).await);
    }
    let room = group(&mut clients[0], "busy", &users[1..]).await;
    for c in clients.iter_mut() {
        c.event_named("room_joined").await;
    }
    // A watcher on a second device of user 1 only reads.
    let mut watcher = s.connect("1").await;
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..EACH {
                c.ok("send", json!({"room": room, "text": format!("{i}:{n}"), "client_ref": format!("{i}-{n}")})).await;
            }
            // Collect what this sender saw.
            let mut seen = Vec::new();
            while seen.len() < EACH * 5 {
                let e = c.event_named("message").await;
                seen.push((e["seq"].as_u64().unwrap(), e["data"]["message"]["id"].as_u64().unwrap(), e["data"]["message"]["text"].as_str().unwrap().to_owned()));
            }
            seen
        }));
    }
    let mut watched = Vec::new();
    while watched.len() < EACH * 5 {
        let e = watcher.event_named("message").await;
        watched.push((
            e["seq"].as_u64().unwrap(),
            e["data"]["message"]["id"].as_u64().unwrap(),
            e["data"]["message"]["text"].as_str().unwrap().to_owned(),
        ));
    }
    let seqs: Vec<u64> = watched.iter().map(|w| w.0).collect();
    assert_eq!(
        seqs,
        (1..=(EACH as u64 * 5)).collect::<Vec<_>>(),
        "dense, gap-free sequence"
    );
    assert!(
        watched.windows(2).all(|w| w[0].1 < w[1].1),
        "ids increase with seq"
    );
    // Each sender's own messages stay in the order it sent them.
    for i in 0..5 {
        let mine: Vec<usize> = watched
            .iter()
            .filter_map(|w| {
                w.2.split_once(':')
                    .filter(|(s, _)| *s == i.to_string())
                    .map(|(_, n)| n.parse().unwrap())
            })
            .collect();
        assert_eq!(mine, (0..EACH).collect::<Vec<_>>());
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            watched,
            "every member sees the same order"
        );
    }
    let mut reader = s.connect("2").await;
    let h = reader
        .ok("history", json!({"room": room, "limit": 200}))
        .await;
    let mut hist: Vec<(u64, u64, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["id"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    hist.reverse();
    assert_eq!(hist, watched, "history is the delivered order");
    s.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_room_goes_on() {
    // Durability is not under test here; `normal` keeps 1000s of sends quick.
    let s = TestServer::start_with(|b| {
        b.outbound_queue = Some(32);
        // At most half the queue (a connect queues them all at once).
        b.pending_per_user = Some(16);
        // Small enough to see (the default is 256 KiB).
        b.ws_send_buffer = Some(32 * 1024);
        b.store_durability = Some("normal".into());
        b.messages_per_second = Some(100_000);
    })
    .await;
    let mut sender = s.connect("1").await;
    let mut fast = s.connect("2").await;
    let mut slow = s.connect("3").await;
    let room = group(&mut sender, "g", &["2", "3"]).await;
    fast.event_named("room_joined").await;
    slow.event_named("room_joined").await;
    assert_eq!(s.sessions(), 3);
    // The slow client never reads from here on. Large messages fill its socket buffers fast;
    // keep sending until the server cuts it off, then some more.
    let text = "z".repeat(4000);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u64>();
    let reader = tokio::spawn(async move {
        let mut last = 0;
        let mut done_rx = done_rx;
        let mut total = None;
        loop {
            if total.is_none() {
                total = done_rx.try_recv().ok();
            }
            if total == Some(last) {
                return last;
            }
            let e = fast.event_named("message").await;
            let seq = e["seq"].as_u64().unwrap();
            assert_eq!(seq, last + 1, "the fast member misses nothing");
            last = seq;
        }
    });
    let mut sent = 0u64;
    let mut after_cut = 0;
    let mut gone_after = 0;
    while after_cut < 50 {
        sent += 1;
        sender
            .ok(
                "send",
                json!({"room": room, "text": text, "client_ref": format!("s{sent}")}),
            )
            .await;
        if s.sessions() == 2 {
            if after_cut == 0 {
                gone_after = sent;
            }
            after_cut += 1;
        }
        assert!(sent < 20_000, "the slow consumer was never disconnected");
    }
    // Cut off, its writer (blocked on the full socket) gives up at once, and the session goes
    // with it: 84 messages into the run here. It used to linger for the 5 s its writer was
    // given to finish (about 3,400 messages on this machine).
    assert!(
        gone_after < 1_000,
        "the cut-off session was still registered {gone_after} messages in"
    );
    done_tx.send(sent).unwrap();
    assert_eq!(
        reader.await.unwrap(),
        sent,
        "the fast member got every message"
    );
    // Reading now finds the buffered frames and then the end of the connection; if the close
    // frame made it through, it names the reason.
    let mut buffered = slow
        .events
        .iter()
        .filter(|e| e["event"] == "message")
        .count() as u64;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => break Some((u16::from(f.code), f.reason)),
            Some(Ok(Message::Close(None)) | Err(_)) | None => break None,
            Some(Ok(Message::Text(t))) => buffered += u64::from(t.as_str().contains("\"message\"")),
            Some(Ok(_)) => {}
        }
    };
    if let Some((code, reason)) = closed {
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("slow consumer"), "{reason}");
    }
    // What it was sent but had not read was held by the kernel: the client's receive buffer,
    // the server's send buffer (`PALAVER_WS_SEND_BUFFER`, 32 KiB here, 64 KiB as Linux counts it),
    // and the last batch the writer had begun (up to 64 frames). Autotuning alone would have
    // let the send buffer grow to 4 MB, a thousand of these messages.
    println!("the client that stopped reading still had {buffered} messages of 4 KB to read");
    assert!(
        buffered < 250,
        "{buffered} messages of 4 KB were buffered for a client that stopped reading"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    a.ok("ping", json!({})).await;
    let closing = tokio::spawn(async move { a.closed().await });
    s.shutdown().await;
    let (code, _) = closing.await.unwrap().expect("close frame");
    assert_eq!(code, 1001);
}

/// `palaver_hub_lane_events_total` now.
async fn lane_events(s: &TestServer) -> f64 {
    let text = reqwest::get(s.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("palaver_hub_lane_events_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A room with more local sessions than `LANE_SESSIONS` (256) is delivered by a lane of its
/// own, a chunk of sessions at a time, while a small room's events go on through the hub loop:
/// every one of 300 members still gets every message, once, in `seq` order, and the small room
/// gets all of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_gets_every_event_in_order_through_its_lane() {
    const MEMBERS: usize = 300;
    const SENDS: u64 = 30;
    let s = TestServer::start().await;
    let lane0 = lane_events(&s).await;
    let mut owner = s.connect("big0").await;
    let names: Vec<String> = (1..MEMBERS).map(|i| format!("big{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut members = Vec::new();
    for n in &names {
        members.push(s.connect(n).await);
    }
    let room = group(&mut owner, "big", &refs).await;
    let mut a = s.connect("small-a").await;
    let mut b = s.connect("small-b").await;
    let direct = a.ok("open_direct", json!({"user": "small-b"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                while seqs.len() < SENDS as usize {
                    let e = c.event_named("message").await;
                    seqs.push(e["seq"].as_u64().unwrap());
                }
                seqs
            })
        })
        .collect();
    for n in 0..SENDS {
        owner
            .ok("send", json!({"room": room, "text": format!("big {n}")}))
            .await;
        a.ok(
            "send",
            json!({"room": direct, "text": format!("small {n}")}),
        )
        .await;
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=SENDS).collect::<Vec<_>>());
    }
    for n in 1..=SENDS {
        let e = b.event_named("message").await;
        assert_eq!(e["seq"].as_u64(), Some(n), "{e}");
    }
    assert!(
        lane_events(&s).await - lane0 >= SENDS as f64,
        "the big room's messages went through its lane"
    );
    s.shutdown().await;
}

/// Leaving a room that has a lane goes through the lane, after the room's earlier events: a
/// member who leaves while the lane is behind still gets every message sequenced before the
/// leave, then `room_left`, and nothing of the room after it. (Handed on by the hub loop, the
/// leave would overtake the lane's backlog and cut those messages off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_a_room_with_a_lane_gets_every_message_before_the_leave() {
    const MEMBERS: usize = 300;
    const SENDS: u64 = 150;
    let s = TestServer::start_with(|b| b.messages_per_second = Some(10_000)).await;
    let mut owner = s.connect("lv0").await;
    let names: Vec<String> = (1..MEMBERS).map(|i| format!("lv{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut members = Vec::new();
    for n in &names {
        members.push(s.connect(n).await);
    }
    let room = group(&mut owner, "lane", &refs).await;
    let mut leaver = members.remove(0);
    // Pipelined: the lane falls behind while the owner's sends are acknowledged.
    for n in 0..SENDS {
        owner
            .send_text(
                json!({"id": n + 1, "op": "send", "room": room, "text": format!("m{n}")})
                    .to_string(),
            )
            .await;
    }
    for _ in 0..SENDS {
        let r = owner.next_reply().await;
        assert_eq!(r["ok"], true, "{r}");
    }
    leaver.ok("leave", json!({"room": room})).await;
    let mut seqs = Vec::new();
    loop {
        let e = leaver.event().await;
        if e["event"] == "room_left" {
            break;
        }
        if e["event"] == "message" {
            seqs.push(e["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        seqs,
        (1..=SENDS).collect::<Vec<_>>(),
        "every message before the leave"
    );
    owner
        .ok("send", json!({"room": room, "text": "after"}))
        .await;
    leaver.no_event_within(Duration::from_millis(300)).await;
    drop(members);
    s.shutdown().await;
}

#[tokio::test]
async fn a_resume_larger_than_the_outbound_queue_is_delivered_whole() {
    // Two rooms, each 700 messages behind, against a queue of 200 frames: the resume must wait
    // for the writer, not cut its own session off as a slow consumer (a client would come
    // back, resume again and be cut again).
    let s = TestServer::start_with(|b| {
        b.outbound_queue = Some(200);
        b.pending_per_user = Some(100);
        b.store_durability = Some("normal".into());
        b.messages_per_second = Some(100_000);
    })
    .await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let r1 = group(&mut a, "one", &["2"]).await;
    let r2 = group(&mut a, "two", &["2"]).await;
    b.event_named("room_joined").await;
    b.event_named("room_joined").await;
    let _ = b.ws.close(None).await;
    drop(b);
    const BEHIND: u64 = 700;
    for i in 0..BEHIND {
        for room in [r1, r2] {
            a.ok("send", json!({"room": room, "text": format!("m{i}")}))
                .await;
        }
    }
    let mut b = s.connect("2").await;
    let r = b
        .ok(
            "resume",
            json!({"rooms": {r1.to_string(): 0, r2.to_string(): 0}}),
        )
        .await;
    for room in [r1, r2] {
        assert_eq!(r["rooms"][room.to_string()]["events"], BEHIND, "{r}");
    }
    let mut seqs: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    let wanted = 2 * BEHIND as usize;
    while seqs.values().map(Vec::len).sum::<usize>() < wanted {
        let e = b.event().await;
        if let Some(room) = e["room"].as_u64().filter(|_| e["seq"].is_u64()) {
            seqs.entry(room)
                .or_default()
                .push(e["seq"].as_u64().unwrap());
        }
    }
    for room in [r1, r2] {
        let want: Vec<u64> = (1..=BEHIND).collect();
        assert_eq!(seqs[&room], want, "room {room} replayed in order, whole");
    }
    // Still open.
    b.ok("ping", json!({})).await;
    s.shutdown().await;
}
