//! Socket.IO event packets as Palaver reads them: the packet decoded by socketioxide's parser
//! (what the server runs), the event's first argument decoded as JSON, then both Socket.IO
//! dialects' argument checks (NotifyHub `send_message`, the Syarah events' fields).
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::fuzzing;
use socketioxide_core::Value as SioValue;
use socketioxide_core::packet::PacketData;
use socketioxide_core::parser::{Parse, ParseConfig, ParserState};
use socketioxide_parser_common::CommonParser;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let state = ParserState::default();
    let packet = CommonParser.decode_str(&ParseConfig::default(), &state, text.to_owned().into());
    let Ok(packet) = packet else {
        return;
    };
    let (PacketData::Event(SioValue::Str(args, _), _)
    | PacketData::BinaryEvent(SioValue::Str(args, _), _)) = packet.inner
    else {
        return;
    };
    let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(args.as_str()) else {
        return;
    };
    let event = list
        .first()
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let arg = match list.get(1) {
        Some(v) => Ok(v.clone()),
        None => Err("no argument".to_owned()),
    };
    let first = fuzzing::socketio_event(&event, &arg);
    assert_eq!(first, fuzzing::socketio_event(&event, &arg));
});
