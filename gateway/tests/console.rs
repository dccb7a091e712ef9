//! The web console (`GET /console`) and its admin API (`/v1/admin/overview`,
//! `/v1/admin/token`), against a real server: HTTP with reqwest, native clients over WebSocket,
//! and the page itself in headless Chromium (`gateway/tests/console/console.test.mjs`, Debian's
//! `/usr/bin/chromium` driven by npm `playwright-core`).
#![allow(clippy::unwrap_used)]

mod common;

use common::node_suite::run_node_suite;
use common::*;
use serde_json::{Value, json};

const ADMIN: &str = "console-admin-token-0123456789";

async fn with_admin() -> TestServer {
    TestServer::start_with(|b| b.admin_token = Some(ADMIN.into())).await
}

/// `method path` with an optional bearer token and JSON body; answers (status, headers, JSON
/// or text body).
async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(method, s.http(path));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = tokio::time::timeout(WAIT, req.send())
        .await
        .expect("no answer in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

async fn overview(s: &TestServer) -> Value {
    let (st, _, body) = call(
        s,
        reqwest::Method::GET,
        "/v1/admin/overview",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    body
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_token() {
    let s = with_admin().await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    for (method, path) in [(&get, "/v1/admin/overview"), (&post, "/v1/admin/token")] {
        let body = Some(r#"{"user":"5"}"#);
        let (st, h, b) = call(&s, method.clone(), path, None, body).await;
        assert_eq!(st, 401, "{path} without a token: {b}");
        assert_eq!(b["error"]["code"], "unauthorized");
        assert_eq!(
            b["error"]["message"].as_str().unwrap(),
            "missing admin token: send Authorization: Bearer <PALAVER_ADMIN_TOKEN>"
        );
        assert_eq!(h["www-authenticate"], "Bearer");
        let wrong = "console-admin-token-0123456780";
        let (st, _, b) = call(&s, method.clone(), path, Some(wrong), body).await;
        assert_eq!(st, 401, "{path} with a wrong token: {b}");
        assert_eq!(b["error"]["message"], "wrong admin token");
        // A user's JWT is not an admin token.
        let (st, _, _) = call(&s, method.clone(), path, Some(&token("5")), body).await;
        assert_eq!(st, 401);
    }
    // The refusals are recent errors, and no token is shown anywhere.
    let o = overview(&s).await;
    let errors = o["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 6, "{o:#}");
    assert!(
        errors
            .iter()
            .all(|e| e["dialect"] == "admin" && e["op"] == "auth")
    );
    assert_eq!(errors[0]["code"], "unauthorized");
    let text = o.to_string();
    assert!(!text.contains("0123456780") && !text.contains(ADMIN));
    assert!(!text.contains(&token("5")[..20]));
    s.shutdown().await;
}

#[tokio::test]
async fn without_an_admin_token_the_console_does_not_exist() {
    let s = TestServer::start().await;
    for path in ["/v1/admin/overview", "/console"] {
        let (st, _, b) = call(&s, reqwest::Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(st, 404, "{path}: {b}");
    }
    let (st, _, b) = call(&s, reqwest::Method::GET, "/v1/admin/overview", None, None).await;
    assert_eq!(st, 404);
    assert_eq!(
        b["error"]["message"],
        "the admin API is disabled: set PALAVER_ADMIN_TOKEN"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn the_overview_shows_sessions_nodes_rooms_and_errors() {
    let s = with_admin().await;
    let o = overview(&s).await;
    assert_eq!(o["sessions"], json!({"total": 0, "by_dialect": {}}));
    assert_eq!(o["users_online"], 0);
    assert_eq!(
        o["gateway"],
        s.palaver.as_ref().unwrap().app().hub.gateway().as_str()
    );
    // `serve`: one node owning the whole ring.
    let ring = &o["ring"];
    assert_eq!(ring["version"], 1, "{o:#}");
    assert_eq!(ring["vnodes_per_node"], 1024);
    assert_eq!(ring["nodes"], json!([{"id": "local", "share": 1.0}]));
    assert_eq!(
        o["busiest_rooms"],
        json!({"window_secs": 60, "rooms": [], "untracked": 0})
    );
    assert_eq!(o["recent_errors"], json!([]));

    let mut a = s.connect("11").await;
    let mut a2 = s.connect("11").await;
    let _b = s.connect("12").await;
    let o = overview(&s).await;
    assert_eq!(
        o["sessions"],
        json!({"total": 3, "by_dialect": {"native": 3}})
    );
    assert_eq!(o["users_online"], 2);

    // Busiest rooms: 3 sends in one room, 1 in another (one of them over REST), most first.
    let quiet = group(&mut a, "quiet", &["12"]).await;
    let busy = group(&mut a, "busy", &["12"]).await;
    a.ok("send", json!({"room": quiet, "text": "q1"})).await;
    for i in 0..2 {
        a2.ok("send", json!({"room": busy, "text": format!("b{i}")}))
            .await;
    }
    let (st, _, b) = call(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{busy}/messages"),
        Some(&token("12")),
        Some(r#"{"text":"b2"}"#),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    let o = overview(&s).await;
    assert_eq!(
        o["busiest_rooms"]["rooms"],
        json!([{"room": busy, "messages": 3}, {"room": quiet, "messages": 1}])
    );
    let (st, _, o1) = call(
        &s,
        reqwest::Method::GET,
        "/v1/admin/overview?limit=1",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        o1["busiest_rooms"]["rooms"],
        json!([{"room": busy, "messages": 3}])
    );
    for bad in ["limit=0", "limit=101", "limit=x", "top=3"] {
        let (st, _, b) = call(
            &s,
            reqwest::Method::GET,
            &format!("/v1/admin/overview?{bad}"),
            Some(ADMIN),
            None,
        )
        .await;
        assert_eq!(st, 400, "{bad}: {b}");
        assert_eq!(b["error"]["code"], "invalid_field");
    }

    // Refusals: a native send to a room the user is not in, an unreadable frame, a REST send
    // with no text, a bad token on /ws.
    let mut c = s.connect("13").await;
    let (code, msg) = c
        .err("send", json!({"room": busy, "text": "let me in"}))
        .await;
    assert_eq!(code, "not_member");
    c.send_text("{not json".into()).await;
    let r = c.next_reply().await;
    assert_eq!(r["error"]["code"], "malformed_json");
    let (st, _, _) = call(
        &s,
        reqwest::Method::POST,
        &format!("/v1/rooms/{busy}/messages"),
        Some(&token("12")),
        Some(r#"{}"#),
    )
    .await;
    assert_eq!(st, 400);
    let bad_ws = tokio_tungstenite::connect_async(format!("{}?token=nonsense", s.url("/ws"))).await;
    assert!(bad_ws.is_err());

    let o = overview(&s).await;
    let errors = o["recent_errors"].as_array().unwrap();
    let find = |pred: &dyn Fn(&Value) -> bool| {
        errors
            .iter()
            .find(|e| pred(e))
            .unwrap_or_else(|| panic!("not in {errors:#?}"))
            .clone()
    };
    let e = find(&|e| e["code"] == "not_member");
    assert_eq!(e["dialect"], "native");
    assert_eq!(e["op"], "send");
    assert_eq!(e["user"], "13");
    assert_eq!(e["message"], msg);
    assert!(e["at"].as_u64().unwrap() > 1_700_000_000_000);
    let e = find(&|e| e["code"] == "malformed_json");
    assert_eq!(
        (&e["dialect"], &e["user"]),
        (&json!("native"), &json!("13"))
    );
    let e = find(&|e| e["dialect"] == "rest");
    assert_eq!(e["code"], "invalid_field");
    assert_eq!(e["op"], "send");
    assert_eq!(e["user"], "12");
    let e = find(&|e| e["code"] == "unauthorized");
    assert_eq!(e["dialect"], "native");
    assert_eq!(e["op"], "auth");
    assert_eq!(e["user"], Value::Null);
    assert!(
        !o.to_string().contains("nonsense"),
        "the token is never shown"
    );
    // Newest first.
    assert_eq!(errors[0]["code"], "unauthorized");
    drop((a, a2, c));
    s.shutdown().await;
}

#[tokio::test]
async fn the_admin_mints_a_short_lived_token_for_the_chat_box() {
    let s = with_admin().await;
    let post = reqwest::Method::POST;
    let (st, h, b) = call(
        &s,
        post.clone(),
        "/v1/admin/token",
        Some(ADMIN),
        Some(r#"{"user":"21","name":"Console"}"#),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(b["user"], "21");
    let exp = b["exp"].as_u64().unwrap();
    let now = palaver_gateway::auth::now_secs();
    assert!(
        (now + 890..=now + 900).contains(&exp),
        "15 minutes by default"
    );
    let t = b["token"].as_str().unwrap();
    let p = auth().verify(t).unwrap();
    assert_eq!((p.id.as_str(), p.name.as_deref()), ("21", Some("Console")));
    let mut c = Client::connect(&format!("{}?token={t}", s.url("/ws"))).await;
    c.ok("ping", json!({})).await;

    for (body, status, code) in [
        ("{", 400, "malformed_json"),
        ("[]", 400, "invalid_field"),
        (r#"{"name":"x"}"#, 400, "invalid_field"),
        (r#"{"user":"21","admin":true}"#, 400, "invalid_field"),
        (r#"{"user":""}"#, 400, "invalid_field"),
        (r#"{"user":"21","ttl":0}"#, 400, "invalid_field"),
        (r#"{"user":"21","ttl":3601}"#, 400, "invalid_field"),
    ] {
        let (st, _, b) = call(&s, post.clone(), "/v1/admin/token", Some(ADMIN), Some(body)).await;
        assert_eq!(
            (st, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {b}"
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn the_page_is_self_contained_and_locked_down() {
    let s = with_admin().await;
    let (st, h, body) = call(&s, reqwest::Method::GET, "/console", None, None).await;
    assert_eq!(st, 200);
    let html = body.as_str().unwrap();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'nonce-"),
        "{csp}"
    );
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap();
    assert!(nonce.len() >= 24);
    assert!(html.contains(&format!("<script nonce=\"{nonce}\">")));
    assert!(html.contains(&format!("<style nonce=\"{nonce}\">")));
    assert!(!html.contains("{{NONCE}}"));
    assert!(!html.contains("innerHTML"), "data is rendered as text only");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );
    // A fresh nonce per response.
    let (_, h2, _) = call(&s, reqwest::Method::GET, "/console", None, None).await;
    assert_ne!(h2["content-security-policy"], h["content-security-policy"]);
    s.shutdown().await;
}

/// The page in headless Chromium: log in (a wrong token first), see a native session appear,
/// chat as another user through the page's chat box into a group shared with a `ws` client,
/// which receives the message. Keeps a screenshot in `target/test-artifacts/console.png`.
#[tokio::test]
async fn the_console_in_a_headless_browser() {
    let s = with_admin().await;
    let artifacts =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&shot);
    run_node_suite(
        "console",
        &["playwright-core", "ws"],
        "console.test.mjs",
        &s,
        &[
            ("PALAVER_ADMIN_TOKEN", ADMIN.to_owned()),
            ("PALAVER_SCREENSHOT", shot.display().to_string()),
        ],
    )
    .await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    s.shutdown().await;
}
