//! Per-user rate limits: token buckets (`governor`, GCRA) for messages and typing events.
//!
//! A bucket lives on the node that executes the command; in `palaver serve` that is the one
//! node, so the limit is exact. In a cluster a user's sends to rooms owned by different nodes
//! are counted per node, so a user spreading messages over many rooms may reach the rate once
//! per node; the limit still bounds every room and every node.

use crate::NodeConfig;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use schema::{Error, ErrorCode, UserId};
use std::num::NonZeroU32;

/// Above this many tracked users, buckets that are full again are forgotten.
const RETAIN_ABOVE: usize = 100_000;

/// The node's per-user buckets.
pub struct Limits {
    messages: DefaultKeyedRateLimiter<UserId>,
    typing: DefaultKeyedRateLimiter<UserId>,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    /// Buckets sized by the configuration.
    pub fn new(cfg: &NodeConfig) -> Self {
        Self {
            messages: RateLimiter::keyed(quota(cfg.messages_per_second, cfg.message_burst)),
            typing: RateLimiter::keyed(quota(cfg.typing_per_second, cfg.typing_burst)),
        }
    }

    /// Takes a token for a message (send, edit, delete, react), or says `rate_limited`.
    pub fn message(&self, user: &UserId) -> Result<(), Error> {
        Self::take(&self.messages, user).map_err(|_| {
            Error::new(
                ErrorCode::RateLimited,
                "you are sending messages too fast; slow down",
            )
        })
    }

    /// Takes a token for a typing event, or says `typing_rate_limited`.
    pub fn typing(&self, user: &UserId) -> Result<(), Error> {
        Self::take(&self.typing, user).map_err(|_| {
            Error::new(
                ErrorCode::TypingRateLimited,
                "you are sending typing events too fast",
            )
        })
    }

    fn take(l: &DefaultKeyedRateLimiter<UserId>, user: &UserId) -> Result<(), ()> {
        if l.len() > RETAIN_ABOVE {
            l.retain_recent();
        }
        l.check_key(user).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_per_user() {
        let cfg = NodeConfig {
            messages_per_second: 1,
            message_burst: 3,
            ..NodeConfig::default()
        };
        let l = Limits::new(&cfg);
        let a = UserId::parse("a").expect("id");
        let b = UserId::parse("b").expect("id");
        for _ in 0..3 {
            assert!(l.message(&a).is_ok());
        }
        let e = l.message(&a).expect_err("over the burst");
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(l.message(&b).is_ok(), "buckets are per user");
        assert_eq!(
            (0..10)
                .filter_map(|_| l.typing(&a).err())
                .next()
                .map(|e| e.code),
            Some(ErrorCode::TypingRateLimited)
        );
    }
}
