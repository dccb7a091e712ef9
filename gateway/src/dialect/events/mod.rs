//! Event/data JSON dialect (seed 004, "Shaheen Star chat") on `GET /events` (and `/` on the
//! `events` compat listener), plus the seed's REST: `POST /send_chat_message.php`,
//! `GET|POST /get_conversations.php`, `GET|POST /get_conversation_messages.php` ([`rest`]).
//!
//! Every frame is `{"event": "...", "data": {...}}`. The socket is mostly a receiver: messages
//! are sent over REST, and the socket shows `chat:message`, `chat:user_status`, `chat:typing`
//! and `chat:read`; the client sends `chat:typing`, `chat:read` and `ping`.
//!
//! Choices where the seed is silent or careless (documented in the README):
//!
//! - **Identity.** The seed trusts `?user_id=`; here the token decides (`?token=` or
//!   `Authorization: Bearer`, checked before the upgrade: 401 when missing or invalid). A
//!   `user_id` that names another user is refused with 403 before the upgrade; `username` and
//!   `name` are ignored (the token's claims are the profile).
//! - **`connected_users`** counts the distinct users with a session of any dialect on this
//!   gateway (the seed counts its one server's clients).
//! - **Ids.** User ids are JSON numbers when they are decimal integers below 2^53, else strings;
//!   message and room ids are numbers. Times are `YYYY-MM-DD HH:MM:SS` in UTC.
//! - **`chat:message`** goes to every session of both members, the sender's own included (the
//!   echo confirms delivery and syncs other devices). A group message has `receiver_id: null`
//!   and a `room_id` (the seed has direct messages only). `media_url` is the upload path as
//!   stored (`/uploads/...`, relative to this server; fetch it with the token). `message` is the
//!   text, or a media message's caption (`null` without one).
//! - **`chat:typing`** `{sender_id, is_typing}` goes to the other members, never to the typist;
//!   in a group it carries `room_id`. **`chat:read`** `{message_id, read_by, room_id}` goes to
//!   every member's sessions, the reader's included, in every room kind.
//! - **Client frames.** `chat:typing {receiver_id | room_id, is_typing}` and
//!   `chat:read {message_id, [sender_id | receiver_id | room_id]}` get no answer when they
//!   succeed; every failure (bad JSON, unknown event, invalid field, refused by the node) is
//!   answered `{"event":"chat:error","data":{"message","code","event"}}` and the socket stays
//!   open. `{"event":"ping"}` is answered `{"event":"pong","data":{}}` for clients that cannot
//!   send WebSocket pings. A `sender_id`/`user_id` (typing) or `read_by`/`user_id` (read) that
//!   names another user is refused.
//! - **Finding a read message's room.** `chat:read` names only a message; its room is found from
//!   the messages this session was shown (the last [`SEEN_MAX`]), then those this gateway showed
//!   or answered over REST recently (the last [`RECENT_MAX`]), then the conversation the frame
//!   names (`room_id`, or the other user as `sender_id`/`receiver_id`). Otherwise the read is
//!   refused with `not_found`.
//! - Other events (edits, deletions, reactions, membership, friendships, notifications) are not
//!   shown: the seed has none.

pub mod codec;
pub mod rest;

use crate::dialect::socketio::notifyhub::direct_pair;
use crate::dialect::wsloop::{self, Ctx, Flow, WsDialect};
use crate::hub::{SharedEvent, TextSlot};
use crate::server::{ApiError, App, authenticate, bearer};
use crate::session;
use crate::ws;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use codec::{ClientFrame, Conversation};
use dashmap::DashMap;
use futures::SinkExt;
use parking_lot::Mutex;
use schema::{Command, Error, ErrorCode, Event, MessageId, Reply, RoomId, UserId};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

/// The dialect's name (session records, logs).
pub const NAME: &str = "events";

/// Messages whose room a session remembers (for `chat:read`).
pub const SEEN_MAX: usize = 1024;

/// Messages whose room a gateway remembers (shown on its sockets or answered over REST).
pub const RECENT_MAX: usize = 100_000;

/// Direct rooms a session remembers by peer (for `chat:typing`).
const DIRECT_MAX: usize = 256;

/// The dialect's routes on the main listener: the socket and the seed's REST.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/events", get(socket))
        .merge(rest::routes())
}

/// The socket at `/` (compat listener `events`).
pub fn at_root() -> Router<Arc<App>> {
    Router::new().route("/", get(socket))
}

/// Milliseconds since the Unix epoch.
fn now() -> schema::Millis {
    node::ids::unix_ms()
}

/// Rooms of messages recently shown or answered by a gateway, keyed by the gateway (several
/// may run in one process, as in tests) and the message id. Cleared whole when it outgrows
/// [`RECENT_MAX`].
static RECENT: LazyLock<DashMap<(usize, u64), RoomId>> = LazyLock::new(DashMap::new);

fn gateway_key(app: &App) -> usize {
    std::ptr::from_ref(app).addr()
}

/// Remembers the room of `message` for this gateway's `chat:read` frames.
pub(crate) fn remember_message(app: &App, message: MessageId, room: RoomId) {
    if RECENT.len() >= RECENT_MAX {
        RECENT.clear();
    }
    RECENT.insert((gateway_key(app), message.0), room);
}

/// The room of `message`, if this gateway showed or answered it recently.
fn recent_room(app: &App, message: MessageId) -> Option<RoomId> {
    RECENT.get(&(gateway_key(app), message.0)).map(|r| *r)
}

/// `GET /events?token=&user_id=`: authenticates, refuses a foreign `user_id`, registers the
/// session, upgrades, sends `chat:connected` and runs the session.
async fn socket(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Response {
    let params = match codec::query_params(query.as_deref()) {
        Ok(p) => p,
        Err(e) => return rest::refusal(StatusCode::BAD_REQUEST, &e.message),
    };
    let token = codec::param(&params, "token").and_then(|v| v.as_str());
    let profile = match authenticate(&app, bearer(&headers, token)) {
        Ok(p) => p,
        Err(ApiError(e)) => return rest::unauthorized(&e.message),
    };
    if let Err(e) = codec::check_claims(&params, &profile.id, &["user_id"]) {
        return rest::refusal(StatusCode::FORBIDDEN, &e.message);
    }
    if app.draining.load(Ordering::SeqCst) {
        return rest::refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is shutting down; reconnect elsewhere",
        );
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    let opened = match session::open(&app, profile.clone(), NAME).await {
        Ok(o) => o,
        Err(e) => return rest::error_response(&e),
    };
    app.people.remember(&profile);
    let connected = codec::encode_connected(&profile.id, now(), app.hub.user_count());
    let limit = app.config.max_frame_bytes;
    let tracker = app.sessions.clone();
    let task_app = app.clone();
    let failed = opened.clone_for_failure(&app);
    upgrade.on_upgrade(
        limit,
        None,
        move |mut socket, dropped| {
            tracker.track_future(async move {
                // First, before any queued event.
                if let Err(e) = socket.send(WsMessage::Text(connected.into())).await {
                    tracing::debug!(error = %e, "chat:connected not sent");
                }
                wsloop::run(
                    socket,
                    task_app,
                    profile,
                    opened,
                    dropped,
                    Events::default(),
                )
                .await;
            })
        },
        move || failed.abandon(),
    )
}

/// What a session remembers: the rooms of messages it was shown, and direct rooms by peer.
#[derive(Default)]
struct Seen {
    rooms: HashMap<MessageId, RoomId>,
    order: VecDeque<MessageId>,
    direct: HashMap<UserId, RoomId>,
}

impl Seen {
    fn message(&mut self, id: MessageId, room: RoomId) {
        if self.rooms.insert(id, room).is_none() {
            self.order.push_back(id);
            while self.order.len() > SEEN_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.rooms.remove(&old);
                }
            }
        }
    }

    fn direct(&mut self, peer: UserId, room: RoomId) {
        if self.direct.len() >= DIRECT_MAX {
            self.direct.clear();
        }
        self.direct.insert(peer, room);
    }
}

/// The event/data dialect, one value per session.
#[derive(Default)]
pub struct Events {
    seen: Mutex<Seen>,
}

impl Events {
    /// The room of a conversation: a room id as given, or the direct room with a user (opened
    /// if new, remembered per session).
    async fn room(&self, ctx: &Ctx, to: Conversation) -> Result<RoomId, Error> {
        let peer = match to {
            Conversation::Room(r) => return Ok(r),
            Conversation::With(peer) => peer,
        };
        if let Some(r) = self.seen.lock().direct.get(&peer) {
            return Ok(*r);
        }
        match ctx
            .execute(Command::OpenDirect { peer: peer.clone() })
            .await
        {
            Ok(Reply::Room { room, .. }) => {
                let id = room.room.id;
                self.seen.lock().direct(peer, id);
                Ok(id)
            }
            Ok(other) => Err(Error::internal(format!("unexpected reply {other:?}"))),
            Err(e) if e.code == ErrorCode::NotFound => {
                Err(Error::not_found(codec::RECEIVER_NOT_FOUND))
            }
            Err(e) => Err(e),
        }
    }

    async fn read(
        &self,
        ctx: &Ctx,
        message: MessageId,
        within: Option<Conversation>,
    ) -> Result<(), Error> {
        let known = match &within {
            Some(Conversation::Room(r)) => Some(*r),
            _ => self
                .seen
                .lock()
                .rooms
                .get(&message)
                .copied()
                .or_else(|| recent_room(&ctx.app, message)),
        };
        let room = match (known, within) {
            (Some(r), _) => r,
            (None, Some(to)) => self.room(ctx, to).await?,
            (None, None) => {
                return Err(Error::not_found(format!(
                    "message {message} is not known to this connection; \
                     send sender_id (the other user) or room_id with chat:read"
                )));
            }
        };
        ctx.execute(Command::MarkRead {
            room,
            message: Some(message),
        })
        .await
        .map(|_| ())
    }

    /// `chat:message` of `ev`, encoded once for every session of the dialect.
    async fn message(
        &self,
        ctx: &Ctx,
        ev: &Arc<SharedEvent>,
        message: &schema::Message,
    ) -> Option<Utf8Bytes> {
        self.seen.lock().message(message.id, message.room);
        if let Some(done) = ev.cached_text(TextSlot::Events) {
            return done;
        }
        let app = &ctx.app;
        remember_message(app, message.id, message.room);
        let pair = direct_pair(app, message.room, ctx.user()).await;
        let receiver = pair.map(|p| {
            if p[0] == message.sender {
                p[1].clone()
            } else {
                p[0].clone()
            }
        });
        let sender = app.people.user(app, ctx.user(), &message.sender).await;
        let data = codec::message_data(
            message,
            receiver.as_ref(),
            Some(codec::SenderView::of(
                &message.sender,
                sender.as_ref().map(|u| &u.profile),
            )),
        );
        ev.text(TextSlot::Events, |_| Some(codec::encode_message(&data)))
    }
}

impl WsDialect for Events {
    async fn frame(&self, ctx: &Ctx, text: &str) -> Flow {
        let answer = match codec::decode_frame(text, ctx.user()) {
            Err(fe) => Some(codec::encode_error(fe.event.as_deref(), &fe.error)),
            Ok(ClientFrame::Ping) => Some(codec::encode_pong()),
            Ok(ClientFrame::Typing { to, typing }) => {
                let done = match self.room(ctx, to).await {
                    Ok(room) => ctx
                        .execute(Command::Typing { room, typing })
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                };
                done.err()
                    .map(|e| codec::encode_error(Some("chat:typing"), &e))
            }
            Ok(ClientFrame::Read { message, within }) => self
                .read(ctx, message, within)
                .await
                .err()
                .map(|e| codec::encode_error(Some("chat:read"), &e)),
        };
        if let Some(t) = answer {
            // False only when the session is closing; the loop notices.
            ctx.send(t);
        }
        Flow::Continue
    }

    async fn event(&self, ctx: &Ctx, ev: &Arc<SharedEvent>) -> Option<Utf8Bytes> {
        match &ev.event {
            Event::Message { message } => self.message(ctx, ev, message).await,
            Event::Typing { user, .. } if user == ctx.user() => None,
            Event::Typing {
                room, user, typing, ..
            } => {
                if let Some(done) = ev.cached_text(TextSlot::Events) {
                    return done;
                }
                let group = direct_pair(&ctx.app, *room, ctx.user())
                    .await
                    .is_none()
                    .then_some(*room);
                ev.text(TextSlot::Events, |_| {
                    Some(codec::encode_typing(user, *typing, group))
                })
            }
            Event::Presence {
                user,
                online,
                last_seen,
            } => ev.text(TextSlot::Events, |_| {
                let at = if *online {
                    now()
                } else {
                    last_seen.unwrap_or_else(now)
                };
                Some(codec::encode_user_status(user, *online, at))
            }),
            Event::Read {
                room,
                user,
                message_id,
            } => ev.text(TextSlot::Events, |_| {
                Some(codec::encode_read(*message_id, user, *room))
            }),
            _ => None,
        }
    }

    fn refused(&self, err: &Error) -> Option<String> {
        Some(codec::encode_error(None, err))
    }
}
