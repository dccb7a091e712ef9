//! The few frames of Socket.IO v4 (Engine.IO v4, websocket transport, text only) that the
//! Socket.IO workload needs: open, namespace connect with auth, ping/pong, an event with an ack,
//! the ack, and an event from the server. The vocabulary is the Syarah dialect's (seed 001),
//! which both Palaver (namespace `/`) and the Node.js peer in `load/peer-socketio/` speak:
//! `joinRoom` (`otherUserId` or `chatHeaderId`) and `createMessage` with acks, and the
//! `message` event `{chatHeaderId, chatMessage: {id, message, ...}}`.
//!
//! Engine.IO packet types are one digit (`0` open, `2` ping, `3` pong, `4` message); a Socket.IO
//! packet rides in an Engine.IO message as `4` + its type (`0` connect, `2` event, `3` ack,
//! `4` connect error) + an optional ack id + JSON. So `42["message",{..}]` is an event,
//! `427["send",{..}]` an event asking for ack 7, and `437[{..}]` that ack.
//!
//! Written here rather than taken from `rust_socketio`: its websocket transport dials with
//! `connect_async` itself, so it can neither bind the spread loopback source addresses nor set
//! `TCP_NODELAY` (Nagle would add latency to the peer's numbers that the peer did not cause), and
//! it brings a second tungstenite, reqwest and native-tls into the build. These lines reuse the
//! native client's sockets, so both protocols are measured by the same code path.

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws = super::Ws;

/// A frame from the server, as far as the load generator cares.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    /// Engine.IO ping: answer `3`.
    Ping,
    /// The ack of the event sent with ack id `id`; `error` when the peer refused it.
    Ack { id: u64, error: Option<String> },
    /// A `message` event: its text and id.
    Message { text: String, id: u64 },
    /// Anything else.
    Other,
}

/// Splits `<digits><json>` into the ack id and the JSON.
fn ack_id(s: &str) -> (Option<u64>, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (s[..end].parse().ok(), &s[end..])
}

/// Decodes one text frame.
pub(crate) fn parse(text: &str) -> Frame {
    if text == "2" {
        return Frame::Ping;
    }
    if let Some(rest) = text.strip_prefix("43") {
        let (Some(id), json) = ack_id(rest) else {
            return Frame::Other;
        };
        let v: Value = serde_json::from_str(json).unwrap_or(Value::Null);
        let error = v[0]["error"].as_str().map(|e| e.to_owned());
        let error = match (&v, error) {
            (Value::Array(_), e) => e,
            _ => Some("malformed_ack".into()),
        };
        return Frame::Ack { id, error };
    }
    if let Some(rest) = text.strip_prefix("42") {
        let (_, json) = ack_id(rest);
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            return Frame::Other;
        };
        let m = &v[1]["chatMessage"];
        if v[0] == "message"
            && let Some(t) = m["message"].as_str()
        {
            return Frame::Message {
                text: t.to_owned(),
                id: m["id"].as_u64().unwrap_or(0),
            };
        }
    }
    Frame::Other
}

/// `createMessage` with ack id `seq`.
pub(crate) fn send_frame(seq: u64, room: &Value, text: &str, client_ref: &str) -> String {
    format!(
        "42{seq}{}",
        json!(["createMessage", {"chatHeaderId": room, "message": text, "messageType": 0,
                                 "clientRef": client_ref}])
    )
}

/// Reads the next text frame (answering pings), with a set-up timeout.
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        let Some(m) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? else {
            anyhow::bail!("connection closed during Socket.IO set-up");
        };
        if let Message::Text(t) = m? {
            if t.as_str() == "2" {
                ws.send(Message::text("3")).await?;
                continue;
            }
            return Ok(t.as_str().to_owned());
        }
    }
}

/// Engine.IO open, then the Socket.IO connect to `/` with `auth: {token}`.
pub(crate) async fn handshake(ws: &mut Ws, token: &str) -> anyhow::Result<()> {
    let open = next_text(ws).await?;
    anyhow::ensure!(
        open.starts_with('0'),
        "expected an Engine.IO open packet, got {open:?}"
    );
    ws.send(Message::text(format!("40{}", json!({"token": token}))))
        .await?;
    let connected = next_text(ws).await?;
    anyhow::ensure!(
        connected.starts_with("40"),
        "Socket.IO connect refused: {connected:?}"
    );
    Ok(())
}

/// `joinRoom` with `args` (`{chatHeaderId}` or `{otherUserId}`); answers the room's
/// `chatHeaderId` from the ack.
pub(crate) async fn join(ws: &mut Ws, args: Value) -> anyhow::Result<Value> {
    ws.send(Message::text(format!("420{}", json!(["joinRoom", args]))))
        .await?;
    loop {
        let t = next_text(ws).await?;
        if let Some(rest) = t.strip_prefix("430") {
            let v: Value = serde_json::from_str(rest)?;
            anyhow::ensure!(
                v[0]["error"].is_null(),
                "joinRoom refused: {}",
                v[0]["error"]
            );
            let room = v[0]["chatHeaderId"].clone();
            anyhow::ensure!(!room.is_null(), "joinRoom answered no chatHeaderId: {v}");
            return Ok(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_frames_the_peer_sends() {
        assert_eq!(parse("2"), Frame::Ping);
        assert_eq!(
            parse(r#"4312[{"id":5,"seq":2}]"#),
            Frame::Ack {
                id: 12,
                error: None
            }
        );
        assert_eq!(
            parse(r#"433[{"error":"not_member"}]"#),
            Frame::Ack {
                id: 3,
                error: Some("not_member".into())
            }
        );
        assert_eq!(
            parse(
                r#"42["message",{"chatHeaderId":4,"chatMessage":{"id":9,"seq":1,"message":"1:2:3:x"}}]"#
            ),
            Frame::Message {
                text: "1:2:3:x".into(),
                id: 9
            }
        );
        assert_eq!(parse(r#"40{"sid":"x"}"#), Frame::Other);
        assert_eq!(
            send_frame(7, &json!("r"), "t", "c"),
            r#"427["createMessage",{"chatHeaderId":"r","clientRef":"c","message":"t","messageType":0}]"#
        );
    }
}
