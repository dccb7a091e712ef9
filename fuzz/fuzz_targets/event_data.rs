//! The event/data dialect's WebSocket frames (`{"event", "data"}`), decoded for a fixed user.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::dialect::events::codec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(me) = schema::UserId::parse("7") else {
        return;
    };
    let _ = codec::decode_frame(text, &me);
});
