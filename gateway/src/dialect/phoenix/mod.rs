//! Phoenix Channels V2 dialect (seed 002) on `/socket/websocket`. Work in progress.

use crate::server::App;
use axum::Router;
use std::sync::Arc;

/// The dialect's routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
}
