//! The native protocol's frame decoder: never a panic, and a pure function.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::dialect::native;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = format!("{:?}", native::decode(text));
    let again = format!("{:?}", native::decode(text));
    assert_eq!(first, again, "native::decode is not deterministic");
});
