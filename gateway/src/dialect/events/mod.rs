//! Event/data JSON dialect (seed 004) on `/events`, and the seed's `*.php` REST. Work in
//! progress.

use crate::server::App;
use axum::Router;
use std::sync::Arc;

/// The dialect's routes on the main listener.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
}

/// The socket at `/` (compat listener `events`).
pub fn at_root() -> Router<Arc<App>> {
    Router::new()
}
