//! Test support: a real Palaver on a loopback port with a temp data dir, and a real WebSocket
//! client speaking the native protocol. Every wait has a deadline; nothing sleeps blindly.
#![allow(dead_code, clippy::unwrap_used)]

pub mod node_suite;

use futures::{SinkExt, StreamExt};
use palaver_gateway::Palaver;
use palaver_gateway::auth::{Auth, Claims, now_secs};
use palaver_gateway::config::{Config, ConfigBuilder, JwtKey};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub palaver: Option<Palaver>,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub auth: Auth,
}

pub fn builder(dir: &std::path::Path) -> ConfigBuilder {
    ConfigBuilder {
        http_addr: Some("127.0.0.1:0".into()),
        data_dir: Some(dir.to_owned()),
        jwt_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ConfigBuilder)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut b = builder(dir.path());
        f(&mut b);
        let config: Config = b.build().unwrap();
        let palaver = Palaver::start(config).await.unwrap();
        let addr = palaver.addr();
        Self {
            palaver: Some(palaver),
            addr,
            dir,
            auth: auth(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, sub: &str) -> String {
        token(sub)
    }

    /// Connects as `sub` (token in the query string).
    pub async fn connect(&self, sub: &str) -> Client {
        Client::connect(&format!("{}?token={}", self.url("/ws"), token(sub))).await
    }

    pub fn sessions(&self) -> usize {
        self.palaver.as_ref().map_or(0, |p| p.app().hub.len())
    }

    pub async fn shutdown(mut self) {
        if let Some(p) = self.palaver.take() {
            p.shutdown().await.unwrap();
        }
    }
}

pub fn auth() -> Auth {
    Auth::new(
        &JwtKey::Secret(SECRET.into()),
        std::path::Path::new("/nonexistent"),
    )
    .unwrap()
}

pub fn token(sub: &str) -> String {
    token_with(sub, now_secs() + 3600)
}

pub fn token_with(sub: &str, exp: u64) -> String {
    auth()
        .mint(&Claims {
            sub: sub.into(),
            exp,
            iat: None,
            name: Some(format!("User {sub}")),
            username: Some(format!("user{sub}")),
            picture: None,
        })
        .unwrap()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A native-protocol client that keeps events that arrive while it waits for a reply.
pub struct Client {
    pub ws: Ws,
    next: u64,
    pub events: VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(
            url.into_client_request().unwrap(),
            None,
            true,
        )
        .await
        .unwrap();
        Self {
            ws,
            next: 0,
            events: VecDeque::new(),
        }
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// The next JSON frame, with a deadline.
    pub async fn frame(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame within the deadline")
                .expect("connection ended")
                .expect("websocket error");
            match m {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next reply frame, keeping events that arrive first.
    pub async fn next_reply(&mut self) -> Value {
        loop {
            let f = self.frame().await;
            if f["type"] == "event" {
                self.events.push_back(f);
                continue;
            }
            return f;
        }
    }

    /// Sends a request and returns its reply (events that arrive first are kept).
    pub async fn request(&mut self, op: &str, args: Value) -> Value {
        self.next += 1;
        let id = format!("r{}", self.next);
        let mut req = args;
        req["id"] = json!(id);
        req["op"] = json!(op);
        self.send_text(req.to_string()).await;
        self.reply_to(&json!(id)).await
    }

    /// Waits for the reply with `id`.
    pub async fn reply_to(&mut self, id: &Value) -> Value {
        loop {
            let f = self.frame().await;
            if f["type"] == "event" {
                self.events.push_back(f);
                continue;
            }
            assert_eq!(f["type"], "reply", "{f}");
            assert_eq!(&f["id"], id, "{f}");
            return f;
        }
    }

    /// Sends a request that must succeed; returns its `data`.
    pub async fn ok(&mut self, op: &str, args: Value) -> Value {
        let r = self.request(op, args).await;
        assert_eq!(r["ok"], true, "{op} failed: {r}");
        r["data"].clone()
    }

    /// Sends a request that must fail; returns `(code, message)`.
    pub async fn err(&mut self, op: &str, args: Value) -> (String, String) {
        let r = self.request(op, args).await;
        assert_eq!(r["ok"], false, "{op} should fail: {r}");
        (
            r["error"]["code"].as_str().unwrap().to_owned(),
            r["error"]["message"].as_str().unwrap().to_owned(),
        )
    }

    /// The next event (kept or new), with a deadline.
    pub async fn event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let f = self.frame().await;
        assert_eq!(f["type"], "event", "{f}");
        f
    }

    /// The next event named `name`, skipping others.
    pub async fn event_named(&mut self, name: &str) -> Value {
        loop {
            let e = self.event().await;
            if e["event"] == name {
                return e;
            }
        }
    }

    /// Asserts that no event arrives within `d`.
    pub async fn no_event_within(&mut self, d: Duration) {
        assert!(
            self.events.is_empty(),
            "unexpected events {:?}",
            self.events
        );
        match tokio::time::timeout(d, self.ws.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("unexpected frame {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no close in time")
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return Some((f.code.into(), f.reason.to_string()));
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// A group of `members` created by `owner`; returns the room id.
pub async fn group(owner: &mut Client, name: &str, members: &[&str]) -> u64 {
    let d = owner
        .ok("create_group", json!({"name": name, "members": members}))
        .await;
    d["room"]["id"].as_u64().unwrap()
}
