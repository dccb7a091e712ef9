//! # palaver-schema: the data contract
//!
//! Everything that crosses a boundary in Palaver is defined here, and nothing here does I/O.
//!
//! - [`ids`]: identifiers. User ids are opaque strings from the token's `sub`; room and message
//!   ids are integers kept below 2^53 so JavaScript clients see them exactly.
//! - [`domain`]: the domain types (users, rooms, members, messages) as the store keeps them.
//! - [`command`]: the canonical [`Command`] enum, everything a client can ask, and its
//!   [`Reply`]. Every wire dialect decodes its frames into a `Command`.
//! - [`event`]: the canonical [`Event`] enum, everything a client can be told. Every wire dialect
//!   encodes an `Event` into its own frames.
//! - [`envelope`]: what travels on the bus: [`Delivery`] (node actors to gateways) and
//!   [`PushJob`] (node actors to push workers).
//! - `cql/`: the ScyllaDB schema as ordered migrations ([`CQL_MIGRATIONS`]).
//! - [`error`]: the one small set of error codes ([`ErrorCode`]) every layer maps onto, and how
//!   each maps to HTTP statuses and WebSocket close codes.
//!
//! Data flow: gateway dialect decodes bytes -> `Command` -> node actor -> `Reply` to the caller
//! and `Event`s inside `Delivery` envelopes -> gateways -> dialect encodes bytes.

pub mod command;
pub mod domain;
pub mod envelope;
pub mod error;
pub mod event;
pub mod ids;

pub use command::{Command, FriendAction, HistoryQuery, Reply, SessionRef};
pub use domain::{
    Chat, DeadLetter, Device, FriendView, Friendship, FriendshipStatus, Media, Member, Message,
    MessageBody, MessageContent, Notification, Platform, Profile, Role, Room, RoomKind,
    RoomSummary, Upload, User,
};
pub use envelope::{Delivery, PushJob, Target};
pub use error::{Error, ErrorCode};
pub use event::Event;
pub use ids::{GatewayId, MessageId, NodeId, RoomId, SessionId, UserId};

/// The ScyllaDB schema as ordered migrations (`schema/cql/NNNN_name.cql`): version and CQL text.
/// `palaver migrate` applies the ones a keyspace has not seen yet.
pub const CQL_MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../cql/0001_init.cql")),
    (2, include_str!("../cql/0002_domain.cql")),
    (3, include_str!("../cql/0003_language.cql")),
    (4, include_str!("../cql/0004_push_uploads.cql")),
];

/// Milliseconds since the Unix epoch, the one timestamp unit Palaver stores and sends.
pub type Millis = i64;
