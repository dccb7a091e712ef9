//! Pure encode/decode of the Phoenix dialect: the V2 JSON serializer's array frames
//! `[join_ref, ref, topic, event, payload]`, the topics and events of seed 002, and the connect
//! parameters. No I/O and no state: exact text in, typed values out, and back.

use base64::Engine as _;
use schema::command::MAX_CLIENT_REF_LEN;
use schema::{Error, ErrorCode, Message, MessageBody, Notification, RoomId, UserId};
use serde::Serialize;
use serde_json::{Map, Value};

/// The only serializer version served (`?vsn=`): JSON array frames.
pub const VSN: &str = "2.0.0";

/// The `Sec-WebSocket-Protocol` prefix phoenix.js 1.8 puts before the encoded `authToken`.
pub const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

/// The subprotocol phoenix.js offers next to its `authToken`, answered by the server.
pub const SUBPROTOCOL: &str = "phoenix";

/// Longest accepted `join_ref`, `ref`, topic or event, in bytes (the limit of Phoenix's binary
/// serializer).
pub const MAX_FIELD_BYTES: usize = 255;

/// Longest accepted `mobile_ref_id`, in characters.
pub const MAX_MOBILE_REF_CHARS: usize = 100;

/// Longest accepted `device_unique_id`, in characters.
pub const MAX_DEVICE_CHARS: usize = 128;

/// Shortest and longest accepted `preferred_language`, in characters.
pub const LANGUAGE_CHARS: std::ops::RangeInclusive<usize> = 2..=35;

/// A message reference (`join_ref` or `ref`) as the client wrote it, echoed back unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ref {
    /// `null` (pushes that expect no reply, server broadcasts).
    Null,
    /// A string: what phoenix.js sends (`"1"`, `"2"`, ...).
    Text(String),
    /// An integer, accepted from hand-written clients.
    Number(i64),
}

impl Ref {
    /// The reference as JSON.
    pub fn to_json(&self) -> Value {
        match self {
            Ref::Null => Value::Null,
            Ref::Text(s) => Value::from(s.as_str()),
            Ref::Number(n) => Value::from(*n),
        }
    }

    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(Ref::Null),
            Value::String(s) if s.len() <= MAX_FIELD_BYTES => Some(Ref::Text(s.clone())),
            Value::Number(n) => n.as_i64().map(Ref::Number),
            _ => None,
        }
    }
}

/// A well-formed client frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    /// The join this push belongs to (for `phx_join`, the join being made).
    pub join_ref: Ref,
    /// The push's own reference; the reply carries it.
    pub reference: Ref,
    /// The topic, e.g. `chat:42`.
    pub topic: String,
    /// The event, e.g. `phx_join`, `send_message`.
    pub event: String,
    /// The payload (always an object).
    pub payload: Map<String, Value>,
}

/// A client frame that could not be decoded, with what could be recovered to answer it.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    /// The `join_ref`, if one was readable.
    pub join_ref: Ref,
    /// The `ref`, if one was readable and not null: then the answer is a `phx_reply`.
    pub reference: Option<Ref>,
    /// The topic, if one was readable.
    pub topic: Option<String>,
    /// Why, starting with `malformed frame: `.
    pub reason: String,
}

fn malformed(reason: impl std::fmt::Display) -> Malformed {
    Malformed {
        join_ref: Ref::Null,
        reference: None,
        topic: None,
        reason: format!("malformed frame: {reason}"),
    }
}

/// Decodes a text frame: a JSON array of exactly five elements, `join_ref` and `ref` strings,
/// integers or null, `topic` and `event` non-empty strings (at most [`MAX_FIELD_BYTES`]), and
/// an object payload.
pub fn decode_frame(text: &str) -> Result<Inbound, Malformed> {
    let v: Value = serde_json::from_str(text).map_err(|e| malformed(format!("not JSON ({e})")))?;
    let Value::Array(items) = v else {
        return Err(malformed(
            "expected a JSON array [join_ref, ref, topic, event, payload]",
        ));
    };
    let Ok([join_ref, reference, topic, event, payload]) = <[Value; 5]>::try_from(items) else {
        return Err(malformed(
            "expected 5 elements [join_ref, ref, topic, event, payload]",
        ));
    };
    let field = |v: &Value| match v {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_FIELD_BYTES => Some(s.clone()),
        _ => None,
    };
    let join = Ref::from_json(&join_ref);
    let refr = Ref::from_json(&reference);
    let top = field(&topic);
    let mut bad = Malformed {
        join_ref: join.clone().unwrap_or(Ref::Null),
        reference: refr.clone().filter(|r| *r != Ref::Null),
        topic: top.clone(),
        reason: String::new(),
    };
    let fail = |mut m: Malformed, why: &str| {
        m.reason = format!("malformed frame: {why}");
        Err(m)
    };
    let Some(join_ref) = join else {
        return fail(bad, "join_ref must be a string, an integer or null");
    };
    let Some(reference) = refr else {
        return fail(bad, "ref must be a string, an integer or null");
    };
    let Some(topic) = top else {
        bad.reference = None;
        return fail(bad, "topic must be a non-empty string of at most 255 bytes");
    };
    let Some(event) = field(&event) else {
        return fail(bad, "event must be a non-empty string of at most 255 bytes");
    };
    let Value::Object(payload) = payload else {
        return fail(bad, "payload must be a JSON object");
    };
    Ok(Inbound {
        join_ref,
        reference,
        topic,
        event,
        payload,
    })
}

/// What a topic names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// `phoenix`: the socket itself (heartbeats).
    Phoenix,
    /// `chat:<room_id>`, the room id in canonical decimal form.
    Chat(RoomId),
    /// `chat:` followed by something that is not a room id (`chat:abc`, `chat:007`, `chat:0`).
    BadChat,
    /// `notifications:<user_id>`.
    Notifications(String),
    /// Anything else: no channel serves it.
    Unmatched,
}

/// Parses a topic.
pub fn parse_topic(topic: &str) -> Topic {
    if topic == "phoenix" {
        return Topic::Phoenix;
    }
    if let Some(id) = topic.strip_prefix("chat:") {
        return match id.parse::<u64>() {
            Ok(n) if n.to_string() == id => RoomId::parse(n).map_or(Topic::BadChat, Topic::Chat),
            _ => Topic::BadChat,
        };
    }
    if let Some(user) = topic.strip_prefix("notifications:") {
        return Topic::Notifications(user.to_owned());
    }
    Topic::Unmatched
}

/// The canonical topic of a room's chat channel.
pub fn chat_topic(room: RoomId) -> String {
    format!("chat:{room}")
}

/// The topic of a user's notifications channel.
pub fn notifications_topic(user: &UserId) -> String {
    format!("notifications:{user}")
}

fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// A server push on a joined channel: `[join_ref, null, topic, event, payload]`, `payload`
/// already encoded (it is shared by every session; only the join reference differs).
pub fn push(join_ref: &Ref, topic: &str, event: &str, payload: &str) -> String {
    format!(
        "[{},null,{},{},{payload}]",
        join_ref.to_json(),
        json_str(topic),
        json_str(event)
    )
}

#[derive(Serialize)]
struct ReplyPayload<'a> {
    status: &'a str,
    response: &'a Value,
}

/// A `phx_reply` to the push `reference`: `{"status": "ok"|"error", "response": ...}`.
pub fn reply(join_ref: &Ref, reference: &Ref, topic: &str, ok: bool, response: &Value) -> String {
    let payload = ReplyPayload {
        status: if ok { "ok" } else { "error" },
        response,
    };
    format!(
        "[{},{},{},\"phx_reply\",{}]",
        join_ref.to_json(),
        reference.to_json(),
        json_str(topic),
        serde_json::to_string(&payload).unwrap_or_default()
    )
}

/// An error reply whose response is `{"reason": reason}` (Phoenix's convention).
pub fn reply_reason(join_ref: &Ref, reference: &Ref, topic: &str, reason: &str) -> String {
    let mut m = Map::new();
    m.insert("reason".into(), Value::from(reason));
    reply(join_ref, reference, topic, false, &Value::Object(m))
}

/// An empty ok reply (`{"status":"ok","response":{}}`).
pub fn reply_ok(join_ref: &Ref, reference: &Ref, topic: &str) -> String {
    reply(join_ref, reference, topic, true, &Value::Object(Map::new()))
}

/// The reply to a push on a topic with no joined channel, as Phoenix sends it (no join
/// reference).
pub fn unmatched(reference: &Ref, topic: &str) -> String {
    reply_reason(&Ref::Null, reference, topic, "unmatched topic")
}

/// `phx_close` of the join `join_ref` (after a leave, a duplicate join, a removal), as Phoenix
/// sends it: the join reference in both reference slots and an empty payload.
pub fn close(join_ref: &Ref, topic: &str) -> String {
    let j = join_ref.to_json();
    format!("[{j},{j},{},\"phx_close\",{{}}]", json_str(topic))
}

/// A socket-level error with no push to answer: `[null,null,"phoenix","phx_error",{"reason"}]`.
pub fn socket_error(reason: &str) -> String {
    let mut m = Map::new();
    m.insert("reason".into(), Value::from(reason));
    format!("[null,null,\"phoenix\",\"phx_error\",{}]", Value::Object(m))
}

/// The answer to a malformed frame: an error `phx_reply` when its `ref` and topic were
/// readable, else [`socket_error`].
pub fn answer_malformed(m: &Malformed) -> String {
    match (&m.reference, &m.topic) {
        (Some(r), Some(t)) => reply_reason(&m.join_ref, r, t, &m.reason),
        _ => socket_error(&m.reason),
    }
}

/// The text of a message as the seed's `content`: the text, or a media message's caption, or
/// (no caption) its upload path.
pub fn content(body: &MessageBody) -> String {
    match body {
        MessageBody::Text { text } => text.clone(),
        MessageBody::Deleted {} => String::new(),
        other => match other.media() {
            Some(m) => match m.caption.as_deref() {
                Some(c) if !c.is_empty() => c.to_owned(),
                _ => m.media.clone(),
            },
            None => String::new(),
        },
    }
}

#[derive(Serialize)]
struct ReceiveMessage<'a> {
    chat_id: String,
    content: String,
    sender_id: &'a str,
}

/// The `receive_message` payload of a message: `{chat_id, content, sender_id}`.
pub fn receive_message(m: &Message) -> String {
    serde_json::to_string(&ReceiveMessage {
        chat_id: m.room.to_string(),
        content: content(&m.body),
        sender_id: m.sender.as_str(),
    })
    .unwrap_or_default()
}

#[derive(Serialize)]
struct NotificationPayload<'a> {
    chat_id: String,
    sender_id: &'a str,
    content: &'a str,
    timestamp: String,
}

/// The `new_notification` payload of a live message: `{chat_id, sender_id, content,
/// timestamp}`.
pub fn new_notification(m: &Message) -> String {
    serde_json::to_string(&NotificationPayload {
        chat_id: m.room.to_string(),
        sender_id: m.sender.as_str(),
        content: &content(&m.body),
        timestamp: crate::dialect::socketio::iso_datetime(m.created_at),
    })
    .unwrap_or_default()
}

/// The `pending_notification` payload of a stored notification (same shape as
/// [`new_notification`]; `content` is the stored preview).
pub fn pending_notification(n: &Notification) -> String {
    serde_json::to_string(&NotificationPayload {
        chat_id: n.room.to_string(),
        sender_id: n.sender.as_str(),
        content: &n.preview,
        timestamp: crate::dialect::socketio::iso_datetime(n.created_at),
    })
    .unwrap_or_default()
}

/// A decoded `send_message` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendMessage {
    /// The text.
    pub content: String,
    /// The client's id of the message, as sent (a string or a number), echoed back.
    pub mobile_ref_id: Value,
    /// The same as text (a number's JSON text), for the idempotency key.
    pub mobile_ref: String,
}

/// A refused `send_message`: the error, and the `mobile_ref_id` to echo (null when absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRefused {
    /// The `mobile_ref_id` as sent, or null.
    pub mobile_ref_id: Value,
    /// Why.
    pub error: Error,
}

/// Decodes `send_message {content, mobile_ref_id}`. Checked in this order: `content` present,
/// a string, not empty; `mobile_ref_id` present, a string or a number, 1 to
/// [`MAX_MOBILE_REF_CHARS`] characters, no control characters. The node checks the rest
/// (blank text, length, membership, rate).
pub fn decode_send(payload: &Map<String, Value>) -> Result<SendMessage, SendRefused> {
    let echo = match payload.get("mobile_ref_id") {
        Some(v @ (Value::String(_) | Value::Number(_))) => v.clone(),
        _ => Value::Null,
    };
    let refuse = |msg: &str| SendRefused {
        mobile_ref_id: echo.clone(),
        error: Error::new(ErrorCode::InvalidField, msg),
    };
    let content = match payload.get("content") {
        None | Some(Value::Null) => return Err(refuse("content is required")),
        Some(Value::String(s)) if s.is_empty() => return Err(refuse("content must not be empty")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(refuse("content must be a string")),
    };
    let mobile_ref = match payload.get("mobile_ref_id") {
        None | Some(Value::Null) => return Err(refuse("mobile_ref_id is required")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(refuse("mobile_ref_id must be a string or a number")),
    };
    let n = mobile_ref.chars().count();
    if n == 0 || n > MAX_MOBILE_REF_CHARS {
        return Err(refuse("mobile_ref_id must be 1 to 100 characters"));
    }
    if mobile_ref.chars().any(char::is_control) {
        return Err(refuse("mobile_ref_id must not contain control characters"));
    }
    Ok(SendMessage {
        content,
        mobile_ref_id: echo,
        mobile_ref,
    })
}

/// FNV-1a, 64 bits: a hash that is the same in every process and release (idempotency keys
/// must be).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The idempotency key of a `send_message`: `phx:<device>:<mobile_ref_id>` (`-` for a socket
/// without `device_unique_id`), so that a device retrying a message after a reconnect gets the
/// original back. Over 128 bytes, the device is replaced by `#` and its hash, then the
/// `mobile_ref_id` likewise.
pub fn client_ref(device: Option<&str>, mobile_ref: &str) -> String {
    let device = device.unwrap_or("-");
    let plain = format!("phx:{device}:{mobile_ref}");
    if plain.len() <= MAX_CLIENT_REF_LEN {
        return plain;
    }
    let hashed = format!("phx:#{:016x}:{mobile_ref}", fnv1a(device));
    if hashed.len() <= MAX_CLIENT_REF_LEN {
        return hashed;
    }
    format!("phx:#{:016x}:#{:016x}", fnv1a(device), fnv1a(mobile_ref))
}

#[derive(Serialize)]
struct MessageSent<'a> {
    mobile_ref_id: &'a Value,
    status: &'a str,
    chat_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The `message_sent` payload: `{mobile_ref_id, status: "sent", chat_id}`, or with
/// `status: "error"` and the error's code as `reason`.
pub fn message_sent(mobile_ref_id: &Value, room: RoomId, error: Option<&Error>) -> String {
    serde_json::to_string(&MessageSent {
        mobile_ref_id,
        status: if error.is_some() { "error" } else { "sent" },
        chat_id: room.to_string(),
        reason: error.map(|e| e.code.as_str()),
    })
    .unwrap_or_default()
}

/// The ok reply's response to a `send_message`: `{mobile_ref_id, chat_id, message_id}`.
pub fn sent_response(mobile_ref_id: &Value, m: &Message) -> Value {
    let mut r = Map::new();
    r.insert("mobile_ref_id".into(), mobile_ref_id.clone());
    r.insert("chat_id".into(), Value::from(m.room.to_string()));
    r.insert("message_id".into(), Value::from(m.id.to_string()));
    Value::Object(r)
}

/// An error reply's response: `{"reason": code, "message": text}`.
pub fn error_response(e: &Error) -> Value {
    let mut r = Map::new();
    r.insert("reason".into(), Value::from(e.code.as_str()));
    r.insert("message".into(), Value::from(e.message.as_str()));
    Value::Object(r)
}

/// The reason a refused channel join gets: `unauthorized` for a room one is not a member of,
/// `not_found` for no such room, else the error's code.
pub fn join_reason(e: &Error) -> &'static str {
    match e.code {
        ErrorCode::NotMember | ErrorCode::Forbidden => "unauthorized",
        other => other.as_str(),
    }
}

/// The connect parameters of `/socket/websocket` (query string), checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connect {
    /// `token`, if given and not empty.
    pub token: Option<String>,
    /// `device_unique_id`.
    pub device: Option<String>,
    /// `preferred_language`.
    pub language: Option<String>,
}

/// Checks the query string's pairs: `vsn` must be [`VSN`]; `device_unique_id` 1 to
/// [`MAX_DEVICE_CHARS`] characters without control characters; `preferred_language`
/// [`LANGUAGE_CHARS`] ASCII letters, digits, `-` or `_`. A name given twice takes its last
/// value (as Phoenix's query decoding does). The error is the 400 message.
pub fn connect_params(pairs: &[(String, String)]) -> Result<Connect, String> {
    let last = |name: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match last("vsn") {
        Some(VSN) => {}
        None => {
            return Err(format!(
                "missing vsn: this endpoint serves the Phoenix V2 JSON serializer, connect with \
                 ?vsn={VSN}"
            ));
        }
        Some(other) => {
            return Err(format!(
                "unsupported vsn {other:?}: this endpoint serves only the Phoenix V2 JSON \
                 serializer, vsn={VSN}"
            ));
        }
    }
    let device = match last("device_unique_id") {
        None => None,
        Some(d) => {
            let n = d.chars().count();
            if n == 0 || n > MAX_DEVICE_CHARS || d.chars().any(char::is_control) {
                return Err(
                    "device_unique_id must be 1 to 128 characters without control characters"
                        .into(),
                );
            }
            Some(d.to_owned())
        }
    };
    let language = match last("preferred_language") {
        None => None,
        Some(l) => {
            let ok = LANGUAGE_CHARS.contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(
                    "preferred_language must be 2 to 35 ASCII letters, digits, '-' or '_' \
                     (e.g. EN, pt-BR)"
                        .into(),
                );
            }
            Some(l.to_owned())
        }
    };
    let token = last("token").filter(|t| !t.is_empty()).map(str::to_owned);
    Ok(Connect {
        token,
        device,
        language,
    })
}

/// The offered subprotocols' `authToken` (phoenix.js 1.8: `base64url.bearer.phx.` then the
/// token in base64 without padding; both alphabets, padded or not, are accepted). `Ok(None)`:
/// none offered. The error is the 403 message.
pub fn auth_token(protocols: &[String]) -> Result<Option<String>, String> {
    let Some(encoded) = protocols
        .iter()
        .find_map(|p| p.strip_prefix(AUTH_TOKEN_PREFIX))
    else {
        return Ok(None);
    };
    let normalized: String = encoded
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(normalized.as_bytes())
        .map_err(|_| "authToken subprotocol is not valid base64".to_owned())?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| "authToken is not UTF-8 text".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Media, MessageId};
    use serde_json::json;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn text_message(text: &str) -> Message {
        let mut m = Message::new(
            MessageId(244_194_999_324_672),
            RoomId(305_419_896),
            7,
            uid("674bd8ba5a0b920001bd9f5d"),
            MessageBody::Text { text: text.into() },
            1_705_314_600_123,
        );
        m.client_ref = Some("phx:dev-1:123124".into());
        m
    }

    #[test]
    fn a_join_frame_decodes() {
        let f = decode_frame(r#"["3","3","chat:42","phx_join",{}]"#).unwrap();
        assert_eq!(
            f,
            Inbound {
                join_ref: Ref::Text("3".into()),
                reference: Ref::Text("3".into()),
                topic: "chat:42".into(),
                event: "phx_join".into(),
                payload: Map::new(),
            }
        );
    }

    #[test]
    fn a_heartbeat_and_a_push_decode() {
        let f = decode_frame(r#"[null,"9","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(f.join_ref, Ref::Null);
        assert_eq!(f.reference, Ref::Text("9".into()));
        assert_eq!(f.topic, "phoenix");
        assert_eq!(f.event, "heartbeat");
        let f = decode_frame(
            r#"["3",4,"chat:42","send_message",{"content":"Hey","mobile_ref_id":"123124"}]"#,
        )
        .unwrap();
        assert_eq!(f.reference, Ref::Number(4));
        assert_eq!(
            Value::Object(f.payload),
            json!({"content": "Hey", "mobile_ref_id": "123124"})
        );
    }

    #[test]
    fn malformed_frames_say_why_and_keep_what_can_be_answered() {
        let m = decode_frame("not json").unwrap_err();
        assert_eq!(m.reference, None);
        assert!(
            m.reason.starts_with("malformed frame: not JSON ("),
            "{}",
            m.reason
        );
        assert_eq!(
            answer_malformed(&m),
            format!(
                "[null,null,\"phoenix\",\"phx_error\",{{\"reason\":{}}}]",
                json_str(&m.reason)
            )
        );

        let m = decode_frame(r#"{"topic":"chat:1"}"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: expected a JSON array [join_ref, ref, topic, event, payload]"
        );

        let m = decode_frame(r#"["1","2","chat:1","phx_join"]"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: expected 5 elements [join_ref, ref, topic, event, payload]"
        );

        let m = decode_frame(r#"["1","2","chat:1","send_message","hello"]"#).unwrap_err();
        assert_eq!(m.reason, "malformed frame: payload must be a JSON object");
        assert_eq!(
            answer_malformed(&m),
            r#"["1","2","chat:1","phx_reply",{"status":"error","response":{"reason":"malformed frame: payload must be a JSON object"}}]"#
        );

        let m = decode_frame(r#"["1","2","chat:1",7,{}]"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: event must be a non-empty string of at most 255 bytes"
        );
        assert_eq!(m.reference, Some(Ref::Text("2".into())));

        let m = decode_frame(r#"["1","2",null,"phx_join",{}]"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: topic must be a non-empty string of at most 255 bytes"
        );
        assert!(answer_malformed(&m).starts_with("[null,null,\"phoenix\",\"phx_error\""));

        let m = decode_frame(r#"[{},"2","chat:1","phx_join",{}]"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: join_ref must be a string, an integer or null"
        );
        let m = decode_frame(r#"["1",1.5,"chat:1","phx_join",{}]"#).unwrap_err();
        assert_eq!(
            m.reason,
            "malformed frame: ref must be a string, an integer or null"
        );
        assert_eq!(m.reference, None);
        // A null ref cannot be replied to: the answer is a socket-level error.
        let m = decode_frame(r#"["1",null,"chat:1","send_message",[]]"#).unwrap_err();
        assert!(answer_malformed(&m).starts_with("[null,null,\"phoenix\",\"phx_error\""));
        let long = "x".repeat(256);
        assert!(decode_frame(&format!(r#"["1","2","{long}","phx_join",{{}}]"#)).is_err());
        assert!(decode_frame(&format!(r#"["1","{long}","chat:1","phx_join",{{}}]"#)).is_err());
    }

    #[test]
    fn topics() {
        assert_eq!(parse_topic("phoenix"), Topic::Phoenix);
        assert_eq!(parse_topic("chat:42"), Topic::Chat(RoomId(42)));
        assert_eq!(parse_topic("chat:007"), Topic::BadChat);
        assert_eq!(parse_topic("chat:0"), Topic::BadChat);
        assert_eq!(parse_topic("chat:674bd8ba5a0b920001bd9f5d"), Topic::BadChat);
        assert_eq!(parse_topic("chat:9007199254740992"), Topic::BadChat);
        assert_eq!(parse_topic("chat:"), Topic::BadChat);
        assert_eq!(
            parse_topic("notifications:6745e201c337080846beba9a"),
            Topic::Notifications("6745e201c337080846beba9a".into())
        );
        assert_eq!(parse_topic("notification:1"), Topic::Unmatched);
        assert_eq!(parse_topic("room:lobby"), Topic::Unmatched);
        assert_eq!(chat_topic(RoomId(42)), "chat:42");
        assert_eq!(notifications_topic(&uid("ann")), "notifications:ann");
    }

    #[test]
    fn replies_and_pushes_are_exact() {
        let j = Ref::Text("3".into());
        assert_eq!(
            reply_ok(&j, &Ref::Text("3".into()), "chat:42"),
            r#"["3","3","chat:42","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            reply_reason(&j, &Ref::Text("3".into()), "chat:42", "unauthorized"),
            r#"["3","3","chat:42","phx_reply",{"status":"error","response":{"reason":"unauthorized"}}]"#
        );
        assert_eq!(
            reply_ok(&Ref::Null, &Ref::Number(12), "phoenix"),
            r#"[null,12,"phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            unmatched(&Ref::Text("5".into()), "chat:1"),
            r#"[null,"5","chat:1","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
        );
        assert_eq!(
            close(&j, "chat:42"),
            r#"["3","3","chat:42","phx_close",{}]"#
        );
        assert_eq!(
            push(&j, "chat:42", "receive_message", r#"{"a":1}"#),
            r#"["3",null,"chat:42","receive_message",{"a":1}]"#
        );
        assert_eq!(
            socket_error("binary frames are not accepted"),
            r#"[null,null,"phoenix","phx_error",{"reason":"binary frames are not accepted"}]"#
        );
        assert_eq!(
            push(&j, "chat:\"q\"", "e", "{}"),
            r#"["3",null,"chat:\"q\"","e",{}]"#
        );
    }

    #[test]
    fn message_payloads_are_exact() {
        let m = text_message("Hey, i'm fine! and you?");
        assert_eq!(
            receive_message(&m),
            r#"{"chat_id":"305419896","content":"Hey, i'm fine! and you?","sender_id":"674bd8ba5a0b920001bd9f5d"}"#
        );
        assert_eq!(
            new_notification(&m),
            r#"{"chat_id":"305419896","sender_id":"674bd8ba5a0b920001bd9f5d","content":"Hey, i'm fine! and you?","timestamp":"2024-01-15T10:30:00.123Z"}"#
        );
        let n = Notification {
            room: RoomId(5),
            message_id: MessageId(9),
            seq: 3,
            sender: uid("42"),
            preview: "hi".into(),
            created_at: 1_705_314_600_000,
        };
        assert_eq!(
            pending_notification(&n),
            r#"{"chat_id":"5","sender_id":"42","content":"hi","timestamp":"2024-01-15T10:30:00.000Z"}"#
        );
    }

    #[test]
    fn media_content_is_the_caption_or_the_upload() {
        let media = |caption: Option<&str>| {
            MessageBody::Image(Media {
                media: "/uploads/chat-messages/images/ab12.webp".into(),
                caption: caption.map(Into::into),
                duration: None,
                size: None,
            })
        };
        assert_eq!(content(&media(Some("look"))), "look");
        assert_eq!(
            content(&media(None)),
            "/uploads/chat-messages/images/ab12.webp"
        );
        assert_eq!(
            content(&media(Some(""))),
            "/uploads/chat-messages/images/ab12.webp"
        );
    }

    #[test]
    fn send_message_decodes_and_refuses_precisely() {
        let p = |s: &str| match serde_json::from_str::<Value>(s).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(
            decode_send(&p(r#"{"content":"Hey","mobile_ref_id":"123124"}"#)),
            Ok(SendMessage {
                content: "Hey".into(),
                mobile_ref_id: json!("123124"),
                mobile_ref: "123124".into(),
            })
        );
        assert_eq!(
            decode_send(&p(r#"{"content":"Hey","mobile_ref_id":123124}"#)),
            Ok(SendMessage {
                content: "Hey".into(),
                mobile_ref_id: json!(123_124),
                mobile_ref: "123124".into(),
            })
        );
        let refused = |s: &str| decode_send(&p(s)).unwrap_err();
        let r = refused(r#"{"mobile_ref_id":"m1"}"#);
        assert_eq!(r.mobile_ref_id, json!("m1"));
        assert_eq!(r.error, Error::invalid("content is required"));
        assert_eq!(
            refused(r#"{"content":"","mobile_ref_id":"m1"}"#)
                .error
                .message,
            "content must not be empty"
        );
        assert_eq!(
            refused(r#"{"content":5,"mobile_ref_id":"m1"}"#)
                .error
                .message,
            "content must be a string"
        );
        let r = refused(r#"{"content":"Hey"}"#);
        assert_eq!(r.mobile_ref_id, Value::Null);
        assert_eq!(r.error.message, "mobile_ref_id is required");
        assert_eq!(
            refused(r#"{"content":"Hey","mobile_ref_id":true}"#)
                .error
                .message,
            "mobile_ref_id must be a string or a number"
        );
        assert_eq!(
            refused(r#"{"content":"Hey","mobile_ref_id":""}"#)
                .error
                .message,
            "mobile_ref_id must be 1 to 100 characters"
        );
        let long = "r".repeat(101);
        assert_eq!(
            refused(&format!(r#"{{"content":"Hey","mobile_ref_id":"{long}"}}"#))
                .error
                .message,
            "mobile_ref_id must be 1 to 100 characters"
        );
        assert_eq!(
            refused(r#"{"content":"Hey","mobile_ref_id":"a\nb"}"#)
                .error
                .message,
            "mobile_ref_id must not contain control characters"
        );
    }

    #[test]
    fn message_sent_payloads_are_exact() {
        let room = RoomId(305_419_896);
        assert_eq!(
            message_sent(&json!("123124"), room, None),
            r#"{"mobile_ref_id":"123124","status":"sent","chat_id":"305419896"}"#
        );
        assert_eq!(
            message_sent(&Value::Null, room, Some(&Error::invalid("x"))),
            r#"{"mobile_ref_id":null,"status":"error","chat_id":"305419896","reason":"invalid_field"}"#
        );
        let m = text_message("x");
        assert_eq!(
            sent_response(&json!(7), &m).to_string(),
            r#"{"chat_id":"305419896","message_id":"244194999324672","mobile_ref_id":7}"#
        );
        assert_eq!(
            error_response(&Error::new(ErrorCode::RateLimited, "slow down")).to_string(),
            r#"{"message":"slow down","reason":"rate_limited"}"#
        );
    }

    #[test]
    fn client_refs_fit_and_are_stable() {
        assert_eq!(client_ref(Some("dev-1"), "123124"), "phx:dev-1:123124");
        assert_eq!(client_ref(None, "123124"), "phx:-:123124");
        let uuid = "0f6c1c9e-7a55-4a8e-9a53-8f1e9b0f6a11";
        let long_ref = "m".repeat(100);
        let r = client_ref(Some(uuid), &long_ref);
        assert_eq!(r, format!("phx:#{:016x}:{long_ref}", fnv1a(uuid)));
        assert!(r.len() <= MAX_CLIENT_REF_LEN);
        let wide = "é".repeat(100);
        let r = client_ref(Some(uuid), &wide);
        assert!(
            r.len() <= MAX_CLIENT_REF_LEN && r.starts_with("phx:#"),
            "{r}"
        );
        assert!(schema::command::check_client_ref(&r).is_ok());
        // FNV-1a 64 of "a" (published test vector): the key is the same in every process.
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn connect_params_are_checked() {
        let q = |s: &str| serde_urlencoded::from_str::<Vec<(String, String)>>(s).unwrap();
        assert_eq!(
            connect_params(&q(
                "token=abc&device_unique_id=somerandontoken&preferred_language=EN&vsn=2.0.0"
            )),
            Ok(Connect {
                token: Some("abc".into()),
                device: Some("somerandontoken".into()),
                language: Some("EN".into()),
            })
        );
        assert_eq!(connect_params(&q("vsn=2.0.0")), Ok(Connect::default()));
        assert_eq!(
            connect_params(&q("token=&vsn=2.0.0")).map(|c| c.token),
            Ok(None)
        );
        assert!(
            connect_params(&q("token=a"))
                .unwrap_err()
                .starts_with("missing vsn")
        );
        assert_eq!(
            connect_params(&q("token=a&vsn=1.0.0")).unwrap_err(),
            "unsupported vsn \"1.0.0\": this endpoint serves only the Phoenix V2 JSON \
             serializer, vsn=2.0.0"
        );
        assert!(connect_params(&q("vsn=2.0.0&device_unique_id=")).is_err());
        assert!(
            connect_params(&q(&format!(
                "vsn=2.0.0&device_unique_id={}",
                "d".repeat(129)
            )))
            .is_err()
        );
        assert!(connect_params(&q("vsn=2.0.0&preferred_language=e")).is_err());
        assert!(connect_params(&q("vsn=2.0.0&preferred_language=en%20US")).is_err());
        assert_eq!(
            connect_params(&q("vsn=2.0.0&preferred_language=pt-BR")).map(|c| c.language),
            Ok(Some("pt-BR".into()))
        );
        assert_eq!(
            connect_params(&q("vsn=1.0.0&vsn=2.0.0&token=a&token=b")).map(|c| c.token),
            Ok(Some("b".into()))
        );
    }

    #[test]
    fn auth_tokens_decode_from_either_alphabet() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // btoa("a.b?>") = "YS5iPz4=" (standard alphabet; phoenix.js strips the padding).
        assert_eq!(
            auth_token(&p(&["phoenix", "base64url.bearer.phx.YS5iPz4"])),
            Ok(Some("a.b?>".into()))
        );
        assert_eq!(
            auth_token(&p(&["phoenix", "base64url.bearer.phx.YS5iPz4="])),
            Ok(Some("a.b?>".into()))
        );
        // "???" is "Pz8/" in the standard alphabet, "Pz8_" in the URL-safe one.
        assert_eq!(
            auth_token(&p(&["base64url.bearer.phx.Pz8_"])),
            Ok(Some("???".into()))
        );
        assert_eq!(
            auth_token(&p(&["base64url.bearer.phx.Pz8/"])),
            Ok(Some("???".into()))
        );
        assert_eq!(auth_token(&p(&["phoenix"])), Ok(None));
        assert_eq!(auth_token(&[]), Ok(None));
        assert_eq!(
            auth_token(&p(&["base64url.bearer.phx.*"])),
            Err("authToken subprotocol is not valid base64".into())
        );
    }

    #[test]
    fn join_reasons() {
        assert_eq!(join_reason(&Error::not_member(RoomId(1))), "unauthorized");
        assert_eq!(join_reason(&Error::not_found("no room")), "not_found");
        assert_eq!(join_reason(&Error::unavailable("down")), "unavailable");
    }
}
