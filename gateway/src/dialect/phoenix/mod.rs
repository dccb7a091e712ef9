//! Phoenix Channels dialect (seed 002) on `GET /socket/websocket`: the protocol phoenix.js
//! (npm `phoenix` 1.8) speaks with the V2 JSON serializer, `[join_ref, ref, topic, event,
//! payload]` text frames, run on the shared plain-WebSocket loop ([`super::wsloop`]).
//!
//! **Connect.** `?vsn=2.0.0` is required (anything else: HTTP 400 before the upgrade). The token
//! is the socket param `token`, else phoenix.js 1.8's `authToken` (subprotocols `phoenix,
//! base64url.bearer.phx.<base64>`, answered with `phoenix`); a missing, invalid or expired one
//! is HTTP 403 before the upgrade, the status Phoenix answers a refused connect. The optional
//! `device_unique_id` names the device in the node's session record and in idempotency keys;
//! `preferred_language` is stored on the user (push texts).
//!
//! **Channels.**
//! - `chat:<room_id>`: members only (`{"reason":"unauthorized"}` otherwise, `not_found` for a
//!   room id that is not one). Joining marks the room viewed by this socket, leaving unmarks it.
//!   `send_message {content, mobile_ref_id}` answers a `phx_reply` and pushes `message_sent`;
//!   the other sockets that joined the chat get `receive_message`; the sending socket does not
//!   (Phoenix `broadcast_from`), the sender's other sockets do.
//! - `notifications:<user_id>`: only one's own. `new_notification` for each message of one's
//!   rooms whose chat channel this socket has not joined (not one's own messages); after the
//!   join reply, one `pending_notification` per notification stored while the user was offline,
//!   oldest first, which are then cleared.
//!
//! **Choices where the seed is silent** (documented in the README section):
//! - ids are JSON strings (`chat_id` the room id in decimal, `sender_id` the user id as is);
//!   `timestamp` is ISO 8601 UTC with milliseconds; a media message's `content` is its caption,
//!   else its upload path (a pending notification has the stored preview instead).
//! - Protocol edges follow Phoenix's own socket: heartbeat replies on `phoenix`; a push to a
//!   topic not joined gets `{"reason":"unmatched topic"}` (as does a join of a topic no channel
//!   serves); `phx_leave` of a topic not joined is answered ok; a second `phx_join` of a joined
//!   topic first closes the old join (`phx_close` with the old join ref).
//! - Unlike Phoenix, a malformed frame never closes the socket: it is answered with an error
//!   `phx_reply` when its `ref` and topic are readable, else with `phx_error` on topic
//!   `phoenix`. An unknown event on a joined channel gets `{"reason":"unknown event"}`.
//! - Presence, typing, edits, deletions, reactions and membership changes are not shown (the
//!   seed has no events for them); a user removed from a room whose chat is joined gets
//!   `phx_close` on it.

pub mod codec;

use crate::dialect::wsloop::{self, Ctx, Flow, WsDialect};
use crate::hub::{SharedEvent, TextSlot};
use crate::server::{App, error_response};
use crate::session::{self, OpenOptions};
use crate::ws;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use codec::{Inbound, Ref, Topic};
use parking_lot::Mutex;
use schema::{Command, Error, ErrorCode, Event, MessageBody, Reply, RoomId};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The dialect's name (logs, the node's session record).
pub const NAME: &str = "phoenix";

/// Most channels one socket may have joined at once.
pub const MAX_TOPICS: usize = 1000;

/// How many of its own recent sends a socket remembers, to not echo them back as
/// `receive_message`.
const SENT_MEMORY: usize = 256;

/// The dialect's routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/socket/websocket", get(connect))
}

/// A refused connect: `{"error":{"code","message"}}` with `status`.
fn refuse(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    (status, axum::Json(body)).into_response()
}

/// The subprotocols a request offers.
fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

async fn connect(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Response {
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(query.as_deref().unwrap_or_default()) {
            Ok(p) => p,
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidField,
                    format!("malformed query string: {e}"),
                );
            }
        };
    let params = match codec::connect_params(&pairs) {
        Ok(p) => p,
        Err(msg) => return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, msg),
    };
    let protocols = offered_protocols(&headers);
    let token = match params.token {
        Some(t) => t,
        None => match codec::auth_token(&protocols) {
            Ok(Some(t)) => t,
            Ok(None) => String::new(),
            Err(msg) => return refuse(StatusCode::FORBIDDEN, ErrorCode::Unauthorized, msg),
        },
    };
    let mut profile = match app.auth.verify(&token) {
        Ok(p) => p,
        Err(crate::auth::AuthError::Missing) => {
            return refuse(
                StatusCode::FORBIDDEN,
                ErrorCode::Unauthorized,
                "missing token: pass the socket param token, or authToken",
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::FORBIDDEN,
                ErrorCode::Unauthorized,
                e.to_string(),
            );
        }
    };
    if app.draining.load(Ordering::SeqCst) {
        return error_response(&Error::unavailable(
            "server is shutting down; reconnect elsewhere",
        ));
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    if params.language.is_some() {
        profile.language = params.language;
    }
    app.people.remember(&profile);
    let opts = OpenOptions {
        dialect: NAME,
        device: params.device.clone(),
        takes_pending: false,
    };
    let opened = match session::open_with(&app, profile.clone(), opts).await {
        Ok(o) => o,
        Err(e) => return error_response(&e),
    };
    let protocol = protocols
        .iter()
        .any(|p| p == codec::SUBPROTOCOL)
        .then_some(codec::SUBPROTOCOL);
    let limit = app.config.max_frame_bytes;
    let tracker = app.sessions.clone();
    let task_app = app.clone();
    let failed = opened.clone_for_failure(&app);
    let dialect = Phoenix::new(params.device);
    upgrade.on_upgrade(
        limit,
        protocol,
        move |socket, dropped| {
            tracker.track_future(wsloop::run(
                socket, task_app, profile, opened, dropped, dialect,
            ))
        },
        move || failed.abandon(),
    )
}

/// One Phoenix socket: its joined channels and its recent sends.
pub struct Phoenix {
    device: Option<String>,
    state: Mutex<Joined>,
}

/// What a socket has joined. Topics are canonical (`chat:<id>`, `notifications:<me>`), so a
/// join reference per room and one for the notifications channel say it all.
#[derive(Default)]
struct Joined {
    chats: HashMap<RoomId, Ref>,
    notifications: Option<Ref>,
    /// Idempotency keys of this socket's recent sends, oldest first.
    sent: VecDeque<String>,
    sent_set: HashSet<String>,
}

impl Joined {
    fn count(&self) -> usize {
        self.chats.len() + usize::from(self.notifications.is_some())
    }

    fn remember_sent(&mut self, key: &str) {
        if self.sent_set.contains(key) {
            return;
        }
        if self.sent.len() >= SENT_MEMORY
            && let Some(old) = self.sent.pop_front()
        {
            self.sent_set.remove(&old);
        }
        self.sent.push_back(key.to_owned());
        self.sent_set.insert(key.to_owned());
    }
}

/// Where a new message shows on a socket.
enum Route {
    Chat(Ref),
    Notification(Ref),
    Hidden,
}

impl Phoenix {
    /// A socket of device `device`.
    pub fn new(device: Option<String>) -> Self {
        Self {
            device,
            state: Mutex::new(Joined::default()),
        }
    }

    async fn join(&self, ctx: &Ctx, f: Inbound) {
        let topic = codec::parse_topic(&f.topic);
        // A second join of a joined topic closes the old join first.
        let old = {
            let mut st = self.state.lock();
            match &topic {
                Topic::Chat(room) => st.chats.remove(room),
                Topic::Notifications(id) if id == ctx.user().as_str() => st.notifications.take(),
                _ => None,
            }
        };
        if let Some(old) = &old {
            ctx.send(codec::close(old, &f.topic));
        }
        let refuse = |reason: &str| {
            ctx.send(codec::reply_reason(
                &f.join_ref,
                &f.reference,
                &f.topic,
                reason,
            ));
        };
        match topic {
            Topic::Phoenix | Topic::Unmatched => {
                ctx.send(codec::unmatched(&f.reference, &f.topic));
            }
            Topic::BadChat => refuse("not_found"),
            _ if self.state.lock().count() >= MAX_TOPICS => refuse("too many channels"),
            Topic::Chat(room) => {
                let joined = match ctx.execute(Command::Room { room }).await {
                    Ok(Reply::Room { .. }) => {
                        let view = Command::View {
                            room,
                            viewing: true,
                            session: None,
                        };
                        ctx.execute(view).await.map(|_| ())
                    }
                    Ok(other) => Err(Error::internal(format!("unexpected reply {other:?}"))),
                    Err(e) => Err(e),
                };
                match joined {
                    Ok(()) => {
                        self.state.lock().chats.insert(room, f.join_ref.clone());
                        ctx.send(codec::reply_ok(&f.join_ref, &f.reference, &f.topic));
                    }
                    Err(e) => {
                        refuse(codec::join_reason(&e));
                        if old.is_some() {
                            self.unview(ctx, room).await;
                        }
                    }
                }
            }
            Topic::Notifications(id) => {
                if id != ctx.user().as_str() {
                    return refuse("unauthorized");
                }
                self.state.lock().notifications = Some(f.join_ref.clone());
                ctx.send(codec::reply_ok(&f.join_ref, &f.reference, &f.topic));
                match ctx.execute(Command::TakePending).await {
                    Ok(Reply::Notifications { notifications }) => {
                        for n in &notifications {
                            let payload = codec::pending_notification(n);
                            let frame = codec::push(
                                &f.join_ref,
                                &f.topic,
                                "pending_notification",
                                &payload,
                            );
                            if !ctx.send(frame) {
                                break;
                            }
                        }
                    }
                    Ok(other) => tracing::warn!(?other, "take_pending: unexpected reply"),
                    Err(e) => tracing::warn!(user = %ctx.user(), error = %e, "take_pending failed"),
                }
            }
        }
    }

    async fn unview(&self, ctx: &Ctx, room: RoomId) {
        let cmd = Command::View {
            room,
            viewing: false,
            session: None,
        };
        if let Err(e) = ctx.execute(cmd).await {
            tracing::debug!(%room, error = %e, "view end not recorded");
        }
    }

    async fn leave(&self, ctx: &Ctx, f: Inbound) {
        let current = |r: &Ref| f.join_ref == Ref::Null || *r == f.join_ref;
        let (closed, room) = {
            let mut st = self.state.lock();
            match codec::parse_topic(&f.topic) {
                Topic::Chat(room) => match st.chats.get(&room) {
                    Some(r) if current(r) => (st.chats.remove(&room), Some(room)),
                    _ => (None, None),
                },
                Topic::Notifications(id) if id == ctx.user().as_str() => match &st.notifications {
                    Some(r) if current(r) => (st.notifications.take(), None),
                    _ => (None, None),
                },
                _ => (None, None),
            }
        };
        // Phoenix answers every leave ok, even of a topic not (or no longer) joined.
        ctx.send(codec::reply_ok(&f.join_ref, &f.reference, &f.topic));
        if let Some(join_ref) = closed {
            ctx.send(codec::close(&join_ref, &f.topic));
            if let Some(room) = room {
                self.unview(ctx, room).await;
            }
        }
    }

    async fn send_message(&self, ctx: &Ctx, f: Inbound, room: RoomId) {
        let fail = |mobile_ref_id: &Value, e: &Error| {
            ctx.send(codec::reply(
                &f.join_ref,
                &f.reference,
                &f.topic,
                false,
                &codec::error_response(e),
            ));
            let payload = codec::message_sent(mobile_ref_id, room, Some(e));
            ctx.send(codec::push(&f.join_ref, &f.topic, "message_sent", &payload));
        };
        let msg = match codec::decode_send(&f.payload) {
            Ok(m) => m,
            Err(refused) => return fail(&refused.mobile_ref_id, &refused.error),
        };
        let key = codec::client_ref(self.device.as_deref(), &msg.mobile_ref);
        self.state.lock().remember_sent(&key);
        let cmd = Command::Send {
            room,
            body: MessageBody::Text { text: msg.content },
            client_ref: Some(key),
            reply_to: None,
        };
        match ctx.execute(cmd).await {
            Ok(Reply::Message { message }) => {
                let response = codec::sent_response(&msg.mobile_ref_id, &message);
                ctx.send(codec::reply(
                    &f.join_ref,
                    &f.reference,
                    &f.topic,
                    true,
                    &response,
                ));
                let payload = codec::message_sent(&msg.mobile_ref_id, room, None);
                ctx.send(codec::push(&f.join_ref, &f.topic, "message_sent", &payload));
            }
            Ok(other) => fail(
                &msg.mobile_ref_id,
                &Error::internal(format!("unexpected reply {other:?}")),
            ),
            Err(e) => fail(&msg.mobile_ref_id, &e),
        }
    }
}

impl WsDialect for Phoenix {
    async fn frame(&self, ctx: &Ctx, text: &str) -> Flow {
        let f = match codec::decode_frame(text) {
            Ok(f) => f,
            Err(m) => {
                ctx.send(codec::answer_malformed(&m));
                return Flow::Continue;
            }
        };
        match f.event.as_str() {
            "heartbeat" if f.topic == "phoenix" => {
                ctx.send(codec::reply_ok(&Ref::Null, &f.reference, "phoenix"));
            }
            "phx_join" => self.join(ctx, f).await,
            "phx_leave" => self.leave(ctx, f).await,
            _ => {
                let joined = {
                    let st = self.state.lock();
                    match codec::parse_topic(&f.topic) {
                        Topic::Chat(room) => st.chats.contains_key(&room).then_some(Some(room)),
                        Topic::Notifications(id) if id == ctx.user().as_str() => {
                            st.notifications.is_some().then_some(None)
                        }
                        _ => None,
                    }
                };
                match (joined, f.event.as_str()) {
                    (None, _) => {
                        ctx.send(codec::unmatched(&f.reference, &f.topic));
                    }
                    (Some(Some(room)), "send_message") => self.send_message(ctx, f, room).await,
                    (Some(_), _) => {
                        ctx.send(codec::reply_reason(
                            &f.join_ref,
                            &f.reference,
                            &f.topic,
                            "unknown event",
                        ));
                    }
                }
            }
        }
        Flow::Continue
    }

    async fn event(&self, ctx: &Ctx, ev: &Arc<SharedEvent>) -> Option<Utf8Bytes> {
        match &ev.event {
            Event::Message { message } => {
                let me = ctx.user();
                let route = {
                    let st = self.state.lock();
                    if let Some(join_ref) = st.chats.get(&message.room) {
                        let own = message.sender == *me
                            && message
                                .client_ref
                                .as_ref()
                                .is_some_and(|r| st.sent_set.contains(r));
                        if own {
                            Route::Hidden
                        } else {
                            Route::Chat(join_ref.clone())
                        }
                    } else {
                        match &st.notifications {
                            Some(join_ref) if message.sender != *me => {
                                Route::Notification(join_ref.clone())
                            }
                            _ => Route::Hidden,
                        }
                    }
                };
                match route {
                    Route::Hidden => None,
                    Route::Chat(join_ref) => {
                        let payload = ev.text(TextSlot::PhoenixChat, |e| match e {
                            Event::Message { message } => Some(codec::receive_message(message)),
                            _ => None,
                        })?;
                        let topic = codec::chat_topic(message.room);
                        let frame =
                            codec::push(&join_ref, &topic, "receive_message", payload.as_str());
                        Some(frame.into())
                    }
                    Route::Notification(join_ref) => {
                        let payload = ev.text(TextSlot::PhoenixNotification, |e| match e {
                            Event::Message { message } => Some(codec::new_notification(message)),
                            _ => None,
                        })?;
                        let topic = codec::notifications_topic(me);
                        let frame =
                            codec::push(&join_ref, &topic, "new_notification", payload.as_str());
                        Some(frame.into())
                    }
                }
            }
            Event::RoomLeft { room } => {
                let join_ref = self.state.lock().chats.remove(room)?;
                self.unview(ctx, *room).await;
                Some(codec::close(&join_ref, &codec::chat_topic(*room)).into())
            }
            _ => None,
        }
    }

    fn refused(&self, err: &Error) -> Option<String> {
        Some(codec::socket_error(&err.message))
    }
}
