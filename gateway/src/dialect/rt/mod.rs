//! Type-tagged JSON dialect (seed 003) on `/rt/chat` and `/rt/presence`. Work in progress.

use crate::server::App;
use axum::Router;
use std::sync::Arc;

/// The dialect's routes on the main listener.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
}

/// The chat socket at `/` (compat listener `rt-chat`).
pub fn chat_at_root() -> Router<Arc<App>> {
    Router::new()
}

/// The presence feed at `/` (compat listener `rt-presence`).
pub fn presence_at_root() -> Router<Arc<App>> {
    Router::new()
}
