//! The one error-code set every layer maps onto.
//!
//! Each crate has its own error enums; at the edge they become an [`Error`]: a stable
//! machine-readable [`ErrorCode`] plus a human message. Each code maps to an HTTP status and a
//! WebSocket close code; dialects map codes to their own error shapes and strings.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable machine codes, shown to clients as snake_case strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame or body is not valid JSON or not an object.
    MalformedJson,
    /// The `op` is not one this protocol knows.
    UnknownOp,
    /// A field is missing, mistyped or out of range.
    InvalidField,
    /// The frame is larger than the configured limit.
    FrameTooLarge,
    /// No valid credentials.
    Unauthorized,
    /// Authenticated, but not allowed to do this.
    Forbidden,
    /// The caller is not a member of the room.
    NotMember,
    /// The thing named does not exist.
    NotFound,
    /// The request conflicts with the current state.
    Conflict,
    /// A configured limit (group size, rate) was reached.
    LimitExceeded,
    /// The caller is sending messages faster than the configured rate.
    RateLimited,
    /// The caller is sending typing events faster than the configured rate.
    TypingRateLimited,
    /// The user (or the client address) already holds the configured maximum of connections.
    TooManyConnections,
    /// A message's text is longer than the configured maximum.
    TextTooLong,
    /// A media caption is longer than the configured maximum.
    CaptionTooLong,
    /// The group already has the configured maximum of members.
    GroupFull,
    /// The user already belongs to the configured maximum of rooms.
    TooManyRooms,
    /// One of the two users blocked the other.
    Blocked,
    /// The key is owned by another node; the caller must re-route.
    NotOwner,
    /// A dependency (store, bus) is down or overloaded; retrying later may succeed.
    Unavailable,
    /// The request did not finish within its deadline.
    Timeout,
    /// A bug or an unexpected failure on the server.
    Internal,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TypingRateLimited => "typing_rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::CaptionTooLong => "caption_too_long",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Blocked => "blocked",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::MalformedJson | ErrorCode::UnknownOp | ErrorCode::InvalidField => 400,
            ErrorCode::FrameTooLarge => 413,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::NotMember | ErrorCode::Blocked => 403,
            ErrorCode::TextTooLong | ErrorCode::CaptionTooLong => 413,
            ErrorCode::GroupFull | ErrorCode::TooManyRooms => 422,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::LimitExceeded => 422,
            ErrorCode::RateLimited
            | ErrorCode::TypingRateLimited
            | ErrorCode::TooManyConnections => 429,
            ErrorCode::NotOwner | ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
        }
    }

    /// The WebSocket close code when this error ends a connection (RFC 6455 section 7.4, and
    /// 4000-4999 for Palaver's own).
    pub fn ws_close_code(self) -> u16 {
        match self {
            ErrorCode::MalformedJson | ErrorCode::UnknownOp | ErrorCode::InvalidField => 1007,
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::Unauthorized => 4001,
            ErrorCode::Forbidden | ErrorCode::NotMember | ErrorCode::Blocked => 4003,
            ErrorCode::RateLimited
            | ErrorCode::TypingRateLimited
            | ErrorCode::TooManyConnections
            | ErrorCode::LimitExceeded
            | ErrorCode::GroupFull
            | ErrorCode::TooManyRooms => 4029,
            ErrorCode::TextTooLong | ErrorCode::CaptionTooLong => 1009,
            ErrorCode::NotFound | ErrorCode::Conflict => 1008,
            ErrorCode::NotOwner | ErrorCode::Unavailable | ErrorCode::Timeout => 1013,
            ErrorCode::Internal => 1011,
        }
    }

    /// Whether the same request may succeed if simply retried.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotOwner | ErrorCode::Unavailable | ErrorCode::Timeout
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as a client sees it: a stable code and a lowercase human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    /// Machine code.
    pub code: ErrorCode,
    /// Human explanation, precise enough to fix the request.
    pub message: String,
}

impl Error {
    /// Builds an error from a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A missing, mistyped or out-of-range field.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidField, message)
    }

    /// The caller is not a member of `room`.
    pub fn not_member(room: crate::RoomId) -> Self {
        Self::new(
            ErrorCode::NotMember,
            format!("you are not a member of room {room}"),
        )
    }

    /// Something was not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// A dependency failed; the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// An unexpected failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}
