//! Phoenix Channels frames (`[join_ref, ref, topic, event, payload]`), topics and the
//! `send_message` payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::dialect::phoenix::codec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = codec::decode_frame(text) {
        let _ = codec::parse_topic(&m.topic);
        let _ = codec::decode_send(&m.payload);
    }
    // The payload decoder on its own, for any JSON value.
    if let Ok(serde_json::Value::Object(payload)) = serde_json::from_str(text) {
        let _ = codec::decode_send(&payload);
    }
});
