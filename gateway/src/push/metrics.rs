//! Push counters, shown by `GET /metrics` in the Prometheus text format (version 0.0.4).

use schema::Platform;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a push failed, as the `reason` label of `palaver_push_failed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailReason {
    /// The provider said the token is no longer valid (it was deleted).
    Unregistered,
    /// The provider refused the request (a 4xx other than the token's).
    Rejected,
    /// The provider refused our credentials (OAuth2 token refused, 401 after a refresh).
    Auth,
    /// Every attempt was answered 429 or 5xx, or failed on the network.
    RetriesExhausted,
    /// The device's provider is not configured in this process.
    NotConfigured,
    /// The store did not answer (devices could not be read).
    Store,
}

impl FailReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Unregistered => "unregistered",
            FailReason::Rejected => "rejected",
            FailReason::Auth => "auth",
            FailReason::RetriesExhausted => "retries_exhausted",
            FailReason::NotConfigured => "not_configured",
            FailReason::Store => "store",
        }
    }
}

const PROVIDERS: [Platform; 2] = [Platform::Fcm, Platform::Webhook];

fn slot(p: Platform) -> usize {
    match p {
        Platform::Fcm => 0,
        Platform::Webhook => 1,
    }
}

/// The push worker's counters (all monotonic).
#[derive(Debug, Default)]
pub struct PushMetrics {
    jobs: AtomicU64,
    sent: [AtomicU64; 2],
    retried: [AtomicU64; 2],
    dropped_tokens: AtomicU64,
    dead_letters: AtomicU64,
    failed: parking_lot::Mutex<BTreeMap<(&'static str, FailReason), u64>>,
}

impl PushMetrics {
    /// A job was handled (whatever became of its pushes).
    pub fn job_done(&self) {
        self.jobs.fetch_add(1, Ordering::Relaxed);
    }

    /// A push was accepted by `provider`.
    pub fn sent(&self, provider: Platform) {
        self.sent[slot(provider)].fetch_add(1, Ordering::Relaxed);
    }

    /// A push to `provider` is retried after a 429, 5xx or network error.
    pub fn retried(&self, provider: Platform) {
        self.retried[slot(provider)].fetch_add(1, Ordering::Relaxed);
    }

    /// A push to `provider` failed for good.
    pub fn failed(&self, provider: &'static str, reason: FailReason) {
        *self.failed.lock().entry((provider, reason)).or_default() += 1;
    }

    /// A device token was deleted because its provider refused it.
    pub fn dropped_token(&self) {
        self.dropped_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// A dead letter was recorded.
    pub fn dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs handled so far.
    pub fn jobs_total(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Pushes accepted by `provider` so far.
    pub fn sent_total(&self, provider: Platform) -> u64 {
        self.sent[slot(provider)].load(Ordering::Relaxed)
    }

    /// Retries to `provider` so far.
    pub fn retried_total(&self, provider: Platform) -> u64 {
        self.retried[slot(provider)].load(Ordering::Relaxed)
    }

    /// Failures of `provider` for `reason` so far.
    pub fn failed_total(&self, provider: &str, reason: FailReason) -> u64 {
        self.failed
            .lock()
            .iter()
            .filter(|((p, r), _)| *p == provider && *r == reason)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Tokens deleted so far.
    pub fn dropped_tokens_total(&self) -> u64 {
        self.dropped_tokens.load(Ordering::Relaxed)
    }

    /// Dead letters recorded so far.
    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    /// The counters in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per_provider = |c: &[AtomicU64; 2]| -> Vec<(String, u64)> {
            PROVIDERS
                .iter()
                .map(|p| {
                    (
                        format!("{{provider=\"{}\"}}", p.as_str()),
                        c[slot(*p)].load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        family(
            "palaver_push_jobs_total",
            "Push jobs handled by this worker.",
            &[(String::new(), self.jobs_total())],
        );
        family(
            "palaver_push_sent_total",
            "Push notifications accepted by the provider.",
            &per_provider(&self.sent),
        );
        let failed: Vec<(String, u64)> = self
            .failed
            .lock()
            .iter()
            .map(|((p, r), n)| {
                (
                    format!("{{provider=\"{p}\",reason=\"{}\"}}", r.as_str()),
                    *n,
                )
            })
            .collect();
        family(
            "palaver_push_failed_total",
            "Push notifications that failed for good, by provider and reason.",
            &failed,
        );
        family(
            "palaver_push_retried_total",
            "Push attempts retried after a 429, a 5xx or a network error.",
            &per_provider(&self.retried),
        );
        family(
            "palaver_push_dropped_tokens_total",
            "Device tokens deleted because the provider refused them.",
            &[(String::new(), self.dropped_tokens_total())],
        );
        family(
            "palaver_push_dead_letters_total",
            "Push notifications recorded as dead letters.",
            &[(String::new(), self.dead_letters_total())],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = PushMetrics::default();
        m.sent(Platform::Fcm);
        m.sent(Platform::Fcm);
        m.retried(Platform::Webhook);
        m.failed("fcm", FailReason::Unregistered);
        m.dropped_token();
        let text = m.render();
        assert!(
            text.contains("# TYPE palaver_push_sent_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("palaver_push_sent_total{provider=\"fcm\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("palaver_push_sent_total{provider=\"webhook\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("palaver_push_retried_total{provider=\"webhook\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "palaver_push_failed_total{provider=\"fcm\",reason=\"unregistered\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("palaver_push_dropped_tokens_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("palaver_push_dead_letters_total 0\n"),
            "{text}"
        );
        assert_eq!(m.failed_total("fcm", FailReason::Unregistered), 1);
    }
}
