//! One task per connection: frames in -> dialect decode -> node -> dialect encode -> frames out.
//!
//! The loop is written against `Stream + Sink` of WebSocket messages. The reader handles one
//! request at a time, in order, and puts its reply on the session's bounded outbound queue; a
//! writer, beside it in the same task, drains that queue (replies and events) to the socket and
//! sends keepalive pings.
//! Whoever ends the session (client close, slow consumer, keepalive timeout, shutdown) leads to
//! one exit path: the writer sends the close frame, the hub forgets the session, the node marks
//! it disconnected.

use crate::dialect::native;
use crate::hub::{CloseReason, Outbound, Registered, SessionHandle, SharedEvent};
use crate::server::App;
use futures::{Sink, SinkExt, Stream, StreamExt};
use node::user::SessionInfo;
use schema::{Command, Error, ErrorCode, Profile, Reply, RoomId, SessionId, SessionRef, UserId};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};

/// Longest a single socket write may take before the client is treated as not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many queued frames are written to a socket before one flush.
pub const WRITE_BATCH: usize = 64;

fn native_frame(out: Outbound) -> WsMessage {
    WsMessage::Text(match out {
        Outbound::Text(t) => Utf8Bytes::from(t),
        Outbound::Event(ev) => ev.native(),
    })
}

/// Close code and reason for a server shutdown.
pub fn going_away() -> CloseReason {
    CloseReason {
        code: 1001,
        reason: "server shutting down; reconnect".into(),
    }
}

/// A session registered with the hub and the node, not yet attached to a socket. Events for it
/// queue (bounded) from the moment it is registered, so nothing published during the WebSocket
/// upgrade is lost.
pub struct Opened {
    user: UserId,
    reg: Registered,
}

/// What is needed to undo an [`Opened`] session whose upgrade failed.
pub struct Abandon {
    app: Arc<App>,
    id: SessionId,
    user: UserId,
}

impl Opened {
    /// The user and the hub registration.
    pub fn into_parts(self) -> (UserId, Registered) {
        (self.user, self.reg)
    }

    /// A handle that can undo the registration if the upgrade fails.
    pub fn clone_for_failure(&self, app: &Arc<App>) -> Abandon {
        Abandon {
            app: app.clone(),
            id: self.reg.id,
            user: self.user.clone(),
        }
    }
}

impl Abandon {
    /// Undoes the registration (the client went away during the upgrade).
    pub fn abandon(self) {
        tokio::spawn(async move {
            self.app.hub.unregister(self.id).await;
            self.app
                .node
                .disconnect(&self.user, self.app.hub.gateway(), self.id)
                .await;
        });
    }
}

/// Registers a new session of `profile`: first with the hub (so that events addressed to the
/// user from now on are queued for it), then with the node, which refreshes the user from the
/// token and answers the user's rooms, which the session then follows. Done before the WebSocket
/// upgrade, so a failure is a plain HTTP error.
pub async fn open(
    app: &Arc<App>,
    profile: Profile,
    dialect: &'static str,
) -> Result<Opened, Error> {
    open_with(
        app,
        profile,
        OpenOptions {
            dialect,
            device: None,
            takes_pending: dialect == "native",
        },
    )
    .await
}

/// How a session is opened.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The wire dialect (logs, metrics, the node's session record).
    pub dialect: &'static str,
    /// The client device, when the dialect names it (Phoenix `device_unique_id`).
    pub device: Option<String>,
    /// Whether connecting takes (and so clears) the user's pending notifications; a dialect
    /// that shows them later (Phoenix, after the notifications channel is joined) says no and
    /// takes them itself.
    pub takes_pending: bool,
}

/// [`open`] with every option.
pub async fn open_with(
    app: &Arc<App>,
    profile: Profile,
    opts: OpenOptions,
) -> Result<Opened, Error> {
    let OpenOptions {
        dialect,
        device,
        takes_pending,
    } = opts;
    let _slot = app.opening().await;
    let id = app.hub.next_session_id();
    let user = profile.id.clone();
    let reg = app
        .hub
        .register(id, profile.clone(), dialect, Vec::new())
        .await?;
    let info = SessionInfo {
        gateway: app.hub.gateway().clone(),
        session: id,
        dialect: dialect.into(),
        device,
        takes_pending,
    };
    match app.node.connect(profile, info).await {
        Ok(c) => {
            app.hub.follow_rooms(id, &c.rooms).await;
            deliver_pending(app, id, c.pending);
            Ok(Opened { user, reg })
        }
        Err(e) => {
            app.hub.unregister(id).await;
            Err(e)
        }
    }
}

/// Queues the notifications recorded while the user was away for session `id`.
pub fn deliver_pending(app: &App, id: SessionId, pending: Vec<schema::Notification>) {
    for notification in pending {
        let ev = schema::Event::Notification {
            notification,
            pending: true,
        };
        if !app.hub.offer_event(id, ev) {
            break;
        }
    }
}

/// Runs a native-protocol session over `socket` until it ends. `dropped` reports frames the
/// [`crate::ws::FrameGuard`] refused for their size.
///
/// A plain function that splits the socket before it builds the session's future: an `async fn`
/// keeps its arguments in its state for its whole life, and the socket (the WebSocket codec and
/// its I/O) would sit there, moved out but still sized in, in every idle session.
pub fn run_native<S>(
    socket: S,
    app: Arc<App>,
    opened: Opened,
    dropped: crate::ws::Dropped,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Sink<WsMessage> + Send + 'static,
{
    let (sink, stream) = socket.split();
    native_loop(sink, stream, app, opened, dropped)
}

async fn native_loop<S>(
    mut sink: futures::stream::SplitSink<S, WsMessage>,
    mut stream: futures::stream::SplitStream<S>,
    app: Arc<App>,
    opened: Opened,
    mut dropped: crate::ws::Dropped,
) where
    S: Stream<Item = Result<WsMessage, tungstenite::Error>> + Sink<WsMessage> + Send + 'static,
{
    let Opened { user, reg } = opened;
    let Registered { id, handle, mut rx } = reg;
    if app.draining.load(Ordering::SeqCst) {
        // Upgraded just as the server began to drain: close it like the others.
        handle.kick(going_away());
    }
    tracing::debug!(%user, session = id.0, "session open");
    let mut viewing: HashSet<RoomId> = HashSet::new();

    let last_rx = AtomicU64::new(0);
    let started = Instant::now();
    let ping_every = app.config.ping_interval;
    // The writer and the reader run in this one task, side by side: a task of its own for the
    // writer cost every idle session a second task's header, its handle and shared copies of
    // what both use.
    let writer_handle = &handle;
    let writer_last_rx = &last_rx;
    let writer = async move {
        let mut ping = keepalive(ping_every);
        loop {
            tokio::select! {
                biased;
                () = writer_handle.closed() => break,
                out = rx.recv() => {
                    let Some(out) = out else { break };
                    // Frames already queued behind this one go out in the same socket write.
                    // Boxed, as the reader's frame handling: inline, the write (and its timer)
                    // would size the writer's state for its whole life, idle or not.
                    let write = Box::pin(async {
                        let mut events = u64::from(matches!(out, Outbound::Event(_)));
                        sink.feed(native_frame(out)).await.map_err(drop)?;
                        for _ in 1..WRITE_BATCH {
                            let Ok(out) = rx.try_recv() else { break };
                            events += u64::from(matches!(out, Outbound::Event(_)));
                            sink.feed(native_frame(out)).await.map_err(drop)?;
                        }
                        sink.flush().await.map_err(drop)?;
                        Ok::<u64, ()>(events)
                    });
                    // A cut-off session stops writing at once: its socket is full.
                    let outcome = Box::pin(async {
                        tokio::select! {
                            r = tokio::time::timeout(WRITE_TIMEOUT, write) => Some(r),
                            () = writer_handle.cut_off() => None,
                        }
                    })
                    .await;
                    match outcome {
                        None => return,
                        Some(Ok(Ok(events))) => writer_handle.metrics().delivered(events),
                        Some(Ok(Err(_))) => {
                            writer_handle.kick(CloseReason { code: 1006, reason: "write failed".into() });
                            return;
                        }
                        Some(Err(_)) => {
                            writer_handle.slow_consumer("slow consumer: socket write timed out".into());
                            return;
                        }
                    }
                }
                _ = ping.tick() => {
                    let silent = started.elapsed().as_secs()
                        .saturating_sub(writer_last_rx.load(Ordering::Relaxed));
                    if Duration::from_secs(silent) > ping_every * 2 {
                        writer_handle.kick(CloseReason {
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
            let reason = writer_handle.close_reason().unwrap_or(CloseReason {
                code: 1000,
                reason: String::new(),
            });
            // Flush what is already queued (a last error reply, say), briefly, unless the client is
            // the reason we are closing.
            if reason.code != 1008 {
                let flush = async {
                    while let Ok(out) = rx.try_recv() {
                        if sink.send(native_frame(out)).await.is_err() {
                            break;
                        }
                    }
                };
                let _flushed = tokio::time::timeout(Duration::from_secs(1), flush).await;
            }
            // Best effort: the peer may already be gone.
            if sink.send(close_frame(&reason)).await.is_ok() {
                let _flushed = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            }
        })
        .await;
    };

    let reader_handle = &handle;
    let reader_app = &app;
    let reader_user = &user;
    let reader_last_rx = &last_rx;
    let reader_viewing = &mut viewing;
    let reader = async move {
        let (handle, app, user, last_rx, viewing) = (
            reader_handle,
            reader_app,
            reader_user,
            reader_last_rx,
            reader_viewing,
        );
        loop {
            let frame = tokio::select! {
                biased;
                () = handle.closed() => break,
                Some(size) = dropped.recv() => {
                    // Refused from its header; the connection goes on.
                    last_rx.store(started.elapsed().as_secs(), Ordering::Relaxed);
                    let limit = app.config.max_frame_bytes;
                    crate::telemetry::metrics::limit_refused("frame");
                    let err = Error::new(
                        ErrorCode::FrameTooLarge,
                        format!("frame of {size} bytes exceeds the {limit}-byte limit; it was discarded"),
                    );
                    if !reply(handle, native::encode_error(&serde_json::Value::Null, &err)) {
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
                    if let Some(limit) = too_large(&e) {
                        crate::telemetry::metrics::limit_refused("frame");
                        let err = Error::new(
                            ErrorCode::FrameTooLarge,
                            format!("frame exceeds the {limit}-byte limit"),
                        );
                        // Past what the guard skips (a fragmented message that outgrew the limit,
                        // or a frame far beyond it): reply, then close with 1009.
                        reply(handle, native::encode_error(&serde_json::Value::Null, &err));
                        handle.kick(CloseReason {
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
                    reply(handle, native::encode_error(&serde_json::Value::Null, &err));
                    continue;
                }
                Some(Ok(WsMessage::Close(_))) => break,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            };
            // Boxed, like the teardown below: a future awaited inline takes the room of its largest
            // state in the session's task for the session's whole life, idle or not.
            let (out, pause) = Box::pin(async {
                let mut pause = None;
                let out = match native::decode(text.as_str()) {
                    Err(de) => {
                        app.console
                            .record(Some("native"), Some("decode"), Some(user), &de.error);
                        native::encode_error(&de.id, &de.error)
                    }
                    Ok(req) => match req.op {
                        native::Op::Ping => native::encode_pong(&req.id),
                        native::Op::Resume(rooms) => match resume(app, user, id, rooms).await {
                            Ok(v) => native::encode_data(&req.id, v),
                            Err(e) => native::encode_error(&req.id, &e),
                        },
                        native::Op::Command(mut cmd) => {
                            handle.metrics().command(&cmd);
                            if let Command::View {
                                room,
                                viewing: on,
                                session,
                            } = &mut cmd
                            {
                                *session = Some(SessionRef {
                                    gateway: app.hub.gateway().clone(),
                                    session: id,
                                });
                                if *on {
                                    viewing.insert(*room);
                                } else {
                                    viewing.remove(room);
                                }
                            }
                            let r = app.node.execute(user, cmd).await;
                            pause = handle.tarpit(&r);
                            match r {
                                Ok(r) => native::encode_ok(&req.id, &r),
                                Err(e) => native::encode_error(&req.id, &e),
                            }
                        }
                    },
                };
                (out, pause)
            })
            .await;
            if !reply(handle, out) {
                break;
            }
            if let Some(pause) = pause {
                // Over its rate: answered at once, heard again after the pause.
                tokio::select! {
                    () = handle.closed() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }

        handle.kick(CloseReason {
            code: 1000,
            reason: String::new(),
        });
    };
    {
        let mut writer = std::pin::pin!(writer);
        let mut reader = std::pin::pin!(reader);
        // The reader ends the session (it kicks the handle, which ends the writer); a writer that
        // ends first (a failed write, a keepalive timeout) kicks it too, and the reader, which
        // may be answering a frame, finishes that first.
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
                tracing::debug!(%user, "session writer abandoned");
            }
        } else {
            reader.await;
        }
    }
    Box::pin(async move {
        let _slot = app.teardown().await;
        app.hub.unregister(id).await;
        stop_viewing(&app, &user, id, viewing).await;
        app.node.disconnect(&user, app.hub.gateway(), id).await;
        tracing::debug!(%user, session = id.0, "session closed");
    })
    .await;
}

/// A session's keepalive ticker: every `every`, the first tick at a random point of the first
/// interval (between a tenth of it and all of it). Sessions opened together, by a reconnect
/// storm after a deploy, say, would otherwise ping together every interval for the rest of their
/// lives (a burst of pings and pongs, all at once, every interval), and those that stop
/// answering would be closed together, each close with its store writes and presence events.
pub(crate) fn keepalive(every: Duration) -> tokio::time::Interval {
    let first = every.mul_f64(rand::random_range(0.1..1.0));
    tokio::time::interval_at(tokio::time::Instant::now() + first, every)
}

/// A closed session views nothing any more.
pub async fn stop_viewing(app: &App, user: &UserId, id: SessionId, rooms: HashSet<RoomId>) {
    for room in rooms {
        let cmd = Command::View {
            room,
            viewing: false,
            session: Some(SessionRef {
                gateway: app.hub.gateway().clone(),
                session: id,
            }),
        };
        if let Err(e) = app.node.execute(user, cmd).await {
            tracing::debug!(%room, error = %e, "view end not recorded");
        }
    }
}

/// Catches a reconnecting session up: for each `(room, last seen seq)`, queues the missed
/// events in order, or answers `resync` for the room when it is too far behind. Answers, per
/// room, `{"resync": bool, "last_seq": n, "events": count}` or an error.
async fn resume(
    app: &App,
    user: &UserId,
    id: SessionId,
    rooms: Vec<(RoomId, u64)>,
) -> Result<serde_json::Value, Error> {
    let mut out = serde_json::Map::new();
    for (room, after_seq) in rooms {
        let entry = match app
            .node
            .execute(user, Command::Replay { room, after_seq })
            .await
        {
            Ok(Reply::Replay {
                events,
                resync,
                last_seq,
            }) => {
                let n = events.len();
                let Some(session) = app.hub.session(id) else {
                    return Err(Error::unavailable("session closed during resume"));
                };
                for e in events {
                    // Paced: a replay may be longer than the session's whole queue.
                    if !session
                        .offer_paced(Outbound::Event(SharedEvent::new(e)))
                        .await
                    {
                        return Err(Error::unavailable("session closed during resume"));
                    }
                }
                serde_json::json!({ "resync": resync, "last_seq": last_seq, "events": n })
            }
            Ok(other) => {
                return Err(Error::internal(format!("unexpected reply {other:?}")));
            }
            Err(e) => serde_json::json!({ "error": { "code": e.code, "message": e.message } }),
        };
        out.insert(room.to_string(), entry);
    }
    Ok(serde_json::json!({ "rooms": out }))
}

/// Queues a reply; false when the session is closing (or was just closed as a slow consumer).
fn reply(handle: &SessionHandle, text: String) -> bool {
    handle.offer(Outbound::Text(text))
}

/// The close frame for `r` (reason cut to the 123 bytes a close frame holds).
pub fn close_frame(r: &CloseReason) -> WsMessage {
    let mut reason = r.reason.clone();
    // A close frame's reason holds at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    WsMessage::Close(Some(CloseFrame {
        code: r.code.into(),
        reason: Utf8Bytes::from(reason),
    }))
}

/// If `e` is tungstenite refusing an oversized frame or message, the limit.
pub fn too_large(e: &tungstenite::Error) -> Option<usize> {
    match e {
        tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
            max_size,
            ..
        }) => Some(*max_size),
        _ => None,
    }
}
