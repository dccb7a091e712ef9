//! Wire dialects: pure codecs between a wire format and the canonical `Command`/`Event`.
//!
//! A dialect decodes a client frame into a request for the node and encodes replies and events
//! into frames, with its own error shapes and strings. It holds no business rule and does no
//! I/O; the session loop ([`crate::session`]) drives it.

pub mod events;
pub mod native;
pub mod phoenix;
pub mod rt;
pub mod socketio;
pub mod wsloop;
