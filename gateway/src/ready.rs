//! Readiness: `GET /readyz` answers 200 only while this process can do its job. It is 503 while
//! draining, and while a dependency does not answer: the store (in `serve` and on a node), the
//! bus (Kafka wherever it is configured), and for a gateway in a cluster at least one live node.
//!
//! The dependencies are checked in the background every [`CHECK_EVERY`] (each check bounded by
//! [`CHECK_TIMEOUT`]), so a probe never waits on a hung backend and a burst of probes costs
//! nothing. The 503 body names what failed, e.g. `store unreachable: ...`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use parking_lot::RwLock;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the dependencies are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long one check may take before it counts as a failure.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One dependency check: `Err` carries the reason.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The latest verdict on this process's dependencies.
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
    failure: RwLock<Option<String>>,
}

impl Readiness {
    /// Runs every check once (so the first probe already has an answer), then keeps checking
    /// in the background until `stop`.
    pub async fn start(checks: Vec<(&'static str, Check)>, stop: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            checks,
            failure: RwLock::new(None),
        });
        me.check_now().await;
        let bg = me.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => bg.check_now().await,
                }
            }
        });
        me
    }

    /// Runs every check now and records the first failure (or none).
    pub async fn check_now(&self) {
        let mut failure = None;
        for (what, check) in &self.checks {
            let verdict = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(v) => v,
                Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
            };
            if let Err(why) = verdict {
                failure = Some(format!("{what} unreachable: {why}"));
                break;
            }
        }
        let mut slot = self.failure.write();
        match (&*slot, &failure) {
            (None, Some(f)) => tracing::warn!(reason = %f, "not ready"),
            (Some(_), None) => tracing::info!("ready again"),
            _ => {}
        }
        *slot = failure;
    }

    /// The failure that makes this process unready, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.read().clone()
    }

    /// The `/readyz` answer, given whether the process is draining.
    pub fn response(&self, draining: bool) -> Response {
        if draining {
            return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
        }
        match self.failure() {
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
            None => (StatusCode::OK, "ready").into_response(),
        }
    }
}

/// A check of the store (`SELECT 1` or its equivalent).
pub fn store_check(store: Arc<dyn node::store::Store>) -> (&'static str, Check) {
    let check: Check = Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
    });
    ("store", check)
}

/// A check of the bus (a metadata round trip on Kafka).
pub fn bus_check(bus: Arc<dyn node::bus::Bus>) -> (&'static str, Check) {
    let check: Check = Arc::new(move || {
        let bus = bus.clone();
        Box::pin(async move { bus.ping().await.map_err(|e| e.to_string()) })
    });
    ("bus", check)
}

/// A check that at least one node of the cluster answers its health ping.
pub fn nodes_check(cluster: Arc<node::cluster::Cluster>) -> (&'static str, Check) {
    let check: Check = Arc::new(move || {
        let cluster = cluster.clone();
        Box::pin(async move {
            match cluster.live_nodes() {
                0 => Err("no node answers".to_owned()),
                _ => Ok(()),
            }
        })
    });
    ("nodes", check)
}
