//! Uploaded media: the reusable [`Uploads`] service, the native `POST /v1/uploads`, the Syarah
//! route `POST /api/chat/uploadFile` (seed 001) and `GET /uploads/{*path}`, which serves a
//! stored file to its uploader and to the members of the rooms it was posted in.
//!
//! # Kinds, limits and sniffing
//!
//! | kind | `messageType` | directory | limit, `PALAVER_UPLOAD_MAX_*_BYTES` (default) | content |
//! |---|---|---|---|---|
//! | image | 2 | `images` | `IMAGE` (10 MiB, before conversion) | PNG, JPEG, GIF, WebP, BMP; stored as WebP |
//! | audio | 1 | `audios` | `AUDIO` (`FILE` when unset, else 50 MiB) | mp3 wav ogg (opus) m4a aac flac wma |
//! | voice | - | `audios` | `VOICE` (20 MiB) | the audio formats and WebM/Matroska (a browser's recorder) |
//! | video | 4 | `videos` | `VIDEO` (500 MiB) | mp4 (m4v) mov avi wmv flv webm mkv |
//! | file | 3 | `files` | `FILE` (50 MiB) | anything |
//!
//! What a body is comes from its first [`SNIFF_LEN`] bytes ([`sniff`]: the `infer` crate's magic
//! numbers, plus MPEG audio frames without an ID3 tag and any ISO-BMFF `ftyp` box), never from
//! the client's file name or claimed Content-Type. When the kind is named (native `kind`, the
//! seed's `messageType`) the content must be of that kind: an ELF executable named `photo.png`
//! sent as an image is refused with 415 `content is application/x-executable, not an image
//! (PNG, JPEG, GIF, WebP or BMP)`, before the rest of its body is read. Without a kind (native
//! only) the kind is the content's. Bytes no magic number recognises are refused as an image
//! (400 `image could not be decoded: ...`, a corrupt image), audio, voice or video (415), and
//! accepted as a file.
//!
//! The stored extension is the content's (an `.mp3` is an MP3), so the Content-Type served from
//! it is right; a `file` keeps the client's extension only when nothing was recognised and that
//! extension does not claim image, audio or video; a recognised program (ELF, PE, Mach-O, Java
//! class, wasm, dex) is stored as `.bin` (`application/octet-stream`, served as an attachment).
//!
//! Images are decoded under [`image::Limits`] (at most [`MAX_IMAGE_SIDE`] pixels a side,
//! [`MAX_IMAGE_PIXELS`] pixels and [`MAX_DECODE_ALLOC`] bytes, so a decompression bomb is
//! refused from its header before anything is allocated), turned upright by their EXIF
//! orientation, shrunk to fit within [`IMAGE_FIT`] x [`IMAGE_FIT`] keeping the aspect ratio, and
//! re-encoded as lossless WebP from the decoded pixels only: no EXIF, XMP, ICC or other chunk of
//! the original survives. That CPU work runs on the blocking pool, at most one conversion per
//! core (and at most 4) at a time. An animated GIF keeps its first frame.
//!
//! # Storage
//!
//! Bodies are streamed into a temporary file in `<data_dir>/uploads/.incoming/` while their
//! bytes are counted against the limit (nothing is held whole in memory), then put into the
//! blob store behind [`object_store`] under `<area>/<kind dir>/<128 random bits>.<ext>`; the
//! public path is the same with a leading `/uploads/`. The blob store is a `LocalFileSystem`
//! rooted at `<data_dir>/uploads` (the temporary file is renamed into place), or an
//! S3-compatible bucket ([`UploadStorage::S3`]; the file is streamed up in
//! [`S3_PART_SIZE`]-byte parts). Each stored file is then recorded for its uploader
//! (`Command::AddUpload`); if that fails the file is deleted and the upload answered 503. A
//! refused, failed or abandoned upload leaves nothing: the temporary file is deleted when it is
//! dropped.
//!
//! # Serving
//!
//! `GET /uploads/{*path}` needs a valid token (`Authorization: Bearer` or `?token=`), then asks
//! the node (`Command::MediaAccess`) whether the caller is the uploader or a member of a room
//! where the file was posted: 403 when not, 404 when no upload is recorded at that path (files
//! stored before uploads were recorded are not served). It answers with the Content-Type of the
//! extension, `Accept-Ranges: bytes` and single byte ranges (206; 416 when unsatisfiable), and
//! streams the object from the blob store. Paths with `..`, a leading `.` in any segment, an
//! empty segment, a backslash or a control character are refused with 400. Anything that is not
//! image, audio or video is sent as an attachment, and every answer carries
//! `X-Content-Type-Options: nosniff` and a sandboxing Content-Security-Policy.
//!
//! # The upload routes
//!
//! `POST /v1/uploads` (native): `multipart/form-data` with `file`, optional `kind` and
//! `duration`; 201 `{"upload": {"path", "kind", "size", "content_type", "duration"?}}`, errors
//! `{"error": {"code", "message"}}`. `POST /api/chat/uploadFile` (Syarah): `file` and
//! `messageType` (1 to 4); `{"success": true, "data": "<path>", "message": null}` or
//! `{"success": false, "data": null, "message": "<reason>"}`. Both check the token before the
//! body is read, lift the router's small body limit and cap the whole request at the largest
//! upload limit plus [`FORM_OVERHEAD`].

use crate::config::Config;
use crate::server::{ApiError, App, authenticate, bearer, error_response};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, Multipart, MultipartError};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as BlobPath;
use schema::{Command, Error, ErrorCode, Reply, UserId};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// The area of chat message media (the seed's `/uploads/chat-messages/...`).
pub const CHAT_MESSAGES: &str = "chat-messages";
/// Images are shrunk to fit within this many pixels on each side.
pub const IMAGE_FIT: u32 = 1920;
/// Widest or tallest image accepted for decoding.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most pixels of an image accepted for decoding (about 100 megapixels).
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;
/// Most bytes a decoder may allocate for one image.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;
/// Bytes a form may carry beyond its file (boundaries, headers, `messageType`).
pub const FORM_OVERHEAD: u64 = 64 * 1024;
/// How many of the first bytes of a body decide what it is.
pub const SNIFF_LEN: usize = 8192;
/// Size of the parts a file is streamed to an S3-compatible store in (files up to this size go
/// up in one request).
pub const S3_PART_SIZE: usize = 8 * 1024 * 1024;
/// Directory under the local uploads root where bodies are received.
const INCOMING: &str = ".incoming";
/// Longest kept extension.
const MAX_EXT_LEN: usize = 10;
/// After a refused upload, at most this much of the rest of the body is read (and discarded)
/// so that the client, still sending, gets the answer instead of a reset connection.
const DRAIN_MAX: u64 = 8 * 1024 * 1024;
/// ... and for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Parts of a multipart upload to S3 in flight at once.
const S3_PARTS_IN_FLIGHT: usize = 2;

const MIB: u64 = 1024 * 1024;

/// Image formats the converter reads, as [`sniff`] names them.
const CONVERTIBLE: &[&str] = &["png", "jpg", "gif", "webp", "bmp"];

/// What an upload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediaKind {
    /// `messageType` 1.
    Audio,
    /// `messageType` 2: converted to WebP.
    Image,
    /// `messageType` 3: any type.
    File,
    /// `messageType` 4.
    Video,
    /// A voice message (native `kind: "voice"`, seed 004's `voice`): audio, or WebM.
    Voice,
}

impl MediaKind {
    /// Every kind.
    pub const ALL: [MediaKind; 5] = [
        MediaKind::Image,
        MediaKind::Audio,
        MediaKind::Video,
        MediaKind::File,
        MediaKind::Voice,
    ];

    /// The kind of a seed `messageType` (1 to 4).
    pub fn from_message_type(n: i64) -> Option<Self> {
        match n {
            1 => Some(Self::Audio),
            2 => Some(Self::Image),
            3 => Some(Self::File),
            4 => Some(Self::Video),
            _ => None,
        }
    }

    /// The kind named `name` (`image`, `audio`, `video`, `file`, `voice`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The seed's `messageType` of this kind (a voice message is audio).
    pub fn message_type(self) -> i64 {
        match self {
            Self::Audio | Self::Voice => 1,
            Self::Image => 2,
            Self::File => 3,
            Self::Video => 4,
        }
    }

    /// Lower-case name, as used in messages and in upload records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Image => "image",
            Self::File => "file",
            Self::Video => "video",
            Self::Voice => "voice",
        }
    }

    /// The directory of this kind inside an area (voice messages sit with audio).
    pub fn dir(self) -> &'static str {
        match self {
            Self::Audio | Self::Voice => "audios",
            Self::Image => "images",
            Self::File => "files",
            Self::Video => "videos",
        }
    }

    /// Whether an upload of this kind may carry a duration.
    pub fn has_duration(self) -> bool {
        matches!(self, Self::Audio | Self::Video | Self::Voice)
    }

    /// File-name extensions the seeds accept for this kind; `None` for any. Only the seed 004
    /// shim still checks names (as the seed did), before the content decides.
    pub fn extensions(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Audio | Self::Voice => Some(&["mp3", "wav", "ogg", "m4a", "aac", "flac", "wma"]),
            Self::Video => Some(&["mp4", "avi", "mov", "wmv", "flv", "webm", "mkv"]),
            Self::Image | Self::File => None,
        }
    }

    /// What content this kind takes, for error messages.
    fn described(self) -> &'static str {
        match self {
            Self::Image => "an image (PNG, JPEG, GIF, WebP or BMP)",
            Self::Audio => "audio (mp3, wav, ogg, m4a, aac, flac or wma)",
            Self::Voice => "a voice recording (mp3, wav, ogg, m4a, aac, flac, wma or webm)",
            Self::Video => "a video (mp4, avi, mov, wmv, flv, webm or mkv)",
            Self::File => "a file",
        }
    }
}

/// Size limits per kind, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    /// Files (`PALAVER_UPLOAD_MAX_FILE_BYTES`, default 50 MiB).
    pub max_file_bytes: u64,
    /// Audio (`PALAVER_UPLOAD_MAX_AUDIO_BYTES`; default `PALAVER_UPLOAD_MAX_FILE_BYTES` when
    /// that is set, else 50 MiB).
    pub max_audio_bytes: u64,
    /// Voice messages (`PALAVER_UPLOAD_MAX_VOICE_BYTES`, default 20 MiB).
    pub max_voice_bytes: u64,
    /// Video (`PALAVER_UPLOAD_MAX_VIDEO_BYTES`, default 500 MiB).
    pub max_video_bytes: u64,
    /// Image input, before conversion (`PALAVER_UPLOAD_MAX_IMAGE_BYTES`, default 10 MiB).
    pub max_image_bytes: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 50 * MIB,
            max_audio_bytes: 50 * MIB,
            max_voice_bytes: 20 * MIB,
            max_video_bytes: 500 * MIB,
            max_image_bytes: 10 * MIB,
        }
    }
}

impl UploadLimits {
    /// The limit of `kind`.
    pub fn max_for(&self, kind: MediaKind) -> u64 {
        match kind {
            MediaKind::Audio => self.max_audio_bytes,
            MediaKind::Voice => self.max_voice_bytes,
            MediaKind::File => self.max_file_bytes,
            MediaKind::Image => self.max_image_bytes,
            MediaKind::Video => self.max_video_bytes,
        }
    }

    /// The largest of the limits: what a body of a kind not known yet may reach.
    pub fn largest(&self) -> u64 {
        MediaKind::ALL
            .into_iter()
            .map(|k| self.max_for(k))
            .max()
            .unwrap_or(0)
    }
}

/// Where stored files are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum UploadStorage {
    /// A local directory, `<data_dir>/uploads` (the default).
    #[default]
    Local,
    /// An S3-compatible bucket (`PALAVER_UPLOAD_S3_BUCKET`).
    S3(S3Storage),
}

/// An S3-compatible bucket. Credentials and every other setting come from the standard `AWS_*`
/// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, ...), which these fields override.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct S3Storage {
    /// The bucket (`PALAVER_UPLOAD_S3_BUCKET`).
    pub bucket: String,
    /// The endpoint of a store other than AWS, e.g. `http://minio:9000`
    /// (`PALAVER_UPLOAD_S3_ENDPOINT`); paths are then path-style.
    pub endpoint: Option<String>,
    /// The region (`PALAVER_UPLOAD_S3_REGION`).
    pub region: Option<String>,
}

/// Why an upload or a read of a stored file failed. [`UploadError::status`] is its HTTP
/// status; its text is the precise reason, fit for clients.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The body exceeded a limit (`kind` is `None` when no kind was known yet).
    #[error("{}", too_large(*.kind, *.limit))]
    TooLarge {
        /// The kind whose limit was exceeded, if known.
        kind: Option<MediaKind>,
        /// The limit, in bytes.
        limit: u64,
    },
    /// The client's file name does not have an accepted extension for the kind (seed 004 only).
    #[error(
        "{} files must have one of the extensions {}; got {}",
        .kind.name(),
        .allowed.join(", "),
        .got.as_deref().map_or("none".to_owned(), |e| format!("\"{e}\""))
    )]
    BadExtension {
        /// The kind.
        kind: MediaKind,
        /// Accepted extensions.
        allowed: &'static [&'static str],
        /// The sanitised extension received, if any.
        got: Option<String>,
    },
    /// The content was recognised as something that is not of the requested kind.
    #[error("content is {found}, not {}", .kind.described())]
    WrongContent {
        /// The requested kind.
        kind: MediaKind,
        /// What the content is (a media type).
        found: &'static str,
    },
    /// Nothing recognised the content, and the kind needs a known format.
    #[error("content is not recognised as {}", .kind.described())]
    Unrecognised {
        /// The requested kind.
        kind: MediaKind,
    },
    /// An image in a format the converter cannot read.
    #[error("content is {0}, which cannot be converted: send PNG, JPEG, GIF, WebP or BMP")]
    Unconvertible(&'static str),
    /// The image could not be decoded or converted.
    #[error("image could not be decoded: {0}")]
    Undecodable(String),
    /// The image is larger than the decoder accepts (dimensions or memory).
    #[error("image is too large to convert: {0}")]
    ImageTooLarge(String),
    /// The uploaded body is empty.
    #[error("empty file: the file has no bytes")]
    Empty,
    /// The request body could not be read, or a form field is wrong.
    #[error("{message}")]
    Body {
        /// Status to answer.
        status: StatusCode,
        /// Why.
        message: String,
    },
    /// A stored path that is not acceptable (traversal, hidden, control characters).
    #[error("invalid upload path: {0}")]
    InvalidPath(&'static str),
    /// No such stored file.
    #[error("no such file")]
    NotFound,
    /// The area name given to [`Uploads::finish`] is not a plain directory name.
    #[error("invalid upload area {0:?}")]
    InvalidArea(String),
    /// The upload could not be recorded; the file was removed.
    #[error("the upload could not be recorded: {0}")]
    Unrecorded(String),
    /// A storage failure (local files).
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
    /// A storage failure (the blob store).
    #[error("blob store error: {0}")]
    Blob(#[from] object_store::Error),
}

fn too_large(kind: Option<MediaKind>, limit: u64) -> String {
    match kind {
        Some(k) => format!("{} files may be at most {}", k.name(), ByteCount(limit)),
        None => format!("the upload may be at most {}", ByteCount(limit)),
    }
}

/// A byte count shown with its MiB equivalent when round.
struct ByteCount(u64);

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= MIB && self.0.is_multiple_of(MIB) {
            write!(f, "{} bytes ({} MiB)", self.0, self.0 / MIB)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

impl UploadError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } | Self::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::WrongContent { .. } | Self::Unrecognised { .. } | Self::Unconvertible(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::BadExtension { .. }
            | Self::Undecodable(_)
            | Self::Empty
            | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::Body { status, .. } => *status,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unrecorded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidArea(_) | Self::Io(_) | Self::Blob(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The native error code of this error.
    pub fn code(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => ErrorCode::InvalidField.as_str(),
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized.as_str(),
            StatusCode::NOT_FOUND => ErrorCode::NotFound.as_str(),
            StatusCode::PAYLOAD_TOO_LARGE => "file_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable.as_str(),
            _ => ErrorCode::Internal.as_str(),
        }
    }

    /// The text shown to clients: the reason, except for storage failures, which are logged
    /// and shown as "the file could not be stored".
    pub fn client_message(&self) -> String {
        if self.status() == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %self, "upload storage failure");
            return "the file could not be stored".to_owned();
        }
        self.to_string()
    }
}

// ------------------------------------------------------------------------------------------
// Sniffing
// ------------------------------------------------------------------------------------------

/// What the first bytes of a body say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sniffed {
    /// Its media type, e.g. `image/png`.
    pub mime: &'static str,
    /// Its usual extension, e.g. `png`.
    pub ext: &'static str,
    /// A program: ELF, PE, Mach-O, Java class, wasm, dex and the like.
    pub executable: bool,
}

/// What `head` (the first bytes of a body, up to [`SNIFF_LEN`]) is, by magic numbers: the
/// `infer` crate's, then MPEG audio frames without an ID3 tag, then any ISO base media file
/// (an `ftyp` box: MP4 family). `None` when nothing matches (text, unknown or random bytes).
pub fn sniff(head: &[u8]) -> Option<Sniffed> {
    if let Some(t) = infer::get(head) {
        return Some(Sniffed {
            mime: t.mime_type(),
            ext: t.extension(),
            executable: t.matcher_type() == infer::MatcherType::App,
        });
    }
    // An MPEG audio frame header: 11 sync bits, any version, layer III.
    if head.len() >= 4 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 && head[1] & 0x06 == 0x02 {
        return Some(Sniffed {
            mime: "audio/mpeg",
            ext: "mp3",
            executable: false,
        });
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        return Some(Sniffed {
            mime: "video/mp4",
            ext: "mp4",
            executable: false,
        });
    }
    None
}

/// The stored extension of audio content (`voice` also takes WebM/Matroska).
fn audio_ext(s: &Sniffed, voice: bool) -> Option<&'static str> {
    Some(match s.ext {
        "mp3" => "mp3",
        "wav" => "wav",
        "ogg" | "opus" => "ogg",
        // An MP4-family container holding audio (phones often brand it `isom` or `mp42`).
        "m4a" | "mp4" | "m4v" => "m4a",
        "aac" => "aac",
        "flac" => "flac",
        // ASF: WMA and WMV share the container.
        "wmv" => "wma",
        "webm" | "mkv" if voice => "webm",
        _ => return None,
    })
}

/// The stored extension of video content.
fn video_ext(s: &Sniffed) -> Option<&'static str> {
    Some(match s.ext {
        "mp4" | "m4v" => "mp4",
        "mov" => "mov",
        "avi" => "avi",
        "wmv" => "wmv",
        "flv" => "flv",
        "webm" => "webm",
        "mkv" => "mkv",
        _ => return None,
    })
}

/// The kind of content when the client named none.
pub fn kind_of_content(sniffed: Option<&Sniffed>) -> MediaKind {
    match sniffed {
        Some(s) if CONVERTIBLE.contains(&s.ext) => MediaKind::Image,
        Some(s) if s.mime.starts_with("audio/") && audio_ext(s, false).is_some() => {
            MediaKind::Audio
        }
        Some(s) if video_ext(s).is_some() => MediaKind::Video,
        _ => MediaKind::File,
    }
}

/// Checks content against `kind` and names the extension it is stored under (images: before
/// conversion, the sniffed one). `client_ext` is the sanitised extension of the client's file
/// name, used only for unrecognised files.
fn accept(
    kind: MediaKind,
    sniffed: Option<&Sniffed>,
    client_ext: Option<&str>,
) -> Result<String, UploadError> {
    let wrong = |s: &Sniffed| UploadError::WrongContent {
        kind,
        found: s.mime,
    };
    let ext = match (kind, sniffed) {
        (MediaKind::Image, Some(s)) if CONVERTIBLE.contains(&s.ext) => s.ext,
        (MediaKind::Image, Some(s)) if s.mime.starts_with("image/") => {
            return Err(UploadError::Unconvertible(s.mime));
        }
        (MediaKind::Image, None) => {
            return Err(UploadError::Undecodable(
                "not a PNG, JPEG, GIF, WebP or BMP image".into(),
            ));
        }
        (MediaKind::Audio | MediaKind::Voice, Some(s)) => {
            audio_ext(s, kind == MediaKind::Voice).ok_or_else(|| wrong(s))?
        }
        (MediaKind::Video, Some(s)) => video_ext(s).ok_or_else(|| wrong(s))?,
        (MediaKind::File, Some(s)) if s.executable => "bin",
        (MediaKind::File, Some(s)) => s.ext,
        (MediaKind::File, None) => {
            // The client's extension, unless it claims media the content is not.
            return Ok(match client_ext {
                Some(e) if !is_inline(content_type(Some(e))) => e.to_owned(),
                _ => "bin".to_owned(),
            });
        }
        (_, Some(s)) => return Err(wrong(s)),
        (_, None) => return Err(UploadError::Unrecognised { kind }),
    };
    Ok(ext.to_owned())
}

/// Checks what has been received so far of a body named as `kind`: refused early, before the
/// rest is read, when its first bytes already say it is something else.
pub(crate) fn check_head(kind: MediaKind, head: &[u8]) -> Result<(), UploadError> {
    accept(kind, sniff(head).as_ref(), None).map(|_| ())
}

// ------------------------------------------------------------------------------------------
// The service
// ------------------------------------------------------------------------------------------

/// A stored file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUpload {
    /// Public path, e.g. `/uploads/chat-messages/images/<name>.webp`.
    pub path: String,
    /// The kind.
    pub kind: MediaKind,
    /// Size of the stored file, in bytes.
    pub bytes: u64,
    /// Content-Type it is served with.
    pub content_type: &'static str,
}

impl StoredUpload {
    /// The path relative to the uploads root (the blob store's key).
    fn key(&self) -> &str {
        self.path.strip_prefix("/uploads/").unwrap_or(&self.path)
    }
}

/// A body received into a temporary file, not yet stored. Dropping it deletes the file.
#[derive(Debug)]
pub struct Incoming {
    temp: TempFile,
    bytes: u64,
    head: Vec<u8>,
}

impl Incoming {
    /// Bytes received.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What the body is, by its first bytes.
    pub fn sniffed(&self) -> Option<Sniffed> {
        sniff(&self.head)
    }
}

/// A file deleted on drop unless kept: a failed, refused or abandoned upload leaves nothing.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        Self { path, keep: false }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Small and rare (failures only): a synchronous unlink is fine here.
            if let Err(e) = std::fs::remove_file(&self.path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
            }
        }
    }
}

/// At most one image conversion per core (and 4) at a time: each may hold hundreds of MiB.
static CONVERSIONS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
    Arc::new(Semaphore::new(
        std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
    ))
});

/// An opened blob store; `local` is its root directory when it is a local one.
struct Blobs {
    store: Arc<dyn ObjectStore>,
    local: Option<Arc<object_store::local::LocalFileSystem>>,
}

/// Blob stores by configuration: built once per process and shared (an S3 client keeps its
/// connection pool).
static BLOBS: LazyLock<Mutex<BlobCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Open blob stores by uploads root and storage settings.
type BlobCache = HashMap<(PathBuf, UploadStorage), Arc<Blobs>>;

fn open_blobs(root: &FsPath, storage: &UploadStorage) -> Result<Arc<Blobs>, UploadError> {
    let key = (root.to_owned(), storage.clone());
    let mut cache = BLOBS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(b) = cache.get(&key) {
        return Ok(b.clone());
    }
    let blobs = match storage {
        UploadStorage::Local => {
            // Once per process and root: a blocking mkdir is fine here.
            std::fs::create_dir_all(root)?;
            let fs = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root)?);
            Blobs {
                store: fs.clone(),
                local: Some(fs),
            }
        }
        UploadStorage::S3(s3) => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&s3.bucket);
            if let Some(e) = &s3.endpoint {
                b = b
                    .with_endpoint(e)
                    .with_allow_http(e.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            Blobs {
                store: Arc::new(b.build()?),
                local: None,
            }
        }
    };
    let blobs = Arc::new(blobs);
    cache.insert(key, blobs.clone());
    Ok(blobs)
}

/// The upload store: where files go, and how big they may be. Cheap to build (a path, the
/// limits and the storage settings; the blob store itself is opened once per process), so
/// routes build one per request from the configuration.
#[derive(Clone, Debug)]
pub struct Uploads {
    root: PathBuf,
    limits: UploadLimits,
    storage: UploadStorage,
}

impl Uploads {
    /// Uploads stored under `<data_dir>/uploads`.
    pub fn new(data_dir: &FsPath, limits: UploadLimits) -> Self {
        Self {
            root: data_dir.join("uploads"),
            limits,
            storage: UploadStorage::Local,
        }
    }

    /// Uploads kept in `storage`, received under `<data_dir>/uploads/.incoming`.
    pub fn with_storage(data_dir: &FsPath, limits: UploadLimits, storage: UploadStorage) -> Self {
        Self {
            storage,
            ..Self::new(data_dir, limits)
        }
    }

    /// The configured store.
    pub fn from_config(config: &Config) -> Self {
        Self::with_storage(
            &config.data_dir,
            config.uploads,
            config.upload_storage.clone(),
        )
    }

    /// The local uploads root directory (the local blob store, and the temporary files).
    pub fn root(&self) -> &FsPath {
        &self.root
    }

    /// The size limits.
    pub fn limits(&self) -> &UploadLimits {
        &self.limits
    }

    fn blobs(&self) -> Result<Arc<Blobs>, UploadError> {
        open_blobs(&self.root, &self.storage)
    }

    /// Checks the client's file name against the kind's extensions (seed 004 only: the seed
    /// checked names; everywhere else the content decides). Voice files are checked against the
    /// audio extensions and refused as audio. Returns the sanitised extension.
    pub fn check_name(
        &self,
        kind: MediaKind,
        file_name: Option<&str>,
    ) -> Result<Option<String>, UploadError> {
        let ext = sanitized_extension(file_name);
        if let Some(allowed) = kind.extensions()
            && !ext.as_deref().is_some_and(|e| allowed.contains(&e))
        {
            let kind = if kind == MediaKind::Voice {
                MediaKind::Audio
            } else {
                kind
            };
            return Err(UploadError::BadExtension {
                kind,
                allowed,
                got: ext,
            });
        }
        Ok(ext)
    }

    /// Receives a body into a temporary file, refusing it once it exceeds `limit` bytes, or as
    /// soon as its first [`SNIFF_LEN`] bytes show it is not of `kind` (when given).
    pub async fn receive<S>(
        &self,
        body: S,
        limit: u64,
        kind: Option<MediaKind>,
    ) -> Result<Incoming, UploadError>
    where
        S: Stream<Item = Result<Bytes, UploadError>>,
    {
        let dir = self.root.join(INCOMING);
        tokio::fs::create_dir_all(&dir).await?;
        let temp = TempFile::new(dir.join(format!("{}.part", random_name())));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await?;
        let mut body = std::pin::pin!(body);
        let mut bytes = 0u64;
        let mut head = Vec::with_capacity(SNIFF_LEN);
        let mut checked = kind.is_none();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes = bytes.saturating_add(chunk.len() as u64);
            if bytes > limit {
                return Err(UploadError::TooLarge { kind, limit });
            }
            if head.len() < SNIFF_LEN {
                let n = (SNIFF_LEN - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..n]);
            }
            if !checked && head.len() == SNIFF_LEN {
                checked = true;
                if let Some(k) = kind {
                    check_head(k, &head)?;
                }
            }
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        Ok(Incoming { temp, bytes, head })
    }

    /// The kind a received body is stored as: `requested`, or the content's.
    pub fn kind_for(&self, incoming: &Incoming, requested: Option<MediaKind>) -> MediaKind {
        requested.unwrap_or_else(|| kind_of_content(incoming.sniffed().as_ref()))
    }

    /// Stores a received body in `area` (a plain directory name such as [`CHAT_MESSAGES`]) as
    /// `kind`, or as what its content is when `None`: checks its size and content, converts
    /// images to WebP, and puts it in the blob store under a random name. Not recorded: see
    /// [`Uploads::save`].
    pub async fn finish(
        &self,
        incoming: Incoming,
        area: &str,
        kind: Option<MediaKind>,
        file_name: Option<&str>,
    ) -> Result<StoredUpload, UploadError> {
        if !is_plain_segment(area) {
            return Err(UploadError::InvalidArea(area.to_owned()));
        }
        if incoming.bytes == 0 {
            return Err(UploadError::Empty);
        }
        let sniffed = incoming.sniffed();
        let kind = kind.unwrap_or_else(|| kind_of_content(sniffed.as_ref()));
        let limit = self.limits.max_for(kind);
        if incoming.bytes > limit {
            return Err(UploadError::TooLarge {
                kind: Some(kind),
                limit,
            });
        }
        let client_ext = sanitized_extension(file_name);
        let ext = accept(kind, sniffed.as_ref(), client_ext.as_deref())?;
        let blobs = self.blobs()?;
        let (temp, ext) = match kind {
            MediaKind::Image => {
                let out = TempFile::new(
                    self.root
                        .join(INCOMING)
                        .join(format!("{}.webp.part", random_name())),
                );
                (self.convert(incoming.temp, out).await?, "webp".to_owned())
            }
            _ => (incoming.temp, ext),
        };
        let bytes = tokio::fs::metadata(&temp.path).await?.len();
        let name = format!("{}.{ext}", random_name());
        let key = format!("{area}/{}/{name}", kind.dir());
        put(&blobs, temp, &key).await?;
        Ok(StoredUpload {
            path: format!("/uploads/{key}"),
            kind,
            bytes,
            content_type: content_type(Some(&ext)),
        })
    }

    /// [`Uploads::finish`], then records the upload for `uploader` (`Command::AddUpload`); if
    /// that fails the stored file is deleted and the answer is [`UploadError::Unrecorded`].
    pub async fn save(
        &self,
        app: &App,
        uploader: &UserId,
        incoming: Incoming,
        area: &str,
        kind: Option<MediaKind>,
        file_name: Option<&str>,
    ) -> Result<StoredUpload, UploadError> {
        let stored = self.finish(incoming, area, kind, file_name).await?;
        let upload = schema::Upload {
            path: stored.path.clone(),
            uploader: uploader.clone(),
            kind: stored.kind.name().to_owned(),
            size: stored.bytes,
            content_type: stored.content_type.to_owned(),
            created_at: now_ms(),
        };
        match app
            .node
            .execute(uploader, Command::AddUpload { upload })
            .await
        {
            Ok(_) => Ok(stored),
            Err(e) => {
                tracing::warn!(path = %stored.path, error = %e, "upload not recorded; removing it");
                self.remove(&stored).await;
                Err(UploadError::Unrecorded(e.message))
            }
        }
    }

    /// Deletes a stored file (a send that failed after its upload), logging a failure.
    pub async fn remove(&self, stored: &StoredUpload) {
        let result = match self.blobs() {
            Ok(b) => match BlobPath::parse(stored.key()) {
                Ok(key) => b.store.delete(&key).await.map_err(UploadError::from),
                Err(_) => Err(UploadError::InvalidPath("not a blob key")),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(path = %stored.path, error = %e, "cannot remove upload");
        }
    }

    /// Converts the image in `input` to WebP in `out` on the blocking pool.
    async fn convert(&self, input: TempFile, out: TempFile) -> Result<TempFile, UploadError> {
        let slot = CONVERSIONS
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| UploadError::Io(std::io::Error::other(e)))?;
        // The closure owns both temp files and the slot: if this request is abandoned while it
        // runs, the slot stays taken until it ends, and its result (so the files) is dropped.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            convert_to_webp(&input.path, &out.path)?;
            drop(input);
            Ok(out)
        })
        .await
        .map_err(|e| UploadError::Io(std::io::Error::other(e)))?
    }

    /// The local file of a stored path (relative to the uploads root, e.g.
    /// `chat-messages/images/x.webp`), refusing traversal and hidden segments.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, UploadError> {
        check_rel(rel)?;
        let mut path = self.root.clone();
        path.extend(rel.split('/'));
        Ok(path)
    }

    /// Opens a stored file for reading `range` (inclusive) of it, or all of it: the body, the
    /// range served (`None`: all), the file's length and its Content-Type. An unsatisfiable
    /// range is `Err(Ok(len))`.
    async fn open(
        &self,
        rel: &str,
        range: Option<&str>,
    ) -> Result<Opened, Result<u64, UploadError>> {
        check_rel(rel).map_err(Err)?;
        let key = BlobPath::parse(rel).map_err(|_| Err(UploadError::InvalidPath("bad path")))?;
        let blobs = self.blobs().map_err(Err)?;
        let not_found = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => UploadError::NotFound,
            other => UploadError::Blob(other),
        };
        let meta = blobs
            .store
            .head(&key)
            .await
            .map_err(|e| Err(not_found(e)))?;
        let len = meta.size;
        let range = match range {
            None => None,
            Some(r) => parse_range(r, len).map_err(|()| Ok(len))?,
        };
        let options = object_store::GetOptions {
            range: range.map(|(a, b)| object_store::GetRange::Bounded(a..b + 1)),
            ..Default::default()
        };
        let got = blobs
            .store
            .get_opts(&key, options)
            .await
            .map_err(|e| Err(not_found(e)))?;
        let ext = rel.rsplit_once('.').map(|(_, e)| e);
        Ok(Opened {
            body: got.into_stream(),
            range,
            len,
            content_type: content_type(ext),
        })
    }
}

/// A stored file opened for serving.
struct Opened {
    body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    range: Option<(u64, u64)>,
    len: u64,
    content_type: &'static str,
}

/// Puts the file `temp` into the blob store at `key`: a rename into place on a local store; on
/// S3 one request up to [`S3_PART_SIZE`], else a multipart upload streamed from the file.
async fn put(blobs: &Blobs, mut temp: TempFile, key: &str) -> Result<(), UploadError> {
    let location = BlobPath::parse(key).map_err(|_| UploadError::InvalidArea(key.to_owned()))?;
    if let Some(fs) = &blobs.local {
        let dest = fs.path_to_filesystem(&location)?;
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::rename(&temp.path, &dest).await?;
        temp.keep = true;
        return Ok(());
    }
    let mut file = tokio::fs::File::open(&temp.path).await?;
    let len = file.metadata().await?.len();
    if len <= S3_PART_SIZE as u64 {
        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(S3_PART_SIZE));
        file.read_to_end(&mut buf).await?;
        blobs.store.put(&location, buf.into()).await?;
        return Ok(());
    }
    let upload = blobs.store.put_multipart(&location).await?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, S3_PART_SIZE);
    let mut buf = vec![0u8; 1024 * 1024];
    let streamed: Result<(), UploadError> = async {
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            writer.wait_for_capacity(S3_PARTS_IN_FLIGHT).await?;
            writer.write(&buf[..n]);
        }
    }
    .await;
    match streamed {
        Ok(()) => {
            writer.finish().await?;
            Ok(())
        }
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(key, error = %abort, "cannot abort multipart upload");
            }
            Err(e)
        }
    }
}

/// Refuses a relative stored path with traversal, hidden or odd segments.
pub(crate) fn check_rel(rel: &str) -> Result<(), UploadError> {
    if rel.is_empty() {
        return Err(UploadError::InvalidPath("empty path"));
    }
    if rel.contains('\\') {
        return Err(UploadError::InvalidPath("backslash in path"));
    }
    if rel.chars().any(char::is_control) {
        return Err(UploadError::InvalidPath("control character in path"));
    }
    for seg in rel.split('/') {
        if seg.is_empty() {
            return Err(UploadError::InvalidPath(
                "empty segment (absolute path or //)",
            ));
        }
        if seg == ".." {
            return Err(UploadError::InvalidPath("\"..\" in path"));
        }
        if seg.starts_with('.') {
            return Err(UploadError::InvalidPath("segment starts with \".\""));
        }
        if seg.len() > 255 {
            return Err(UploadError::InvalidPath("segment too long"));
        }
    }
    Ok(())
}

/// 128 random bits in hex.
fn random_name() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn now_ms() -> schema::Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A name usable as one directory: ASCII lower-case letters, digits and `-`, not starting
/// with `-`.
fn is_plain_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The extension of a client's file name, lower-cased, if it is 1 to 10 ASCII letters or
/// digits; anything else is dropped.
pub fn sanitized_extension(file_name: Option<&str>) -> Option<String> {
    let name = file_name?;
    // Browsers on Windows may send a full path; only the last component counts.
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let (stem, ext) = base.rsplit_once('.')?;
    if stem.is_empty()
        || ext.is_empty()
        || ext.len() > MAX_EXT_LEN
        || !ext.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    Some(ext.to_ascii_lowercase())
}

/// Whether a Content-Type is shown inline (image, audio, video) rather than as an attachment.
fn is_inline(ctype: &str) -> bool {
    ["image/", "audio/", "video/"]
        .iter()
        .any(|p| ctype.starts_with(p))
}

/// The Content-Type a stored file is served with, by extension.
pub fn content_type(ext: Option<&str>) -> &'static str {
    let Some(ext) = ext else {
        return "application/octet-stream";
    };
    match ext.to_ascii_lowercase().as_str() {
        "webp" => "image/webp",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        "flac" => "audio/flac",
        "wma" => "audio/x-ms-wma",
        "mp4" => "video/mp4",
        "avi" => "video/x-msvideo",
        "mov" => "video/quicktime",
        "wmv" => "video/x-ms-wmv",
        "flv" => "video/x-flv",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "pdf" => "application/pdf",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "zip" => "application/zip",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        _ => "application/octet-stream",
    }
}

/// Decodes `input` (format by content) under limits, turns it upright, fits it within
/// [`IMAGE_FIT`] and writes it to `output` as lossless WebP built from the pixels alone (no
/// metadata of the original). Blocking.
fn convert_to_webp(input: &FsPath, output: &FsPath) -> Result<(), UploadError> {
    use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};
    // Reading a local temp file fails only when the image is truncated: a decoding error.
    let map = |e: ImageError| match e {
        ImageError::Limits(l) => UploadError::ImageTooLarge(l.to_string()),
        other => UploadError::Undecodable(other.to_string()),
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let file = std::io::BufReader::new(std::fs::File::open(input)?);
    let mut reader = ImageReader::new(file).with_guessed_format()?;
    if reader.format().is_none() {
        return Err(UploadError::Undecodable(
            "not a PNG, JPEG, GIF, WebP or BMP image".into(),
        ));
    }
    reader.limits(limits.clone());
    // The decoder checks the dimensions from the header, before allocating anything.
    let mut decoder = reader.into_decoder().map_err(map)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(UploadError::ImageTooLarge(format!(
            "{w}x{h} is more than {MAX_IMAGE_PIXELS} pixels"
        )));
    }
    // As `ImageReader::decode` does: the output buffer counts against the allocation limit.
    limits.reserve(decoder.total_bytes()).map_err(map)?;
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(map)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    if img.width() > IMAGE_FIT || img.height() > IMAGE_FIT {
        img = img.resize(IMAGE_FIT, IMAGE_FIT, image::imageops::FilterType::Triangle);
    }
    let img = match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => img,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    };
    let file = std::fs::File::create_new(output)?;
    let mut out = std::io::BufWriter::new(file);
    // Only pixels go in: the encoder writes no EXIF, XMP or ICC chunk unless given one.
    let encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
    encoder
        .encode(
            img.as_bytes(),
            img.width(),
            img.height(),
            img.color().into(),
        )
        .map_err(|e| match e {
            ImageError::IoError(e) => UploadError::Io(e),
            other => UploadError::Io(std::io::Error::other(other)),
        })?;
    let file = out
        .into_inner()
        .map_err(|e| UploadError::Io(e.into_error()))?;
    file.sync_all()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Routes
// ------------------------------------------------------------------------------------------

/// The routes: `POST /v1/uploads`, `POST /api/chat/uploadFile` and `GET /uploads/{*path}`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        // The router-wide limit is sized for chat frames; these routes enforce their own,
        // derived from the configured upload limits (see `read_upload`).
        .route(
            "/v1/uploads",
            post(native_upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/chat/uploadFile",
            post(upload_file).layer(DefaultBodyLimit::disable()),
        )
        .route("/uploads/{*path}", get(serve_file))
}

/// The seed's envelope.
fn envelope(status: StatusCode, data: Option<&str>, message: Option<&str>) -> Response {
    let body = serde_json::json!({
        "success": data.is_some(),
        "data": data,
        "message": message,
    });
    (status, axum::Json(body)).into_response()
}

fn envelope_error(e: &UploadError) -> Response {
    envelope(e.status(), None, Some(&e.client_message()))
}

/// A native error answer: `{"error": {"code", "message"}}` with the error's status.
fn native_upload_error(e: &UploadError) -> Response {
    let body = serde_json::json!({ "error": { "code": e.code(), "message": e.client_message() } });
    (e.status(), axum::Json(body)).into_response()
}

fn form_error(message: impl Into<String>) -> UploadError {
    UploadError::Body {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// Counts the bytes of a request body and ends it with an error past `cap`, setting `over`.
/// Before that error, up to [`DRAIN_MAX`] more bytes are read and discarded (for at most
/// [`DRAIN_TIME`]), so that a client still sending gets the 413 rather than a reset.
fn capped(req: Request, cap: u64, over: Arc<AtomicBool>) -> Request {
    let (parts, body) = req.into_parts();
    let inner = body.into_data_stream();
    let stream = futures::stream::unfold((inner, 0u64, false), move |(mut inner, seen, done)| {
        let over = over.clone();
        async move {
            if done {
                return None;
            }
            let chunk = match inner.next().await? {
                Ok(c) => c,
                Err(e) => return Some((Err(e), (inner, seen, true))),
            };
            let seen = seen.saturating_add(chunk.len() as u64);
            if seen <= cap {
                return Some((Ok(chunk), (inner, seen, false)));
            }
            over.store(true, Ordering::Relaxed);
            let discard = async {
                let mut n = 0u64;
                while let Some(Ok(c)) = inner.next().await {
                    n = n.saturating_add(c.len() as u64);
                    if n > DRAIN_MAX {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
            let e = axum::Error::new(std::io::Error::other("request body too large"));
            Some((Err(e), (inner, seen, true)))
        }
    });
    Request::from_parts(parts, Body::from_stream(stream))
}

/// The form of an upload route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// `POST /v1/uploads`: `file`, `kind`?, `duration`?.
    Native,
    /// `POST /api/chat/uploadFile`: `file`, `messageType`.
    Syarah,
}

impl Dialect {
    fn kind_field(self) -> &'static str {
        match self {
            Dialect::Native => "kind",
            Dialect::Syarah => "messageType",
        }
    }

    fn parse_kind(self, text: Option<&str>) -> Result<MediaKind, UploadError> {
        match self {
            Dialect::Native => {
                let bad = || {
                    form_error(format!(
                        "kind must be image, audio, video, file or voice; got {}",
                        text.map_or("an unreadable value".to_owned(), |t| format!("{t:?}"))
                    ))
                };
                text.and_then(MediaKind::parse).ok_or_else(bad)
            }
            Dialect::Syarah => parse_message_type(text),
        }
    }
}

/// What an upload form carried.
struct Received {
    incoming: Incoming,
    file_name: Option<String>,
    kind: Option<MediaKind>,
    duration: Option<u32>,
}

/// Reads an upload request: the body capped at the largest limit plus [`FORM_OVERHEAD`], the
/// form's fields in any order, the file into a temporary file. On a refusal, what the client is
/// still sending is drained (bounded) so that it reads the answer.
async fn read_upload(
    uploads: &Uploads,
    req: Request,
    dialect: Dialect,
) -> Result<Received, UploadError> {
    let cap = uploads.limits().largest().saturating_add(FORM_OVERHEAD);
    let over = Arc::new(AtomicBool::new(false));
    let req = capped(req, cap, over.clone());
    let mut form = Multipart::from_request(req, &()).await.map_err(|rej| {
        let fields = match dialect {
            Dialect::Native => "file, and optionally kind and duration",
            Dialect::Syarah => "file and messageType",
        };
        form_error(format!(
            "expected a multipart/form-data body with fields {fields}: {}",
            rej.body_text()
        ))
    })?;
    let mut drainable = true;
    let result = read_fields(uploads, &mut form, dialect, &mut drainable, &over, cap).await;
    if result.is_err() && drainable && !over.load(Ordering::Relaxed) {
        let _ = tokio::time::timeout(DRAIN_TIME, drain(&mut form)).await;
    }
    result
}

/// Reads the form's fields: the kind field, `duration` (native) and `file`, in any order;
/// other fields are ignored.
async fn read_fields(
    uploads: &Uploads,
    form: &mut Multipart,
    dialect: Dialect,
    drainable: &mut bool,
    over: &AtomicBool,
    cap: u64,
) -> Result<Received, UploadError> {
    let body_error = |e: MultipartError| {
        if over.load(Ordering::Relaxed) {
            UploadError::TooLarge {
                kind: None,
                limit: cap,
            }
        } else {
            UploadError::Body {
                status: if e.status().is_server_error() {
                    StatusCode::BAD_REQUEST
                } else {
                    e.status()
                },
                message: format!("malformed multipart body: {}", e.body_text()),
            }
        }
    };
    let kind_field = dialect.kind_field();
    let mut kind: Option<MediaKind> = None;
    let mut duration: Option<Option<u32>> = None;
    let mut file: Option<(Incoming, Option<String>)> = None;
    while let Some(mut field) = form.next_field().await.map_err(body_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == kind_field {
            if kind.is_some() {
                return Err(form_error(format!("{kind_field} is given more than once")));
            }
            let text = small_text(&mut field).await.map_err(body_error)?;
            let k = dialect.parse_kind(text.as_deref())?;
            if let Some((incoming, _)) = &file {
                check_head(k, &incoming.head)?;
            }
            kind = Some(k);
        } else if name == "duration" && dialect == Dialect::Native {
            if duration.is_some() {
                return Err(form_error("duration is given more than once"));
            }
            let text = small_text(&mut field).await.map_err(body_error)?;
            duration = Some(parse_duration(text.as_deref())?);
        } else if name == "file" {
            if file.is_some() {
                return Err(form_error("only one file may be uploaded per request"));
            }
            let file_name = field.file_name().map(str::to_owned);
            let limit = kind.map_or(uploads.limits().largest(), |k| uploads.limits().max_for(k));
            let received = {
                let body = (&mut field).map_err(body_error);
                uploads.receive(body, limit, kind).await
            };
            match received {
                Ok(incoming) => file = Some((incoming, file_name)),
                Err(e) => {
                    *drainable = drain_field(&mut field).await;
                    return Err(e);
                }
            }
        }
    }
    if dialect == Dialect::Syarah && kind.is_none() {
        return Err(form_error(
            "messageType is required: 1 (audio), 2 (image), 3 (file) or 4 (video)",
        ));
    }
    let (incoming, file_name) =
        file.ok_or_else(|| form_error("file is required: a multipart field named \"file\""))?;
    Ok(Received {
        incoming,
        file_name,
        kind,
        duration: duration.flatten(),
    })
}

/// `POST /v1/uploads`.
async fn native_upload(State(app): State<Arc<App>>, headers: HeaderMap, req: Request) -> Response {
    // The token first: an unauthenticated request is refused before its body is read.
    let profile = match authenticate(&app, bearer(&headers, None)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let uploads = Uploads::from_config(&app.config);
    let r = match read_upload(&uploads, req, Dialect::Native).await {
        Ok(r) => r,
        Err(e) => return native_upload_error(&e),
    };
    let kind = uploads.kind_for(&r.incoming, r.kind);
    if r.duration.is_some() && !kind.has_duration() {
        return native_upload_error(&form_error(format!(
            "duration applies to voice, audio and video uploads only; this is {} upload",
            if kind == MediaKind::Image {
                "an image"
            } else {
                "a file"
            }
        )));
    }
    let stored = uploads
        .save(
            &app,
            &profile.id,
            r.incoming,
            CHAT_MESSAGES,
            Some(kind),
            r.file_name.as_deref(),
        )
        .await;
    match stored {
        Ok(s) => {
            let mut upload = serde_json::json!({
                "path": s.path,
                "kind": s.kind.name(),
                "size": s.bytes,
                "content_type": s.content_type,
            });
            if let Some(d) = r.duration {
                upload["duration"] = d.into();
            }
            (
                StatusCode::CREATED,
                axum::Json(serde_json::json!({ "upload": upload })),
            )
                .into_response()
        }
        Err(e) => native_upload_error(&e),
    }
}

/// `POST /api/chat/uploadFile`.
async fn upload_file(State(app): State<Arc<App>>, headers: HeaderMap, req: Request) -> Response {
    // The token first: an unauthenticated request is refused before its body is read.
    let profile = match authenticate(&app, bearer(&headers, None)) {
        Ok(p) => p,
        Err(ApiError(e)) => {
            let mut resp = envelope(StatusCode::UNAUTHORIZED, None, Some(&e.message));
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    };
    let uploads = Uploads::from_config(&app.config);
    let result = match read_upload(&uploads, req, Dialect::Syarah).await {
        Ok(r) => {
            uploads
                .save(
                    &app,
                    &profile.id,
                    r.incoming,
                    CHAT_MESSAGES,
                    r.kind,
                    r.file_name.as_deref(),
                )
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(stored) => envelope(StatusCode::OK, Some(&stored.path), None),
        Err(e) => envelope_error(&e),
    }
}

/// A small text field (at most 32 bytes, trimmed); `None` if longer or not UTF-8.
async fn small_text(field: &mut Field<'_>) -> Result<Option<String>, MultipartError> {
    let mut buf = Vec::new();
    let mut ok = true;
    while let Some(chunk) = field.chunk().await? {
        if buf.len() + chunk.len() > 32 {
            ok = false;
        } else {
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(ok
        .then(|| String::from_utf8(buf).ok())
        .flatten()
        .map(|s| s.trim().to_owned()))
}

pub(crate) fn parse_message_type(text: Option<&str>) -> Result<MediaKind, UploadError> {
    let bad = || {
        form_error(format!(
            "messageType must be 1 (audio), 2 (image), 3 (file) or 4 (video); got {}",
            text.map_or("an unreadable value".to_owned(), |t| format!("{t:?}"))
        ))
    };
    let n: i64 = text.ok_or_else(bad)?.parse().map_err(|_| bad())?;
    MediaKind::from_message_type(n).ok_or_else(bad)
}

/// `duration` in seconds: a non-negative number (a fraction is rounded); blank is none.
pub(crate) fn parse_duration(text: Option<&str>) -> Result<Option<u32>, UploadError> {
    let bad = || form_error("duration must be a non-negative number of seconds");
    let text = text.ok_or_else(bad)?;
    if text.is_empty() {
        return Ok(None);
    }
    let secs: f64 = text.parse().map_err(|_| bad())?;
    if !secs.is_finite() || secs < 0.0 || secs > f64::from(u32::MAX) {
        return Err(bad());
    }
    // Finite and within u32: the cast is exact after rounding.
    Ok(Some(secs.round() as u32))
}

/// Reads and discards the rest of a field, up to [`DRAIN_MAX`]; true if it ended.
async fn drain_field(field: &mut Field<'_>) -> bool {
    let drained = async {
        let mut n = 0u64;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    n += chunk.len() as u64;
                    if n > DRAIN_MAX {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, drained)
        .await
        .unwrap_or(false)
}

/// Reads and discards the rest of the form, up to [`DRAIN_MAX`].
async fn drain(form: &mut Multipart) {
    let mut n = 0u64;
    while let Ok(Some(mut field)) = form.next_field().await {
        while let Ok(Some(chunk)) = field.chunk().await {
            n += chunk.len() as u64;
            if n > DRAIN_MAX {
                return;
            }
        }
    }
}

/// `GET /uploads/{*path}`.
async fn serve_file(
    State(app): State<Arc<App>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query_token = query.as_deref().and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find_map(|(k, v)| (k == "token").then_some(v))
    });
    let profile = match authenticate(&app, bearer(&headers, query_token.as_deref())) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let rel = match path {
        Ok(Path(p)) => p,
        Err(rej) => {
            return error_response(&Error::new(ErrorCode::InvalidField, rej.body_text()));
        }
    };
    if let Err(e) = check_rel(&rel) {
        return error_response(&native_error(&e));
    }
    // Only the uploader and members of a room where it was posted.
    let access = Command::MediaAccess {
        path: format!("/uploads/{rel}"),
    };
    match app.node.execute(&profile.id, access).await {
        Ok(Reply::Done) => {}
        Ok(other) => {
            return error_response(&Error::internal(format!(
                "unexpected media_access reply {other:?}"
            )));
        }
        Err(e) => return error_response(&e),
    }
    let uploads = Uploads::from_config(&app.config);
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let opened = match uploads.open(&rel, range).await {
        Ok(o) => o,
        Err(Ok(len)) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
        Err(Err(e)) => return error_response(&native_error(&e)),
    };
    let (status, start, count) = match opened.range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, opened.len),
    };
    let body = Body::from_stream(opened.body.map_err(std::io::Error::from));
    let mut resp = (status, body).into_response();
    let ctype = opened.content_type;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    // Names are random and files never change; only the requester may keep a copy.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    if !is_inline(ctype) {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!(
            "bytes {start}-{}/{}",
            start + count - 1,
            opened.len
        ))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

fn native_error(e: &UploadError) -> Error {
    let code = match e.status() {
        StatusCode::BAD_REQUEST => ErrorCode::InvalidField,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::warn!(error = %e, "cannot serve upload");
        return Error::new(code, "cannot read the file");
    }
    Error::new(code, e.to_string())
}

/// A single `bytes=` range of a `len`-byte file as inclusive `(start, end)`; `Ok(None)` for a
/// header to ignore (several ranges, other units), `Err` for an unsatisfiable range.
pub(crate) fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => (start, end.min(len.saturating_sub(1))),
        (Ok(start), Err(_)) if b.is_empty() => (start, len.saturating_sub(1)),
        (Err(_), Ok(suffix)) if a.is_empty() && suffix > 0 => {
            (len.saturating_sub(suffix), len.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if len == 0 || range.0 >= len {
        return Err(());
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_sanitised() {
        assert_eq!(sanitized_extension(Some("Song.MP3")), Some("mp3".into()));
        assert_eq!(
            sanitized_extension(Some("C:\\x\\a.tar.gz")),
            Some("gz".into())
        );
        assert_eq!(sanitized_extension(Some("../../etc/passwd")), None);
        assert_eq!(sanitized_extension(Some(".bashrc")), None);
        assert_eq!(sanitized_extension(Some("a.p h p")), None);
        assert_eq!(sanitized_extension(Some("a.verylongextension")), None);
        assert_eq!(sanitized_extension(None), None);
    }

    #[test]
    fn paths_are_confined() {
        let u = Uploads::new(FsPath::new("/d"), UploadLimits::default());
        assert_eq!(
            u.resolve("chat-messages/images/a.webp").unwrap(),
            PathBuf::from("/d/uploads/chat-messages/images/a.webp")
        );
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "a\\b",
            "a\0b",
            ".incoming/x",
        ] {
            assert!(u.resolve(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }

    #[test]
    fn limits_and_kinds() {
        let l = UploadLimits::default();
        assert_eq!(l.max_for(MediaKind::Video), 500 * MIB);
        assert_eq!(l.max_for(MediaKind::Image), 10 * MIB);
        assert_eq!(l.max_for(MediaKind::Voice), 20 * MIB);
        assert_eq!(l.max_for(MediaKind::Audio), 50 * MIB);
        assert_eq!(l.largest(), 500 * MIB);
        assert_eq!(MediaKind::from_message_type(2), Some(MediaKind::Image));
        assert_eq!(MediaKind::from_message_type(0), None);
        assert_eq!(MediaKind::parse("voice"), Some(MediaKind::Voice));
        assert_eq!(MediaKind::parse("Voice"), None);
        let e = UploadError::TooLarge {
            kind: Some(MediaKind::Audio),
            limit: 50 * MIB,
        };
        assert_eq!(
            e.to_string(),
            "audio files may be at most 52428800 bytes (50 MiB)"
        );
    }

    fn ftyp(brand: &[u8; 4]) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0x18];
        b.extend_from_slice(b"ftyp");
        b.extend_from_slice(brand);
        b.extend_from_slice(&[0, 0, 2, 0]);
        b.extend_from_slice(b"isommp42");
        b
    }

    #[test]
    fn content_decides_the_kind_and_the_extension() {
        // An ELF header (64 bytes: infer wants more than 52).
        let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
        elf.resize(64, 0);
        let s = sniff(&elf).unwrap();
        assert!(s.executable);
        assert_eq!(
            accept(MediaKind::Image, Some(&s), Some("png"))
                .unwrap_err()
                .to_string(),
            "content is application/x-executable, not an image (PNG, JPEG, GIF, WebP or BMP)"
        );
        assert_eq!(
            accept(MediaKind::File, Some(&s), Some("png")).unwrap(),
            "bin"
        );
        // MP4 family: video, or m4a when sent as audio; M4A brand is audio.
        let mp4 = sniff(&ftyp(b"isom")).unwrap();
        assert_eq!(kind_of_content(Some(&mp4)), MediaKind::Video);
        assert_eq!(accept(MediaKind::Audio, Some(&mp4), None).unwrap(), "m4a");
        let m4a = sniff(&ftyp(b"M4A ")).unwrap();
        assert_eq!(kind_of_content(Some(&m4a)), MediaKind::Audio);
        // An ftyp box infer does not name (3GPP) is still an MP4-family container.
        assert_eq!(sniff(&ftyp(b"3gp4")).unwrap().ext, "mp4");
        // MPEG audio without ID3.
        assert_eq!(sniff(&[0xFF, 0xF3, 0x90, 0x64]).unwrap().ext, "mp3");
        // WebM: video, or a voice recording; not plain audio.
        let webm = sniff(&[0x1A, 0x45, 0xDF, 0xA3, 0x01, 0, 0, 0]).unwrap();
        assert_eq!(accept(MediaKind::Voice, Some(&webm), None).unwrap(), "webm");
        assert!(matches!(
            accept(MediaKind::Audio, Some(&webm), None),
            Err(UploadError::WrongContent { .. })
        ));
        // Unrecognised bytes.
        assert!(matches!(
            accept(MediaKind::Video, None, Some("mp4")),
            Err(UploadError::Unrecognised { .. })
        ));
        assert!(matches!(
            accept(MediaKind::Image, None, Some("png")),
            Err(UploadError::Undecodable(_))
        ));
        assert_eq!(accept(MediaKind::File, None, Some("txt")).unwrap(), "txt");
        assert_eq!(accept(MediaKind::File, None, Some("mp4")).unwrap(), "bin");
        assert_eq!(accept(MediaKind::File, None, None).unwrap(), "bin");
        // A HEIF photo is an image the converter cannot read.
        let heic = sniff(&ftyp(b"heic")).unwrap();
        assert!(matches!(
            accept(MediaKind::Image, Some(&heic), None),
            Err(UploadError::Unconvertible("image/heif"))
        ));
    }
}
