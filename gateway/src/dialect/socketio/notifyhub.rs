//! NotifyHub (seed 000): Socket.IO namespace `/chats`, token in query `access_token`.
//!
//! - `send_message {message, receiver_id}` sends a text to the pair's direct room (the same
//!   room every other dialect uses). Validation errors come back as the `error` event with the
//!   seed's exact strings, checked in the seed's order.
//! - `message` goes to every session of the sender and of the receiver and to nobody else (the
//!   seed broadcasts to the whole namespace; Palaver closes that hole). Messages of group rooms
//!   are not shown: NotifyHub has no groups.
//!
//! The `message` payload keeps the seed's JSON types: `sender_id` and `id` strings,
//! `receiver_id` a number (a string when the receiver's id is not a decimal number, as users
//! of other dialects may have), `created_at` `YYYY-MM-DD HH:MM:SS` in UTC, and the numeric
//! flags `receiver_status` (1: visible to the receiver), `admin_status` (1: not moderated) and
//! `flag` (1: regular message).

use super::{Conn, ConnectRefused, Dialect, Emit, Encoder, Inbound, sql_datetime, user_id_json};
use crate::server::App;
use schema::{Command, ErrorCode, Event, MessageBody, Reply, RoomId, RoomKind, UserId};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::handler::ConnectHandler;
use std::sync::Arc;

/// The dialect's name.
pub const NAME: &str = "notifyhub";

/// Direct rooms' pairs remembered per gateway before the cache is reset.
const PAIR_CACHE_MAX: usize = 100_000;

/// Registers namespace `/chats`.
pub fn register(io: &SocketIo, app: Arc<App>) {
    let middleware = move |s: SocketRef| {
        let app = app.clone();
        async move { connect(app, s).await }
    };
    io.ns("/chats", super::on_connect.with(middleware));
}

async fn connect(app: Arc<App>, socket: SocketRef) -> Result<(), ConnectRefused> {
    let token = super::query_param(&socket, "access_token");
    let profile = super::verify(&app, token.as_deref()).map_err(ConnectRefused)?;
    super::install::<NotifyHub>(app, socket, NAME, Encoder::NotifyHub, Some(profile)).await
}

/// The NotifyHub dialect.
pub struct NotifyHub;

impl Dialect for NotifyHub {
    async fn handle(conn: &mut Conn, mut inbound: Inbound) {
        let result = match inbound.event.as_str() {
            "send_message" => send_message(conn, &inbound.data).await,
            other => Err(format!(
                "unknown event {other:?}: NotifyHub accepts only \"send_message\""
            )),
        };
        match result {
            Ok(payload) => {
                inbound.answer(&payload);
            }
            Err(message) => {
                if !inbound.answer(&json!({ "error": message })) {
                    let _ = conn.socket.emit("error", &message);
                }
            }
        }
    }
}

/// Validates and sends; the error strings are the seed's.
async fn send_message(conn: &Conn, data: &Result<Value, String>) -> Result<Value, String> {
    let (text, receiver) = send_args(data)?;
    let peer = UserId::parse(&receiver.to_string())
        .map_err(|_| "receiver profile not found".to_owned())?;
    let room = match conn.execute(Command::OpenDirect { peer }).await {
        Ok(Reply::Room { room, .. }) => room.room.id,
        Ok(other) => return Err(format!("unexpected reply {}", other_name(&other))),
        Err(e) if e.code == ErrorCode::NotFound => {
            return Err("receiver profile not found".into());
        }
        Err(e) => return Err(e.message),
    };
    let cmd = Command::Send {
        room,
        body: MessageBody::Text { text },
        client_ref: None,
        reply_to: None,
    };
    match conn.execute(cmd).await {
        Ok(Reply::Message { message }) => {
            let me = conn.bound.as_ref().map(|b| b.user.clone());
            let pair = me.map(|m| {
                let other = UserId::parse(&receiver.to_string()).unwrap_or_else(|_| m.clone());
                [m, other]
            });
            let payload = pair.map(|p| payload(&message, &p)).unwrap_or(Value::Null);
            Ok(payload)
        }
        Ok(other) => Err(format!("unexpected reply {}", other_name(&other))),
        Err(e) => Err(e.message),
    }
}

/// The text and receiver of a `send_message` payload, checked in the seed's order with its
/// exact error strings.
pub(crate) fn send_args(data: &Result<Value, String>) -> Result<(String, u64), String> {
    let data = match data {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("message property must be defined".into()),
        Err(e) => return Err(format!("payload could not be decoded: {e}")),
    };
    let text = match data.get("message") {
        None => return Err("message property must be defined".into()),
        Some(Value::Null) => return Err("message must have a value".into()),
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err("message must have a value".into());
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("message must be a string".into()),
    };
    let receiver = match data.get("receiver_id") {
        None => return Err("receiver_id property must be defined".into()),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => n,
            None => return Err("receiver_id must be a number".into()),
        },
        Some(_) => return Err("receiver_id must be a number".into()),
    };
    Ok((text, receiver))
}

fn other_name(r: &Reply) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("reply").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

/// The `message` event of a message in a direct room of `pair`.
pub fn encode(e: &Event, pair: &[UserId; 2]) -> Option<Emit> {
    match e {
        Event::Message { message } => Emit::new("message", &payload(message, pair)),
        _ => None,
    }
}

fn payload(message: &schema::Message, pair: &[UserId; 2]) -> Value {
    let receiver = if pair[0] == message.sender {
        &pair[1]
    } else {
        &pair[0]
    };
    let text = match &message.body {
        MessageBody::Text { text } => text.clone(),
        other => other.media().map(|m| m.media.clone()).unwrap_or_default(),
    };
    json!({
        "sender_id": message.sender.as_str(),
        "receiver_id": user_id_json(receiver),
        "chat_message": text,
        "receiver_status": 1,
        "admin_status": 1,
        "created_at": sql_datetime(message.created_at),
        "flag": 1,
        "id": message.id.to_string(),
    })
}

/// The two members of `room` when it is a direct room (cached per gateway; a room's kind and a
/// direct room's pair never change). Looked up as `member`, who received its event.
pub async fn direct_pair(app: &App, room: RoomId, member: &UserId) -> Option<[UserId; 2]> {
    if let Some(known) = app.socketio.pairs.get(&room) {
        return known.clone();
    }
    let found = match app.node.execute(member, Command::Room { room }).await {
        Ok(Reply::Room { room: summary, .. }) => match summary.room.kind {
            RoomKind::Direct if summary.members.len() == 2 => Some([
                summary.members[0].user.clone(),
                summary.members[1].user.clone(),
            ]),
            _ => None,
        },
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(%room, error = %e, "room kind not known");
            return None;
        }
    };
    if app.socketio.pairs.len() >= PAIR_CACHE_MAX {
        app.socketio.pairs.clear();
    }
    app.socketio.pairs.insert(room, found.clone());
    found
}
