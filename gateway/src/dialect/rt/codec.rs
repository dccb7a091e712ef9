//! Pure encode/decode of the type-tagged JSON dialect: client frames (JSON text) to typed
//! [`Request`]s, and typed values to server frames (JSON text). No I/O, no lookups: the
//! session code in [`super`] resolves usernames and rooms and calls these.
//!
//! Decoding is lenient about what the seed's clients add (unknown fields are ignored, `null`
//! counts as absent) and strict about what it reads: a field of the wrong type, an empty
//! `content` or an id that is not an id is an error whose text is the `ERROR` frame's `msg`.
//! Ids are read as JSON strings of decimal digits or as JSON numbers, and written as strings.

use crate::auth::AuthError;
use crate::dialect::socketio::iso_datetime;
use schema::{Message, MessageBody, MessageId, Millis, RoomId};
use serde::Serialize;
use serde_json::{Map, Value};

/// A decoded client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `AUTH {token}`.
    Auth {
        /// The JWT.
        token: String,
    },
    /// `ONE_TO_ONE_CHAT {from, to, content, chatId, clientId?}`.
    OneToOne(DirectSend),
    /// `GROUP_CHAT {from, groupId, content, clientId?}`.
    Group(GroupSend),
    /// `GET_ONE_TO_ONE_HISTORY {from, to, chatId, limit?, before?}`.
    DirectHistory(DirectHistory),
    /// `GET_GROUP_CHAT_HISTORY {groupId, limit?, before?}`.
    GroupHistory(GroupHistory),
    /// `JOIN_GROUP {groupId, username?}`.
    JoinGroup(Membership),
    /// `LEAVE_GROUP {groupId, username?}`.
    LeaveGroup(Membership),
    /// `DISCONNECT {}`.
    Disconnect,
}

/// A one-to-one message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectSend {
    /// Who the client says is sending (checked against the token), if it said.
    pub from: Option<String>,
    /// The receiver's username (or id, for users without one).
    pub to: String,
    /// The text.
    pub content: String,
    /// The client's `chatId` when it is a room id (any other `chatId` is only a label).
    pub chat_id: Option<RoomId>,
    /// The client's idempotency key (`clientId`), if any.
    pub client_id: Option<String>,
}

/// A group message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSend {
    /// Who the client says is sending, if it said.
    pub from: Option<String>,
    /// The group.
    pub group: RoomId,
    /// The text.
    pub content: String,
    /// The client's idempotency key (`clientId`), if any.
    pub client_id: Option<String>,
}

/// Which page of history: the newest `limit` messages older than `before`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Page size (the server's default and maximum apply).
    pub limit: Option<u32>,
    /// Only messages older than this one.
    pub before: Option<MessageId>,
}

/// A one-to-one history request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectHistory {
    /// Who the client says is asking, if it said.
    pub from: Option<String>,
    /// The other user's username (or id).
    pub to: String,
    /// The client's `chatId` when it is a room id.
    pub chat_id: Option<RoomId>,
    /// Which page.
    pub page: Page,
}

/// A group history request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupHistory {
    /// The group.
    pub group: RoomId,
    /// Which page.
    pub page: Page,
}

/// A group to join or leave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The group.
    pub group: RoomId,
    /// Who the client says is joining or leaving, if it said.
    pub username: Option<String>,
}

/// Why a frame was refused: the `msg` of the `ERROR` frame that answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl DecodeError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// The `type` of a frame, with its other fields.
pub fn split(text: &str) -> Result<(String, Map<String, Value>), DecodeError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError(format!("malformed JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(DecodeError::new("malformed JSON: a frame is a JSON object"));
    };
    match fields.remove("type") {
        None | Some(Value::Null) => Err(DecodeError::new("missing field type")),
        Some(Value::String(t)) => Ok((t, fields)),
        Some(_) => Err(DecodeError::new("type must be a string")),
    }
}

/// Decodes one client frame.
pub fn decode(text: &str) -> Result<Request, DecodeError> {
    let (kind, fields) = split(text)?;
    let f = Fields(&fields);
    Ok(match kind.as_str() {
        "AUTH" => Request::Auth {
            token: f.required_string("token")?,
        },
        "ONE_TO_ONE_CHAT" => Request::OneToOne(DirectSend {
            from: f.string("from")?,
            to: f.name("to")?,
            content: f.content()?,
            chat_id: f.chat_id()?,
            client_id: f.client_id()?,
        }),
        "GROUP_CHAT" => Request::Group(GroupSend {
            from: f.string("from")?,
            group: f.group()?,
            content: f.content()?,
            client_id: f.client_id()?,
        }),
        "GET_ONE_TO_ONE_HISTORY" => Request::DirectHistory(DirectHistory {
            from: f.string("from")?,
            to: f.name("to")?,
            chat_id: f.chat_id()?,
            page: f.page()?,
        }),
        "GET_GROUP_CHAT_HISTORY" => Request::GroupHistory(GroupHistory {
            group: f.group()?,
            page: f.page()?,
        }),
        "JOIN_GROUP" => Request::JoinGroup(Membership {
            group: f.group()?,
            username: f.string("username")?,
        }),
        "LEAVE_GROUP" => Request::LeaveGroup(Membership {
            group: f.group()?,
            username: f.string("username")?,
        }),
        "DISCONNECT" => Request::Disconnect,
        other => return Err(DecodeError(format!("unknown type {other}"))),
    })
}

/// Field access with the dialect's error texts.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The field, `None` when absent or `null`.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(DecodeError(format!("{name} must be a string"))),
        }
    }

    fn required_string(&self, name: &str) -> Result<String, DecodeError> {
        self.string(name)?
            .ok_or_else(|| DecodeError(format!("missing field {name}")))
    }

    /// A username (or user id): a non-empty string.
    fn name(&self, name: &str) -> Result<String, DecodeError> {
        let s = self.required_string(name)?;
        if s.trim().is_empty() {
            return Err(DecodeError(format!("{name} must not be empty")));
        }
        Ok(s)
    }

    fn content(&self) -> Result<String, DecodeError> {
        let s = self.required_string("content")?;
        if s.trim().is_empty() {
            return Err(DecodeError::new("content must not be empty"));
        }
        Ok(s)
    }

    fn client_id(&self) -> Result<Option<String>, DecodeError> {
        let id = self.string("clientId")?;
        if let Some(id) = &id {
            schema::command::check_client_ref(id)
                .map_err(|e| DecodeError(format!("invalid clientId: {e}")))?;
        }
        Ok(id)
    }

    /// `chatId`: a room id when it is one (digits, or a number), otherwise just a label.
    fn chat_id(&self) -> Result<Option<RoomId>, DecodeError> {
        match self.get("chatId") {
            None => Ok(None),
            Some(v @ (Value::String(_) | Value::Number(_))) => Ok(id_of(v).map(RoomId)),
            Some(_) => Err(DecodeError::new("chatId must be a string")),
        }
    }

    fn group(&self) -> Result<RoomId, DecodeError> {
        let v = self
            .get("groupId")
            .ok_or_else(|| DecodeError::new("missing field groupId"))?;
        id_of(v)
            .map(RoomId)
            .ok_or_else(|| DecodeError::new("invalid groupId"))
    }

    fn page(&self) -> Result<Page, DecodeError> {
        let limit = match self.get("limit") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                    .ok_or_else(|| DecodeError::new("limit must be a positive integer"))?,
            ),
        };
        let before = match self.get("before") {
            None => None,
            Some(v) => Some(
                id_of(v)
                    .map(MessageId)
                    .ok_or_else(|| DecodeError::new("before must be a messageId"))?,
            ),
        };
        Ok(Page { limit, before })
    }
}

/// A room or message id written as a decimal string or a JSON number (1 to 2^53-1).
fn id_of(v: &Value) -> Option<u64> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()?
        }
        _ => return None,
    };
    RoomId::parse(n).ok().map(|r| r.0)
}

// ----------------------------------------------------------------------------------------------
// Server frames
// ----------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Status<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    msg: &'a str,
}

/// JSON text of a frame; the frames here always serialise, the fallback is never sent.
fn to_text<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame)
        .unwrap_or_else(|_| r#"{"type":"ERROR","msg":"internal encoding error"}"#.to_owned())
}

/// `{"type":"SUCCESS","msg":...}`.
pub fn success(msg: &str) -> String {
    to_text(&Status {
        kind: "SUCCESS",
        msg,
    })
}

/// `{"type":"ERROR","msg":...}`.
pub fn error(msg: &str) -> String {
    to_text(&Status { kind: "ERROR", msg })
}

/// `{"type":"INFO","msg":...}`.
pub fn info(msg: &str) -> String {
    to_text(&Status { kind: "INFO", msg })
}

/// The `msg` of the `ERROR` that refuses a token.
pub fn auth_error(e: &AuthError) -> String {
    match e {
        AuthError::Missing => "invalid token: missing".into(),
        AuthError::Expired => "invalid token: expired".into(),
        AuthError::Invalid(why) => format!("invalid token: {why}"),
    }
}

/// What a message shows as `content`, plus the media fields of a media message.
struct Content {
    content: String,
    media: Option<String>,
    media_type: Option<&'static str>,
    deleted: bool,
}

fn content_of(body: &MessageBody) -> Content {
    match body {
        MessageBody::Text { text } => Content {
            content: text.clone(),
            media: None,
            media_type: None,
            deleted: false,
        },
        MessageBody::Deleted {} => Content {
            content: String::new(),
            media: None,
            media_type: None,
            deleted: true,
        },
        other => {
            let media = other.media();
            let path = media.map(|m| m.media.clone()).unwrap_or_default();
            let caption = media
                .and_then(|m| m.caption.clone())
                .filter(|c| !c.trim().is_empty());
            Content {
                content: caption.unwrap_or_else(|| path.clone()),
                media: Some(path),
                media_type: Some(other.kind()),
                deleted: false,
            }
        }
    }
}

/// A one-to-one message as the dialect shows it (live and in history).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectView {
    /// Always `ONE_TO_ONE_CHAT`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The sender's username (id when none).
    pub from: String,
    /// The receiver's username (id when none).
    pub to: String,
    /// The text; a media message's caption, else its upload path; `""` when deleted.
    pub content: String,
    /// The direct room's id.
    pub chat_id: String,
    /// When the server accepted it, ISO 8601 UTC with milliseconds.
    pub timestamp: String,
    /// The message id.
    pub message_id: String,
    /// The sender's idempotency key, when the sender gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The upload path of a media message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    /// `image`, `audio`, `video` or `file` for a media message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<&'static str>,
    /// True for a deleted message (history only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl DirectView {
    /// `m`, a message of a direct room, sent by `from` to `to`.
    pub fn of(m: &Message, from: &str, to: &str) -> Self {
        let c = content_of(&m.body);
        Self {
            kind: "ONE_TO_ONE_CHAT",
            from: from.to_owned(),
            to: to.to_owned(),
            content: c.content,
            chat_id: m.room.0.to_string(),
            timestamp: iso_datetime(m.created_at),
            message_id: m.id.0.to_string(),
            client_id: m.client_ref.clone(),
            media: c.media,
            media_type: c.media_type,
            deleted: c.deleted,
        }
    }
}

/// A group message as the dialect shows it (live and in history).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    /// Always `GROUP_CHAT`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The sender's username (id when none).
    pub from: String,
    /// The group's room id.
    pub group_id: String,
    /// See [`DirectView::content`].
    pub content: String,
    /// See [`DirectView::timestamp`].
    pub timestamp: String,
    /// The message id.
    pub message_id: String,
    /// See [`DirectView::client_id`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// See [`DirectView::media`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    /// See [`DirectView::media_type`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<&'static str>,
    /// See [`DirectView::deleted`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl GroupView {
    /// `m`, a message of a group, sent by `from`.
    pub fn of(m: &Message, from: &str) -> Self {
        let c = content_of(&m.body);
        Self {
            kind: "GROUP_CHAT",
            from: from.to_owned(),
            group_id: m.room.0.to_string(),
            content: c.content,
            timestamp: iso_datetime(m.created_at),
            message_id: m.id.0.to_string(),
            client_id: m.client_ref.clone(),
            media: c.media,
            media_type: c.media_type,
            deleted: c.deleted,
        }
    }
}

/// The `ONE_TO_ONE_CHAT` frame of a message of a direct room.
pub fn encode_direct(m: &Message, from: &str, to: &str) -> String {
    to_text(&DirectView::of(m, from, to))
}

/// The `GROUP_CHAT` frame of a message of a group.
pub fn encode_group(m: &Message, from: &str) -> String {
    to_text(&GroupView::of(m, from))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DirectHistoryFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat_id: Option<String>,
    with: &'a str,
    messages: &'a [DirectView],
    has_more: bool,
}

/// `{"type":"ONE_TO_ONE_CHAT_HISTORY","chatId","with","messages":[...],"hasMore"}`; `chat` is
/// `None` (`null`) when the pair has no messages yet.
pub fn encode_direct_history(
    chat: Option<RoomId>,
    with: &str,
    messages: &[DirectView],
    has_more: bool,
) -> String {
    to_text(&DirectHistoryFrame {
        kind: "ONE_TO_ONE_CHAT_HISTORY",
        chat_id: chat.map(|r| r.0.to_string()),
        with,
        messages,
        has_more,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupHistoryFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    group_id: String,
    messages: &'a [GroupView],
    has_more: bool,
}

/// `{"type":"GROUP_CHAT_HISTORY","groupId","messages":[...],"hasMore"}`.
pub fn encode_group_history(group: RoomId, messages: &[GroupView], has_more: bool) -> String {
    to_text(&GroupHistoryFrame {
        kind: "GROUP_CHAT_HISTORY",
        group_id: group.0.to_string(),
        messages,
        has_more,
    })
}

#[derive(Serialize)]
struct PresenceFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    username: &'a str,
    status: &'static str,
    timestamp: String,
}

/// `{"type":"PRESENCE_UPDATE","username","status":"online"|"offline","timestamp"}`.
pub fn encode_presence(username: &str, online: bool, at: Millis) -> String {
    to_text(&PresenceFrame {
        kind: "PRESENCE_UPDATE",
        username,
        status: if online { "online" } else { "offline" },
        timestamp: iso_datetime(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Media, UserId};

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        match decode(text) {
            Err(DecodeError(m)) => m,
            Ok(r) => panic!("{text} decoded to {r:?}"),
        }
    }

    fn ok(text: &str) -> Request {
        decode(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    #[test]
    fn decodes_the_seed_frames() {
        assert_eq!(
            ok(r#"{"type":"AUTH","token":"abc.def.ghi"}"#),
            Request::Auth {
                token: "abc.def.ghi".into()
            }
        );
        assert_eq!(
            ok(
                r#"{"type":"ONE_TO_ONE_CHAT","from":"john_doe","to":"jane","content":"Hello there!","chatId":"chat_123"}"#
            ),
            Request::OneToOne(DirectSend {
                from: Some("john_doe".into()),
                to: "jane".into(),
                content: "Hello there!".into(),
                chat_id: None,
                client_id: None,
            })
        );
        assert_eq!(
            ok(
                r#"{"type":"ONE_TO_ONE_CHAT","to":"jane","content":"hi","chatId":"305419896","clientId":"c-1"}"#
            ),
            Request::OneToOne(DirectSend {
                from: None,
                to: "jane".into(),
                content: "hi".into(),
                chat_id: Some(RoomId(305_419_896)),
                client_id: Some("c-1".into()),
            })
        );
        assert_eq!(
            ok(
                r#"{"type":"GROUP_CHAT","from":"jane_doe","groupId":"456","content":"Hello everyone!"}"#
            ),
            Request::Group(GroupSend {
                from: Some("jane_doe".into()),
                group: RoomId(456),
                content: "Hello everyone!".into(),
                client_id: None,
            })
        );
        assert_eq!(
            ok(r#"{"type":"GROUP_CHAT","groupId":456,"content":"x","from":null}"#),
            Request::Group(GroupSend {
                from: None,
                group: RoomId(456),
                content: "x".into(),
                client_id: None,
            })
        );
        assert_eq!(
            ok(r#"{"type":"GET_ONE_TO_ONE_HISTORY","from":"a","to":"b","chatId":"chat_1"}"#),
            Request::DirectHistory(DirectHistory {
                from: Some("a".into()),
                to: "b".into(),
                chat_id: None,
                page: Page::default(),
            })
        );
        assert_eq!(
            ok(r#"{"type":"GET_GROUP_CHAT_HISTORY","groupId":"9","limit":2,"before":"77"}"#),
            Request::GroupHistory(GroupHistory {
                group: RoomId(9),
                page: Page {
                    limit: Some(2),
                    before: Some(MessageId(77)),
                },
            })
        );
        assert_eq!(
            ok(r#"{"type":"JOIN_GROUP","groupId":"9","username":"ann"}"#),
            Request::JoinGroup(Membership {
                group: RoomId(9),
                username: Some("ann".into()),
            })
        );
        assert_eq!(
            ok(r#"{"type":"LEAVE_GROUP","groupId":9}"#),
            Request::LeaveGroup(Membership {
                group: RoomId(9),
                username: None,
            })
        );
        assert_eq!(ok(r#"{"type":"DISCONNECT"}"#), Request::Disconnect);
        // Unknown fields are ignored.
        assert_eq!(
            ok(r#"{"type":"DISCONNECT","extra":[1]}"#),
            Request::Disconnect
        );
    }

    #[test]
    fn refuses_with_precise_messages() {
        assert!(err("{not json").starts_with("malformed JSON: "));
        assert_eq!(err("[1]"), "malformed JSON: a frame is a JSON object");
        assert_eq!(err("{}"), "missing field type");
        assert_eq!(err(r#"{"type":7}"#), "type must be a string");
        assert_eq!(err(r#"{"type":"PING"}"#), "unknown type PING");
        assert_eq!(err(r#"{"type":"AUTH"}"#), "missing field token");
        assert_eq!(
            err(r#"{"type":"AUTH","token":1}"#),
            "token must be a string"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","content":"x"}"#),
            "missing field to"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":" ","content":"x"}"#),
            "to must not be empty"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b"}"#),
            "missing field content"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b","content":"  "}"#),
            "content must not be empty"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b","content":3}"#),
            "content must be a string"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b","content":"x","from":5}"#),
            "from must be a string"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b","content":"x","chatId":true}"#),
            "chatId must be a string"
        );
        assert_eq!(
            err(r#"{"type":"ONE_TO_ONE_CHAT","to":"b","content":"x","clientId":""}"#),
            "invalid clientId: client_ref must not be empty"
        );
        assert_eq!(
            err(r#"{"type":"GROUP_CHAT","content":"x"}"#),
            "missing field groupId"
        );
        for bad in [
            r#""group_456""#,
            "0",
            "-1",
            "1.5",
            r#""""#,
            "9007199254740992",
            r#""+5""#,
            "[]",
        ] {
            let text = format!(r#"{{"type":"GROUP_CHAT","groupId":{bad},"content":"x"}}"#);
            assert_eq!(err(&text), "invalid groupId", "{text}");
        }
        assert_eq!(
            err(r#"{"type":"GET_GROUP_CHAT_HISTORY","groupId":"1","limit":0}"#),
            "limit must be a positive integer"
        );
        assert_eq!(
            err(r#"{"type":"GET_GROUP_CHAT_HISTORY","groupId":"1","limit":"5"}"#),
            "limit must be a positive integer"
        );
        assert_eq!(
            err(r#"{"type":"GET_GROUP_CHAT_HISTORY","groupId":"1","before":"msg_1"}"#),
            "before must be a messageId"
        );
        assert_eq!(
            err(r#"{"type":"JOIN_GROUP","groupId":"1","username":false}"#),
            "username must be a string"
        );
    }

    #[test]
    fn chat_ids_that_are_not_room_ids_are_labels() {
        let chat = |v: &str| match ok(&format!(
            r#"{{"type":"ONE_TO_ONE_CHAT","to":"b","content":"x","chatId":{v}}}"#
        )) {
            Request::OneToOne(d) => d.chat_id,
            other => panic!("{other:?}"),
        };
        assert_eq!(chat(r#""chat_123""#), None);
        assert_eq!(chat(r#""12a""#), None);
        assert_eq!(chat("0"), None);
        assert_eq!(chat("null"), None);
        assert_eq!(chat(r#""42""#), Some(RoomId(42)));
        assert_eq!(chat("42"), Some(RoomId(42)));
    }

    #[test]
    fn splits_the_type_tag() {
        let (t, rest) = split(r#"{"type":"X","a":1}"#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(t, "X");
        assert_eq!(rest.get("a"), Some(&Value::from(1)));
    }

    #[test]
    fn status_frames() {
        assert_eq!(
            success("Authenticated as ann"),
            r#"{"type":"SUCCESS","msg":"Authenticated as ann"}"#
        );
        assert_eq!(
            error("say \"hi\""),
            r#"{"type":"ERROR","msg":"say \"hi\""}"#
        );
        assert_eq!(info("bye"), r#"{"type":"INFO","msg":"bye"}"#);
        assert_eq!(auth_error(&AuthError::Expired), "invalid token: expired");
        assert_eq!(auth_error(&AuthError::Missing), "invalid token: missing");
        assert_eq!(
            auth_error(&AuthError::Invalid("InvalidSignature".into())),
            "invalid token: InvalidSignature"
        );
    }

    fn text_message() -> Message {
        Message::new(
            MessageId(789),
            RoomId(123),
            4,
            uid("42"),
            MessageBody::Text {
                text: "Hello there!".into(),
            },
            1_756_031_400_000,
        )
    }

    #[test]
    fn encodes_one_to_one_messages() {
        assert_eq!(
            encode_direct(&text_message(), "john_doe", "current_user"),
            r#"{"type":"ONE_TO_ONE_CHAT","from":"john_doe","to":"current_user","content":"Hello there!","chatId":"123","timestamp":"2025-08-24T10:30:00.000Z","messageId":"789"}"#
        );
        let mut m = text_message();
        m.client_ref = Some("c-1".into());
        m.body = MessageBody::Image(Media {
            media: "/uploads/chat-messages/images/a.webp".into(),
            caption: None,
            duration: None,
            size: None,
        });
        assert_eq!(
            encode_direct(&m, "a", "b"),
            r#"{"type":"ONE_TO_ONE_CHAT","from":"a","to":"b","content":"/uploads/chat-messages/images/a.webp","chatId":"123","timestamp":"2025-08-24T10:30:00.000Z","messageId":"789","clientId":"c-1","media":"/uploads/chat-messages/images/a.webp","mediaType":"image"}"#
        );
    }

    #[test]
    fn encodes_group_messages() {
        let mut m = text_message();
        m.id = MessageId(790);
        m.room = RoomId(456);
        m.created_at = 1_756_031_460_123;
        m.body = MessageBody::Audio(Media {
            media: "/uploads/chat-messages/audios/v.ogg".into(),
            caption: Some("listen".into()),
            duration: Some(3),
            size: None,
        });
        assert_eq!(
            encode_group(&m, "jane_doe"),
            r#"{"type":"GROUP_CHAT","from":"jane_doe","groupId":"456","content":"listen","timestamp":"2025-08-24T10:31:00.123Z","messageId":"790","media":"/uploads/chat-messages/audios/v.ogg","mediaType":"audio"}"#
        );
    }

    #[test]
    fn encodes_history() {
        let m = text_message();
        let mut gone = text_message();
        gone.id = MessageId(790);
        gone.body = MessageBody::Deleted {};
        gone.deleted_at = Some(1);
        let items = [
            DirectView::of(&m, "a", "b"),
            DirectView::of(&gone, "b", "a"),
        ];
        assert_eq!(
            encode_direct_history(Some(RoomId(123)), "b", &items, true),
            concat!(
                r#"{"type":"ONE_TO_ONE_CHAT_HISTORY","chatId":"123","with":"b","messages":["#,
                r#"{"type":"ONE_TO_ONE_CHAT","from":"a","to":"b","content":"Hello there!","chatId":"123","timestamp":"2025-08-24T10:30:00.000Z","messageId":"789"},"#,
                r#"{"type":"ONE_TO_ONE_CHAT","from":"b","to":"a","content":"","chatId":"123","timestamp":"2025-08-24T10:30:00.000Z","messageId":"790","deleted":true}"#,
                r#"],"hasMore":true}"#
            )
        );
        assert_eq!(
            encode_direct_history(None, "b", &[], false),
            r#"{"type":"ONE_TO_ONE_CHAT_HISTORY","chatId":null,"with":"b","messages":[],"hasMore":false}"#
        );
        let mut g = text_message();
        g.room = RoomId(456);
        assert_eq!(
            encode_group_history(RoomId(456), &[GroupView::of(&g, "ann")], false),
            concat!(
                r#"{"type":"GROUP_CHAT_HISTORY","groupId":"456","messages":["#,
                r#"{"type":"GROUP_CHAT","from":"ann","groupId":"456","content":"Hello there!","timestamp":"2025-08-24T10:30:00.000Z","messageId":"789"}"#,
                r#"],"hasMore":false}"#
            )
        );
    }

    #[test]
    fn encodes_presence() {
        assert_eq!(
            encode_presence("john_doe", true, 1_756_031_520_000),
            r#"{"type":"PRESENCE_UPDATE","username":"john_doe","status":"online","timestamp":"2025-08-24T10:32:00.000Z"}"#
        );
        assert_eq!(
            encode_presence("john_doe", false, 1_756_031_520_001),
            r#"{"type":"PRESENCE_UPDATE","username":"john_doe","status":"offline","timestamp":"2025-08-24T10:32:00.001Z"}"#
        );
    }
}
