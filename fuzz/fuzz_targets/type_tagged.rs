//! The type-tagged JSON dialect's frames (`{"type": ...}`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::dialect::rt::codec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = format!("{:?}", codec::decode(text));
    let again = format!("{:?}", codec::decode(text));
    assert_eq!(first, again, "rt::codec::decode is not deterministic");
});
