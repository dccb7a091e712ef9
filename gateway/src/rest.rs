//! Native REST under `/v1`: the same commands as the native WebSocket protocol, for clients that
//! only need request/response. Bearer token in `Authorization`.
//!
//! | route | command |
//! |---|---|
//! | `GET /v1/rooms` | list my rooms |
//! | `POST /v1/rooms/direct` `{"user"}` | open the direct room with a user |
//! | `POST /v1/rooms` `{"name","members"}` | create a group |
//! | `GET /v1/rooms/{room}/messages?before=&after=&limit=` | history page |
//! | `POST /v1/rooms/{room}/messages` `{"text","client_ref"?}` | send |

use crate::server::{App, Caller, error_response};
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Json, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use schema::{
    Command, Error, ErrorCode, HistoryQuery, MessageBody, MessageId, Reply, RoomId, UserId,
};
use serde::Deserialize;
use std::sync::Arc;

/// The `/v1` routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/rooms", get(list_rooms).post(create_group))
        .route("/rooms/direct", post(open_direct))
        .route("/rooms/{room}/messages", get(history).post(send))
}

fn invalid(e: impl std::fmt::Display) -> Response {
    error_response(&Error::new(ErrorCode::InvalidField, e.to_string()))
}

async fn run(app: &App, caller: &Caller, cmd: Command) -> Response {
    match app.node.execute(&caller.0.id, cmd).await {
        Ok(reply) => {
            let created = matches!(reply, Reply::Room { created: true, .. })
                || matches!(reply, Reply::Message { .. });
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = match reply {
                Reply::Room { room, created } => {
                    serde_json::json!({ "room": room, "created": created })
                }
                Reply::Message { message } => serde_json::json!({ "message": message }),
                Reply::History { messages, has_more } => {
                    serde_json::json!({ "messages": messages, "has_more": has_more })
                }
                Reply::Rooms { rooms } => serde_json::json!({ "rooms": rooms }),
            };
            (status, Json(body)).into_response()
        }
        Err(e) => error_response(&e),
    }
}

async fn list_rooms(State(app): State<Arc<App>>, caller: Caller) -> Response {
    run(&app, &caller, Command::ListRooms).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectBody {
    user: UserId,
}

async fn open_direct(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: Result<Json<DirectBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => run(&app, &caller, Command::OpenDirect { peer: b.user }).await,
        Err(e) => invalid(e.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    name: String,
    #[serde(default)]
    members: Vec<UserId>,
}

async fn create_group(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: Result<Json<GroupBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => {
            run(
                &app,
                &caller,
                Command::CreateGroup {
                    name: b.name,
                    members: b.members,
                },
            )
            .await
        }
        Err(e) => invalid(e.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    before: Option<MessageId>,
    after: Option<MessageId>,
    limit: Option<u32>,
}

async fn history(
    State(app): State<Arc<App>>,
    caller: Caller,
    room: Result<Path<RoomId>, PathRejection>,
    q: Result<Query<HistoryParams>, QueryRejection>,
) -> Response {
    let room = match room {
        Ok(Path(r)) => r,
        Err(e) => return invalid(e.body_text()),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return invalid(e.body_text()),
    };
    let query = HistoryQuery {
        before: q.before,
        after: q.after,
        limit: q.limit,
    };
    run(&app, &caller, Command::History { room, query }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    text: String,
    client_ref: Option<String>,
}

async fn send(
    State(app): State<Arc<App>>,
    caller: Caller,
    room: Result<Path<RoomId>, PathRejection>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Response {
    let room = match room {
        Ok(Path(r)) => r,
        Err(e) => return invalid(e.body_text()),
    };
    match body {
        Ok(Json(b)) => {
            let cmd = Command::Send {
                room,
                body: MessageBody::Text { text: b.text },
                client_ref: b.client_ref,
            };
            run(&app, &caller, cmd).await
        }
        Err(e) => invalid(e.body_text()),
    }
}
