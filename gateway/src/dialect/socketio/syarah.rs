//! Syarah (seed 001): Socket.IO default namespace `/`, acks, chat headers (rooms), and the REST
//! shim `GET /api/chat/getChatHeaderAsync`.
//!
//! **Token.** `auth.token` or `auth.accessToken` at connect, query `accessToken`, or the
//! `accessToken`/`AccessToken` field of any event. A connection with only `userId` is accepted
//! and bound to a session by its first event carrying a valid token for that user; events before
//! that are refused with an error. A token (or `userId`/`UserId` field) naming another user than
//! the one the socket is bound to is refused.
//!
//! **Answers.** When the client passes an ack callback, it gets the result or `{"error": "..."}`.
//! Without one, an error is emitted as the `error` event `{"event", "error"}`; nothing is
//! dropped silently.
//!
//! **Shapes** (the seed leaves them open; documented in the README):
//! - chat message: `{id, chatHeaderId, userId, message, messageType, caption, creationTime,
//!   lastModificationTime, isDeleted, replyToId, seq}`; `message` is the text, or the upload
//!   path of a media message, whose `caption` is separate.
//! - chat header: `{id, chatHeaderId, isGroup, name, avatar, creationTime, lastMessage,
//!   lastMessageTime, unreadCount, memberCount, otherUser, isOnline, friendshipStatus}`.
//! - member: `{userId, role, joinTime, isOnline}`.

use super::{Conn, ConnectRefused, Dialect, Emit, Encoder, Inbound, iso_datetime};
use crate::server::App;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use schema::{
    Chat, Command, Error, ErrorCode, Event, FriendView, FriendshipStatus, HistoryQuery, Media,
    Member, Message, MessageBody, MessageId, Reply, RoomId, RoomKind, RoomSummary, UserId,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use std::sync::Arc;

/// The dialect's name.
pub const NAME: &str = "syarah";

/// Registers the default namespace.
pub fn register(io: &SocketIo, app: Arc<App>) {
    let middleware = move |s: SocketRef, TryData(auth): TryData<Value>| {
        let app = app.clone();
        async move { connect(app, s, auth.ok()).await }
    };
    io.ns("/", super::on_connect.with(middleware));
}

/// The `userId` the connection claimed, kept to check the first token against it.
#[derive(Clone)]
struct Claimed(UserId);

async fn connect(
    app: Arc<App>,
    socket: SocketRef,
    auth: Option<Value>,
) -> Result<(), ConnectRefused> {
    let from_auth = auth.as_ref().and_then(|a| {
        ["token", "accessToken", "AccessToken"]
            .iter()
            .find_map(|k| a.get(*k).and_then(Value::as_str).map(str::to_owned))
    });
    let token = from_auth
        .or_else(|| super::query_param(&socket, "accessToken"))
        .map(|t| strip_bearer(&t).to_owned());
    let claimed = super::query_param(&socket, "userId")
        .filter(|u| !u.is_empty())
        .map(|u| UserId::parse(&u).map_err(|e| ConnectRefused(format!("userId: {e}"))))
        .transpose()?;
    let profile = match token {
        Some(t) => {
            let p = super::verify(&app, Some(&t)).map_err(ConnectRefused)?;
            if let Some(c) = &claimed
                && c != &p.id
            {
                return Err(ConnectRefused(
                    "userId does not match the access token".into(),
                ));
            }
            Some(p)
        }
        None if claimed.is_some() => None,
        None => return Err(ConnectRefused("access token not found".into())),
    };
    if let Some(c) = claimed {
        socket.extensions.insert(Claimed(c));
    }
    super::install::<Syarah>(app, socket, NAME, Encoder::Syarah, profile).await
}

fn strip_bearer(t: &str) -> &str {
    let t = t.trim();
    t.strip_prefix("Bearer ")
        .or_else(|| t.strip_prefix("bearer "))
        .unwrap_or(t)
}

/// The Syarah dialect.
pub struct Syarah;

impl Dialect for Syarah {
    async fn handle(conn: &mut Conn, mut inbound: Inbound) {
        let event = inbound.event.clone();
        let result = match &inbound.data {
            Err(e) => Err(format!("payload could not be decoded: {e}")),
            Ok(data) => {
                let empty = Map::new();
                let args = data.as_object().unwrap_or(&empty).clone();
                match authorize(conn, &args).await {
                    Err(e) => Err(e),
                    Ok(()) => dispatch(conn, &event, &args).await.map_err(|e| e.message),
                }
            }
        };
        match result {
            Ok(payload) => {
                inbound.answer(&payload);
            }
            Err(message) => {
                if !inbound.answer(&json!({ "error": message })) {
                    let _ = conn
                        .socket
                        .emit("error", &json!({ "event": event, "error": message }));
                }
            }
        }
    }
}

/// Checks the event's token and user fields against the socket, binding the socket to a session
/// on its first valid token.
async fn authorize(conn: &mut Conn, args: &Map<String, Value>) -> Result<(), String> {
    let token = ["accessToken", "AccessToken", "token"]
        .iter()
        .find_map(|k| args.get(*k).and_then(Value::as_str))
        .map(strip_bearer)
        .filter(|t| !t.is_empty());
    if let Some(t) = token {
        let profile = super::verify(&conn.app, Some(t))?;
        match &conn.bound {
            Some(b) if b.user != profile.id => {
                return Err("access token belongs to another user than this connection".into());
            }
            Some(_) => {}
            None => {
                if let Some(Claimed(c)) = conn.socket.extensions.get::<Claimed>()
                    && c != profile.id
                {
                    return Err("userId does not match the access token".into());
                }
                conn.bind(profile).await.map_err(|e| e.message)?;
            }
        }
    }
    let Some(b) = &conn.bound else {
        return Err("access token not found: connect with auth.token or send accessToken".into());
    };
    for key in ["userId", "UserId"] {
        if let Some(v) = args.get(key)
            && let Some(claimed) = id_string(v)
            && !claimed.is_empty()
            && claimed != b.user.as_str()
        {
            return Err(format!("{key} does not match the access token"));
        }
    }
    Ok(())
}

async fn dispatch(conn: &mut Conn, event: &str, a: &Map<String, Value>) -> Result<Value, Error> {
    match event {
        "createMessage" => create_message(conn, a).await,
        "findAllMessages" => find_all_messages(conn, a).await,
        "findAllChatHeaders" => find_all_chat_headers(conn, a).await,
        "joinRoom" => join_room(conn, a).await,
        "leaveRoom" => {
            let room = room_arg(a)?;
            conn.view(room, false).await?;
            Ok(json!({ "chatHeaderId": room.0, "left": true }))
        }
        "roomTyping" => {
            let room = room_arg(a)?;
            let typing = match field(a, &["isTyping", "IsTyping"]) {
                Some(Value::Bool(b)) => *b,
                None => true,
                Some(_) => return Err(Error::invalid("isTyping must be a boolean")),
            };
            conn.execute(Command::Typing { room, typing }).await?;
            Ok(json!({ "chatHeaderId": room.0, "isTyping": typing }))
        }
        "updateMessage" => update_message(conn, a).await,
        "removeMessage" => remove_message(conn, a).await,
        "readMessage" => {
            let room = room_arg(a)?;
            conn.execute(Command::MarkRead {
                room,
                message: None,
            })
            .await?;
            Ok(json!({ "chatHeaderId": room.0, "read": true }))
        }
        "getMyFriendships" => match conn.execute(Command::Friendships { all: false }).await? {
            Reply::Friendships { friends } => {
                let list: Vec<Value> = friends.iter().map(friend).collect();
                Ok(Value::Array(list))
            }
            other => Err(unexpected(&other)),
        },
        "getMyChats" => my_chats(conn).await,
        other => Err(Error::new(
            ErrorCode::UnknownOp,
            format!(
                "unknown event {other:?}; expected one of createMessage, findAllMessages, \
                 findAllChatHeaders, joinRoom, leaveRoom, roomTyping, updateMessage, \
                 removeMessage, readMessage, getMyFriendships, getMyChats"
            ),
        )),
    }
}

/// Direct chats the node lists per page (its largest page).
const CHATS_PAGE: u32 = 200;

/// `getMyChats`: every direct chat (the seed has no paging), read page by page. A chat that
/// moves between pages (new activity meanwhile) is listed once.
async fn my_chats(conn: &Conn) -> Result<Value, Error> {
    let mut all = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut skip = 0u32;
    loop {
        let cmd = Command::Chats {
            direct_only: true,
            skip,
            limit: Some(CHATS_PAGE),
        };
        match conn.execute(cmd).await? {
            Reply::Chats { chats, has_more } => {
                all.extend(chats.iter().filter(|c| seen.insert(c.room.id)).map(my_chat));
                let n = u32::try_from(chats.len()).unwrap_or(u32::MAX);
                if !has_more || n == 0 {
                    return Ok(Value::Array(all));
                }
                skip = skip.saturating_add(n);
            }
            other => return Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &Reply) -> Error {
    Error::internal(format!("unexpected reply {r:?}"))
}

/// The first of `keys` present (both casings the seed lists).
fn field<'a>(a: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| a.get(*k).filter(|v| !v.is_null()))
}

/// An id given as a JSON number or a decimal string.
pub(crate) fn id_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A user id given as a string or a number.
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(crate) fn room_arg(a: &Map<String, Value>) -> Result<RoomId, Error> {
    let v = field(a, &["chatHeaderId", "ChatHeaderId"])
        .ok_or_else(|| Error::invalid("chatHeaderId is required"))?;
    id_u64(v)
        .and_then(|n| RoomId::parse(n).ok())
        .ok_or_else(|| Error::invalid("chatHeaderId must be a positive integer"))
}

pub(crate) fn message_id(v: &Value, name: &str) -> Result<MessageId, Error> {
    id_u64(v)
        .and_then(|n| MessageId::parse(n).ok())
        .ok_or_else(|| Error::invalid(format!("{name} must be a positive integer")))
}

pub(crate) fn opt_u32(a: &Map<String, Value>, keys: &[&str]) -> Result<Option<u32>, Error> {
    match field(a, keys) {
        None => Ok(None),
        Some(v) => id_u64(v)
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("{} must be a non-negative integer", keys[0]))),
    }
}

pub(crate) fn text_arg(a: &Map<String, Value>, keys: &[&str]) -> Result<Option<String>, Error> {
    match field(a, keys) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::invalid(format!("{} must be a string", keys[0]))),
    }
}

async fn create_message(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let room = room_arg(a)?;
    let kind = match field(a, &["messageType", "MessageType"]) {
        None => 0,
        Some(v) => id_u64(v).filter(|n| *n <= 4).ok_or_else(|| {
            Error::invalid(
                "messageType must be 0 (text), 1 (audio), 2 (image), 3 (file) or 4 (video)",
            )
        })?,
    };
    let message = text_arg(a, &["message", "Message"])?
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| Error::invalid("message must have a value"))?;
    let caption = text_arg(a, &["caption", "Caption"])?.filter(|c| !c.is_empty());
    let media = || Media {
        media: message.clone(),
        caption: caption.clone(),
        duration: None,
        size: None,
    };
    let body = match kind {
        0 => MessageBody::Text {
            text: message.clone(),
        },
        1 => MessageBody::Audio(media()),
        2 => MessageBody::Image(media()),
        3 => MessageBody::File(media()),
        _ => MessageBody::Video(media()),
    };
    let client_ref = text_arg(a, &["clientRef", "ClientRef"])?;
    let reply_to = field(a, &["replyToId", "ReplyToId"])
        .map(|v| message_id(v, "replyToId"))
        .transpose()?;
    match conn
        .execute(Command::Send {
            room,
            body,
            client_ref,
            reply_to,
        })
        .await?
    {
        Reply::Message { message } => Ok(chat_message(&message)),
        other => Err(unexpected(&other)),
    }
}

async fn find_all_messages(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let room = room_arg(a)?;
    let after = field(a, &["lastMessageId", "LastMessageId"])
        .map(|v| message_id(v, "lastMessageId"))
        .transpose()?;
    let query = HistoryQuery {
        before: None,
        after,
        limit: opt_u32(a, &["maxResultCount", "MaxResultCount"])?,
        skip: opt_u32(a, &["skipCount", "SkipCount"])?,
    };
    match conn.execute(Command::History { room, query }).await? {
        Reply::History { messages, has_more } => {
            // Pages come newest first; a chat screen shows them oldest first.
            let items: Vec<Value> = messages.iter().rev().map(chat_message).collect();
            Ok(json!({ "items": items, "hasMore": has_more }))
        }
        other => Err(unexpected(&other)),
    }
}

async fn find_all_chat_headers(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let skip = opt_u32(a, &["SkipCount", "skipCount"])?.unwrap_or(0);
    let limit = opt_u32(a, &["MaxResultCount", "maxResultCount"])?;
    let mut known: Vec<(u64, u64)> = Vec::new();
    if let Some(list) = field(a, &["RoomsWithLastMessageIds", "roomsWithLastMessageIds"]) {
        let list = list
            .as_array()
            .ok_or_else(|| Error::invalid("RoomsWithLastMessageIds must be an array"))?;
        for e in list {
            let room = e
                .get("ChatHeaderId")
                .or_else(|| e.get("chatHeaderId"))
                .and_then(id_u64);
            let last = e
                .get("LastMessageId")
                .or_else(|| e.get("lastMessageId"))
                .map_or(Some(0), id_u64);
            match (room, last) {
                (Some(r), Some(l)) => known.push((r, l)),
                _ => {
                    return Err(Error::invalid(
                        "RoomsWithLastMessageIds entries need ChatHeaderId and LastMessageId numbers",
                    ));
                }
            }
        }
    }
    let cmd = Command::Chats {
        direct_only: false,
        skip,
        limit,
    };
    match conn.execute(cmd).await? {
        Reply::Chats { chats, has_more } => {
            let items: Vec<Value> = chats
                .iter()
                .map(|c| {
                    let mut h = chat_header(c);
                    if let Some((_, last)) = known.iter().find(|(r, _)| *r == c.room.id.0) {
                        let newest = c.room.last_message_id.map_or(0, |m| m.0);
                        h["lastKnownMessageId"] = json!(last);
                        h["hasNewMessages"] = json!(newest > *last);
                    }
                    h
                })
                .collect();
            Ok(json!({ "items": items, "hasMore": has_more }))
        }
        other => Err(unexpected(&other)),
    }
}

async fn join_room(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let room = match field(a, &["chatHeaderId", "ChatHeaderId"]) {
        Some(_) => room_arg(a)?,
        None => {
            let other = field(a, &["otherUserId", "OtherUserId"])
                .and_then(id_string)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Error::invalid("chatHeaderId or otherUserId is required"))?;
            let peer =
                UserId::parse(&other).map_err(|e| Error::invalid(format!("otherUserId: {e}")))?;
            match conn.execute(Command::OpenDirect { peer }).await? {
                Reply::Room { room, .. } => room.room.id,
                other => return Err(unexpected(&other)),
            }
        }
    };
    let summary = match conn.execute(Command::Room { room }).await {
        Ok(Reply::Room { room, .. }) => room,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) if e.code == ErrorCode::NotMember => {
            // A public group lets anyone in; anything else stays refused.
            conn.execute(Command::Join { room }).await.map_err(|_| e)?;
            match conn.execute(Command::Room { room }).await? {
                Reply::Room { room, .. } => room,
                other => return Err(unexpected(&other)),
            }
        }
        Err(e) => return Err(e),
    };
    conn.view(room, true).await?;
    let me = conn
        .bound
        .as_ref()
        .map(|b| b.user.clone())
        .ok_or_else(|| Error::new(ErrorCode::Unauthorized, "access token not found"))?;
    let friendship = match summary.room.kind {
        RoomKind::Direct => match summary.members.iter().find(|m| m.user != me) {
            Some(peer) => friendship_with(conn, &peer.user).await?,
            None => None,
        },
        RoomKind::Group => None,
    };
    let members: Vec<Value> = summary.members.iter().map(member).collect();
    let current = summary
        .members
        .iter()
        .find(|m| m.user == me)
        .map(member)
        .unwrap_or(Value::Null);
    Ok(json!({
        "chatHeaderId": room.0,
        "chatHeader": summary_header(&summary, &me),
        "joined": true,
        "roomMembers": members,
        "members": members,
        "currentMember": current,
        "friendshipStatus": friendship.map(FriendshipStatus::code),
    }))
}

async fn friendship_with(conn: &Conn, peer: &UserId) -> Result<Option<FriendshipStatus>, Error> {
    let cmd = Command::User {
        id: Some(peer.clone()),
        username: None,
    };
    match conn.execute(cmd).await? {
        Reply::User { friendship, .. } => Ok(friendship),
        other => Err(unexpected(&other)),
    }
}

async fn update_message(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let room = room_arg(a)?;
    let id = field(a, &["id", "Id"])
        .ok_or_else(|| Error::invalid("id is required"))
        .and_then(|v| message_id(v, "id"))?;
    let message = text_arg(a, &["message", "Message"])?;
    let caption = text_arg(a, &["caption", "Caption"])?;
    // A media message keeps its upload (sent back unchanged in `message`); its caption changes.
    let is_media_path = message
        .as_deref()
        .is_some_and(|m| m.trim_start().starts_with("/uploads/"));
    let text = match (message, caption) {
        (_, Some(c)) if !c.is_empty() => c,
        (Some(_), Some(c)) if is_media_path => c,
        (Some(m), _) if !m.trim().is_empty() => m,
        _ => return Err(Error::invalid("message must have a value")),
    };
    match conn
        .execute(Command::Edit {
            room,
            message: id,
            text,
        })
        .await?
    {
        // `edit` answers the edited message.
        Reply::Message { message } => Ok(chat_message(&message)),
        Reply::Messages { messages } => Ok(messages.first().map_or(Value::Null, chat_message)),
        other => Err(unexpected(&other)),
    }
}

async fn remove_message(conn: &mut Conn, a: &Map<String, Value>) -> Result<Value, Error> {
    let room = room_arg(a)?;
    let ids: Vec<MessageId> = match (field(a, &["ids", "Ids"]), field(a, &["id", "Id"])) {
        (Some(Value::Array(list)), _) => list
            .iter()
            .map(|v| message_id(v, "ids"))
            .collect::<Result<_, _>>()?,
        (Some(_), _) => return Err(Error::invalid("ids must be an array of message ids")),
        (None, Some(v)) => vec![message_id(v, "id")?],
        (None, None) => return Err(Error::invalid("id or ids is required")),
    };
    if ids.is_empty() {
        return Err(Error::invalid("ids must not be empty"));
    }
    match conn
        .execute(Command::Delete {
            room,
            messages: ids.clone(),
        })
        .await?
    {
        Reply::Messages { .. } => {
            let ids: Vec<u64> = ids.iter().map(|m| m.0).collect();
            Ok(json!({ "chatHeaderId": room.0, "ids": ids, "deleted": true }))
        }
        other => Err(unexpected(&other)),
    }
}

/// Syarah's `messageType` of a body.
fn message_type(b: &MessageBody) -> u8 {
    match b {
        MessageBody::Text { .. } | MessageBody::Deleted {} => 0,
        MessageBody::Audio(_) => 1,
        MessageBody::Image(_) => 2,
        MessageBody::File(_) => 3,
        MessageBody::Video(_) => 4,
    }
}

/// A message as Syarah shows it.
pub fn chat_message(m: &Message) -> Value {
    let (text, caption) = match &m.body {
        MessageBody::Text { text } => (text.clone(), None),
        MessageBody::Deleted {} => (String::new(), None),
        other => match other.media() {
            Some(media) => (media.media.clone(), media.caption.clone()),
            None => (String::new(), None),
        },
    };
    json!({
        "id": m.id.0,
        "chatHeaderId": m.room.0,
        "userId": m.sender.as_str(),
        "message": text,
        "messageType": message_type(&m.body),
        "caption": caption,
        "creationTime": iso_datetime(m.created_at),
        "lastModificationTime": m.edited_at.map(iso_datetime),
        "isDeleted": m.deleted_at.is_some(),
        "replyToId": m.reply_to.map(|r| r.0),
        "seq": m.seq,
    })
}

fn member(m: &Member) -> Value {
    json!({
        "userId": m.user.as_str(),
        "role": m.role,
        "joinTime": iso_datetime(m.joined_at),
        "isOnline": m.online.unwrap_or(false),
    })
}

fn chat_header(c: &Chat) -> Value {
    let peer = c.peer.as_ref();
    json!({
        "id": c.room.id.0,
        "chatHeaderId": c.room.id.0,
        "isGroup": c.room.kind == RoomKind::Group,
        "name": c.room.name.clone().or_else(|| peer.and_then(|p| p.profile.name.clone())),
        "avatar": c.room.avatar.clone().or_else(|| peer.and_then(|p| p.profile.avatar.clone())),
        "creationTime": iso_datetime(c.room.created_at),
        "lastMessage": c.last_message.as_ref().map(chat_message),
        "lastMessageTime": c.last_message.as_ref().map(|m| iso_datetime(m.created_at)),
        "unreadCount": c.unread,
        "memberCount": c.member_count,
        "otherUser": peer.map(|p| json!({
            "userId": p.profile.id.as_str(),
            "name": p.profile.name,
            "userName": p.profile.username,
            "avatar": p.profile.avatar,
        })),
        "isOnline": c.peer_online,
        "friendshipStatus": c.friendship.map(FriendshipStatus::code),
    })
}

fn summary_header(s: &RoomSummary, me: &UserId) -> Value {
    let peer = (s.room.kind == RoomKind::Direct)
        .then(|| s.members.iter().find(|m| &m.user != me))
        .flatten();
    json!({
        "id": s.room.id.0,
        "chatHeaderId": s.room.id.0,
        "isGroup": s.room.kind == RoomKind::Group,
        "name": s.room.name,
        "avatar": s.room.avatar,
        "creationTime": iso_datetime(s.room.created_at),
        "lastMessage": s.last_message.as_ref().map(chat_message),
        "lastMessageTime": s.last_message.as_ref().map(|m| iso_datetime(m.created_at)),
        "memberCount": s.members.len(),
        "otherUserId": peer.map(|m| m.user.as_str()),
        "isOnline": peer.map(|m| m.online.unwrap_or(false)),
    })
}

fn friend(f: &FriendView) -> Value {
    let p = &f.user.profile;
    json!({
        "userId": p.id.as_str(),
        "name": p.name.clone().or_else(|| p.username.clone()),
        "avatar": p.avatar,
        "isOnline": f.online,
        "chatHeaderId": f.room.map(|r| r.0),
    })
}

fn my_chat(c: &Chat) -> Value {
    let p = c.peer.as_ref().map(|u| &u.profile);
    json!({
        "chatHeaderId": c.room.id.0,
        "userId": p.map(|p| p.id.as_str()),
        "userName": p.and_then(|p| p.name.clone().or_else(|| p.username.clone())),
        "userAvatar": p.and_then(|p| p.avatar.clone()),
        "lastMessage": c.last_message.as_ref().map(|m| preview(&m.body)),
        "lastMessageTime": c.last_message.as_ref().map(|m| iso_datetime(m.created_at)),
        "creationTime": iso_datetime(c.room.created_at),
        "isOnline": c.peer_online.unwrap_or(false),
        "unreadCount": c.unread,
        "friendshipStatus": c.friendship.map(FriendshipStatus::code),
    })
}

/// What a chat list shows of a message: its text, or its caption or upload path.
fn preview(b: &MessageBody) -> String {
    match b {
        MessageBody::Text { text } => text.clone(),
        MessageBody::Deleted {} => String::new(),
        other => other
            .media()
            .map(|m| m.caption.clone().unwrap_or_else(|| m.media.clone()))
            .unwrap_or_default(),
    }
}

/// An event as Syarah's server events (`None`: Syarah has no such event).
pub fn encode(e: &Event) -> Option<Emit> {
    match e {
        Event::Message { message } => Emit::new(
            "message",
            &json!({ "chatHeaderId": message.room.0, "chatMessage": chat_message(message) }),
        ),
        Event::MessageEdited { message, .. } => Emit::new("messageUpdated", &chat_message(message)),
        Event::MessageDeleted { message_id, .. } => Emit::new("messageDeleted", &message_id.0),
        Event::MemberJoined {
            room,
            member: m,
            by,
            ..
        } => {
            let mut v = member(m);
            v["chatHeaderId"] = json!(room.0);
            v["addedBy"] = json!(by.as_str());
            Emit::new("onMemberJoin", &v)
        }
        Event::Typing {
            room,
            user,
            name,
            typing,
        } => Emit::new(
            "typing",
            &json!({
                "name": name.clone().unwrap_or_else(|| user.to_string()),
                "isTyping": typing,
                "chatHeaderId": room.0,
                "userId": user.as_str(),
            }),
        ),
        Event::Read { room, .. } => Emit::new("messageHasBeenRead", &room.0),
        Event::Presence { user, online, .. } => Emit::new(
            "clientStatus",
            &json!({ "userId": user.as_str(), "clientType": "user", "activeNow": online }),
        ),
        _ => None,
    }
}

/// Syarah's REST shim.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/api/chat/getChatHeaderAsync", get(get_chat_header))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PairQuery {
    user1_id: Option<String>,
    user2_id: Option<String>,
}

/// Syarah's REST envelope.
fn envelope(status: StatusCode, data: Value, message: Option<String>) -> Response {
    let body = json!({ "success": status.is_success(), "data": data, "message": message });
    (status, axum::Json(body)).into_response()
}

fn failure(e: &Error) -> Response {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    envelope(status, Value::Null, Some(e.message.clone()))
}

/// `GET /api/chat/getChatHeaderAsync?user1Id=&user2Id=`: gets or creates the direct room of the
/// pair; the caller must be one of them.
async fn get_chat_header(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    q: Result<Query<PairQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let me = match crate::server::authenticate(&app, crate::server::bearer(&headers, None)) {
        Ok(p) => p.id,
        Err(e) => return failure(&e.0),
    };
    let Ok(Query(q)) = q else {
        return failure(&Error::invalid("bad query string"));
    };
    let (Some(a), Some(b)) = (q.user1_id, q.user2_id) else {
        return failure(&Error::invalid("user1Id and user2Id are required"));
    };
    let other = if a == me.as_str() {
        b
    } else if b == me.as_str() {
        a
    } else {
        return failure(&Error::new(
            ErrorCode::Forbidden,
            "the caller must be user1Id or user2Id",
        ));
    };
    let peer = match UserId::parse(&other) {
        Ok(p) => p,
        Err(e) => return failure(&Error::invalid(format!("user id: {e}"))),
    };
    match app.node.execute(&me, Command::OpenDirect { peer }).await {
        Ok(Reply::Room { room, created }) => {
            let mut h = summary_header(&room, &me);
            h["created"] = json!(created);
            envelope(StatusCode::OK, h, None)
        }
        Ok(other) => failure(&unexpected(&other)),
        Err(e) => failure(&e),
    }
}
