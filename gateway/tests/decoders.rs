//! Garbage in, a clear answer out: every decoder a client can reach (the native protocol, the
//! Phoenix, type-tagged and event/data frames, Phoenix's `send_message` payload, Socket.IO event
//! arguments, REST bodies and queries, multipart forms, upload sniffing and form fields, JWTs,
//! upload kinds) is fed random text, random JSON trees and random mutations of valid frames. Each must
//! return (a value or an error) and never panic. A decoder that accepts something must accept
//! the same input again identically (decoding is a pure function).
//!
//! This is the quick, nightly-free counterpart of the coverage-guided targets in `fuzz/`.
//!
//! The case count is `PROPTEST_CASES` (proptest's default, 256 per property; raise it for a
//! longer run: 20,000 per property passed when this was written).
#![allow(clippy::unwrap_used)]

mod common;

use palaver_gateway::dialect::{events, native, phoenix, rt};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Valid frames of each dialect, the seeds of the mutation strategy.
const NATIVE: &[&str] = &[
    r#"{"id":1,"op":"send","room":305419896,"text":"hello","client_ref":"m-1"}"#,
    r#"{"id":"a","op":"history","room":7,"limit":50,"before":1234}"#,
    r#"{"id":2,"op":"create_group","name":"g","members":["2","3"]}"#,
    r#"{"id":3,"op":"resume","rooms":{"7":12}}"#,
];
const PHOENIX: &[&str] = &[
    r#"["1","1","chat:42","phx_join",{}]"#,
    r#"[null,"2","phoenix","heartbeat",{}]"#,
    r#"["1","3","chat:42","send_message",{"content":"hi","mobile_ref_id":"m-9"}]"#,
];
const RT: &[&str] = &[
    r#"{"type":"AUTH","token":"x.y.z"}"#,
    r#"{"type":"ONE_TO_ONE_CHAT","from":"ann","to":"bob","content":"hi"}"#,
    r#"{"type":"GROUP_CHAT","from":"ann","groupId":"7","content":"hi"}"#,
    r#"{"type":"HISTORY","groupId":"7","limit":20}"#,
];
const SOCKETIO: &[&str] = &[
    r#"{"message":"hi","receiver_id":2}"#,
    r#"{"chatHeaderId":7,"message":"hi","messageType":0,"clientRef":"r1"}"#,
    r#"{"chatHeaderId":"7","ids":[1,2,"3"],"limit":20}"#,
    r#"{"otherUserId":"42","id":"9"}"#,
];
const REST: &[&str] = &[
    r#"{"name":"g","members":["2","3"]}"#,
    "message=hi&receiver_id=2&type=text",
    "limit=20&before=100&group_id=9",
];
const MULTIPART: &[&str] = &[
    "--fuzz\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nimage\r\n--fuzz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNG\r\n--fuzz--\r\n",
    "--fuzz\r\nContent-Disposition: form-data; name=\"messageType\"\r\n\r\n2\r\n--fuzz\r\nContent-Disposition: form-data; name=\"duration\"\r\n\r\n3.5\r\n--fuzz--\r\n",
];
const EVENTS: &[&str] = &[
    r#"{"event":"chat:typing","data":{"receiver_id":2,"is_typing":true}}"#,
    r#"{"event":"chat:read","data":{"message_id":5,"sender_id":2}}"#,
    r#"{"event":"ping","data":{}}"#,
];

/// Arbitrary JSON trees (depth and width bounded).
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        // Names the decoders look for, so trees reach past the first check.
        prop::sample::select(vec![
            "send",
            "op",
            "id",
            "room",
            "text",
            "AUTH",
            "GROUP_CHAT",
            "phx_join",
            "chat:1",
            "notifications:1",
            "chat:typing",
            "event",
            "data",
            "type",
            "heartbeat",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "id",
                        "op",
                        "room",
                        "text",
                        "type",
                        "token",
                        "from",
                        "to",
                        "content",
                        "groupId",
                        "event",
                        "data",
                        "receiver_id",
                        "message_id",
                        "limit",
                        "before",
                        "members",
                        "name",
                        "client_ref",
                        "mobile_ref_id",
                        "x",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A valid frame of `seeds` with random byte edits (replace, insert, delete), kept only when
/// the result is still UTF-8 (frames arrive as text).
fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(|(seed, edits)| {
            let mut b = seed.as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let i = at % (b.len() + 1);
                match kind {
                    0 if i < b.len() => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ if i < b.len() => {
                        b.remove(i);
                    }
                    _ => b.push(byte),
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

/// Text a client could send: random, a JSON tree, or a mutated valid frame.
fn input(seeds: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        json().prop_map(|v| v.to_string()),
        mutated(seeds),
    ]
}

proptest! {
    #[test]
    fn native_frames(text in input(NATIVE)) {
        let first = native::decode(&text).map(|r| format!("{r:?}")).map_err(|e| format!("{e:?}"));
        let again = native::decode(&text).map(|r| format!("{r:?}")).map_err(|e| format!("{e:?}"));
        prop_assert_eq!(first, again);
    }

    #[test]
    fn phoenix_frames(text in input(PHOENIX)) {
        if let Ok(m) = phoenix::codec::decode_frame(&text) {
            let _topic = phoenix::codec::parse_topic(&m.topic);
            let _send = phoenix::codec::decode_send(&m.payload);
        }
    }

    #[test]
    fn phoenix_send_payloads(payload in json()) {
        if let Value::Object(m) = payload {
            let _ = phoenix::codec::decode_send(&m);
        }
    }

    #[test]
    fn type_tagged_frames(text in input(RT)) {
        let _ = rt::codec::decode(&text);
    }

    #[test]
    fn event_data_frames(text in input(EVENTS)) {
        let me = schema::UserId::parse("42").unwrap();
        let _ = events::codec::decode_frame(&text, &me);
    }

    #[test]
    fn random_tokens_are_refused(token in prop_oneof![
        ".{0,300}",
        "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,90}",
    ]) {
        prop_assert!(common::auth().verify(&token).is_err());
    }

    /// A signed token with one byte changed is refused, or (when the edit leaves the decoded
    /// bytes the same, e.g. unused base64 bits) still names the user it was signed for: an
    /// edit never yields another identity.
    #[test]
    fn edited_tokens_never_change_identity(at in any::<usize>(), byte in any::<u8>()) {
        let signed = common::token("7");
        let mut t = signed.clone().into_bytes();
        let i = at % t.len();
        t[i] = byte;
        let token = String::from_utf8_lossy(&t).into_owned();
        if let Ok(profile) = common::auth().verify(&token) {
            prop_assert_eq!(profile.id.as_str(), "7");
        }
    }

    /// Socket.IO event arguments through both Socket.IO dialects' checks (the packet itself is
    /// socketioxide's; `fuzz/` also fuzzes it through socketioxide's parser).
    #[test]
    fn socketio_arguments(event in "[a-zA-Z_]{0,16}", text in input(SOCKETIO)) {
        let data = serde_json::from_str::<Value>(&text).map_err(|e| e.to_string());
        let first = palaver_gateway::fuzzing::socketio_event(&event, &data);
        prop_assert_eq!(first, palaver_gateway::fuzzing::socketio_event(&event, &data));
    }

    #[test]
    fn rest_bodies(pick in 0u8..4, text in input(REST)) {
        let ctype = [None, Some("application/json"), Some("application/x-www-form-urlencoded"), Some("text/plain")][usize::from(pick)];
        let first = palaver_gateway::fuzzing::rest_body(ctype, text.as_bytes());
        prop_assert_eq!(first, palaver_gateway::fuzzing::rest_body(ctype, text.as_bytes()));
    }

    #[test]
    fn multipart_bodies(text in prop_oneof![".{0,200}", mutated(MULTIPART)]) {
        let _ = palaver_gateway::fuzzing::multipart(text.as_bytes());
    }

    #[test]
    fn upload_heads(kind in any::<u8>(), head in prop::collection::vec(any::<u8>(), 0..64), field in ".{0,40}") {
        let first = palaver_gateway::fuzzing::upload_head(kind, &head, &field);
        prop_assert_eq!(first, palaver_gateway::fuzzing::upload_head(kind, &head, &field));
    }

    #[test]
    fn upload_kinds(name in ".{0,40}") {
        let _ = palaver_gateway::uploads::MediaKind::parse(&name);
    }
}
