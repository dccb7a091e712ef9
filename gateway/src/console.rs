//! The web console: `GET /console` and the admin JSON API it reads.
//!
//! Everything here is behind `PALAVER_ADMIN_TOKEN` (`Authorization: Bearer`, compared in
//! constant time). Without an admin token configured these routes answer 404 `not_found`, as if
//! they did not exist; with one, a missing or wrong token is a 401.
//!
//! | route | what |
//! |---|---|
//! | `GET /console` | one self-contained HTML page ([`PAGE`]): a login form, panels refreshed every 2 s from the overview, a test chat box |
//! | `GET /v1/admin/overview?limit=` | sessions by dialect, users online, this gateway, nodes and their ring shares, busiest rooms, recent errors |
//! | `POST /v1/admin/token` `{user, name?, ttl?}` | a short-lived HS256 JWT for `user` (the console's chat box) |
//!
//! What the overview shows is gathered cheaply, off the hot path where possible:
//!
//! - sessions by dialect and users online come from the hub when the overview is asked for;
//! - **busiest rooms**: [`Observed`] wraps the gateway's [`NodeApi`] and, for every accepted
//!   `send`, increments one counter of a small map (one short mutex hold, no await). Counts live in
//!   six 10-second buckets reused in turn, so "the last minute" is the last 50 to 60 seconds; each
//!   bucket tracks at most [`MAX_TRACKED_ROOMS`] rooms (sends to further rooms in that bucket are
//!   only counted as `untracked`);
//! - **recent errors**: the last [`RECENT_ERRORS`] refusals the gateway sent (a command the node
//!   refused, a request that could not be decoded, a refused token): time, dialect, operation,
//!   code, message and user. Never a token. The dialect is the one of the task that ran the command
//!   ([`scoped`]), else the dialect of the user's sessions on this gateway, else `http`;
//! - **ring shares**: the fraction of [`RING_SAMPLE`] sample keys each node owns, computed once
//!   per ring version (`serve`: one node, 1.0).

use crate::auth::{Claims, now_secs};
use crate::hub::Hub;
use crate::server::{App, error_response};
use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use node::api::NodeApi;
use node::cluster::Cluster;
use node::ring::{Ring, RingKey};
use node::user::{Connected, SessionInfo};
use parking_lot::Mutex;
use schema::{Command, Error, ErrorCode, GatewayId, Profile, Reply, RoomId, SessionId, UserId};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

/// The console page. `{{NONCE}}` is replaced per response by the CSP nonce of its script and
/// style.
pub const PAGE: &str = include_str!("console.html");

/// How many recent errors are kept.
pub const RECENT_ERRORS: usize = 100;
/// Rooms tracked per 10-second bucket of the busiest-rooms window.
pub const MAX_TRACKED_ROOMS: usize = 10_000;
/// Sample keys used to measure each node's share of the ring.
pub const RING_SAMPLE: u64 = 8192;
/// Longest lifetime of a token minted by `POST /v1/admin/token`, and its default.
pub const TOKEN_TTL_MAX_SECS: u64 = 3600;
/// Default lifetime of a token minted by `POST /v1/admin/token`.
pub const TOKEN_TTL_DEFAULT_SECS: u64 = 900;
/// Longest error message kept (longer ones are cut on a character boundary).
const MESSAGE_MAX: usize = 300;
/// Width of one bucket of the busiest-rooms window.
const BUCKET_SECS: u64 = 10;
/// Buckets in the busiest-rooms window (6 x 10 s: one minute).
const BUCKETS: usize = 6;
/// Default and largest `limit` of busiest rooms in the overview.
const BUSIEST_DEFAULT: usize = 10;
const BUSIEST_MAX: usize = 100;

tokio::task_local! {
    static DIALECT: &'static str;
}

/// Runs `f` with `dialect` as the dialect that refusals recorded inside it are attributed to.
///
/// Not an `async fn`: one would keep `f` twice in its state (once as its argument, once
/// inside the scope), and a session's future is most of an idle session's memory.
pub fn scoped<F: std::future::Future>(
    dialect: &'static str,
    f: F,
) -> tokio::task::futures::TaskLocalFuture<&'static str, F> {
    DIALECT.scope(dialect, f)
}

/// [`scoped`] for synchronous code.
pub fn sync_scoped<R>(dialect: &'static str, f: impl FnOnce() -> R) -> R {
    DIALECT.sync_scope(dialect, f)
}

/// The dialect set by [`scoped`] for the current task, if any.
pub fn current_dialect() -> Option<&'static str> {
    DIALECT.try_with(|d| *d).ok()
}

/// One refusal the gateway sent.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RecentError {
    /// When, Unix milliseconds.
    pub at: u64,
    /// The client's dialect (`native`, `rest`, `phoenix`, ..., `admin`, `http`).
    pub dialect: String,
    /// The operation, when known (`send`, `connect`, `auth`, ...).
    pub op: Option<String>,
    /// The error code.
    pub code: ErrorCode,
    /// The error message (at most 300 bytes).
    pub message: String,
    /// The user, when known.
    pub user: Option<String>,
}

/// Where the ring comes from: the local node (`serve`) or the cluster client (`gateway`).
pub enum RingSource {
    /// `palaver serve`: the node in this process.
    Local(Arc<node::Node>),
    /// `palaver gateway`: the cluster view.
    Cluster(Arc<Cluster>),
}

impl RingSource {
    fn ring(&self) -> Arc<Ring> {
        match self {
            RingSource::Local(n) => n.ring(),
            RingSource::Cluster(c) => c.ring(),
        }
    }
}

/// The busiest-rooms window: [`BUCKETS`] maps of counts, each for one 10-second step.
struct RoomWindow {
    /// `(step, counts)`: the step number (seconds since start / 10) the bucket holds, or
    /// `u64::MAX` for a bucket never used.
    buckets: [(u64, HashMap<RoomId, u32>); BUCKETS],
    /// Sends not counted per room because their bucket was full, per bucket.
    untracked: [(u64, u64); BUCKETS],
}

impl RoomWindow {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| (u64::MAX, HashMap::new())),
            untracked: [(u64::MAX, 0); BUCKETS],
        }
    }

    fn count(&mut self, room: RoomId, step: u64) {
        let i = (step % BUCKETS as u64) as usize;
        let (at, counts) = &mut self.buckets[i];
        if *at != step {
            *at = step;
            counts.clear();
        }
        if let Some(n) = counts.get_mut(&room) {
            *n = n.saturating_add(1);
        } else if counts.len() < MAX_TRACKED_ROOMS {
            counts.insert(room, 1);
        } else {
            let u = &mut self.untracked[i];
            if u.0 != step {
                *u = (step, 0);
            }
            u.1 += 1;
        }
    }

    /// The `limit` rooms with the most sends in the window ending at `step`, most first (ties:
    /// lower room id first), and the untracked count.
    fn busiest(&self, step: u64, limit: usize) -> (Vec<(RoomId, u64)>, u64) {
        let live = |at: u64| at != u64::MAX && at <= step && step - at < BUCKETS as u64;
        let mut sum: HashMap<RoomId, u64> = HashMap::new();
        for (at, counts) in &self.buckets {
            if live(*at) {
                for (room, n) in counts {
                    *sum.entry(*room).or_insert(0) += u64::from(*n);
                }
            }
        }
        let untracked = self
            .untracked
            .iter()
            .filter(|(at, _)| live(*at))
            .map(|(_, n)| n)
            .sum();
        let mut rooms: Vec<(RoomId, u64)> = sum.into_iter().collect();
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.0.cmp(&b.0.0)));
        rooms.truncate(limit);
        (rooms, untracked)
    }
}

/// One node's share of the ring.
#[derive(Clone, Debug, Serialize)]
struct NodeShare {
    id: String,
    share: f64,
}

/// What the console shows, gathered by the gateway.
pub struct Console {
    started: Instant,
    rooms: Mutex<RoomWindow>,
    errors: Mutex<VecDeque<RecentError>>,
    ring: OnceLock<RingSource>,
    hub: OnceLock<Weak<Hub>>,
    /// Ring shares of the last ring asked about.
    shares: Mutex<Option<SharesCache>>,
}

/// Ring shares computed for one ring (its version and node set).
struct SharesCache {
    version: u64,
    nodes: Vec<String>,
    shares: Vec<NodeShare>,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// An empty console.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            rooms: Mutex::new(RoomWindow::new()),
            errors: Mutex::new(VecDeque::with_capacity(RECENT_ERRORS)),
            ring: OnceLock::new(),
            hub: OnceLock::new(),
            shares: Mutex::new(None),
        }
    }

    /// Tells the console where the ring is (once, at start).
    pub fn set_ring(&self, source: RingSource) {
        if self.ring.set(source).is_err() {
            tracing::warn!("console ring source set twice; keeping the first");
        }
    }

    /// Tells the console the hub (once, at start), to name the dialect of a refused user.
    pub fn set_hub(&self, hub: &Arc<Hub>) {
        if self.hub.set(Arc::downgrade(hub)).is_err() {
            tracing::warn!("console hub set twice; keeping the first");
        }
    }

    fn step(&self) -> u64 {
        self.started.elapsed().as_secs() / BUCKET_SECS
    }

    /// Counts one accepted send in `room`.
    pub fn count_message(&self, room: RoomId) {
        let step = self.step();
        self.rooms.lock().count(room, step);
    }

    /// The busiest rooms of the last minute and the sends not tracked per room.
    pub fn busiest_rooms(&self, limit: usize) -> (Vec<(RoomId, u64)>, u64) {
        let step = self.step();
        self.rooms.lock().busiest(step, limit)
    }

    /// Records a refusal. `dialect: None` takes the task's ([`scoped`]), else the user's
    /// sessions' dialect, else `http`.
    pub fn record(
        &self,
        dialect: Option<&str>,
        op: Option<&str>,
        user: Option<&UserId>,
        e: &Error,
    ) {
        let dialect = match dialect.map(str::to_owned) {
            Some(d) => d,
            None if let Some(d) = current_dialect() => d.to_owned(),
            None => user
                .and_then(|u| {
                    self.hub
                        .get()
                        .and_then(Weak::upgrade)
                        .and_then(|h| h.dialect_of(u))
                })
                .unwrap_or_else(|| "http".to_owned()),
        };
        let mut message = e.message.clone();
        if message.len() > MESSAGE_MAX {
            let mut cut = MESSAGE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let entry = RecentError {
            at,
            dialect,
            op: op.map(str::to_owned),
            code: e.code,
            message,
            user: user.map(|u| u.as_str().to_owned()),
        };
        let mut errors = self.errors.lock();
        if errors.len() == RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(entry);
    }

    /// The recent errors, newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.errors.lock().iter().rev().cloned().collect()
    }

    /// The ring's version and each node's share (computed once per ring).
    fn ring_shares(&self) -> Option<(u64, Vec<NodeShare>)> {
        let ring = self.ring.get()?.ring();
        let nodes: Vec<String> = ring.nodes().iter().map(|n| n.as_str().to_owned()).collect();
        if let Some(c) = &*self.shares.lock()
            && c.version == ring.version()
            && c.nodes == nodes
        {
            return Some((c.version, c.shares.clone()));
        }
        let shares = shares_of(&ring);
        *self.shares.lock() = Some(SharesCache {
            version: ring.version(),
            nodes,
            shares: shares.clone(),
        });
        Some((ring.version(), shares))
    }
}

/// Each node's fraction of [`RING_SAMPLE`] sample room keys.
fn shares_of(ring: &Ring) -> Vec<NodeShare> {
    let mut owned: HashMap<&str, u64> = HashMap::new();
    for i in 0..RING_SAMPLE {
        if let Some(n) = ring.owner(&RingKey::Room(RoomId(i))) {
            *owned.entry(n.as_str()).or_insert(0) += 1;
        }
    }
    ring.nodes()
        .iter()
        .map(|n| NodeShare {
            id: n.as_str().to_owned(),
            share: owned.get(n.as_str()).copied().unwrap_or(0) as f64 / RING_SAMPLE as f64,
        })
        .collect()
}

/// The gateway's [`NodeApi`], observed for the console: counts accepted sends per room and
/// records refusals. Adds one boxed future per call and, per send, one short mutex hold.
pub struct Observed {
    inner: Arc<dyn NodeApi>,
    console: Arc<Console>,
}

impl Observed {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn NodeApi>, console: Arc<Console>) -> Self {
        Self { inner, console }
    }
}

#[async_trait]
impl NodeApi for Observed {
    async fn connect(&self, profile: Profile, session: SessionInfo) -> Result<Connected, Error> {
        let user = profile.id.clone();
        let dialect = session.dialect.clone();
        let r = self.inner.connect(profile, session).await;
        if let Err(e) = &r {
            self.console
                .record(Some(&dialect), Some("connect"), Some(&user), e);
        }
        r
    }

    async fn import_users(&self, users: Vec<Profile>) -> Result<usize, Error> {
        self.inner.import_users(users).await
    }

    async fn disconnect(&self, user: &UserId, gateway: &GatewayId, session: SessionId) {
        self.inner.disconnect(user, gateway, session).await
    }

    async fn execute(&self, caller: &UserId, cmd: Command) -> Result<Reply, Error> {
        let op = cmd.name();
        let room = match &cmd {
            Command::Send { room, .. } => Some(*room),
            _ => None,
        };
        let r = self.inner.execute(caller, cmd).await;
        match &r {
            Ok(Reply::Message { .. }) => {
                if let Some(room) = room {
                    self.console.count_message(room);
                }
            }
            Ok(_) => {}
            Err(e) => self.console.record(None, Some(op), Some(caller), e),
        }
        r
    }

    async fn subscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.inner.subscribe(gateway, rooms).await
    }

    async fn unsubscribe(&self, gateway: &GatewayId, rooms: Vec<RoomId>) {
        self.inner.unsubscribe(gateway, rooms).await
    }
}

/// The console's routes: `/console` and `/v1/admin/{overview,token}`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/console", get(page))
        .route("/v1/admin/overview", get(overview))
        .route("/v1/admin/token", post(token))
}

/// Equal in time independent of where `a` and `b` differ (the admin token is a password).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the admin bearer token: 404 when no admin token is configured, 401 without a valid
/// one (recorded as a recent error, without the token).
pub fn require_admin(app: &App, headers: &HeaderMap) -> Result<(), Error> {
    let Some(expected) = app.config.admin_token.as_deref() else {
        return Err(Error::new(
            ErrorCode::NotFound,
            "the admin API is disabled: set PALAVER_ADMIN_TOKEN",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let err = match given {
        None => Error::new(
            ErrorCode::Unauthorized,
            "missing admin token: send Authorization: Bearer <PALAVER_ADMIN_TOKEN>",
        ),
        Some(g) if constant_time_eq(g.trim().as_bytes(), expected.as_bytes()) => return Ok(()),
        Some(_) => Error::new(ErrorCode::Unauthorized, "wrong admin token"),
    };
    app.console.record(Some("admin"), Some("auth"), None, &err);
    Err(err)
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /console`: the page, with a fresh CSP nonce for its one script and one style.
async fn page(State(app): State<Arc<App>>) -> Response {
    if app.config.admin_token.is_none() {
        return no_store(
            (
                StatusCode::NOT_FOUND,
                "the web console is disabled: set PALAVER_ADMIN_TOKEN\n",
            )
                .into_response(),
        );
    }
    let nonce: [u8; 18] = rand::random();
    let nonce = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    let body = PAGE.replace("{{NONCE}}", &nonce);
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        body,
    )
        .into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    no_store(resp)
}

/// `GET /v1/admin/overview?limit=`: what the console's panels show.
async fn overview(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    if let Err(e) = require_admin(&app, &headers) {
        return no_store(error_response(&e));
    }
    let limit = match busiest_limit(q.as_deref()) {
        Ok(l) => l,
        Err(e) => return no_store(error_response(&e)),
    };
    let by_dialect = app.hub.dialect_counts();
    let total: usize = by_dialect.values().sum();
    let (rooms, untracked) = app.console.busiest_rooms(limit);
    let ring = match app.console.ring_shares() {
        Some((version, nodes)) => json!({
            "version": version,
            "vnodes_per_node": Ring::VNODES,
            "sampled_keys": RING_SAMPLE,
            "nodes": nodes,
        }),
        None => Value::Null,
    };
    let body = json!({
        "gateway": app.hub.gateway().as_str(),
        "sessions": { "total": total, "by_dialect": by_dialect },
        "users_online": app.hub.user_count(),
        "ring": ring,
        "busiest_rooms": {
            "window_secs": BUCKET_SECS * BUCKETS as u64,
            "rooms": rooms
                .iter()
                .map(|(r, n)| json!({ "room": r.0, "messages": n }))
                .collect::<Vec<_>>(),
            "untracked": untracked,
        },
        "recent_errors": app.console.recent_errors(),
    });
    no_store((StatusCode::OK, axum::Json(body)).into_response())
}

/// The `limit` query parameter of the overview: 1 to 100, default 10.
fn busiest_limit(q: Option<&str>) -> Result<usize, Error> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.unwrap_or_default())
        .map_err(|e| Error::invalid(format!("bad query string: {e}")))?;
    let mut limit = BUSIEST_DEFAULT;
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=BUSIEST_MAX).contains(n))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "limit must be an integer from 1 to {BUSIEST_MAX}, not {v:?}"
                        ))
                    })?;
            }
            other => {
                return Err(Error::invalid(format!(
                    "unknown query parameter {other:?}; only limit is accepted"
                )));
            }
        }
    }
    Ok(limit)
}

/// `POST /v1/admin/token` `{user, name?, ttl?}`: a short-lived token for `user`.
async fn token(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = require_admin(&app, &headers) {
        return no_store(error_response(&e));
    }
    match mint(&app, &body) {
        Ok(v) => no_store((StatusCode::OK, axum::Json(v)).into_response()),
        Err(e) => {
            app.console.record(Some("admin"), Some("token"), None, &e);
            no_store(error_response(&e))
        }
    }
}

fn mint(app: &App, body: &[u8]) -> Result<Value, Error> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TokenRequest {
        user: String,
        name: Option<String>,
        ttl: Option<u64>,
    }
    let req: TokenRequest = serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            ErrorCode::MalformedJson
        } else {
            ErrorCode::InvalidField
        };
        Error::new(
            code,
            format!("the body must be a JSON object {{user, name?, ttl?}}: {e}"),
        )
    })?;
    let user = UserId::parse(&req.user).map_err(|e| Error::invalid(format!("user: {e}")))?;
    let ttl = req.ttl.unwrap_or(TOKEN_TTL_DEFAULT_SECS);
    if !(1..=TOKEN_TTL_MAX_SECS).contains(&ttl) {
        return Err(Error::invalid(format!(
            "ttl must be from 1 to {TOKEN_TTL_MAX_SECS} seconds, not {ttl}"
        )));
    }
    if req.name.as_ref().is_some_and(|n| n.chars().count() > 100) {
        return Err(Error::invalid("name must be at most 100 characters"));
    }
    let exp = now_secs() + ttl;
    let claims = Claims {
        sub: user.as_str().to_owned(),
        exp,
        iat: Some(now_secs()),
        name: req.name,
        username: None,
        picture: None,
    };
    let token = app.auth.mint(&claims).map_err(|e| {
        Error::new(
            ErrorCode::Conflict,
            format!("this server cannot mint tokens: {e}"),
        )
    })?;
    Ok(json!({ "token": token, "user": user.as_str(), "exp": exp }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busiest_rooms_are_ordered_and_age_out_of_the_window() {
        let mut w = RoomWindow::new();
        for _ in 0..3 {
            w.count(RoomId(7), 0);
        }
        w.count(RoomId(9), 0);
        for _ in 0..2 {
            w.count(RoomId(5), 3);
        }
        let (rooms, untracked) = w.busiest(3, 10);
        assert_eq!(rooms, vec![(RoomId(7), 3), (RoomId(5), 2), (RoomId(9), 1)]);
        assert_eq!(untracked, 0);
        assert_eq!(w.busiest(3, 1).0, vec![(RoomId(7), 3)]);
        // Step 6 reuses step 0's bucket: room 7's sends are older than a minute.
        w.count(RoomId(9), 6);
        let (rooms, _) = w.busiest(6, 10);
        assert_eq!(rooms, vec![(RoomId(5), 2), (RoomId(9), 1)]);
        assert_eq!(w.busiest(9, 10).0, vec![(RoomId(9), 1)]);
        // A minute after the last send, nothing.
        assert!(w.busiest(12, 10).0.is_empty());
    }

    #[test]
    fn a_bucket_tracks_a_bounded_number_of_rooms() {
        let mut w = RoomWindow::new();
        for r in 0..(MAX_TRACKED_ROOMS as u64 + 5) {
            w.count(RoomId(r), 1);
        }
        w.count(RoomId(0), 1);
        let (rooms, untracked) = w.busiest(1, 1);
        assert_eq!(rooms, vec![(RoomId(0), 2)]);
        assert_eq!(untracked, 5);
        assert_eq!(w.buckets[1].1.len(), MAX_TRACKED_ROOMS);
    }

    #[test]
    fn recent_errors_are_bounded_newest_first_and_cut() {
        let c = Console::new();
        let user = UserId::parse("42").expect("uid");
        for i in 0..(RECENT_ERRORS + 3) {
            c.record(
                Some("native"),
                Some("send"),
                Some(&user),
                &Error::invalid(format!("e{i}")),
            );
        }
        let errors = c.recent_errors();
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert_eq!(errors[0].message, format!("e{}", RECENT_ERRORS + 2));
        assert_eq!(errors[RECENT_ERRORS - 1].message, "e3");
        c.record(None, None, None, &Error::invalid("é".repeat(400)));
        let e = &c.recent_errors()[0];
        assert_eq!(e.dialect, "http");
        assert!(e.message.len() <= MESSAGE_MAX + '…'.len_utf8());
    }

    #[test]
    fn ring_shares_sum_to_one() {
        let one = shares_of(&Ring::new(1, [schema::NodeId::new("local")]));
        assert_eq!(one.len(), 1);
        assert!((one[0].share - 1.0).abs() < f64::EPSILON);
        let three = shares_of(&Ring::new(2, ["a", "b", "c"].map(schema::NodeId::new)));
        let total: f64 = three.iter().map(|s| s.share).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(three.iter().all(|s| (0.25..0.42).contains(&s.share)));
    }

    #[tokio::test]
    async fn the_task_dialect_names_recorded_errors() {
        let c = Console::new();
        scoped("rest", async {
            assert_eq!(current_dialect(), Some("rest"));
            c.record(None, Some("send"), None, &Error::invalid("x"));
        })
        .await;
        assert_eq!(current_dialect(), None);
        assert_eq!(c.recent_errors()[0].dialect, "rest");
    }
}
