//! Pure encode/decode of the event/data dialect (seed 004): client frames and REST parameters
//! in, server frames and REST bodies out. No I/O; every function here is tested on exact byte
//! fixtures below.
//!
//! Output objects are typed structs, so their fields keep the seed's order on the wire
//! (`message_id, sender_id, receiver_id, message_type, message, media_url, media_duration,
//! file_size, sender, created_at`), and every frame is `{"event": ..., "data": ...}` with
//! `event` first.

use crate::dialect::socketio::{sql_datetime, user_id_json};
use schema::{
    Chat, Error, ErrorCode, Message, MessageBody, MessageId, Millis, Profile, RoomId, UserId,
};
use serde::Serialize;
use serde_json::Value;

/// `chat:connected`'s `message`.
pub const CONNECTED: &str = "Successfully connected to chat server";
/// `send_chat_message.php`'s success `message`.
pub const SENT: &str = "Message sent successfully";
/// The seed's error when a send carries no content.
pub const NO_CONTENT: &str = "At least one of message, image, or voice must be provided";
/// The error when a send carries more than one content.
pub const MANY_CONTENTS: &str = "Only one of message, image, or voice may be provided per message";
/// The error when the receiver has never been seen (CONTRACT wording).
pub const RECEIVER_NOT_FOUND: &str = "receiver profile not found";
/// Default page size of the list routes.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size of the list routes.
pub const MAX_LIMIT: u32 = 200;
/// Largest `offset` of the list routes (the node pages past at most this many messages).
pub const MAX_OFFSET: u32 = 10_000;

// ------------------------------------------------------------------------------------------
// Client frames
// ------------------------------------------------------------------------------------------

/// Where a `chat:typing` or `chat:read` applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conversation {
    /// The direct conversation with this user.
    With(UserId),
    /// A room named by its id (groups, or a direct room the client knows by id).
    Room(RoomId),
}

/// A client frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"event":"ping"}`: answered `{"event":"pong","data":{}}`.
    Ping,
    /// `{"event":"chat:typing","data":{"receiver_id":..,"is_typing":bool}}` (or `room_id`).
    Typing {
        /// To whom.
        to: Conversation,
        /// Typing or stopped.
        typing: bool,
    },
    /// `{"event":"chat:read","data":{"message_id":..}}`, optionally with the other user
    /// (`sender_id` or `receiver_id`) or `room_id` to locate the message.
    Read {
        /// Read up to this message.
        message: MessageId,
        /// Where, when the client said.
        within: Option<Conversation>,
    },
}

/// A client frame that could not be decoded: the error and the event it named, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The client's `event`, when it could be read.
    pub event: Option<String>,
    /// What is wrong.
    pub error: Error,
}

/// Decodes a client text frame of user `me`.
pub fn decode_frame(text: &str, me: &UserId) -> Result<ClientFrame, FrameError> {
    let bad = |event: Option<&str>, error: Error| FrameError {
        event: event.map(str::to_owned),
        error,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| {
        bad(
            None,
            Error::new(
                ErrorCode::MalformedJson,
                format!("frame is not valid JSON: {e}"),
            ),
        )
    })?;
    let Value::Object(frame) = v else {
        return Err(bad(
            None,
            Error::new(
                ErrorCode::MalformedJson,
                "frame must be a JSON object {\"event\": \"...\", \"data\": {...}}",
            ),
        ));
    };
    let event = match frame.get("event") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => {
            return Err(bad(
                None,
                Error::new(ErrorCode::MalformedJson, "event is required"),
            ));
        }
        Some(_) => {
            return Err(bad(
                None,
                Error::new(ErrorCode::MalformedJson, "event must be a string"),
            ));
        }
    };
    let data = || match frame.get("data") {
        Some(Value::Object(d)) => Ok(d),
        None | Some(Value::Null) => Err(bad(Some(event), Error::invalid("data is required"))),
        Some(_) => Err(bad(Some(event), Error::invalid("data must be an object"))),
    };
    match event {
        "ping" => Ok(ClientFrame::Ping),
        "chat:typing" => {
            let d = data()?;
            let pairs: Vec<(String, Value)> =
                d.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            check_claims(&pairs, me, &["sender_id", "user_id"]).map_err(|e| bad(Some(event), e))?;
            let to = match (d.get("room_id"), d.get("receiver_id")) {
                (Some(r), _) if !blank(r) => Conversation::Room(
                    room_param("room_id", Some(r))
                        .map_err(|e| bad(Some(event), e))?
                        .ok_or_else(|| {
                            bad(
                                Some(event),
                                Error::invalid("room_id must be a positive integer"),
                            )
                        })?,
                ),
                (_, r) => {
                    let peer = user_param("receiver_id", r)
                        .map_err(|e| bad(Some(event), e))?
                        .ok_or_else(|| {
                            bad(Some(event), Error::invalid("receiver_id is required"))
                        })?;
                    if &peer == me {
                        return Err(bad(
                            Some(event),
                            Error::invalid("receiver_id must be another user"),
                        ));
                    }
                    Conversation::With(peer)
                }
            };
            let typing = match d.get("is_typing") {
                Some(Value::Bool(b)) => *b,
                None | Some(Value::Null) => {
                    return Err(bad(Some(event), Error::invalid("is_typing is required")));
                }
                Some(_) => {
                    return Err(bad(
                        Some(event),
                        Error::invalid("is_typing must be true or false"),
                    ));
                }
            };
            Ok(ClientFrame::Typing { to, typing })
        }
        "chat:read" => {
            let d = data()?;
            let pairs: Vec<(String, Value)> =
                d.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            check_claims(&pairs, me, &["read_by", "user_id"]).map_err(|e| bad(Some(event), e))?;
            let message = match d.get("message_id") {
                None | Some(Value::Null) => {
                    return Err(bad(Some(event), Error::invalid("message_id is required")));
                }
                Some(v) => positive(v)
                    .and_then(|n| MessageId::parse(n).ok())
                    .ok_or_else(|| {
                        bad(
                            Some(event),
                            Error::invalid("message_id must be a positive integer"),
                        )
                    })?,
            };
            let room = room_param("room_id", d.get("room_id")).map_err(|e| bad(Some(event), e))?;
            let within = match room {
                Some(r) => Some(Conversation::Room(r)),
                None => {
                    let mut peer = None;
                    for key in ["sender_id", "receiver_id"] {
                        let u = user_param(key, d.get(key)).map_err(|e| bad(Some(event), e))?;
                        if let Some(u) = u
                            && &u != me
                        {
                            peer = Some(u);
                        }
                    }
                    peer.map(Conversation::With)
                }
            };
            Ok(ClientFrame::Read { message, within })
        }
        other => Err(bad(
            Some(other),
            Error::new(
                ErrorCode::UnknownOp,
                format!("unknown event {other:?}: send chat:typing, chat:read or ping"),
            ),
        )),
    }
}

// ------------------------------------------------------------------------------------------
// Parameters (REST and frame data)
// ------------------------------------------------------------------------------------------

/// Request parameters in arrival order (query string first, then the body); a key may repeat
/// and the last value counts (PHP's `$_REQUEST`).
pub type Params = Vec<(String, Value)>;

/// The value of `key` (its last occurrence).
pub fn param<'a>(p: &'a Params, key: &str) -> Option<&'a Value> {
    p.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Absent in PHP's sense: null or a blank string.
pub fn blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }
}

/// A non-negative integer given as a JSON number or a decimal string.
fn integer(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        _ => None,
    }
}

fn positive(v: &Value) -> Option<u64> {
    integer(v).filter(|n| *n > 0)
}

/// Refuses any of `keys` whose value names another user than `me` (blank values are absent).
pub fn check_claims(p: &Params, me: &UserId, keys: &[&str]) -> Result<(), Error> {
    for (k, v) in p {
        if !keys.contains(&k.as_str()) || blank(v) {
            continue;
        }
        let claimed = match v {
            Value::String(s) => s.trim().to_owned(),
            Value::Number(n) => n.to_string(),
            other => other.to_string(),
        };
        if claimed != me.as_str() {
            return Err(Error::new(
                ErrorCode::Forbidden,
                format!("{k} does not match the authenticated user"),
            ));
        }
    }
    Ok(())
}

/// A user id given as a number or a string; `None` when absent or blank.
pub fn user_param(name: &str, v: Option<&Value>) -> Result<Option<UserId>, Error> {
    let Some(v) = v.filter(|v| !blank(v)) else {
        return Ok(None);
    };
    let text = match v {
        Value::Number(n) => match n.as_u64() {
            Some(n) => n.to_string(),
            None => {
                return Err(Error::invalid(format!(
                    "{name} must be a user id (a number or a string)"
                )));
            }
        },
        Value::String(s) => s.trim().to_owned(),
        _ => {
            return Err(Error::invalid(format!(
                "{name} must be a user id (a number or a string)"
            )));
        }
    };
    UserId::parse(&text)
        .map(Some)
        .map_err(|e| Error::invalid(format!("{name}: {e}")))
}

/// A room id; `None` when absent or blank.
pub fn room_param(name: &str, v: Option<&Value>) -> Result<Option<RoomId>, Error> {
    match v.filter(|v| !blank(v)) {
        None => Ok(None),
        Some(v) => positive(v)
            .and_then(|n| RoomId::parse(n).ok())
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("{name} must be a positive integer"))),
    }
}

/// `before_message_id`: a message id; absent, blank or `0` mean none.
pub fn before_param(v: Option<&Value>) -> Result<Option<MessageId>, Error> {
    match v.filter(|v| !blank(v)) {
        None => Ok(None),
        Some(v) => match integer(v) {
            Some(0) => Ok(None),
            Some(n) => MessageId::parse(n).map(Some).map_err(|_| {
                Error::invalid("before_message_id must be a message id (a positive integer)")
            }),
            None => Err(Error::invalid(
                "before_message_id must be a message id (a positive integer)",
            )),
        },
    }
}

/// A text parameter (`message`): a string, or a number taken as its text; `None` when absent
/// or blank.
pub fn text_param(name: &str, v: Option<&Value>) -> Result<Option<String>, Error> {
    match v.filter(|v| !blank(v)) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Error::invalid(format!("{name} must be a string"))),
    }
}

/// `duration` of a voice message in seconds: a non-negative number (a fraction is rounded);
/// `None` when absent or blank.
pub fn duration_param(v: Option<&Value>) -> Result<Option<u32>, Error> {
    let bad = || Error::invalid("duration must be a non-negative number of seconds");
    let secs = match v.filter(|v| !blank(v)) {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_f64().ok_or_else(bad)?,
        Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| bad())?,
        Some(_) => return Err(bad()),
    };
    if !secs.is_finite() || secs < 0.0 || secs > f64::from(u32::MAX) {
        return Err(bad());
    }
    // Finite and within u32: the cast is exact after rounding.
    Ok(Some(secs.round() as u32))
}

/// The name a voice file is stored under: the client's when its extension is an accepted audio
/// one; else `voice.<ext>` from the part's Content-Type (a recorder's blob often has no usable
/// name); else the client's, which the upload service then refuses with the accepted list.
pub fn voice_file_name(name: Option<&str>, content_type: Option<&str>) -> Option<String> {
    let accepted = crate::uploads::MediaKind::Audio
        .extensions()
        .unwrap_or_default();
    if crate::uploads::sanitized_extension(name).is_some_and(|e| accepted.contains(&e.as_str())) {
        return name.map(str::to_owned);
    }
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    let ext = match essence.as_deref() {
        Some("audio/mpeg" | "audio/mp3") => "mp3",
        Some("audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave") => "wav",
        Some("audio/ogg" | "audio/opus") => "ogg",
        Some("audio/mp4" | "audio/m4a" | "audio/x-m4a") => "m4a",
        Some("audio/aac" | "audio/x-aac") => "aac",
        Some("audio/flac" | "audio/x-flac") => "flac",
        Some("audio/x-ms-wma") => "wma",
        _ => return name.map(str::to_owned),
    };
    Some(format!("voice.{ext}"))
}

/// A page of a list route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Page size, 1 to [`MAX_LIMIT`] (larger asks are clamped).
    pub limit: u32,
    /// Entries skipped, 0 to [`MAX_OFFSET`].
    pub offset: u32,
}

/// `limit` (default [`DEFAULT_LIMIT`], clamped to [`MAX_LIMIT`]) and `offset` (default 0).
pub fn page_params(p: &Params) -> Result<Page, Error> {
    let limit = match param(p, "limit").filter(|v| !blank(v)) {
        None => DEFAULT_LIMIT,
        Some(v) => positive(v)
            .ok_or_else(|| Error::invalid("limit must be a positive integer"))?
            .min(u64::from(MAX_LIMIT)) as u32,
    };
    let offset = match param(p, "offset").filter(|v| !blank(v)) {
        None => 0,
        Some(v) => {
            let n = integer(v)
                .ok_or_else(|| Error::invalid("offset must be a non-negative integer"))?;
            if n > u64::from(MAX_OFFSET) {
                return Err(Error::invalid(format!("offset is at most {MAX_OFFSET}")));
            }
            n as u32
        }
    };
    Ok(Page { limit, offset })
}

/// The pairs of a query string, values as strings.
pub fn query_params(q: Option<&str>) -> Result<Params, Error> {
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
        .map_err(|e| Error::invalid(format!("bad query string: {e}")))?;
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect())
}

/// The parameters of a non-multipart body: a JSON object (`Content-Type: application/json`,
/// or no type and a body starting with `{`), else `application/x-www-form-urlencoded`.
pub fn body_params(content_type: Option<&str>, body: &[u8]) -> Result<Params, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let ctype = content_type.unwrap_or_default().to_ascii_lowercase();
    let json = ctype.contains("json")
        || (!ctype.contains("x-www-form-urlencoded")
            && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'));
    if json {
        return match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m.into_iter().collect()),
            Ok(_) => Err(Error::new(
                ErrorCode::MalformedJson,
                "the body must be a JSON object",
            )),
            Err(e) => Err(Error::new(
                ErrorCode::MalformedJson,
                format!("the body is not valid JSON: {e}"),
            )),
        };
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| Error::invalid(format!("the body is not a valid form: {e}")))?;
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect())
}

// ------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------

/// The `sender` object of a message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SenderView {
    /// The user id (a number when numeric).
    pub user_id: Value,
    /// Username, if known.
    pub username: Option<String>,
    /// Display name, if known.
    pub name: Option<String>,
    /// Avatar URL, if known.
    pub profile_url: Option<String>,
}

impl SenderView {
    /// The view of `id`, with its profile when known.
    pub fn of(id: &UserId, profile: Option<&Profile>) -> Self {
        Self {
            user_id: user_id_json(id),
            username: profile.and_then(|p| p.username.clone()),
            name: profile.and_then(|p| p.name.clone()),
            profile_url: profile.and_then(|p| p.avatar.clone()),
        }
    }
}

/// A message as `chat:message` data, the `send_chat_message.php` answer (without `sender`)
/// and the list routes show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MessageData {
    /// Message id.
    pub message_id: u64,
    /// Author.
    pub sender_id: Value,
    /// The other member of a direct room; `null` in a group.
    pub receiver_id: Value,
    /// The room, for group messages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_id: Option<u64>,
    /// `text`, `image`, `voice`, `video`, `file` or `deleted`.
    pub message_type: &'static str,
    /// The text, or a media message's caption (`null` without one).
    pub message: Option<String>,
    /// Upload path of a media message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_url: Option<String>,
    /// Voice only: seconds, `null` when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_duration: Option<Option<u32>>,
    /// Media only: stored bytes, `null` when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_size: Option<Option<u64>>,
    /// Who sent it (events and lists; not in the send answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<SenderView>,
    /// When the room accepted it, `YYYY-MM-DD HH:MM:SS` UTC.
    pub created_at: String,
}

/// The seed's `message_type` of a body.
pub fn message_type(b: &MessageBody) -> &'static str {
    match b {
        MessageBody::Text { .. } => "text",
        MessageBody::Image(_) => "image",
        MessageBody::Audio(_) => "voice",
        MessageBody::Video(_) => "video",
        MessageBody::File(_) => "file",
        MessageBody::Deleted {} => "deleted",
    }
}

/// `m` as the dialect shows it; `receiver` is the other member of a direct room (`None`: a
/// group).
pub fn message_data(
    m: &Message,
    receiver: Option<&UserId>,
    sender: Option<SenderView>,
) -> MessageData {
    let media = m.body.media();
    let text = match &m.body {
        MessageBody::Text { text } => Some(text.clone()),
        _ => media.and_then(|x| x.caption.clone()),
    };
    MessageData {
        message_id: m.id.0,
        sender_id: user_id_json(&m.sender),
        receiver_id: receiver.map_or(Value::Null, user_id_json),
        room_id: receiver.is_none().then_some(m.room.0),
        message_type: message_type(&m.body),
        message: text,
        media_url: media.map(|x| x.media.clone()),
        media_duration: match &m.body {
            MessageBody::Audio(x) => Some(x.duration),
            _ => None,
        },
        file_size: media.map(|x| x.size),
        sender,
        created_at: sql_datetime(m.created_at),
    }
}

/// `other_user` of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OtherUser {
    /// The user id.
    pub user_id: Value,
    /// Username, if known.
    pub username: Option<String>,
    /// Display name, if known.
    pub name: Option<String>,
    /// Avatar URL, if known.
    pub profile_url: Option<String>,
    /// Whether they have a session (false across a block).
    pub is_online: bool,
}

/// One entry of `get_conversations.php`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConversationData {
    /// The direct room's id.
    pub conversation_id: u64,
    /// The other user (`null` if their profile is gone).
    pub other_user: Option<OtherUser>,
    /// The newest message, with `sender`.
    pub last_message: Option<MessageData>,
    /// Messages from the other user newer than the caller's read marker.
    pub unread_count: u32,
    /// The newest message's time, else the room's creation.
    pub updated_at: String,
}

/// A direct chat of `me` as a conversation.
pub fn conversation(c: &Chat, me: &Profile) -> ConversationData {
    let peer = c.peer.as_ref().map(|u| &u.profile);
    let last_message = c.last_message.as_ref().map(|m| {
        let (sender, receiver) = if m.sender == me.id {
            (Some(me), peer.map(|p| &p.id))
        } else {
            (peer.filter(|p| p.id == m.sender), Some(&me.id))
        };
        message_data(
            m,
            Some(receiver.unwrap_or(&me.id)),
            Some(SenderView::of(&m.sender, sender)),
        )
    });
    ConversationData {
        conversation_id: c.room.id.0,
        other_user: peer.map(|p| OtherUser {
            user_id: user_id_json(&p.id),
            username: p.username.clone(),
            name: p.name.clone(),
            profile_url: p.avatar.clone(),
            is_online: c.peer_online.unwrap_or(false),
        }),
        last_message,
        unread_count: c.unread,
        updated_at: sql_datetime(
            c.last_message
                .as_ref()
                .map_or(c.room.created_at, |m| m.created_at),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Frames and bodies
// ------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Frame<'a, T: Serialize> {
    event: &'a str,
    data: T,
}

/// JSON text of a value whose serialisation cannot fail (plain structs, strings, numbers).
fn text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        tracing::error!(error = %e, "events: encoding failed");
        String::from(
            r#"{"event":"chat:error","data":{"message":"encoding failed","code":"internal","event":null}}"#,
        )
    })
}

/// A frame `{"event": name, "data": data}`.
pub fn frame<T: Serialize>(event: &str, data: T) -> String {
    text(&Frame { event, data })
}

#[derive(Serialize)]
struct Connected<'a> {
    user_id: Value,
    message: &'a str,
    timestamp: String,
    connected_users: usize,
}

/// `chat:connected`.
pub fn encode_connected(user: &UserId, at: Millis, connected_users: usize) -> String {
    frame(
        "chat:connected",
        Connected {
            user_id: user_id_json(user),
            message: CONNECTED,
            timestamp: sql_datetime(at),
            connected_users,
        },
    )
}

/// `chat:message`.
pub fn encode_message(data: &MessageData) -> String {
    frame("chat:message", data)
}

#[derive(Serialize)]
struct UserStatus {
    user_id: Value,
    status: &'static str,
    timestamp: String,
}

/// `chat:user_status`; `at` is when it changed.
pub fn encode_user_status(user: &UserId, online: bool, at: Millis) -> String {
    frame(
        "chat:user_status",
        UserStatus {
            user_id: user_id_json(user),
            status: if online { "online" } else { "offline" },
            timestamp: sql_datetime(at),
        },
    )
}

#[derive(Serialize)]
struct Typing {
    sender_id: Value,
    is_typing: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_id: Option<u64>,
}

/// `chat:typing`; `group` is the room when it is a group.
pub fn encode_typing(sender: &UserId, typing: bool, group: Option<RoomId>) -> String {
    frame(
        "chat:typing",
        Typing {
            sender_id: user_id_json(sender),
            is_typing: typing,
            room_id: group.map(|r| r.0),
        },
    )
}

#[derive(Serialize)]
struct Read {
    message_id: u64,
    read_by: Value,
    room_id: u64,
}

/// `chat:read`.
pub fn encode_read(message: MessageId, reader: &UserId, room: RoomId) -> String {
    frame(
        "chat:read",
        Read {
            message_id: message.0,
            read_by: user_id_json(reader),
            room_id: room.0,
        },
    )
}

#[derive(Serialize)]
struct ErrorData<'a> {
    message: &'a str,
    code: &'static str,
    event: Option<&'a str>,
}

/// `chat:error` answering the client's `event` (`None`: the frame had no readable event).
pub fn encode_error(event: Option<&str>, e: &Error) -> String {
    frame(
        "chat:error",
        ErrorData {
            message: &e.message,
            code: e.code.as_str(),
            event,
        },
    )
}

/// `pong`.
pub fn encode_pong() -> String {
    frame("pong", serde_json::Map::new())
}

/// `{"status":"success","message":"Message sent successfully","data":...}`.
#[derive(Serialize)]
pub struct SentBody {
    status: &'static str,
    message: &'static str,
    data: MessageData,
}

/// The answer of a successful send.
pub fn sent_body(data: MessageData) -> SentBody {
    SentBody {
        status: "success",
        message: SENT,
        data,
    }
}

/// `{"status":"success","data":...}`.
#[derive(Serialize)]
pub struct SuccessBody<T: Serialize> {
    status: &'static str,
    data: T,
}

/// A successful answer carrying `data`.
pub fn success_body<T: Serialize>(data: T) -> SuccessBody<T> {
    SuccessBody {
        status: "success",
        data,
    }
}

/// `{"status":"error","message":...}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    status: &'static str,
    message: &'a str,
}

/// The answer of a failed request.
pub fn error_body(message: &str) -> ErrorBody<'_> {
    ErrorBody {
        status: "error",
        message,
    }
}

/// `get_conversations.php`'s `data`.
#[derive(Serialize)]
pub struct ConversationsPage {
    /// The conversations, most recently active first.
    pub conversations: Vec<ConversationData>,
    /// The page size used.
    pub limit: u32,
    /// Entries skipped.
    pub offset: u32,
    /// Whether more follow.
    pub has_more: bool,
}

/// `get_conversation_messages.php`'s `data`.
#[derive(Serialize)]
pub struct MessagesPage {
    /// The messages, oldest first.
    pub messages: Vec<MessageData>,
    /// The page size used.
    pub limit: u32,
    /// Messages skipped.
    pub offset: u32,
    /// Whether older messages remain.
    pub has_more: bool,
}

/// JSON text of a REST body.
pub fn body_text<T: Serialize>(body: &T) -> String {
    text(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Chat, Media, Role, Room, RoomKind, User};

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    /// 2026-01-23 20:30:45 UTC.
    const T: Millis = 1_769_200_245_000;

    fn msg(body: MessageBody) -> Message {
        Message::new(MessageId(123), RoomId(77), 1, uid("1928798"), body, T)
    }

    fn me() -> UserId {
        uid("1928800")
    }

    fn decode(s: &str) -> Result<ClientFrame, FrameError> {
        decode_frame(s, &me())
    }

    fn err(event: Option<&str>, code: ErrorCode, message: &str) -> Result<ClientFrame, FrameError> {
        Err(FrameError {
            event: event.map(str::to_owned),
            error: Error::new(code, message),
        })
    }

    #[test]
    fn decodes_typing() {
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":1928798,"is_typing":true}}"#),
            Ok(ClientFrame::Typing {
                to: Conversation::With(uid("1928798")),
                typing: true
            })
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":"1928798","is_typing":false}}"#),
            Ok(ClientFrame::Typing {
                to: Conversation::With(uid("1928798")),
                typing: false
            })
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"room_id":"42","is_typing":true}}"#),
            Ok(ClientFrame::Typing {
                to: Conversation::Room(RoomId(42)),
                typing: true
            })
        );
        // The token's own id as sender_id is fine.
        assert_eq!(
            decode(
                r#"{"event":"chat:typing","data":{"sender_id":1928800,"receiver_id":5,"is_typing":true}}"#
            ),
            Ok(ClientFrame::Typing {
                to: Conversation::With(uid("5")),
                typing: true
            })
        );
    }

    #[test]
    fn refuses_bad_typing() {
        let ev = Some("chat:typing");
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"is_typing":true}}"#),
            err(ev, ErrorCode::InvalidField, "receiver_id is required")
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":5}}"#),
            err(ev, ErrorCode::InvalidField, "is_typing is required")
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":5,"is_typing":"yes"}}"#),
            err(
                ev,
                ErrorCode::InvalidField,
                "is_typing must be true or false"
            )
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":[5],"is_typing":true}}"#),
            err(
                ev,
                ErrorCode::InvalidField,
                "receiver_id must be a user id (a number or a string)"
            )
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":{"receiver_id":1928800,"is_typing":true}}"#),
            err(
                ev,
                ErrorCode::InvalidField,
                "receiver_id must be another user"
            )
        );
        assert_eq!(
            decode(
                r#"{"event":"chat:typing","data":{"sender_id":1,"receiver_id":5,"is_typing":true}}"#
            ),
            err(
                ev,
                ErrorCode::Forbidden,
                "sender_id does not match the authenticated user"
            )
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing","data":[1]}"#),
            err(ev, ErrorCode::InvalidField, "data must be an object")
        );
        assert_eq!(
            decode(r#"{"event":"chat:typing"}"#),
            err(ev, ErrorCode::InvalidField, "data is required")
        );
    }

    #[test]
    fn decodes_read() {
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{"message_id":123}}"#),
            Ok(ClientFrame::Read {
                message: MessageId(123),
                within: None
            })
        );
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{"message_id":"123","sender_id":1928798}}"#),
            Ok(ClientFrame::Read {
                message: MessageId(123),
                within: Some(Conversation::With(uid("1928798")))
            })
        );
        // Whichever of sender_id / receiver_id is not the reader names the conversation.
        assert_eq!(
            decode(
                r#"{"event":"chat:read","data":{"message_id":1,"sender_id":"9","receiver_id":1928800}}"#
            ),
            Ok(ClientFrame::Read {
                message: MessageId(1),
                within: Some(Conversation::With(uid("9")))
            })
        );
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{"message_id":1,"room_id":77}}"#),
            Ok(ClientFrame::Read {
                message: MessageId(1),
                within: Some(Conversation::Room(RoomId(77)))
            })
        );
    }

    #[test]
    fn refuses_bad_read() {
        let ev = Some("chat:read");
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{}}"#),
            err(ev, ErrorCode::InvalidField, "message_id is required")
        );
        for bad in [r#""abc""#, "0", "-3", "1.5", r#""""#] {
            assert_eq!(
                decode(&format!(
                    r#"{{"event":"chat:read","data":{{"message_id":{bad}}}}}"#
                )),
                err(
                    ev,
                    ErrorCode::InvalidField,
                    "message_id must be a positive integer"
                ),
                "{bad}"
            );
        }
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{"message_id":1,"read_by":2}}"#),
            err(
                ev,
                ErrorCode::Forbidden,
                "read_by does not match the authenticated user"
            )
        );
        assert_eq!(
            decode(r#"{"event":"chat:read","data":{"message_id":1,"room_id":"x"}}"#),
            err(
                ev,
                ErrorCode::InvalidField,
                "room_id must be a positive integer"
            )
        );
    }

    #[test]
    fn decodes_ping_and_refuses_garbage() {
        assert_eq!(decode(r#"{"event":"ping"}"#), Ok(ClientFrame::Ping));
        assert_eq!(
            decode(r#"{"event":"ping","data":{}}"#),
            Ok(ClientFrame::Ping)
        );
        assert_eq!(
            decode("[]"),
            err(
                None,
                ErrorCode::MalformedJson,
                r#"frame must be a JSON object {"event": "...", "data": {...}}"#
            )
        );
        assert_eq!(
            decode(r#"{"data":{}}"#),
            err(None, ErrorCode::MalformedJson, "event is required")
        );
        assert_eq!(
            decode(r#"{"event":5}"#),
            err(None, ErrorCode::MalformedJson, "event must be a string")
        );
        assert_eq!(
            decode(r#"{"event":"chat:message","data":{}}"#),
            err(
                Some("chat:message"),
                ErrorCode::UnknownOp,
                r#"unknown event "chat:message": send chat:typing, chat:read or ping"#
            )
        );
        let e = decode("{nope").unwrap_err();
        assert_eq!(e.event, None);
        assert_eq!(e.error.code, ErrorCode::MalformedJson);
        assert!(e.error.message.starts_with("frame is not valid JSON: "));
    }

    #[test]
    fn encodes_connected_status_typing_read_error_pong() {
        assert_eq!(
            encode_connected(&me(), T, 5),
            r#"{"event":"chat:connected","data":{"user_id":1928800,"message":"Successfully connected to chat server","timestamp":"2026-01-23 20:30:45","connected_users":5}}"#
        );
        assert_eq!(
            encode_connected(&uid("ann"), T, 1),
            r#"{"event":"chat:connected","data":{"user_id":"ann","message":"Successfully connected to chat server","timestamp":"2026-01-23 20:30:45","connected_users":1}}"#
        );
        assert_eq!(
            encode_user_status(&uid("1928798"), true, T),
            r#"{"event":"chat:user_status","data":{"user_id":1928798,"status":"online","timestamp":"2026-01-23 20:30:45"}}"#
        );
        assert_eq!(
            encode_user_status(&uid("1928798"), false, T),
            r#"{"event":"chat:user_status","data":{"user_id":1928798,"status":"offline","timestamp":"2026-01-23 20:30:45"}}"#
        );
        assert_eq!(
            encode_typing(&uid("1928798"), true, None),
            r#"{"event":"chat:typing","data":{"sender_id":1928798,"is_typing":true}}"#
        );
        assert_eq!(
            encode_typing(&uid("1928798"), false, Some(RoomId(9))),
            r#"{"event":"chat:typing","data":{"sender_id":1928798,"is_typing":false,"room_id":9}}"#
        );
        assert_eq!(
            encode_read(MessageId(123), &me(), RoomId(77)),
            r#"{"event":"chat:read","data":{"message_id":123,"read_by":1928800,"room_id":77}}"#
        );
        assert_eq!(
            encode_error(
                Some("chat:read"),
                &Error::not_found("message 5 not found in room 7")
            ),
            r#"{"event":"chat:error","data":{"message":"message 5 not found in room 7","code":"not_found","event":"chat:read"}}"#
        );
        assert_eq!(
            encode_error(
                None,
                &Error::new(ErrorCode::MalformedJson, "event is required")
            ),
            r#"{"event":"chat:error","data":{"message":"event is required","code":"malformed_json","event":null}}"#
        );
        assert_eq!(encode_pong(), r#"{"event":"pong","data":{}}"#);
    }

    fn john() -> Profile {
        Profile {
            id: uid("1928798"),
            username: Some("john_doe".into()),
            name: Some("John Doe".into()),
            avatar: Some("https://x/u.jpg".into()),
            language: None,
        }
    }

    #[test]
    fn encodes_text_image_voice_messages() {
        let sender = Some(SenderView::of(&uid("1928798"), Some(&john())));
        let text = msg(MessageBody::Text {
            text: "Hello!".into(),
        });
        assert_eq!(
            encode_message(&message_data(&text, Some(&me()), sender.clone())),
            r#"{"event":"chat:message","data":{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"text","message":"Hello!","sender":{"user_id":1928798,"username":"john_doe","name":"John Doe","profile_url":"https://x/u.jpg"},"created_at":"2026-01-23 20:30:45"}}"#
        );
        let image = msg(MessageBody::Image(Media {
            media: "/uploads/chat-messages/images/a.webp".into(),
            caption: None,
            duration: None,
            size: Some(245_678),
        }));
        assert_eq!(
            encode_message(&message_data(&image, Some(&me()), sender.clone())),
            r#"{"event":"chat:message","data":{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"image","message":null,"media_url":"/uploads/chat-messages/images/a.webp","file_size":245678,"sender":{"user_id":1928798,"username":"john_doe","name":"John Doe","profile_url":"https://x/u.jpg"},"created_at":"2026-01-23 20:30:45"}}"#
        );
        let voice = msg(MessageBody::Audio(Media {
            media: "/uploads/chat-messages/audios/v.mp3".into(),
            caption: None,
            duration: Some(15),
            size: Some(456_789),
        }));
        assert_eq!(
            text_of(&message_data(&voice, Some(&me()), None)),
            r#"{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"voice","message":null,"media_url":"/uploads/chat-messages/audios/v.mp3","media_duration":15,"file_size":456789,"created_at":"2026-01-23 20:30:45"}"#
        );
        // Unknown duration and size are null; a caption is the message.
        let voice = msg(MessageBody::Audio(Media {
            media: "/uploads/v.ogg".into(),
            caption: Some("listen".into()),
            duration: None,
            size: None,
        }));
        assert_eq!(
            text_of(&message_data(&voice, Some(&me()), None)),
            r#"{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"voice","message":"listen","media_url":"/uploads/v.ogg","media_duration":null,"file_size":null,"created_at":"2026-01-23 20:30:45"}"#
        );
    }

    fn text_of<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn encodes_group_video_file_deleted_and_unknown_sender() {
        let video = msg(MessageBody::Video(Media {
            media: "/uploads/x.mp4".into(),
            caption: None,
            duration: Some(3),
            size: Some(10),
        }));
        assert_eq!(
            text_of(&message_data(
                &video,
                None,
                Some(SenderView::of(&uid("1928798"), None))
            )),
            r#"{"message_id":123,"sender_id":1928798,"receiver_id":null,"room_id":77,"message_type":"video","message":null,"media_url":"/uploads/x.mp4","file_size":10,"sender":{"user_id":1928798,"username":null,"name":null,"profile_url":null},"created_at":"2026-01-23 20:30:45"}"#
        );
        let file = msg(MessageBody::File(Media {
            media: "/uploads/x.pdf".into(),
            caption: Some("doc".into()),
            duration: None,
            size: None,
        }));
        assert_eq!(
            text_of(&message_data(&file, Some(&me()), None)),
            r#"{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"file","message":"doc","media_url":"/uploads/x.pdf","file_size":null,"created_at":"2026-01-23 20:30:45"}"#
        );
        let deleted = msg(MessageBody::Deleted {});
        assert_eq!(
            text_of(&message_data(&deleted, Some(&me()), None)),
            r#"{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"deleted","message":null,"created_at":"2026-01-23 20:30:45"}"#
        );
    }

    #[test]
    fn encodes_rest_bodies() {
        let text = msg(MessageBody::Text {
            text: "Hello, how are you?".into(),
        });
        assert_eq!(
            body_text(&sent_body(message_data(&text, Some(&me()), None))),
            r#"{"status":"success","message":"Message sent successfully","data":{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"text","message":"Hello, how are you?","created_at":"2026-01-23 20:30:45"}}"#
        );
        assert_eq!(
            body_text(&error_body("receiver profile not found")),
            r#"{"status":"error","message":"receiver profile not found"}"#
        );
        let page = MessagesPage {
            messages: vec![],
            limit: 50,
            offset: 0,
            has_more: false,
        };
        assert_eq!(
            body_text(&success_body(page)),
            r#"{"status":"success","data":{"messages":[],"limit":50,"offset":0,"has_more":false}}"#
        );
    }

    #[test]
    fn encodes_a_conversation() {
        let me_p = Profile {
            id: me(),
            username: Some("me".into()),
            name: None,
            avatar: None,
            language: None,
        };
        let mut last = msg(MessageBody::Text { text: "hi".into() });
        last.created_at = T + 1000;
        let chat = Chat {
            room: Room {
                id: RoomId(77),
                kind: RoomKind::Direct,
                name: None,
                avatar: None,
                public: false,
                created_by: me(),
                created_at: T,
                last_seq: 1,
                last_message_id: Some(MessageId(123)),
            },
            role: Role::Member,
            peer: Some(User {
                profile: john(),
                created_at: 0,
                updated_at: 0,
                last_seen: None,
            }),
            peer_online: Some(true),
            friendship: None,
            member_count: 2,
            last_message: Some(last),
            unread: 1,
            read_up_to: None,
        };
        assert_eq!(
            text_of(&conversation(&chat, &me_p)),
            r#"{"conversation_id":77,"other_user":{"user_id":1928798,"username":"john_doe","name":"John Doe","profile_url":"https://x/u.jpg","is_online":true},"last_message":{"message_id":123,"sender_id":1928798,"receiver_id":1928800,"message_type":"text","message":"hi","sender":{"user_id":1928798,"username":"john_doe","name":"John Doe","profile_url":"https://x/u.jpg"},"created_at":"2026-01-23 20:30:46"},"unread_count":1,"updated_at":"2026-01-23 20:30:46"}"#
        );
        let empty = Chat {
            last_message: None,
            peer_online: None,
            unread: 0,
            ..chat
        };
        assert_eq!(
            text_of(&conversation(&empty, &me_p)),
            r#"{"conversation_id":77,"other_user":{"user_id":1928798,"username":"john_doe","name":"John Doe","profile_url":"https://x/u.jpg","is_online":false},"last_message":null,"unread_count":0,"updated_at":"2026-01-23 20:30:45"}"#
        );
    }

    #[test]
    fn reads_parameters() {
        let p = body_params(
            Some("application/json"),
            br#"{"sender_id":1928798,"receiver_id":"1928800","message":"hi","limit":"20","offset":5}"#,
        )
        .unwrap();
        assert_eq!(
            user_param("receiver_id", param(&p, "receiver_id")),
            Ok(Some(uid("1928800")))
        );
        assert_eq!(
            user_param("sender_id", param(&p, "sender_id")),
            Ok(Some(uid("1928798")))
        );
        assert_eq!(
            text_param("message", param(&p, "message")),
            Ok(Some("hi".into()))
        );
        assert_eq!(
            page_params(&p),
            Ok(Page {
                limit: 20,
                offset: 5
            })
        );
        assert_eq!(
            check_claims(&p, &uid("1928798"), &["sender_id", "user_id"]),
            Ok(())
        );
        assert_eq!(
            check_claims(&p, &uid("1"), &["sender_id", "user_id"]),
            Err(Error::new(
                ErrorCode::Forbidden,
                "sender_id does not match the authenticated user"
            ))
        );

        let form = body_params(
            Some("application/x-www-form-urlencoded"),
            b"sender_id=1928798&receiver_id=1928800&message=Hello%2C+you&duration=",
        )
        .unwrap();
        assert_eq!(
            form,
            vec![
                ("sender_id".to_owned(), Value::from("1928798")),
                ("receiver_id".to_owned(), Value::from("1928800")),
                ("message".to_owned(), Value::from("Hello, you")),
                ("duration".to_owned(), Value::from("")),
            ]
        );
        assert_eq!(duration_param(param(&form, "duration")), Ok(None));
        // No content type: sniffed.
        assert_eq!(
            body_params(None, br#" {"a":1}"#).unwrap(),
            vec![("a".to_owned(), Value::from(1))]
        );
        assert_eq!(
            body_params(None, b"a=1").unwrap(),
            vec![("a".to_owned(), Value::from("1"))]
        );
        assert_eq!(
            body_params(Some("application/json"), b"  ").unwrap(),
            vec![]
        );
        assert_eq!(
            body_params(Some("application/json"), b"[1]"),
            Err(Error::new(
                ErrorCode::MalformedJson,
                "the body must be a JSON object"
            ))
        );
        assert!(
            body_params(Some("application/json"), b"{x")
                .unwrap_err()
                .message
                .starts_with("the body is not valid JSON: ")
        );
        assert_eq!(
            query_params(Some("user_id=5&token=a.b.c&name=John%20Doe")).unwrap(),
            vec![
                ("user_id".to_owned(), Value::from("5")),
                ("token".to_owned(), Value::from("a.b.c")),
                ("name".to_owned(), Value::from("John Doe")),
            ]
        );
    }

    #[test]
    fn names_voice_files() {
        assert_eq!(
            voice_file_name(Some("note.MP3"), Some("application/octet-stream")),
            Some("note.MP3".into())
        );
        assert_eq!(
            voice_file_name(Some("blob"), Some("audio/wav")),
            Some("voice.wav".into())
        );
        assert_eq!(
            voice_file_name(None, Some("audio/ogg; codecs=opus")),
            Some("voice.ogg".into())
        );
        assert_eq!(
            voice_file_name(Some("rec.webm"), Some("audio/webm")),
            Some("rec.webm".into())
        );
        assert_eq!(voice_file_name(None, None), None);
    }

    #[test]
    fn refuses_bad_parameters() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(
            user_param("receiver_id", Some(&v("true"))),
            Err(Error::invalid(
                "receiver_id must be a user id (a number or a string)"
            ))
        );
        assert_eq!(
            user_param("receiver_id", Some(&v("-1"))),
            Err(Error::invalid(
                "receiver_id must be a user id (a number or a string)"
            ))
        );
        assert_eq!(user_param("receiver_id", Some(&v(r#"" ""#))), Ok(None));
        assert_eq!(
            text_param("message", Some(&v("{}"))),
            Err(Error::invalid("message must be a string"))
        );
        assert_eq!(text_param("message", Some(&v("12"))), Ok(Some("12".into())));
        assert_eq!(duration_param(Some(&v("15"))), Ok(Some(15)));
        assert_eq!(duration_param(Some(&v(r#""15.6""#))), Ok(Some(16)));
        for bad in ["-1", r#""abc""#, "[]"] {
            assert_eq!(
                duration_param(Some(&v(bad))),
                Err(Error::invalid(
                    "duration must be a non-negative number of seconds"
                )),
                "{bad}"
            );
        }
        assert_eq!(before_param(Some(&v("0"))), Ok(None));
        assert_eq!(before_param(Some(&v(r#""124""#))), Ok(Some(MessageId(124))));
        assert_eq!(
            before_param(Some(&v(r#""x""#))),
            Err(Error::invalid(
                "before_message_id must be a message id (a positive integer)"
            ))
        );
        let p = |s: &str| body_params(None, s.as_bytes()).unwrap();
        assert_eq!(
            page_params(&p("limit=0")),
            Err(Error::invalid("limit must be a positive integer"))
        );
        assert_eq!(
            page_params(&p("limit=500")),
            Ok(Page {
                limit: 200,
                offset: 0
            })
        );
        assert_eq!(
            page_params(&p("offset=-1")),
            Err(Error::invalid("offset must be a non-negative integer"))
        );
        assert_eq!(
            page_params(&p("offset=10001")),
            Err(Error::invalid("offset is at most 10000"))
        );
        // The last occurrence counts for values; every occurrence is checked for claims.
        let twice = p("user_id=9&user_id=1928800");
        assert_eq!(
            user_param("user_id", param(&twice, "user_id")),
            Ok(Some(me()))
        );
        assert_eq!(
            check_claims(&twice, &me(), &["user_id"]),
            Err(Error::new(
                ErrorCode::Forbidden,
                "user_id does not match the authenticated user"
            ))
        );
    }
}
