//! WebSocket upgrade with a frame-size guard in front of the codec.
//!
//! Every WebSocket dialect that Palaver implements itself (native, Phoenix, type-tagged,
//! event/data) is upgraded here rather than by axum's `WebSocketUpgrade`, for one reason: an
//! oversized frame must be refused **from its header**, before its payload is buffered, and the
//! connection must stay usable afterwards. A plain WebSocket codec can only do the first half: it
//! reads the declared length, errors, and the unread payload leaves the stream unusable.
//!
//! [`FrameGuard`] sits between the socket and `tungstenite` and reads client frame headers only
//! (RFC 6455 section 5.2: opcode, FIN, length). A data frame that starts a message and declares
//! more than the limit is not passed on: its payload (and that of its continuation frames) is read
//! and discarded in fixed-size chunks, never held, and the session is told through a bounded
//! queue ([`Dropped`]) so that it can answer `frame_too_large`. Everything else passes through untouched;
//! `tungstenite` still does all of the protocol. Two cases still close the connection with
//! 1009, from `tungstenite`'s own limits: a fragmented message whose first fragments fit but
//! whose total does not (those fragments were already passed on), and a frame declaring more
//! than [`SKIP_FACTOR`] times the limit (not worth reading just to discard).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Bytes read from a socket at a time, by the guard and by the WebSocket codec.
const READ_CHUNK: usize = 4096;

/// How much tungstenite asks for per read; it reads from the guard's chunk (a copy, no system
/// call), so a small value costs nothing and keeps its per-connection buffer small. The codec's
/// buffer starts at this size and grows to the largest frame a client sends, so an idle client
/// that only subscribed holds 128 bytes (512 before: 0.4 to 1 KB more per idle session in A/B
/// runs, and no CPU difference measured with 200 clients chatting).
const TUNGSTENITE_READ: usize = 128;

/// Frames declaring more than this many times the limit are not skipped but end the connection.
pub const SKIP_FACTOR: u64 = 16;

/// The socket type sessions run on.
pub type Socket = WebSocketStream<FrameGuard<TokioIo<hyper::upgrade::Upgraded>>>;

/// Most dropped-frame reports waiting for the session; more are not reported (the session
/// has answers to send already).
const DROPPED_REPORTS: usize = 8;

/// What the guard and its session share about dropped frames.
#[derive(Default)]
struct DropShared {
    sizes: parking_lot::Mutex<std::collections::VecDeque<u64>>,
    wake: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

/// The session's end: sizes of data frames the guard dropped, to answer. A small queue of its
/// own rather than a `tokio` channel: every connection has one, and a channel's first block and
/// cache-padded state were about 1 KB of each idle session.
pub struct Dropped {
    shared: std::sync::Arc<DropShared>,
}

/// The guard's end of [`Dropped`].
pub struct DropReports {
    shared: std::sync::Arc<DropShared>,
}

/// A guard's reports and the session's end of them.
pub fn dropped_frames() -> (DropReports, Dropped) {
    let shared = std::sync::Arc::new(DropShared::default());
    (
        DropReports {
            shared: shared.clone(),
        },
        Dropped { shared },
    )
}

impl DropReports {
    /// Reports a dropped frame of `size` bytes; false when [`DROPPED_REPORTS`] already wait.
    fn report(&self, size: u64) -> bool {
        let mut sizes = self.shared.sizes.lock();
        if sizes.len() >= DROPPED_REPORTS {
            return false;
        }
        sizes.push_back(size);
        drop(sizes);
        self.shared.wake.notify_one();
        true
    }
}

impl Drop for DropReports {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Dropped {
    /// The next report, waiting for one; `None` once the guard is gone and none is left.
    pub async fn recv(&mut self) -> Option<u64> {
        loop {
            if let Some(size) = self.try_recv() {
                return Some(size);
            }
            if self
                .shared
                .closed
                .load(std::sync::atomic::Ordering::Acquire)
            {
                // A last report may have come just before the close.
                return self.try_recv();
            }
            // `notify_one` keeps a permit when nobody waits: a report between the check above
            // and this wait is not missed.
            self.shared.wake.notified().await;
        }
    }

    /// The next report, if one waits.
    pub fn try_recv(&mut self) -> Option<u64> {
        self.shared.sizes.lock().pop_front()
    }
}

/// An accepted WebSocket upgrade request (extractor).
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: HeaderValue,
    protocols: Vec<String>,
}

/// Why a request is not a valid WebSocket upgrade.
pub struct NotUpgrade(&'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        let status = if self.0.contains("version") {
            StatusCode::UPGRADE_REQUIRED
        } else {
            StatusCode::BAD_REQUEST
        };
        let body = serde_json::json!({ "error": { "code": "invalid_field", "message": self.0 } });
        let mut r = (status, axum::Json(body)).into_response();
        if status == StatusCode::UPGRADE_REQUIRED {
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        r
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, NotUpgrade> {
        if parts.method != Method::GET {
            return Err(NotUpgrade("websocket upgrades use GET"));
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
        {
            return Err(NotUpgrade("expected a websocket upgrade request"));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            return Err(NotUpgrade("unsupported websocket version; use 13"));
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(NotUpgrade("missing Sec-WebSocket-Key"))?;
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|_| NotUpgrade("invalid Sec-WebSocket-Key"))?;
        let protocols = h
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(NotUpgrade("connection cannot be upgraded"))?;
        Ok(Self {
            on_upgrade,
            accept,
            protocols,
        })
    }
}

impl Upgrade {
    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`).
    pub fn protocols(&self) -> &[String] {
        &self.protocols
    }

    /// Answers 101 (selecting `protocol` if given) and runs `session` on the upgraded, guarded
    /// socket, or `failed` if the client went away before the upgrade completed. `limit` bounds
    /// frames and messages in bytes.
    pub fn on_upgrade<F, Fut, G>(
        self,
        limit: usize,
        protocol: Option<&'static str>,
        session: F,
        failed: G,
    ) -> Response
    where
        F: FnOnce(Socket, Dropped) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
        G: FnOnce() + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        let upgrade = async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    failed();
                    return;
                }
            };
            let (tx, rx) = dropped_frames();
            let guard = FrameGuard::new(TokioIo::new(upgraded), limit as u64, tx);
            // Small read chunks: tungstenite's default 128 KiB read buffer per connection would be
            // most of an idle session's memory. Larger frames still arrive, in more reads.
            let config = WebSocketConfig::default()
                .read_buffer_size(TUNGSTENITE_READ)
                .max_frame_size(Some(limit))
                .max_message_size(Some(limit));
            let socket = WebSocketStream::from_raw_socket(guard, Role::Server, Some(config)).await;
            // A task of its own: run inside this one, the session would keep this task's
            // larger state (the upgrade, the handshake's futures) for its whole life, 6 KB per
            // idle session where the session alone is 1.4 KB.
            tokio::spawn(session(socket, rx));
        };
        tokio::spawn(upgrade);
        let mut r = Response::new(axum::body::Body::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        if let Some(p) = protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame header.
    Header,
    /// Passing `n` payload bytes on.
    Pass(u64),
    /// Discarding `n` payload bytes of a dropped frame; `fin` ends the dropped message.
    Skip(u64, bool),
}

/// An `AsyncRead + AsyncWrite` wrapper that drops oversized client data frames (see the module
/// documentation). Writes pass through untouched.
pub struct FrameGuard<T> {
    inner: T,
    limit: u64,
    dropped: DropReports,
    state: State,
    hdr: [u8; 14],
    hdr_len: usize,
    pending: Vec<u8>,
    dropping: bool,
    dropped_len: u64,
    /// The read chunk; held only while it has bytes (an idle connection holds none).
    buf: Option<Box<[u8; READ_CHUNK]>>,
    pos: usize,
    len: usize,
}

impl<T> FrameGuard<T> {
    /// Wraps `inner`; data frames above `limit` bytes are dropped and reported on `dropped`.
    pub fn new(inner: T, limit: u64, dropped: DropReports) -> Self {
        Self {
            inner,
            limit,
            dropped,
            state: State::Header,
            hdr: [0; 14],
            hdr_len: 0,
            pending: Vec::with_capacity(14),
            dropping: false,
            dropped_len: 0,
            buf: None,
            pos: 0,
            len: 0,
        }
    }

    /// Header length once enough bytes are known.
    fn header_len(&self) -> Option<usize> {
        if self.hdr_len < 2 {
            return None;
        }
        let ext = match self.hdr[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.hdr[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    fn payload_len(&self) -> u64 {
        match self.hdr[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.hdr[2], self.hdr[3]])),
            127 => u64::from_be_bytes([
                self.hdr[2],
                self.hdr[3],
                self.hdr[4],
                self.hdr[5],
                self.hdr[6],
                self.hdr[7],
                self.hdr[8],
                self.hdr[9],
            ]),
            n => u64::from(n),
        }
    }

    /// A complete header was read: pass the frame on or skip it.
    fn on_header(&mut self) {
        let opcode = self.hdr[0] & 0x0f;
        let fin = self.hdr[0] & 0x80 != 0;
        let len = self.payload_len();
        let header_len = self.hdr_len;
        self.hdr_len = 0;
        let starts_message = opcode == 0x1 || opcode == 0x2;
        let skip = if opcode == 0x0 {
            self.dropping
        } else {
            starts_message && len > self.limit && len <= self.limit.saturating_mul(SKIP_FACTOR)
        };
        if skip {
            if starts_message {
                self.dropping = true;
                self.dropped_len = 0;
            }
            self.dropped_len = self.dropped_len.saturating_add(len);
            self.state = State::Skip(len, fin);
            if len == 0 {
                self.finish_skip(fin);
            }
        } else {
            self.pending.extend_from_slice(&self.hdr[..header_len]);
            self.state = if len == 0 {
                State::Header
            } else {
                State::Pass(len)
            };
        }
    }

    fn finish_skip(&mut self, fin: bool) {
        self.state = State::Header;
        if fin {
            self.dropping = false;
            // A full queue means the session has reports to answer already.
            if !self.dropped.report(self.dropped_len) {
                tracing::debug!("oversized-frame report dropped");
            }
        }
    }

    /// Moves bytes from the internal buffer to `out`; true if anything was written to `out`.
    fn drain(&mut self, out: &mut ReadBuf<'_>) -> bool {
        let start = out.filled().len();
        let Some(buf) = self.buf.take() else {
            return self.drain_pending(out, start);
        };
        self.drain_from(&buf, out);
        if self.pos < self.len {
            self.buf = Some(buf);
        }
        out.filled().len() > start
    }

    /// Only the synthesised header bytes (no chunk held).
    fn drain_pending(&mut self, out: &mut ReadBuf<'_>, start: usize) -> bool {
        if !self.pending.is_empty() {
            let k = self.pending.len().min(out.remaining());
            out.put_slice(&self.pending[..k]);
            self.pending.drain(..k);
        }
        out.filled().len() > start
    }

    fn drain_from(&mut self, buf: &[u8; READ_CHUNK], out: &mut ReadBuf<'_>) {
        loop {
            if !self.pending.is_empty() {
                let k = self.pending.len().min(out.remaining());
                out.put_slice(&self.pending[..k]);
                self.pending.drain(..k);
                if !self.pending.is_empty() {
                    break;
                }
            }
            if self.pos == self.len || out.remaining() == 0 {
                break;
            }
            match self.state {
                State::Header => {
                    let want = self.header_len().unwrap_or(2);
                    let k = (want - self.hdr_len).min(self.len - self.pos);
                    self.hdr[self.hdr_len..self.hdr_len + k]
                        .copy_from_slice(&buf[self.pos..self.pos + k]);
                    self.hdr_len += k;
                    self.pos += k;
                    if self.header_len() == Some(self.hdr_len) {
                        self.on_header();
                    }
                }
                State::Pass(n) => {
                    let k = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(self.len - self.pos)
                        .min(out.remaining());
                    out.put_slice(&buf[self.pos..self.pos + k]);
                    self.pos += k;
                    let left = n - k as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Pass(left)
                    };
                }
                State::Skip(n, fin) => {
                    let k = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(self.len - self.pos);
                    self.pos += k;
                    let left = n - k as u64;
                    if left == 0 {
                        self.finish_skip(fin);
                    } else {
                        self.state = State::Skip(left, fin);
                    }
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.drain(out) {
                return Poll::Ready(Ok(()));
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Internal buffer used up: read more from the socket.
            this.pos = 0;
            this.len = 0;
            let mut buf = this.buf.take().unwrap_or_else(|| Box::new([0; READ_CHUNK]));
            let mut rb = ReadBuf::new(&mut buf[..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    this.len = rb.filled().len();
                    if this.len == 0 {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    this.buf = Some(buf);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Nothing arrived: the chunk goes back to the allocator while the peer is quiet.
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A masked client frame.
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask = [1, 2, 3, 4];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    async fn run(input: Vec<u8>, limit: u64) -> (Vec<u8>, Vec<u64>) {
        let (tx, mut rx) = dropped_frames();
        // Feed the input in awkward chunk sizes.
        let (client, server) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = client;
            for chunk in input.chunks(5) {
                client
                    .write_all(chunk)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        });
        let mut g = FrameGuard::new(server, limit, tx);
        // (compare lengths first in callers: these buffers are large)
        let mut out = Vec::new();
        g.read_to_end(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        writer.await.unwrap_or_else(|e| panic!("{e}"));
        let mut dropped = Vec::new();
        while let Some(d) = rx.try_recv() {
            dropped.push(d);
        }
        (out, dropped)
    }

    #[tokio::test]
    async fn passes_small_frames_untouched() {
        let mut input = frame(1, true, b"hello");
        input.extend(frame(9, true, b"ping"));
        input.extend(frame(2, false, &[7; 200]));
        input.extend(frame(0, true, &[8; 300]));
        let (out, dropped) = run(input.clone(), 1000).await;
        assert!(out == input, "passed bytes differ");
        assert!(dropped.is_empty());
    }

    #[tokio::test]
    async fn drops_oversized_messages_and_reports_them() {
        let small = frame(1, true, b"ok");
        let big = frame(1, true, &[b'x'; 10_000]);
        let frag_start = frame(1, false, &[b'y'; 2000]);
        let frag_end = frame(0, true, &[b'z'; 10]);
        let ping = frame(9, true, b"");
        let mut input = small.clone();
        input.extend(&big);
        input.extend(&ping);
        input.extend(&frag_start);
        input.extend(&ping); // a control frame between fragments still passes
        input.extend(&frag_end);
        input.extend(&small);
        let (out, dropped) = run(input, 1024).await;
        let mut want = small.clone();
        want.extend(&ping);
        want.extend(&ping);
        want.extend(&small);
        assert!(out == want, "got {} bytes, want {}", out.len(), want.len());
        assert_eq!(dropped, vec![10_000, 2010]);
    }

    #[tokio::test]
    async fn passes_frames_beyond_the_skip_factor_for_the_codec_to_refuse() {
        let huge = frame(2, true, &vec![0; 20_000]);
        let (out, dropped) = run(huge.clone(), 1024).await;
        assert!(out == huge, "passed bytes differ");
        assert!(dropped.is_empty());
    }

    /// The session hears every report the queue holds, in order, waiting for them; reports past
    /// the bound are refused; once the guard is gone, what is left is heard, then `None`.
    #[tokio::test]
    async fn dropped_frame_reports_reach_the_session_in_order_and_end_with_the_guard() {
        let (reports, mut dropped) = dropped_frames();
        let waiting = tokio::spawn(async move {
            let first = dropped.recv().await;
            (first, dropped)
        });
        tokio::task::yield_now().await;
        assert!(reports.report(10));
        let (first, mut dropped) = waiting.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first, Some(10));
        for i in 0..DROPPED_REPORTS as u64 {
            assert!(reports.report(100 + i));
        }
        assert!(!reports.report(999), "past the bound");
        drop(reports);
        for i in 0..DROPPED_REPORTS as u64 {
            assert_eq!(dropped.recv().await, Some(100 + i));
        }
        assert_eq!(dropped.recv().await, None);
    }
}
