//! The native protocol: JSON text frames on `GET /ws`.
//!
//! Client -> server, a request: `{"id": <string|integer>, "op": "<name>", ...arguments}`.
//! Every request gets exactly one reply:
//! `{"type":"reply","id":<same id>,"ok":true,"data":{...}}` or
//! `{"type":"reply","id":<same id or null>,"ok":false,"error":{"code":"...","message":"..."}}`.
//! Server -> client, an event: `{"type":"event","event":"<name>","room":<id>,"seq":<n>,"data":{...}}`
//! (`seq` only on events that are part of the room's ordered stream).
//!
//! Operations (arguments in braces; `?` optional): `ping {}`, `open_direct {user}`,
//! `create_group {name, members?, avatar?, public?}`, `update_group {room, name?, avatar?,
//! public?}`, `add_members {room, users}`, `remove_member {room, user}`, `set_role {room, user,
//! role}`, `join {room}`, `leave {room}`, `members {room}`, `send {room, text | type+media+caption?
//! +duration?, client_ref?, reply_to?}`, `edit {room, message, text}`, `delete {room,
//! messages}`, `react {room, message, emoji, add?}`, `read {room, message?}`, `typing {room,
//! typing}`, `view {room, viewing}`, `history {room, before?, after?, limit?, skip?}`,
//! `direct_history {user, before?, after?, limit?, skip?}`, `replay {room, after_seq}`, `resume {rooms: {"<room>":
//! <last seq>}}`, `rooms {}`, `chats {direct_only?, skip?, limit?}`, `friend {user, action}`,
//! `friendships {all?}`, `user {user? | username?}` (the user's id is `user`: `id` is the
//! request's), `mute {room, muted}`, `add_device {platform, token, device_id?}`,
//! `remove_device {token}`. Unknown arguments are refused, so a typo is an error rather than a silent default.

use schema::{
    Command, Error, ErrorCode, Event, FriendAction, HistoryQuery, Media, MessageBody, MessageId,
    Platform, Reply, Role, RoomId, UserId,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// Longest accepted request id (string ids), in bytes.
pub const MAX_ID_LEN: usize = 64;

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client's id, echoed in the reply (a JSON string or integer).
    pub id: Value,
    /// What to do.
    pub op: Op,
}

/// A native operation: a canonical command, or a session-level one.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Executed by the node.
    Command(Command),
    /// Liveness check answered by the gateway.
    Ping,
    /// Catch up on rooms after a reconnect: `(room, last seen seq)`; the session replays each.
    Resume(Vec<(RoomId, u64)>),
}

/// A frame that could not be decoded: the id if it was readable, and the error to reply.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The request id, or `null` when it could not be read.
    pub id: Value,
    /// What is wrong.
    pub error: Error,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenDirect {
    user: UserId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroup {
    name: String,
    #[serde(default)]
    members: Vec<UserId>,
    avatar: Option<String>,
    #[serde(default)]
    public: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateGroup {
    room: RoomId,
    name: Option<String>,
    avatar: Option<String>,
    public: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMembers {
    room: RoomId,
    users: Vec<UserId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomUser {
    room: RoomId,
    user: UserId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRole {
    room: RoomId,
    user: UserId,
    role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomOnly {
    room: RoomId,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Text,
    Image,
    Audio,
    Video,
    File,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    room: RoomId,
    #[serde(rename = "type")]
    kind: Option<Kind>,
    text: Option<String>,
    media: Option<String>,
    caption: Option<String>,
    duration: Option<u32>,
    client_ref: Option<String>,
    reply_to: Option<MessageId>,
}

impl Send {
    fn body(self) -> Result<(RoomId, MessageBody, Option<String>, Option<MessageId>), Error> {
        let kind = self.kind.unwrap_or(if self.media.is_some() {
            Kind::File
        } else {
            Kind::Text
        });
        let body = match kind {
            Kind::Text => {
                if self.media.is_some() || self.caption.is_some() || self.duration.is_some() {
                    return Err(Error::invalid(
                        "send: a text message takes `text` only (no media, caption or duration)",
                    ));
                }
                let text = self
                    .text
                    .ok_or_else(|| Error::invalid("send: missing field `text`"))?;
                MessageBody::Text { text }
            }
            k => {
                if self.text.is_some() {
                    return Err(Error::invalid(
                        "send: a media message takes `media` and `caption`, not `text`",
                    ));
                }
                let media = Media {
                    media: self
                        .media
                        .ok_or_else(|| Error::invalid("send: missing field `media`"))?,
                    caption: self.caption,
                    duration: self.duration,
                    size: None,
                };
                match k {
                    Kind::Image => MessageBody::Image(media),
                    Kind::Audio => MessageBody::Audio(media),
                    Kind::Video => MessageBody::Video(media),
                    _ => MessageBody::File(media),
                }
            }
        };
        Ok((self.room, body, self.client_ref, self.reply_to))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    room: RoomId,
    message: MessageId,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delete {
    room: RoomId,
    messages: Vec<MessageId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct React {
    room: RoomId,
    message: MessageId,
    emoji: String,
    #[serde(default = "yes")]
    add: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Read {
    room: RoomId,
    message: Option<MessageId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typing {
    room: RoomId,
    typing: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct View {
    room: RoomId,
    viewing: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct History {
    room: RoomId,
    before: Option<MessageId>,
    after: Option<MessageId>,
    limit: Option<u32>,
    skip: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectHistory {
    user: UserId,
    before: Option<MessageId>,
    after: Option<MessageId>,
    limit: Option<u32>,
    skip: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    room: RoomId,
    after_seq: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    rooms: std::collections::BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Chats {
    #[serde(default)]
    direct_only: bool,
    #[serde(default)]
    skip: u32,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Friend {
    user: UserId,
    action: FriendAction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Friendships {
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserLookup {
    /// The user's id (not `id`, which is the request id).
    user: Option<UserId>,
    username: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mute {
    room: RoomId,
    muted: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDevice {
    platform: Platform,
    token: String,
    device_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveDevice {
    token: String,
}

/// Every op name, for the unknown-op error.
const OPS: &str = "ping, open_direct, create_group, update_group, add_members, remove_member, \
                   set_role, join, leave, members, room, send, edit, delete, react, read, typing, view, \
                   history, direct_history, replay, resume, rooms, chats, friend, friendships, user, \
                   mute, add_device, remove_device";

fn args<T: DeserializeOwned>(op: &str, m: Map<String, Value>) -> Result<T, Error> {
    serde_json::from_value(Value::Object(m)).map_err(|e| Error::invalid(format!("{op}: {e}")))
}

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<Request, DecodeError> {
    let no_id = |error| DecodeError {
        id: Value::Null,
        error,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        no_id(Error::new(
            ErrorCode::MalformedJson,
            format!("frame is not valid JSON: {e}"),
        ))
    })?;
    let Value::Object(mut m) = value else {
        return Err(no_id(Error::new(
            ErrorCode::MalformedJson,
            "frame must be a JSON object",
        )));
    };
    let id = match m.remove("id") {
        None => return Err(no_id(Error::invalid("missing field `id`"))),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Value::String(s),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Value::Number(n),
        Some(_) => {
            return Err(no_id(Error::invalid(
                "`id` must be an integer or a string of 1 to 64 bytes",
            )));
        }
    };
    let with_id = |error| DecodeError {
        id: id.clone(),
        error,
    };
    let op = match m.remove("op") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(with_id(Error::invalid("`op` must be a string"))),
        None => return Err(with_id(Error::invalid("missing field `op`"))),
    };
    let cmd = |c: Command| Op::Command(c);
    let op = match op.as_str() {
        "ping" => args::<Empty>(&op, m).map(|_| Op::Ping),
        "open_direct" => {
            args::<OpenDirect>(&op, m).map(|a| cmd(Command::OpenDirect { peer: a.user }))
        }
        "create_group" => args::<CreateGroup>(&op, m).map(|a| {
            cmd(Command::CreateGroup {
                name: a.name,
                members: a.members,
                avatar: a.avatar,
                public: a.public,
            })
        }),
        "update_group" => args::<UpdateGroup>(&op, m).map(|a| {
            cmd(Command::UpdateGroup {
                room: a.room,
                name: a.name,
                avatar: a.avatar,
                public: a.public,
            })
        }),
        "add_members" => args::<AddMembers>(&op, m).map(|a| {
            cmd(Command::AddMembers {
                room: a.room,
                users: a.users,
            })
        }),
        "remove_member" => args::<RoomUser>(&op, m).map(|a| {
            cmd(Command::RemoveMember {
                room: a.room,
                user: a.user,
            })
        }),
        "set_role" => args::<SetRole>(&op, m).map(|a| {
            cmd(Command::SetRole {
                room: a.room,
                user: a.user,
                role: a.role,
            })
        }),
        "join" => args::<RoomOnly>(&op, m).map(|a| cmd(Command::Join { room: a.room })),
        "leave" => args::<RoomOnly>(&op, m).map(|a| cmd(Command::Leave { room: a.room })),
        "members" => args::<RoomOnly>(&op, m).map(|a| cmd(Command::Members { room: a.room })),
        "room" => args::<RoomOnly>(&op, m).map(|a| cmd(Command::Room { room: a.room })),
        "send" => args::<Send>(&op, m).and_then(|a| {
            let (room, body, client_ref, reply_to) = a.body()?;
            Ok(cmd(Command::Send {
                room,
                body,
                client_ref,
                reply_to,
            }))
        }),
        "edit" => args::<Edit>(&op, m).map(|a| {
            cmd(Command::Edit {
                room: a.room,
                message: a.message,
                text: a.text,
            })
        }),
        "delete" => args::<Delete>(&op, m).map(|a| {
            cmd(Command::Delete {
                room: a.room,
                messages: a.messages,
            })
        }),
        "react" => args::<React>(&op, m).map(|a| {
            cmd(Command::React {
                room: a.room,
                message: a.message,
                emoji: a.emoji,
                add: a.add,
            })
        }),
        "read" => args::<Read>(&op, m).map(|a| {
            cmd(Command::MarkRead {
                room: a.room,
                message: a.message,
            })
        }),
        "typing" => args::<Typing>(&op, m).map(|a| {
            cmd(Command::Typing {
                room: a.room,
                typing: a.typing,
            })
        }),
        "view" => args::<View>(&op, m).map(|a| {
            cmd(Command::View {
                room: a.room,
                viewing: a.viewing,
                session: None,
            })
        }),
        "history" => args::<History>(&op, m).map(|a| {
            cmd(Command::History {
                room: a.room,
                query: HistoryQuery {
                    before: a.before,
                    after: a.after,
                    limit: a.limit,
                    skip: a.skip,
                },
            })
        }),
        "direct_history" => args::<DirectHistory>(&op, m).map(|a| {
            cmd(Command::DirectHistory {
                peer: a.user,
                query: HistoryQuery {
                    before: a.before,
                    after: a.after,
                    limit: a.limit,
                    skip: a.skip,
                },
            })
        }),
        "replay" => args::<Replay>(&op, m).map(|a| {
            cmd(Command::Replay {
                room: a.room,
                after_seq: a.after_seq,
            })
        }),
        "resume" => args::<Resume>(&op, m).and_then(|a| {
            if a.rooms.len() > 10_000 {
                return Err(Error::invalid("resume: at most 10000 rooms"));
            }
            a.rooms
                .into_iter()
                .map(|(k, seq)| {
                    k.parse::<u64>()
                        .ok()
                        .and_then(|v| RoomId::parse(v).ok())
                        .map(|r| (r, seq))
                        .ok_or_else(|| Error::invalid(format!("resume: {k:?} is not a room id")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Op::Resume)
        }),
        "rooms" => args::<Empty>(&op, m).map(|_| cmd(Command::ListRooms)),
        "chats" => args::<Chats>(&op, m).map(|a| {
            cmd(Command::Chats {
                direct_only: a.direct_only,
                skip: a.skip,
                limit: a.limit,
            })
        }),
        "friend" => args::<Friend>(&op, m).map(|a| {
            cmd(Command::Friend {
                peer: a.user,
                action: a.action,
            })
        }),
        "friendships" => {
            args::<Friendships>(&op, m).map(|a| cmd(Command::Friendships { all: a.all }))
        }
        "user" => args::<UserLookup>(&op, m).map(|a| {
            cmd(Command::User {
                id: a.user,
                username: a.username,
            })
        }),
        "mute" => args::<Mute>(&op, m).map(|a| {
            cmd(Command::Mute {
                room: a.room,
                muted: a.muted,
            })
        }),
        "add_device" => args::<AddDevice>(&op, m).map(|a| {
            cmd(Command::AddDevice {
                platform: a.platform,
                token: a.token,
                device_id: a.device_id,
            })
        }),
        "remove_device" => {
            args::<RemoveDevice>(&op, m).map(|a| cmd(Command::RemoveDevice { token: a.token }))
        }
        other => Err(Error::new(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}; expected one of {OPS}"),
        )),
    }
    .map_err(with_id)?;
    Ok(Request { id, op })
}

/// The fields of a tagged enum value, without its tag.
fn untagged(v: impl serde::Serialize, tag: &str) -> Value {
    match serde_json::to_value(v) {
        Ok(Value::Object(mut m)) => {
            m.remove(tag);
            Value::Object(m)
        }
        Ok(other) => other,
        Err(e) => json!({ "encode_error": e.to_string() }),
    }
}

/// Encodes a successful reply: `data` holds the reply's fields.
pub fn encode_ok(id: &Value, reply: &Reply) -> String {
    encode_data(id, untagged(reply, "reply"))
}

/// Encodes a successful reply with the given data.
pub fn encode_data(id: &Value, data: Value) -> String {
    json!({ "type": "reply", "id": id, "ok": true, "data": data }).to_string()
}

/// Encodes the reply to `ping`.
pub fn encode_pong(id: &Value) -> String {
    json!({ "type": "reply", "id": id, "ok": true, "data": {} }).to_string()
}

/// Encodes an error reply.
pub fn encode_error(id: &Value, e: &Error) -> String {
    json!({
        "type": "reply",
        "id": id,
        "ok": false,
        "error": { "code": e.code, "message": e.message },
    })
    .to_string()
}

/// Encodes an event: `data` holds the event's fields; `room` and `seq` are repeated at the top
/// level when the event has them.
pub fn encode_event(e: &Event) -> String {
    let mut v = json!({ "type": "event", "event": e.name(), "data": untagged(e, "event") });
    if let Some(room) = e.room() {
        v["room"] = json!(room);
    }
    if let Some(seq) = e.seq() {
        v["seq"] = json!(seq);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> DecodeError {
        match decode(text) {
            Err(e) => e,
            Ok(r) => panic!("decoded {r:?}"),
        }
    }

    #[test]
    fn decodes_every_op() {
        let r =
            decode(r#"{"id":1,"op":"send","room":5,"text":"hi","client_ref":"c1"}"#).expect("send");
        assert_eq!(r.id, json!(1));
        assert_eq!(
            r.op,
            Op::Command(Command::Send {
                room: RoomId(5),
                body: MessageBody::Text { text: "hi".into() },
                client_ref: Some("c1".into()),
                reply_to: None,
            })
        );
        let r = decode(r#"{"id":"a","op":"history","room":5,"before":9,"limit":2}"#).expect("h");
        assert!(matches!(r.op, Op::Command(Command::History { .. })));
        let r = decode(r#"{"id":"a","op":"open_direct","user":"42"}"#).expect("od");
        assert!(matches!(r.op, Op::Command(Command::OpenDirect { .. })));
        let r =
            decode(r#"{"id":"a","op":"create_group","name":"g","members":["1","2"]}"#).expect("cg");
        assert!(matches!(r.op, Op::Command(Command::CreateGroup { .. })));
        assert_eq!(
            decode(r#"{"id":2,"op":"rooms"}"#).expect("r").op,
            Op::Command(Command::ListRooms)
        );
        assert_eq!(decode(r#"{"id":2,"op":"ping"}"#).expect("p").op, Op::Ping);
        assert_eq!(
            decode(r#"{"id":3,"op":"mute","room":5,"muted":true}"#)
                .expect("m")
                .op,
            Op::Command(Command::Mute {
                room: RoomId(5),
                muted: true
            })
        );
        assert_eq!(
            decode(r#"{"id":4,"op":"add_device","platform":"fcm","token":"t","device_id":"d"}"#)
                .expect("ad")
                .op,
            Op::Command(Command::AddDevice {
                platform: Platform::Fcm,
                token: "t".into(),
                device_id: Some("d".into())
            })
        );
        assert_eq!(
            decode(r#"{"id":5,"op":"remove_device","token":"t"}"#)
                .expect("rd")
                .op,
            Op::Command(Command::RemoveDevice { token: "t".into() })
        );
        let e = err(r#"{"id":6,"op":"add_device","platform":"apns","token":"t"}"#);
        assert!(
            e.error.message.contains("unknown variant `apns`"),
            "{}",
            e.error.message
        );
        let e = err(r#"{"id":7,"op":"mute","room":5}"#);
        assert!(
            e.error.message.contains("missing field `muted`"),
            "{}",
            e.error.message
        );
    }

    #[test]
    fn precise_errors() {
        let e = err("{not json");
        assert_eq!(
            (e.id.clone(), e.error.code),
            (Value::Null, ErrorCode::MalformedJson)
        );
        assert_eq!(err("[1,2]").error.code, ErrorCode::MalformedJson);
        assert_eq!(err(r#"{"op":"rooms"}"#).error.message, "missing field `id`");
        assert_eq!(
            err(r#"{"id":{},"op":"rooms"}"#).error.code,
            ErrorCode::InvalidField
        );
        assert_eq!(
            err(r#"{"id":1.5,"op":"rooms"}"#).error.code,
            ErrorCode::InvalidField
        );
        let e = err(r#"{"id":7,"op":"fly"}"#);
        assert_eq!(
            (e.id.clone(), e.error.code),
            (json!(7), ErrorCode::UnknownOp)
        );
        let e = err(r#"{"id":7,"op":"send","text":"x"}"#);
        assert_eq!(e.error.code, ErrorCode::InvalidField);
        assert!(
            e.error.message.contains("missing field `room`"),
            "{}",
            e.error.message
        );
        let e = err(r#"{"id":7,"op":"send","room":"5","text":"x"}"#);
        assert!(
            e.error.message.contains("invalid type"),
            "{}",
            e.error.message
        );
        let e = err(r#"{"id":7,"op":"send","room":9007199254740992,"text":"x"}"#);
        assert!(e.error.message.contains("2^53"), "{}", e.error.message);
        let e = err(r#"{"id":7,"op":"send","room":1,"text":"x","colour":"red"}"#);
        assert!(
            e.error.message.contains("unknown field `colour`"),
            "{}",
            e.error.message
        );
        let e = err(r#"{"id":7,"op":"open_direct","user":""}"#);
        assert!(
            e.error.message.contains("must not be empty"),
            "{}",
            e.error.message
        );
    }

    #[test]
    fn encodes_fixtures() {
        let e = Error::new(ErrorCode::NotMember, "you are not a member of room 5");
        assert_eq!(
            encode_error(&json!("x"), &e),
            r#"{"error":{"code":"not_member","message":"you are not a member of room 5"},"id":"x","ok":false,"type":"reply"}"#
        );
        assert_eq!(
            encode_pong(&json!(3)),
            r#"{"data":{},"id":3,"ok":true,"type":"reply"}"#
        );
        let m = schema::Message::new(
            MessageId(77),
            RoomId(5),
            2,
            UserId::parse("1").expect("uid"),
            MessageBody::Text { text: "yo".into() },
            9,
        );
        assert_eq!(
            encode_event(&Event::Message { message: m }),
            r#"{"data":{"message":{"created_at":9,"id":77,"room":5,"sender":"1","seq":2,"text":"yo","type":"text"}},"event":"message","room":5,"seq":2,"type":"event"}"#
        );
    }
}
