//! Media uploads (native `POST /v1/uploads`, Syarah `POST /api/chat/uploadFile`) and serving
//! (`GET /uploads/...`, room-scoped) over real HTTP against a real server, with real files
//! generated here: PNG, JPEG with EXIF, WAV, MP3, OGG Opus, MP4, WebM, an ELF executable, a
//! decompression bomb, empty and truncated bodies.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 answer.
struct Resp {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into()))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    }
}

/// One request over a raw socket, written in one go; `connection: close`. `content-length` is
/// the length of `body` unless given in `headers`.
async fn http(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    sock.write_all(&bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, sock.read_to_end(&mut out))
        .await
        .expect("no answer in time")
        .unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(out[..split].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let rest = &out[split + 4..];
    let status = head[9..12].parse().unwrap();
    let body = if head.contains("transfer-encoding: chunked") {
        let mut b = Vec::new();
        let mut r = rest;
        loop {
            let nl = r.windows(2).position(|w| w == b"\r\n").unwrap();
            let n =
                usize::from_str_radix(std::str::from_utf8(&r[..nl]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            b.extend_from_slice(&r[nl + 2..nl + 2 + n]);
            r = &r[nl + 2 + n + 2..];
        }
        b
    } else {
        rest.to_vec()
    };
    Resp { status, head, body }
}

enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, &'a [u8]),
}

const BOUNDARY: &str = "----palaver-test-boundary-7MA4YWxkTrZu0gW";

/// A `multipart/form-data` body and its content type. Every file part claims `image/png`:
/// the claimed type must never matter.
fn form(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match p {
            Part::Text(name, value) => {
                b.extend_from_slice(
                    format!("content-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(name, file_name, data) => {
                b.extend_from_slice(
                    format!(
                        "content-disposition: form-data; name=\"{name}\"; \
                         filename=\"{file_name}\"\r\ncontent-type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                );
                b.extend_from_slice(data);
                b.extend_from_slice(b"\r\n");
            }
        }
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), b)
}

/// Posts a raw body to `route` with `token` as Bearer if given.
async fn post_raw(
    s: &TestServer,
    route: &str,
    token: Option<&str>,
    ctype: &str,
    body: &[u8],
) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", ctype)];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    http(s, "POST", route, &headers, body).await
}

/// Posts a form to the Syarah upload route.
async fn upload(s: &TestServer, token: Option<&str>, parts: &[Part<'_>]) -> (u16, Value) {
    let (ctype, body) = form(parts);
    let r = post_raw(s, "/api/chat/uploadFile", token, &ctype, &body).await;
    (r.status, r.json())
}

/// Posts a form to the native upload route.
async fn native(s: &TestServer, token: Option<&str>, parts: &[Part<'_>]) -> (u16, Value) {
    let (ctype, body) = form(parts);
    let r = post_raw(s, "/v1/uploads", token, &ctype, &body).await;
    (r.status, r.json())
}

/// A native upload that must succeed: the `upload` object.
async fn native_ok(s: &TestServer, token: &str, parts: &[Part<'_>]) -> Value {
    let (st, body) = native(s, Some(token), parts).await;
    assert_eq!(st, 201, "{body}");
    body["upload"].clone()
}

/// A native refusal: checks status, code and that the message contains `want`.
fn refused(st: u16, body: &Value, want_status: u16, code: &str, want: &str) {
    assert_eq!(st, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let m = body["error"]["message"].as_str().unwrap();
    assert!(m.contains(want), "{want:?} not in {m:?}");
}

/// GET of a stored path, with `token` as Bearer if given.
async fn get(s: &TestServer, path: &str, token: Option<&str>) -> Resp {
    get_range(s, path, token, None).await
}

/// GET with an optional `Range` header.
async fn get_range(s: &TestServer, path: &str, token: Option<&str>, range: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    if let Some(r) = range {
        headers.push(("range", r));
    }
    http(s, "GET", path, &headers, b"").await
}

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

/// A PNG of `w` x `h` with a gradient.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) / 64 % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Text hidden in the EXIF block of [`jpeg_with_exif`]: it must not survive conversion.
const EXIF_SECRET: &[u8] = b"GPS 48.8584N 2.2945E taken by secret-camera";

/// A `w` x `h` JPEG with an APP1 EXIF block: orientation 6 (rotate 90 degrees clockwise to
/// view) and [`EXIF_SECRET`] as its image description.
fn jpeg_with_exif(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 90]));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let jpeg = jpeg.into_inner();
    // TIFF, little-endian: IFD0 at 8 with two entries, Orientation and ImageDescription.
    let mut tiff = b"II\x2a\x00\x08\x00\x00\x00".to_vec();
    let desc_at = 8 + 2 + 2 * 12 + 4;
    tiff.extend_from_slice(&2u16.to_le_bytes());
    // Orientation (0x0112), SHORT, 1, value 6.
    tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
    // ImageDescription (0x010e), ASCII, n, offset.
    let mut desc = EXIF_SECRET.to_vec();
    desc.push(0);
    tiff.extend_from_slice(&[0x0e, 0x01, 2, 0]);
    tiff.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    tiff.extend_from_slice(&(desc_at as u32).to_le_bytes());
    tiff.extend_from_slice(&0u32.to_le_bytes());
    tiff.extend_from_slice(&desc);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG whose header claims `w` x `h` pixels, with a few bytes of data: a decompression bomb
/// as far as the header goes.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A mono 8 kHz 16-bit PCM WAV of `samples` samples (a sine-ish saw).
fn wav(samples: usize) -> Vec<u8> {
    let data_len = (samples * 2) as u32;
    let mut b = b"RIFF".to_vec();
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&8000u32.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..samples {
        b.extend_from_slice(&(((i % 64) as i16 - 32) * 500).to_le_bytes());
    }
    b
}

/// An MP3: an ID3v2 tag, then MPEG-1 layer III frame headers over random payload.
fn mp3(len: usize) -> Vec<u8> {
    let mut b = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
    while b.len() < len {
        b.extend_from_slice(&[0xFF, 0xFB, 0x90, 0x64]);
        b.extend_from_slice(&random_bytes(413));
    }
    b.truncate(len);
    b
}

/// The first page of an Ogg Opus stream (`OggS`, CRC and an `OpusHead` packet), then noise.
fn ogg_opus() -> Vec<u8> {
    fn ogg_crc(data: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &b in data {
            crc ^= u32::from(b) << 24;
            for _ in 0..8 {
                crc = if crc & 0x8000_0000 != 0 {
                    (crc << 1) ^ 0x04c1_1db7
                } else {
                    crc << 1
                };
            }
        }
        crc
    }
    let mut head = b"OpusHead".to_vec();
    head.push(1); // version
    head.push(1); // channels
    head.extend_from_slice(&312u16.to_le_bytes()); // pre-skip
    head.extend_from_slice(&48_000u32.to_le_bytes());
    head.extend_from_slice(&0u16.to_le_bytes()); // gain
    head.push(0); // mapping family
    let mut page = b"OggS\x00\x02".to_vec(); // version 0, beginning of stream
    page.extend_from_slice(&0u64.to_le_bytes()); // granule
    page.extend_from_slice(&0x5041_4c41u32.to_le_bytes()); // serial
    page.extend_from_slice(&0u32.to_le_bytes()); // sequence
    page.extend_from_slice(&0u32.to_le_bytes()); // checksum, filled below
    page.push(1);
    page.push(head.len() as u8);
    page.extend_from_slice(&head);
    let crc = ogg_crc(&page);
    page[22..26].copy_from_slice(&crc.to_le_bytes());
    page.extend_from_slice(&random_bytes(2000));
    page
}

/// An MP4: an `ftyp` box (brand isom) and an `mdat` box of random bytes.
fn mp4(mdat: usize) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 0x1c];
    b.extend_from_slice(b"ftypisom\x00\x00\x02\x00isomiso2mp41");
    b.extend_from_slice(&((mdat + 8) as u32).to_be_bytes());
    b.extend_from_slice(b"mdat");
    b.extend_from_slice(&random_bytes(mdat));
    b
}

/// A WebM: its EBML header (DocType `webm`), then noise.
fn webm() -> Vec<u8> {
    let mut b = vec![0x1A, 0x45, 0xDF, 0xA3, 0x9F];
    b.extend_from_slice(&[0x42, 0x86, 0x81, 0x01, 0x42, 0xF7, 0x81, 0x01]);
    b.extend_from_slice(&[0x42, 0xF2, 0x81, 0x04, 0x42, 0xF3, 0x81, 0x08]);
    b.extend_from_slice(&[0x42, 0x82, 0x84]);
    b.extend_from_slice(b"webm");
    b.extend_from_slice(&[0x42, 0x87, 0x81, 0x04, 0x42, 0x85, 0x81, 0x02]);
    b.extend_from_slice(&random_bytes(3000));
    b
}

/// A 64-bit x86 ELF executable header followed by code-like noise.
fn elf(len: usize) -> Vec<u8> {
    let mut b = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00".to_vec();
    b.extend_from_slice(&random_bytes(len.saturating_sub(b.len())));
    b
}

/// The file on disk behind a public `/uploads/...` path (the local blob store).
fn on_disk(s: &TestServer, public: &str) -> PathBuf {
    s.dir.path().join(public.strip_prefix('/').unwrap())
}

/// True if nothing is left in the receiving directory.
fn incoming_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("uploads/.incoming"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

/// Files stored under every kind directory.
fn stored_files(s: &TestServer) -> usize {
    let uploads = s.dir.path().join("uploads/chat-messages");
    ["audios", "images", "files", "videos"]
        .iter()
        .map(|d| std::fs::read_dir(uploads.join(d)).map_or(0, |d| d.count()))
        .sum()
}

fn assert_path(data: &Value, dir: &str, ext: &str) -> String {
    let p = data.as_str().unwrap().to_owned();
    let name = p
        .strip_prefix(&format!("/uploads/chat-messages/{dir}/"))
        .unwrap_or_else(|| panic!("unexpected path {p}"));
    let (stem, e) = name.split_once('.').unwrap();
    assert_eq!(e, ext, "{p}");
    assert_eq!(stem.len(), 32, "{p}");
    assert!(stem.bytes().all(|b| b.is_ascii_hexdigit()), "{p}");
    p
}

/// True if `hay` contains `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The RIFF chunk ids of a WebP file.
fn webp_chunks(b: &[u8]) -> Vec<String> {
    assert_eq!(&b[..4], b"RIFF");
    assert_eq!(&b[8..12], b"WEBP");
    let mut out = Vec::new();
    let mut i = 12;
    while i + 8 <= b.len() {
        out.push(String::from_utf8_lossy(&b[i..i + 4]).into_owned());
        let n = u32::from_le_bytes(b[i + 4..i + 8].try_into().unwrap()) as usize;
        i += 8 + n + n % 2;
    }
    out
}

#[tokio::test]
async fn image_is_converted_to_webp_within_1920_and_served() {
    let s = TestServer::start().await;
    let t = s.token("1");
    let data = png(3000, 1000);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "holiday photo.PNG", &data),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let path = assert_path(&body["data"], "images", "webp");
    assert_eq!(
        body,
        json!({"success": true, "data": path, "message": null})
    );
    let stored = std::fs::read(on_disk(&s, &path)).unwrap();
    let img = image::load_from_memory_with_format(&stored, image::ImageFormat::WebP).unwrap();
    assert_eq!((img.width(), img.height()), (1920, 640));

    // The uploader reads it back.
    let r = get(&s, &path, Some(&t)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("image/webp"));
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(r.body, stored);
    // Nobody else: it was posted nowhere.
    let r = get(&s, &path, Some(&s.token("2"))).await;
    assert_eq!(r.status, 403, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "forbidden");

    // A small image keeps its size; the name's extension does not matter for images.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "x.jpg", &png(40, 30)),
            Part::Text("messageType", "2"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let path = assert_path(&body["data"], "images", "webp");
    let img = image::open(on_disk(&s, &path)).unwrap();
    assert_eq!((img.width(), img.height()), (40, 30));
    s.shutdown().await;
}

#[tokio::test]
async fn jpeg_exif_is_applied_then_stripped() {
    let s = TestServer::start().await;
    let t = s.token("1");
    let jpeg = jpeg_with_exif(40, 30);
    assert!(contains(&jpeg, EXIF_SECRET) && contains(&jpeg, b"Exif\0\0"));
    let u = native_ok(
        &s,
        &t,
        &[
            Part::Text("kind", "image"),
            Part::File("file", "IMG_0001.JPG", &jpeg),
        ],
    )
    .await;
    let path = assert_path(&u["path"], "images", "webp");
    assert_eq!(u["kind"], "image");
    assert_eq!(u["content_type"], "image/webp");
    let stored = std::fs::read(on_disk(&s, &path)).unwrap();
    assert_eq!(u["size"], stored.len());
    // Turned upright by its orientation (6: 90 degrees), then nothing of the EXIF block left.
    let img = image::load_from_memory_with_format(&stored, image::ImageFormat::WebP).unwrap();
    assert_eq!((img.width(), img.height()), (30, 40));
    let chunks = webp_chunks(&stored);
    assert_eq!(
        chunks,
        vec!["VP8L".to_owned()],
        "only the image: {chunks:?}"
    );
    assert!(!contains(&stored, EXIF_SECRET));
    assert!(!contains(&stored, b"Exif"));
    let r = get(&s, &path, Some(&t)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, stored);
    s.shutdown().await;
}

/// A native upload case: the form, then the expected kind, directory, extension and
/// Content-Type, and the original bytes when the file is stored as sent.
type Case<'a> = (
    Vec<Part<'a>>,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a [u8]>,
);

#[tokio::test]
async fn native_uploads_of_every_kind_are_sniffed_and_served() {
    let s = TestServer::start().await;
    let t = s.token("1");
    // (parts, kind, dir, ext, content type, original bytes when stored as sent)
    let wav = wav(16_000);
    let mp3 = mp3(50_000);
    let ogg = ogg_opus();
    let mp4 = mp4(40_000);
    let webm = webm();
    let exe = elf(10_000);
    let notes = b"shopping: milk, eggs".to_vec();
    let png = png(64, 48);
    let cases: Vec<Case<'_>> = vec![
        // No kind: the content's.
        (
            vec![Part::File("file", "a.bin", &png)],
            "image",
            "images",
            "webp",
            "image/webp",
            None,
        ),
        (
            vec![Part::File("file", "recording", &wav)],
            "audio",
            "audios",
            "wav",
            "audio/wav",
            Some(&wav),
        ),
        (
            vec![Part::File("file", "song.ogg", &mp3)],
            "audio",
            "audios",
            "mp3",
            "audio/mpeg",
            Some(&mp3),
        ),
        (
            vec![Part::File("file", "movie.mkv", &mp4)],
            "video",
            "videos",
            "mp4",
            "video/mp4",
            Some(&mp4),
        ),
        (
            vec![Part::File("file", "notes.txt", &notes)],
            "file",
            "files",
            "txt",
            "text/plain; charset=utf-8",
            Some(&notes),
        ),
        // Named kinds.
        (
            vec![
                Part::Text("kind", "voice"),
                Part::Text("duration", "3.4"),
                Part::File("file", "blob", &ogg),
            ],
            "voice",
            "audios",
            "ogg",
            "audio/ogg",
            Some(&ogg),
        ),
        (
            vec![
                Part::File("file", "blob", &webm),
                Part::Text("kind", "voice"),
            ],
            "voice",
            "audios",
            "webm",
            "video/webm",
            Some(&webm),
        ),
        (
            vec![Part::Text("kind", "video"), Part::File("file", "c", &webm)],
            "video",
            "videos",
            "webm",
            "video/webm",
            Some(&webm),
        ),
        (
            vec![
                Part::Text("kind", "audio"),
                Part::File("file", "x.mp4", &mp4),
            ],
            "audio",
            "audios",
            "m4a",
            "audio/mp4",
            Some(&mp4),
        ),
        (
            vec![
                Part::Text("kind", "file"),
                Part::File("file", "photo.png", &exe),
            ],
            "file",
            "files",
            "bin",
            "application/octet-stream",
            Some(&exe),
        ),
        (
            vec![
                Part::Text("kind", "file"),
                Part::File("file", "a.png", &mp3),
            ],
            "file",
            "files",
            "mp3",
            "audio/mpeg",
            Some(&mp3),
        ),
    ];
    for (parts, kind, dir, ext, ctype, original) in &cases {
        let u = native_ok(&s, &t, parts).await;
        let path = assert_path(&u["path"], dir, ext);
        assert_eq!(
            (u["kind"].as_str(), u["content_type"].as_str()),
            (Some(*kind), Some(*ctype)),
            "{u}"
        );
        let stored = std::fs::read(on_disk(&s, &path)).unwrap();
        assert_eq!(u["size"], stored.len(), "{u}");
        if let Some(o) = original {
            assert_eq!(&stored, o, "{path} is stored as sent");
        }
        let r = get(&s, &path, Some(&t)).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type").as_deref(), Some(*ctype), "{path}");
        assert_eq!(r.body, stored, "{path}");
        let attachment = r.header("content-disposition").as_deref() == Some("attachment");
        assert_eq!(attachment, *kind == "file" && *ext != "mp3", "{path}");
    }
    // The voice note's duration is echoed (rounded).
    let u = native_ok(
        &s,
        &t,
        &[
            Part::Text("kind", "voice"),
            Part::Text("duration", "3.4"),
            Part::File("file", "v.wav", &wav),
        ],
    )
    .await;
    assert_eq!(u["duration"], 3, "{u}");
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

#[tokio::test]
async fn native_refusals_are_precise_and_store_nothing() {
    let s = TestServer::start().await;
    let t = s.token("1");
    let elf = elf(20_000);

    // Token first: missing, invalid.
    let (st, body) = native(&s, None, &[Part::File("file", "a.txt", b"x")]).await;
    refused(st, &body, 401, "unauthorized", "missing token");
    let (st, body) = native(&s, Some("garbage"), &[Part::File("file", "a.txt", b"x")]).await;
    refused(st, &body, 401, "unauthorized", "");

    // A renamed executable sent as an image, audio, video or voice: 415, whatever the name.
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "image"),
            Part::File("file", "photo.png", &elf),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is application/x-executable, not an image (PNG, JPEG, GIF, WebP or BMP)",
    );
    for (kind, want) in [
        ("audio", "not audio (mp3, wav, ogg, m4a, aac, flac or wma)"),
        (
            "video",
            "not a video (mp4, avi, mov, wmv, flv, webm or mkv)",
        ),
        ("voice", "not a voice recording"),
    ] {
        let (st, body) = native(
            &s,
            Some(&t),
            &[
                Part::Text("kind", kind),
                Part::File("file", "clip.mp4", &elf),
            ],
        )
        .await;
        refused(st, &body, 415, "unsupported_media_type", want);
    }
    // The kind after the file works the same.
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::File("file", "clip.mp4", &elf),
            Part::Text("kind", "video"),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is application/x-executable",
    );
    // A PNG is not audio; WebM is not plain audio; random bytes are nothing.
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "audio"),
            Part::File("file", "a.mp3", &png(8, 8)),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is image/png, not audio",
    );
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "audio"),
            Part::File("file", "a.webm", &webm()),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is video/webm, not audio",
    );
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "video"),
            Part::File("file", "a.mp4", &random_bytes(30_000)),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is not recognised as a video",
    );

    // Empty file, with or without a kind.
    for parts in [
        vec![Part::File("file", "a.png", b"")],
        vec![
            Part::Text("kind", "image"),
            Part::File("file", "a.png", b""),
        ],
    ] {
        let (st, body) = native(&s, Some(&t), &parts).await;
        refused(st, &body, 400, "invalid_field", "empty file");
    }
    // Corrupt images: random bytes as an image, a truncated PNG.
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "image"),
            Part::File("file", "a.png", &random_bytes(5000)),
        ],
    )
    .await;
    refused(
        st,
        &body,
        400,
        "invalid_field",
        "image could not be decoded: ",
    );
    let mut cut = png(200, 200);
    cut.truncate(cut.len() / 2);
    let (st, body) = native(&s, Some(&t), &[Part::File("file", "a.png", &cut)]).await;
    refused(
        st,
        &body,
        400,
        "invalid_field",
        "image could not be decoded: ",
    );
    // Decompression bombs, refused from the header: 100000 x 100000, and 12000 x 12000.
    let (st, body) = native(
        &s,
        Some(&t),
        &[Part::File(
            "file",
            "bomb.png",
            &png_header_only(100_000, 100_000),
        )],
    )
    .await;
    refused(
        st,
        &body,
        413,
        "file_too_large",
        "image is too large to convert: ",
    );
    let (st, body) = native(
        &s,
        Some(&t),
        &[Part::File(
            "file",
            "bomb.png",
            &png_header_only(12_000, 12_000),
        )],
    )
    .await;
    refused(
        st,
        &body,
        413,
        "file_too_large",
        "12000x12000 is more than 100000000 pixels",
    );
    // A HEIF photo: an image, but not one the converter reads.
    let mut heic = vec![0, 0, 0, 0x18];
    heic.extend_from_slice(b"ftypheic\x00\x00\x00\x00mif1heic");
    heic.extend_from_slice(&random_bytes(1000));
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "image"),
            Part::File("file", "p.heic", &heic),
        ],
    )
    .await;
    refused(
        st,
        &body,
        415,
        "unsupported_media_type",
        "content is image/heif, which cannot be converted",
    );

    // Form mistakes.
    let tiny = png(4, 4);
    let cases: Vec<(Vec<Part<'_>>, &str)> = vec![
        (
            vec![Part::Text("kind", "sticker"), Part::File("file", "a", b"x")],
            "kind must be image, audio, video, file or voice; got \"sticker\"",
        ),
        (
            vec![
                Part::Text("kind", "file"),
                Part::Text("kind", "file"),
                Part::File("file", "a", b"x"),
            ],
            "kind is given more than once",
        ),
        (
            vec![
                Part::Text("duration", "soon"),
                Part::File("file", "a", b"x"),
            ],
            "duration must be a non-negative number of seconds",
        ),
        (
            vec![Part::Text("duration", "-1"), Part::File("file", "a", b"x")],
            "duration must be a non-negative number of seconds",
        ),
        (
            vec![
                Part::Text("duration", "4"),
                Part::File("file", "a.txt", b"x"),
            ],
            "duration applies to voice, audio and video uploads only; this is a file upload",
        ),
        (
            vec![
                Part::Text("duration", "4"),
                Part::File("file", "a.png", &tiny),
            ],
            "this is an image upload",
        ),
        (
            vec![Part::File("file", "a", b"x"), Part::File("file", "b", b"y")],
            "only one file may be uploaded per request",
        ),
        (
            vec![Part::Text("kind", "file")],
            "file is required: a multipart field named \"file\"",
        ),
    ];
    for (parts, want) in cases {
        let (st, body) = native(&s, Some(&t), &parts).await;
        refused(st, &body, 400, "invalid_field", want);
    }
    // Not a form; a truncated form (the body ends inside the file, no closing boundary).
    let r = post_raw(&s, "/v1/uploads", Some(&t), "application/json", b"{}").await;
    refused(
        r.status,
        &r.json(),
        400,
        "invalid_field",
        "expected a multipart/form-data body",
    );
    let (ctype, whole) = form(&[
        Part::Text("kind", "audio"),
        Part::File("file", "a.wav", &wav(40_000)),
    ]);
    let cut = &whole[..whole.len() / 2];
    let r = post_raw(&s, "/v1/uploads", Some(&t), &ctype, cut).await;
    refused(
        r.status,
        &r.json(),
        400,
        "invalid_field",
        "malformed multipart body",
    );

    // Nothing was stored, nothing left behind.
    assert_eq!(stored_files(&s), 0);
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

#[tokio::test]
async fn downloads_are_for_the_uploader_and_members_of_rooms_it_was_posted_in() {
    let s = TestServer::start().await;
    let (t1, t2, t3) = (s.token("1"), s.token("2"), s.token("3"));
    let mut a = s.connect("1").await;
    let _b = s.connect("2").await;
    let _c = s.connect("3").await;
    let image = native_ok(&s, &t1, &[Part::File("file", "p.png", &png(20, 20))]).await;
    let image = image["path"].as_str().unwrap().to_owned();
    let audio = wav(50_000);
    let voice = native_ok(
        &s,
        &t1,
        &[
            Part::Text("kind", "voice"),
            Part::File("file", "v.wav", &audio),
        ],
    )
    .await;
    let voice = voice["path"].as_str().unwrap().to_owned();

    // Before it is posted: only the uploader.
    assert_eq!(get(&s, &image, Some(&t1)).await.status, 200);
    let r = get(&s, &image, Some(&t2)).await;
    assert_eq!(r.status, 403, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "forbidden");

    // Posted in a group with user 2: user 2 reads both; user 3, not a member, still cannot.
    let room = group(&mut a, "g", &["2"]).await;
    a.ok(
        "send",
        json!({"room": room, "type": "image", "media": image}),
    )
    .await;
    a.ok(
        "send",
        json!({"room": room, "type": "audio", "media": voice, "duration": 6}),
    )
    .await;
    // The room records a media post before the message is written and acknowledged, so a
    // member may fetch the file as soon as the send is acknowledged.
    let r = get(&s, &image, Some(&t2)).await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(r.header("content-type").as_deref(), Some("image/webp"));
    let r = http(&s, "GET", &format!("{voice}?token={t2}"), &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(r.body, audio);
    for p in [&image, &voice] {
        let r = get(&s, p, Some(&t3)).await;
        assert_eq!(r.status, 403, "{}", r.json());
        assert_eq!(r.json()["error"]["code"], "forbidden");
    }
    // Posting shares a file, so only someone who may read it may post it: user 3, who learnt
    // the path somehow, cannot share it into a room of theirs; user 2, a member of the room it
    // was posted in, may forward it.
    let mut c = s.connect("3").await;
    let elsewhere = group(&mut c, "c's", &["1"]).await;
    let (code, msg) = c
        .err(
            "send",
            json!({"room": elsewhere, "type": "image", "media": image}),
        )
        .await;
    assert_eq!(code, "forbidden", "{msg}");
    assert!(msg.contains("cannot post"), "{msg}");
    assert_eq!(get(&s, &image, Some(&t3)).await.status, 403);
    let mut b = s.connect("2").await;
    let theirs = group(&mut b, "b's", &["3"]).await;
    b.ok(
        "send",
        json!({"room": theirs, "type": "image", "media": image}),
    )
    .await;
    assert_eq!(get(&s, &image, Some(&t3)).await.status, 200);
    let (code, _) = c
        .err(
            "send",
            json!({"room": elsewhere, "type": "image", "media": "/uploads/chat-messages/images/none.webp"}),
        )
        .await;
    assert_eq!(code, "not_found");

    // Ranges for the member: a slice, a suffix, an open end; past the end is 416.
    let r = get_range(&s, &voice, Some(&t2), Some("bytes=10-19")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &audio[10..20]);
    let want = format!("bytes 10-19/{}", audio.len());
    assert_eq!(r.header("content-range").as_deref(), Some(want.as_str()));
    assert_eq!(r.header("content-length").as_deref(), Some("10"));
    let r = get_range(&s, &voice, Some(&t2), Some("bytes=-5")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &audio[audio.len() - 5..]);
    let r = get_range(&s, &voice, Some(&t2), Some("bytes=99000-")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &audio[99_000..]);
    let r = get_range(&s, &voice, Some(&t2), Some("bytes=100044-")).await;
    assert_eq!(r.status, 416);
    let want = format!("bytes */{}", audio.len());
    assert_eq!(r.header("content-range").as_deref(), Some(want.as_str()));
    // A non-member gets no range either.
    let r = get_range(&s, &voice, Some(&t3), Some("bytes=0-9")).await;
    assert_eq!(r.status, 403);

    // A path never uploaded: 404 for anyone.
    let r = get(
        &s,
        "/uploads/chat-messages/images/0123456789abcdef.webp",
        Some(&t1),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "not_found");
    s.shutdown().await;
}

#[tokio::test]
async fn syarah_uploads_are_sniffed_stored_and_served() {
    let s = TestServer::start().await;
    let t = s.token("1");
    // Larger than the router-wide body limit (the frame limit, 64 KiB) and than 1 MiB;
    // messageType comes after the file.
    let data = mp3(3 * 1024 * 1024 + 17);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "voice note.MP3", &data),
            Part::Text("messageType", "1"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let path = assert_path(&body["data"], "audios", "mp3");
    assert_eq!(body["success"], true);
    assert_eq!(body["message"], Value::Null);
    assert_eq!(std::fs::read(on_disk(&s, &path)).unwrap(), data);

    // Served with ?token= as well as Bearer, streamed, with the type of its content.
    let r = http(&s, "GET", &format!("{path}?token={t}"), &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("audio/mpeg"));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(r.body, data);
    let r = get_range(&s, &path, Some(&t), Some("bytes=10-19")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[10..20]);

    // A video, whatever its name says, and an HTML page as a file.
    let video = webm();
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "clip.mp4", &video),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let vpath = assert_path(&body["data"], "videos", "webm");
    let r = get(&s, &vpath, Some(&t)).await;
    assert_eq!(
        (r.status, r.header("content-type").as_deref()),
        (200, Some("video/webm"))
    );
    assert_eq!(r.body, video);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("file", "../../evil.html", b"<script>alert(1)</script>"),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let fpath = assert_path(&body["data"], "files", "html");
    let r = get(&s, &fpath, Some(&t)).await;
    assert_eq!(r.status, 200);
    // Never rendered as a page of this origin.
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        r.header("content-disposition").as_deref(),
        Some("attachment")
    );
    assert!(
        r.header("content-security-policy")
            .unwrap()
            .contains("sandbox")
    );

    // Without a token, with a bad one.
    let r = get(&s, &path, None).await;
    assert_eq!(r.status, 401, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    let r = get(&s, &path, Some("not-a-jwt")).await;
    assert_eq!(r.status, 401);
    // Traversal, hidden and odd paths; then a missing file.
    for bad in [
        "/uploads/../../etc/passwd",
        "/uploads/chat-messages/%2e%2e/%2e%2e/x",
        "/uploads/chat-messages/audios/..%2F..%2F..%2Fjwt_secret",
        "/uploads/%2Fetc%2Fpasswd",
        "/uploads/chat-messages//audios/x.mp3",
        "/uploads/chat-messages/audios/a%5C..%5Cb",
        "/uploads/chat-messages/audios/a%00b",
        "/uploads/.incoming/x.part",
    ] {
        let r = get(&s, bad, Some(&t)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.json());
        assert_eq!(r.json()["error"]["code"], "invalid_field", "{bad}");
    }
    let r = get(&s, "/uploads/chat-messages/audios/nope.mp3", Some(&t)).await;
    assert_eq!(r.status, 404);
    let r = get(&s, "/uploads/chat-messages/audios", Some(&t)).await;
    assert_eq!(r.status, 404);
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

#[tokio::test]
async fn syarah_refusals_answer_the_envelope_with_the_reason() {
    let s = TestServer::start().await;
    let t = s.token("1");
    let err = |st: u16, body: &Value, want_status: u16, want: &str| {
        assert_eq!(st, want_status, "{body}");
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["data"], Value::Null, "{body}");
        let m = body["message"].as_str().unwrap();
        assert!(m.contains(want), "{want:?} not in {m:?}");
    };

    // Content that is not the messageType's, either order of the fields; names do not help.
    let exe = elf(4096);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "clip.mp4", &exe),
        ],
    )
    .await;
    err(
        st,
        &body,
        415,
        "content is application/x-executable, not a video",
    );
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "photo.png", &exe),
            Part::Text("messageType", "2"),
        ],
    )
    .await;
    err(
        st,
        &body,
        415,
        "content is application/x-executable, not an image",
    );
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "song.mp3", b"ID? not audio"),
            Part::Text("messageType", "1"),
        ],
    )
    .await;
    err(st, &body, 415, "content is not recognised as audio");

    // Token: missing, invalid.
    let ok_form = [
        Part::Text("messageType", "3"),
        Part::File("file", "a.txt", b"hello"),
    ];
    let (st, body) = upload(&s, None, &ok_form).await;
    err(st, &body, 401, "missing token");
    let (st, body) = upload(&s, Some("garbage"), &ok_form).await;
    err(st, &body, 401, "");

    // messageType: missing, out of range, not a number; file missing.
    let (st, body) = upload(&s, Some(&t), &[Part::File("file", "a.txt", b"hello")]).await;
    err(st, &body, 400, "messageType is required");
    for bad in ["0", "5", "two", ""] {
        let (st, body) = upload(
            &s,
            Some(&t),
            &[
                Part::Text("messageType", bad),
                Part::File("file", "a.txt", b"x"),
            ],
        )
        .await;
        err(st, &body, 400, "messageType must be 1 (audio), 2 (image)");
    }
    let (st, body) = upload(&s, Some(&t), &[Part::Text("messageType", "3")]).await;
    err(st, &body, 400, "file is required");
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("file", "a.txt", b""),
        ],
    )
    .await;
    err(st, &body, 400, "empty file");

    // Not an image; a truncated PNG: recognised, then undecodable.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "photo.png", &random_bytes(4096)),
        ],
    )
    .await;
    err(st, &body, 400, "image could not be decoded: ");
    let mut cut = png(100, 100);
    cut.truncate(cut.len() / 2);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "photo.png", &cut),
        ],
    )
    .await;
    err(st, &body, 400, "image could not be decoded: ");

    // Decompression bombs are refused from their header: too wide, too many pixels.
    for (w, h, want) in [
        (60_000, 10, "image is too large to convert: "),
        (12_000, 12_000, "12000x12000 is more than 100000000 pixels"),
    ] {
        let (st, body) = upload(
            &s,
            Some(&t),
            &[
                Part::Text("messageType", "2"),
                Part::File("file", "bomb.png", &png_header_only(w, h)),
            ],
        )
        .await;
        err(st, &body, 413, want);
    }

    // Not a form at all.
    let r = post_raw(
        &s,
        "/api/chat/uploadFile",
        Some(&t),
        "application/json",
        b"{}",
    )
    .await;
    err(
        r.status,
        &r.json(),
        400,
        "expected a multipart/form-data body",
    );

    // Nothing was stored, nothing left behind.
    assert_eq!(stored_files(&s), 0);
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

#[tokio::test]
async fn limits_come_from_the_environment() {
    let env: HashMap<String, String> = [
        ("PALAVER_UPLOAD_MAX_FILE_BYTES", "1000"),
        ("PALAVER_UPLOAD_MAX_IMAGE_BYTES", "2000"),
        ("PALAVER_UPLOAD_MAX_VIDEO_BYTES", "3000"),
        ("PALAVER_UPLOAD_MAX_VOICE_BYTES", "1500"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let s = TestServer::start_with(|b| b.apply_env(&env).unwrap()).await;
    let t = s.token("1");
    let small = random_bytes(1000);
    let big = random_bytes(5000);
    let too_large = |st: u16, body: &Value, want: &str| {
        assert_eq!(st, 413, "{body}");
        assert_eq!(body["success"], false);
        assert_eq!(body["data"], Value::Null);
        let m = body["message"].as_str().unwrap();
        assert!(m.contains(want), "{want:?} not in {m:?}");
    };
    // Exactly the limit is fine.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("file", "a.bin", &small),
        ],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Over it: caught while streaming (type first) or once the type is known (type last).
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("file", "a.bin", &big),
        ],
    )
    .await;
    too_large(st, &body, "file files may be at most 1000 bytes");
    // Audio shares the file limit unless PALAVER_UPLOAD_MAX_AUDIO_BYTES is set.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "a.mp3", &mp3(2500)),
            Part::Text("messageType", "1"),
        ],
    )
    .await;
    too_large(st, &body, "audio files may be at most 1000 bytes");
    // Type last and larger than every limit: refused while streaming.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "a.mp3", &big),
            Part::Text("messageType", "1"),
        ],
    )
    .await;
    too_large(st, &body, "the upload may be at most 3000 bytes");
    let mut big_png = png(8, 8);
    big_png.extend_from_slice(&random_bytes(3000));
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "a.png", &big_png),
        ],
    )
    .await;
    too_large(st, &body, "image files may be at most 2000 bytes");
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "a.mp4", &mp4(3001)),
        ],
    )
    .await;
    too_large(st, &body, "video files may be at most 3000 bytes");
    // The native route: voice has its own limit; without a kind, the content's kind's limit.
    let (st, body) = native(
        &s,
        Some(&t),
        &[
            Part::Text("kind", "voice"),
            Part::File("file", "v.wav", &wav(1000)),
        ],
    )
    .await;
    refused(
        st,
        &body,
        413,
        "file_too_large",
        "voice files may be at most 1500 bytes",
    );
    let (st, body) = native(&s, Some(&t), &[Part::File("file", "v.wav", &wav(1000))]).await;
    refused(
        st,
        &body,
        413,
        "file_too_large",
        "audio files may be at most 1000 bytes",
    );
    // The whole request is capped too (largest limit plus form overhead), even in fields that
    // are ignored.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("junk", "j.bin", &random_bytes(80 * 1024)),
            Part::File("file", "a.bin", &small),
        ],
    )
    .await;
    too_large(st, &body, "the upload may be at most");
    assert_eq!(stored_files(&s), 1, "only the first file");
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;

    let load = |pairs: &[(&str, &str)]| {
        palaver_gateway::config::Config::load(
            None,
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let e = load(&[("PALAVER_UPLOAD_MAX_VIDEO_BYTES", "0")]).unwrap_err();
    assert!(
        e.to_string().contains("PALAVER_UPLOAD_MAX_VIDEO_BYTES"),
        "{e}"
    );
    let c = load(&[
        ("PALAVER_UPLOAD_MAX_FILE_BYTES", "1000"),
        ("PALAVER_UPLOAD_MAX_AUDIO_BYTES", "4000"),
    ])
    .unwrap();
    assert_eq!(
        (c.uploads.max_file_bytes, c.uploads.max_audio_bytes),
        (1000, 4000)
    );
    let c = load(&[]).unwrap();
    assert_eq!(
        (
            c.uploads.max_image_bytes,
            c.uploads.max_audio_bytes,
            c.uploads.max_voice_bytes
        ),
        (10 << 20, 50 << 20, 20 << 20)
    );
    assert_eq!(
        c.upload_storage,
        palaver_gateway::uploads::UploadStorage::Local
    );
    // S3 settings: a bucket, optionally an endpoint and a region.
    let c = load(&[
        ("PALAVER_UPLOAD_S3_BUCKET", "media"),
        ("PALAVER_UPLOAD_S3_ENDPOINT", "http://127.0.0.1:9000"),
        ("PALAVER_UPLOAD_S3_REGION", "eu-west-1"),
    ])
    .unwrap();
    assert_eq!(
        c.upload_storage,
        palaver_gateway::uploads::UploadStorage::S3(palaver_gateway::uploads::S3Storage {
            bucket: "media".into(),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: Some("eu-west-1".into()),
        })
    );
    for (pairs, want) in [
        (
            vec![("PALAVER_UPLOAD_S3_ENDPOINT", "http://127.0.0.1:9000")],
            "PALAVER_UPLOAD_S3_ENDPOINT: needs PALAVER_UPLOAD_S3_BUCKET",
        ),
        (
            vec![
                ("PALAVER_UPLOAD_S3_BUCKET", "media"),
                ("PALAVER_UPLOAD_S3_ENDPOINT", "minio:9000"),
            ],
            "must start with http:// or https://",
        ),
    ] {
        let e = load(&pairs).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// The S3-compatible storage, against a real server: only with `PALAVER_TEST_S3_ENDPOINT`
/// (e.g. `http://127.0.0.1:5000`) and `PALAVER_TEST_S3_BUCKET` (an existing bucket), with
/// credentials in the usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. Skipped otherwise.
#[tokio::test]
async fn s3_storage_when_configured() {
    let (Ok(endpoint), Ok(bucket)) = (
        std::env::var("PALAVER_TEST_S3_ENDPOINT"),
        std::env::var("PALAVER_TEST_S3_BUCKET"),
    ) else {
        eprintln!("skipped: set PALAVER_TEST_S3_ENDPOINT and PALAVER_TEST_S3_BUCKET");
        return;
    };
    let s = TestServer::start_with(|b| {
        b.upload_s3_bucket = Some(bucket);
        b.upload_s3_endpoint = Some(endpoint);
        b.upload_s3_region = Some("us-east-1".into());
    })
    .await;
    let t = s.token("1");
    // One request (an image, converted), and a multipart upload (larger than a part).
    let image = native_ok(&s, &t, &[Part::File("file", "p.png", &png(300, 200))]).await;
    let video = mp4(9 * 1024 * 1024 + 123);
    let clip = native_ok(&s, &t, &[Part::File("file", "clip.mp4", &video)]).await;
    assert_eq!(clip["size"], video.len());
    let r = get(&s, image["path"].as_str().unwrap(), Some(&t)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, image["size"].as_u64().unwrap());
    let path = clip["path"].as_str().unwrap();
    let r = get(&s, path, Some(&t)).await;
    assert_eq!(r.status, 200);
    assert!(r.body == video, "the video comes back whole");
    let r = get_range(&s, path, Some(&t), Some("bytes=8388600-8388615")).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &video[8_388_600..8_388_616]);
    // Nothing on the local disk but the (empty) receiving directory.
    assert_eq!(stored_files(&s), 0);
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

/// Measures the conversion of a 4000x3000 PNG (run with `--ignored --nocapture`).
#[tokio::test]
#[ignore = "measurement"]
async fn measure_4000x3000_png_to_webp() {
    let s = TestServer::start_with(|b| b.upload_max_image_bytes = Some(50 << 20)).await;
    let t = s.token("1");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % 16) as u32;
        image::Rgb([
            ((x / 16 + n) % 256) as u8,
            ((y / 12 + n) % 256) as u8,
            (((x + y) / 28 + n) % 256) as u8,
        ])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    // The same bytes as a plain file: the cost of the transfer and storage alone.
    let started = std::time::Instant::now();
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "3"),
            Part::File("file", "big.png", &png),
        ],
    )
    .await;
    let plain = started.elapsed();
    assert_eq!(st, 200, "{body}");
    let started = std::time::Instant::now();
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "big.png", &png),
        ],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(st, 200, "{body}");
    let out = std::fs::metadata(on_disk(&s, body["data"].as_str().unwrap()))
        .unwrap()
        .len();
    println!(
        "4000x3000 PNG ({} bytes) -> 1920x1440 WebP ({out} bytes): upload + conversion \
         {took:?}; the same bytes as a plain file {plain:?}",
        png.len()
    );
    s.shutdown().await;
}
