//! Push notifications end to end: a real Palaver, a fake FCM server (OAuth2 token endpoint and
//! HTTP v1 send endpoint) and a webhook receiver, both real HTTP servers on loopback that
//! record every request and answer from a script.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../node/tests/support/kafka.rs"]
mod kafka;
#[path = "../../node/tests/support/pg.rs"]
mod pg;
mod cluster {
    pub mod sandbox;
}

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{TestServer, WAIT};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use palaver_gateway::push::FailReason;
use palaver_gateway::push::webhook::signature;
use schema::{Platform, UserId};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PROJECT: &str = "demo-project";
const EMAIL: &str = "push@demo-project.iam.gserviceaccount.com";
const HOOK_SECRET: &str = "webhook-secret-0123456789";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// One request the fake saw.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// The device token a send was for (FCM or webhook body).
    fn device(&self) -> String {
        let v = self.json();
        v["message"]["token"]
            .as_str()
            .or(v["device"]["token"].as_str())
            .unwrap_or("")
            .to_owned()
    }
}

/// A canned answer.
#[derive(Clone, Debug)]
struct Canned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Canned {
    fn new(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn with_header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.into()));
        self
    }
}

#[derive(Default)]
struct FakeState {
    seen: parking_lot::Mutex<Vec<Seen>>,
    /// Per device token: answers to give in order, then `always` (if set), then 200.
    script: parking_lot::Mutex<HashMap<String, VecDeque<Canned>>>,
    always: parking_lot::Mutex<HashMap<String, Canned>>,
    token_calls: AtomicU32,
}

/// A fake FCM (`POST /token`, `POST /v1/projects/{p}/messages:send`) that is also a webhook
/// receiver (any other path): records everything, answers from the script.
struct Fake {
    addr: SocketAddr,
    state: Arc<FakeState>,
}

async fn fake_handler(
    axum::extract::State(state): axum::extract::State<Arc<FakeState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method,
        path: uri.path().to_owned(),
        headers,
        body,
        at: Instant::now(),
    };
    state.seen.lock().push(seen.clone());
    if seen.path == "/token" {
        let n = state.token_calls.fetch_add(1, Ordering::SeqCst) + 1;
        return axum::Json(json!({
            "access_token": format!("at-{n}"),
            "expires_in": 3600,
            "token_type": "Bearer",
        }))
        .into_response();
    }
    let device = seen.device();
    let canned = state
        .script
        .lock()
        .get_mut(&device)
        .and_then(VecDeque::pop_front)
        .or_else(|| state.always.lock().get(&device).cloned());
    match canned {
        Some(c) => {
            let mut resp = (StatusCode::from_u16(c.status).unwrap(), c.body).into_response();
            for (k, v) in c.headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        }
        None => {
            axum::Json(json!({"name": format!("projects/{PROJECT}/messages/1")})).into_response()
        }
    }
}

impl Fake {
    async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        let app = axum::Router::new()
            .fallback(fake_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn script(&self, device: &str, answers: Vec<Canned>) {
        self.state
            .script
            .lock()
            .insert(device.into(), answers.into_iter().collect());
    }

    fn always(&self, device: &str, answer: Canned) {
        self.state.always.lock().insert(device.into(), answer);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    /// The sends (not token requests) seen so far.
    fn sends(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path != "/token")
            .collect()
    }

    fn sends_to(&self, device: &str) -> Vec<Seen> {
        self.sends()
            .into_iter()
            .filter(|s| s.device() == device)
            .collect()
    }

    fn token_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path == "/token")
            .collect()
    }

    /// Writes a service-account key whose `token_uri` is this fake; returns its path.
    fn service_account(&self, dir: &Path) -> String {
        let path = dir.join("service-account.json");
        let key = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "kid-1",
            "private_key": fixture("rsa_private.pem"),
            "client_email": EMAIL,
            "client_id": "1234567890",
            "token_uri": self.url("/token"),
        });
        std::fs::write(&path, key.to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

/// Polls `f` until it holds (bounded by [`WAIT`]).
async fn until(what: &str, f: impl FnMut() -> bool) {
    until_within(WAIT, what, f).await;
}

/// Polls `f` until it holds, for at most `limit`.
async fn until_within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Palaver whose FCM is `fake` (and whose webhook is `fake` too when `webhook`).
async fn server_with(fake: &Fake, fcm: bool, webhook: bool) -> (TestServer, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let credentials = fake.service_account(keys.path());
    let endpoint = fake.url("");
    let hook = fake.url("/hooks/push");
    let server = TestServer::start_with(|b| {
        if fcm {
            b.push_fcm_credentials = Some(credentials.into());
            b.push_fcm_endpoint = Some(endpoint);
        }
        if webhook {
            b.push_webhook_url = Some(hook);
            b.push_webhook_secret = Some(HOOK_SECRET.into());
        }
        b.push_max_attempts = Some(3);
        b.push_retry_base_ms = Some(20);
        b.push_retry_max_ms = Some(5000);
    })
    .await;
    (server, keys)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Registers a device of `user` through `POST /v1/devices`.
async fn register(
    server: &TestServer,
    user: &str,
    platform: &str,
    token: &str,
    device: Option<&str>,
) {
    let mut body = json!({"platform": platform, "token": token});
    if let Some(d) = device {
        body["device_id"] = json!(d);
    }
    let resp = http()
        .post(server.http("/v1/devices"))
        .bearer_auth(server.token(user))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
}

/// Makes `user` known to the store (a native connect, then gone).
async fn known(server: &TestServer, user: &str) {
    let mut c = server.connect(user).await;
    c.ok("ping", json!({})).await;
}

fn store(server: &TestServer) -> Arc<dyn node::store::Store> {
    server.palaver.as_ref().unwrap().store().unwrap().clone()
}

fn metrics(server: &TestServer) -> Arc<palaver_gateway::push::PushMetrics> {
    server.palaver.as_ref().unwrap().app().push_metrics.clone()
}

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// Records an upload of `user` at `path` (as the upload routes do once a file is stored), so
/// that a message may post it.
async fn uploaded(server: &TestServer, user: &str, path: &str, kind: &str, content_type: &str) {
    let upload = schema::Upload {
        path: path.into(),
        uploader: uid(user),
        kind: kind.into(),
        size: 1234,
        content_type: content_type.into(),
        created_at: 1,
    };
    let app = server.palaver.as_ref().unwrap().app();
    app.node
        .execute(&uid(user), schema::Command::AddUpload { upload })
        .await
        .unwrap();
}

/// The exact request to FCM: OAuth2 assertion, path, Bearer, body with the collapse key and
/// texts in the recipient's language (set by the Phoenix dialect); the access token is cached
/// across pushes.
#[tokio::test]
async fn fcm_requests_are_exact_localised_and_share_one_access_token() {
    let fake = Fake::start().await;
    let (server, _keys) = server_with(&fake, true, false).await;

    // Ana speaks Brazilian Portuguese (Phoenix `preferred_language`), then goes offline.
    let url = format!(
        "{}?vsn=2.0.0&token={}&preferred_language=pt-BR&device_unique_id=phone-1",
        server.url("/socket/websocket"),
        server.token("1")
    );
    let (mut phx, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    phx.close(None).await.unwrap();
    let ana = store(&server).user(&uid("1")).await.unwrap().unwrap();
    assert_eq!(ana.profile.language.as_deref(), Some("pt-BR"));
    register(&server, "1", "fcm", "fcm-token-ana", Some("phone-1")).await;

    let mut bob = server.connect("2").await;
    let room = bob.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let sent = bob
        .ok("send", json!({"room": room, "text": "olá Ana"}))
        .await;
    let id = sent["message"]["id"].as_u64().unwrap();
    until("the first push", || fake.sends().len() == 1).await;

    // The OAuth2 token request.
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1);
    let t = &tokens[0];
    assert_eq!(t.method, Method::POST);
    assert_eq!(
        t.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&t.body).unwrap();
    assert_eq!(form.len(), 2, "{form:?}");
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[fake.url("/token")]);
    v.set_issuer(&[EMAIL]);
    let key = DecodingKey::from_rsa_pem(fixture("rsa_public.pem").as_bytes()).unwrap();
    let jwt = jsonwebtoken::decode::<Value>(&form["assertion"], &key, &v).unwrap();
    assert_eq!(jwt.header.alg, Algorithm::RS256);
    assert_eq!(jwt.header.kid.as_deref(), Some("kid-1"));
    let c = jwt.claims;
    assert_eq!(c["iss"], EMAIL);
    assert_eq!(
        c["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(c["aud"], fake.url("/token"));
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        3600
    );

    // The send.
    let s = &fake.sends()[0];
    assert_eq!(s.method, Method::POST);
    assert_eq!(s.path, format!("/v1/projects/{PROJECT}/messages:send"));
    assert_eq!(s.header("authorization"), "Bearer at-1");
    assert_eq!(s.header("content-type"), "application/json");
    let collapse = format!("room-{room}");
    assert_eq!(
        s.json(),
        json!({"message": {
            "token": "fcm-token-ana",
            "notification": {"title": "User 2", "body": "olá Ana"},
            "data": {
                "room_id": room.to_string(),
                "message_id": id.to_string(),
                "sender_id": "2",
                "kind": "text",
            },
            "android": {"collapse_key": collapse, "priority": "high", "notification": {"tag": collapse}},
            "apns": {"headers": {"apns-collapse-id": collapse}},
        }})
    );

    // A photo: the fixed text in Portuguese; same collapse key; the access token is reused.
    uploaded(
        &server,
        "2",
        "/uploads/chat-messages/images/a.webp",
        "image",
        "image/webp",
    )
    .await;
    bob.ok(
        "send",
        json!({"room": room, "type": "image", "media": "/uploads/chat-messages/images/a.webp"}),
    )
    .await;
    until("the second push", || fake.sends().len() == 2).await;
    let p = fake.sends()[1].json();
    assert_eq!(
        p["message"]["notification"],
        json!({"title": "User 2", "body": "enviou uma foto"})
    );
    assert_eq!(p["message"]["data"]["kind"], "image");
    assert_eq!(p["message"]["android"]["collapse_key"], collapse);
    assert_eq!(fake.sends()[1].header("authorization"), "Bearer at-1");

    // A group: "<sender> em <group>".
    let group = bob
        .ok("create_group", json!({"name": "Família", "members": ["1"]}))
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    bob.ok("send", json!({"room": group, "text": "oi"})).await;
    until("the group push", || fake.sends().len() == 3).await;
    let g = fake.sends()[2].json();
    assert_eq!(
        g["message"]["notification"],
        json!({"title": "User 2 em Família", "body": "oi"})
    );
    assert_eq!(
        g["message"]["android"]["collapse_key"],
        format!("room-{group}")
    );

    assert_eq!(fake.token_requests().len(), 1, "the access token is cached");
    let m = metrics(&server);
    until("three jobs", || m.jobs_total() == 3).await;
    assert_eq!(m.sent_total(Platform::Fcm), 3);
    server.shutdown().await;
}

/// No push to a member viewing the room, none to one who muted it, never to the sender; one
/// per device for an offline member with two devices.
#[tokio::test]
async fn pushes_skip_viewers_muted_and_sender_and_reach_each_device_once() {
    let fake = Fake::start().await;
    let (server, _keys) = server_with(&fake, true, false).await;
    for u in ["1", "3", "4"] {
        known(&server, u).await;
    }
    let mut bob = server.connect("2").await;
    let room = bob
        .ok(
            "create_group",
            json!({"name": "team", "members": ["1", "3", "4"]}),
        )
        .await["room"]["id"]
        .as_u64()
        .unwrap();
    register(&server, "1", "fcm", "viewer-device", None).await;
    register(&server, "2", "fcm", "sender-device", None).await;
    register(&server, "3", "fcm", "offline-phone", Some("p")).await;
    register(&server, "3", "fcm", "offline-tablet", Some("t")).await;
    // Registering the same token again does not make a second device.
    register(&server, "3", "fcm", "offline-tablet", Some("t")).await;
    register(&server, "4", "fcm", "muted-device", None).await;

    // 1 views the room; 4 mutes it (REST).
    let mut viewer = server.connect("1").await;
    viewer
        .ok("view", json!({"room": room, "viewing": true}))
        .await;
    let resp = http()
        .put(server.http(&format!("/v1/rooms/{room}/mute")))
        .bearer_auth(server.token("4"))
        .json(&json!({"muted": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));

    let m = metrics(&server);
    bob.ok("send", json!({"room": room, "text": "one"})).await;
    until("the first job", || m.jobs_total() == 1).await;
    bob.ok("send", json!({"room": room, "text": "two"})).await;
    until("the second job", || m.jobs_total() == 2).await;
    let mut devices: Vec<String> = fake.sends().iter().map(Seen::device).collect();
    devices.sort();
    assert_eq!(
        devices,
        [
            "offline-phone",
            "offline-phone",
            "offline-tablet",
            "offline-tablet"
        ],
        "only the offline member's devices, once each per message"
    );
    assert_eq!(m.sent_total(Platform::Fcm), 4);

    // Unmuted (native op) and no longer viewing: both get the next one.
    let mut muted = server.connect("4").await;
    muted
        .ok("mute", json!({"room": room, "muted": false}))
        .await;
    viewer
        .ok("view", json!({"room": room, "viewing": false}))
        .await;
    bob.ok("send", json!({"room": room, "text": "three"})).await;
    until("pushes to everyone but the sender", || {
        fake.sends().len() == 8
    })
    .await;
    assert_eq!(fake.sends_to("viewer-device").len(), 1);
    assert_eq!(fake.sends_to("muted-device").len(), 1);
    assert!(fake.sends_to("sender-device").is_empty());
    server.shutdown().await;
}

/// 503 twice then 200: delivered once after two retries. 429 with `Retry-After: 1`: the retry
/// waits a second. Always 503: a dead letter after the configured attempts. A 400 about the
/// payload: a dead letter at once.
#[tokio::test]
async fn retries_back_off_honour_retry_after_and_end_in_dead_letters() {
    let fake = Fake::start().await;
    let (server, _keys) = server_with(&fake, true, false).await;
    known(&server, "1").await;
    let unavailable = || Canned::new(503, r#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#);
    fake.script("flaky", vec![unavailable(), unavailable()]);
    fake.script(
        "throttled",
        vec![
            Canned::new(
                429,
                r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#,
            )
            .with_header("retry-after", "1"),
        ],
    );
    fake.always("down", unavailable());
    fake.always(
        "refused",
        Canned::new(
            400,
            r#"{"error":{"code":400,"message":"Invalid JSON payload received.","status":"INVALID_ARGUMENT"}}"#,
        ),
    );
    for t in ["flaky", "throttled", "down", "refused"] {
        register(&server, "1", "fcm", t, None).await;
    }
    let mut bob = server.connect("2").await;
    let room = bob.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let msg = bob.ok("send", json!({"room": room, "text": "hello"})).await["message"]["id"]
        .as_u64()
        .unwrap();
    let m = metrics(&server);
    until("the job", || m.jobs_total() == 1).await;

    let flaky = fake.sends_to("flaky");
    assert_eq!(flaky.len(), 3, "503, 503, 200");
    let throttled = fake.sends_to("throttled");
    assert_eq!(throttled.len(), 2);
    let waited = throttled[1].at - throttled[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {waited:?}"
    );
    assert_eq!(
        fake.sends_to("down").len(),
        3,
        "PALAVER_PUSH_MAX_ATTEMPTS=3"
    );
    assert_eq!(fake.sends_to("refused").len(), 1, "a 400 is not retried");

    assert_eq!(m.sent_total(Platform::Fcm), 2);
    assert_eq!(m.retried_total(Platform::Fcm), 2 + 1 + 2);
    assert_eq!(m.failed_total("fcm", FailReason::RetriesExhausted), 1);
    assert_eq!(m.failed_total("fcm", FailReason::Rejected), 1);
    assert_eq!(m.dead_letters_total(), 2);

    let mut letters = store(&server).dead_letters(10).await.unwrap();
    letters.sort_by(|a, b| a.device_token.cmp(&b.device_token));
    assert_eq!(letters.len(), 2, "{letters:?}");
    let (down, refused) = (&letters[0], &letters[1]);
    assert_eq!(down.device_token.as_deref(), Some("down"));
    assert_eq!(down.provider, "fcm");
    assert_eq!(down.attempts, 3);
    assert!(
        down.reason.contains("gave up after 3 attempts") && down.reason.contains("503"),
        "{}",
        down.reason
    );
    assert_eq!(down.job.message.0, msg);
    assert_eq!(down.job.user.as_str(), "1");
    assert_eq!(refused.device_token.as_deref(), Some("refused"));
    assert_eq!(refused.attempts, 1);
    assert!(
        refused.reason.contains("400") && refused.reason.contains("Invalid JSON payload"),
        "{}",
        refused.reason
    );
    server.shutdown().await;
}

/// UNREGISTERED deletes the token (the next message sends nothing to it); a 401 refreshes the
/// access token once; `/metrics` shows the counters.
#[tokio::test]
async fn unregistered_tokens_are_deleted_and_counted() {
    let fake = Fake::start().await;
    let (server, _keys) = server_with(&fake, true, false).await;
    known(&server, "1").await;
    fake.always(
        "gone",
        Canned::new(
            404,
            r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
        ),
    );
    fake.script(
        "live",
        vec![Canned::new(
            401,
            r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#,
        )],
    );
    register(&server, "1", "fcm", "gone", None).await;
    register(&server, "1", "fcm", "live", None).await;
    let mut bob = server.connect("2").await;
    let room = bob.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let m = metrics(&server);
    bob.ok("send", json!({"room": room, "text": "first"})).await;
    until("the first job", || m.jobs_total() == 1).await;
    assert_eq!(fake.sends_to("gone").len(), 1, "not retried");
    let live = fake.sends_to("live");
    assert_eq!(live.len(), 2, "401, then again with a fresh access token");
    assert_eq!(live[0].header("authorization"), "Bearer at-1");
    assert_eq!(live[1].header("authorization"), "Bearer at-2");
    assert_eq!(fake.token_requests().len(), 2);
    let tokens: Vec<String> = store(&server)
        .devices_of(&uid("1"))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.token)
        .collect();
    assert_eq!(tokens, ["live"]);
    assert_eq!(m.dropped_tokens_total(), 1);
    assert_eq!(m.failed_total("fcm", FailReason::Unregistered), 1);

    bob.ok("send", json!({"room": room, "text": "second"}))
        .await;
    until("the second job", || m.jobs_total() == 2).await;
    assert_eq!(
        fake.sends_to("gone").len(),
        1,
        "nothing more to the deleted token"
    );
    assert_eq!(fake.sends_to("live").len(), 3);
    assert_eq!(m.dead_letters_total(), 0);

    let resp = http().get(server.http("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    for line in [
        "palaver_push_sent_total{provider=\"fcm\"} 2",
        "palaver_push_failed_total{provider=\"fcm\",reason=\"unregistered\"} 1",
        "palaver_push_retried_total{provider=\"fcm\"} 0",
        "palaver_push_dropped_tokens_total 1",
        "palaver_push_dead_letters_total 0",
        "# TYPE palaver_push_sent_total counter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    server.shutdown().await;
}

/// The webhook: the exact JSON body, a valid HMAC-SHA256 signature of it, a timestamp; 410
/// deletes the device; an FCM device gets nothing (and is counted) when FCM is not configured.
#[tokio::test]
async fn webhook_posts_signed_json() {
    let fake = Fake::start().await;
    let (server, _keys) = server_with(&fake, false, true).await;
    known(&server, "1").await;
    register(&server, "1", "webhook", "hook-device", Some("phone-7")).await;
    register(&server, "1", "webhook", "hook-gone", None).await;
    register(&server, "1", "fcm", "no-fcm-here", None).await;
    fake.always("hook-gone", Canned::new(410, "gone"));
    let mut bob = server.connect("2").await;
    let room = bob.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    uploaded(&server, "2", "/uploads/f/x.pdf", "file", "application/pdf").await;
    let msg = bob
        .ok("send", json!({"room": room, "type": "file", "media": "/uploads/f/x.pdf", "caption": "the plan"}))
        .await["message"]
        .clone();
    let m = metrics(&server);
    until("the job", || m.jobs_total() == 1).await;

    let hooks = fake.sends_to("hook-device");
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(h.method, Method::POST);
    assert_eq!(h.path, "/hooks/push");
    assert_eq!(h.header("content-type"), "application/json");
    assert_eq!(
        h.header("x-palaver-signature"),
        signature(HOOK_SECRET.as_bytes(), &h.body).unwrap()
    );
    assert!(h.header("x-palaver-signature").starts_with("sha256="));
    let ts: u64 = h.header("x-palaver-timestamp").parse().unwrap();
    assert!(ts.abs_diff(palaver_gateway::auth::now_secs()) < 60, "{ts}");
    assert_eq!(
        h.json(),
        json!({
            "user": "1",
            "device": {"token": "hook-device", "device_id": "phone-7"},
            "room": room,
            "message": msg["id"],
            "sender": "2",
            "title": "User 2",
            "body": "sent a file: the plan",
            "kind": "file",
            "collapse_key": format!("room-{room}"),
            "language": "en",
            "created_at": msg["created_at"],
        })
    );
    assert_eq!(fake.sends_to("hook-gone").len(), 1);
    assert!(fake.sends_to("no-fcm-here").is_empty());
    let tokens: Vec<String> = store(&server)
        .devices_of(&uid("1"))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.token)
        .collect();
    assert!(!tokens.contains(&"hook-gone".to_owned()), "{tokens:?}");
    assert_eq!(m.sent_total(Platform::Webhook), 1);
    assert_eq!(m.dropped_tokens_total(), 1);
    assert_eq!(m.failed_total("fcm", FailReason::NotConfigured), 1);
    server.shutdown().await;
}

/// The device and mute routes validate like the native decoder; a device is removed only by
/// its owner. Without a provider, `/metrics` still answers.
#[tokio::test]
async fn device_and_mute_routes() {
    let server = TestServer::start().await;
    let post = |user: &str, body: Value| {
        http()
            .post(server.http("/v1/devices"))
            .bearer_auth(server.token(user))
            .json(&body)
            .send()
    };
    let error = |v: Value| {
        (
            v["error"]["code"].as_str().unwrap().to_owned(),
            v["error"]["message"].as_str().unwrap().to_owned(),
        )
    };
    let r = post("1", json!({"platform": "apns", "token": "t"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (code, msg) = error(r.json().await.unwrap());
    assert_eq!(code, "invalid_field");
    assert!(msg.contains("unknown variant `apns`"), "{msg}");
    let r = post("1", json!({"platform": "fcm"})).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        error(r.json().await.unwrap())
            .1
            .contains("missing field `token`")
    );
    let r = post(
        "1",
        json!({"platform": "fcm", "token": "t", "colour": "red"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        error(r.json().await.unwrap())
            .1
            .contains("unknown field `colour`")
    );
    let r = http()
        .post(server.http("/v1/devices"))
        .json(&json!({"platform": "fcm", "token": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    register(&server, "1", "fcm", "tok/with:odd=chars", Some("dev-1")).await;
    let path = "/v1/devices/tok%2Fwith%3Aodd%3Dchars";
    let r = http()
        .delete(server.http(path))
        .bearer_auth(server.token("2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "not 2's device");
    assert_eq!(error(r.json().await.unwrap()).0, "not_found");
    let devices = store(&server).devices_of(&uid("1")).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].token, "tok/with:odd=chars");
    assert_eq!(devices[0].device_id.as_deref(), Some("dev-1"));
    assert_eq!(devices[0].platform, Platform::Fcm);
    let r = http()
        .delete(server.http(path))
        .bearer_auth(server.token("1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());
    assert!(
        store(&server)
            .devices_of(&uid("1"))
            .await
            .unwrap()
            .is_empty()
    );

    // Native ops.
    let mut c = server.connect("1").await;
    c.ok("add_device", json!({"platform": "webhook", "token": "w1"}))
        .await;
    let (code, _) = c.err("remove_device", json!({"token": "nope"})).await;
    assert_eq!(code, "not_found");
    c.ok("remove_device", json!({"token": "w1"})).await;

    // Mute: the body is checked; a non-member cannot mute.
    let r = http()
        .put(server.http("/v1/rooms/5/mute"))
        .bearer_auth(server.token("1"))
        .json(&json!({"muted": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http()
        .put(server.http("/v1/rooms/abc/mute"))
        .bearer_auth(server.token("1"))
        .json(&json!({"muted": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    known(&server, "2").await;
    let mut other = server.connect("2").await;
    let room = other.ok("create_group", json!({"name": "closed"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let (code, _) = c.err("mute", json!({"room": room, "muted": true})).await;
    assert!(code == "not_member" || code == "forbidden", "{code}");

    let r = http().get(server.http("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("palaver_push_sent_total{provider=\"fcm\"} 0\n"),
        "{text}"
    );
    server.shutdown().await;
}

/// `palaver push-worker` in a cluster: jobs published by a `palaver node` on Kafka
/// (`palaver.push`) are sent by the worker process, which reads the shared PostgreSQL store
/// and shows its counters on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_worker_process_sends_the_cluster_jobs() {
    use cluster::sandbox::{Sandbox, spawn};
    // Refused without Kafka, with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palaver"))
        .arg("push-worker")
        .env_clear()
        .env("PALAVER_HTTP_ADDR", "127.0.0.1:0")
        .env("PALAVER_JWT_SECRET", common::SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PALAVER_KAFKA_BROKERS is required for `palaver push-worker`"),
        "{err}"
    );

    let fake = Fake::start().await;
    let sandbox = Sandbox::start(1, 1, 1).await;
    let keys = tempfile::tempdir().unwrap();
    let mut env = sandbox.common_env();
    env.push((
        "PALAVER_PUSH_FCM_CREDENTIALS",
        fake.service_account(keys.path()),
    ));
    env.push(("PALAVER_PUSH_FCM_ENDPOINT", fake.url("")));
    env.push(("PALAVER_PUSH_RETRY_BASE_MS", "20".into()));
    let worker = spawn(&["push-worker"], env).await;

    let gateway = sandbox.gateways[0].as_ref().unwrap().http.clone();
    {
        let mut ann = sandbox.connect(0, "1").await;
        ann.ok("ping", json!({})).await;
    }
    let resp = http()
        .post(format!("http://{gateway}/v1/devices"))
        .bearer_auth(common::token("1"))
        .json(&json!({"platform": "fcm", "token": "cluster-device"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let mut bob = sandbox.connect(0, "2").await;
    let room = bob.ok("open_direct", json!({"user": "1"})).await["room"]["id"]
        .as_u64()
        .unwrap();
    let id = bob
        .ok("send", json!({"room": room, "text": "across the cluster"}))
        .await["message"]["id"]
        .as_u64()
        .unwrap();
    // Bounded by the consumer group's first join on the broker, which takes a few seconds.
    until_within(
        Duration::from_secs(60),
        "the push from the worker process",
        || !fake.sends_to("cluster-device").is_empty(),
    )
    .await;
    let s = &fake.sends_to("cluster-device")[0];
    assert_eq!(s.path, format!("/v1/projects/{PROJECT}/messages:send"));
    let body = s.json();
    assert_eq!(body["message"]["data"]["message_id"], id.to_string());
    assert_eq!(
        body["message"]["notification"]["body"],
        "across the cluster"
    );

    let deadline = Instant::now() + WAIT;
    loop {
        let text = http()
            .get(format!("http://{}/metrics", worker.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .lines()
            .any(|l| l == "palaver_push_sent_total{provider=\"fcm\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker metrics never showed the push:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.sends_to("cluster-device").len(), 1);
}
