//! The Socket.IO dialects: NotifyHub (namespace `/chats`, seed 000) and Syarah (namespace `/`,
//! seed 001), on the `socketioxide` engine mounted at `/socket.io/` (WebSocket and HTTP
//! long-polling, Socket.IO v4 clients).
//!
//! The engine speaks the protocol; this module only bridges a Socket.IO socket to a gateway
//! session, the same one a native WebSocket gets:
//!
//! - **Connect**: a namespace middleware authenticates (each dialect reads its token from its
//!   own place and refuses with its own `connect_error` strings), registers the session with the
//!   hub and the node, and installs the socket's inbox. It runs before the engine sends the
//!   CONNECT packet, so no client event can arrive before the inbox exists.
//! - **Inbound**: every client event is pushed, in arrival order and without waiting, onto the
//!   socket's bounded inbox by the [`Inbound`] extractor (extractors run synchronously in the
//!   engine's read loop; handler bodies are spawned and could reorder). One task per socket
//!   executes them one at a time, so a client's sends keep their order, exactly like the native
//!   session loop. A client that floods the inbox gets an error answer, never a silent drop.
//! - **Outbound**: one writer task per socket drains the session's hub queue, encodes each event
//!   in the dialect (once per dialect, shared by every recipient: see
//!   [`crate::hub::SharedEvent::dialect`]) and emits it. When the engine's own per-socket buffer is
//!   full it waits up to the write timeout, then disconnects the client as a slow consumer.
//! - **Disconnect**: the session's viewing state is cleared and the node told, as for native.
//!
//! Replies travel in the client's ack callback when it passed one; otherwise errors are emitted
//! as the dialect's `error` event. Nothing is dropped silently.

pub mod notifyhub;
pub mod syarah;

use crate::auth::AuthError;
use crate::hub::{CloseReason, Outbound, Registered, SessionHandle};
use crate::server::App;
use crate::session;
use schema::{Command, Error, ErrorCode, Profile, Reply, RoomId, SessionId, SessionRef, UserId};
use serde_json::Value;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event as EventName, SocketRef, TryData};
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide::{SocketIo, SocketIoBuilder};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for the engine to send CONNECT after the middleware accepted a socket.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Client events queued per socket before further ones are refused.
const INBOX: usize = 256;

/// Longest the writer waits for room in the engine's buffer before the client is a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes the engine's WebSocket codec reads at a time, and the size its buffer starts at (it
/// grows to the largest frame a client sends). The engine's default, 4 KiB, was that much of
/// every idle connection; 512 bytes still takes a chat event in one read.
const WS_READ: usize = 512;

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Engine.IO ping interval.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered.
    pub ping_timeout: Duration,
    /// Largest accepted payload (bytes), per HTTP request or WebSocket message.
    pub max_payload: u64,
    /// Packets buffered per socket inside the engine.
    pub max_buffer_size: usize,
    /// How long a client may take to connect to a namespace after the handshake.
    pub connect_timeout: Duration,
}

impl EngineSettings {
    /// The settings Palaver runs with, from its configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            ping_interval: config.ping_interval,
            ping_timeout: Duration::from_secs(20),
            max_payload: config.max_frame_bytes as u64,
            max_buffer_size: config.outbound_queue.max(128),
            connect_timeout: Duration::from_secs(45),
        }
    }
}

/// The engine builder with Palaver's settings: WebSocket and long-polling, at `/socket.io`.
pub fn engine(settings: &EngineSettings) -> SocketIoBuilder {
    SocketIo::builder()
        .req_path("/socket.io")
        .ping_interval(settings.ping_interval)
        .ping_timeout(settings.ping_timeout)
        .max_payload(settings.max_payload)
        .max_buffer_size(settings.max_buffer_size)
        .connect_timeout(settings.connect_timeout)
        .ws_read_buffer_size(WS_READ)
}

/// Builds the engine for `app` with both dialects' namespaces registered; the layer goes on the
/// router.
pub fn layer(app: &Arc<App>) -> socketioxide::layer::SocketIoLayer {
    let (layer, io) = engine(&EngineSettings::from_config(&app.config)).build_layer();
    notifyhub::register(&io, app.clone());
    syarah::register(&io, app.clone());
    if app.socketio.io.set(io).is_err() {
        tracing::debug!("socket.io engine already built for this gateway");
    }
    layer
}

/// Middleware outside the engine's layer: gives a `/socket.io/` request's head allocations of
/// its own (see [`own_head`]).
pub async fn own_request_head(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path().starts_with("/socket.io") {
        own_head(&mut request);
    }
    next.run(request).await
}

/// Copies the header values and the URI of `request` into allocations of their own.
///
/// The engine keeps every connection's request head (`http::request::Parts`) for the
/// connection's life. hyper parses header values and the URI as slices of the connection's
/// read buffer, and a slice keeps its whole buffer: every Socket.IO connection held the 8 KB
/// buffers its handshake was read into, about 16 KB of the 32 KB an idle connection cost
/// (valgrind massif, 1,000 idle connections). A copy of a head is a few hundred bytes.
pub fn own_head<B>(request: &mut axum::http::Request<B>) {
    for value in request.headers_mut().values_mut() {
        if let Ok(mut owned) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
    if let Ok(uri) = axum::http::Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    // The router put a copy of the URI as it came among the extensions (which the engine keeps
    // with the head) before any middleware ran.
    if let Some(original) = request
        .extensions_mut()
        .get_mut::<axum::extract::OriginalUri>()
        && let Ok(uri) = axum::http::Uri::try_from(original.0.to_string())
    {
        original.0 = uri;
    }
}

/// On drain: closes every engine.io connection without a Socket.IO `disconnect` packet. The
/// client sees "transport close", which socket.io-client answers by reconnecting (with its
/// own backoff) — to another gateway behind the load balancer. A namespace `disconnect` would
/// mean "the server sent you away" and stop its reconnection.
pub async fn close_transports(app: &App) {
    if let Some(io) = app.socketio.io.get() {
        io.close().await;
    }
}

/// State the Socket.IO dialects share per gateway.
#[derive(Default)]
pub struct Shared {
    /// Direct rooms' pairs (`None`: a group), for NotifyHub's `receiver_id`.
    pub pairs: dashmap::DashMap<RoomId, Option<[UserId; 2]>>,
    /// The engine, once built: drain closes its connections.
    pub io: std::sync::OnceLock<SocketIo>,
}

/// A dialect's refusal of a connection: its message is the `connect_error` text.
#[derive(Debug)]
pub struct ConnectRefused(pub String);

impl std::fmt::Display for ConnectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dialect's `connect_error`/`error` text for a token problem (the NotifyHub strings, which
/// Syarah shares).
pub fn auth_message(e: &AuthError) -> String {
    match e {
        AuthError::Missing => "access token not found".into(),
        AuthError::Expired => "access token has expired".into(),
        AuthError::Invalid(_) => "access token is invalid".into(),
    }
}

/// One client event, as pushed onto the socket's inbox.
pub struct Inbound {
    /// Event name.
    pub event: String,
    /// The first argument (`Null` when none); an error when it could not be decoded.
    pub data: Result<Value, String>,
    /// The client's ack callback, when it passed one.
    pub ack: Option<AckSender>,
}

impl Inbound {
    /// Answers through the ack callback; false when the client passed none.
    pub fn answer<T: serde::Serialize + ?Sized>(&mut self, data: &T) -> bool {
        match self.ack.take() {
            Some(ack) => {
                if let Err(e) = ack.send(data) {
                    tracing::debug!(error = %e, "ack not sent");
                }
                true
            }
            None => false,
        }
    }
}

/// The sending side of a socket's inbox, kept in the socket's extensions (which hand out
/// clones, hence the `Arc`: the queue's one sender is dropped with the extensions). A queue of
/// `crate::outbox`'s kind rather than a `tokio` channel: every socket has one, and a channel's
/// first block and cache-padded state were about 1.5 KB of every idle connection.
#[derive(Clone)]
struct Inbox(Arc<crate::outbox::Sender<Inbound>>);

/// The extractor that queues a client event on its socket's inbox, synchronously and in order.
/// It never fails: a full inbox is answered at once with a `rate_limited` error.
pub struct Enqueued;

/// Never produced; required by the extractor trait.
#[derive(Debug)]
pub struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl FromMessageParts<LocalAdapter> for Enqueued {
    type Error = Never;

    fn from_message_parts(
        s: &Arc<Socket>,
        v: &mut socketioxide::handler::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Never> {
        let event = EventName::from_message_parts(s, v, ack_id)
            .map(|e| e.0)
            .unwrap_or_default();
        let data = match TryData::<Value>::from_message_parts(s, v, ack_id) {
            Ok(TryData(Ok(value))) => Ok(value),
            // `socket.emit("getMyChats", ack)`: no argument at all is `Null`, not an error.
            Ok(TryData(Err(_))) if no_argument(v) => Ok(Value::Null),
            Ok(TryData(Err(e))) => Err(e.to_string()),
            Err(never) => match never {},
        };
        let ack = match ack_id {
            Some(_) => match AckSender::from_message_parts(s, v, ack_id) {
                Ok(a) => Some(a),
                Err(never) => match never {},
            },
            None => None,
        };
        let mut inbound = Inbound { event, data, ack };
        match s.extensions.get::<Inbox>() {
            Some(Inbox(tx)) => {
                if let Err(crate::outbox::TrySendError::Full(mut refused)) = tx.try_send(inbound) {
                    let err = Error::new(
                        ErrorCode::RateLimited,
                        format!("more than {INBOX} events waiting: slow down"),
                    );
                    if !refused.answer(&serde_json::json!({ "error": err.message })) {
                        let _ = s.emit("error", &err.message);
                    }
                }
            }
            None => {
                // The socket is closing.
                inbound.answer(&serde_json::json!({ "error": "socket is closing" }));
            }
        }
        Ok(Enqueued)
    }
}

/// Whether a raw event packet carries only its name, no argument (`["event"]`).
fn no_argument(v: &socketioxide::handler::Value) -> bool {
    match v {
        socketioxide::handler::Value::Str(s, _) => {
            serde_json::from_str::<Vec<serde::de::IgnoredAny>>(s).is_ok_and(|a| a.len() <= 1)
        }
        socketioxide::handler::Value::Bytes(_) => false,
    }
}

/// The message handler that does nothing: the [`Enqueued`] extractor did the work.
async fn queued(_: Enqueued) {}

/// A socket bound to a gateway session.
pub struct Bound {
    /// Whose session.
    pub user: UserId,
    /// The session.
    pub id: SessionId,
    /// Its hub handle.
    pub handle: Arc<SessionHandle>,
    /// Rooms this socket is viewing (cleared on disconnect).
    pub viewing: HashSet<RoomId>,
}

/// What a socket's task owns.
pub struct Conn {
    /// Shared state.
    pub app: Arc<App>,
    /// The socket.
    pub socket: SocketRef,
    /// The session, once authenticated.
    pub bound: Option<Bound>,
    /// The dialect's name (for the node and metrics).
    pub dialect: &'static str,
    /// Which encoder the writer uses.
    pub encoder: Encoder,
    closed: CancellationToken,
}

/// The per-dialect event encoder used by the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoder {
    /// NotifyHub.
    NotifyHub,
    /// Syarah.
    Syarah,
}

impl Conn {
    /// The session's reference (for `view`).
    pub fn session_ref(&self) -> Option<SessionRef> {
        self.bound.as_ref().map(|b| SessionRef {
            gateway: self.app.hub.gateway().clone(),
            session: b.id,
        })
    }

    /// Executes `cmd` for the bound user.
    pub async fn execute(&self, cmd: Command) -> Result<Reply, Error> {
        let Some(b) = &self.bound else {
            return Err(Error::new(
                ErrorCode::Unauthorized,
                "access token not found: connect with a token or send accessToken",
            ));
        };
        b.handle.metrics().command(&cmd);
        let r = self.app.node.execute(&b.user, cmd).await;
        b.handle.tarpit_wait(&r).await;
        r
    }

    /// Marks a room viewed (or not) by this socket's session.
    pub async fn view(&mut self, room: RoomId, viewing: bool) -> Result<Reply, Error> {
        let session = self.session_ref();
        let reply = self
            .execute(Command::View {
                room,
                viewing,
                session,
            })
            .await?;
        if let Some(b) = &mut self.bound {
            if viewing {
                b.viewing.insert(room);
            } else {
                b.viewing.remove(&room);
            }
        }
        Ok(reply)
    }

    /// Registers a session for `profile` and starts its writer (the socket must be connected).
    pub async fn bind(&mut self, profile: Profile) -> Result<(), Error> {
        let opened = session::open(&self.app, profile, self.dialect).await?;
        let (user, reg) = opened.into_parts();
        self.start(user, reg);
        Ok(())
    }

    fn start(&mut self, user: UserId, reg: Registered) {
        let Registered { id, handle, rx } = reg;
        tokio::spawn(write(
            self.app.clone(),
            self.socket.clone(),
            handle.clone(),
            rx,
            self.encoder,
            self.closed.clone(),
        ));
        self.bound = Some(Bound {
            user,
            id,
            handle,
            viewing: HashSet::new(),
        });
    }
}

/// What a dialect provides to the bridge.
pub trait Dialect: Send + Sync + 'static {
    /// Handles one client event (the socket's events are handled one at a time, in order).
    fn handle(conn: &mut Conn, inbound: Inbound) -> impl std::future::Future<Output = ()> + Send;
}

/// Installs the bridge on a socket that passed the dialect's authentication: the inbox, the
/// event and disconnect handlers, and the task that runs the socket. `opened` is the session
/// when the connection carried a token. Called from the namespace middleware, before CONNECT.
pub async fn install<D: Dialect>(
    app: Arc<App>,
    socket: SocketRef,
    dialect: &'static str,
    encoder: Encoder,
    profile: Option<Profile>,
) -> Result<(), ConnectRefused> {
    let opened = match profile {
        Some(p) => Some(
            session::open(&app, p, dialect)
                .await
                .map_err(|e| ConnectRefused(e.message))?,
        ),
        None => None,
    };
    let (tx, rx) = crate::outbox::channel(INBOX);
    socket.extensions.insert(Inbox(Arc::new(tx)));
    let closed = CancellationToken::new();
    socket.extensions.insert(Closing(closed.clone()));
    socket.on_fallback(queued);
    socket.on_disconnect(async |s: SocketRef| {
        if let Some(Closing(c)) = s.extensions.get::<Closing>() {
            c.cancel();
        }
        s.extensions.clear();
    });
    let conn = Conn {
        app,
        socket: socket.clone(),
        bound: None,
        dialect,
        encoder,
        closed,
    };
    let pending = opened.map(|o| o.into_parts());
    // The task starts the writer only once the engine has sent CONNECT (see `on_connect`).
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    socket
        .extensions
        .insert(Go(Arc::new(parking_lot::Mutex::new(Some(go_tx)))));
    tokio::spawn(run::<D>(conn, pending, rx, go_rx));
    Ok(())
}

/// The namespace's connect handler: the socket is connected, its writer may start.
pub async fn on_connect(socket: SocketRef) {
    if let Some(Go(go)) = socket.extensions.get::<Go>()
        && let Some(tx) = go.lock().take()
    {
        let _ = tx.send(());
    }
}

#[derive(Clone)]
struct Closing(CancellationToken);

#[derive(Clone)]
struct Go(Arc<parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

async fn run<D: Dialect>(
    mut conn: Conn,
    pending: Option<(UserId, Registered)>,
    mut rx: crate::outbox::Receiver<Inbound>,
    go: tokio::sync::oneshot::Receiver<()>,
) {
    let closed = conn.closed.clone();
    // The engine sends CONNECT right after the middleware; if it never does (the transport died
    // in between, which reports no disconnect), give up rather than hold the session forever.
    let connected = tokio::select! {
        r = tokio::time::timeout(CONNECT_WAIT, go) => matches!(r, Ok(Ok(()))),
        () = closed.cancelled() => false,
    };
    if !connected {
        // Refused or gone before CONNECT: undo the registration.
        conn.socket.extensions.clear();
        if let Some((user, reg)) = pending {
            conn.app.hub.unregister(reg.id).await;
            conn.app
                .node
                .disconnect(&user, conn.app.hub.gateway(), reg.id)
                .await;
        }
        return;
    }
    if let Some((user, reg)) = pending {
        conn.start(user, reg);
    }
    loop {
        let inbound = tokio::select! {
            biased;
            () = closed.cancelled() => break,
            () = kicked(&conn) => break,
            i = rx.recv() => match i {
                Some(i) => i,
                None => break,
            },
        };
        D::handle(&mut conn, inbound).await;
    }
    closed.cancel();
    // Draining (1001): the engine closes the transport so the client reconnects elsewhere;
    // a namespace disconnect would stop it from reconnecting.
    let draining = conn
        .bound
        .as_ref()
        .and_then(|b| b.handle.close_reason())
        .is_some_and(|r| r.code == 1001)
        || conn.app.draining.load(std::sync::atomic::Ordering::SeqCst);
    if conn.socket.connected() && !draining {
        let _ = conn.socket.clone().disconnect();
    }
    if let Some(b) = conn.bound.take() {
        b.handle.kick(CloseReason {
            code: 1000,
            reason: String::new(),
        });
        conn.app.hub.unregister(b.id).await;
        session::stop_viewing(&conn.app, &b.user, b.id, b.viewing).await;
        conn.app
            .node
            .disconnect(&b.user, conn.app.hub.gateway(), b.id)
            .await;
        tracing::debug!(user = %b.user, session = b.id.0, "socket.io session closed");
    }
}

/// Resolves when the bound session was asked to close (slow consumer, shutdown).
async fn kicked(conn: &Conn) {
    match &conn.bound {
        Some(b) => b.handle.closed().await,
        None => std::future::pending().await,
    }
}

/// Drains the session's queue onto the socket.
async fn write(
    app: Arc<App>,
    socket: SocketRef,
    handle: Arc<SessionHandle>,
    mut rx: crate::outbox::Receiver<Outbound>,
    encoder: Encoder,
    closed: CancellationToken,
) {
    loop {
        let out = tokio::select! {
            biased;
            () = closed.cancelled() => break,
            () = handle.closed() => break,
            out = rx.recv() => match out {
                Some(o) => o,
                None => break,
            },
        };
        let Outbound::Event(ev) = out else { continue };
        if let schema::Event::Typing { user, .. } = &ev.event
            && user == &handle.user
        {
            // Socket.IO servers tell the others in the room, not the typist.
            continue;
        }
        let Some(frame) = encode(&app, &ev, encoder, &handle.user).await else {
            continue;
        };
        if !emit(&socket, &handle, &frame).await {
            break;
        }
        handle.metrics().delivered(1);
    }
    if let Some(reason) = handle.close_reason()
        && reason.code != 1000
    {
        tracing::debug!(code = reason.code, reason = %reason.reason, "socket.io session kicked");
    }
}

/// An event as one dialect emits it.
#[derive(Debug)]
pub struct Emit {
    /// Event name.
    pub name: &'static str,
    /// Its argument, encoded once.
    pub data: Box<serde_json::value::RawValue>,
}

impl Emit {
    /// Encodes `data` as the argument of `name`.
    pub fn new<T: serde::Serialize>(name: &'static str, data: &T) -> Option<Self> {
        match serde_json::value::to_raw_value(data) {
            Ok(data) => Some(Self { name, data }),
            Err(e) => {
                tracing::warn!(error = %e, event = name, "event not encodable");
                None
            }
        }
    }
}

async fn encode(
    app: &App,
    ev: &crate::hub::SharedEvent,
    encoder: Encoder,
    recipient: &UserId,
) -> Option<Arc<Emit>> {
    match encoder {
        Encoder::NotifyHub => {
            // The payload names the receiver: resolve the room's pair first (cached).
            let pair = match &ev.event {
                schema::Event::Message { message } => {
                    notifyhub::direct_pair(app, message.room, recipient).await?
                }
                _ => return None,
            };
            ev.dialect(crate::hub::DialectSlot::NotifyHub, |e| {
                notifyhub::encode(e, &pair)
            })
        }
        Encoder::Syarah => ev.dialect(crate::hub::DialectSlot::Syarah, syarah::encode),
    }
}

/// Emits one frame, waiting (up to [`WRITE_TIMEOUT`]) while the engine's buffer is full. False
/// when the socket is gone or was closed as a slow consumer.
async fn emit(socket: &SocketRef, handle: &SessionHandle, frame: &Emit) -> bool {
    let started = Instant::now();
    loop {
        match socket.emit(frame.name, &frame.data) {
            Ok(()) => return true,
            Err(socketioxide::SendError::Socket(
                socketioxide::SocketError::InternalChannelFull,
            )) => {
                if started.elapsed() > WRITE_TIMEOUT {
                    handle.slow_consumer("slow consumer: socket write timed out".into());
                    let _ = socket.clone().disconnect();
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "emit failed");
                return false;
            }
        }
    }
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS` in UTC (NotifyHub's `created_at`).
pub fn sql_datetime(ms: schema::Millis) -> String {
    let t = utc(ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A timestamp as ISO 8601 in UTC with milliseconds and `Z` (Syarah's times).
pub fn iso_datetime(ms: schema::Millis) -> String {
    let t = utc(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn utc(ms: schema::Millis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A user id as a JSON number when it is a decimal integer below 2^53 (as the seeds' clients
/// expect), else as a string.
pub fn user_id_json(u: &UserId) -> Value {
    let s = u.as_str();
    match s.parse::<u64>() {
        Ok(n) if n <= schema::ids::MAX_SAFE_ID && n.to_string() == s => Value::from(n),
        _ => Value::from(s),
    }
}

/// The profile of a token, or the dialect's message for why not.
pub fn verify(app: &App, token: Option<&str>) -> Result<Profile, String> {
    app.auth
        .verify(token.unwrap_or_default())
        .map_err(|e| auth_message(&e))
}

/// The value of query parameter `name` in the socket's connect request.
pub fn query_param(socket: &SocketRef, name: &str) -> Option<String> {
    let q = socket.req_parts().uri.query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_no_longer_points_into_the_read_buffer() {
        // A head parsed the way hyper parses it: values and the URI are slices of the buffer.
        let buffer = bytes::Bytes::from(
            "/socket.io/?EIO=4&transport=websocket&token=abc\
             Bearer abc.def.ghi\
             websocket"
                .repeat(64),
        );
        let range = buffer.as_ptr_range();
        let inside = |p: *const u8| range.contains(&p);
        let slice = |from: usize, len: usize| buffer.slice(from..from + len);
        let mut request = axum::http::Request::builder()
            .uri(axum::http::Uri::from_maybe_shared(slice(0, 47)).unwrap_or_else(|e| panic!("{e}")))
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let original = axum::extract::OriginalUri(request.uri().clone());
        request.extensions_mut().insert(original);
        let value = |from, len| {
            axum::http::HeaderValue::from_maybe_shared(slice(from, len))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let mut auth = value(47, 18);
        auth.set_sensitive(true);
        request.headers_mut().insert("authorization", auth);
        request.headers_mut().append("upgrade", value(65, 9));
        // The test's own premise: before, the head points into the buffer.
        assert!(inside(request.headers()["upgrade"].as_bytes().as_ptr()));
        assert!(inside(request.uri().path().as_ptr()));

        own_head(&mut request);

        assert_eq!(request.headers()["upgrade"], "websocket");
        assert_eq!(request.headers()["authorization"], "Bearer abc.def.ghi");
        assert!(request.headers()["authorization"].is_sensitive());
        assert_eq!(
            request.uri().query(),
            Some("EIO=4&transport=websocket&token=abc")
        );
        assert_eq!(request.uri().path(), "/socket.io/");
        for v in request.headers().values() {
            assert!(!inside(v.as_bytes().as_ptr()), "{v:?} still in the buffer");
        }
        assert!(!inside(request.uri().path().as_ptr()));
        let query = request.uri().query().unwrap_or_default();
        assert!(!inside(query.as_ptr()));
        let original = request
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map(|o| o.0.clone())
            .unwrap_or_default();
        assert_eq!(original, request.uri().clone());
        assert!(!inside(original.path().as_ptr()));
    }

    #[test]
    fn datetimes_are_utc() {
        assert_eq!(sql_datetime(1_731_232_402_000), "2024-11-10 09:53:22");
        assert_eq!(iso_datetime(1_705_314_600_123), "2024-01-15T10:30:00.123Z");
    }

    #[test]
    fn numeric_user_ids_become_numbers() {
        let n = |s: &str| user_id_json(&UserId::parse(s).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(n("415"), Value::from(415));
        assert_eq!(n("0415"), Value::from("0415"));
        assert_eq!(n("ann"), Value::from("ann"));
        assert_eq!(n("9007199254740993"), Value::from("9007199254740993"));
    }
}
