//! The chat domain (issue 5) over real sockets against a running server: rooms and membership,
//! messages, reactions, edits and deletions, read markers, typing, presence, friendships and
//! blocks, chat lists, viewing and pending notifications, resume, limits, an authorization
//! matrix and a REST smoke test. Every wait is bounded.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::StreamExt;
use palaver_gateway::auth::{Claims, now_secs};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// Asserts that no event named `name` (optionally for `room`) is kept or arrives within `d`;
/// other events are kept for later.
async fn no_event_named(c: &mut Client, name: &str, room: Option<u64>, d: Duration) {
    let matches = |e: &Value| e["event"] == name && room.is_none_or(|r| e["room"] == r);
    if let Some(e) = c.events.iter().find(|e| matches(e)) {
        panic!("unexpected {name} event {e}");
    }
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(f["type"], "event", "{f}");
                assert!(!matches(&f), "unexpected {name} event {f}");
                c.events.push_back(f);
            }
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
            Ok(other) => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Lets the millisecond clock move on (chat lists order by last activity in ms), listening.
async fn tick(c: &mut Client) {
    no_event_named(c, "-", None, Duration::from_millis(3)).await;
}

/// The next event named `name` for `room`, skipping others.
async fn event_in(c: &mut Client, name: &str, room: u64) -> Value {
    loop {
        let e = c.event_named(name).await;
        if e["room"] == room {
            return e;
        }
    }
}

/// The next presence event about `user`.
async fn presence_of(c: &mut Client, user: &str) -> Value {
    loop {
        let e = c.event_named("presence").await;
        if e["data"]["user"] == user {
            return e;
        }
    }
}

async fn code(c: &mut Client, op: &str, args: Value) -> String {
    c.err(op, args).await.0
}

async fn send_text(c: &mut Client, room: u64, text: &str) -> Value {
    c.ok("send", json!({"room": room, "text": text})).await["message"].clone()
}

fn id(m: &Value) -> u64 {
    m["id"].as_u64().unwrap()
}

fn users_of(members: &Value) -> Vec<(String, String)> {
    members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn online_of(members: &Value, user: &str) -> bool {
    members
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == user)
        .unwrap_or_else(|| panic!("{user} not in {members}"))["online"]
        .as_bool()
        .unwrap()
}

/// Connects with a token that carries only `sub` (no name, username or picture claims).
async fn connect_bare(s: &TestServer, sub: &str) -> Client {
    let t = auth()
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() + 3600,
            iat: None,
            name: None,
            username: None,
            picture: None,
        })
        .unwrap();
    Client::connect(&format!("{}?token={t}", s.url("/ws"))).await
}

/// Closes a client and waits until `watcher` hears that `user` went offline.
async fn disconnect(c: Client, watcher: &mut Client, user: &str) {
    drop(c);
    while presence_of(watcher, user).await["data"]["online"] != false {}
}

/// The event of `room`'s ordered stream with sequence number `seq` (skipping others).
async fn seq_event(c: &mut Client, room: u64, seq: u64) -> Value {
    loop {
        let e = c.event().await;
        if e["room"] == room && e["seq"] == seq {
            return e;
        }
    }
}

/// One HTTP/1.1 request over a raw socket; returns (status, JSON body).
async fn http(
    s: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, sock.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status: u16 = out[9..12].parse().unwrap();
    let (head, rest) = out.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut b = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            b.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        b
    } else {
        rest.to_owned()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

// ---------------------------------------------------------------------------------------------
// Rooms and membership
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn direct_rooms_groups_and_member_lists_with_online_state() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let d = a.ok("open_direct", json!({"user": "2"})).await;
    assert_eq!(
        (d["created"].clone(), d["room"]["kind"].clone()),
        (json!(true), json!("direct"))
    );
    let direct = d["room"]["id"].as_u64().unwrap();
    let again = a.ok("open_direct", json!({"user": "2"})).await;
    assert_eq!(
        (again["room"]["id"].as_u64(), again["created"].clone()),
        (Some(direct), json!(false))
    );
    let from_b = b.ok("open_direct", json!({"user": "1"})).await;
    assert_eq!(
        (from_b["room"]["id"].as_u64(), from_b["created"].clone()),
        (Some(direct), json!(false))
    );
    assert_eq!(
        event_in(&mut b, "room_joined", direct).await["data"]["room"]["kind"],
        "direct"
    );

    // A public group with an avatar.
    let g = a
        .ok(
            "create_group",
            json!({"name": "club", "members": ["2"], "avatar": "/uploads/club.webp", "public": true}),
        )
        .await;
    assert_eq!(g["created"], true);
    let r = &g["room"];
    assert_eq!(
        (
            r["kind"].clone(),
            r["name"].clone(),
            r["avatar"].clone(),
            r["public"].clone(),
            r["last_seq"].clone()
        ),
        (
            json!("group"),
            json!("club"),
            json!("/uploads/club.webp"),
            json!(true),
            json!(0)
        )
    );
    let mut roles = users_of(&r["members"]);
    roles.sort();
    assert_eq!(
        roles,
        vec![("1".into(), "owner".into()), ("2".into(), "member".into())]
    );
    let room = r["id"].as_u64().unwrap();
    let joined = event_in(&mut b, "room_joined", room).await;
    assert_eq!(joined["data"]["room"]["avatar"], "/uploads/club.webp");
    assert_eq!(joined["data"]["room"]["public"], true);

    // Member list with online state; it flips when the member's only session closes.
    let m = a.ok("members", json!({"room": room})).await;
    assert!(
        online_of(&m["members"], "1") && online_of(&m["members"], "2"),
        "{m}"
    );
    disconnect(b, &mut a, "2").await;
    let m = a.ok("members", json!({"room": room})).await;
    assert!(online_of(&m["members"], "1"), "{m}");
    assert!(!online_of(&m["members"], "2"), "{m}");
    let m = a.ok("members", json!({"room": direct})).await;
    assert!(!online_of(&m["members"], "2"), "{m}");
    let _b = s.connect("2").await;
    assert_eq!(presence_of(&mut a, "2").await["data"]["online"], true);
    let m = a.ok("members", json!({"room": room})).await;
    assert!(online_of(&m["members"], "2"), "{m}");
    s.shutdown().await;
}

#[tokio::test]
async fn membership_changes_are_ordered_events_and_reach_the_affected_user() {
    let s = TestServer::start().await;
    let mut o = s.connect("1").await;
    let mut b = s.connect("2").await;
    let mut c = s.connect("3").await;
    let mut d = s.connect("4").await;
    let mut d2 = s.connect("4").await; // a second device of d
    let mut c2 = s.connect("3").await; // and of c
    let mut e = s.connect("5").await;
    let room = o
        .ok(
            "create_group",
            json!({"name": "crew", "members": ["2"], "public": true}),
        )
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    event_in(&mut b, "room_joined", room).await;

    // add (owner): member_joined with seq 1 to members; room_joined to the new member.
    tick(&mut o).await;
    let r = o
        .ok("add_members", json!({"room": room, "users": ["3"]}))
        .await;
    assert_eq!(users_of(&r["members"]).len(), 3);
    for x in [&mut o, &mut b] {
        let ev = event_in(x, "member_joined", room).await;
        assert_eq!(ev["seq"], 1, "{ev}");
        assert_eq!(
            (
                ev["data"]["member"]["user"].clone(),
                ev["data"]["member"]["role"].clone(),
                ev["data"]["by"].clone()
            ),
            (json!("3"), json!("member"), json!("1"))
        );
    }
    event_in(&mut c2, "room_joined", room).await;
    let j = event_in(&mut c, "room_joined", room).await;
    assert_eq!(j["data"]["room"]["members"].as_array().unwrap().len(), 3);
    // A plain member cannot add.
    assert_eq!(
        code(&mut c, "add_members", json!({"room": room, "users": ["4"]})).await,
        "forbidden"
    );

    // join a public group by id.
    let r = d.ok("join", json!({"room": room})).await;
    assert_eq!(users_of(&r["members"]).len(), 4);
    event_in(&mut d, "room_joined", room).await;
    let ev = event_in(&mut o, "member_joined", room).await;
    assert_eq!(
        (
            ev["seq"].clone(),
            ev["data"]["member"]["user"].clone(),
            ev["data"]["by"].clone()
        ),
        (json!(2), json!("4"), json!("4"))
    );
    // Joining again is a no-op.
    d.ok("join", json!({"room": room})).await;

    // update_group: private now; room_updated with seq 3.
    let r = o
        .ok(
            "update_group",
            json!({"room": room, "public": false, "name": "crew 2"}),
        )
        .await;
    assert_eq!(
        (r["room"]["public"].clone(), r["room"]["name"].clone()),
        (json!(false), json!("crew 2"))
    );
    for x in [&mut b, &mut c, &mut d] {
        let ev = event_in(x, "room_updated", room).await;
        assert_eq!(
            (
                ev["seq"].clone(),
                ev["data"]["room"]["public"].clone(),
                ev["data"]["room"]["name"].clone()
            ),
            (json!(3), json!(false), json!("crew 2"))
        );
    }
    // A private group refuses joins.
    assert_eq!(
        code(&mut e, "join", json!({"room": room})).await,
        "forbidden"
    );

    // set_role: owner makes c an admin; member_updated with seq 4.
    let r = o
        .ok(
            "set_role",
            json!({"room": room, "user": "3", "role": "admin"}),
        )
        .await;
    assert!(users_of(&r["members"]).contains(&("3".into(), "admin".into())));
    let ev = event_in(&mut b, "member_updated", room).await;
    assert_eq!(
        (
            ev["seq"].clone(),
            ev["data"]["member"]["user"].clone(),
            ev["data"]["member"]["role"].clone()
        ),
        (json!(4), json!("3"), json!("admin"))
    );
    // Only the owner changes roles; nobody becomes owner by set_role.
    assert_eq!(
        code(
            &mut c,
            "set_role",
            json!({"room": room, "user": "2", "role": "admin"})
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        code(
            &mut o,
            "set_role",
            json!({"room": room, "user": "2", "role": "owner"})
        )
        .await,
        "invalid_field"
    );

    // remove: the admin removes plain member d; member_left seq 5; room_left to d; d is out.
    let r = c
        .ok("remove_member", json!({"room": room, "user": "4"}))
        .await;
    assert!(!users_of(&r["members"]).iter().any(|(u, _)| u == "4"));
    let ev = event_in(&mut o, "member_left", room).await;
    assert_eq!(
        (
            ev["seq"].clone(),
            ev["data"]["user"].clone(),
            ev["data"]["by"].clone()
        ),
        (json!(5), json!("4"), json!("3"))
    );
    event_in(&mut d2, "room_joined", room).await;
    event_in(&mut d2, "room_left", room).await;
    let left = event_in(&mut d, "room_left", room).await;
    assert_eq!(left["data"]["room"], room);
    assert!(left.get("seq").is_none(), "{left}");
    // An admin cannot remove the owner.
    assert_eq!(
        code(&mut c, "remove_member", json!({"room": room, "user": "1"})).await,
        "forbidden"
    );
    let m = send_text(&mut o, room, "after d left").await;
    assert_eq!(m["seq"], 6);
    assert_eq!(seq_event(&mut b, room, 6).await["event"], "message");
    no_event_named(&mut d, "message", Some(room), QUIET).await;
    no_event_named(&mut d2, "message", Some(room), Duration::from_millis(10)).await;
    assert_eq!(seq_event(&mut c2, room, 6).await["event"], "message");
    assert_eq!(
        code(&mut d, "send", json!({"room": room, "text": "x"})).await,
        "not_member"
    );
    assert_eq!(
        code(&mut d, "history", json!({"room": room})).await,
        "not_member"
    );

    // The owner leaves: ownership goes to the oldest admin (c), though b is an older member.
    o.ok("leave", json!({"room": room})).await;
    let up = seq_event(&mut b, room, 7).await;
    assert_eq!(
        (
            up["seq"].clone(),
            up["data"]["member"]["user"].clone(),
            up["data"]["member"]["role"].clone()
        ),
        (json!(7), json!("3"), json!("owner"))
    );
    let gone = seq_event(&mut b, room, 8).await;
    assert_eq!(
        (
            gone["seq"].clone(),
            gone["data"]["user"].clone(),
            gone["data"]["by"].clone()
        ),
        (json!(8), json!("1"), json!("1"))
    );
    event_in(&mut o, "room_left", room).await;
    assert_eq!(
        code(&mut o, "members", json!({"room": room})).await,
        "not_member"
    );
    let mut roles = users_of(&b.ok("members", json!({"room": room})).await["members"]);
    roles.sort();
    assert_eq!(
        roles,
        vec![("2".into(), "member".into()), ("3".into(), "owner".into())]
    );
    // The replay of the room is exactly that stream.
    let rp = b.ok("replay", json!({"room": room, "after_seq": 0})).await;
    let names: Vec<&str> = rp["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "member_joined",
            "member_joined",
            "room_updated",
            "member_updated",
            "member_left",
            "message",
            "member_updated",
            "member_left"
        ]
    );
    assert_eq!(rp["last_seq"], 8);

    // No admin: the oldest member inherits (9 joined at creation, 6 was added later).
    let _u9 = s.connect("9").await;
    let _u6 = s.connect("6").await;
    let g2 = e
        .ok("create_group", json!({"name": "g2", "members": ["9"]}))
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    tick(&mut e).await;
    e.ok("add_members", json!({"room": g2, "users": ["6"]}))
        .await;
    e.ok("leave", json!({"room": g2})).await;
    let mut roles = users_of(&b_members(&s, "9", g2).await);
    roles.sort();
    assert_eq!(
        roles,
        vec![("6".into(), "member".into()), ("9".into(), "owner".into())]
    );
    // Direct rooms cannot be left.
    let dr = e.ok("open_direct", json!({"user": "9"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        code(&mut e, "leave", json!({"room": dr})).await,
        "invalid_field"
    );
    s.shutdown().await;
}

async fn b_members(s: &TestServer, user: &str, room: u64) -> Value {
    let mut c = s.connect(user).await;
    c.ok("members", json!({"room": room})).await["members"].clone()
}

#[tokio::test]
async fn group_size_and_rooms_per_user_caps_have_their_own_codes() {
    let s = TestServer::start_with(|b| {
        b.group_max_members = Some(3);
        b.max_rooms_per_user = Some(2);
    })
    .await;
    let mut a = s.connect("1").await;
    let mut x = s.connect("2").await;
    let _c = s.connect("3").await;
    let _d = s.connect("4").await;
    let mut e = s.connect("5").await;
    // Group size: creator included.
    assert_eq!(
        code(
            &mut a,
            "create_group",
            json!({"name": "big", "members": ["2", "3", "4"]})
        )
        .await,
        "group_full"
    );
    let g = a
        .ok(
            "create_group",
            json!({"name": "g", "members": ["2", "3"], "public": true}),
        )
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        code(&mut a, "add_members", json!({"room": g, "users": ["4"]})).await,
        "group_full"
    );
    assert_eq!(code(&mut e, "join", json!({"room": g})).await, "group_full");
    // Rooms per user: x is in g; one more room takes x to the cap.
    x.ok("open_direct", json!({"user": "5"})).await;
    assert_eq!(
        code(&mut a, "open_direct", json!({"user": "2"})).await,
        "too_many_rooms"
    );
    assert_eq!(
        code(&mut x, "open_direct", json!({"user": "4"})).await,
        "too_many_rooms"
    );
    assert_eq!(
        code(&mut x, "create_group", json!({"name": "solo"})).await,
        "too_many_rooms"
    );
    assert_eq!(
        code(
            &mut e,
            "create_group",
            json!({"name": "h", "members": ["2"]})
        )
        .await,
        "too_many_rooms"
    );
    let h = e
        .ok("create_group", json!({"name": "h", "public": true}))
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        code(&mut e, "add_members", json!({"room": h, "users": ["2"]})).await,
        "too_many_rooms"
    );
    assert_eq!(
        code(&mut x, "join", json!({"room": h})).await,
        "too_many_rooms"
    );
    // Leaving frees a place.
    x.ok("leave", json!({"room": g})).await;
    x.ok("join", json!({"room": h})).await;
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_types_replies_and_limits() {
    let s = TestServer::start_with(|b| {
        b.max_text_chars = Some(20);
        b.max_caption_chars = Some(10);
    })
    .await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    let other = group(&mut a, "other", &[]).await;
    event_in(&mut b, "room_joined", room).await;
    let t = send_text(&mut a, room, "hello").await;
    assert_eq!(
        (t["type"].clone(), t["text"].clone(), t["seq"].clone()),
        (json!("text"), json!("hello"), json!(1))
    );
    let img = a
        .ok(
            "send",
            json!({"room": room, "type": "image", "media": "/media/p.webp", "caption": "look"}),
        )
        .await["message"]
        .clone();
    assert_eq!(
        (
            img["type"].clone(),
            img["media"].clone(),
            img["caption"].clone()
        ),
        (json!("image"), json!("/media/p.webp"), json!("look"))
    );
    let au = a
        .ok(
            "send",
            json!({"room": room, "type": "audio", "media": "/media/v.ogg", "duration": 7}),
        )
        .await["message"]
        .clone();
    assert_eq!(
        (au["type"].clone(), au["duration"].clone()),
        (json!("audio"), json!(7))
    );
    assert!(au.get("caption").is_none(), "{au}");
    let vi = a.ok("send", json!({"room": room, "type": "video", "media": "/media/v.mp4", "caption": "clip", "duration": 12})).await["message"].clone();
    assert_eq!(
        (
            vi["type"].clone(),
            vi["caption"].clone(),
            vi["duration"].clone()
        ),
        (json!("video"), json!("clip"), json!(12))
    );
    let fi = a
        .ok("send", json!({"room": room, "media": "/media/doc.pdf"}))
        .await["message"]
        .clone();
    assert_eq!(fi["type"], "file", "media without a type is a file");
    // Everyone sees them in order, with the same payloads.
    for (seq, kind) in [
        (1, "text"),
        (2, "image"),
        (3, "audio"),
        (4, "video"),
        (5, "file"),
    ] {
        let e = event_in(&mut b, "message", room).await;
        assert_eq!(
            (e["seq"].clone(), e["data"]["message"]["type"].clone()),
            (json!(seq), json!(kind))
        );
    }
    // Replies must name a message of the same room.
    let r = b
        .ok(
            "send",
            json!({"room": room, "text": "re", "reply_to": id(&img)}),
        )
        .await["message"]
        .clone();
    assert_eq!(r["reply_to"], img["id"]);
    assert_eq!(
        seq_event(&mut a, room, 6).await["data"]["message"]["reply_to"],
        img["id"]
    );
    assert_eq!(
        code(
            &mut b,
            "send",
            json!({"room": room, "text": "re", "reply_to": 12345})
        )
        .await,
        "not_found"
    );
    let elsewhere = send_text(&mut a, other, "elsewhere").await;
    assert_eq!(
        code(
            &mut b,
            "send",
            json!({"room": room, "text": "re", "reply_to": id(&elsewhere)})
        )
        .await,
        "not_found"
    );
    // Limits, each with its code; nothing refused is stored.
    assert_eq!(
        code(
            &mut a,
            "send",
            json!({"room": room, "text": "x".repeat(21)})
        )
        .await,
        "text_too_long"
    );
    a.ok("send", json!({"room": room, "text": "é".repeat(20)}))
        .await; // characters, not bytes
    assert_eq!(
        code(
            &mut a,
            "send",
            json!({"room": room, "type": "image", "media": "/u/x", "caption": "c".repeat(11)})
        )
        .await,
        "caption_too_long"
    );
    assert_eq!(
        code(&mut a, "send", json!({"room": room, "text": " "})).await,
        "invalid_field"
    );
    assert_eq!(
        code(&mut a, "send", json!({"room": room, "type": "image"})).await,
        "invalid_field"
    );
    assert_eq!(
        code(
            &mut a,
            "send",
            json!({"room": room, "type": "text", "text": "x", "caption": "y"})
        )
        .await,
        "invalid_field"
    );
    let h = a.ok("history", json!({"room": room})).await;
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![7, 6, 5, 4, 3, 2, 1]);
    s.shutdown().await;
}

#[tokio::test]
async fn reactions_are_counted_per_emoji_and_duplicates_are_no_ops() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    let m = send_text(&mut a, room, "react to me").await;
    let mid = id(&m);
    let r = b
        .ok(
            "react",
            json!({"room": room, "message": mid, "emoji": "👍"}),
        )
        .await;
    assert_eq!(r["message"]["reactions"], json!({"👍": ["2"]}));
    let e = event_in(&mut a, "reaction", room).await;
    assert_eq!(e["seq"], 2);
    assert_eq!(
        (
            e["data"]["user"].clone(),
            e["data"]["emoji"].clone(),
            e["data"]["added"].clone(),
            e["data"]["message"]["id"].clone()
        ),
        (json!("2"), json!("👍"), json!(true), json!(mid))
    );
    a.ok(
        "react",
        json!({"room": room, "message": mid, "emoji": "👍", "add": true}),
    )
    .await;
    let r = a
        .ok(
            "react",
            json!({"room": room, "message": mid, "emoji": "❤️"}),
        )
        .await;
    assert_eq!(
        r["message"]["reactions"],
        json!({"👍": ["2", "1"], "❤️": ["1"]})
    );
    for seq in [3, 4] {
        assert_eq!(seq_event(&mut b, room, seq).await["event"], "reaction");
    }
    // A duplicate add changes nothing and tells nobody.
    let r = a
        .ok(
            "react",
            json!({"room": room, "message": mid, "emoji": "👍"}),
        )
        .await;
    assert_eq!(r["message"]["reactions"]["👍"], json!(["2", "1"]));
    no_event_named(&mut b, "reaction", Some(room), QUIET).await;
    // Removal.
    let r = a
        .ok(
            "react",
            json!({"room": room, "message": mid, "emoji": "👍", "add": false}),
        )
        .await;
    assert_eq!(r["message"]["reactions"], json!({"👍": ["2"], "❤️": ["1"]}));
    let e = event_in(&mut b, "reaction", room).await;
    assert_eq!(
        (
            e["seq"].clone(),
            e["data"]["added"].clone(),
            e["data"]["user"].clone()
        ),
        (json!(5), json!(false), json!("1"))
    );
    let r = a
        .ok(
            "react",
            json!({"room": room, "message": mid, "emoji": "❤️", "add": false}),
        )
        .await;
    assert_eq!(r["message"]["reactions"], json!({"👍": ["2"]}));
    assert_eq!(event_in(&mut b, "reaction", room).await["seq"], 6);
    // Removing what is not there: no-op, no event.
    a.ok(
        "react",
        json!({"room": room, "message": mid, "emoji": "❤️", "add": false}),
    )
    .await;
    no_event_named(&mut b, "reaction", Some(room), QUIET).await;
    assert_eq!(
        a.ok("replay", json!({"room": room, "after_seq": 0})).await["last_seq"],
        6
    );
    // History shows the counts.
    let h = b.ok("history", json!({"room": room})).await;
    assert_eq!(h["messages"][0]["reactions"], json!({"👍": ["2"]}));
    // Bad emoji and unknown message.
    assert_eq!(
        code(
            &mut a,
            "react",
            json!({"room": room, "message": mid, "emoji": " "})
        )
        .await,
        "invalid_field"
    );
    assert_eq!(
        code(
            &mut a,
            "react",
            json!({"room": room, "message": mid, "emoji": "x".repeat(33)})
        )
        .await,
        "invalid_field"
    );
    assert_eq!(
        code(
            &mut a,
            "react",
            json!({"room": room, "message": 999, "emoji": "x"})
        )
        .await,
        "not_found"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn edits_by_the_author_only_with_edited_at_and_limits() {
    let s = TestServer::start_with(|b| {
        b.max_text_chars = Some(20);
        b.max_caption_chars = Some(10);
    })
    .await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    let m = send_text(&mut a, room, "frist").await;
    let img = a
        .ok(
            "send",
            json!({"room": room, "type": "image", "media": "/u/i.png", "caption": "cap"}),
        )
        .await["message"]
        .clone();
    assert!(m.get("edited_at").is_none());
    let r = a
        .ok(
            "edit",
            json!({"room": room, "message": id(&m), "text": "first"}),
        )
        .await;
    let edited = &r["message"];
    assert_eq!(edited["text"], "first");
    let at = edited["edited_at"].as_u64().unwrap();
    assert!(at >= m["created_at"].as_u64().unwrap());
    let e = event_in(&mut b, "message_edited", room).await;
    assert_eq!(
        (
            e["seq"].clone(),
            e["data"]["message"]["text"].clone(),
            e["data"]["message"]["edited_at"].clone(),
            e["data"]["message"]["seq"].clone()
        ),
        (json!(3), json!("first"), json!(at), json!(1))
    );
    // A media message's caption.
    let r = a
        .ok(
            "edit",
            json!({"room": room, "message": id(&img), "text": "new cap"}),
        )
        .await;
    assert_eq!(
        (
            r["message"]["caption"].clone(),
            r["message"]["media"].clone()
        ),
        (json!("new cap"), json!("/u/i.png"))
    );
    assert_eq!(event_in(&mut b, "message_edited", room).await["seq"], 4);
    // Only the author; limits; unknown message.
    assert_eq!(
        code(
            &mut b,
            "edit",
            json!({"room": room, "message": id(&m), "text": "mine now"})
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        code(
            &mut a,
            "edit",
            json!({"room": room, "message": id(&m), "text": "x".repeat(21)})
        )
        .await,
        "text_too_long"
    );
    assert_eq!(
        code(
            &mut a,
            "edit",
            json!({"room": room, "message": id(&img), "text": "c".repeat(11)})
        )
        .await,
        "caption_too_long"
    );
    assert_eq!(
        code(
            &mut a,
            "edit",
            json!({"room": room, "message": id(&m), "text": "  "})
        )
        .await,
        "invalid_field"
    );
    assert_eq!(
        code(
            &mut a,
            "edit",
            json!({"room": room, "message": 4242, "text": "x"})
        )
        .await,
        "not_found"
    );
    no_event_named(&mut b, "message_edited", Some(room), QUIET).await;
    // History has the edited text, in the original place.
    let h = b.ok("history", json!({"room": room})).await;
    assert_eq!(
        (
            h["messages"][1]["text"].clone(),
            h["messages"][1]["seq"].clone(),
            h["messages"][1]["edited_at"].clone()
        ),
        (json!("first"), json!(1), json!(at))
    );
    s.shutdown().await;
}

#[tokio::test]
async fn deletes_leave_tombstones_with_one_event_per_message() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await; // owner
    let mut b = s.connect("2").await;
    let mut c = s.connect("3").await;
    let room = group(&mut a, "g", &["2", "3"]).await;
    let m1 = send_text(&mut b, room, "one").await;
    let m2 = send_text(&mut b, room, "two").await;
    let m3 = send_text(&mut b, room, "three").await;
    let m4 = send_text(&mut a, room, "four").await;
    let m5 = send_text(&mut c, room, "five").await;
    for _ in 0..5 {
        event_in(&mut c, "message", room).await;
    }
    // The author deletes one.
    let r = b
        .ok("delete", json!({"room": room, "messages": [id(&m1)]}))
        .await;
    assert_eq!(r["messages"][0]["type"], "deleted");
    assert!(r["messages"][0]["deleted_at"].is_u64(), "{r}");
    let e = event_in(&mut c, "message_deleted", room).await;
    assert_eq!(
        (
            e["seq"].clone(),
            e["data"]["message_id"].clone(),
            e["data"]["by"].clone()
        ),
        (json!(6), json!(id(&m1)), json!("2"))
    );
    // A plain member cannot delete someone else's; nothing of the batch is deleted.
    assert_eq!(
        code(
            &mut c,
            "delete",
            json!({"room": room, "messages": [id(&m5), id(&m4)]})
        )
        .await,
        "forbidden"
    );
    // The owner deletes several at once (one already gone, one repeated): one event per
    // message actually deleted, in order.
    let r = a
        .ok(
            "delete",
            json!({"room": room, "messages": [id(&m2), id(&m3), id(&m1), id(&m2)]}),
        )
        .await;
    assert_eq!(r["messages"].as_array().unwrap().len(), 3);
    for (seq, m) in [(7, &m2), (8, &m3)] {
        let e = event_in(&mut c, "message_deleted", room).await;
        assert_eq!(
            (
                e["seq"].clone(),
                e["data"]["message_id"].clone(),
                e["data"]["by"].clone()
            ),
            (json!(seq), m["id"].clone(), json!("1"))
        );
    }
    // Deleting again is harmless: no event, no new seq.
    b.ok("delete", json!({"room": room, "messages": [id(&m3)]}))
        .await;
    no_event_named(&mut c, "message_deleted", Some(room), QUIET).await;
    // Tombstones keep their place.
    let h = c.ok("history", json!({"room": room})).await;
    let rows: Vec<(u64, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (5, "text".into()),
            (4, "text".into()),
            (3, "deleted".into()),
            (2, "deleted".into()),
            (1, "deleted".into())
        ]
    );
    assert!(h["messages"][2].get("text").is_none(), "{h}");
    // A tombstone can be neither edited nor reacted to; its author cannot resurrect it.
    assert_eq!(
        code(
            &mut b,
            "edit",
            json!({"room": room, "message": id(&m2), "text": "x"})
        )
        .await,
        "conflict"
    );
    assert_eq!(
        code(
            &mut b,
            "react",
            json!({"room": room, "message": id(&m2), "emoji": "x"})
        )
        .await,
        "conflict"
    );
    // Bounds of a delete.
    assert_eq!(
        code(&mut a, "delete", json!({"room": room, "messages": []})).await,
        "invalid_field"
    );
    let many: Vec<u64> = (0..101).collect();
    assert_eq!(
        code(&mut a, "delete", json!({"room": room, "messages": many})).await,
        "invalid_field"
    );
    assert_eq!(
        code(&mut a, "delete", json!({"room": room, "messages": [777]})).await,
        "not_found"
    );
    // An admin (not only the owner) may delete others' messages.
    a.ok(
        "set_role",
        json!({"room": room, "user": "3", "role": "admin"}),
    )
    .await;
    c.ok("delete", json!({"room": room, "messages": [id(&m4)]}))
        .await;
    // In a direct room nobody deletes the other's messages.
    let d = a.ok("open_direct", json!({"user": "2"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let dm = send_text(&mut b, d, "dm").await;
    assert_eq!(
        code(&mut a, "delete", json!({"room": d, "messages": [id(&dm)]})).await,
        "forbidden"
    );
    b.ok("delete", json!({"room": d, "messages": [id(&dm)]}))
        .await;
    s.shutdown().await;
}

#[tokio::test]
async fn message_and_typing_rates_are_limited_separately() {
    let s = TestServer::start_with(|b| {
        b.messages_per_second = Some(1); // burst 2
        b.typing_per_second = Some(1); // burst 5
    })
    .await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    let m = send_text(&mut a, room, "1").await;
    send_text(&mut a, room, "2").await;
    let mut refused = None;
    for i in 0..10 {
        let r = a
            .request("send", json!({"room": room, "text": format!("x{i}")}))
            .await;
        if r["ok"] == false {
            refused = Some(r["error"]["code"].as_str().unwrap().to_owned());
            break;
        }
    }
    assert_eq!(refused.as_deref(), Some("rate_limited"));
    // Edits and reactions draw on the same bucket; typing does not.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let r = a
            .request(
                "react",
                json!({"room": room, "message": id(&m), "emoji": "x"}),
            )
            .await;
        if r["ok"] == false {
            codes.push(r["error"]["code"].as_str().unwrap().to_owned());
        }
    }
    assert!(codes.contains(&"rate_limited".to_owned()), "{codes:?}");
    for _ in 0..5 {
        a.ok("typing", json!({"room": room, "typing": true})).await;
    }
    let mut refused = None;
    for _ in 0..20 {
        let r = a
            .request("typing", json!({"room": room, "typing": true}))
            .await;
        if r["ok"] == false {
            refused = Some(r["error"]["code"].as_str().unwrap().to_owned());
            break;
        }
    }
    assert_eq!(refused.as_deref(), Some("typing_rate_limited"));
    // Buckets are per user.
    send_text(&mut b, room, "b is fine").await;
    b.ok("typing", json!({"room": room, "typing": true})).await;
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Read markers
// ---------------------------------------------------------------------------------------------

fn chat(chats: &Value, room: u64) -> &Value {
    chats["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == room)
        .unwrap_or_else(|| panic!("room {room} not in {chats}"))
}

#[tokio::test]
async fn read_markers_unread_counts_and_multi_device() {
    let s = TestServer::start().await;
    let mut a1 = s.connect("1").await;
    let mut a2 = s.connect("1").await; // second device
    let mut b = s.connect("2").await;
    let room = group(&mut a1, "g", &["2"]).await;
    let mine = send_text(&mut a1, room, "mine").await;
    let m1 = send_text(&mut b, room, "m1").await;
    let m2 = send_text(&mut b, room, "m2").await;
    let m3 = send_text(&mut b, room, "m3").await;
    // Both devices receive every message.
    for c in [&mut a1, &mut a2] {
        for seq in 1..=4 {
            assert_eq!(event_in(c, "message", room).await["seq"], seq);
        }
    }
    for c in [&mut a1, &mut a2] {
        let ch = c.ok("chats", json!({})).await;
        let e = chat(&ch, room);
        assert_eq!(e["unread"], 3, "own messages are not unread: {e}");
        assert!(e.get("read_up_to").is_none(), "{e}");
    }
    // Device 1 reads up to m2: the other member and the other device hear it.
    a1.ok("read", json!({"room": room, "message": id(&m2)}))
        .await;
    for c in [&mut b, &mut a2] {
        let e = event_in(c, "read", room).await;
        assert_eq!(
            e["data"],
            json!({"room": room, "user": "1", "message_id": id(&m2)})
        );
        assert!(
            e.get("seq").is_none(),
            "read markers are not in the ordered stream: {e}"
        );
    }
    let ch = a2.ok("chats", json!({})).await;
    let e = chat(&ch, room);
    assert_eq!(
        (e["unread"].clone(), e["read_up_to"].clone()),
        (json!(1), json!(id(&m2)))
    );
    // A read marker never moves back.
    a2.ok("read", json!({"room": room, "message": id(&m1)}))
        .await;
    let ch = a1.ok("chats", json!({})).await;
    assert_eq!(chat(&ch, room)["unread"], 1);
    // Device 2 reads everything (no message: the newest): device 1's list is clear too.
    a2.ok("read", json!({"room": room})).await;
    let e = loop {
        let e = event_in(&mut a1, "read", room).await;
        if e["data"]["message_id"] == id(&m3) {
            break e;
        }
    };
    assert_eq!(e["data"]["user"], "1");
    let ch = a1.ok("chats", json!({})).await;
    assert_eq!(
        (
            chat(&ch, room)["unread"].clone(),
            chat(&ch, room)["read_up_to"].clone()
        ),
        (json!(0), json!(id(&m3)))
    );
    // b never read: 1 unread (a's message); deleted messages do not count.
    let ch = b.ok("chats", json!({})).await;
    assert_eq!(chat(&ch, room)["unread"], 1);
    a1.ok("delete", json!({"room": room, "messages": [id(&mine)]}))
        .await;
    let ch = b.ok("chats", json!({})).await;
    assert_eq!(chat(&ch, room)["unread"], 0);
    // A message of another room, and a non-member.
    let other = group(&mut b, "other", &[]).await;
    let o = send_text(&mut b, other, "o").await;
    assert_eq!(
        code(&mut a1, "read", json!({"room": room, "message": id(&o)})).await,
        "not_found"
    );
    let mut c = s.connect("3").await;
    assert_eq!(
        code(&mut c, "read", json!({"room": room})).await,
        "not_member"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Typing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn typing_reaches_members_only_expires_and_is_never_stored() {
    let ttl = Duration::from_millis(400);
    let s = TestServer::start_with(|b| {
        b.typing_ttl_ms = Some(400);
        b.typing_per_second = Some(50);
    })
    .await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let mut outsider = s.connect("3").await;
    let room = group(&mut a, "g", &["2"]).await;
    event_in(&mut b, "room_joined", room).await;
    let started = Instant::now();
    assert_eq!(
        a.ok("typing", json!({"room": room, "typing": true})).await,
        json!({})
    );
    let e = event_in(&mut b, "typing", room).await;
    assert_eq!(
        e["data"],
        json!({"room": room, "user": "1", "name": "User 1", "typing": true})
    );
    assert!(e.get("seq").is_none(), "{e}");
    // Not refreshed: it ends by itself after the TTL.
    let e = event_in(&mut b, "typing", room).await;
    assert_eq!(
        (e["data"]["user"].clone(), e["data"]["typing"].clone()),
        (json!("1"), json!(false))
    );
    assert!(
        started.elapsed() >= ttl - Duration::from_millis(50),
        "expired after {:?}",
        started.elapsed()
    );
    // A refresh of an ongoing state is not broadcast again, and pushes the expiry back.
    a.ok("typing", json!({"room": room, "typing": true})).await;
    assert_eq!(
        event_in(&mut b, "typing", room).await["data"]["typing"],
        true
    );
    no_event_named(&mut b, "typing", Some(room), Duration::from_millis(200)).await;
    let refreshed = Instant::now();
    a.ok("typing", json!({"room": room, "typing": true})).await;
    let e = event_in(&mut b, "typing", room).await;
    assert_eq!(e["data"]["typing"], false);
    assert!(
        refreshed.elapsed() >= ttl - Duration::from_millis(50),
        "the refresh was ignored: {:?}",
        refreshed.elapsed()
    );
    // Stopping explicitly is broadcast at once.
    a.ok("typing", json!({"room": room, "typing": true})).await;
    assert_eq!(
        event_in(&mut b, "typing", room).await["data"]["typing"],
        true
    );
    a.ok("typing", json!({"room": room, "typing": false})).await;
    let stop = event_in(&mut b, "typing", room).await;
    assert_eq!(stop["data"]["typing"], false);
    // ...and then nothing expires later.
    no_event_named(
        &mut b,
        "typing",
        Some(room),
        ttl + Duration::from_millis(200),
    )
    .await;
    // Never stored: no history, no replay, no sequence number used.
    let h = b.ok("history", json!({"room": room})).await;
    assert_eq!(h["messages"], json!([]));
    let r = b.ok("replay", json!({"room": room, "after_seq": 0})).await;
    assert_eq!(
        (r["events"].clone(), r["last_seq"].clone()),
        (json!([]), json!(0))
    );
    assert_eq!(send_text(&mut a, room, "now").await["seq"], 1);
    // A non-member can neither type nor see typing.
    assert_eq!(
        code(
            &mut outsider,
            "typing",
            json!({"room": room, "typing": true})
        )
        .await,
        "not_member"
    );
    no_event_named(&mut outsider, "typing", None, Duration::from_millis(50)).await;
    assert!(
        !outsider.events.iter().any(|e| e["room"] == room),
        "{:?}",
        outsider.events
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn presence_reaches_friends_direct_peers_and_small_groups_only() {
    let s = TestServer::start_with(|b| b.presence_group_max = Some(2)).await;
    let mut a = s.connect("1").await;
    let mut friend = s.connect("2").await;
    let mut peer = s.connect("3").await;
    let mut small = s.connect("4").await;
    let mut big = s.connect("5").await;
    let _big2 = s.connect("6").await;
    let mut blocker = s.connect("7").await;
    let mut stranger = s.connect("8").await;
    a.ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    friend
        .ok("friend", json!({"user": "1", "action": "accept"}))
        .await;
    a.ok("open_direct", json!({"user": "3"})).await;
    group(&mut a, "small", &["4"]).await;
    group(&mut a, "big", &["5", "6"]).await;
    a.ok("open_direct", json!({"user": "7"})).await;
    blocker
        .ok("friend", json!({"user": "1", "action": "block"}))
        .await;

    // The first session connected before all that; a second one does not make a "came
    // online" event, closing one of two makes no "went offline" event.
    let a2 = s.connect("1").await;
    drop(a);
    no_event_named(&mut friend, "presence", None, QUIET).await;
    let u = friend.ok("user", json!({"user": "1"})).await;
    assert_eq!(u["online"], true, "still online on the second device: {u}");
    // The last session closes: offline with last_seen, to friend, peer and the small group.
    let before = now_ms();
    drop(a2);
    for c in [&mut friend, &mut peer, &mut small] {
        let e = presence_of(c, "1").await;
        assert_eq!(
            (e["data"]["online"].clone(), e.get("room")),
            (json!(false), None),
            "{e}"
        );
        let seen = e["data"]["last_seen"].as_u64().unwrap();
        assert!(seen >= before && seen <= now_ms(), "{seen}");
    }
    let u = friend.ok("user", json!({"user": "1"})).await;
    assert_eq!(u["online"], false);
    assert!(u["user"]["last_seen"].is_u64(), "{u}");
    // Back online.
    let mut a = s.connect("1").await;
    for c in [&mut friend, &mut peer, &mut small] {
        let e = presence_of(c, "1").await;
        assert_eq!(
            (e["data"]["online"].clone(), e["data"]["last_seen"].clone()),
            (json!(true), Value::Null)
        );
    }
    // Not to co-members of a group above the size, not across a block, not to strangers.
    for c in [&mut big, &mut blocker, &mut stranger] {
        no_event_named(c, "presence", None, Duration::from_millis(100)).await;
        assert!(
            !c.events
                .iter()
                .any(|e| e["event"] == "presence" && e["data"]["user"] == "1")
        );
    }
    // The blocked side learns nothing about the blocker either.
    drop(blocker);
    no_event_named(&mut a, "presence", None, QUIET).await;
    s.shutdown().await;
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Friendships, blocks and users
// ---------------------------------------------------------------------------------------------

async fn friendship_event(c: &mut Client) -> Value {
    c.event_named("friendship").await["data"].clone()
}

#[tokio::test]
async fn friendship_lifecycle_with_events_to_both() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    // Request: pending, to both.
    let r = a
        .ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    assert_eq!(
        (
            r["friendship"]["status"].clone(),
            r["friendship"]["requester"].clone(),
            r["friendship"]["addressee"].clone(),
            r["blocked"].clone()
        ),
        (json!("pending"), json!("1"), json!("2"), json!(false))
    );
    for c in [&mut a, &mut b] {
        let e = friendship_event(c).await;
        assert_eq!(
            (e["friendship"]["status"].clone(), e["users"].clone()),
            (json!("pending"), json!(["1", "2"]))
        );
    }
    // Listed under `all` only.
    assert_eq!(b.ok("friendships", json!({})).await["friends"], json!([]));
    let all = b.ok("friendships", json!({"all": true})).await;
    assert_eq!(
        (
            all["friends"][0]["user"]["id"].clone(),
            all["friends"][0]["status"].clone()
        ),
        (json!("1"), json!("pending"))
    );
    // Wrong-way answers.
    assert_eq!(
        code(&mut a, "friend", json!({"user": "2", "action": "accept"})).await,
        "conflict"
    );
    assert_eq!(
        code(&mut b, "friend", json!({"user": "1", "action": "cancel"})).await,
        "conflict"
    );
    assert_eq!(
        code(&mut a, "friend", json!({"user": "1", "action": "request"})).await,
        "invalid_field"
    );
    assert_eq!(
        code(
            &mut a,
            "friend",
            json!({"user": "404", "action": "request"})
        )
        .await,
        "not_found"
    );
    // Accept.
    let r = b
        .ok("friend", json!({"user": "1", "action": "accept"}))
        .await;
    assert_eq!(r["friendship"]["status"], "accepted");
    for c in [&mut a, &mut b] {
        assert_eq!(
            friendship_event(c).await["friendship"]["status"],
            "accepted"
        );
    }
    // The list: online state and the direct room once there is one.
    let f = a.ok("friendships", json!({})).await;
    let me = &f["friends"][0];
    assert_eq!(
        (
            me["user"]["id"].clone(),
            me["user"]["name"].clone(),
            me["online"].clone(),
            me["status"].clone()
        ),
        (json!("2"), json!("User 2"), json!(true), json!("accepted"))
    );
    assert!(me.get("room").is_none(), "{me}");
    let d = a.ok("open_direct", json!({"user": "2"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let f = a.ok("friendships", json!({})).await;
    assert_eq!(f["friends"][0]["room"], d);
    // Cancel ends it, for both.
    let r = a
        .ok("friend", json!({"user": "2", "action": "cancel"}))
        .await;
    assert_eq!(r["friendship"], Value::Null);
    for c in [&mut a, &mut b] {
        assert_eq!(friendship_event(c).await["friendship"], Value::Null);
    }
    assert_eq!(
        code(&mut a, "friend", json!({"user": "2", "action": "cancel"})).await,
        "not_found"
    );
    assert_eq!(
        code(&mut b, "friend", json!({"user": "1", "action": "accept"})).await,
        "not_found"
    );
    // Request, reject; the requester may ask again.
    a.ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    let r = b
        .ok("friend", json!({"user": "1", "action": "reject"}))
        .await;
    assert_eq!(r["friendship"]["status"], "rejected");
    let all = a.ok("friendships", json!({"all": true})).await;
    assert_eq!(all["friends"][0]["status"], "rejected");
    let r = a
        .ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    assert_eq!(r["friendship"]["status"], "pending");
    // Asking back accepts a pending request.
    let r = b
        .ok("friend", json!({"user": "1", "action": "request"}))
        .await;
    assert_eq!(r["friendship"]["status"], "accepted");
    // Repeating a request changes nothing and sends no event.
    while friendship_event(&mut b).await["friendship"]["status"] != "accepted" {}
    let r = a
        .ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    assert_eq!(r["friendship"]["status"], "accepted");
    no_event_named(&mut b, "friendship", None, QUIET).await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_block_stops_direct_messages_both_ways_and_hides_online_state() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    a.ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    b.ok("friend", json!({"user": "1", "action": "accept"}))
        .await;
    let d = a.ok("open_direct", json!({"user": "2"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let g = group(&mut a, "g", &["2"]).await;
    send_text(&mut b, d, "before").await;
    // a blocks b.
    let r = a
        .ok("friend", json!({"user": "2", "action": "block"}))
        .await;
    assert_eq!(
        (r["blocked"].clone(), r["friendship"]["status"].clone()),
        (json!(true), json!("blocked"))
    );
    for c in [&mut a, &mut b] {
        loop {
            let e = friendship_event(c).await;
            if e["friendship"]["status"] == "blocked" {
                break;
            }
        }
    }
    // No direct messages, either way; no typing either; the group still works.
    assert_eq!(
        code(&mut b, "send", json!({"room": d, "text": "hi"})).await,
        "blocked"
    );
    assert_eq!(
        code(&mut a, "send", json!({"room": d, "text": "hi"})).await,
        "blocked"
    );
    assert_eq!(
        code(&mut b, "typing", json!({"room": d, "typing": true})).await,
        "blocked"
    );
    assert_eq!(
        code(&mut a, "typing", json!({"room": d, "typing": true})).await,
        "blocked"
    );
    assert_eq!(
        code(&mut b, "friend", json!({"user": "1", "action": "request"})).await,
        "blocked"
    );
    send_text(&mut b, g, "group is fine").await;
    // The blocked one sees the blocker's status as blocked and the blocker offline.
    let r = b
        .ok("friend", json!({"user": "1", "action": "unblock"}))
        .await;
    assert_eq!(r["blocked"], false, "b blocks nobody: {r}");
    let u = b.ok("user", json!({"user": "1"})).await;
    assert_eq!(u["online"], false);
    let u = a.ok("user", json!({"user": "2"})).await;
    assert_eq!(u["online"], false);
    let ch = b.ok("chats", json!({"direct_only": true})).await;
    let e = chat(&ch, d);
    assert_eq!(
        (
            e["peer_online"].clone(),
            e["friendship"].clone(),
            e["peer"]["id"].clone()
        ),
        (json!(false), json!("blocked"), json!("1"))
    );
    // Member lists hide it too, in the direct room and in a shared group, both ways.
    for (c, other) in [(&mut b, "1"), (&mut a, "2")] {
        for r in [d, g] {
            let m = c.ok("members", json!({"room": r})).await;
            assert!(!online_of(&m["members"], other), "{m}");
        }
    }
    let f = b.ok("friendships", json!({"all": true})).await;
    assert_eq!(
        (
            f["friends"][0]["status"].clone(),
            f["friends"][0]["online"].clone()
        ),
        (json!("blocked"), json!(false))
    );
    assert_eq!(b.ok("friendships", json!({})).await["friends"], json!([]));
    // Unblock restores everything (the friendship survived the block).
    let r = a
        .ok("friend", json!({"user": "2", "action": "unblock"}))
        .await;
    assert_eq!(
        (r["blocked"].clone(), r["friendship"]["status"].clone()),
        (json!(false), json!("accepted"))
    );
    for c in [&mut a, &mut b] {
        loop {
            let e = friendship_event(c).await;
            if e["friendship"]["status"] == "accepted" {
                break;
            }
        }
    }
    send_text(&mut b, d, "after").await;
    let m = b.ok("members", json!({"room": g})).await;
    assert!(online_of(&m["members"], "1"), "{m}");
    send_text(&mut a, d, "after too").await;
    b.ok("typing", json!({"room": d, "typing": true})).await;
    assert_eq!(b.ok("user", json!({"user": "1"})).await["online"], true);
    let ch = b.ok("chats", json!({"direct_only": true})).await;
    assert_eq!(
        (
            chat(&ch, d)["peer_online"].clone(),
            chat(&ch, d)["friendship"].clone()
        ),
        (json!(true), json!("accepted"))
    );
    // A block without a friendship shows as the blocker's entry; block then unblock is idempotent.
    let _c = s.connect("3").await;
    let r = a
        .ok("friend", json!({"user": "3", "action": "block"}))
        .await;
    assert_eq!(
        (r["blocked"].clone(), r["friendship"].clone()),
        (json!(true), Value::Null)
    );
    a.ok("friend", json!({"user": "3", "action": "block"}))
        .await;
    let f = a.ok("friendships", json!({"all": true})).await;
    assert!(
        f["friends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["user"]["id"] == "3" && x["status"] == "blocked"),
        "{f}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn users_by_id_and_username_and_the_admin_import() {
    let s = TestServer::start_with(|b| b.admin_token = Some("admin-token-0123456789".into())).await;
    let mut a = s.connect("1").await;
    let _b = s.connect("2").await;
    let u = a.ok("user", json!({"user": "2"})).await;
    assert_eq!(
        (
            u["user"]["id"].clone(),
            u["user"]["username"].clone(),
            u["user"]["name"].clone(),
            u["online"].clone()
        ),
        (json!("2"), json!("user2"), json!("User 2"), json!(true))
    );
    let u = a.ok("user", json!({"username": "user2"})).await;
    assert_eq!(u["user"]["id"], "2");
    assert_eq!(
        code(&mut a, "user", json!({"username": "nobody"})).await,
        "not_found"
    );
    assert_eq!(
        code(&mut a, "user", json!({"user": "404"})).await,
        "not_found"
    );
    assert_eq!(
        code(&mut a, "user", json!({"user": "2", "username": "user2"})).await,
        "invalid_field"
    );
    assert_eq!(code(&mut a, "user", json!({})).await, "invalid_field");
    // Import: refused without the admin token, then accepted.
    let body = r#"[{"id":"50","username":"zed","name":"Zed Z","avatar":"/a/z.png"},{"id":"2","name":"Bee"}]"#;
    let (st, e) = http(
        &s,
        "PUT",
        "/v1/admin/users",
        Some(&s.token("1")),
        Some(body),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let (st, e) = http(&s, "PUT", "/v1/admin/users", None, Some(body)).await;
    assert_eq!(st, 401, "{e}");
    let (st, e) = http(
        &s,
        "PUT",
        "/v1/admin/users",
        Some("admin-token-0123456789"),
        Some(r#"{"id":"x"}"#),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{e}"
    );
    let (st, r) = http(
        &s,
        "PUT",
        "/v1/admin/users",
        Some("admin-token-0123456789"),
        Some(body),
    )
    .await;
    assert_eq!((st, r.clone()), (200, json!({"imported": 2})), "{r}");
    assert_eq!(
        a.ok("user", json!({"user": "2"})).await["user"]["name"],
        "Bee"
    );
    // A never-connected imported user: found by username, usable as a peer.
    let u = a.ok("user", json!({"username": "zed"})).await;
    assert_eq!(
        (
            u["user"]["id"].clone(),
            u["user"]["name"].clone(),
            u["user"]["avatar"].clone(),
            u["online"].clone()
        ),
        (json!("50"), json!("Zed Z"), json!("/a/z.png"), json!(false))
    );
    let d = a.ok("open_direct", json!({"user": "50"})).await;
    assert_eq!(d["created"], true);
    // Claims absent from the token keep the imported values; present claims win.
    let _z = connect_bare(&s, "50").await;
    let u = a.ok("user", json!({"user": "50"})).await;
    assert_eq!(
        (
            u["user"]["username"].clone(),
            u["user"]["name"].clone(),
            u["user"]["avatar"].clone(),
            u["online"].clone()
        ),
        (json!("zed"), json!("Zed Z"), json!("/a/z.png"), json!(true))
    );
    let _b2 = s.connect("2").await; // its token says name "User 2"
    let u = a.ok("user", json!({"user": "2"})).await;
    assert_eq!(u["user"]["name"], "User 2");
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn chat_list_by_activity_with_peers_pagination_and_direct_history() {
    let s = TestServer::start().await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let mut c = s.connect("3").await;
    let _d = s.connect("4").await;
    a.ok("friend", json!({"user": "2", "action": "request"}))
        .await;
    b.ok("friend", json!({"user": "1", "action": "accept"}))
        .await;
    let r1 = a.ok("open_direct", json!({"user": "2"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let r2 = a.ok("open_direct", json!({"user": "3"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let r3 = group(&mut a, "g", &["2"]).await;
    tick(&mut a).await;
    let m_b1 = send_text(&mut b, r1, "from b").await;
    tick(&mut a).await;
    send_text(&mut a, r3, "in group").await;
    tick(&mut a).await;
    send_text(&mut c, r2, "from c 1").await;
    let last = send_text(&mut c, r2, "from c 2").await;
    let ch = a.ok("chats", json!({})).await;
    let order: Vec<u64> = ch["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(order, vec![r2, r3, r1], "{ch}");
    assert_eq!(ch["has_more"], false);
    let e = chat(&ch, r2);
    assert_eq!(
        (
            e["kind"].clone(),
            e["peer"]["id"].clone(),
            e["peer"]["name"].clone(),
            e["peer"]["username"].clone(),
            e["peer_online"].clone(),
            e["unread"].clone(),
            e["member_count"].clone(),
            e["role"].clone()
        ),
        (
            json!("direct"),
            json!("3"),
            json!("User 3"),
            json!("user3"),
            json!(true),
            json!(2),
            json!(2),
            json!("member")
        )
    );
    assert!(e.get("friendship").is_none(), "no friendship with 3: {e}");
    assert_eq!(
        (
            e["last_message"]["id"].clone(),
            e["last_message"]["text"].clone()
        ),
        (last["id"].clone(), json!("from c 2"))
    );
    let e = chat(&ch, r1);
    assert_eq!(
        (
            e["friendship"].clone(),
            e["unread"].clone(),
            e["last_message"]["text"].clone()
        ),
        (json!("accepted"), json!(1), json!("from b"))
    );
    let e = chat(&ch, r3);
    assert_eq!(
        (
            e["kind"].clone(),
            e["name"].clone(),
            e["role"].clone(),
            e["unread"].clone(),
            e["member_count"].clone()
        ),
        (
            json!("group"),
            json!("g"),
            json!("owner"),
            json!(0),
            json!(2)
        )
    );
    assert!(
        e.get("peer").is_none() && e.get("peer_online").is_none(),
        "{e}"
    );
    // Pagination.
    let p = a.ok("chats", json!({"limit": 2})).await;
    let ids: Vec<u64> = p["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!((ids, p["has_more"].clone()), (vec![r2, r3], json!(true)));
    let p = a.ok("chats", json!({"skip": 2, "limit": 2})).await;
    let ids: Vec<u64> = p["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!((ids, p["has_more"].clone()), (vec![r1], json!(false)));
    let p = a.ok("chats", json!({"skip": 5})).await;
    assert_eq!(
        (p["chats"].clone(), p["has_more"].clone()),
        (json!([]), json!(false))
    );
    assert_eq!(
        code(&mut a, "chats", json!({"limit": 0})).await,
        "invalid_field"
    );
    // Direct only.
    let p = a.ok("chats", json!({"direct_only": true})).await;
    let ids: Vec<u64> = p["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![r2, r1]);
    // The peer's online state follows its sessions.
    disconnect(c, &mut a, "3").await;
    let ch = a
        .ok("chats", json!({"direct_only": true, "limit": 1}))
        .await;
    assert_eq!(
        (chat(&ch, r2)["peer_online"].clone(), ch["has_more"].clone()),
        (json!(false), json!(true))
    );
    // History by peer, newest first, with paging.
    let h = a.ok("direct_history", json!({"user": "3"})).await;
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["from c 2", "from c 1"]);
    let h = a
        .ok("direct_history", json!({"user": "3", "limit": 1}))
        .await;
    assert_eq!(
        (
            h["messages"].as_array().unwrap().len(),
            h["has_more"].clone()
        ),
        (1, json!(true))
    );
    let h = a
        .ok("direct_history", json!({"user": "3", "before": id(&last)}))
        .await;
    assert_eq!(h["messages"][0]["text"], "from c 1");
    let h = b.ok("direct_history", json!({"user": "1"})).await;
    assert_eq!(h["messages"][0]["id"], m_b1["id"]);
    // No direct room with that user yet: an empty page.
    let h = a.ok("direct_history", json!({"user": "4"})).await;
    assert_eq!(
        (h["messages"].clone(), h["has_more"].clone()),
        (json!([]), json!(false))
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Viewing and pending notifications
// ---------------------------------------------------------------------------------------------

async fn notifications(c: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = c.event_named("notification").await;
        assert_eq!(e["data"]["pending"], true, "{e}");
        out.push(e["data"]["notification"].clone());
    }
    out
}

#[tokio::test]
async fn pending_notifications_for_offline_members_delivered_once_and_bounded() {
    let s = TestServer::start_with(|b| b.pending_per_user = Some(3)).await;
    let mut a = s.connect("1").await;
    let b = s.connect("2").await;
    let room = group(&mut a, "g", &["2"]).await;
    disconnect(b, &mut a, "2").await;
    let m1 = send_text(&mut a, room, "first").await;
    let m2 = a
        .ok(
            "send",
            json!({"room": room, "type": "image", "media": "/u/x.png"}),
        )
        .await["message"]
        .clone();
    // On the next connect: both, in order, as pending notifications.
    let mut b = s.connect("2").await;
    let got = notifications(&mut b, 2).await;
    assert_eq!(
        got[0],
        json!({"room": room, "message_id": id(&m1), "seq": m1["seq"], "sender": "1", "preview": "first", "created_at": m1["created_at"]})
    );
    assert_eq!(
        (got[1]["message_id"].clone(), got[1]["preview"].clone()),
        (m2["id"].clone(), json!("[image]"))
    );
    // Taken: a second connect gets none (and the first gets no more).
    let mut b2 = s.connect("2").await;
    no_event_named(&mut b2, "notification", None, QUIET).await;
    no_event_named(&mut b, "notification", None, Duration::from_millis(10)).await;
    drop(b2);

    // While b is online, viewing the room or not, nothing is recorded: b saw it arrive.
    assert_eq!(
        b.ok("view", json!({"room": room, "viewing": true})).await,
        json!({})
    );
    send_text(&mut a, room, "seen live").await;
    event_in(&mut b, "message", room).await;
    b.ok("view", json!({"room": room, "viewing": false})).await;
    send_text(&mut a, room, "online, not viewing").await;
    event_in(&mut b, "message", room).await;
    let mut b3 = s.connect("2").await;
    no_event_named(&mut b3, "notification", None, QUIET).await;
    drop(b3);
    // Offline, having viewed it: recorded (viewing ended with the session).
    b.ok("view", json!({"room": room, "viewing": true})).await;
    disconnect(b, &mut a, "2").await;
    let m4 = send_text(&mut a, room, "while away").await;
    let mut b4 = s.connect("2").await;
    let got = notifications(&mut b4, 1).await;
    assert_eq!(got[0]["message_id"], m4["id"]);
    no_event_named(&mut b4, "notification", None, Duration::from_millis(100)).await;
    disconnect(b4, &mut a, "2").await;
    // Bounded per user: the oldest go.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(id(&send_text(&mut a, room, &format!("n{i}")).await));
    }
    let mut b = s.connect("2").await;
    let got = notifications(&mut b, 3).await;
    let got: Vec<u64> = got
        .iter()
        .map(|n| n["message_id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids[2..].to_vec());
    no_event_named(&mut b, "notification", None, QUIET).await;
    // Delivered as the messages are then: an edit made meanwhile shows, a message deleted
    // meanwhile is not delivered.
    disconnect(b, &mut a, "2").await;
    let kept = send_text(&mut a, room, "typo").await;
    let gone = send_text(&mut a, room, "oops").await;
    a.ok(
        "edit",
        json!({"room": room, "message": id(&kept), "text": "fixed"}),
    )
    .await;
    a.ok("delete", json!({"room": room, "messages": [id(&gone)]}))
        .await;
    let mut b = s.connect("2").await;
    let got = notifications(&mut b, 1).await;
    assert_eq!(
        (got[0]["message_id"].clone(), got[0]["preview"].clone()),
        (kept["id"].clone(), json!("fixed"))
    );
    no_event_named(&mut b, "notification", None, QUIET).await;
    // The sender never notifies itself; a non-member cannot view.
    let mut a2 = s.connect("1").await;
    no_event_named(&mut a2, "notification", None, Duration::from_millis(100)).await;
    let mut c = s.connect("3").await;
    assert_eq!(
        code(&mut c, "view", json!({"room": room, "viewing": true})).await,
        "not_member"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Resume
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resume_replays_exactly_the_missed_events_or_asks_for_a_resync() {
    let s = TestServer::start_with(|b| b.replay_max = Some(6)).await;
    let mut a = s.connect("1").await;
    let b = s.connect("2").await;
    let _c = s.connect("3").await;
    let room = group(&mut a, "g", &["2"]).await;
    let other = group(&mut a, "other", &["2"]).await;
    let m1 = send_text(&mut a, room, "one").await; // 1
    drop(b);
    let m2 = send_text(&mut a, room, "two").await; // 2
    a.ok(
        "edit",
        json!({"room": room, "message": id(&m2), "text": "two!"}),
    )
    .await; // 3
    a.ok(
        "react",
        json!({"room": room, "message": id(&m1), "emoji": "👍"}),
    )
    .await; // 4
    a.ok("add_members", json!({"room": room, "users": ["3"]}))
        .await; // 5
    a.ok("delete", json!({"room": room, "messages": [id(&m1)]}))
        .await; // 6
    send_text(&mut a, other, "o1").await; // other: 1
    // b saw seq 1 of room and nothing of other.
    let mut b = s.connect("2").await;
    let r = b
        .ok(
            "resume",
            json!({"rooms": {room.to_string(): 1, other.to_string(): 0}}),
        )
        .await;
    assert_eq!(
        r["rooms"][room.to_string()],
        json!({"resync": false, "last_seq": 6, "events": 5})
    );
    assert_eq!(
        r["rooms"][other.to_string()],
        json!({"resync": false, "last_seq": 1, "events": 1})
    );
    // The events came before the reply, in order, per room (rooms in id order).
    let got: Vec<(u64, u64, String)> = b
        .events
        .drain(..)
        .filter(|e| e["event"] != "notification" && e["event"] != "presence")
        .map(|e| {
            (
                e["room"].as_u64().unwrap(),
                e["seq"].as_u64().unwrap(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want = vec![
        (room, 2, "message".to_owned()),
        (room, 3, "message_edited".into()),
        (room, 4, "reaction".into()),
        (room, 5, "member_joined".into()),
        (room, 6, "message_deleted".into()),
    ];
    let o = vec![(other, 1, "message".to_owned())];
    if other.to_string() < room.to_string() {
        want.splice(0..0, o);
    } else {
        want.extend(o);
    }
    assert_eq!(got, want);
    // Up to date: nothing.
    let r = b
        .ok("resume", json!({"rooms": {room.to_string(): 6}}))
        .await;
    assert_eq!(
        r["rooms"][room.to_string()],
        json!({"resync": false, "last_seq": 6, "events": 0})
    );
    assert!(b.events.iter().all(|e| e["room"] != room), "{:?}", b.events);
    // Exactly replay_max behind is replayed; one more is a resync with no events.
    let r = b
        .ok("resume", json!({"rooms": {room.to_string(): 0}}))
        .await;
    assert_eq!(r["rooms"][room.to_string()]["events"], 6);
    let seqs: Vec<u64> = b
        .events
        .drain(..)
        .filter(|e| e["room"] == room)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    send_text(&mut a, room, "seven").await; // 7
    assert_eq!(event_in(&mut b, "message", room).await["seq"], 7);
    let r = b
        .ok("resume", json!({"rooms": {room.to_string(): 0}}))
        .await;
    assert_eq!(
        r["rooms"][room.to_string()],
        json!({"resync": true, "last_seq": 7, "events": 0})
    );
    no_event_named(&mut b, "message", Some(room), Duration::from_millis(50)).await;
    // A room the caller is not in answers its own error; a bad key refuses the request.
    let d = a.ok("open_direct", json!({"user": "3"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let r = b.ok("resume", json!({"rooms": {d.to_string(): 0}})).await;
    assert_eq!(r["rooms"][d.to_string()]["error"]["code"], "not_member");
    assert_eq!(
        code(&mut b, "resume", json!({"rooms": {"abc": 0}})).await,
        "invalid_field"
    );
    assert_eq!(
        code(&mut b, "replay", json!({"room": d, "after_seq": 0})).await,
        "not_member"
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Authorization matrix
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn authorization_matrix() {
    let s = TestServer::start().await;
    let mut owner = s.connect("1").await;
    let mut member = s.connect("2").await;
    let mut outsider = s.connect("3").await;
    let mut admin = s.connect("4").await;
    let mut x = s.connect("5").await;
    let _y = s.connect("6").await;
    let room = group(&mut owner, "g", &["2", "4"]).await;
    owner
        .ok(
            "set_role",
            json!({"room": room, "user": "4", "role": "admin"}),
        )
        .await;
    let mo = send_text(&mut owner, room, "owner's").await;
    let mm = send_text(&mut member, room, "member's").await;
    let mm2 = send_text(&mut member, room, "member's 2").await;
    let mm3 = send_text(&mut member, room, "member's 3").await;
    // A direct room whose pair is blocked (x blocks member).
    let direct = member.ok("open_direct", json!({"user": "5"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    x.ok("friend", json!({"user": "2", "action": "block"}))
        .await;

    #[derive(Clone, Copy)]
    enum Who {
        Owner,
        Member,
        Admin,
        Outsider,
        X,
    }
    let r = room;
    let cases: Vec<(Who, &str, Value, &str)> = vec![
        // send
        (Who::Member, "send", json!({"room": r, "text": "hi"}), "ok"),
        (
            Who::Outsider,
            "send",
            json!({"room": r, "text": "hi"}),
            "not_member",
        ),
        (
            Who::Member,
            "send",
            json!({"room": direct, "text": "hi"}),
            "blocked",
        ),
        (
            Who::X,
            "send",
            json!({"room": direct, "text": "hi"}),
            "blocked",
        ),
        // edit
        (
            Who::Member,
            "edit",
            json!({"room": r, "message": id(&mm), "text": "e"}),
            "ok",
        ),
        (
            Who::Outsider,
            "edit",
            json!({"room": r, "message": id(&mm), "text": "e"}),
            "not_member",
        ),
        (
            Who::Member,
            "edit",
            json!({"room": r, "message": id(&mo), "text": "e"}),
            "forbidden",
        ),
        (
            Who::Owner,
            "edit",
            json!({"room": r, "message": id(&mm), "text": "e"}),
            "forbidden",
        ),
        // delete
        (
            Who::Outsider,
            "delete",
            json!({"room": r, "messages": [id(&mm)]}),
            "not_member",
        ),
        (
            Who::Member,
            "delete",
            json!({"room": r, "messages": [id(&mo)]}),
            "forbidden",
        ),
        (
            Who::Member,
            "delete",
            json!({"room": r, "messages": [id(&mm)]}),
            "ok",
        ),
        (
            Who::Admin,
            "delete",
            json!({"room": r, "messages": [id(&mm2)]}),
            "ok",
        ),
        (
            Who::Owner,
            "delete",
            json!({"room": r, "messages": [id(&mm3)]}),
            "ok",
        ),
        // react
        (
            Who::Member,
            "react",
            json!({"room": r, "message": id(&mo), "emoji": "ok"}),
            "ok",
        ),
        (
            Who::Outsider,
            "react",
            json!({"room": r, "message": id(&mo), "emoji": "ok"}),
            "not_member",
        ),
        // read
        (Who::Member, "read", json!({"room": r}), "ok"),
        (Who::Outsider, "read", json!({"room": r}), "not_member"),
        (
            Who::Outsider,
            "read",
            json!({"room": r, "message": id(&mo)}),
            "not_member",
        ),
        // typing
        (
            Who::Member,
            "typing",
            json!({"room": r, "typing": true}),
            "ok",
        ),
        (
            Who::Outsider,
            "typing",
            json!({"room": r, "typing": true}),
            "not_member",
        ),
        (
            Who::Member,
            "typing",
            json!({"room": direct, "typing": true}),
            "blocked",
        ),
        (
            Who::X,
            "typing",
            json!({"room": direct, "typing": true}),
            "blocked",
        ),
        // history, replay, members, view
        (Who::Member, "history", json!({"room": r}), "ok"),
        (Who::Outsider, "history", json!({"room": r}), "not_member"),
        (
            Who::Member,
            "replay",
            json!({"room": r, "after_seq": 0}),
            "ok",
        ),
        (
            Who::Outsider,
            "replay",
            json!({"room": r, "after_seq": 0}),
            "not_member",
        ),
        (Who::Member, "members", json!({"room": r}), "ok"),
        (Who::Outsider, "members", json!({"room": r}), "not_member"),
        (
            Who::Outsider,
            "view",
            json!({"room": r, "viewing": true}),
            "not_member",
        ),
        // add_members
        (
            Who::Member,
            "add_members",
            json!({"room": r, "users": ["6"]}),
            "forbidden",
        ),
        (
            Who::Outsider,
            "add_members",
            json!({"room": r, "users": ["6"]}),
            "not_member",
        ),
        (
            Who::Admin,
            "add_members",
            json!({"room": r, "users": ["6"]}),
            "ok",
        ),
        // remove_member
        (
            Who::Member,
            "remove_member",
            json!({"room": r, "user": "6"}),
            "forbidden",
        ),
        (
            Who::Outsider,
            "remove_member",
            json!({"room": r, "user": "6"}),
            "not_member",
        ),
        (
            Who::Admin,
            "remove_member",
            json!({"room": r, "user": "1"}),
            "forbidden",
        ),
        (
            Who::Admin,
            "remove_member",
            json!({"room": r, "user": "6"}),
            "ok",
        ),
        // set_role
        (
            Who::Member,
            "set_role",
            json!({"room": r, "user": "2", "role": "admin"}),
            "forbidden",
        ),
        (
            Who::Admin,
            "set_role",
            json!({"room": r, "user": "2", "role": "admin"}),
            "forbidden",
        ),
        (
            Who::Outsider,
            "set_role",
            json!({"room": r, "user": "2", "role": "admin"}),
            "not_member",
        ),
        (
            Who::Owner,
            "set_role",
            json!({"room": r, "user": "2", "role": "member"}),
            "ok",
        ),
        // update_group
        (
            Who::Member,
            "update_group",
            json!({"room": r, "name": "mine"}),
            "forbidden",
        ),
        (
            Who::Outsider,
            "update_group",
            json!({"room": r, "name": "mine"}),
            "not_member",
        ),
        (
            Who::Admin,
            "update_group",
            json!({"room": r, "name": "admin's"}),
            "ok",
        ),
        (
            Who::Owner,
            "update_group",
            json!({"room": r, "name": "owner's"}),
            "ok",
        ),
        // the owner removes; the removed member is a non-member from then on
        (
            Who::Owner,
            "remove_member",
            json!({"room": r, "user": "4"}),
            "ok",
        ),
        (
            Who::Admin,
            "send",
            json!({"room": r, "text": "still?"}),
            "not_member",
        ),
        (Who::Admin, "history", json!({"room": r}), "not_member"),
    ];
    for (who, op, args, want) in cases {
        let c = match who {
            Who::Owner => &mut owner,
            Who::Member => &mut member,
            Who::Admin => &mut admin,
            Who::Outsider => &mut outsider,
            Who::X => &mut x,
        };
        let r = c.request(op, args.clone()).await;
        let got = if r["ok"] == true {
            "ok"
        } else {
            r["error"]["code"].as_str().unwrap()
        };
        assert_eq!(got, want, "{op} {args} -> {r}");
    }
    // The non-member heard nothing of the room: no messages, typing, edits or reactions.
    no_event_named(&mut outsider, "typing", None, Duration::from_millis(100)).await;
    let leaked: Vec<&Value> = outsider
        .events
        .iter()
        .filter(|e| e["room"] == room)
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
    // And the blocked pair's room stayed empty.
    assert_eq!(
        x.ok("history", json!({"room": direct})).await["messages"],
        json!([])
    );
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rest_routes_of_the_domain() {
    let s = TestServer::start().await;
    let mut ws_b = s.connect("2").await;
    let _a = s.connect("1").await;
    let ta = s.token("1");
    let tb = s.token("2");
    let (st, body) = http(
        &s,
        "POST",
        "/v1/rooms",
        Some(&ta),
        Some(r#"{"name":"r","members":["2"]}"#),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let room = body["room"]["id"].as_u64().unwrap();
    let (st, m) = http(
        &s,
        "POST",
        &format!("/v1/rooms/{room}/messages"),
        Some(&ta),
        Some(r#"{"text":"hi"}"#),
    )
    .await;
    assert_eq!(st, 201, "{m}");
    let mid = id(&m["message"]);
    // PATCH edit.
    let (st, e) = http(
        &s,
        "PATCH",
        &format!("/v1/rooms/{room}/messages/{mid}"),
        Some(&ta),
        Some(r#"{"text":"hi!"}"#),
    )
    .await;
    assert_eq!(
        (st, e["message"]["text"].clone()),
        (200, json!("hi!")),
        "{e}"
    );
    assert!(e["message"]["edited_at"].is_u64());
    let (st, e) = http(
        &s,
        "PATCH",
        &format!("/v1/rooms/{room}/messages/{mid}"),
        Some(&tb),
        Some(r#"{"text":"no"}"#),
    )
    .await;
    assert_eq!((st, e["error"]["code"].as_str()), (403, Some("forbidden")));
    // Reactions: PUT adds, DELETE removes (percent-encoded emoji in the path).
    let (st, r) = http(
        &s,
        "PUT",
        &format!("/v1/rooms/{room}/messages/{mid}/reactions/%F0%9F%91%8D"),
        Some(&tb),
        None,
    )
    .await;
    assert_eq!(
        (st, r["message"]["reactions"].clone()),
        (200, json!({"👍": ["2"]})),
        "{r}"
    );
    let (st, r) = http(
        &s,
        "DELETE",
        &format!("/v1/rooms/{room}/messages/{mid}/reactions/%F0%9F%91%8D"),
        Some(&tb),
        None,
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["message"].get("reactions").is_none(), "{r}");
    // GET chats.
    let (st, ch) = http(
        &s,
        "GET",
        "/v1/chats?limit=5&direct_only=false",
        Some(&tb),
        None,
    )
    .await;
    assert_eq!(
        (
            st,
            ch["chats"][0]["id"].as_u64(),
            ch["chats"][0]["unread"].clone()
        ),
        (200, Some(room), json!(1)),
        "{ch}"
    );
    // DELETE a message: a tombstone.
    let (st, d) = http(
        &s,
        "DELETE",
        &format!("/v1/rooms/{room}/messages/{mid}"),
        Some(&ta),
        None,
    )
    .await;
    assert_eq!(
        (st, d["messages"][0]["type"].clone()),
        (200, json!("deleted")),
        "{d}"
    );
    let names: Vec<String> = {
        let mut v = Vec::new();
        while v.len() < 5 {
            let e = ws_b.event().await;
            if e["room"] == room && e.get("seq").is_some() {
                v.push(e["event"].as_str().unwrap().to_owned());
            }
        }
        v
    };
    assert_eq!(
        names,
        [
            "message",
            "message_edited",
            "reaction",
            "reaction",
            "message_deleted"
        ]
    );
    // Friends and users.
    let (st, f) = http(
        &s,
        "POST",
        "/v1/friends/2",
        Some(&ta),
        Some(r#"{"action":"request"}"#),
    )
    .await;
    assert_eq!(
        (st, f["friendship"]["status"].clone()),
        (200, json!("pending")),
        "{f}"
    );
    let (st, f) = http(
        &s,
        "POST",
        "/v1/friends/2",
        Some(&ta),
        Some(r#"{"action":"befriend"}"#),
    )
    .await;
    assert_eq!(
        (st, f["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{f}"
    );
    let (st, u) = http(&s, "GET", "/v1/users?username=user2", Some(&ta), None).await;
    assert_eq!(
        (st, u["user"]["id"].clone(), u["online"].clone()),
        (200, json!("2"), json!(true)),
        "{u}"
    );
    let (st, u) = http(&s, "GET", "/v1/users/2", Some(&ta), None).await;
    assert_eq!(
        (st, u["user"]["username"].clone()),
        (200, json!("user2")),
        "{u}"
    );
    let (st, u) = http(&s, "GET", "/v1/users?username=ghost", Some(&ta), None).await;
    assert_eq!((st, u["error"]["code"].as_str()), (404, Some("not_found")));
    // Admin routes are off without an admin token.
    let (st, e) = http(
        &s,
        "PUT",
        "/v1/admin/users",
        Some("anything-at-all-long"),
        Some("[]"),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    s.shutdown().await;
}
