//! Type-tagged JSON dialect (seed 003): a chat socket (`/rt/chat`) and a presence feed
//! (`/rt/presence`), plain WebSockets whose frames are JSON objects tagged by `type`.
//!
//! Both sockets are also served at `/` on dedicated ports (`PALAVER_COMPAT_LISTEN`
//! `rt-chat=...,rt-presence=...`), as the seed's clients connect to `ws://host:4000` and
//! `ws://host:5000`. Pure encode/decode is in [`codec`]; this file resolves names and rooms and
//! runs the commands. Business rules stay in the node.
//!
//! **Authentication.** The upgrade needs no token: the first frame must be
//! `{"type":"AUTH","token":...}`, within [`AUTH_WAIT`]. Anything else first is answered with an
//! `ERROR` and close 4002; a bad token (or an `AUTH` without one) with an `ERROR` whose `msg`
//! says why (`invalid token: expired`, ...) and close 4001; silence with `ERROR`
//! `authentication timeout` and close 4001. Only then is the session registered with the node
//! (so the user comes online), answered `SUCCESS` `Authenticated as <username>`, and run by the
//! shared plain-WebSocket loop ([`crate::dialect::wsloop`]). A later `AUTH` gets `INFO`
//! `already authenticated`. The first frame is read here, before the shared loop runs, so that
//! silence, a binary or oversized frame, a closed socket and a server shutdown (checked every
//! 250 ms) each get their own answer.
//!
//! **People.** The dialect names people by username: the token's `username` claim, or the user
//! id for users who have none. A `from` (or `JOIN_GROUP`/`LEAVE_GROUP` `username`) that is not
//! the caller's is refused; an absent one is fine (the token decides). `to` is looked up by
//! username; a user without a username is addressed by id.
//!
//! **Choices where the seed is silent.**
//! - `chatId` is a label: when it is a room id (digits) other than the pair's direct room the
//!   frame is refused; otherwise the pair's one direct room is used (the same room every
//!   dialect uses). Ids (`chatId`, `groupId`, `messageId`) are written as strings of digits.
//! - A sent message is not acknowledged separately: every session of both members (the
//!   sender's own included) receives it, and the sender's copy, with the server's `messageId`
//!   and `timestamp`, is the confirmation. An optional `clientId` is an idempotency key (a
//!   retry delivers nothing new) and is shown back as `clientId`.
//! - A media message (sent from another dialect) shows its caption as `content`, else its
//!   upload path, and adds `media` (the path) and `mediaType`. Edits, deletions, reactions,
//!   typing, read markers and presence are not shown on `/rt/chat`; becoming or ceasing to be a
//!   member of a group is shown as `INFO`.
//! - History replies are oldest first with `hasMore`; `limit` (default 50, at most the server's
//!   maximum) and `before` (a `messageId`) page back. A deleted message keeps its place with
//!   `content: ""` and `deleted: true`.
//! - `GROUP_CHAT` and `GET_GROUP_CHAT_HISTORY` refuse a direct room's id.
//! - The presence feed starts with one `PRESENCE_UPDATE` per friend or direct peer online now,
//!   then follows the node's presence events (friends, direct peers, co-members of small groups,
//!   never across a block). It accepts nothing but `DISCONNECT` (others get `INFO`).

pub mod codec;

use crate::dialect::socketio::notifyhub::direct_pair;
use crate::dialect::wsloop::{self, Ctx, Flow, WsDialect};
use crate::hub::{CloseReason, SharedEvent, TextSlot};
use crate::server::{App, error_response};
use crate::session;
use crate::ws::{self, Dropped, Socket};
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use codec::{DecodeError, DirectView, GroupView, Request};
use futures::{SinkExt, StreamExt};
use schema::{
    Command, Error, ErrorCode, Event, HistoryQuery, Message, MessageBody, Millis, Profile, Reply,
    RoomId, RoomKind, User, UserId,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

/// The chat socket's dialect name (sessions, logs).
pub const CHAT: &str = "rt-chat";

/// The presence feed's dialect name.
pub const PRESENCE: &str = "rt-presence";

/// How long a new socket may stay silent before its `AUTH`.
pub const AUTH_WAIT: Duration = Duration::from_secs(10);

/// Longest the server waits on one write before the session has started.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// Most people listed in the presence feed's first snapshot.
const SNAPSHOT_MAX: u32 = 10_000;

/// Page size of the chat list read for the snapshot.
const SNAPSHOT_PAGE: u32 = 200;

/// The `msg` (and close reason) for a first frame that is not `AUTH`.
const FIRST_MUST_BE_AUTH: &str = "first frame must be AUTH";

/// The dialect's routes on the main listener.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/rt/chat", get(chat_ws))
        .route("/rt/presence", get(presence_ws))
}

/// The chat socket at `/` (compat listener `rt-chat`).
pub fn chat_at_root() -> Router<Arc<App>> {
    Router::new().route("/", get(chat_ws))
}

/// The presence feed at `/` (compat listener `rt-presence`).
pub fn presence_at_root() -> Router<Arc<App>> {
    Router::new().route("/", get(presence_ws))
}

/// Which of the two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feed {
    Chat,
    Presence,
}

impl Feed {
    fn name(self) -> &'static str {
        match self {
            Feed::Chat => CHAT,
            Feed::Presence => PRESENCE,
        }
    }
}

async fn chat_ws(
    State(app): State<Arc<App>>,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Response {
    accept(app, upgrade, Feed::Chat)
}

async fn presence_ws(
    State(app): State<Arc<App>>,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Response {
    accept(app, upgrade, Feed::Presence)
}

/// Upgrades at once (the token comes in the first frame) and runs the socket.
fn accept(app: Arc<App>, upgrade: Result<ws::Upgrade, ws::NotUpgrade>, feed: Feed) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return error_response(&Error::unavailable(
            "server is shutting down; reconnect elsewhere",
        ));
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    let limit = app.config.max_frame_bytes;
    let tracker = app.sessions.clone();
    upgrade.on_upgrade(
        limit,
        None,
        move |socket, dropped| tracker.track_future(serve(socket, dropped, app, feed)),
        // Nothing is registered before the AUTH frame, so there is nothing to undo.
        || {},
    )
}

/// One socket: `AUTH`, registration, `SUCCESS` (and the presence snapshot), then the loop.
async fn serve(mut socket: Socket, mut dropped: Dropped, app: Arc<App>, feed: Feed) {
    let Some(profile) = authenticate(&mut socket, &mut dropped, &app).await else {
        return;
    };
    let opened = match session::open(&app, profile.clone(), feed.name()).await {
        Ok(o) => o,
        Err(e) => {
            // The rt error frame with the node's message, then the close code of its error
            // (4029 for too many connections, 1013 when the node is unavailable).
            refuse(
                &mut socket,
                &e.message,
                e.code.ws_close_code(),
                e.code.as_str(),
            )
            .await;
            return;
        }
    };
    app.people.remember(&profile);
    let me = name_of(&profile);
    // Written before the loop starts, so they come first; events published meanwhile wait in
    // the session's queue and follow.
    let mut first = vec![codec::success(&format!("Authenticated as {me}"))];
    if feed == Feed::Presence {
        first.extend(snapshot(&app, &profile.id).await);
    }
    for text in first {
        let sent = tokio::time::timeout(WRITE_WAIT, socket.send(WsMessage::text(text))).await;
        if !matches!(sent, Ok(Ok(()))) {
            opened.clone_for_failure(&app).abandon();
            return;
        }
    }
    match feed {
        Feed::Chat => wsloop::run(socket, app, profile, opened, dropped, ChatFeed { me }).await,
        Feed::Presence => wsloop::run(socket, app, profile, opened, dropped, PresenceFeed).await,
    }
}

/// What the first frame was.
enum First {
    Text(Utf8Bytes),
    /// Binary, or too large (discarded by the frame guard).
    NotText,
    /// The client closed or the connection failed.
    Gone,
    /// Nothing within [`AUTH_WAIT`].
    Silent,
    /// The server began to shut down.
    Draining,
}

/// Reads the first data frame, waiting at most [`AUTH_WAIT`], and stops early when the server
/// starts draining (checked every 250 ms; reading a stream is cancel-safe).
async fn first_frame(socket: &mut Socket, dropped: &mut Dropped, app: &App) -> First {
    let deadline = Instant::now() + AUTH_WAIT;
    loop {
        if app.draining.load(Ordering::SeqCst) {
            return First::Draining;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return First::Silent;
        }
        let slice = left.min(Duration::from_millis(250));
        let frame = tokio::select! {
            Some(_) = dropped.recv() => return First::NotText,
            f = tokio::time::timeout(slice, socket.next()) => f,
        };
        match frame {
            Err(_) => continue,
            Ok(None | Some(Err(_)) | Some(Ok(WsMessage::Close(_)))) => return First::Gone,
            Ok(Some(Ok(WsMessage::Text(t)))) => return First::Text(t),
            Ok(Some(Ok(WsMessage::Binary(_)))) => return First::NotText,
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_)))) => {
                continue;
            }
        }
    }
}

/// Waits for `AUTH` and verifies its token; on any failure answers `ERROR`, closes, and
/// answers `None`.
async fn authenticate(socket: &mut Socket, dropped: &mut Dropped, app: &App) -> Option<Profile> {
    let text = match first_frame(socket, dropped, app).await {
        First::Text(t) => t,
        First::Gone => return None,
        First::Silent => {
            let msg = "authentication timeout";
            refuse(socket, msg, 4001, msg).await;
            return None;
        }
        First::NotText => {
            refuse(socket, FIRST_MUST_BE_AUTH, 4002, FIRST_MUST_BE_AUTH).await;
            return None;
        }
        First::Draining => {
            let r = session::going_away();
            refuse(socket, &r.reason, r.code, &r.reason).await;
            return None;
        }
    };
    if !matches!(codec::split(text.as_str()), Ok((t, _)) if t == "AUTH") {
        refuse(socket, FIRST_MUST_BE_AUTH, 4002, FIRST_MUST_BE_AUTH).await;
        return None;
    }
    let verified = match codec::decode(text.as_str()) {
        Ok(Request::Auth { token }) => app.auth.verify(&token).map_err(|e| codec::auth_error(&e)),
        Ok(_) => Err(FIRST_MUST_BE_AUTH.to_owned()),
        Err(DecodeError(msg)) => Err(msg),
    };
    match verified {
        Ok(profile) => Some(profile),
        Err(msg) => {
            refuse(socket, &msg, 4001, "authentication failed").await;
            None
        }
    }
}

/// Answers `ERROR msg`, closes with `code`/`reason` and waits (briefly) for the client's close,
/// so that the `ERROR` is not lost to a connection reset.
async fn refuse(socket: &mut Socket, msg: &str, code: u16, reason: &str) {
    let close = session::close_frame(&CloseReason {
        code,
        reason: reason.to_owned(),
    });
    let goodbye = async {
        socket.send(WsMessage::text(codec::error(msg))).await?;
        socket.send(close).await?;
        // The client's close frame ends the handshake; whatever else it sent is dropped.
        while let Some(Ok(m)) = socket.next().await {
            if m.is_close() {
                break;
            }
        }
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), goodbye).await {
        tracing::debug!(error = %e, "rt: refusal not delivered");
    }
}

/// How the dialect names a user: the username, else the id.
fn name_of(profile: &Profile) -> String {
    profile
        .username
        .clone()
        .unwrap_or_else(|| profile.id.to_string())
}

/// Now, in Unix milliseconds.
fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// The presence feed's first frames: one `PRESENCE_UPDATE` online per friend or direct peer
/// online now (each once).
async fn snapshot(app: &App, me: &UserId) -> Vec<String> {
    let mut seen: HashSet<UserId> = HashSet::new();
    let mut online: Vec<String> = Vec::new();
    match app
        .node
        .execute(me, Command::Friendships { all: false })
        .await
    {
        Ok(Reply::Friendships { friends }) => {
            for f in friends {
                if f.online && seen.insert(f.user.profile.id.clone()) {
                    online.push(name_of(&f.user.profile));
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(%me, error = %e, "rt presence: friends not listed"),
    }
    let mut skip = 0;
    while skip < SNAPSHOT_MAX {
        let cmd = Command::Chats {
            direct_only: true,
            skip,
            limit: Some(SNAPSHOT_PAGE),
        };
        match app.node.execute(me, cmd).await {
            Ok(Reply::Chats { chats, has_more }) => {
                for c in &chats {
                    if c.peer_online == Some(true)
                        && let Some(peer) = &c.peer
                        && seen.insert(peer.profile.id.clone())
                    {
                        online.push(name_of(&peer.profile));
                    }
                }
                if !has_more || chats.is_empty() {
                    break;
                }
                skip = skip.saturating_add(u32::try_from(chats.len()).unwrap_or(u32::MAX));
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(%me, error = %e, "rt presence: chats not listed");
                break;
            }
        }
    }
    let now = now_ms();
    online
        .iter()
        .map(|name| codec::encode_presence(name, true, now))
        .collect()
}

/// The chat socket of one session.
struct ChatFeed {
    /// The caller's name in this dialect (see [`name_of`]).
    me: String,
}

/// The answer to a client frame: a frame to send, nothing (the message's own delivery is the
/// answer), or an `ERROR` message.
type Answer = Result<Option<String>, String>;

fn unexpected(reply: &Reply) -> String {
    format!("internal error: unexpected reply {reply:?}")
}

impl ChatFeed {
    /// Refuses a name the client claims for itself that is not the caller's.
    fn check_self(&self, claimed: Option<&str>, field: &str) -> Result<(), String> {
        match claimed {
            Some(c) if c != self.me => {
                Err(format!("{field} does not match the authenticated user"))
            }
            _ => Ok(()),
        }
    }

    async fn frame_answer(&self, ctx: &Ctx, req: Request) -> Answer {
        match req {
            Request::Auth { .. } => Ok(Some(codec::info("already authenticated"))),
            Request::Disconnect => Ok(None),
            Request::OneToOne(d) => {
                self.check_self(d.from.as_deref(), "from")?;
                let peer = resolve(ctx, &d.to).await?;
                let room = match ctx
                    .execute(Command::OpenDirect {
                        peer: peer.profile.id.clone(),
                    })
                    .await
                {
                    Ok(Reply::Room { room, .. }) => room.room.id,
                    Ok(other) => return Err(unexpected(&other)),
                    Err(e) => return Err(e.message),
                };
                if let Some(hint) = d.chat_id
                    && hint != room
                {
                    return Err(format!("chatId {hint} is not the chat with {}", d.to));
                }
                send(ctx, room, d.content, d.client_id).await
            }
            Request::Group(g) => {
                self.check_self(g.from.as_deref(), "from")?;
                not_direct(ctx, g.group).await?;
                send(ctx, g.group, g.content, g.client_id).await
            }
            Request::DirectHistory(h) => {
                self.check_self(h.from.as_deref(), "from")?;
                let peer = resolve(ctx, &h.to).await?;
                let query = HistoryQuery {
                    before: h.page.before,
                    after: None,
                    limit: h.page.limit,
                    skip: None,
                };
                let cmd = Command::DirectHistory {
                    peer: peer.profile.id.clone(),
                    query,
                };
                let (mut messages, has_more) = history(ctx, cmd).await?;
                messages.reverse();
                let chat = messages.first().map(|m| m.room);
                if let (Some(hint), Some(room)) = (h.chat_id, chat)
                    && hint != room
                {
                    return Err(format!("chatId {hint} is not the chat with {}", h.to));
                }
                let with = name_of(&peer.profile);
                let views: Vec<DirectView> = messages
                    .iter()
                    .map(|m| {
                        if &m.sender == ctx.user() {
                            DirectView::of(m, &self.me, &with)
                        } else {
                            DirectView::of(m, &with, &self.me)
                        }
                    })
                    .collect();
                Ok(Some(codec::encode_direct_history(
                    chat, &with, &views, has_more,
                )))
            }
            Request::GroupHistory(h) => {
                not_direct(ctx, h.group).await?;
                let query = HistoryQuery {
                    before: h.page.before,
                    after: None,
                    limit: h.page.limit,
                    skip: None,
                };
                let cmd = Command::History {
                    room: h.group,
                    query,
                };
                let (mut messages, has_more) = history(ctx, cmd).await?;
                messages.reverse();
                let mut names: HashMap<UserId, String> = HashMap::new();
                for m in &messages {
                    if !names.contains_key(&m.sender) {
                        let name = if &m.sender == ctx.user() {
                            self.me.clone()
                        } else {
                            ctx.app
                                .people
                                .username(&ctx.app, ctx.user(), &m.sender)
                                .await
                        };
                        names.insert(m.sender.clone(), name);
                    }
                }
                let views: Vec<GroupView> = messages
                    .iter()
                    .map(|m| {
                        let from = names.get(&m.sender).map_or("", String::as_str);
                        GroupView::of(m, from)
                    })
                    .collect();
                Ok(Some(codec::encode_group_history(h.group, &views, has_more)))
            }
            Request::JoinGroup(j) => {
                self.check_self(j.username.as_deref(), "username")?;
                match ctx.execute(Command::Join { room: j.group }).await {
                    Ok(_) => Ok(Some(codec::success(&format!("joined group {}", j.group)))),
                    Err(e) => Err(e.message),
                }
            }
            Request::LeaveGroup(l) => {
                self.check_self(l.username.as_deref(), "username")?;
                match ctx.execute(Command::Leave { room: l.group }).await {
                    Ok(_) => Ok(Some(codec::success(&format!("left group {}", l.group)))),
                    Err(e) => Err(e.message),
                }
            }
        }
    }
}

/// The user named `name`: by username, else (for users without one) by id.
async fn resolve(ctx: &Ctx, name: &str) -> Result<Arc<User>, String> {
    let people = &ctx.app.people;
    match people.by_username(&ctx.app, ctx.user(), name).await {
        Ok(u) => Ok(u),
        Err(e) if e.code == ErrorCode::NotFound => {
            if let Ok(id) = UserId::parse(name)
                && let Some(u) = people.user(&ctx.app, ctx.user(), &id).await
                && u.profile.username.is_none()
            {
                return Ok(u);
            }
            Err(format!("user {name} not found"))
        }
        Err(e) => Err(e.message),
    }
}

/// Refuses a direct room named as a group.
async fn not_direct(ctx: &Ctx, room: RoomId) -> Result<(), String> {
    match direct_pair(&ctx.app, room, ctx.user()).await {
        Some(_) => Err(format!(
            "groupId {room} is a one-to-one chat; use ONE_TO_ONE_CHAT"
        )),
        None => Ok(()),
    }
}

/// Sends a text; the message's delivery to the sender's own sessions is the confirmation.
async fn send(ctx: &Ctx, room: RoomId, text: String, client_ref: Option<String>) -> Answer {
    let cmd = Command::Send {
        room,
        body: MessageBody::Text { text },
        client_ref,
        reply_to: None,
    };
    match ctx.execute(cmd).await {
        Ok(Reply::Message { .. }) => Ok(None),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(e.message),
    }
}

/// A page of history, newest first.
async fn history(ctx: &Ctx, cmd: Command) -> Result<(Vec<Message>, bool), String> {
    match ctx.execute(cmd).await {
        Ok(Reply::History { messages, has_more }) => Ok((messages, has_more)),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(e.message),
    }
}

impl WsDialect for ChatFeed {
    async fn frame(&self, ctx: &Ctx, text: &str) -> Flow {
        let req = match codec::decode(text) {
            Ok(r) => r,
            Err(DecodeError(msg)) => {
                ctx.send(codec::error(&msg));
                return Flow::Continue;
            }
        };
        if req == Request::Disconnect {
            return bye(ctx);
        }
        match self.frame_answer(ctx, req).await {
            Ok(Some(text)) => {
                ctx.send(text);
            }
            Ok(None) => {}
            Err(msg) => {
                ctx.send(codec::error(&msg));
            }
        }
        Flow::Continue
    }

    async fn event(&self, ctx: &Ctx, ev: &Arc<SharedEvent>) -> Option<Utf8Bytes> {
        match &ev.event {
            Event::Message { message } => {
                if let Some(cached) = ev.cached_text(TextSlot::RtChat) {
                    return cached;
                }
                let app = &ctx.app;
                let me = ctx.user();
                let pair = direct_pair(app, message.room, me).await;
                // Not known: the lookup failed; show it as best we can, but do not share that.
                let known = app.socketio.pairs.contains_key(&message.room);
                let from = app.people.username(app, me, &message.sender).await;
                let text = match pair {
                    Some(pair) => {
                        let other = if pair[0] == message.sender {
                            &pair[1]
                        } else {
                            &pair[0]
                        };
                        let to = app.people.username(app, me, other).await;
                        codec::encode_direct(message, &from, &to)
                    }
                    None => codec::encode_group(message, &from),
                };
                if known {
                    ev.text(TextSlot::RtChat, |_| Some(text))
                } else {
                    Some(text.into())
                }
            }
            Event::RoomJoined { room } if room.room.kind == RoomKind::Group => {
                let id = room.room.id;
                let name = room.room.name.clone().unwrap_or_default();
                ev.text(TextSlot::RtChat, |_| {
                    Some(codec::info(&format!(
                        "you are now a member of group {id} ({name})"
                    )))
                })
            }
            Event::RoomLeft { room } => ev.text(TextSlot::RtChat, |_| {
                Some(codec::info(&format!(
                    "you are no longer a member of group {room}"
                )))
            }),
            _ => None,
        }
    }

    fn refused(&self, err: &Error) -> Option<String> {
        Some(codec::error(&err.message))
    }
}

/// `INFO bye`, then close 1000.
fn bye(ctx: &Ctx) -> Flow {
    ctx.send(codec::info("bye"));
    Flow::Close(CloseReason {
        code: 1000,
        reason: "bye".into(),
    })
}

/// The presence feed of one session.
struct PresenceFeed;

impl WsDialect for PresenceFeed {
    async fn frame(&self, ctx: &Ctx, text: &str) -> Flow {
        match codec::split(text) {
            Err(DecodeError(msg)) => {
                ctx.send(codec::error(&msg));
            }
            Ok((t, _)) if t == "DISCONNECT" => return bye(ctx),
            Ok((t, _)) if t == "AUTH" => {
                ctx.send(codec::info("already authenticated"));
            }
            Ok(_) => {
                ctx.send(codec::info("presence feed is read-only"));
            }
        }
        Flow::Continue
    }

    async fn event(&self, ctx: &Ctx, ev: &Arc<SharedEvent>) -> Option<Utf8Bytes> {
        let Event::Presence {
            user,
            online,
            last_seen,
        } = &ev.event
        else {
            return None;
        };
        if let Some(cached) = ev.cached_text(TextSlot::RtPresence) {
            return cached;
        }
        let name = ctx.app.people.username(&ctx.app, ctx.user(), user).await;
        let at = match (online, last_seen) {
            (false, Some(t)) => *t,
            _ => now_ms(),
        };
        ev.text(TextSlot::RtPresence, |_| {
            Some(codec::encode_presence(&name, *online, at))
        })
    }

    fn refused(&self, err: &Error) -> Option<String> {
        Some(codec::error(&err.message))
    }
}
