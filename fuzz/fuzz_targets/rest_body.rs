//! REST bodies and query strings: the native REST JSON bodies, the Syarah routes' bodies and
//! the event/data `*.php` bodies (JSON or form-encoded, by content type) and queries. The first
//! byte picks the content type.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let ctype = match pick % 4 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("application/x-www-form-urlencoded"),
        _ => Some("text/plain; charset=utf-8"),
    };
    let first = fuzzing::rest_body(ctype, body);
    assert_eq!(first, fuzzing::rest_body(ctype, body));
});
