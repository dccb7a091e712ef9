//! The HTTP accept loop of every listener: axum's router on hyper, with what `axum::serve` does
//! not do and a public server must.
//!
//! - **Connections per client IP** (`PALAVER_MAX_CONNECTIONS_PER_IP`): each accepted TCP
//!   connection holds a slot of its peer's address until the socket is dropped, whatever it
//!   became (an HTTP keep-alive connection, a WebSocket, a Socket.IO transport): the slot lives
//!   in the I/O object itself, so it is released exactly once, on every close path. A connection
//!   over the limit is answered `429` with `{"error":{"code":"too_many_connections",...}}` and
//!   closed, without being handed to the router.
//! - **Request heads must arrive in time** (`PALAVER_HEADER_TIMEOUT_SECS`): a client that sends
//!   its request line and headers byte by byte (slowloris), or opens a connection and sends
//!   nothing, is disconnected when the head is not complete within the bound (hyper's
//!   `header_read_timeout`, which needs a timer that `axum::serve` does not give it), and so is
//!   one that connects and sends nothing. The same bound applies between requests of a
//!   keep-alive connection.
//! - **A WebSocket's kernel send buffer is bounded** (`PALAVER_WS_SEND_BUFFER`): once a
//!   connection is upgraded, its `SO_SNDBUF` is set, so that a client that stops reading holds
//!   at most that much of the kernel's memory (Linux doubles the value for its bookkeeping)
//!   instead of what autotuning grows it to (up to 4 MB per socket by default), and the
//!   session's writer meets back-pressure soon enough for the slow-consumer bounds (its queue,
//!   its write timeout) to cut the client off. Plain HTTP responses (history pages, file
//!   downloads) keep the kernel's autotuning. The upgrade is recognised in the write path, by
//!   the `101 Switching Protocols` head hyper writes: the router's only upgrades are WebSockets
//!   (native, the dialects, Socket.IO's transport upgrade), and this costs a connection no
//!   state beyond a number.
//!
//! Graceful shutdown is `axum::serve`'s: stop accepting, ask every HTTP connection to finish its
//! request in flight, and resolve when they have (upgraded sockets are the sessions' business).

use crate::telemetry::metrics::limit_refused;
use axum::Router;
use dashmap::DashMap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Open TCP connections per client address, shared by every listener of a gateway.
#[derive(Debug)]
pub struct ConnLimits {
    max_per_ip: usize,
    header_timeout: Duration,
    /// `SO_SNDBUF` of an upgraded connection (0: leave the kernel's autotuning).
    ws_send_buffer: usize,
    by_ip: DashMap<IpAddr, usize>,
    /// Refusals being answered; past [`REFUSING_MAX`] a refused connection is just closed.
    refusing: Arc<Semaphore>,
}

/// Most refused connections answered at once (each for at most 2 s).
const REFUSING_MAX: usize = 256;

impl ConnLimits {
    /// Limits of at most `max_per_ip` connections per address (0: no limit), request heads
    /// within `header_timeout`, and upgraded (WebSocket) connections with a send buffer of
    /// `ws_send_buffer` bytes (0: the kernel's autotuning).
    pub fn new(max_per_ip: usize, header_timeout: Duration, ws_send_buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_ip,
            header_timeout,
            ws_send_buffer,
            by_ip: DashMap::new(),
            refusing: Arc::new(Semaphore::new(REFUSING_MAX)),
        })
    }

    /// Connections open from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, |n| *n)
    }

    /// Addresses with at least one connection open.
    pub fn addresses(&self) -> usize {
        self.by_ip.len()
    }

    /// A slot for a new connection from `ip`, or `None` when it already has the maximum.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut n = self.by_ip.entry(ip).or_insert(0);
        if self.max_per_ip != 0 && *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its address's count; released when dropped.
#[derive(Debug)]
struct Slot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.by_ip.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// A TCP stream that holds its [`Slot`] for as long as it lives (through hyper's upgrade, into
/// the WebSocket session that ends up owning it), and bounds its send buffer when it is
/// upgraded.
struct Counted {
    tcp: TcpStream,
    _slot: Slot,
    /// The send buffer to set when the connection is upgraded; 0 once set (or when none is).
    upgrade_send_buffer: usize,
}

/// The head of the response that hands a connection over to another protocol.
const SWITCHING: &[u8] = b"HTTP/1.1 101 ";

impl Counted {
    /// Called with the start of each buffer written until the upgrade: when it is the
    /// `101 Switching Protocols` head, bounds the socket's send buffer (before the head goes
    /// out, so that the WebSocket's first frame already meets it).
    fn watch_for_upgrade(&mut self, written: &[u8]) {
        if self.upgrade_send_buffer != 0 && written.starts_with(SWITCHING) {
            let bytes = std::mem::take(&mut self.upgrade_send_buffer);
            if let Err(e) = socket2::SockRef::from(&self.tcp).set_send_buffer_size(bytes) {
                tracing::debug!(error = %e, bytes, "cannot set SO_SNDBUF of a WebSocket");
            }
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.upgrade_send_buffer != 0 {
            self.watch_for_upgrade(buf);
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.upgrade_send_buffer != 0 {
            // hyper queues each response head as a buffer of its own; after a pipelined
            // response's body, the 101 head may be any of them.
            for buf in bufs {
                self.watch_for_upgrade(buf);
            }
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains HTTP connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<ConnLimits>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder.http2().enable_connect_protocol();
    let builder = Arc::new(builder);
    let draining = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // never a reason to stop serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        // Chat frames are small and latency-bound: never let Nagle hold them back.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Some(slot) = limits.admit(peer.ip()) else {
            limit_refused("conn_ip");
            if let Ok(permit) = limits.refusing.clone().try_acquire_owned() {
                let max = limits.max_per_ip;
                tokio::spawn(async move {
                    refuse(tcp, peer.ip(), max).await;
                    drop(permit);
                });
            }
            continue;
        };
        let io = TokioIo::new(Counted {
            tcp,
            _slot: slot,
            upgrade_send_buffer: limits.ws_send_buffer,
        });
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let draining = draining.clone();
        let head_timeout = limits.header_timeout;
        connections.spawn(async move {
            // Until its first byte the connection is not yet hyper's (its HTTP version is
            // read first, without a timer): a client that connects and sends nothing is
            // closed here, after the same bound as a slow head.
            let mut first = [0u8; 1];
            match tokio::time::timeout(head_timeout, io.inner().tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection_with_upgrades(io, service);
            let mut conn = pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = draining.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    draining.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Answers a connection over the per-address limit with a 429 and closes it. The request is
/// not read (it never reaches the router); a little of it is drained so that the close is not
/// a reset that would destroy the answer before the client reads it.
async fn refuse(mut tcp: TcpStream, ip: IpAddr, max: usize) {
    let body = serde_json::json!({
        "error": {
            "code": "too_many_connections",
            "message": format!(
                "{ip} already has {max} open connections (PALAVER_MAX_CONNECTIONS_PER_IP); \
                 close one and retry"
            ),
        }
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            match tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    let _done = tokio::time::timeout(Duration::from_secs(2), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback connection's accepted end, wrapped as the accept loop wraps it.
    async fn counted(send_buffer: usize) -> (Counted, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let limits = ConnLimits::new(0, Duration::from_secs(5), send_buffer);
        let slot = limits.admit(peer.ip()).expect("slot");
        let conn = Counted {
            tcp,
            _slot: slot,
            upgrade_send_buffer: send_buffer,
        };
        (conn, client)
    }

    fn send_buffer(conn: &Counted) -> usize {
        socket2::SockRef::from(&conn.tcp)
            .send_buffer_size()
            .expect("SO_SNDBUF")
    }

    #[tokio::test]
    async fn only_an_upgraded_connection_gets_the_bounded_send_buffer() {
        let (mut conn, _client) = counted(8192).await;
        let autotuned = send_buffer(&conn);
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .expect("write");
        assert_eq!(send_buffer(&conn), autotuned, "a plain response leaves it");
        let head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        // hyper writes its queued buffers vectored: the head need not be the first of them.
        let bufs = [io::IoSlice::new(b"ok"), io::IoSlice::new(head)];
        let written = conn.write_vectored(&bufs).await.expect("write");
        assert!(written > 0);
        // Linux doubles the value for its bookkeeping.
        assert_eq!(send_buffer(&conn), 2 * 8192, "the upgrade bounds it");
        assert_eq!(conn.upgrade_send_buffer, 0, "and is done watching");
    }

    #[tokio::test]
    async fn zero_leaves_the_kernels_autotuning() {
        let (mut conn, _client) = counted(0).await;
        let autotuned = send_buffer(&conn);
        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(send_buffer(&conn), autotuned);
    }
}
