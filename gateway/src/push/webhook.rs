//! The generic webhook provider: each notification is POSTed as JSON to the configured URL,
//! signed with HMAC-SHA256.
//!
//! Body: `{"user", "device": {"token", "device_id"}, "room", "message", "sender", "title",
//! "body", "kind", "collapse_key", "language", "created_at"}`. Headers:
//! `X-Palaver-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes, keyed with the
//! secret>` and `X-Palaver-Timestamp: <Unix seconds of the attempt>`. A 2xx is a delivery; 404
//! and 410 say the device is gone (its token is deleted); 429 and 5xx are retried; anything
//! else is refused for good. Redirects are not followed.

use super::{FailReason, Outgoing, SendError, WebhookConfig, read_answer, transient};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use std::fmt::Write as _;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-palaver-signature";

/// The timestamp header.
pub const TIMESTAMP_HEADER: &str = "x-palaver-timestamp";

/// A webhook client.
pub struct Webhook {
    http: reqwest::Client,
    url: String,
    secret: Vec<u8>,
}

/// `sha256=<hex>` of `body` keyed with `secret` (`None` only if the HMAC implementation
/// refused the key, which it does for no length).
pub fn signature(secret: &[u8], body: &[u8]) -> Option<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(body);
    let mut out = String::from("sha256=");
    for b in mac.finalize().into_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    Some(out)
}

impl Webhook {
    /// A client for the configured URL.
    pub fn new(config: &WebhookConfig, http: reqwest::Client) -> Self {
        Self {
            http,
            url: config.url.clone(),
            secret: config.secret.as_bytes().to_vec(),
        }
    }

    /// The JSON body of one notification.
    pub fn payload(out: &Outgoing<'_>) -> Value {
        let job = out.job;
        json!({
            "user": job.user,
            "device": { "token": out.device.token, "device_id": out.device.device_id },
            "room": job.room,
            "message": job.message,
            "sender": job.sender,
            "title": out.title,
            "body": out.body,
            "kind": job.kind,
            "collapse_key": job.collapse_key,
            "language": out.language,
            "created_at": job.created_at,
        })
    }

    /// One attempt.
    pub async fn send(&self, out: &Outgoing<'_>) -> Result<(), SendError> {
        let body = Self::payload(out).to_string().into_bytes();
        let Some(sig) = signature(&self.secret, &body) else {
            return Err(SendError::Fail {
                reason: FailReason::Rejected,
                detail: "the webhook secret is not a usable HMAC key".into(),
            });
        };
        let resp = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sig)
            .header(TIMESTAMP_HEADER, crate::auth::now_secs().to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::network("webhook", &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let after = super::retry_after(resp.headers());
        let text = read_answer(resp).await;
        let detail = format!("webhook answered {status}: {}", super::excerpt(&text));
        Err(
            if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
                SendError::Gone { detail }
            } else if transient(status) {
                SendError::Retry { detail, after }
            } else {
                SendError::Fail {
                    reason: FailReason::Rejected,
                    detail,
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?").as_deref(),
            Some("sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }
}
