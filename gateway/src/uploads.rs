//! Uploaded media: the reusable [`Uploads`] service, the Syarah route `POST /api/chat/uploadFile`
//! (seed 001) and `GET /uploads/{*path}`, which serves stored files to authenticated users.
//!
//! # Storage
//!
//! Files live under `<data_dir>/uploads/<area>/<kind dir>/<random>.<ext>`, for example
//! `chat-messages/images/3f2a….webp`; the public path is the same with a leading `/uploads/`.
//! Names are 128 random bits in hex: the client's file name is never part of a path, only its
//! extension is kept, lower-cased and only if it is 1 to 10 ASCII letters or digits.
//!
//! Bodies are streamed to a temporary file in `<data_dir>/uploads/.incoming/` while their bytes
//! are counted against the kind's limit (nothing is held whole in memory), synced, then renamed
//! into place; a failed or abandoned upload (client gone, limit exceeded, image undecodable)
//! leaves no file behind.
//!
//! | type | kind | directory | limit, `PALAVER_UPLOAD_*` (default) | formats |
//! |---|---|---|---|---|
//! | 1 | audio | `audios` | `MAX_FILE_BYTES` (50 MiB) | mp3 wav ogg m4a aac flac wma |
//! | 2 | image | `images` | `MAX_IMAGE_BYTES` (50 MiB) | png jpeg gif webp bmp, by content |
//! | 3 | file | `files` | `MAX_FILE_BYTES` (50 MiB) | any |
//! | 4 | video | `videos` | `MAX_VIDEO_BYTES` (500 MiB) | mp4 avi mov wmv flv webm mkv |
//!
//! Images are recognised by their content (not their name), decoded under [`image::Limits`]
//! (at most [`MAX_IMAGE_SIDE`] pixels a side, [`MAX_IMAGE_PIXELS`] pixels and
//! [`MAX_DECODE_ALLOC`] bytes, so a decompression bomb is refused before it is allocated),
//! turned upright by their EXIF orientation, shrunk to fit within [`IMAGE_FIT`] x [`IMAGE_FIT`]
//! keeping the aspect ratio (triangle filter), and re-encoded as lossless WebP. That CPU work
//! runs on the blocking pool, at most one conversion per core (and at most 4) at a time. An
//! animated GIF keeps its first frame.
//!
//! # Serving
//!
//! `GET /uploads/{*path}` needs a valid token (`Authorization: Bearer` or `?token=`), answers
//! with the Content-Type of the extension, `Accept-Ranges: bytes` and single byte ranges (video
//! players seek with them), and streams the file. Paths with `..`, a leading `.` in any segment,
//! an empty segment (absolute paths), a backslash, a NUL or another control character are
//! refused with 400; a missing file is 404. Anything that is not image, audio or video is sent
//! as an attachment, and every answer carries `X-Content-Type-Options: nosniff` and a sandboxing
//! Content-Security-Policy, so an uploaded HTML or SVG file never runs as a page of this origin.
//!
//! **Follow-up (issue 8):** any authenticated user who knows a path may read the file. Media is
//! not yet scoped to the rooms it was sent in; the unguessable 128-bit names are the only guard
//! until room-scoped authorisation lands.
//!
//! # The upload route
//!
//! `POST /api/chat/uploadFile`, `multipart/form-data` with `file` and `messageType` (1 to 4,
//! before or after the file), `Authorization: Bearer <jwt>`. Answers
//! `{"success": true, "data": "/uploads/chat-messages/images/<name>.webp", "message": null}`,
//! or `{"success": false, "data": null, "message": "<reason>"}` with 401 (token), 400 (form,
//! messageType, extension, undecodable image) or 413 (a limit). The token is checked before
//! the body is read. The route lifts the router's small body limit and enforces its own: the
//! largest configured limit plus [`FORM_OVERHEAD`] for the whole request.

use crate::config::Config;
use crate::server::{ApiError, App, authenticate, bearer, error_response};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::{Field, Multipart};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt, TryStreamExt};
use schema::{Error, ErrorCode};
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
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
/// Directory under the uploads root where bodies are received.
const INCOMING: &str = ".incoming";
/// Longest kept extension.
const MAX_EXT_LEN: usize = 10;
/// After a refused upload, at most this much of the rest of the body is read (and discarded)
/// so that the client, still sending, gets the answer instead of a reset connection.
const DRAIN_MAX: u64 = 8 * 1024 * 1024;
/// ... and for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(2);

const MIB: u64 = 1024 * 1024;

/// What an upload is, from the seed's `messageType`.
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
}

impl MediaKind {
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

    /// The seed's `messageType` of this kind.
    pub fn message_type(self) -> i64 {
        match self {
            Self::Audio => 1,
            Self::Image => 2,
            Self::File => 3,
            Self::Video => 4,
        }
    }

    /// Lower-case name, as used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Image => "image",
            Self::File => "file",
            Self::Video => "video",
        }
    }

    /// The directory of this kind inside an area.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Audio => "audios",
            Self::Image => "images",
            Self::File => "files",
            Self::Video => "videos",
        }
    }

    /// Accepted extensions of the client's file name; `None` accepts any (files) or ignores
    /// the name (images, recognised by content).
    pub fn extensions(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Audio => Some(&["mp3", "wav", "ogg", "m4a", "aac", "flac", "wma"]),
            Self::Video => Some(&["mp4", "avi", "mov", "wmv", "flv", "webm", "mkv"]),
            Self::Image | Self::File => None,
        }
    }
}

/// Size limits per kind, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    /// Audio and files (`PALAVER_UPLOAD_MAX_FILE_BYTES`, default 50 MiB).
    pub max_file_bytes: u64,
    /// Video (`PALAVER_UPLOAD_MAX_VIDEO_BYTES`, default 500 MiB).
    pub max_video_bytes: u64,
    /// Image input, before conversion (`PALAVER_UPLOAD_MAX_IMAGE_BYTES`, default 50 MiB).
    pub max_image_bytes: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 50 * MIB,
            max_video_bytes: 500 * MIB,
            max_image_bytes: 50 * MIB,
        }
    }
}

impl UploadLimits {
    /// The limit of `kind`.
    pub fn max_for(&self, kind: MediaKind) -> u64 {
        match kind {
            MediaKind::Audio | MediaKind::File => self.max_file_bytes,
            MediaKind::Image => self.max_image_bytes,
            MediaKind::Video => self.max_video_bytes,
        }
    }

    /// The largest of the limits: what a body of a kind not known yet may reach.
    pub fn largest(&self) -> u64 {
        self.max_file_bytes
            .max(self.max_video_bytes)
            .max(self.max_image_bytes)
    }
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
    /// The client's file name does not have an accepted extension for the kind.
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
    /// The image could not be decoded or converted.
    #[error("image could not be decoded: {0}")]
    Undecodable(String),
    /// The image is larger than the decoder accepts (dimensions or memory).
    #[error("image is too large to convert: {0}")]
    ImageTooLarge(String),
    /// The uploaded body is empty.
    #[error("the file is empty")]
    Empty,
    /// The request body could not be read.
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
    /// A storage failure.
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
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
            Self::BadExtension { .. }
            | Self::Undecodable(_)
            | Self::Empty
            | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::Body { status, .. } => *status,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidArea(_) | Self::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

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
    /// Where it is on disk.
    pub file: PathBuf,
}

/// A body received into a temporary file, not yet stored. Dropping it deletes the file.
#[derive(Debug)]
pub struct Incoming {
    temp: TempFile,
    bytes: u64,
}

impl Incoming {
    /// Bytes received.
    pub fn bytes(&self) -> u64 {
        self.bytes
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

/// The upload store: where files go, and how big they may be. Cheap to build (a path and three
/// numbers), so routes build one per request from the configuration.
#[derive(Clone, Debug)]
pub struct Uploads {
    root: PathBuf,
    limits: UploadLimits,
}

impl Uploads {
    /// Uploads stored under `<data_dir>/uploads`.
    pub fn new(data_dir: &FsPath, limits: UploadLimits) -> Self {
        Self {
            root: data_dir.join("uploads"),
            limits,
        }
    }

    /// The configured store.
    pub fn from_config(config: &Config) -> Self {
        Self::new(&config.data_dir, config.uploads)
    }

    /// The uploads root directory.
    pub fn root(&self) -> &FsPath {
        &self.root
    }

    /// The size limits.
    pub fn limits(&self) -> &UploadLimits {
        &self.limits
    }

    /// Checks the client's file name against the kind's extensions, before any byte is read;
    /// returns the sanitised extension.
    pub fn check_name(
        &self,
        kind: MediaKind,
        file_name: Option<&str>,
    ) -> Result<Option<String>, UploadError> {
        let ext = sanitized_extension(file_name);
        if let Some(allowed) = kind.extensions()
            && !ext.as_deref().is_some_and(|e| allowed.contains(&e))
        {
            return Err(UploadError::BadExtension {
                kind,
                allowed,
                got: ext,
            });
        }
        Ok(ext)
    }

    /// Receives a body into a temporary file, refusing it once it exceeds `limit` bytes
    /// (`kind` only names the limit in the error).
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
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes = bytes.saturating_add(chunk.len() as u64);
            if bytes > limit {
                return Err(UploadError::TooLarge { kind, limit });
            }
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        Ok(Incoming { temp, bytes })
    }

    /// Stores a received body as `kind` in `area` (a plain directory name such as
    /// [`CHAT_MESSAGES`]): checks its size and the name's extension, converts images to WebP,
    /// and moves it into place under a random name.
    pub async fn finish(
        &self,
        incoming: Incoming,
        area: &str,
        kind: MediaKind,
        file_name: Option<&str>,
    ) -> Result<StoredUpload, UploadError> {
        if !is_plain_segment(area) {
            return Err(UploadError::InvalidArea(area.to_owned()));
        }
        let limit = self.limits.max_for(kind);
        if incoming.bytes > limit {
            return Err(UploadError::TooLarge {
                kind: Some(kind),
                limit,
            });
        }
        if incoming.bytes == 0 {
            return Err(UploadError::Empty);
        }
        let ext = self.check_name(kind, file_name)?;
        let dir = self.root.join(area).join(kind.dir());
        tokio::fs::create_dir_all(&dir).await?;
        let (mut temp, ext) = match kind {
            MediaKind::Image => {
                let out = TempFile::new(
                    self.root
                        .join(INCOMING)
                        .join(format!("{}.webp.part", random_name())),
                );
                (
                    self.convert(incoming.temp, out).await?,
                    Some("webp".to_owned()),
                )
            }
            _ => (incoming.temp, ext),
        };
        let name = match &ext {
            Some(e) => format!("{}.{e}", random_name()),
            None => random_name(),
        };
        let dest = dir.join(&name);
        tokio::fs::rename(&temp.path, &dest).await?;
        temp.keep = true;
        let bytes = tokio::fs::metadata(&dest).await?.len();
        Ok(StoredUpload {
            path: format!("/uploads/{area}/{}/{name}", kind.dir()),
            kind,
            bytes,
            content_type: content_type(ext.as_deref()),
            file: dest,
        })
    }

    /// [`Uploads::check_name`], [`Uploads::receive`] with the kind's limit and
    /// [`Uploads::finish`] in one go, for callers that know the kind before the body.
    pub async fn store<S>(
        &self,
        area: &str,
        kind: MediaKind,
        file_name: Option<&str>,
        body: S,
    ) -> Result<StoredUpload, UploadError>
    where
        S: Stream<Item = Result<Bytes, UploadError>>,
    {
        self.check_name(kind, file_name)?;
        let incoming = self
            .receive(body, self.limits.max_for(kind), Some(kind))
            .await?;
        self.finish(incoming, area, kind, file_name).await
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

    /// The file of a stored path (relative to the uploads root, e.g.
    /// `chat-messages/images/x.webp`), refusing traversal and hidden segments.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, UploadError> {
        if rel.is_empty() {
            return Err(UploadError::InvalidPath("empty path"));
        }
        if rel.contains('\\') {
            return Err(UploadError::InvalidPath("backslash in path"));
        }
        if rel.chars().any(char::is_control) {
            return Err(UploadError::InvalidPath("control character in path"));
        }
        let mut path = self.root.clone();
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
            path.push(seg);
        }
        Ok(path)
    }

    /// Opens a stored file: the file, its length and its Content-Type.
    pub async fn open(
        &self,
        rel: &str,
    ) -> Result<(tokio::fs::File, u64, &'static str), UploadError> {
        let path = self.resolve(rel)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(UploadError::NotFound);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(UploadError::NotFound);
            }
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata().await?;
        if !meta.is_file() {
            return Err(UploadError::NotFound);
        }
        let ext = path.extension().and_then(|e| e.to_str());
        Ok((file, meta.len(), content_type(ext)))
    }
}

/// 128 random bits in hex.
fn random_name() -> String {
    format!("{:032x}", rand::random::<u128>())
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
/// [`IMAGE_FIT`] and writes it to `output` as lossless WebP. Blocking.
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

/// The routes: `POST /api/chat/uploadFile` and `GET /uploads/{*path}`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/api/chat/uploadFile",
            // The router-wide limit is sized for chat frames; this route enforces its own,
            // derived from the configured upload limits (see `upload_file`).
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
    envelope(e.status(), None, Some(&e.to_string()))
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

/// `POST /api/chat/uploadFile`.
async fn upload_file(State(app): State<Arc<App>>, headers: HeaderMap, req: Request) -> Response {
    // The token first: an unauthenticated request is refused before its body is read.
    if let Err(ApiError(e)) = authenticate(&app, bearer(&headers, None)) {
        let mut resp = envelope(StatusCode::UNAUTHORIZED, None, Some(&e.message));
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let uploads = Uploads::from_config(&app.config);
    let cap = uploads.limits().largest().saturating_add(FORM_OVERHEAD);
    let over = Arc::new(AtomicBool::new(false));
    let req = capped(req, cap, over.clone());
    let mut form = match Multipart::from_request(req, &()).await {
        Ok(m) => m,
        Err(rej) => {
            return envelope_error(&form_error(format!(
                "expected a multipart/form-data body with fields file and messageType: {}",
                rej.body_text()
            )));
        }
    };
    let mut drainable = true;
    let result = read_form(&uploads, &mut form, &mut drainable, &over, cap).await;
    match result {
        Ok(stored) => envelope(StatusCode::OK, Some(&stored.path), None),
        Err(e) => {
            if e.status() == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!(error = %e, "upload failed");
            }
            if drainable && !over.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(DRAIN_TIME, drain(&mut form)).await;
            }
            envelope_error(&e)
        }
    }
}

/// Reads the form: `messageType` and `file` in either order, other fields ignored.
async fn read_form(
    uploads: &Uploads,
    form: &mut Multipart,
    drainable: &mut bool,
    over: &AtomicBool,
    cap: u64,
) -> Result<StoredUpload, UploadError> {
    let body_error = |e: axum::extract::multipart::MultipartError| {
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
    let mut kind: Option<MediaKind> = None;
    let mut file: Option<(Incoming, Option<String>)> = None;
    while let Some(mut field) = form.next_field().await.map_err(body_error)? {
        match field.name() {
            Some("messageType") => {
                if kind.is_some() {
                    return Err(form_error("messageType is given more than once"));
                }
                let text = small_text(&mut field).await.map_err(body_error)?;
                let k = parse_message_type(text.as_deref())?;
                if let Some((_, name)) = &file {
                    uploads.check_name(k, name.as_deref())?;
                }
                kind = Some(k);
            }
            Some("file") => {
                if file.is_some() {
                    return Err(form_error("only one file may be uploaded per request"));
                }
                let name = field.file_name().map(str::to_owned);
                if let Some(k) = kind {
                    uploads.check_name(k, name.as_deref())?;
                }
                let limit =
                    kind.map_or(uploads.limits().largest(), |k| uploads.limits().max_for(k));
                let received = {
                    let body = (&mut field).map_err(body_error);
                    uploads.receive(body, limit, kind).await
                };
                match received {
                    Ok(incoming) => file = Some((incoming, name)),
                    Err(e) => {
                        if matches!(e, UploadError::TooLarge { .. }) {
                            *drainable = drain_field(&mut field).await;
                        }
                        return Err(e);
                    }
                }
            }
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| {
        form_error("messageType is required: 1 (audio), 2 (image), 3 (file) or 4 (video)")
    })?;
    let (incoming, name) =
        file.ok_or_else(|| form_error("file is required: a multipart field named \"file\""))?;
    uploads
        .finish(incoming, CHAT_MESSAGES, kind, name.as_deref())
        .await
}

/// A small text field (at most 32 bytes, trimmed); `None` if longer or not UTF-8.
async fn small_text(
    field: &mut Field<'_>,
) -> Result<Option<String>, axum::extract::multipart::MultipartError> {
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

fn parse_message_type(text: Option<&str>) -> Result<MediaKind, UploadError> {
    let bad = || {
        form_error(format!(
            "messageType must be 1 (audio), 2 (image), 3 (file) or 4 (video); got {}",
            text.map_or("an unreadable value".to_owned(), |t| format!("{t:?}"))
        ))
    };
    let n: i64 = text.ok_or_else(bad)?.parse().map_err(|_| bad())?;
    MediaKind::from_message_type(n).ok_or_else(bad)
}

/// Reads and discards the rest of a field, up to [`DRAIN_MAX`]; true if it ended.
async fn drain_field(field: &mut Field<'_>) -> bool {
    let drained = async {
        let mut n = 0u64;
        while let Ok(Some(chunk)) = field.chunk().await {
            n += chunk.len() as u64;
            if n > DRAIN_MAX {
                return false;
            }
        }
        true
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
    if let Err(e) = authenticate(&app, bearer(&headers, query_token.as_deref())) {
        return e.into_response();
    }
    let rel = match path {
        Ok(Path(p)) => p,
        Err(rej) => {
            return error_response(&Error::new(ErrorCode::InvalidField, rej.body_text()));
        }
    };
    let uploads = Uploads::from_config(&app.config);
    let (mut file, len, ctype) = match uploads.open(&rel).await {
        Ok(f) => f,
        Err(e) => return error_response(&native_error(&e)),
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(r) => match parse_range(r, len) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return resp;
            }
        },
    };
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    if start > 0
        && let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await
    {
        return error_response(&native_error(&UploadError::Io(e)));
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(count)));
    let mut resp = (status, body).into_response();
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
    let inline = ["image/", "audio/", "video/"]
        .iter()
        .any(|p| ctype.starts_with(p));
    if !inline {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
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
fn parse_range(header: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
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
        assert_eq!(l.largest(), 500 * MIB);
        assert_eq!(MediaKind::from_message_type(2), Some(MediaKind::Image));
        assert_eq!(MediaKind::from_message_type(0), None);
        let e = UploadError::TooLarge {
            kind: Some(MediaKind::Audio),
            limit: 50 * MIB,
        };
        assert_eq!(
            e.to_string(),
            "audio files may be at most 52428800 bytes (50 MiB)"
        );
    }
}
