//! The native protocol: JSON text frames on `GET /ws`.
//!
//! Client -> server, a request: `{"id": <string|integer>, "op": "<name>", ...arguments}`.
//! Every request gets exactly one reply:
//! `{"type":"reply","id":<same id>,"ok":true,"data":{...}}` or
//! `{"type":"reply","id":<same id or null>,"ok":false,"error":{"code":"...","message":"..."}}`.
//! Server -> client, an event: `{"type":"event","event":"<name>","room":<id>,"seq":<n>,"data":{...}}`
//! (`seq` only on events that are part of the room's ordered stream).
//!
//! Operations: `open_direct {user}`, `create_group {name, members}`,
//! `send {room, text, client_ref?}`, `history {room, before?, after?, limit?}`, `rooms {}`,
//! `ping {}`. Unknown arguments are refused, so a typo is an error rather than a silent default.

use schema::{
    Command, Error, ErrorCode, Event, HistoryQuery, MessageBody, MessageId, Reply, RoomId, UserId,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    room: RoomId,
    text: String,
    client_ref: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct History {
    room: RoomId,
    before: Option<MessageId>,
    after: Option<MessageId>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

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
    let op = match op.as_str() {
        "ping" => args::<Empty>(&op, m).map(|_| Op::Ping),
        "open_direct" => {
            args::<OpenDirect>(&op, m).map(|a| Op::Command(Command::OpenDirect { peer: a.user }))
        }
        "create_group" => args::<CreateGroup>(&op, m).map(|a| {
            Op::Command(Command::CreateGroup {
                name: a.name,
                members: a.members,
            })
        }),
        "send" => args::<Send>(&op, m).map(|a| {
            Op::Command(Command::Send {
                room: a.room,
                body: MessageBody::Text { text: a.text },
                client_ref: a.client_ref,
            })
        }),
        "history" => args::<History>(&op, m).map(|a| {
            Op::Command(Command::History {
                room: a.room,
                query: HistoryQuery {
                    before: a.before,
                    after: a.after,
                    limit: a.limit,
                },
            })
        }),
        "rooms" => args::<Empty>(&op, m).map(|_| Op::Command(Command::ListRooms)),
        other => Err(Error::new(
            ErrorCode::UnknownOp,
            format!(
                "unknown op {other:?}; expected one of open_direct, create_group, send, history, \
                 rooms, ping"
            ),
        )),
    }
    .map_err(with_id)?;
    Ok(Request { id, op })
}

/// Encodes a successful reply.
pub fn encode_ok(id: &Value, reply: &Reply) -> String {
    let data = match reply {
        Reply::Room { room, created } => json!({ "room": room, "created": created }),
        Reply::Message { message } => json!({ "message": message }),
        Reply::History { messages, has_more } => {
            json!({ "messages": messages, "has_more": has_more })
        }
        Reply::Rooms { rooms } => json!({ "rooms": rooms }),
    };
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

/// Encodes an event.
pub fn encode_event(e: &Event) -> String {
    let data = match e {
        Event::Message { message } => json!({ "message": message }),
        Event::RoomJoined { room } => json!({ "room": room }),
    };
    let mut v = json!({ "type": "event", "event": e.name(), "room": e.room(), "data": data });
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
                client_ref: Some("c1".into())
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
        let m = schema::Message {
            id: MessageId(77),
            room: RoomId(5),
            seq: 2,
            sender: UserId::parse("1").expect("uid"),
            body: MessageBody::Text { text: "yo".into() },
            client_ref: None,
            created_at: 9,
        };
        assert_eq!(
            encode_event(&Event::Message { message: m }),
            r#"{"data":{"message":{"created_at":9,"id":77,"room":5,"sender":"1","seq":2,"text":"yo","type":"text"}},"event":"message","room":5,"seq":2,"type":"event"}"#
        );
    }
}
