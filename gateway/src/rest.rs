//! Native REST under `/v1`: the same commands as the native WebSocket protocol, for clients that
//! only need request/response. Bearer token in `Authorization`. A request is turned into the
//! native operation of the same name (path parameters plus the JSON body or query string) and
//! decoded by the native decoder, so both interfaces validate identically. The answer is the
//! reply's `data` object; errors are `{"error":{"code","message"}}` with the code's HTTP status.
//!
//! | route | native op |
//! |---|---|
//! | `GET /v1/rooms` | `rooms` |
//! | `POST /v1/rooms` `{name, members?, avatar?, public?}` | `create_group` |
//! | `POST /v1/rooms/direct` `{user}` | `open_direct` |
//! | `PATCH /v1/rooms/{room}` `{name?, avatar?, public?}` | `update_group` |
//! | `GET /v1/rooms/{room}/members` | `members` |
//! | `POST /v1/rooms/{room}/members` `{users}` | `add_members` |
//! | `DELETE /v1/rooms/{room}/members/{user}` | `remove_member` (yourself: `leave`) |
//! | `PUT /v1/rooms/{room}/members/{user}/role` `{role}` | `set_role` |
//! | `POST /v1/rooms/{room}/join`, `POST /v1/rooms/{room}/leave` | `join`, `leave` |
//! | `GET /v1/rooms/{room}/messages?before=&after=&limit=` | `history` |
//! | `POST /v1/rooms/{room}/messages` `{text \| type, media, caption?, ...}` | `send` |
//! | `PATCH /v1/rooms/{room}/messages/{id}` `{text}` | `edit` |
//! | `DELETE /v1/rooms/{room}/messages/{id}` | `delete` one |
//! | `POST /v1/rooms/{room}/messages/delete` `{messages}` | `delete` many |
//! | `PUT`/`DELETE /v1/rooms/{room}/messages/{id}/reactions/{emoji}` | `react` add/remove |
//! | `POST /v1/rooms/{room}/read` `{message?}` | `read` |
//! | `GET /v1/rooms/{room}/events?after_seq=` | `replay` |
//! | `GET /v1/chats?direct_only=&skip=&limit=` | `chats` |
//! | `GET /v1/friends?all=` | `friendships` |
//! | `POST /v1/friends/{user}` `{action}` | `friend` |
//! | `GET /v1/users/{id}`, `GET /v1/users?username=` | `user` |
//! | `GET /v1/users/{id}/messages?before=&after=&limit=` | `direct_history` |
//! | `PUT /v1/admin/users` `[{id, username?, name?, avatar?}]` (admin token) | import users |
//! | `PUT /v1/rooms/{room}/mute` `{muted}` | `mute` |
//! | `POST /v1/devices` `{platform, token, device_id?}` | `add_device` (201) |
//! | `DELETE /v1/devices/{token}` | `remove_device` (204) |

use crate::dialect::native;
use crate::server::{App, Caller, error_response};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use schema::{Error, ErrorCode, Profile, Reply, UserId};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The `/v1` routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/rooms", get(list_rooms).post(create_group))
        .route("/rooms/direct", post(open_direct))
        .route("/rooms/{room}", axum::routing::patch(update_group))
        .route("/rooms/{room}/members", get(members).post(add_members))
        .route(
            "/rooms/{room}/members/{user}",
            axum::routing::delete(remove_member),
        )
        .route("/rooms/{room}/members/{user}/role", put(set_role))
        .route("/rooms/{room}/join", post(join))
        .route("/rooms/{room}/leave", post(leave))
        .route("/rooms/{room}/messages", get(history).post(send))
        .route("/rooms/{room}/messages/delete", post(delete_many))
        .route(
            "/rooms/{room}/messages/{id}",
            axum::routing::patch(edit).delete(delete_one),
        )
        .route(
            "/rooms/{room}/messages/{id}/reactions/{emoji}",
            put(react_add).delete(react_remove),
        )
        .route("/rooms/{room}/read", post(read))
        .route("/rooms/{room}/events", get(replay))
        .route("/chats", get(chats))
        .route("/friends", get(friendships))
        .route("/friends/{user}", post(friend))
        .route("/users", get(user_by_name))
        .route("/users/{id}", get(user_by_id))
        .route("/users/{id}/messages", get(direct_history))
        .route("/admin/users", put(import_users))
        .route("/rooms/{room}/mute", put(mute))
        .route("/devices", post(add_device))
        .route("/devices/{token}", axum::routing::delete(remove_device))
}

/// A path parameter that must be a JSON integer (room and message ids).
fn int(name: &str, v: &str) -> Result<Value, Error> {
    v.parse::<u64>()
        .map(Value::from)
        .map_err(|_| Error::invalid(format!("{name} must be an integer, not {v:?}")))
}

/// The JSON object of a request body (empty body: `{}`).
pub(crate) fn body_object(body: &Bytes) -> Result<Map<String, Value>, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::new(
            ErrorCode::MalformedJson,
            "the body must be a JSON object",
        )),
        Err(e) => Err(Error::new(
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// The query string as a JSON object: integers and booleans as such, the rest as strings.
pub(crate) fn query_object(q: Option<String>) -> Result<Map<String, Value>, Error> {
    let mut m = Map::new();
    let Some(q) = q else {
        return Ok(m);
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&q)
        .map_err(|e| Error::invalid(format!("bad query string: {e}")))?;
    for (k, v) in pairs {
        let value = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if v == "true" || v == "false" {
            Value::Bool(v == "true")
        } else {
            Value::String(v)
        };
        if m.insert(k.clone(), value).is_some() {
            return Err(Error::invalid(format!("query parameter {k} given twice")));
        }
    }
    Ok(m)
}

/// Runs native op `op` with `args` for the caller and answers its data.
async fn run(app: &App, caller: &Caller, op: &str, mut args: Map<String, Value>) -> Response {
    args.insert("id".into(), json!(0));
    args.insert("op".into(), json!(op));
    let text = Value::Object(args).to_string();
    let cmd = match native::decode(&text) {
        Ok(native::Request {
            op: native::Op::Command(cmd),
            ..
        }) => cmd,
        Ok(_) => return error_response(&Error::internal("not a REST operation")),
        Err(de) => {
            app.console
                .record(Some("rest"), Some(op), Some(&caller.0.id), &de.error);
            return error_response(&de.error);
        }
    };
    app.hub.dialect_metrics("rest").command(&cmd);
    let executed = crate::console::scoped("rest", app.node.execute(&caller.0.id, cmd));
    match executed.await {
        Ok(reply) => {
            let created = matches!(reply, Reply::Room { created: true, .. })
                || (op == "send" && matches!(reply, Reply::Message { .. }))
                || op == "add_device";
            if op == "remove_device" {
                return StatusCode::NO_CONTENT.into_response();
            }
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let data = match serde_json::to_value(&reply) {
                Ok(Value::Object(mut m)) => {
                    m.remove("reply");
                    Value::Object(m)
                }
                Ok(v) => v,
                Err(e) => return error_response(&Error::internal(e.to_string())),
            };
            (status, axum::Json(data)).into_response()
        }
        Err(e) => error_response(&e),
    }
}

/// Builds the arguments from path parameters and a body or query, then runs the op.
async fn with(
    app: &App,
    caller: &Caller,
    op: &str,
    path: &[(&str, Result<Value, Error>)],
    extra: Result<Map<String, Value>, Error>,
) -> Response {
    let mut args = match extra {
        Ok(m) => m,
        Err(e) => return error_response(&e),
    };
    for (k, v) in path {
        match v {
            Ok(v) => {
                args.insert((*k).to_owned(), v.clone());
            }
            Err(e) => return error_response(e),
        }
    }
    run(app, caller, op, args).await
}

type RoomPath = Path<String>;

async fn list_rooms(State(app): State<Arc<App>>, caller: Caller) -> Response {
    run(&app, &caller, "rooms", Map::new()).await
}

async fn create_group(State(app): State<Arc<App>>, caller: Caller, body: Bytes) -> Response {
    with(&app, &caller, "create_group", &[], body_object(&body)).await
}

async fn open_direct(State(app): State<Arc<App>>, caller: Caller, body: Bytes) -> Response {
    with(&app, &caller, "open_direct", &[], body_object(&body)).await
}

async fn update_group(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "update_group", &p, body_object(&body)).await
}

async fn members(State(app): State<Arc<App>>, caller: Caller, Path(room): RoomPath) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "members", &p, Ok(Map::new())).await
}

async fn add_members(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "add_members", &p, body_object(&body)).await
}

async fn remove_member(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, user)): Path<(String, String)>,
) -> Response {
    if user == caller.0.id.as_str() {
        let p = [("room", int("room", &room))];
        return with(&app, &caller, "leave", &p, Ok(Map::new())).await;
    }
    let p = [("room", int("room", &room)), ("user", Ok(json!(user)))];
    with(&app, &caller, "remove_member", &p, Ok(Map::new())).await
}

async fn set_role(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, user)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room)), ("user", Ok(json!(user)))];
    with(&app, &caller, "set_role", &p, body_object(&body)).await
}

async fn join(State(app): State<Arc<App>>, caller: Caller, Path(room): RoomPath) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "join", &p, Ok(Map::new())).await
}

async fn leave(State(app): State<Arc<App>>, caller: Caller, Path(room): RoomPath) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "leave", &p, Ok(Map::new())).await
}

async fn history(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    RawQuery(q): RawQuery,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "history", &p, query_object(q)).await
}

async fn send(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "send", &p, body_object(&body)).await
}

async fn edit(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let p = [
        ("room", int("room", &room)),
        ("message", int("message", &id)),
    ];
    with(&app, &caller, "edit", &p, body_object(&body)).await
}

async fn delete_one(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    let p = [
        ("room", int("room", &room)),
        ("messages", int("message", &id).map(|v| json!([v]))),
    ];
    with(&app, &caller, "delete", &p, Ok(Map::new())).await
}

async fn delete_many(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "delete", &p, body_object(&body)).await
}

async fn react(
    app: &App,
    caller: &Caller,
    room: &str,
    id: &str,
    emoji: &str,
    add: bool,
) -> Response {
    let p = [
        ("room", int("room", room)),
        ("message", int("message", id)),
        ("emoji", Ok(json!(emoji))),
        ("add", Ok(json!(add))),
    ];
    with(app, caller, "react", &p, Ok(Map::new())).await
}

async fn react_add(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, id, emoji)): Path<(String, String, String)>,
) -> Response {
    react(&app, &caller, &room, &id, &emoji, true).await
}

async fn react_remove(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((room, id, emoji)): Path<(String, String, String)>,
) -> Response {
    react(&app, &caller, &room, &id, &emoji, false).await
}

async fn read(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "read", &p, body_object(&body)).await
}

async fn replay(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    RawQuery(q): RawQuery,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "replay", &p, query_object(q)).await
}

async fn chats(State(app): State<Arc<App>>, caller: Caller, RawQuery(q): RawQuery) -> Response {
    with(&app, &caller, "chats", &[], query_object(q)).await
}

async fn friendships(
    State(app): State<Arc<App>>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Response {
    with(&app, &caller, "friendships", &[], query_object(q)).await
}

async fn friend(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let p = [("user", Ok(json!(user)))];
    with(&app, &caller, "friend", &p, body_object(&body)).await
}

async fn user_by_name(
    State(app): State<Arc<App>>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Response {
    // Usernames stay strings even when they look like numbers.
    let q = query_object(q).map(|mut m| {
        if let Some(v) = m.get_mut("username")
            && !v.is_string()
        {
            *v = Value::String(v.to_string());
        }
        m
    });
    with(&app, &caller, "user", &[], q).await
}

async fn user_by_id(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    // The native op names the user `user`: `id` is the request id.
    let p = [("user", Ok(json!(id)))];
    with(&app, &caller, "user", &p, Ok(Map::new())).await
}

async fn direct_history(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = [("user", Ok(json!(id)))];
    with(&app, &caller, "direct_history", &p, query_object(q)).await
}

async fn mute(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(room): RoomPath,
    body: Bytes,
) -> Response {
    let p = [("room", int("room", &room))];
    with(&app, &caller, "mute", &p, body_object(&body)).await
}

async fn add_device(State(app): State<Arc<App>>, caller: Caller, body: Bytes) -> Response {
    with(&app, &caller, "add_device", &[], body_object(&body)).await
}

async fn remove_device(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(token): Path<String>,
) -> Response {
    let p = [("token", Ok(json!(token)))];
    with(&app, &caller, "remove_device", &p, Ok(Map::new())).await
}

/// `PUT /v1/admin/users`: creates or updates users, for operators importing an existing user
/// base (so that lookups by username and "profile not found" checks know them before their
/// first connect). Protected by `PALAVER_ADMIN_TOKEN`.
async fn import_users(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(expected) = app.config.admin_token.as_deref() else {
        return error_response(&Error::new(
            ErrorCode::Forbidden,
            "admin endpoints are disabled: set PALAVER_ADMIN_TOKEN",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        // Constant-time comparison: the token is a password.
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        return error_response(&Error::new(
            ErrorCode::Unauthorized,
            "a valid admin bearer token is required",
        ));
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ImportUser {
        id: UserId,
        username: Option<String>,
        name: Option<String>,
        avatar: Option<String>,
    }
    let users: Vec<ImportUser> = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return error_response(&Error::invalid(format!(
                "the body must be a JSON array of {{id, username?, name?, avatar?}}: {e}"
            )));
        }
    };
    let profiles = users
        .into_iter()
        .map(|u| Profile {
            id: u.id,
            username: u.username,
            name: u.name,
            avatar: u.avatar,
            language: None,
        })
        .collect();
    match app.node.import_users(profiles).await {
        Ok(n) => (StatusCode::OK, axum::Json(json!({ "imported": n }))).into_response(),
        Err(e) => error_response(&e),
    }
}
