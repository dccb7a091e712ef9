//! JWT authentication: tokens -> identities.
//!
//! The algorithm is pinned by configuration: HS256 with a shared secret, or one asymmetric
//! algorithm with a public key. A token whose header names any other algorithm (including
//! `none`) is refused, `exp` is required, and `sub` must be a valid user id. The claims become
//! the user's [`Profile`], refreshed on every connect.

use crate::config::JwtKey;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use schema::{Profile, UserId};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Why a token was refused. Dialects map these to their own strings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("access token not found")]
    Missing,
    /// The token is past its `exp`.
    #[error("access token has expired")]
    Expired,
    /// Bad signature, wrong algorithm, malformed, missing claims.
    #[error("access token is invalid: {0}")]
    Invalid(String),
}

/// The claims Palaver reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Avatar URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
}

/// Verifies tokens with the configured key; can also mint HS256 tokens.
pub struct Auth {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

/// Name of the secret file created in the data dir when no key is configured.
pub const SECRET_FILE: &str = "jwt_secret";

/// Reads the data dir's secret, creating it (random, mode 0600) the first time.
pub fn secret_from_data_dir(dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(SECRET_FILE);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let bytes: [u8; 48] = rand::random();
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            f.write_all(secret.as_bytes())?;
            f.sync_all()?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let s = std::fs::read_to_string(&path)?;
            let s = s.trim().to_owned();
            if s.len() < 16 {
                return Err(std::io::Error::other(format!(
                    "{} is too short",
                    path.display()
                )));
            }
            Ok(s)
        }
        Err(e) => Err(e),
    }
}

fn parse_alg(name: &str) -> Result<Algorithm, String> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        o => Err(format!("unsupported algorithm {o:?} for a public key")),
    }
}

impl Auth {
    /// Builds the verifier for `key` (reading or creating the data dir secret if needed).
    pub fn new(key: &JwtKey, data_dir: &Path) -> Result<Self, String> {
        let (decoding, encoding, alg) = match key {
            JwtKey::Secret(s) => hs256(s),
            JwtKey::SecretFile => {
                let s = secret_from_data_dir(data_dir)
                    .map_err(|e| format!("cannot read or create the JWT secret: {e}"))?;
                hs256(&s)
            }
            JwtKey::PublicKey { pem, algorithm } => {
                let pem = pem.as_bytes();
                let (dk, derived) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, Algorithm::RS256)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, Algorithm::ES256)
                } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                    (k, Algorithm::EdDSA)
                } else {
                    return Err(
                        "PALAVER_JWT_PUBLIC_KEY is not an RSA, EC or Ed25519 PEM key".into(),
                    );
                };
                let alg = match algorithm {
                    Some(a) => parse_alg(a)?,
                    None => derived,
                };
                (dk, None, alg)
            }
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 30;
        Ok(Self {
            decoding,
            encoding,
            validation,
        })
    }

    /// Verifies `token` and returns the profile it asserts.
    pub fn verify(&self, token: &str) -> Result<Profile, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                other => AuthError::Invalid(format!("{other:?}")),
            })?;
        let c = data.claims;
        let id = UserId::parse(&c.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        let clean = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        Ok(Profile {
            id,
            username: clean(c.username),
            name: clean(c.name),
            avatar: clean(c.picture),
            language: None,
        })
    }

    /// Mints an HS256 token (only with a secret).
    pub fn mint(&self, claims: &Claims) -> Result<String, String> {
        let key = self
            .encoding
            .as_ref()
            .ok_or("tokens can only be minted with an HS256 secret, not a public key")?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).map_err(|e| e.to_string())
    }
}

fn hs256(secret: &str) -> (DecodingKey, Option<EncodingKey>, Algorithm) {
    (
        DecodingKey::from_secret(secret.as_bytes()),
        Some(EncodingKey::from_secret(secret.as_bytes())),
        Algorithm::HS256,
    )
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth() -> Auth {
        Auth::new(&JwtKey::Secret(SECRET.into()), Path::new("/nonexistent")).expect("auth")
    }

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            exp,
            iat: None,
            name: Some("Ann".into()),
            username: Some("ann".into()),
            picture: None,
        }
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn round_trip() {
        let a = auth();
        let t = a.mint(&claims("42", now_secs() + 60)).expect("mint");
        let p = a.verify(&t).expect("verify");
        assert_eq!(p.id.as_str(), "42");
        assert_eq!(p.username.as_deref(), Some("ann"));
    }

    #[test]
    fn refusals() {
        let a = auth();
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        let expired = a.mint(&claims("42", now_secs() - 3600)).expect("mint");
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(a.verify("nonsense"), Err(AuthError::Invalid(_))));
        // Signed with another key.
        let other = Auth::new(
            &JwtKey::Secret("another-secret-of-32-bytes-long!".into()),
            Path::new("/x"),
        )
        .expect("auth");
        let t = other.mint(&claims("42", now_secs() + 60)).expect("mint");
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        // alg: none.
        let header = b64(&serde_json::json!({"alg": "none", "typ": "JWT"}));
        let body = b64(&serde_json::json!({"sub": "42", "exp": now_secs() + 60}));
        assert!(matches!(
            a.verify(&format!("{header}.{body}.")),
            Err(AuthError::Invalid(_))
        ));
        // Algorithm switched to HS512 with the same secret.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims("42", now_secs() + 60),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        // No exp.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "42"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        // Empty sub.
        let t = a.mint(&claims("", now_secs() + 60)).expect("mint");
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn secret_file_is_created_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = secret_from_data_dir(dir.path()).expect("create");
        let b = secret_from_data_dir(dir.path()).expect("read");
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
