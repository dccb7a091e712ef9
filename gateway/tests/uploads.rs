//! Media uploads (`POST /api/chat/uploadFile`, seed 001) and serving (`GET /uploads/...`) over
//! real HTTP against a real server.
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

/// One request over a raw socket, written in one go; `connection: close`.
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

/// A `multipart/form-data` body and its content type.
fn form(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = "----palaver-test-boundary-7MA4YWxkTrZu0gW";
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
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
                         filename=\"{file_name}\"\r\ncontent-type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                b.extend_from_slice(data);
                b.extend_from_slice(b"\r\n");
            }
        }
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), b)
}

/// Posts a form to the upload route, with `token` as Bearer if given.
async fn upload(s: &TestServer, token: Option<&str>, parts: &[Part<'_>]) -> (u16, Value) {
    let (ctype, body) = form(parts);
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", ctype.as_str())];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let r = http(s, "POST", "/api/chat/uploadFile", &headers, &body).await;
    (r.status, r.json())
}

/// GET of a stored path, with `token` as Bearer if given.
async fn get(s: &TestServer, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
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

/// A PNG whose header claims `w` x `h` pixels, with a few bytes of data: a decompression bomb
/// as far as the header goes.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
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

/// The file on disk behind a public `/uploads/...` path.
fn on_disk(s: &TestServer, public: &str) -> PathBuf {
    s.dir.path().join(public.strip_prefix('/').unwrap())
}

/// True if nothing is left in the receiving directory.
fn incoming_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("uploads/.incoming"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
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

    let r = get(&s, &path, Some(&s.token("2"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("image/webp"));
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(r.body, stored);

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
async fn audio_of_several_megabytes_is_stored_and_served() {
    let s = TestServer::start().await;
    let t = s.token("1");
    // Larger than the router-wide body limit (the frame limit, 64 KiB) and than 1 MiB;
    // messageType comes after the file.
    let data = random_bytes(3 * 1024 * 1024 + 17);
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

    // Served with ?token= as well as Bearer, streamed, with the type of its extension.
    let r = http(&s, "GET", &format!("{path}?token={t}"), &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("audio/mpeg"));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(r.body, data);
    // A byte range (players seek with them).
    let r = http(
        &s,
        "GET",
        &path,
        &[
            ("authorization", &format!("Bearer {t}")),
            ("range", "bytes=10-19"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[10..20]);
    let range = format!("bytes 10-19/{}", data.len());
    assert_eq!(r.header("content-range").as_deref(), Some(range.as_str()));

    // A video and a document.
    let video = random_bytes(200_000);
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "clip.webm", &video),
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
async fn refused_uploads_answer_the_envelope_with_the_reason() {
    let s = TestServer::start().await;
    let t = s.token("1");
    let err = |st: u16, body: &Value, want_status: u16, want: &str| {
        assert_eq!(st, want_status, "{body}");
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["data"], Value::Null, "{body}");
        let m = body["message"].as_str().unwrap();
        assert!(m.contains(want), "{want:?} not in {m:?}");
    };

    // Wrong extension for a video, either order of the fields.
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "clip.exe", b"MZ..."),
        ],
    )
    .await;
    err(
        st,
        &body,
        400,
        "video files must have one of the extensions mp4, avi",
    );
    assert!(
        body["message"].as_str().unwrap().contains("\"exe\""),
        "{body}"
    );
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "clip", b"data"),
            Part::Text("messageType", "4"),
        ],
    )
    .await;
    err(st, &body, 400, "got none");
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "song.exe", b"data"),
            Part::Text("messageType", "1"),
        ],
    )
    .await;
    err(
        st,
        &body,
        400,
        "audio files must have one of the extensions",
    );

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
    err(st, &body, 400, "the file is empty");

    // Not an image.
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
    // A truncated PNG: recognised, then undecodable.
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
    let r = http(
        &s,
        "POST",
        "/api/chat/uploadFile",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("content-type", "application/json"),
        ],
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
    let uploads = s.dir.path().join("uploads/chat-messages");
    for d in ["audios", "images", "files", "videos"] {
        let n = std::fs::read_dir(uploads.join(d)).map_or(0, |d| d.count());
        assert_eq!(n, 0, "{d}");
    }
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;
}

#[tokio::test]
async fn limits_come_from_the_environment() {
    let env: HashMap<String, String> = [
        ("PALAVER_UPLOAD_MAX_FILE_BYTES", "1000"),
        ("PALAVER_UPLOAD_MAX_IMAGE_BYTES", "2000"),
        ("PALAVER_UPLOAD_MAX_VIDEO_BYTES", "3000"),
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
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::File("file", "a.mp3", &random_bytes(2500)),
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
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "2"),
            Part::File("file", "a.png", &big),
        ],
    )
    .await;
    too_large(st, &body, "image files may be at most 2000 bytes");
    let (st, body) = upload(
        &s,
        Some(&t),
        &[
            Part::Text("messageType", "4"),
            Part::File("file", "a.mp4", &random_bytes(3001)),
        ],
    )
    .await;
    too_large(st, &body, "video files may be at most 3000 bytes");
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
    assert!(incoming_empty(s.dir.path()));
    s.shutdown().await;

    let e = palaver_gateway::config::Config::load(
        None,
        &[("PALAVER_UPLOAD_MAX_VIDEO_BYTES".to_owned(), "0".to_owned())].into(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("PALAVER_UPLOAD_MAX_VIDEO_BYTES"),
        "{e}"
    );
}

/// Measures the conversion of a 4000x3000 PNG (run with `--ignored --nocapture`).
#[tokio::test]
#[ignore = "measurement"]
async fn measure_4000x3000_png_to_webp() {
    let s = TestServer::start().await;
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
