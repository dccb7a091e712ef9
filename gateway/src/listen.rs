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
    by_ip: DashMap<IpAddr, usize>,
    /// Refusals being answered; past [`REFUSING_MAX`] a refused connection is just closed.
    refusing: Arc<Semaphore>,
}

/// Most refused connections answered at once (each for at most 2 s).
const REFUSING_MAX: usize = 256;

impl ConnLimits {
    /// Limits of at most `max_per_ip` connections per address (0: no limit), and request heads
    /// within `header_timeout`.
    pub fn new(max_per_ip: usize, header_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            max_per_ip,
            header_timeout,
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
/// the WebSocket session that ends up owning it).
struct Counted {
    tcp: TcpStream,
    _slot: Slot,
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
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
        let io = TokioIo::new(Counted { tcp, _slot: slot });
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
