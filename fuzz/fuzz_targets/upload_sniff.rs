//! Upload sniffing and the upload form fields: content sniffing of a body's first bytes, the
//! early content check for each kind, and the field parsers on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    // The rest is both the body's head and (as lossy text) a field value.
    let field = String::from_utf8_lossy(rest);
    let first = fuzzing::upload_head(kind, rest, &field);
    assert_eq!(first, fuzzing::upload_head(kind, rest, &field));
});
