//! Limits against a real server: each is refused with its precise error in the dialect's own
//! shape, counted in `palaver_limit_refusals_total{limit}`, and released when the connection
//! goes, on every close path. Also the abuse cases: a request head sent byte by byte
//! (slowloris), a connection that sends nothing, and thousands of connections opened and
//! dropped at once; and the kernel send buffer of every WebSocket route, bounded after the
//! upgrade (read with `ss` from iproute2, which `.ci/run` installs).
//!
//! The metrics recorder is one per process and these tests run in parallel: each asserts only
//! the movement of its own `limit` label.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// `palaver_limit_refusals_total{limit="<limit>"}` now (0 before its first refusal).
async fn refusals(server: &TestServer, limit: &str) -> f64 {
    let text = reqwest::get(server.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("palaver_limit_refusals_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits until `f` holds, or fails with `what`.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP connection to `to` from loopback address `from`.
async fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends a `GET path` on `tcp` and reads the whole answer (the server closes or it is short).
async fn get_raw(tcp: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: palaver\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("no answer in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP answer.
fn body_of(answer: &str) -> Value {
    let (_, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    serde_json::from_str(body).unwrap()
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_limited_and_released() {
    let server = TestServer::start_with(|b| b.max_connections_per_ip = Some(3)).await;
    let limits = server.palaver.as_ref().unwrap().app().conn_limits.clone();
    let before = refusals(&server, "conn_ip").await;
    until("the scrape's connection to go", || {
        limits.open_from(loopback()) == 0
    })
    .await;

    // Three places: a native WebSocket session and two idle TCP connections.
    let mut ws = server.connect("1").await;
    ws.ok("ping", json!({})).await;
    let idle1 = tcp_from(Ipv4Addr::LOCALHOST, server.addr).await;
    let _idle2 = tcp_from(Ipv4Addr::LOCALHOST, server.addr).await;
    until("three connections counted", || {
        limits.open_from(loopback()) == 3
    })
    .await;

    // The fourth from the same address: 429 with the precise error, not routed.
    let mut fourth = tcp_from(Ipv4Addr::LOCALHOST, server.addr).await;
    let answer = get_raw(&mut fourth, "/healthz").await;
    assert!(
        answer.starts_with("HTTP/1.1 429"),
        "expected a 429, got {answer:?}"
    );
    let body = body_of(&answer);
    assert_eq!(body["error"]["code"], "too_many_connections");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1 already has 3 open connections")
            && message.contains("PALAVER_MAX_CONNECTIONS_PER_IP"),
        "{message}"
    );
    // A WebSocket upgrade is refused the same way.
    let refused =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.url("/ws"), token("2")))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected a 429 refusal, got {other:?}"),
    }

    // Another address has its own count.
    let mut other = tcp_from(Ipv4Addr::new(127, 0, 0, 2), server.addr).await;
    let answer = get_raw(&mut other, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");

    // A place is released when its connection goes, whatever it was: an idle TCP connection
    // dropped, a WebSocket session closed by its client.
    drop(idle1);
    until("the dropped connection released", || {
        limits.open_from(loopback()) == 2
    })
    .await;
    let mut again = tcp_from(Ipv4Addr::LOCALHOST, server.addr).await;
    let answer = get_raw(&mut again, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    ws.ws.close(None).await.unwrap();
    until("the WebSocket's place released", || {
        limits.open_from(loopback()) == 1
    })
    .await;

    let after = refusals(&server, "conn_ip").await;
    assert_eq!(after - before, 2.0, "both refusals counted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_user_are_limited_across_dialects() {
    let server = TestServer::start_with(|b| b.max_connections_per_user = Some(2)).await;
    let before = refusals(&server, "conn_user").await;
    let mut a1 = server.connect("1").await;
    a1.ok("ping", json!({})).await;
    let (mut rt, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    let auth = json!({"type": "AUTH", "token": token("1")}).to_string();
    rt.send(Message::text(auth.clone())).await.unwrap();
    let ok = rt_frame(&mut rt).await;
    assert_eq!(ok["type"], "SUCCESS", "{ok}");
    assert_eq!(server.sessions(), 2);

    // A third session of user 1, native: refused before the upgrade, 429 with the code.
    let url = format!("{}?token={}", server.url("/ws"), token("1"));
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "too_many_connections");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("user 1 already has 2 sessions")
                    && message.contains("PALAVER_MAX_CONNECTIONS_PER_USER"),
                "{message}"
            );
        }
        other => panic!("expected a 429 refusal, got {other:?}"),
    }
    // Type-tagged: its error frame, then close 4029.
    let (mut rt2, _) = tokio_tungstenite::connect_async(server.url("/rt/chat"))
        .await
        .unwrap();
    rt2.send(Message::text(auth)).await.unwrap();
    let err = rt_frame(&mut rt2).await;
    assert_eq!(err["type"], "ERROR", "{err}");
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("PALAVER_MAX_CONNECTIONS_PER_USER"),
        "{err}"
    );
    assert_eq!(close_code(&mut rt2).await, Some(4029));

    // Other users are not affected.
    let mut b = server.connect("2").await;
    b.ok("ping", json!({})).await;
    assert_eq!(server.sessions(), 3);

    // Closing one session frees its place.
    a1.ws.close(None).await.unwrap();
    until("the closed session gone", || server.sessions() == 2).await;
    let mut a3 = server.connect("1").await;
    a3.ok("ping", json!({})).await;

    let after = refusals(&server, "conn_user").await;
    assert_eq!(after - before, 2.0, "both refusals counted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_request_heads_are_cut_off() {
    let server = TestServer::start_with(|b| b.header_timeout_secs = Some(1)).await;
    let limits = server.palaver.as_ref().unwrap().app().conn_limits.clone();

    // Slowloris: a request head one byte every 200 ms never completes; the server closes the
    // connection after the 1 s bound (not after the 30+ s the whole head would take).
    let mut slow = tcp_from(Ipv4Addr::new(127, 0, 0, 3), server.addr).await;
    let head = b"GET /healthz HTTP/1.1\r\nhost: palaver\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut cut = None;
    for &byte in head.iter() {
        if slow.write_all(&[byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Err(_) => continue, // nothing yet: keep dribbling
            Ok(Ok(_)) | Ok(Err(_)) => {
                // The server's 408 answer, or its close.
                cut = Some(started.elapsed());
                break;
            }
        }
    }
    let cut = cut.expect("the slow head was never cut off");
    assert!(
        cut < Duration::from_secs(6),
        "cut off after {cut:?}; the bound is 1 s"
    );

    // Silent: connected, nothing sent; closed after the bound too.
    let mut silent = tcp_from(Ipv4Addr::new(127, 0, 0, 4), server.addr).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a silent connection was kept open");

    // Their places were released; normal requests still work.
    until("the cut-off connections released", || {
        limits.open_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))) == 0
            && limits.open_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4))) == 0
    })
    .await;
    let r = reqwest::get(server.http("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_connections_opened_and_dropped_leave_nothing_behind() {
    // 4,000 raw TCP connections and 500 native sessions from 8 addresses, all dropped at once
    // without a close handshake. (The test process holds both ends, so this stays well under
    // the 20,000 open files a process may have here; load/ measures 10,000.)
    let server = TestServer::start_with(|b| b.header_timeout_secs = Some(30)).await;
    let limits = server.palaver.as_ref().unwrap().app().conn_limits.clone();
    let addr = server.addr;
    let mut raw = Vec::new();
    for i in 0..4000u32 {
        let from = Ipv4Addr::new(127, 0, 1, 1 + (i % 8) as u8);
        raw.push(tcp_from(from, addr).await);
    }
    let mut sessions = Vec::new();
    for i in 0..500u32 {
        let from = Ipv4Addr::new(127, 0, 2, 1 + (i % 8) as u8);
        let tcp = tcp_from(from, addr).await;
        let url = format!("ws://{addr}/ws?token={}", token(&format!("s{i}")));
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        sessions.push(ws);
    }
    until("every connection counted", || {
        (1..=8).all(|k| {
            limits.open_from(IpAddr::V4(Ipv4Addr::new(127, 0, 1, k))) == 500
                && limits.open_from(IpAddr::V4(Ipv4Addr::new(127, 0, 2, k)))
                    == 500 / 8 + u8::from(k <= 4) as usize
        })
    })
    .await;
    assert_eq!(server.sessions(), 500);
    drop(raw);
    drop(sessions);
    until("every session gone", || server.sessions() == 0).await;
    until("every address released", || limits.addresses() == 0).await;
    // And the server still serves.
    let mut c = server.connect("after").await;
    c.ok("ping", json!({})).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_payload_and_rate_limits_are_counted() {
    let server = TestServer::start_with(|b| {
        b.max_frame_bytes = Some(2048);
        b.messages_per_second = Some(1); // burst 2
        b.typing_per_second = Some(1); // burst 5
    })
    .await;
    let frame0 = refusals(&server, "frame").await;
    let payload0 = refusals(&server, "payload").await;
    let rate0 = refusals(&server, "message_rate").await;
    let typing0 = refusals(&server, "typing_rate").await;

    let mut a = server.connect("1").await;
    let mut b = server.connect("2").await;
    b.ok("ping", json!({})).await;
    let room = group(&mut a, "g", &["2"]).await;
    // A frame over the limit: the precise error, the session goes on.
    a.send_text(json!({"id": 1, "op": "send", "room": room, "text": "x".repeat(4000)}).to_string())
        .await;
    let r = a.next_reply().await;
    assert_eq!(r["error"]["code"], "frame_too_large", "{r}");
    // A REST body over the limit.
    let r = reqwest::Client::new()
        .post(server.http("/v1/rooms"))
        .bearer_auth(token("1"))
        .header("content-type", "application/json")
        .body(format!("{{\"name\":\"{}\"}}", "n".repeat(4000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Messages past the rate, then typing past its rate.
    let mut rate_refused = 0;
    for i in 0..6 {
        let r = a
            .request("send", json!({"room": room, "text": format!("m{i}")}))
            .await;
        if r["ok"] == false {
            assert_eq!(r["error"]["code"], "rate_limited", "{r}");
            rate_refused += 1;
        }
    }
    assert!(rate_refused > 0);
    let mut typing_refused = 0;
    for _ in 0..10 {
        let r = a
            .request("typing", json!({"room": room, "typing": true}))
            .await;
        if r["ok"] == false {
            assert_eq!(r["error"]["code"], "typing_rate_limited", "{r}");
            typing_refused += 1;
        }
    }
    assert!(typing_refused > 0);

    assert_eq!(refusals(&server, "frame").await - frame0, 1.0);
    assert_eq!(refusals(&server, "payload").await - payload0, 1.0);
    assert_eq!(
        refusals(&server, "message_rate").await - rate0,
        f64::from(rate_refused)
    );
    assert_eq!(
        refusals(&server, "typing_rate").await - typing0,
        f64::from(typing_refused)
    );
    server.shutdown().await;
}

async fn rt_frame(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return Some(f.code.into()),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// `palaver_tarpit_pauses_total` now.
async fn tarpit_pauses(server: &TestServer) -> f64 {
    let text = reqwest::get(server.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("palaver_tarpit_pauses_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A client flooding past its rate is answered `rate_limited` and then heard again only after
/// a pause that doubles with each refusal in a row: 40 sends written at once get their first
/// two accepted and the third refused at once, but the rest trickle (25 + 50 + 100 + 200 ms
/// of pauses before the 8th answer), so the flood costs the server a handful of answers, not
/// 40. Other clients are not held back, and the flooder is answered normally once its bucket
/// has refilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_rate_is_tarpitted() {
    let server = TestServer::start_with(|b| {
        b.messages_per_second = Some(1); // burst 2
    })
    .await;
    let pauses0 = tarpit_pauses(&server).await;
    let mut a = server.connect("flooder").await;
    let mut b = server.connect("bystander").await;
    let room = group(&mut a, "g", &["bystander"]).await;
    for i in 0..40 {
        a.send_text(
            json!({"id": i, "op": "send", "room": room, "text": format!("f{i}")}).to_string(),
        )
        .await;
    }
    let started = Instant::now();
    let mut answers = Vec::new();
    while answers.len() < 40 {
        let Ok(r) = tokio::time::timeout(Duration::from_millis(300), a.next_reply()).await else {
            break;
        };
        answers.push((started.elapsed(), r));
    }
    let ok = answers.iter().filter(|(_, r)| r["ok"] == true).count();
    let refused: Vec<_> = answers.iter().filter(|(_, r)| r["ok"] == false).collect();
    assert!(ok >= 2, "the burst is accepted: {answers:?}");
    assert!(!refused.is_empty(), "{answers:?}");
    for (_, r) in &refused {
        assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    }
    // Pauses of 25, 50, 100 and 200 ms come before the 8th answer, so at most 2 accepted and
    // 5 refused arrive in the first 300 ms (without the pauses, all 40 would).
    let early = answers
        .iter()
        .filter(|(at, _)| *at < Duration::from_millis(300))
        .count();
    assert!(
        early <= 8,
        "the flood was not held back: {early} answers in 300 ms"
    );
    assert!(tarpit_pauses(&server).await - pauses0 >= 3.0);
    // A bystander is not held back meanwhile.
    b.ok("ping", json!({})).await;
    b.ok("send", json!({"room": room, "text": "hello"})).await;
    drop(a);
    server.shutdown().await;
}

/// A room's fan-out budget: a room takes at most `room_fanout_per_second / members` messages
/// per second (one message at any size after a quiet spell). Past it a send is refused
/// `rate_limited` with the room's rate, counted under `room_fanout`; the sender's other rooms
/// are not affected, and the room takes messages again once the budget has refilled.
#[tokio::test]
async fn a_big_room_takes_messages_at_its_fan_out_budget() {
    let server = TestServer::start_with(|b| b.room_fanout_per_second = Some(2)).await;
    let budget0 = refusals(&server, "room_fanout").await;
    let mut a = server.connect("1").await;
    for u in ["2", "3", "4"] {
        server.connect(u).await.ok("ping", json!({})).await;
    }
    // Four members: a message costs 4 deliveries, the bucket holds 4 and refills 2 per second.
    let room = group(&mut a, "big", &["2", "3", "4"]).await;
    let direct = a.ok("open_direct", json!({"user": "2"})).await["room"]["id"].clone();
    a.ok("send", json!({"room": room, "text": "first"})).await;
    let r = a
        .request("send", json!({"room": room, "text": "second"}))
        .await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    let why = r["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("fan-out budget") && why.contains("4 members") && why.contains("0.50"),
        "{why}"
    );
    // Another room of the same sender: its own budget (two members, 2 per second: one now).
    a.ok("send", json!({"room": direct, "text": "elsewhere"}))
        .await;
    // Counted as the room's budget (the tests of this file run in parallel and share the
    // recorder, so only this test's own label is asserted).
    assert_eq!(refusals(&server, "room_fanout").await - budget0, 1.0);
    // Refilled after 2 s: the room takes a message again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    a.ok("send", json!({"room": room, "text": "third"})).await;
    let h = a.ok("history", json!({"room": room})).await;
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["third", "first"], "the refused send was not stored");
    server.shutdown().await;
}

/// The kernel's send buffer (`tb` of `ss -tm`, as Linux counts it) of the server's end of each
/// connection to `server`, by the client's port.
fn server_send_buffers(server: SocketAddr) -> std::collections::HashMap<u16, u64> {
    let out = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .arg(format!("sport = :{}", server.port()))
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // A connection is a line with its addresses, then (indented) one with its `skmem:(...)`.
    let mut found = std::collections::HashMap::new();
    let mut peer = None;
    for line in text.lines() {
        if let Some(mem) = line.split("skmem:(").nth(1) {
            let tb = mem
                .split(',')
                .find_map(|f| f.strip_prefix("tb"))
                .and_then(|v| v.trim_end_matches(')').parse().ok());
            if let (Some(p), Some(tb)) = (peer.take(), tb) {
                found.insert(p, tb);
            }
        } else if let Some(addr) = line.split_whitespace().nth(3) {
            peer = addr.rsplit(':').next().and_then(|p| p.parse().ok());
        }
    }
    found
}

fn client_port(ws: &Ws) -> u16 {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap().port(),
        _ => unreachable!("loopback is plain TCP"),
    }
}

#[tokio::test]
async fn every_websocket_gets_the_bounded_send_buffer_and_plain_http_does_not() {
    let s = TestServer::start_with(|b| b.ws_send_buffer = Some(64 * 1024)).await;
    // Linux doubles the value for its bookkeeping (below `net.core.wmem_max`).
    let bounded = 2 * 64 * 1024;
    let t = token("7");
    let routes = [
        ("native", format!("/ws?token={t}")),
        ("phoenix", format!("/socket/websocket?vsn=2.0.0&token={t}")),
        ("rt-chat", "/rt/chat".to_owned()),
        ("rt-presence", "/rt/presence".to_owned()),
        ("events", format!("/events?token={t}")),
        (
            "socket.io",
            "/socket.io/?EIO=4&transport=websocket".to_owned(),
        ),
    ];
    let mut open = Vec::new();
    for (name, path) in &routes {
        let (ws, _) = tokio_tungstenite::connect_async(s.url(path))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        open.push((*name, client_port(&ws), ws));
    }
    // A keep-alive HTTP connection that has been answered and stays open.
    let mut plain = TcpStream::connect(s.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: palaver\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let plain_port = plain.local_addr().unwrap().port();

    let buffers = server_send_buffers(s.addr);
    for (name, port, _) in &open {
        assert_eq!(buffers.get(port), Some(&bounded), "{name}: {buffers:?}");
    }
    let autotuned = buffers
        .get(&plain_port)
        .expect("the HTTP connection is listed");
    assert_ne!(
        *autotuned, bounded,
        "plain HTTP keeps the kernel's autotuning"
    );
    drop(open);
    s.shutdown().await;
}

/// The keepalive. Sessions opened together get their first ping at different points of the
/// interval, so that a reconnect storm does not ping (and close its silent sessions) in step for
/// the rest of its life; a client that reads (and so answers pings) stays, and one that reads
/// nothing is closed after two intervals or three.
#[tokio::test]
async fn keepalive_pings_are_spread_and_a_silent_session_is_closed() {
    let server = TestServer::start_with(|b| b.ping_interval_secs = Some(1)).await;
    let opened = Instant::now();
    let mut readers = Vec::new();
    for i in 0..12 {
        readers.push(server.connect(&format!("ka{i}")).await.ws);
    }
    let silent = server.connect("ka-silent").await.ws;
    let connected = opened.elapsed();
    until("13 sessions", || server.sessions() == 13).await;
    let firsts = futures::future::join_all(readers.iter_mut().map(|ws| async move {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => return opened.elapsed(),
                Ok(Some(Ok(_))) => {}
                other => panic!("no ping: {other:?}"),
            }
        }
    }))
    .await;
    let spread =
        firsts.iter().max().unwrap().as_secs_f64() - firsts.iter().min().unwrap().as_secs_f64();
    assert!(
        spread >= 0.3,
        "12 sessions opened within {connected:?} got their first ping within {spread:.3} s: {firsts:?}"
    );
    // The readers go on reading (answering pings); the silent one is closed.
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Close(f) = m {
                        return Some(f);
                    }
                }
                None
            })
        })
        .collect();
    until("the silent session closed", || server.sessions() == 12).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        server.sessions(),
        12,
        "a session that answers pings was closed"
    );
    for r in &reading {
        assert!(!r.is_finished(), "a reader's session ended");
    }
    drop(silent);
    for r in reading {
        r.abort();
    }
}
