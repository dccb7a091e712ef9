//! The seed 004 REST: `POST /send_chat_message.php`, `GET|POST /get_conversations.php` and
//! `GET|POST /get_conversation_messages.php`.
//!
//! - **Token**: `Authorization: Bearer` or `?token=` (PHP pages often cannot set headers),
//!   checked before the body is read: 401 `{"status":"error","message":...}`.
//! - **Parameters** come from the query string and the body, PHP's `$_REQUEST` style: a JSON
//!   object, an `application/x-www-form-urlencoded` form, or (send; the lists take its text
//!   fields) `multipart/form-data`. Numbers may be JSON numbers or decimal strings; blank values
//!   count as absent; unknown parameters are ignored. When a key repeats, the last value counts,
//!   but every `sender_id` and `user_id` given must be the token's user (403 otherwise).
//! - **Answers**: `{"status":"success",...}` with 200, or `{"status":"error","message"}` with
//!   400 (validation), 401, 403, 404 (unknown receiver or other user), 413 (too large), 429
//!   (rate limited), or the node's status for its other errors.
//!
//! `send_chat_message.php` takes exactly one of `message` (text), `image` (a file part, at most
//! [`IMAGE_MAX_BYTES`]) or `voice` (a file part, at most [`VOICE_MAX_BYTES`], with `duration`
//! in seconds), both also capped by the configured upload limits. Files go through
//! [`crate::uploads::Uploads`] (streamed to a temporary file, checked by content, images
//! re-encoded as WebP, recorded for the sender); a file is stored only once the whole request is
//! valid and the receiver exists, so a refused request stores nothing.

use super::codec::{self, Params};
use super::remember_message;
use crate::server::{ApiError, App, authenticate, bearer};
use crate::uploads::{CHAT_MESSAGES, FORM_OVERHEAD, Incoming, MediaKind, UploadError, Uploads};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, Multipart, MultipartError};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{StreamExt, TryStreamExt};
use schema::{Command, Error, ErrorCode, HistoryQuery, Media, MessageBody, Profile, Reply, UserId};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// Largest image a send accepts (the seed's 10 MB), before conversion.
pub const IMAGE_MAX_BYTES: u64 = 10 * MIB;

/// Largest voice file a send accepts (the seed's 20 MB).
pub const VOICE_MAX_BYTES: u64 = 20 * MIB;

/// After a refused request, at most this much of the rest of its body is read and discarded,
/// so that a client still sending gets the answer rather than a reset connection...
const DRAIN_MAX: u64 = 8 * MIB;

/// ... for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Parameters that name the caller and must be the token's user.
const CLAIMS: &[&str] = &["sender_id", "user_id"];

/// The routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/send_chat_message.php",
            // The router-wide limit is sized for chat frames; the send enforces its own,
            // derived from the media limits (see `read_send_form`).
            post(send_chat_message).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/get_conversations.php",
            get(get_conversations).post(get_conversations),
        )
        .route(
            "/get_conversation_messages.php",
            get(get_conversation_messages).post(get_conversation_messages),
        )
}

// ------------------------------------------------------------------------------------------
// Answers
// ------------------------------------------------------------------------------------------

/// `{"status":"error","message"}` with `status`.
pub(crate) fn refusal(status: StatusCode, message: &str) -> Response {
    let mut resp = (status, axum::Json(codec::error_body(message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// 401 with `message`.
pub(crate) fn unauthorized(message: &str) -> Response {
    refusal(StatusCode::UNAUTHORIZED, message)
}

/// A node error in the seed's shape, with the code's status.
pub(crate) fn error_response(e: &Error) -> Response {
    refusal(status_of(e), &e.message)
}

fn status_of(e: &Error) -> StatusCode {
    StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Why a request is refused.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        if e.code == ErrorCode::Internal {
            tracing::warn!(error = %e, "events REST: internal error");
        }
        Self::new(status_of(&e), e.message)
    }
}

impl From<UploadError> for Refusal {
    fn from(e: UploadError) -> Self {
        let status = e.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %e, "events REST: upload failed");
            return Self::new(status, "the file could not be stored");
        }
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refusal(self.status, &self.message)
    }
}

fn answer<T: serde::Serialize>(result: Result<T, Refusal>) -> Response {
    match result {
        Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(r) => r.into_response(),
    }
}

fn unexpected(r: &Reply) -> Refusal {
    Refusal::from(Error::internal(format!("unexpected reply {r:?}")))
}

// ------------------------------------------------------------------------------------------
// Requests
// ------------------------------------------------------------------------------------------

/// The caller of a request and the query's parameters: token from `Authorization: Bearer` or
/// `?token=`, claims in the query checked. A user never seen before is created from the
/// token's claims (the seed's clients may send before they ever connect a socket).
async fn caller(app: &App, parts: &Parts) -> Result<(Profile, Params), Refusal> {
    let query = codec::query_params(parts.uri.query())?;
    let token = codec::param(&query, "token").and_then(serde_json::Value::as_str);
    let profile = authenticate(app, bearer(&parts.headers, token))
        .map_err(|ApiError(e)| Refusal::new(StatusCode::UNAUTHORIZED, e.message))?;
    codec::check_claims(&query, &profile.id, CLAIMS)?;
    if app
        .people
        .user(app, &profile.id, &profile.id)
        .await
        .is_none()
        && let Err(e) = app.node.import_users(vec![profile.clone()]).await
    {
        tracing::debug!(user = %profile.id, error = %e, "profile not created");
    }
    app.people.remember(&profile);
    Ok((profile, query))
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn is_multipart(ctype: Option<&str>) -> bool {
    ctype.is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
    })
}

/// A whole small body, refused past `cap` bytes.
async fn small_body(body: Body, cap: usize) -> Result<Vec<u8>, Refusal> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Refusal::bad(format!("the request body could not be read: {e}")))?;
        if buf.len() + chunk.len() > cap {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body may be at most {cap} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// The parameters of a list request: the query, then the body (JSON, form, or a multipart
/// form's text fields), claims checked.
async fn list_params(app: &App, req: Request) -> Result<(Profile, Params), Refusal> {
    let (parts, body) = req.into_parts();
    let (profile, mut params) = caller(app, &parts).await?;
    let ctype = content_type(&parts.headers);
    let cap = app.config.max_frame_bytes;
    let from_body = if is_multipart(ctype.as_deref()) {
        let req = Request::from_parts(parts, body);
        let mut form = Multipart::from_request(req, &()).await.map_err(|rej| {
            Refusal::bad(format!("malformed multipart body: {}", rej.body_text()))
        })?;
        let mut p = Vec::new();
        while let Some(mut field) = form.next_field().await.map_err(|e| form_error(&e, None))? {
            let name = field.name().unwrap_or_default().to_owned();
            if field.file_name().is_some() {
                while field
                    .chunk()
                    .await
                    .map_err(|e| form_error(&e, None))?
                    .is_some()
                {}
                continue;
            }
            let value = text_field(&mut field, &name, cap, None).await?;
            p.push((name, serde_json::Value::String(value)));
        }
        p
    } else {
        let bytes = small_body(body, cap).await?;
        codec::body_params(ctype.as_deref(), &bytes)?
    };
    codec::check_claims(&from_body, &profile.id, CLAIMS)?;
    params.extend(from_body);
    Ok((profile, params))
}

/// A multipart reading error: 413 once the body passed its cap, else 400.
fn form_error(e: &MultipartError, over: Option<(&AtomicBool, u64)>) -> Refusal {
    if let Some((flag, cap)) = over
        && flag.load(Ordering::Relaxed)
    {
        return Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request may be at most {cap} bytes"),
        );
    }
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request is too large: {}", e.body_text()),
        );
    }
    Refusal::bad(format!("malformed multipart body: {}", e.body_text()))
}

/// A text field of at most `cap` bytes.
async fn text_field(
    field: &mut Field<'_>,
    name: &str,
    cap: usize,
    over: Option<(&AtomicBool, u64)>,
) -> Result<String, Refusal> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| form_error(&e, over))? {
        if buf.len() + chunk.len() > cap {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{name} may be at most {cap} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| Refusal::bad(format!("{name} must be UTF-8 text")))
}

/// Counts the bytes of a request body and ends it with an error past `cap`, setting `over`.
fn capped(req: Request, cap: u64, over: Arc<AtomicBool>) -> Request {
    let (parts, body) = req.into_parts();
    let mut seen = 0u64;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk?;
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > cap {
            over.store(true, Ordering::Relaxed);
            return Err(axum::Error::new(std::io::Error::other(
                "request body too large",
            )));
        }
        Ok::<Bytes, axum::Error>(chunk)
    });
    Request::from_parts(parts, Body::from_stream(stream))
}

/// Reads and discards the rest of a field, bounded.
async fn drain_field(field: &mut Field<'_>) {
    let drained = async {
        let mut n = 0u64;
        while let Ok(Some(chunk)) = field.chunk().await {
            n += chunk.len() as u64;
            if n > DRAIN_MAX {
                return;
            }
        }
    };
    let _ended = tokio::time::timeout(DRAIN_TIME, drained).await;
}

/// Reads and discards the rest of a form, bounded.
async fn drain_form(form: &mut Multipart) {
    let drained = async {
        let mut n = 0u64;
        while let Ok(Some(mut field)) = form.next_field().await {
            while let Ok(Some(chunk)) = field.chunk().await {
                n += chunk.len() as u64;
                if n > DRAIN_MAX {
                    return;
                }
            }
        }
    };
    let _ended = tokio::time::timeout(DRAIN_TIME, drained).await;
}

// ------------------------------------------------------------------------------------------
// send_chat_message.php
// ------------------------------------------------------------------------------------------

/// A file received with a send, not stored yet (dropping it deletes it).
struct Attachment {
    field: &'static str,
    kind: MediaKind,
    incoming: Incoming,
    name: Option<String>,
}

/// `POST /send_chat_message.php`.
async fn send_chat_message(State(app): State<Arc<App>>, req: Request) -> Response {
    answer(send(&app, req).await)
}

async fn send(app: &App, req: Request) -> Result<codec::SentBody, Refusal> {
    let (parts, body) = req.into_parts();
    let (profile, mut params) = caller(app, &parts).await?;
    let me = &profile.id;
    let uploads = Uploads::from_config(&app.config);
    let ctype = content_type(&parts.headers);
    let (from_body, attachment) = if is_multipart(ctype.as_deref()) {
        read_send_form(app, &uploads, Request::from_parts(parts, body), me).await?
    } else {
        let bytes = small_body(body, app.config.max_frame_bytes).await?;
        let p = codec::body_params(ctype.as_deref(), &bytes)?;
        (p, None)
    };
    codec::check_claims(&from_body, me, CLAIMS)?;
    params.extend(from_body);
    if attachment.is_none()
        && let Some(key) = ["image", "voice"]
            .into_iter()
            .find(|k| codec::param(&params, k).is_some_and(|v| !codec::blank(v)))
    {
        return Err(Refusal::bad(format!(
            "{key} must be sent as a file in a multipart/form-data body"
        )));
    }
    let text = codec::text_param("message", codec::param(&params, "message"))?
        .filter(|t| !t.trim().is_empty());
    let duration = codec::duration_param(codec::param(&params, "duration"))?;
    let content = match (text, attachment) {
        (None, None) => return Err(Refusal::bad(codec::NO_CONTENT)),
        (Some(_), Some(_)) => return Err(Refusal::bad(codec::MANY_CONTENTS)),
        (Some(t), None) => Ok(t),
        (None, Some(a)) => Err(a),
    };
    let receiver = codec::user_param("receiver_id", codec::param(&params, "receiver_id"))?
        .ok_or_else(|| Refusal::bad("receiver_id is required"))?;
    if &receiver == me {
        return Err(Refusal::bad(
            "receiver_id must be another user than the sender",
        ));
    }
    let room = match app
        .node
        .execute(
            me,
            Command::OpenDirect {
                peer: receiver.clone(),
            },
        )
        .await
    {
        Ok(Reply::Room { room, .. }) => room.room.id,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) if e.code == ErrorCode::NotFound => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                codec::RECEIVER_NOT_FOUND,
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let (body, stored) = match content {
        Ok(text) => (MessageBody::Text { text }, None),
        Err(a) => {
            let stored = uploads
                .save(
                    app,
                    me,
                    a.incoming,
                    CHAT_MESSAGES,
                    Some(a.kind),
                    a.name.as_deref(),
                )
                .await?;
            let media = Media {
                media: stored.path.clone(),
                caption: None,
                duration: if a.kind == MediaKind::Voice {
                    duration
                } else {
                    None
                },
                size: Some(stored.bytes),
            };
            let body = if a.kind == MediaKind::Image {
                MessageBody::Image(media)
            } else {
                MessageBody::Audio(media)
            };
            (body, Some(stored))
        }
    };
    let cmd = Command::Send {
        room,
        body,
        client_ref: None,
        reply_to: None,
    };
    app.hub.dialect_metrics("events-rest").command(&cmd);
    match app.node.execute(me, cmd).await {
        Ok(Reply::Message { message }) => {
            remember_message(app, message.id, message.room);
            Ok(codec::sent_body(codec::message_data(
                &message,
                Some(&receiver),
                None,
            )))
        }
        other => {
            // Not sent: the stored file would be an orphan.
            if let Some(s) = stored {
                uploads.remove(&s).await;
            }
            match other {
                Ok(r) => Err(unexpected(&r)),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Reads a multipart send: its text fields, and at most one `image` or `voice` file into a
/// temporary file. The whole body is capped; a refusal drains what the client is still sending
/// (bounded) so that it reads the answer.
async fn read_send_form(
    app: &App,
    uploads: &Uploads,
    req: Request,
    me: &UserId,
) -> Result<(Params, Option<Attachment>), Refusal> {
    let limits = uploads.limits();
    let image_limit = IMAGE_MAX_BYTES.min(limits.max_for(MediaKind::Image));
    let voice_limit = VOICE_MAX_BYTES.min(limits.max_for(MediaKind::Voice));
    let text_cap = app.config.max_frame_bytes;
    let cap = image_limit
        .max(voice_limit)
        .saturating_add(FORM_OVERHEAD)
        .saturating_add(text_cap as u64);
    let over = Arc::new(AtomicBool::new(false));
    let req = capped(req, cap, over.clone());
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|rej| Refusal::bad(format!("malformed multipart body: {}", rej.body_text())))?;
    let limits = FormLimits {
        image: image_limit,
        voice: voice_limit,
        text: text_cap,
        cap,
    };
    let result = read_send_fields(uploads, &mut form, me, &over, &limits).await;
    if result.is_err() && !over.load(Ordering::Relaxed) {
        drain_form(&mut form).await;
    }
    result
}

struct FormLimits {
    image: u64,
    voice: u64,
    text: usize,
    cap: u64,
}

async fn read_send_fields(
    uploads: &Uploads,
    form: &mut Multipart,
    me: &UserId,
    over: &AtomicBool,
    limits: &FormLimits,
) -> Result<(Params, Option<Attachment>), Refusal> {
    let over = Some((over, limits.cap));
    let mut params: Params = Vec::new();
    let mut attachment: Option<Attachment> = None;
    while let Some(mut field) = form.next_field().await.map_err(|e| form_error(&e, over))? {
        let name = field.name().unwrap_or_default().to_owned();
        let (field_name, kind, limit) = match name.as_str() {
            "image" => ("image", MediaKind::Image, limits.image),
            "voice" => ("voice", MediaKind::Voice, limits.voice),
            "sender_id" | "user_id" | "receiver_id" | "message" | "duration" => {
                let value = text_field(&mut field, &name, limits.text, over).await?;
                let pair = vec![(name, serde_json::Value::String(value))];
                // Refused at once, before any file is read.
                codec::check_claims(&pair, me, CLAIMS)?;
                params.extend(pair);
                continue;
            }
            _ => {
                while field
                    .chunk()
                    .await
                    .map_err(|e| form_error(&e, over))?
                    .is_some()
                {}
                continue;
            }
        };
        if let Some(a) = &attachment {
            return Err(Refusal::bad(if a.field == field_name {
                format!("{field_name} is given more than once")
            } else {
                codec::MANY_CONTENTS.to_owned()
            }));
        }
        let original = field.file_name().map(str::to_owned);
        // The seed checked names; the content is checked too (`Uploads::receive`, `finish`).
        let file_name = if kind == MediaKind::Voice {
            codec::voice_file_name(original.as_deref(), field.content_type())
        } else {
            original.clone()
        };
        uploads.check_name(kind, file_name.as_deref())?;
        let received = {
            let body = (&mut field).map_err(|e| {
                let r = form_error(&e, over);
                UploadError::Body {
                    status: r.status,
                    message: r.message,
                }
            });
            uploads.receive(body, limit, Some(kind)).await
        };
        match received {
            Ok(incoming) if incoming.bytes() == 0 => {
                // An empty file input (no file chosen) is no file at all.
                if original.as_deref().is_some_and(|n| !n.is_empty()) {
                    return Err(Refusal::bad(format!("{field_name} is empty")));
                }
            }
            Ok(incoming) => {
                attachment = Some(Attachment {
                    field: field_name,
                    kind,
                    incoming,
                    name: file_name,
                });
            }
            Err(UploadError::TooLarge { .. }) => {
                drain_field(&mut field).await;
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{field_name} files may be at most {limit} bytes ({} MB)",
                        limit / MIB
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((params, attachment))
}

// ------------------------------------------------------------------------------------------
// The lists
// ------------------------------------------------------------------------------------------

/// `GET|POST /get_conversations.php`.
async fn get_conversations(State(app): State<Arc<App>>, req: Request) -> Response {
    answer(conversations(&app, req).await)
}

async fn conversations(
    app: &App,
    req: Request,
) -> Result<codec::SuccessBody<codec::ConversationsPage>, Refusal> {
    let (profile, params) = list_params(app, req).await?;
    let page = codec::page_params(&params)?;
    let cmd = Command::Chats {
        direct_only: true,
        skip: page.offset,
        limit: Some(page.limit),
    };
    match app.node.execute(&profile.id, cmd).await? {
        Reply::Chats { chats, has_more } => {
            for m in chats.iter().filter_map(|c| c.last_message.as_ref()) {
                remember_message(app, m.id, m.room);
            }
            Ok(codec::success_body(codec::ConversationsPage {
                conversations: chats
                    .iter()
                    .map(|c| codec::conversation(c, &profile))
                    .collect(),
                limit: page.limit,
                offset: page.offset,
                has_more,
            }))
        }
        other => Err(unexpected(&other)),
    }
}

/// `GET|POST /get_conversation_messages.php`.
async fn get_conversation_messages(State(app): State<Arc<App>>, req: Request) -> Response {
    answer(messages(&app, req).await)
}

async fn messages(
    app: &App,
    req: Request,
) -> Result<codec::SuccessBody<codec::MessagesPage>, Refusal> {
    let (profile, params) = list_params(app, req).await?;
    let me = &profile.id;
    let other = codec::user_param("other_user_id", codec::param(&params, "other_user_id"))?
        .ok_or_else(|| Refusal::bad("other_user_id is required"))?;
    if &other == me {
        return Err(Refusal::bad("other_user_id must be another user"));
    }
    let page = codec::page_params(&params)?;
    let before = codec::before_param(codec::param(&params, "before_message_id"))?;
    let peer = app
        .people
        .user(app, me, &other)
        .await
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, "other user profile not found"))?;
    let cmd = Command::DirectHistory {
        peer: other.clone(),
        query: HistoryQuery {
            before,
            after: None,
            limit: Some(page.limit),
            skip: (page.offset > 0).then_some(page.offset),
        },
    };
    match app.node.execute(me, cmd).await? {
        Reply::History { messages, has_more } => {
            // Pages come newest first; a conversation reads oldest first.
            let list = messages
                .iter()
                .rev()
                .map(|m| {
                    remember_message(app, m.id, m.room);
                    let (sender, receiver) = if &m.sender == me {
                        (Some(&profile), &other)
                    } else {
                        (Some(&peer.profile).filter(|p| p.id == m.sender), me)
                    };
                    codec::message_data(
                        m,
                        Some(receiver),
                        Some(codec::SenderView::of(&m.sender, sender)),
                    )
                })
                .collect();
            Ok(codec::success_body(codec::MessagesPage {
                messages: list,
                limit: page.limit,
                offset: page.offset,
                has_more,
            }))
        }
        other => Err(unexpected(&other)),
    }
}
