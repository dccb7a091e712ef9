//! The session loop shared by the plain-WebSocket dialects (Phoenix, type-tagged, event/data).
//!
//! Same shape as the native loop ([`crate::session::run_native`]): a reader that handles one
//! client frame at a time, in order, and beside it, in the same task, a writer that drains the
//! session's bounded hub queue (replies and events) to the socket and sends WebSocket pings. What differs per dialect
//! sits behind [`WsDialect`]: how a client frame is answered and how an event is shown (or not)
//! to this session. The dialect object is per session; its state (joined channels, say) is
//! shared by the reader and the writer, so it keeps it behind a lock held only briefly.

use crate::hub::{CloseReason, Outbound, Registered, SessionHandle, SharedEvent};
use crate::server::App;
use crate::session::{Opened, going_away, stop_viewing};
use futures::{Sink, SinkExt, Stream, StreamExt};
use parking_lot::Mutex;
use schema::{Command, Error, ErrorCode, Profile, Reply, RoomId, SessionId, SessionRef, UserId};
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

/// Longest a single socket write may take before the client is treated as not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the reader does after a frame.
#[derive(Debug)]
pub enum Flow {
    /// Read the next frame.
    Continue,
    /// End the session with this close frame (replies already queued are flushed first).
    Close(CloseReason),
}

/// A plain-WebSocket dialect, one value per session.
pub trait WsDialect: Send + Sync + 'static {
    /// Handles one text frame from the client; replies go out with [`Ctx::send`].
    fn frame(&self, ctx: &Ctx, text: &str) -> impl Future<Output = Flow> + Send;

    /// The frame that shows `event` to this session, if it is shown. Runs in the writer,
    /// so it may look things up (a username, a room's pair) but should be quick; encodings that
    /// do not depend on the session belong in the event's shared cache
    /// ([`SharedEvent::text`]).
    fn event(
        &self,
        ctx: &Ctx,
        event: &Arc<SharedEvent>,
    ) -> impl Future<Output = Option<Utf8Bytes>> + Send;

    /// The frame answering a client frame refused before decoding (too large, binary), if the
    /// dialect has a way to say so.
    fn refused(&self, err: &Error) -> Option<String>;

    /// Called once when the session ends, before the node is told (viewing is cleared by the
    /// loop itself).
    fn closed(&self, _ctx: &Ctx) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What a dialect sees of its session.
pub struct Ctx {
    /// The gateway.
    pub app: Arc<App>,
    /// Who is connected (from the token).
    pub profile: Profile,
    /// The session.
    pub id: SessionId,
    /// The hub's handle on it (close signal, outbound queue).
    pub handle: Arc<SessionHandle>,
    viewing: Mutex<HashSet<RoomId>>,
}

impl Ctx {
    /// The connected user.
    pub fn user(&self) -> &UserId {
        &self.profile.id
    }

    /// Queues a frame for the client; false when the session is closing.
    pub fn send(&self, text: String) -> bool {
        self.handle.offer(Outbound::Text(text))
    }

    /// This session, as the node names it.
    pub fn session_ref(&self) -> SessionRef {
        SessionRef {
            gateway: self.app.hub.gateway().clone(),
            session: self.id,
        }
    }

    /// Runs a command as the connected user. A `View` is bound to this session and remembered,
    /// so that it ends with the session.
    pub async fn execute(&self, mut cmd: Command) -> Result<Reply, Error> {
        self.handle.metrics().command(&cmd);
        if let Command::View {
            room,
            viewing,
            session,
        } = &mut cmd
        {
            *session = Some(self.session_ref());
            let mut set = self.viewing.lock();
            if *viewing {
                set.insert(*room);
            } else {
                set.remove(room);
            }
        }
        let r = self.app.node.execute(&self.profile.id, cmd).await;
        self.handle.tarpit_wait(&r).await;
        r
    }

    /// Whether this session said it views `room`.
    pub fn is_viewing(&self, room: RoomId) -> bool {
        self.viewing.lock().contains(&room)
    }

    /// Asks the session to close.
    pub fn close(&self, reason: CloseReason) {
        self.handle.kick(reason);
    }
}

/// Runs a session of dialect `D` over `socket` until it ends. `profile` must be the profile
/// `opened` was opened with.
///
/// A plain function that splits the socket first (see [`crate::session::run_native`]: an `async
/// fn` would keep the socket's size in every idle session's state).
pub fn run<S, D>(
    socket: S,
    app: Arc<App>,
    profile: Profile,
    opened: Opened,
    dropped: crate::ws::Dropped,
    dialect: D,
) -> impl Future<Output = ()> + Send + 'static
where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Sink<WsMessage> + Send + 'static,
    D: WsDialect,
{
    let (sink, stream) = socket.split();
    run_split(sink, stream, app, profile, opened, dropped, dialect)
}

async fn run_split<S, D>(
    mut sink: futures::stream::SplitSink<S, WsMessage>,
    mut stream: futures::stream::SplitStream<S>,
    app: Arc<App>,
    profile: Profile,
    opened: Opened,
    mut dropped: crate::ws::Dropped,
    dialect: D,
) where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Sink<WsMessage> + Send + 'static,
    D: WsDialect,
{
    let (_, reg) = opened.into_parts();
    let Registered { id, handle, mut rx } = reg;
    if app.draining.load(Ordering::SeqCst) {
        handle.kick(going_away());
    }
    let ctx = Arc::new(Ctx {
        app: app.clone(),
        profile,
        id,
        handle: handle.clone(),
        viewing: Mutex::new(HashSet::new()),
    });
    let dialect = Arc::new(dialect);
    tracing::debug!(user = %ctx.user(), session = id.0, "dialect session open");

    let last_rx = AtomicU64::new(0);
    let started = Instant::now();
    let ping_every = app.config.ping_interval;
    // The writer and the reader run side by side in this one task (see
    // `crate::session::run_native`).
    let writer_last_rx = &last_rx;
    let writer_ctx = &ctx;
    let writer_dialect = &dialect;
    let writer = async move {
        let ctx = writer_ctx;
        let mut ping = crate::session::keepalive(ping_every);
        loop {
            tokio::select! {
                biased;
                () = ctx.handle.closed() => break,
                out = rx.recv() => {
                    let Some(out) = out else { break };
                    // Frames already queued behind this one go out in the same socket write.
                    // Boxed: inline, the write (and its timer) would size the writer's state for
                    // its whole life, idle or not.
                    let write = Box::pin(async {
                        let mut next = Some(out);
                        let mut fed = 0;
                        let mut events = 0u64;
                        while let Some(out) = next.take() {
                            let is_event = matches!(out, Outbound::Event(_));
                            let text = match out {
                                Outbound::Text(t) => Some(Utf8Bytes::from(t)),
                                Outbound::Event(ev) => writer_dialect.event(ctx, &ev).await,
                            };
                            if let Some(text) = text {
                                sink.feed(WsMessage::Text(text)).await.map_err(drop)?;
                                fed += 1;
                                events += u64::from(is_event);
                            }
                            if fed < crate::session::WRITE_BATCH {
                                next = rx.try_recv().ok();
                            }
                        }
                        if fed > 0 {
                            sink.flush().await.map_err(drop)?;
                        }
                        Ok::<u64, ()>(events)
                    });
                    // A cut-off session stops writing at once: its socket is full.
                    let outcome = Box::pin(async {
                        tokio::select! {
                            r = tokio::time::timeout(WRITE_TIMEOUT, write) => Some(r),
                            () = ctx.handle.cut_off() => None,
                        }
                    })
                    .await;
                    match outcome {
                        None => return,
                        Some(Ok(Ok(events))) => ctx.handle.metrics().delivered(events),
                        Some(Ok(Err(_))) => {
                            ctx.close(CloseReason { code: 1006, reason: "write failed".into() });
                            return;
                        }
                        Some(Err(_)) => {
                            ctx.handle.slow_consumer("slow consumer: socket write timed out".into());
                            return;
                        }
                    }
                }
                _ = ping.tick() => {
                    let silent = started.elapsed().as_secs()
                        .saturating_sub(writer_last_rx.load(Ordering::Relaxed));
                    if Duration::from_secs(silent) > ping_every * 2 {
                        ctx.close(CloseReason {
                            code: 4000,
                            reason: format!("keepalive timeout: silent for {silent} s"),
                        });
                        break;
                    }
                    if Box::pin(sink.send(WsMessage::Ping(Default::default()))).await.is_err() {
                        return;
                    }
                }
            }
        }
        Box::pin(async move {
            let reason = ctx.handle.close_reason().unwrap_or(CloseReason {
                code: 1000,
                reason: String::new(),
            });
            if reason.code != 1008 {
                // Flush replies already queued (a last error, say), briefly.
                let flush = async {
                    while let Ok(out) = rx.try_recv() {
                        let text = match out {
                            Outbound::Text(t) => Utf8Bytes::from(t),
                            Outbound::Event(ev) => match writer_dialect.event(ctx, &ev).await {
                                Some(t) => t,
                                None => continue,
                            },
                        };
                        if sink.send(WsMessage::Text(text)).await.is_err() {
                            break;
                        }
                    }
                };
                let _flushed = tokio::time::timeout(Duration::from_secs(1), flush).await;
            }
            if sink
                .send(crate::session::close_frame(&reason))
                .await
                .is_ok()
            {
                let _flushed = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            }
        })
        .await;
    };

    let (reader_ctx, reader_dialect, reader_app, reader_last_rx) = (&ctx, &dialect, &app, &last_rx);
    let reader = async move {
        let (ctx, dialect, app, last_rx) = (reader_ctx, reader_dialect, reader_app, reader_last_rx);
        loop {
            let frame = tokio::select! {
                biased;
                () = handle.closed() => break,
                Some(size) = dropped.recv() => {
                    last_rx.store(started.elapsed().as_secs(), Ordering::Relaxed);
                    let limit = app.config.max_frame_bytes;
                    crate::telemetry::metrics::limit_refused("frame");
                    let err = Error::new(
                        ErrorCode::FrameTooLarge,
                        format!("frame of {size} bytes exceeds the {limit}-byte limit; it was discarded"),
                    );
                    if let Some(t) = dialect.refused(&err)
                        && !ctx.send(t)
                    {
                        break;
                    }
                    continue;
                }
                f = stream.next() => f,
            };
            last_rx.store(started.elapsed().as_secs(), Ordering::Relaxed);
            let text = match frame {
                None => break,
                Some(Err(e)) => {
                    if let Some(limit) = crate::session::too_large(&e) {
                        crate::telemetry::metrics::limit_refused("frame");
                        let err = Error::new(
                            ErrorCode::FrameTooLarge,
                            format!("frame exceeds the {limit}-byte limit"),
                        );
                        if let Some(t) = dialect.refused(&err) {
                            ctx.send(t);
                        }
                        ctx.close(CloseReason {
                            code: 1009,
                            reason: format!("frame exceeds the {limit}-byte limit"),
                        });
                    }
                    break;
                }
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Binary(_))) => {
                    let err = Error::new(
                        ErrorCode::MalformedJson,
                        "binary frames are not accepted; send JSON as text frames",
                    );
                    if let Some(t) = dialect.refused(&err) {
                        ctx.send(t);
                    }
                    continue;
                }
                Some(Ok(WsMessage::Close(_))) => break,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            };
            // Boxed: inline, the dialect's handling would size the session's state for its whole
            // life, idle or not.
            match Box::pin(dialect.frame(ctx, text.as_str())).await {
                Flow::Continue => {}
                Flow::Close(reason) => {
                    ctx.close(reason);
                    break;
                }
            }
        }

        ctx.close(CloseReason {
            code: 1000,
            reason: String::new(),
        });
    };
    {
        let mut writer = std::pin::pin!(writer);
        let mut reader = std::pin::pin!(reader);
        // As in `crate::session::run_native`: the reader ends the session; a writer that ends
        // first has closed it, and the reader finishes the frame it may be answering.
        let reader_first = tokio::select! {
            () = reader.as_mut() => true,
            () = writer.as_mut() => false,
        };
        if reader_first {
            if tokio::time::timeout(Duration::from_secs(5), writer)
                .await
                .is_err()
            {
                // Stuck on a peer that does not read: dropping the socket is the only way out.
                tracing::debug!(user = %ctx.user(), "session writer abandoned");
            }
        } else {
            reader.await;
        }
    }
    Box::pin(async move {
        let _slot = app.teardown().await;
        app.hub.unregister(id).await;
        dialect.closed(&ctx).await;
        let viewing = std::mem::take(&mut *ctx.viewing.lock());
        stop_viewing(&app, ctx.user(), id, viewing).await;
        app.node.disconnect(ctx.user(), app.hub.gateway(), id).await;
        tracing::debug!(user = %ctx.user(), session = id.0, "dialect session closed");
    })
    .await;
}
