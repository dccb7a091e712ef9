//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Authentication is OAuth2 with the service account: an RS256 JWT
//! `{iss: client_email, scope: firebase.messaging, aud: token_uri, iat, exp: iat + 3600}` is
//! POSTed form-encoded (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=...`)
//! to the account's `token_uri`; the `access_token` answered is cached until a minute before it
//! expires, and one refresh runs at a time. A send is
//! `POST {endpoint}/v1/projects/{project_id}/messages:send` with `Authorization: Bearer` and
//! `{"message": {"token", "notification": {"title", "body"}, "data": {...}, "android":
//! {"collapse_key", "priority": "high", "notification": {"tag"}}, "apns": {"headers":
//! {"apns-collapse-id"}}}}`. A 401 refreshes the access token once; 404 or `UNREGISTERED`
//! (and a 400 `INVALID_ARGUMENT` about the token) mean the device token is gone.

use super::{FailReason, FcmConfig, Outgoing, SendError, ServiceAccount, read_answer, transient};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The OAuth2 scope of FCM.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The OAuth2 grant type of a JWT assertion.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Lifetime asked for in the assertion, in seconds.
const ASSERTION_TTL: u64 = 3600;

/// An access token is refreshed this long before it expires.
const MARGIN: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AccessToken {
    value: String,
    refresh_at: Instant,
}

/// An FCM HTTP v1 client.
pub struct Fcm {
    http: reqwest::Client,
    account: ServiceAccount,
    key: EncodingKey,
    send_url: String,
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

impl Fcm {
    /// A client for the configured project.
    pub fn new(config: &FcmConfig, http: reqwest::Client) -> Result<Self, String> {
        let key = EncodingKey::from_rsa_pem(config.account.private_key.as_bytes())
            .map_err(|e| format!("FCM private key: {e}"))?;
        Ok(Self {
            http,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                config.endpoint, config.account.project_id
            ),
            account: config.account.clone(),
            key,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid access token: the cached one, unless it is `stale` (refused with a 401) or
    /// about to expire. Refreshes run one at a time (the lock is held while fetching).
    async fn access_token(&self, stale: Option<&str>) -> Result<String, SendError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && Instant::now() < t.refresh_at
            && stale != Some(t.value.as_str())
        {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<AccessToken, SendError> {
        let now = crate::auth::now_secs();
        let claims = json!({
            "iss": self.account.client_email,
            "scope": SCOPE,
            "aud": self.account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_TTL,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.account.private_key_id.clone();
        let assertion =
            jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| SendError::Fail {
                reason: FailReason::Auth,
                detail: format!("cannot sign the OAuth2 assertion: {e}"),
            })?;
        let resp = self
            .http
            .post(&self.account.token_uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| SendError::network("OAuth2 token request", &e))?;
        let status = resp.status();
        let after = super::retry_after(resp.headers());
        let text = read_answer(resp).await;
        if transient(status) {
            return Err(SendError::Retry {
                detail: format!(
                    "OAuth2 token endpoint answered {status}: {}",
                    super::excerpt(&text)
                ),
                after,
            });
        }
        if !status.is_success() {
            return Err(SendError::Fail {
                reason: FailReason::Auth,
                detail: format!(
                    "OAuth2 token endpoint answered {status}: {}",
                    super::excerpt(&text)
                ),
            });
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let Some(value) = v["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(SendError::Fail {
                reason: FailReason::Auth,
                detail: format!(
                    "OAuth2 token endpoint answered no access_token: {}",
                    super::excerpt(&text)
                ),
            });
        };
        let ttl = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(ASSERTION_TTL));
        let early = if ttl > MARGIN * 2 { MARGIN } else { ttl / 2 };
        Ok(AccessToken {
            value: value.to_owned(),
            refresh_at: Instant::now() + ttl - early,
        })
    }

    /// The request body of one notification.
    pub fn message(out: &Outgoing<'_>) -> Value {
        let job = out.job;
        json!({
            "message": {
                "token": out.device.token,
                "notification": { "title": out.title, "body": out.body },
                "data": {
                    "room_id": job.room.to_string(),
                    "message_id": job.message.to_string(),
                    "sender_id": job.sender.as_str(),
                    "kind": job.kind,
                },
                "android": {
                    "collapse_key": job.collapse_key,
                    "priority": "high",
                    "notification": { "tag": job.collapse_key },
                },
                "apns": { "headers": { "apns-collapse-id": job.collapse_key } },
            }
        })
    }

    /// One attempt (a 401 refreshes the access token and tries once more).
    pub async fn send(&self, out: &Outgoing<'_>) -> Result<(), SendError> {
        let body = Self::message(out);
        let mut stale: Option<String> = None;
        loop {
            let token = self.access_token(stale.as_deref()).await?;
            let resp = self
                .http
                .post(&self.send_url)
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .map_err(|e| SendError::network("FCM send", &e))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let after = super::retry_after(resp.headers());
            let text = read_answer(resp).await;
            if status == StatusCode::UNAUTHORIZED && stale.is_none() {
                stale = Some(token);
                continue;
            }
            return Err(classify(status, &text, after));
        }
    }
}

/// What an FCM error answer means for the device and the job.
pub fn classify(status: StatusCode, text: &str, after: Option<Duration>) -> SendError {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let error = &v["error"];
    let details = error["details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let has_code = |c: &str| details.iter().any(|d| d["errorCode"] == c);
    let detail = format!("FCM answered {status}: {}", super::excerpt(text));
    if status == StatusCode::NOT_FOUND || has_code("UNREGISTERED") {
        return SendError::Gone { detail };
    }
    if status == StatusCode::BAD_REQUEST
        && (has_code("INVALID_ARGUMENT") || error["status"] == "INVALID_ARGUMENT")
        && about_the_token(error)
    {
        return SendError::Gone { detail };
    }
    if transient(status) {
        return SendError::Retry { detail, after };
    }
    let reason = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        FailReason::Auth
    } else {
        FailReason::Rejected
    };
    SendError::Fail { reason, detail }
}

/// An `INVALID_ARGUMENT` about the registration token (not about the rest of the message).
fn about_the_token(error: &Value) -> bool {
    let field_is_token = error["details"].as_array().is_some_and(|ds| {
        ds.iter().any(|d| {
            d["fieldViolations"].as_array().is_some_and(|fs| {
                fs.iter()
                    .any(|f| f["field"].as_str().is_some_and(|x| x.ends_with("token")))
            })
        })
    });
    field_is_token
        || error["message"]
            .as_str()
            .is_some_and(|m| m.to_ascii_lowercase().contains("registration token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        let unregistered = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, unregistered, None),
            SendError::Gone { .. }
        ));
        let bad_token = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, bad_token, None),
            SendError::Gone { .. }
        ));
        let bad_payload = r#"{"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \"x\"","status":"INVALID_ARGUMENT"}}"#;
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, bad_payload, None),
            SendError::Fail {
                reason: FailReason::Rejected,
                ..
            }
        ));
        let after = Some(Duration::from_secs(3));
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, "down", after),
            SendError::Retry {
                detail: "FCM answered 503 Service Unavailable: down".into(),
                after
            }
        );
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, "{}", None),
            SendError::Retry { .. }
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "{}", None),
            SendError::Fail {
                reason: FailReason::Auth,
                ..
            }
        ));
    }
}
