//! The authorization matrix, one table over every dialect: each operation that touches someone
//! else's data, tried by each principal that must not do it (a non-member, a blocked user, a
//! member without the role, a spoofed sender or reader id, a join of another user's channel),
//! and every entry point tried with each bad token (expired, signed with another key,
//! `alg: none`, and the algorithm switched to HS256 keyed with the server's public key). Every
//! row must be refused in its dialect's own error shape; afterwards the victims' data is
//! unchanged and no stranger received a message of the group.
//!
//! The server verifies RS256 tokens with `fixtures/rsa_public.pem`, so the algorithm switch is the
//! classic attack on it.
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Client, TestServer};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws = common::Ws;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn claims(sub: &str, exp: i64) -> Value {
    json!({"sub": sub, "exp": exp, "name": format!("User {sub}")})
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A valid token of `sub` (RS256, the server's key pair).
fn valid(sub: &str) -> String {
    let key = EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(sub, now() + 3600),
        &key,
    )
    .unwrap()
}

/// The bad tokens, all naming user 1.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let private = EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap();
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("1", now() - 3600),
        &private,
    )
    .unwrap();
    let other_key = std::process::Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .unwrap();
    assert!(other_key.status.success(), "openssl genrsa failed");
    let other = EncodingKey::from_rsa_pem(&other_key.stdout).unwrap();
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("1", now() + 3600),
        &other,
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("1", now() + 3600).to_string())
    );
    let switched = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("1", now() + 3600),
        &EncodingKey::from_secret(fixture("rsa_public.pem").as_bytes()),
    )
    .unwrap();
    vec![
        ("expired", expired),
        ("wrong key", wrong_key),
        ("alg none", none),
        ("alg switched to HS256 with the public key", switched),
    ]
}

/// One row: in `dialect`, user `actor` sends `frame` (placeholders: see [`fill`]), and the answer
/// must contain `expect`. A `rest` row's `op` is `METHOD /path` and its `frame` the body.
struct Row {
    dialect: &'static str,
    actor: &'static str,
    case: &'static str,
    op: &'static str,
    frame: &'static str,
    expect: &'static str,
}

const fn row(
    dialect: &'static str,
    actor: &'static str,
    case: &'static str,
    op: &'static str,
    frame: &'static str,
    expect: &'static str,
) -> Row {
    Row {
        dialect,
        actor,
        case,
        op,
        frame,
        expect,
    }
}

// Users: 1 owns group $G (members 1, 2), wrote $M in it and posted the file $U there; 2 is a
// plain member; 3 is a stranger; 4 is blocked by 1; 5 too, after a direct room $B with 1 was
// opened. REST rows: `op` is exactly `METHOD /path`.
const NON_MEMBER: &str = "non-member";
const MEMBER: &str = "member without the role";
const BLOCKED: &str = "blocked";
const SPOOFED: &str = "spoofed sender/user id";
const CHANNEL: &str = "another user's channel";

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    // Native protocol.
    row("native", "3", NON_MEMBER, "send", r#"{"op":"send","room":$G,"text":"x"}"#, "not_member"),
    row("native", "3", NON_MEMBER, "history", r#"{"op":"history","room":$G}"#, "not_member"),
    row("native", "3", NON_MEMBER, "typing", r#"{"op":"typing","room":$G,"typing":true}"#, "not_member"),
    row("native", "3", NON_MEMBER, "read", r#"{"op":"read","room":$G,"message":$M}"#, "not_member"),
    row("native", "3", NON_MEMBER, "members", r#"{"op":"members","room":$G}"#, "not_member"),
    row("native", "3", NON_MEMBER, "react", r#"{"op":"react","room":$G,"message":$M,"emoji":"x"}"#, "not_member"),
    row("native", "3", NON_MEMBER, "add_members", r#"{"op":"add_members","room":$G,"users":["3"]}"#, "\"ok\":false"),
    row("native", "3", NON_MEMBER, "update_group", r#"{"op":"update_group","room":$G,"name":"pwned"}"#, "\"ok\":false"),
    row("native", "3", NON_MEMBER, "send to a direct room", r#"{"op":"send","room":$D,"text":"x"}"#, "not_member"),
    row("native", "3", NON_MEMBER, "history of a direct room", r#"{"op":"history","room":$D}"#, "not_member"),
    row("native", "3", NON_MEMBER, "edit", r#"{"op":"edit","room":$G,"message":$M,"text":"pwned"}"#, "not_member"),
    row("native", "3", NON_MEMBER, "delete", r#"{"op":"delete","room":$G,"messages":[$M]}"#, "not_member"),
    row("native", "3", NON_MEMBER, "remove_member", r#"{"op":"remove_member","room":$G,"user":"2"}"#, "\"ok\":false"),
    row("native", "3", NON_MEMBER, "set_role", r#"{"op":"set_role","room":$G,"user":"3","role":"admin"}"#, "\"ok\":false"),
    row("native", "3", NON_MEMBER, "join a private group", r#"{"op":"join","room":$G}"#, "\"ok\":false"),
    row("native", "3", NON_MEMBER, "room", r#"{"op":"room","room":$G}"#, "not_member"),
    row("native", "3", NON_MEMBER, "replay", r#"{"op":"replay","room":$G,"after_seq":0}"#, "not_member"),
    row("native", "3", NON_MEMBER, "resume", r#"{"op":"resume","rooms":{"$G":0}}"#, "not_member"),
    row("native", "3", NON_MEMBER, "mute", r#"{"op":"mute","room":$G,"muted":true}"#, "not_member"),
    row("native", "2", MEMBER, "add_members", r#"{"op":"add_members","room":$G,"users":["3"]}"#, "forbidden"),
    row("native", "2", MEMBER, "remove_member", r#"{"op":"remove_member","room":$G,"user":"1"}"#, "forbidden"),
    row("native", "2", MEMBER, "set_role", r#"{"op":"set_role","room":$G,"user":"2","role":"admin"}"#, "forbidden"),
    row("native", "2", MEMBER, "update_group", r#"{"op":"update_group","room":$G,"name":"pwned"}"#, "forbidden"),
    row("native", "2", MEMBER, "edit another's message", r#"{"op":"edit","room":$G,"message":$M,"text":"pwned"}"#, "forbidden"),
    row("native", "2", MEMBER, "delete another's message", r#"{"op":"delete","room":$G,"messages":[$M]}"#, "forbidden"),
    row("native", "5", BLOCKED, "send in a direct room opened before the block", r#"{"op":"send","room":$B,"text":"x"}"#, "blocked"),
    row("native", "5", BLOCKED, "typing in a direct room opened before the block", r#"{"op":"typing","room":$B,"typing":true}"#, "\"ok\":false"),
    row("native", "4", BLOCKED, "open_direct", r#"{"op":"open_direct","user":"1"}"#, "blocked"),
    row("native", "3", SPOOFED, "send as another", r#"{"op":"send","room":$G,"text":"x","sender":"1"}"#, "invalid_field"),
    // Type-tagged.
    row("rt", "3", NON_MEMBER, "GROUP_CHAT", r#"{"type":"GROUP_CHAT","groupId":"$G","content":"x"}"#, "ERROR"),
    row("rt", "3", NON_MEMBER, "GET_GROUP_CHAT_HISTORY", r#"{"type":"GET_GROUP_CHAT_HISTORY","groupId":"$G"}"#, "ERROR"),
    row("rt", "3", SPOOFED, "ONE_TO_ONE_CHAT from another", r#"{"type":"ONE_TO_ONE_CHAT","from":"1","to":"2","content":"x"}"#, "from does not match the authenticated user"),
    row("rt", "4", BLOCKED, "ONE_TO_ONE_CHAT", r#"{"type":"ONE_TO_ONE_CHAT","to":"1","content":"x"}"#, "ERROR"),
    // Event/data.
    row("events", "3", NON_MEMBER, "chat:typing in a group", r#"{"event":"chat:typing","data":{"group_id":$G,"is_typing":true}}"#, "chat:error"),
    row("events", "3", NON_MEMBER, "chat:read", r#"{"event":"chat:read","data":{"message_id":$M,"room_id":$G}}"#, "chat:error"),
    row("events", "3", SPOOFED, "chat:read as another reader", r#"{"event":"chat:read","data":{"message_id":$M,"room_id":$G,"read_by":1}}"#, "does not match the authenticated user"),
    row("events", "3", SPOOFED, "chat:typing as another sender", r#"{"event":"chat:typing","data":{"receiver_id":2,"sender_id":1,"is_typing":true}}"#, "does not match the authenticated user"),
    row("events", "4", BLOCKED, "chat:typing to the blocker", r#"{"event":"chat:typing","data":{"receiver_id":1,"is_typing":true}}"#, "chat:error"),
    // Phoenix.
    row("phoenix", "3", NON_MEMBER, "join chat", r#"["1","1","chat:$G","phx_join",{}]"#, "\"status\":\"error\""),
    row("phoenix", "3", CHANNEL, "join another user's notifications", r#"["2","2","notifications:1","phx_join",{}]"#, "\"status\":\"error\""),
    row("phoenix", "3", NON_MEMBER, "send_message without joining", r#"["1","3","chat:$G","send_message",{"content":"x"}]"#, "\"status\":\"error\""),
    // Socket.IO, NotifyHub (namespace /chats).
    row("notifyhub", "4", BLOCKED, "send_message to the blocker", r#"["send_message",{"message":"x","receiver_id":1}]"#, "error"),
    // Socket.IO, Syarah (namespace /).
    row("syarah", "3", NON_MEMBER, "createMessage", r#"["createMessage",{"chatHeaderId":$G,"message":"x"}]"#, "error"),
    row("syarah", "3", NON_MEMBER, "findAllMessages", r#"["findAllMessages",{"chatHeaderId":$G}]"#, "error"),
    row("syarah", "3", NON_MEMBER, "joinRoom", r#"["joinRoom",{"chatHeaderId":$G}]"#, "error"),
    row("syarah", "3", NON_MEMBER, "roomTyping", r#"["roomTyping",{"chatHeaderId":$G,"isTyping":true}]"#, "error"),
    row("syarah", "3", NON_MEMBER, "readMessage", r#"["readMessage",{"chatHeaderId":$G}]"#, "error"),
    row("syarah", "3", NON_MEMBER, "removeMessage", r#"["removeMessage",{"chatHeaderId":$G,"id":$M}]"#, "error"),
    row("syarah", "2", MEMBER, "updateMessage of another", r#"["updateMessage",{"chatHeaderId":$G,"id":$M,"message":"pwned"}]"#, "error"),
    row("syarah", "2", MEMBER, "removeMessage of another", r#"["removeMessage",{"chatHeaderId":$G,"id":$M}]"#, "error"),
    row("syarah", "3", SPOOFED, "createMessage with another's accessToken", r#"["createMessage",{"chatHeaderId":$G,"message":"x","accessToken":"$T1"}]"#, "error"),
    // Native REST.
    row("rest", "3", NON_MEMBER, "POST /v1/rooms/$G/messages", r#"{"text":"x"}"#, "403"),
    row("rest", "3", NON_MEMBER, "GET /v1/rooms/$G/messages", "", "403"),
    row("rest", "3", NON_MEMBER, "GET /v1/rooms/$G/members", "", "403"),
    row("rest", "3", NON_MEMBER, "POST /v1/rooms/$G/members", r#"{"users":["3"]}"#, "403"),
    row("rest", "3", NON_MEMBER, "GET /v1/rooms/$G/events?after_seq=0", "", "403"),
    row("rest", "3", NON_MEMBER, "PATCH /v1/rooms/$G/messages/$M", r#"{"text":"pwned"}"#, "403"),
    row("rest", "3", NON_MEMBER, "DELETE /v1/rooms/$G/messages/$M", "", "403"),
    row("rest", "3", NON_MEMBER, "PUT /v1/rooms/$G/messages/$M/reactions/x", "", "403"),
    row("rest", "3", NON_MEMBER, "POST /v1/rooms/$G/read", "{}", "403"),
    row("rest", "3", NON_MEMBER, "POST /v1/rooms/$G/join", "", "403"),
    row("rest", "3", NON_MEMBER, "GET $U", "", "403"),
    row("rest", "2", MEMBER, "PATCH /v1/rooms/$G", r#"{"name":"pwned"}"#, "403"),
    row("rest", "2", MEMBER, "DELETE /v1/rooms/$G/members/1", "", "403"),
    row("rest", "2", MEMBER, "PUT /v1/rooms/$G/members/2/role", r#"{"role":"admin"}"#, "403"),
    row("rest", "2", MEMBER, "DELETE /v1/rooms/$G/messages/$M", "", "403"),
    row("rest", "2", MEMBER, "PUT /v1/admin/users", r#"[{"id":"2","name":"admin"}]"#, "401"),
    row("rest", "2", MEMBER, "GET /v1/admin/overview", "", "401"),
    row("rest", "2", MEMBER, "POST /v1/admin/token", r#"{"user":"1"}"#, "401"),
    // Event/data REST.
    row("rest", "3", SPOOFED, "POST /send_chat_message.php", r#"{"sender_id":1,"receiver_id":2,"message":"x"}"#, "403"),
    row("rest", "4", BLOCKED, "POST /send_chat_message.php", r#"{"receiver_id":1,"message":"x"}"#, "403"),
];

/// Fills `$G`, `$M`, `$D`, `$B` (the direct room of users 1 and 5, opened before the block), `$U`
/// (the path of a file user 1 posted in the group) and `$T1` (a valid token of user 1, for the
/// spoofing rows).
fn fill(s: &str, ids: &HashMap<&str, u64>, upload: &str) -> String {
    s.replace("$G", &ids["G"].to_string())
        .replace("$B", &ids["B"].to_string())
        .replace("$U", upload)
        .replace("$M", &ids["M"].to_string())
        .replace("$D", &ids["D"].to_string())
        .replace("$T1", &valid("1"))
}

/// Connects user `actor` in `dialect`, ready for frames.
async fn session(server: &TestServer, dialect: &str, actor: &str) -> Ws {
    let t = valid(actor);
    let url = match dialect {
        "native" => format!("{}?token={t}", server.url("/ws")),
        "rt" => server.url("/rt/chat"),
        "events" => format!("{}?token={t}", server.url("/events")),
        "phoenix" => format!("{}?vsn=2.0.0&token={t}", server.url("/socket/websocket")),
        "notifyhub" => format!(
            "{}?EIO=4&transport=websocket&access_token={t}",
            server.url("/socket.io/")
        ),
        "syarah" => format!("{}?EIO=4&transport=websocket", server.url("/socket.io/")),
        other => panic!("no dialect {other}"),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    match dialect {
        "rt" => {
            ws.send(Message::text(
                json!({"type": "AUTH", "token": t}).to_string(),
            ))
            .await
            .unwrap();
        }
        "notifyhub" => {
            next_text(&mut ws, |f| f.starts_with('0')).await.unwrap();
            ws.send(Message::text("40/chats,")).await.unwrap();
            next_text(&mut ws, |f| f.starts_with("40/chats,"))
                .await
                .unwrap();
        }
        "syarah" => {
            next_text(&mut ws, |f| f.starts_with('0')).await.unwrap();
            ws.send(Message::text(format!("40{}", json!({"token": t}))))
                .await
                .unwrap();
            next_text(&mut ws, |f| f.starts_with("40{")).await.unwrap();
        }
        _ => {}
    }
    // Greetings, presence snapshots.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {}
    ws
}

async fn next_text(ws: &mut Ws, relevant: impl Fn(&str) -> bool) -> Option<String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??;
        match m {
            Ok(Message::Text(t)) if relevant(t.as_str()) => return Some(t.as_str().to_owned()),
            Ok(Message::Close(f)) => return Some(format!("close {f:?}")),
            Err(e) => return Some(format!("error {e}")),
            _ => {}
        }
    }
}

/// Which frames answer a row.
type Relevant = Box<dyn Fn(&str) -> bool>;

/// Sends a row's frame in its dialect; the answer to it.
async fn attempt(ws: &mut Ws, dialect: &str, frame: String, n: usize) -> Option<String> {
    let (frame, relevant): (String, Relevant) = match dialect {
        "native" => {
            let mut v: Value = serde_json::from_str(&frame).unwrap();
            v["id"] = json!(format!("row{n}"));
            let id = format!("\"row{n}\"");
            (v.to_string(), Box::new(move |t: &str| t.contains(&id)))
        }
        "rt" => (
            frame,
            Box::new(|t: &str| t.contains("\"type\":\"ERROR\"") || t.contains("MESSAGE")),
        ),
        "events" => (
            frame,
            Box::new(|t: &str| t.contains("chat:error") || t.contains("chat:message")),
        ),
        "phoenix" => (
            frame,
            Box::new(|t: &str| t.contains("phx_reply") || t.contains("phx_error")),
        ),
        "notifyhub" => (
            format!("42/chats,{frame}"),
            Box::new(|t: &str| t.starts_with("42/chats,")),
        ),
        "syarah" => {
            let ack = format!("43{}", n + 1);
            (
                format!("42{}{frame}", n + 1),
                Box::new(move |t: &str| t.starts_with(&ack)),
            )
        }
        other => panic!("no dialect {other}"),
    };
    ws.send(Message::text(frame)).await.ok()?;
    next_text(ws, relevant).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unauthorized_operation_is_refused_in_every_dialect() {
    let server = TestServer::start_with(|b| {
        b.jwt_secret = None;
        b.jwt_public_key = Some(fixture("rsa_public.pem"));
        b.messages_per_second = Some(1000);
        b.typing_per_second = Some(1000);
        b.admin_token = Some("authz-admin-token-0123456789abcdef".into());
    })
    .await;
    let connect = |u: &str| {
        let url = format!("{}?token={}", server.url("/ws"), valid(u));
        async move { Client::connect(&url).await }
    };
    let mut one = connect("1").await;
    let mut two = connect("2").await;
    let mut three = connect("3").await;
    let mut four = connect("4").await;
    let mut five = connect("5").await;
    for c in [&mut two, &mut three, &mut four, &mut five] {
        c.ok("ping", json!({})).await;
    }
    let g = common::group(&mut one, "private", &["2"]).await;
    let m = one.ok("send", json!({"room": g, "text": "secret"})).await["message"]["id"]
        .as_u64()
        .unwrap();
    let d = one.ok("open_direct", json!({"user": "2"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let b = one.ok("open_direct", json!({"user": "5"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    for blocked in ["4", "5"] {
        one.ok("friend", json!({"user": blocked, "action": "block"}))
            .await;
    }
    // The stranger has rooms of his own (so "a member of some room" is not "a member of its room").
    three.ok("open_direct", json!({"user": "2"})).await;
    let upload = upload_file(&server, &valid("1")).await;
    one.ok(
        "send",
        json!({"room": g, "type": "file", "media": upload, "caption": "secret file"}),
    )
    .await;
    let ids = HashMap::from([("G", g), ("M", m), ("D", d), ("B", b)]);
    one.events.clear();

    let mut failures = Vec::new();
    let mut sessions: HashMap<(String, String), Ws> = HashMap::new();
    let http = reqwest::Client::new();
    for (n, r) in MATRIX.iter().enumerate() {
        let frame = fill(r.frame, &ids, &upload);
        let answer = if r.dialect == "rest" {
            let op = fill(r.op, &ids, &upload);
            let (method, path) = op.split_once(' ').unwrap();
            let resp = http
                .request(method.parse().unwrap(), server.http(path))
                .bearer_auth(valid(r.actor))
                .header("content-type", "application/json")
                .body(frame)
                .send()
                .await
                .unwrap();
            Some(format!(
                "{} {}",
                resp.status().as_u16(),
                resp.text().await.unwrap()
            ))
        } else {
            let key = (r.dialect.to_owned(), r.actor.to_owned());
            if !sessions.contains_key(&key) {
                let ws = session(&server, r.dialect, r.actor).await;
                sessions.insert(key.clone(), ws);
            }
            attempt(sessions.get_mut(&key).unwrap(), r.dialect, frame, n).await
        };
        match answer {
            // `resume` answers per room: the refusal is that room's `error` in an ok reply.
            Some(a) if a.contains(r.expect) && (!a.contains("\"ok\":true") || r.op == "resume") => {
            }
            other => failures.push(format!(
                "{} / {} / {}: expected {:?}, got {:?}",
                r.dialect, r.case, r.op, r.expect, other
            )),
        }
    }

    // Every entry point, every bad token.
    let mut token_rows = 0;
    for (kind, t) in bad_tokens() {
        for entry in [
            "native",
            "rest",
            "rt",
            "events",
            "events-rest",
            "phoenix",
            "notifyhub",
            "syarah",
        ] {
            token_rows += 1;
            let refused = refused_at_entry(&server, entry, &t).await;
            if let Err(got) = refused {
                failures.push(format!(
                    "{entry} / token {kind}: accepted or wrong shape: {got}"
                ));
            }
        }
    }

    // The victims' data is unchanged; the stranger got none of the group's messages.
    let history = one.ok("history", json!({"room": g, "limit": 50})).await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str().or(m["caption"].as_str()))
        .collect();
    assert_eq!(
        texts,
        ["secret file", "secret"],
        "group history changed: {history}"
    );
    assert!(
        history["messages"][1]["reactions"]
            .as_object()
            .is_none_or(|r| r.is_empty())
            && history["messages"][1]["edited_at"].is_null(),
        "the message was reacted to or edited: {history}"
    );
    let members = one.ok("members", json!({"room": g})).await;
    let mut ids: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().or(m["id"].as_str()).unwrap_or_default())
        .collect();
    ids.sort();
    assert_eq!(ids, ["1", "2"], "membership changed: {members}");
    let room = one.ok("room", json!({"room": g})).await;
    assert!(
        room.to_string().contains("\"private\""),
        "group renamed: {room}"
    );
    let direct = one.ok("history", json!({"room": d, "limit": 50})).await;
    assert_eq!(direct["messages"].as_array().unwrap().len(), 0, "{direct}");
    // The blocker heard nothing from the blocked user (no typing, no presence, no new room).
    let mut heard: Vec<Value> = one.events.drain(..).collect();
    while let Ok(f) = tokio::time::timeout(Duration::from_millis(300), one.frame()).await {
        heard.push(f);
    }
    assert!(
        !heard.iter().any(|e| {
            let e = e.to_string();
            e.contains("\"4\"") || e.contains("\"5\"")
        }),
        "the blocker heard from the blocked user: {heard:?}"
    );
    assert!(
        !three.events.iter().any(|e| e["event"] == "message"),
        "a stranger received a group message: {:?}",
        three.events
    );

    let total = MATRIX.len() + token_rows;
    eprintln!(
        "authorization matrix: {total} rows, {} not refused",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} rows not refused as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.shutdown().await;
}

/// Uploads a small file as `token`'s user; its path.
async fn upload_file(server: &TestServer, token: &str) -> String {
    const BOUNDARY: &str = "authz-boundary";
    let body = format!(
        "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"kind\"\r\n\r\nfile\r\n\
         --{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"secret.txt\"\r\n\
         content-type: text/plain\r\n\r\nthe secret\r\n--{BOUNDARY}--\r\n"
    );
    let r = reqwest::Client::new()
        .post(server.http("/v1/uploads"))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "upload refused");
    let v: Value = r.json().await.unwrap();
    v["upload"]["path"].as_str().unwrap().to_owned()
}

/// Connecting at `entry` with token `t` is refused in that entry point's shape: `Ok`, or what
/// happened instead.
async fn refused_at_entry(server: &TestServer, entry: &str, t: &str) -> Result<(), String> {
    let http_status = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Ok(r.status().as_u16()),
            Err(e) => Err(format!("{e}")),
            Ok(_) => Err("upgraded".into()),
        }
    };
    match entry {
        "native" => match http_status(format!("{}?token={t}", server.url("/ws"))).await {
            Ok(401) => Ok(()),
            other => Err(format!("{other:?}")),
        },
        "events" => match http_status(format!("{}?token={t}", server.url("/events"))).await {
            Ok(401) => Ok(()),
            other => Err(format!("{other:?}")),
        },
        "phoenix" => match http_status(format!(
            "{}?vsn=2.0.0&token={t}",
            server.url("/socket/websocket")
        ))
        .await
        {
            Ok(403) => Ok(()),
            other => Err(format!("{other:?}")),
        },
        "rest" | "events-rest" => {
            let (method, path, body) = if entry == "rest" {
                ("GET", "/v1/rooms", String::new())
            } else {
                (
                    "POST",
                    "/send_chat_message.php",
                    json!({"receiver_id": 2, "message": "x"}).to_string(),
                )
            };
            let r = reqwest::Client::new()
                .request(method.parse().unwrap(), server.http(path))
                .bearer_auth(t)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            if r.status() == 401 {
                Ok(())
            } else {
                Err(format!(
                    "{} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ))
            }
        }
        "rt" => {
            let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
                .await
                .unwrap();
            ws.send(Message::text(
                json!({"type": "AUTH", "token": t}).to_string(),
            ))
            .await
            .unwrap();
            let a = next_text(&mut ws, |_| true).await.unwrap_or_default();
            if a.contains("\"type\":\"ERROR\"") && a.contains("token") {
                Ok(())
            } else {
                Err(a)
            }
        }
        "notifyhub" => {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!(
                "{}?EIO=4&transport=websocket&access_token={t}",
                server.url("/socket.io/")
            ))
            .await
            .unwrap();
            next_text(&mut ws, |f| f.starts_with('0')).await;
            ws.send(Message::text("40/chats,")).await.unwrap();
            let a = next_text(&mut ws, |f| f.starts_with("4"))
                .await
                .unwrap_or_default();
            if a.starts_with("44/chats,") {
                Ok(())
            } else {
                Err(a)
            }
        }
        "syarah" => {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!(
                "{}?EIO=4&transport=websocket",
                server.url("/socket.io/")
            ))
            .await
            .unwrap();
            next_text(&mut ws, |f| f.starts_with('0')).await;
            ws.send(Message::text(format!("40{}", json!({"token": t}))))
                .await
                .unwrap();
            let a = next_text(&mut ws, |f| f.starts_with("4"))
                .await
                .unwrap_or_default();
            if a.starts_with("44") {
                Ok(())
            } else {
                // Syarah may accept the connection unbound and refuse every event instead.
                ws.send(Message::text(format!("421{}", json!(["getMyChats", {}]))))
                    .await
                    .unwrap();
                let b = next_text(&mut ws, |f| f.starts_with("431"))
                    .await
                    .unwrap_or_default();
                if b.contains("error") {
                    Ok(())
                } else {
                    Err(format!("{a} then {b}"))
                }
            }
        }
        other => panic!("no entry {other}"),
    }
}
