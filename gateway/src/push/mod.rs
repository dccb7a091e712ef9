//! Push delivery: the worker that turns [`PushJob`]s into notifications on users' devices.
//!
//! Room actors decide who gets a push (a member not viewing the room, not the sender, not
//! muted) and publish one job per member on the bus (`palaver.push` with Kafka). The worker
//! ([`PushWorker`]) consumes them as a member of the group `palaver-push`, in `palaver serve`
//! (in process, when a provider is configured) or in `palaver push-worker` processes.
//!
//! Per job: the member's devices (`Store::devices_of`), the member's preferred language
//! (`Profile::language`) and the sender's display name; then one notification per device, at
//! most one per (device token, message) even when a job is delivered twice, sent through the
//! device's provider: [`fcm`] (FCM HTTP v1) or [`webhook`] (a signed JSON POST). Texts come from
//! [`texts`].
//!
//! Failures: 429, 5xx and network errors are retried with exponential backoff and jitter
//! (`Retry-After` is honoured, capped at the maximum delay) up to the configured number of
//! attempts; a token the provider no longer knows is deleted; anything else, and a push whose
//! attempts ran out, is kept as a [`DeadLetter`]. Nothing is retried forever. Counters are in
//! [`PushMetrics`].

pub mod fcm;
pub mod metrics;
pub mod texts;
pub mod webhook;

pub use metrics::{FailReason, PushMetrics};

use crate::config::{Config, StoreChoice};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use node::bus::Bus;
use node::store::Store;
use schema::{DeadLetter, Device, Platform, PushJob, UserId};
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The consumer group of push workers on the bus.
pub const GROUP: &str = "palaver-push";

/// How many (device, message) pairs the worker remembers to never push a message twice to a
/// device when a job is delivered again.
const RECENT: usize = 65_536;

/// Longest excerpt of a provider's answer kept in a dead letter or a log line, in characters.
const EXCERPT: usize = 300;

/// Largest provider answer read, in bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// The raw push settings, as read from the configuration (see `ConfigBuilder`).
#[derive(Debug, Default)]
pub struct PushSettings {
    /// Path of the FCM service-account JSON.
    pub fcm_credentials: Option<PathBuf>,
    /// FCM API base URL.
    pub fcm_endpoint: Option<String>,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// Webhook HMAC secret.
    pub webhook_secret: Option<String>,
    /// Attempts per push.
    pub max_attempts: Option<u32>,
    /// First retry delay, in milliseconds.
    pub retry_base_ms: Option<u64>,
    /// Longest retry delay, in milliseconds.
    pub retry_max_ms: Option<u64>,
    /// Jobs handled at once.
    pub concurrency: Option<usize>,
    /// Timeout of one provider request, in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// A Google service account, from its JSON key file.
#[derive(Clone)]
pub struct ServiceAccount {
    /// The Firebase project.
    pub project_id: String,
    /// The account's e-mail (the JWT issuer).
    pub client_email: String,
    /// The RSA private key, PEM.
    pub private_key: String,
    /// The key's id (the JWT `kid`), when the file has one.
    pub private_key_id: Option<String>,
    /// Where OAuth2 access tokens are obtained.
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

/// FCM HTTP v1 settings.
#[derive(Clone, Debug)]
pub struct FcmConfig {
    /// The service account.
    pub account: ServiceAccount,
    /// API base URL, without a trailing slash (default `https://fcm.googleapis.com`).
    pub endpoint: String,
}

/// Webhook settings.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Where notifications are POSTed.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Palaver-Signature` (at least 16 bytes).
    pub secret: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The validated push configuration.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// FCM, when `PALAVER_PUSH_FCM_CREDENTIALS` is set.
    pub fcm: Option<FcmConfig>,
    /// The webhook, when `PALAVER_PUSH_WEBHOOK_URL` is set.
    pub webhook: Option<WebhookConfig>,
    /// Attempts per push, the first included (default 5).
    pub max_attempts: u32,
    /// First retry delay (default 500 ms); it doubles, plus jitter, up to `retry_max`.
    pub retry_base: Duration,
    /// Longest retry delay, and the cap of a `Retry-After` (default 60 s).
    pub retry_max: Duration,
    /// Jobs handled at once (default 64).
    pub concurrency: usize,
    /// Timeout of one provider request (default 10 s).
    pub timeout: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            fcm: None,
            webhook: None,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            concurrency: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

fn http_url(key: &'static str, v: &str) -> Result<String, (&'static str, String)> {
    let url = reqwest::Url::parse(v.trim()).map_err(|e| (key, format!("{v:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err((key, format!("{v:?}: expected an http or https URL")));
    }
    Ok(url.as_str().to_owned())
}

impl ServiceAccount {
    /// Reads and checks a service-account JSON key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a service-account JSON key.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let field = |name: &str| -> Result<String, String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(_) => Err(format!("`{name}` must be a non-empty string")),
                None => Err(format!("missing `{name}` (is this a service-account key?)")),
            }
        };
        let account = Self {
            project_id: field("project_id")?,
            client_email: field("client_email")?,
            private_key: field("private_key")?,
            private_key_id: field("private_key_id").ok(),
            token_uri: match v.get("token_uri") {
                None => "https://oauth2.googleapis.com/token".into(),
                Some(_) => http_url("token_uri", &field("token_uri")?).map_err(|(_, e)| e)?,
            },
        };
        if account
            .project_id
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':'))
        {
            return Err(format!(
                "`project_id` {:?} is not a project id",
                account.project_id
            ));
        }
        jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| format!("`private_key` is not an RSA private key in PEM: {e}"))?;
        Ok(account)
    }
}

impl PushConfig {
    /// Validates the raw settings; an error names the setting at fault.
    pub fn from_settings(s: PushSettings) -> Result<Self, (&'static str, String)> {
        let d = Self::default();
        let endpoint = match s.fcm_endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            Some(e) => http_url("PALAVER_PUSH_FCM_ENDPOINT", e)?
                .trim_end_matches('/')
                .to_owned(),
            None => "https://fcm.googleapis.com".into(),
        };
        let fcm = match s.fcm_credentials.filter(|p| !p.as_os_str().is_empty()) {
            None => None,
            Some(path) => Some(FcmConfig {
                account: ServiceAccount::from_file(&path)
                    .map_err(|e| ("PALAVER_PUSH_FCM_CREDENTIALS", e))?,
                endpoint,
            }),
        };
        let secret = s.webhook_secret.filter(|x| !x.is_empty());
        let webhook = match s.webhook_url.filter(|u| !u.trim().is_empty()) {
            None if secret.is_some() => {
                return Err((
                    "PALAVER_PUSH_WEBHOOK_SECRET",
                    "set without PALAVER_PUSH_WEBHOOK_URL".into(),
                ));
            }
            None => None,
            Some(url) => {
                let url = http_url("PALAVER_PUSH_WEBHOOK_URL", &url)?;
                let secret = secret.ok_or((
                    "PALAVER_PUSH_WEBHOOK_SECRET",
                    "required with PALAVER_PUSH_WEBHOOK_URL (the HMAC key of the signature)"
                        .to_owned(),
                ))?;
                if secret.len() < 16 {
                    return Err((
                        "PALAVER_PUSH_WEBHOOK_SECRET",
                        "must be at least 16 bytes".into(),
                    ));
                }
                Some(WebhookConfig { url, secret })
            }
        };
        let max_attempts = match s.max_attempts {
            None => d.max_attempts,
            Some(n @ 1..=100) => n,
            Some(n) => {
                return Err((
                    "PALAVER_PUSH_MAX_ATTEMPTS",
                    format!("{n}: expected 1 to 100"),
                ));
            }
        };
        let ms = |v: Option<u64>, d: Duration, key: &'static str| match v {
            Some(0) => Err((key, "must be greater than 0".to_owned())),
            Some(n) => Ok(Duration::from_millis(n)),
            None => Ok(d),
        };
        let retry_base = ms(s.retry_base_ms, d.retry_base, "PALAVER_PUSH_RETRY_BASE_MS")?;
        let retry_max = ms(s.retry_max_ms, d.retry_max, "PALAVER_PUSH_RETRY_MAX_MS")?;
        if retry_max < retry_base {
            return Err((
                "PALAVER_PUSH_RETRY_MAX_MS",
                "must not be less than PALAVER_PUSH_RETRY_BASE_MS".into(),
            ));
        }
        let concurrency = match s.concurrency {
            None => d.concurrency,
            Some(0) => return Err(("PALAVER_PUSH_CONCURRENCY", "must be greater than 0".into())),
            Some(n) => n,
        };
        let timeout = ms(s.timeout_ms, d.timeout, "PALAVER_PUSH_TIMEOUT_MS")?;
        Ok(Self {
            fcm,
            webhook,
            max_attempts,
            retry_base,
            retry_max,
            concurrency,
            timeout,
        })
    }

    /// True when at least one provider is configured.
    pub fn enabled(&self) -> bool {
        self.fcm.is_some() || self.webhook.is_some()
    }
}

/// Why one send attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Worth another attempt (429, 5xx, network): after `after` when the provider said.
    Retry {
        /// What happened.
        detail: String,
        /// The provider's `Retry-After`.
        after: Option<Duration>,
    },
    /// The provider does not know the device token any more: delete it.
    Gone {
        /// What the provider answered.
        detail: String,
    },
    /// Refused for good.
    Fail {
        /// The metric's reason.
        reason: FailReason,
        /// What the provider answered.
        detail: String,
    },
}

impl SendError {
    fn retryable(&self) -> bool {
        matches!(self, SendError::Retry { .. })
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Retry { after, .. } => *after,
            _ => None,
        }
    }

    /// A network failure (connection refused, timeout, reset): retried.
    pub(crate) fn network(what: &str, e: &reqwest::Error) -> Self {
        SendError::Retry {
            detail: format!("{what}: {}", error_chain(e)),
            after: None,
        }
    }
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// The first [`EXCERPT`] characters of a provider's answer.
pub(crate) fn excerpt(body: &str) -> String {
    let mut s: String = body.chars().take(EXCERPT).collect();
    if body.chars().nth(EXCERPT).is_some() {
        s.push('…');
    }
    s
}

/// Reads at most [`MAX_ANSWER`] bytes of an answer's body (the rest is discarded).
pub(crate) async fn read_answer(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_ANSWER {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    buf.truncate(MAX_ANSWER);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A `Retry-After` header: delay-seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Whether a status is worth retrying (429 and 5xx).
pub(crate) fn transient(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// One notification for one device.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The job.
    pub job: &'a PushJob,
    /// The device.
    pub device: &'a Device,
    /// The title (the sender, and the group).
    pub title: &'a str,
    /// The body (the text, or the fixed text of a media kind).
    pub body: &'a str,
    /// The language of the texts (`en`, `pt`, ...).
    pub language: &'static str,
}

/// (device, message) pairs already pushed, oldest forgotten first.
struct Recent {
    set: HashSet<(u64, u64)>,
    order: VecDeque<(u64, u64)>,
}

impl Recent {
    fn key(token: &str, message: u64) -> (u64, u64) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        token.hash(&mut h);
        (h.finish(), message)
    }

    /// True the first time for this pair.
    fn claim(&mut self, key: (u64, u64)) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// The pushing half of the worker: providers, store and counters.
pub struct Pusher {
    config: PushConfig,
    store: Arc<dyn Store>,
    metrics: Arc<PushMetrics>,
    fcm: Option<fcm::Fcm>,
    webhook: Option<webhook::Webhook>,
    recent: parking_lot::Mutex<Recent>,
}

impl Pusher {
    /// Sets up the configured providers.
    pub fn new(
        config: PushConfig,
        store: Arc<dyn Store>,
        metrics: Arc<PushMetrics>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("palaver/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let fcm = match &config.fcm {
            Some(c) => Some(fcm::Fcm::new(c, http.clone()).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let webhook = config
            .webhook
            .as_ref()
            .map(|c| webhook::Webhook::new(c, http.clone()));
        Ok(Self {
            config,
            store,
            metrics,
            fcm,
            webhook,
            recent: parking_lot::Mutex::new(Recent {
                set: HashSet::new(),
                order: VecDeque::new(),
            }),
        })
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_factor(2.0)
            .with_min_delay(self.config.retry_base)
            .with_max_delay(self.config.retry_max)
            .with_max_times(self.config.max_attempts.saturating_sub(1) as usize)
    }

    /// Sends one job to every device of its user.
    pub async fn handle(&self, job: PushJob) {
        // Joins the trace of the message that made the job (when tracing is on).
        let span = node::span!("push.job", user = %job.user, message_id = %job.message);
        node::trace::set_parent(&span, job.traceparent.as_deref());
        self.handle_inner(&job).instrument(span).await;
        self.metrics.job_done();
    }

    async fn handle_inner(&self, job: &PushJob) {
        let attempts = AtomicU32::new(0);
        let devices = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.store.devices_of(&job.user)
        })
        .retry(self.backoff())
        .sleep(tokio::time::sleep)
        .await;
        let devices = match devices {
            Ok(d) => d,
            Err(e) => {
                self.metrics.failed("none", FailReason::Store);
                self.dead_letter(
                    job,
                    None,
                    "none",
                    format!("devices of {} could not be read: {e}", job.user),
                    attempts.load(Ordering::Relaxed),
                )
                .await;
                return;
            }
        };
        let mut seen = HashSet::new();
        let devices: Vec<Device> = devices
            .into_iter()
            .filter(|d| seen.insert(d.token.clone()))
            .filter(|d| {
                self.recent
                    .lock()
                    .claim(Recent::key(&d.token, job.message.0))
            })
            .collect();
        if devices.is_empty() {
            return;
        }
        let language = match self.store.user(&job.user).await {
            Ok(u) => u.and_then(|u| u.profile.language),
            Err(e) => {
                tracing::warn!(user = %job.user, error = %e, "recipient not read; texts in English");
                None
            }
        };
        let texts = texts::for_language(language.as_deref());
        let sender = self.display_name(&job.sender).await;
        let title = texts.title(&sender, job.room_name.as_deref());
        let body = texts.body(&job.kind, &job.preview);
        let sends = devices.iter().map(|device| {
            self.deliver(Outgoing {
                job,
                device,
                title: &title,
                body: &body,
                language: texts.code,
            })
        });
        futures::future::join_all(sends).await;
    }

    /// The sender's name, else username, else id.
    async fn display_name(&self, user: &UserId) -> String {
        match self.store.user(user).await {
            Ok(Some(u)) => u
                .profile
                .name
                .filter(|n| !n.trim().is_empty())
                .or(u.profile.username.filter(|n| !n.trim().is_empty()))
                .unwrap_or_else(|| user.as_str().to_owned()),
            Ok(None) => user.as_str().to_owned(),
            Err(e) => {
                tracing::warn!(%user, error = %e, "sender not read; showing the id");
                user.as_str().to_owned()
            }
        }
    }

    async fn deliver(&self, out: Outgoing<'_>) {
        let platform = out.device.platform;
        let provider = platform.as_str();
        let configured = match platform {
            Platform::Fcm => self.fcm.is_some(),
            Platform::Webhook => self.webhook.is_some(),
        };
        if !configured {
            tracing::debug!(user = %out.job.user, provider, "no such provider configured: push not sent");
            self.metrics.failed(provider, FailReason::NotConfigured);
            return;
        }
        let attempts = AtomicU32::new(0);
        let send = || {
            let (out, attempts) = (&out, &attempts);
            async move {
                let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
                let span = node::span!("push.send", provider, attempt);
                match (platform, &self.fcm, &self.webhook) {
                    (Platform::Fcm, Some(f), _) => f.send(out).instrument(span).await,
                    (Platform::Webhook, _, Some(w)) => w.send(out).instrument(span).await,
                    _ => Err(SendError::Fail {
                        reason: FailReason::NotConfigured,
                        detail: "provider not configured".into(),
                    }),
                }
            }
        };
        let cap = self.config.retry_max;
        let result = send
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(SendError::retryable)
            .adjust(|e, next| next.map(|d| e.retry_after().map_or(d, |r| r.min(cap))))
            .notify(|e, d| {
                self.metrics.retried(platform);
                tracing::info!(user = %out.job.user, provider, error = ?e, delay_ms = d.as_millis() as u64, "push retried");
            })
            .await;
        let attempts = attempts.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.metrics.sent(platform);
                tracing::debug!(user = %out.job.user, message = %out.job.message, provider, "push sent");
            }
            Err(SendError::Gone { detail }) => {
                self.metrics.failed(provider, FailReason::Unregistered);
                tracing::info!(user = %out.job.user, provider, %detail, "device token refused: deleted");
                let token = out.device.token.clone();
                let removed = (|| self.store.remove_device_token(&token))
                    .retry(self.backoff())
                    .sleep(tokio::time::sleep)
                    .await;
                match removed {
                    Ok(()) => self.metrics.dropped_token(),
                    Err(e) => {
                        tracing::warn!(user = %out.job.user, error = %e, "refused token not deleted")
                    }
                }
            }
            Err(SendError::Fail { reason, detail }) => {
                self.metrics.failed(provider, reason);
                self.dead_letter(out.job, Some(&out.device.token), provider, detail, attempts)
                    .await;
            }
            Err(SendError::Retry { detail, .. }) => {
                self.metrics.failed(provider, FailReason::RetriesExhausted);
                self.dead_letter(
                    out.job,
                    Some(&out.device.token),
                    provider,
                    format!("gave up after {attempts} attempts: {detail}"),
                    attempts,
                )
                .await;
            }
        }
    }

    async fn dead_letter(
        &self,
        job: &PushJob,
        token: Option<&str>,
        provider: &str,
        reason: String,
        attempts: u32,
    ) {
        tracing::warn!(user = %job.user, message = %job.message, provider, %reason, attempts, "push given up: dead letter");
        let letter = DeadLetter {
            job: job.clone(),
            device_token: token.map(str::to_owned),
            provider: provider.to_owned(),
            reason,
            attempts,
            at: node::ids::unix_ms(),
        };
        let stored = (|| self.store.add_dead_letter(&letter))
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .await;
        match stored {
            Ok(()) => self.metrics.dead_letter(),
            Err(e) => {
                tracing::error!(user = %job.user, message = %job.message, error = %e, letter = ?letter, "dead letter not stored")
            }
        }
    }
}

/// A running push worker: reads jobs from the bus and sends them, a bounded number at once.
pub struct PushWorker {
    stop: CancellationToken,
    abort: CancellationToken,
    tasks: TaskTracker,
    reader: JoinHandle<()>,
}

impl PushWorker {
    /// Starts the worker when a provider is configured; `None` (logged once) otherwise, and
    /// then nothing subscribes to push jobs.
    pub async fn start(
        config: &PushConfig,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        metrics: Arc<PushMetrics>,
    ) -> anyhow::Result<Option<Self>> {
        if !config.enabled() {
            tracing::info!(
                "push notifications are not sent: set PALAVER_PUSH_FCM_CREDENTIALS or PALAVER_PUSH_WEBHOOK_URL"
            );
            return Ok(None);
        }
        let pusher = Arc::new(Pusher::new(config.clone(), store, metrics)?);
        let jobs = bus.subscribe_push(GROUP).await?;
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tasks = TaskTracker::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(config.concurrency));
        tracing::info!(
            fcm = config.fcm.is_some(),
            webhook = config.webhook.is_some(),
            concurrency = config.concurrency,
            "push worker started"
        );
        let reader = tokio::spawn(read_jobs(
            jobs,
            pusher,
            limit,
            tasks.clone(),
            stop.clone(),
            abort.clone(),
        ));
        Ok(Some(Self {
            stop,
            abort,
            tasks,
            reader,
        }))
    }

    /// Stops reading jobs, lets the jobs in hand finish until `deadline`, then abandons the
    /// rest (logged).
    pub async fn shutdown(self, deadline: tokio::time::Instant) {
        self.stop.cancel();
        if let Err(e) = self.reader.await {
            tracing::warn!(error = %e, "push reader failed");
        }
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "push jobs still running after the grace period: abandoned"
            );
            self.abort.cancel();
            self.tasks.wait().await;
        }
    }
}

async fn read_jobs(
    mut jobs: node::bus::PushStream,
    pusher: Arc<Pusher>,
    limit: Arc<tokio::sync::Semaphore>,
    tasks: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    loop {
        // Wait for room first, so that a job taken from the stream is always handled.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let job = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            j = jobs.next() => match j {
                Some(j) => j,
                None => {
                    tracing::info!("push job stream ended");
                    return;
                }
            },
        };
        let pusher = pusher.clone();
        let abort = abort.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = abort.cancelled() => {
                    tracing::warn!(user = %job.user, message = %job.message, "push abandoned at shutdown");
                }
                () = pusher.handle(job.clone()) => {}
            }
        });
    }
}

/// `palaver push-worker`: the worker alone, on the shared store and the Kafka bus, with
/// `/healthz`, `/readyz` and `/metrics` on `PALAVER_HTTP_ADDR`.
pub struct PushWorkerProcess {
    http_addr: SocketAddr,
    worker: PushWorker,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    stop: CancellationToken,
    draining: Arc<AtomicBool>,
    http: JoinHandle<std::io::Result<()>>,
    grace: Duration,
}

impl PushWorkerProcess {
    /// Opens the store and the bus and starts the worker.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let kafka = config.kafka.clone().ok_or_else(|| {
            anyhow::anyhow!("PALAVER_KAFKA_BROKERS is required for `palaver push-worker`")
        })?;
        if config.store == StoreChoice::Embedded {
            anyhow::bail!(
                "`palaver push-worker` reads the cluster's shared store: set PALAVER_POSTGRES_URL or PALAVER_SCYLLA_NODES"
            );
        }
        if !config.push.enabled() {
            anyhow::bail!(
                "no push provider configured: set PALAVER_PUSH_FCM_CREDENTIALS or PALAVER_PUSH_WEBHOOK_URL"
            );
        }
        crate::telemetry::metrics::install();
        let store = crate::server::open_store(&config).await?;
        let bus = crate::server::metered_bus(node::bus::kafka::KafkaBus::connect(kafka).await?);
        let metrics = Arc::new(PushMetrics::default());
        let worker = PushWorker::start(&config.push, store.clone(), bus.clone(), metrics.clone())
            .await?
            .ok_or_else(|| anyhow::anyhow!("no push provider configured"))?;
        let draining = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let ready = crate::ready::Readiness::start(
            vec![
                crate::ready::store_check(store.clone()),
                crate::ready::bus_check(bus.clone()),
            ],
            stop.clone(),
        )
        .await;
        let router = status_router(metrics, draining.clone(), ready);
        let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
        let http_addr = listener.local_addr()?;
        let http_stop = stop.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        });
        Ok(Self {
            http_addr,
            worker,
            store,
            bus,
            stop,
            draining,
            http,
            grace: config.shutdown_grace,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops reading jobs, finishes those in hand (up to the grace period), closes the bus and
    /// the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.grace;
        self.worker.shutdown(deadline).await;
        self.stop.cancel();
        if let Err(e) = self.http.await {
            tracing::warn!(error = %e, "status endpoint task failed");
        }
        self.bus.close().await;
        self.store.close().await?;
        Ok(())
    }
}

/// `/healthz`, `/readyz` and `/metrics` of a push-worker process.
fn status_router(
    metrics: Arc<PushMetrics>,
    draining: Arc<AtomicBool>,
    ready: Arc<crate::ready::Readiness>,
) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let answer = ready.response(draining.load(Ordering::SeqCst));
                async move { answer }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { crate::telemetry::metrics::response(&text) }
            }),
        )
}

/// A Prometheus text answer.
pub fn metrics_response(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_claims_once_and_forgets_the_oldest() {
        let mut r = Recent {
            set: HashSet::new(),
            order: VecDeque::new(),
        };
        assert!(r.claim(Recent::key("t", 1)));
        assert!(!r.claim(Recent::key("t", 1)));
        assert!(r.claim(Recent::key("t", 2)));
        assert!(r.claim(Recent::key("u", 1)));
        for m in 10..(10 + RECENT as u64) {
            r.claim(Recent::key("x", m));
        }
        assert_eq!(r.set.len(), RECENT);
        assert!(
            r.claim(Recent::key("t", 1)),
            "the oldest pair was forgotten"
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(
            reqwest::header::RETRY_AFTER,
            "7".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        h.insert(
            reqwest::header::RETRY_AFTER,
            date.parse().unwrap_or_else(|_| unreachable!()),
        );
        let d = retry_after(&h).unwrap_or_default();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "soon".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn settings_are_checked() {
        let ok = PushConfig::from_settings(PushSettings::default()).unwrap_or_default();
        assert!(!ok.enabled());
        assert_eq!(ok.max_attempts, 5);
        let err = |s: PushSettings| PushConfig::from_settings(s).err().map(|(k, _)| k);
        assert_eq!(
            err(PushSettings {
                webhook_url: Some("http://h/x".into()),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_WEBHOOK_SECRET")
        );
        assert_eq!(
            err(PushSettings {
                webhook_url: Some("http://h/x".into()),
                webhook_secret: Some("short".into()),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_WEBHOOK_SECRET")
        );
        assert_eq!(
            err(PushSettings {
                webhook_url: Some("ftp://h/x".into()),
                webhook_secret: Some("0123456789abcdef".into()),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_WEBHOOK_URL")
        );
        assert_eq!(
            err(PushSettings {
                max_attempts: Some(0),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_MAX_ATTEMPTS")
        );
        assert_eq!(
            err(PushSettings {
                retry_base_ms: Some(1000),
                retry_max_ms: Some(10),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_RETRY_MAX_MS")
        );
        assert_eq!(
            err(PushSettings {
                fcm_credentials: Some("/nonexistent/sa.json".into()),
                ..Default::default()
            }),
            Some("PALAVER_PUSH_FCM_CREDENTIALS")
        );
        let w = PushConfig::from_settings(PushSettings {
            webhook_url: Some("https://hooks.example/push/".into()),
            webhook_secret: Some("0123456789abcdef".into()),
            ..Default::default()
        })
        .unwrap_or_default();
        assert!(w.enabled());
        assert_eq!(
            w.webhook.map(|w| w.url),
            Some("https://hooks.example/push/".into())
        );
    }

    #[test]
    fn settings_come_from_the_environment() {
        let env: std::collections::HashMap<String, String> = [
            ("PALAVER_PUSH_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
            ("PALAVER_PUSH_WEBHOOK_SECRET", "0123456789abcdef"),
            ("PALAVER_PUSH_MAX_ATTEMPTS", "7"),
            ("PALAVER_PUSH_RETRY_BASE_MS", "15"),
            ("PALAVER_PUSH_RETRY_MAX_MS", "900"),
            ("PALAVER_PUSH_CONCURRENCY", "3"),
            ("PALAVER_PUSH_TIMEOUT_MS", "2500"),
            ("PALAVER_PUSH_ROOM_MAX", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = Config::load(None, &env).map_err(|e| e.to_string());
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let p = &c.push;
        assert!(p.fcm.is_none() && p.enabled());
        assert_eq!(
            p.webhook.as_ref().map(|w| w.url.as_str()),
            Some("http://127.0.0.1:9/hook")
        );
        assert_eq!(p.max_attempts, 7);
        assert_eq!(p.retry_base, Duration::from_millis(15));
        assert_eq!(p.retry_max, Duration::from_millis(900));
        assert_eq!(p.concurrency, 3);
        assert_eq!(p.timeout, Duration::from_millis(2500));
        assert_eq!(c.node.push_room_max, 0);
        let mut bad = env.clone();
        bad.insert("PALAVER_PUSH_MAX_ATTEMPTS".into(), "many".into());
        let e = Config::load(None, &bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("PALAVER_PUSH_MAX_ATTEMPTS"), "{e}");
        bad.remove("PALAVER_PUSH_MAX_ATTEMPTS");
        bad.insert("PALAVER_PUSH_WEBHOOK_SECRET".into(), "short".into());
        let e = Config::load(None, &bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("PALAVER_PUSH_WEBHOOK_SECRET") && e.contains("16"),
            "{e}"
        );
    }

    #[test]
    fn service_account_is_checked() {
        let e = ServiceAccount::from_json("{}").err().unwrap_or_default();
        assert!(e.contains("project_id"), "{e}");
        let e = ServiceAccount::from_json(
            r#"{"project_id":"p","client_email":"a@b","private_key":"nope","token_uri":"https://t/token"}"#,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("private_key"), "{e}");
        let e = ServiceAccount::from_json(
            r#"{"project_id":"p/../x","client_email":"a@b","private_key":"k"}"#,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("project_id"), "{e}");
    }
}
