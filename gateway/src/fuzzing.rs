//! Entry points for the fuzz targets (`fuzz/`) and the property tests: each runs one family of
//! decoders a client can reach on an arbitrary input, exactly as the server runs them, and
//! returns a digest of what they decided (so a target can check that decoding is a pure
//! function). Nothing here is part of the public API.
#![doc(hidden)]

use crate::dialect::socketio::{notifyhub, syarah};
use crate::uploads::{self, MediaKind};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart};
use serde_json::{Map, Value};

/// The seed REST routes' JSON bodies and query strings (native REST, the Syarah REST routes)
/// and the event/data dialect's `*.php` bodies (JSON or form) and queries.
pub fn rest_body(content_type: Option<&str>, body: &[u8]) -> String {
    let bytes = Bytes::copy_from_slice(body);
    let object = crate::rest::body_object(&bytes).map(|m| m.len());
    let query = std::str::from_utf8(body)
        .map(|q| crate::rest::query_object(Some(q.to_owned())).map(|m| m.len()));
    let params = crate::dialect::events::codec::body_params(content_type, body).map(|p| p.len());
    let php_query = std::str::from_utf8(body)
        .map(|q| crate::dialect::events::codec::query_params(Some(q)).map(|p| p.len()));
    format!("{object:?} {query:?} {params:?} {php_query:?}")
}

/// A Socket.IO event as Palaver reads it: `data` is the event's first argument decoded as
/// JSON (or the decode error), for both Socket.IO dialects.
pub fn socketio_event(event: &str, data: &Result<Value, String>) -> String {
    let notifyhub = notifyhub::send_args(data).map(|(t, r)| (t.len(), r));
    let empty = Map::new();
    let args = match data {
        Ok(Value::Object(m)) => m,
        _ => &empty,
    };
    let room = syarah::room_arg(args).map(|r| r.0);
    let id = args
        .get("id")
        .map(|v| syarah::message_id(v, "id").map(|m| m.0));
    let limit = syarah::opt_u32(args, &["limit", "Limit"]);
    let text = syarah::text_arg(args, &["message", "Message"]).map(|t| t.map(|t| t.len()));
    let other = args.get("otherUserId").map(syarah::id_string);
    let ids = match args.get("ids") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| syarah::message_id(v, "ids").map(|m| m.0))
            .collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    format!("{event} {notifyhub:?} {room:?} {id:?} {limit:?} {text:?} {other:?} {ids:?}")
}

/// The upload checks on a body's first bytes and on the form fields that name its kind.
pub fn upload_head(kind: u8, head: &[u8], field: &str) -> String {
    let kind = match kind % 5 {
        0 => MediaKind::Image,
        1 => MediaKind::Audio,
        2 => MediaKind::Voice,
        3 => MediaKind::Video,
        _ => MediaKind::File,
    };
    let sniffed = uploads::sniff(head);
    let content = uploads::kind_of_content(sniffed.as_ref());
    let checked = uploads::check_head(kind, head).map_err(|e| e.to_string());
    let named = MediaKind::parse(field);
    let message_type = uploads::parse_message_type(Some(field)).map_err(|e| e.to_string());
    let duration = uploads::parse_duration(Some(field)).map_err(|e| e.to_string());
    let ext = uploads::sanitized_extension(Some(field));
    let ctype = uploads::content_type(ext.as_deref());
    let range = uploads::parse_range(field, head.len() as u64);
    let rel = uploads::check_rel(field).map_err(|e| e.to_string());
    let voice = crate::dialect::events::codec::voice_file_name(Some(field), Some(field));
    format!(
        "{:?} {content:?} {checked:?} {named:?} {message_type:?} {duration:?} {ext:?} {ctype} \
         {range:?} {rel:?} {voice:?}",
        sniffed.map(|s| s.ext)
    )
}

/// A multipart body (boundary `fuzz`) read field by field through the same extractor the
/// upload routes use, each field's name and text put through the form-field parsers. Field
/// bodies are read in chunks and only counted, as the upload routes stream them.
pub fn multipart(body: &[u8]) -> String {
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/uploads")
        .header("content-type", "multipart/form-data; boundary=fuzz")
        .body(Body::from(body.to_vec()));
    let Ok(request) = request else {
        return "no request".into();
    };
    futures::executor::block_on(async move {
        let mut form = match Multipart::from_request(request, &()).await {
            Ok(f) => f,
            Err(e) => return format!("rejected {e}"),
        };
        let mut out = String::new();
        // A bound like the routes': a body cannot make the loop run forever.
        for _ in 0..64 {
            let mut field = match form.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    out.push_str(&format!(" error {e}"));
                    break;
                }
            };
            let name = field.name().unwrap_or_default().to_owned();
            let file = field.file_name().map(str::to_owned);
            let ctype = field.content_type().map(str::to_owned);
            let mut head = Vec::new();
            let mut size = 0usize;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        size += chunk.len();
                        if head.len() < 64 {
                            head.extend_from_slice(&chunk[..chunk.len().min(64 - head.len())]);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        out.push_str(&format!(" chunk error {e}"));
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            out.push_str(&format!(
                " [{name} {size} {} {:?} {:?}]",
                upload_head(name.len() as u8, &head, &text),
                uploads::sanitized_extension(file.as_deref()),
                crate::dialect::events::codec::voice_file_name(file.as_deref(), ctype.as_deref()),
            ));
        }
        out
    })
}
