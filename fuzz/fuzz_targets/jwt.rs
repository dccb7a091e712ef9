//! JWT verification: an arbitrary token is refused unless it is a valid signature of the
//! server's key; a valid token edited by the fuzzer never names another user.
#![no_main]
use libfuzzer_sys::fuzz_target;
use palaver_gateway::auth::{Auth, Claims};
use palaver_gateway::config::JwtKey;
use std::sync::OnceLock;

const SECRET: &str = "fuzz-secret-at-least-16-bytes";

fn auth() -> &'static (Auth, String) {
    static AUTH: OnceLock<(Auth, String)> = OnceLock::new();
    AUTH.get_or_init(|| {
        let auth = Auth::new(
            &JwtKey::Secret(SECRET.into()),
            std::path::Path::new("/nonexistent"),
        )
        .expect("auth");
        let token = auth
            .mint(&Claims {
                sub: "7".into(),
                exp: 4_102_444_800, // 2100-01-01
                iat: None,
                name: Some("Seven".into()),
                username: Some("seven".into()),
                picture: None,
            })
            .expect("mint");
        (auth, token)
    })
}

fuzz_target!(|data: &[u8]| {
    let (auth, valid) = auth();
    // As given.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(profile) = auth.verify(text)
    {
        // Only a real signature passes: the fuzzer cannot forge one, so this must be the
        // minted token (or an equivalent encoding of it).
        assert_eq!(profile.id.as_str(), "7", "a forged token was accepted");
    }
    // As edits of the valid token: pairs (position, byte).
    let mut t = valid.clone().into_bytes();
    for pair in data.chunks_exact(2) {
        let at = usize::from(pair[0]) * t.len() / 256;
        t[at] = pair[1];
    }
    if let Ok(edited) = std::str::from_utf8(&t)
        && let Ok(profile) = auth.verify(edited)
    {
        assert_eq!(
            profile.id.as_str(),
            "7",
            "an edited token named another user"
        );
    }
});
