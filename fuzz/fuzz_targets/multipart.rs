//! Multipart bodies (boundary `fuzz`) through the extractor the upload routes use, each field
//! through the form-field parsers (message type, duration, file name, kind, range, path).
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::multipart(data);
});
