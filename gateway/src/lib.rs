//! # palaver-gateway: sockets, tokens, dialects
//!
//! The gateway holds client connections and knows no business rule. For each connection:
//!
//! 1. [`server`] accepts the HTTP request on `PALAVER_HTTP_ADDR` and [`auth`] verifies the JWT
//!    before any upgrade (a bad token is an HTTP 401).
//! 2. [`session`] runs one task per socket: frames are decoded by the connection's
//!    [`dialect`] into canonical `Command`s, executed by the node (`node::Node::execute`), and
//!    replies are encoded back.
//! 3. [`hub`] receives this gateway's deliveries from the bus and queues each event on the
//!    bounded outbound queue of every local session it targets; a session that cannot keep up
//!    is disconnected, never waited for.
//!    [`ws`] upgrades WebSockets behind a frame-size guard that refuses oversized frames from
//!    their header and keeps the connection usable.
//! 4. [`rest`] serves the same commands over HTTP under `/v1`.
//!
//! [`console`] serves the web console (`/console`) and the admin overview it reads.
//!
//! [`config`] reads settings (TOML file, then `PALAVER_*` environment), [`telemetry`] sets up
//! logs. The `palaver` binary (`main.rs`) has the `serve` and `token` subcommands.

pub mod auth;
pub mod config;
pub mod console;
pub mod dialect;
pub mod fuzzing;
pub mod hub;
pub mod listen;
pub mod node_process;
pub mod outbox;
pub mod people;
pub mod push;
pub mod ready;
pub mod reorder;
pub mod rest;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod uploads;
pub mod ws;

pub use server::Palaver;
