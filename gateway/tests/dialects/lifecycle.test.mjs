// Drain: on SIGTERM a gateway tells every client, in its dialect's own way, to reconnect
// elsewhere, and the real client libraries do. Run by gateway/tests/lifecycle.rs, which gives:
//   PALAVER_BIN       the palaver binary
//   PALAVER_URL       http://127.0.0.1:<port> (nothing listens there until a server starts)
//   PALAVER_DATA_DIR  a fresh data directory
//   PALAVER_JWT_SECRET
//
// Server A runs on the port; clients of every dialect connect and share a group. A gets SIGTERM:
// native, Phoenix, type-tagged and event/data sockets are closed with 1001 ("going away"),
// Socket.IO clients lose their transport (not a namespace disconnect, which would stop them
// from reconnecting), and A exits 0. Server B then starts on the same address (a load
// balancer's "elsewhere") with the same data: socket.io-client and phoenix.js reconnect by
// themselves, phoenix.js rejoins its channel, and a message sent after reaches them.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { Socket } from "phoenix";
import { io } from "socket.io-client";
import WebSocket from "ws";
import { JsonSocket, URL, WS_URL, SECRET, WAIT, newUser, touch, within, pause } from "./lib.mjs";

const BIN = process.env.PALAVER_BIN;
const DATA = process.env.PALAVER_DATA_DIR;
if (!BIN || !DATA) throw new Error("PALAVER_BIN and PALAVER_DATA_DIR must be set");

/** Starts `palaver serve` on PALAVER_URL's address; resolves once /readyz answers 200. */
async function startServer(label) {
  const addr = URL.replace(/^http:\/\//, "");
  const child = spawn(BIN, ["serve"], {
    env: {
      PATH: process.env.PATH,
      PALAVER_HTTP_ADDR: addr,
      PALAVER_DATA_DIR: DATA,
      PALAVER_JWT_SECRET: SECRET,
      PALAVER_SHUTDOWN_GRACE_SECS: "5",
      PALAVER_LOG: "warn",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  const deadline = Date.now() + 15000;
  for (;;) {
    try {
      const r = await fetch(`${URL}/readyz`, { signal: AbortSignal.timeout(500) });
      if (r.status === 200) break;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`${label} did not become ready: ${stderr}`);
    }
    await pause(50);
  }
  child.label = label;
  child.stderrText = () => stderr;
  return child;
}

/** Resolves `value` of the first call of `register(cb)`. */
const once = (register) => new Promise((resolve) => register(resolve));

test("SIGTERM: every dialect is told to reconnect, and the clients do, to the next server", { timeout: 60000 }, async () => {
  let server = await startServer("A");
  const cleanup = [];
  try {
    const [a, b, c, d, e] = [newUser(), newUser(), newUser(), newUser(), newUser()];
    for (const u of [b, c, d, e]) await touch(u);

    // a: native; b: Socket.IO (Syarah); c: Phoenix; d: type-tagged; e: event/data.
    const native = await JsonSocket.open(`${WS_URL}/ws?token=${a.token}`);
    cleanup.push(() => native.close());
    native.send({ id: "g", op: "create_group", name: "drain", members: [b.id, c.id, d.id, e.id] });
    const created = await native.next((m) => m.id === "g", WAIT, "create_group");
    assert.equal(created.ok, true, JSON.stringify(created));
    const room = created.data.room.id;

    const sio = io(URL, {
      forceNew: true,
      transports: ["websocket"],
      auth: { token: b.token },
      reconnectionDelay: 200,
      reconnectionDelayMax: 500,
      timeout: WAIT,
    });
    cleanup.push(() => sio.disconnect());
    const sioMessages = [];
    sio.on("message", (m) => sioMessages.push(m));
    let sioConnects = 0;
    sio.on("connect", () => (sioConnects += 1));
    await within(once((r) => sio.once("connect", r)), WAIT, "socket.io connect");

    const phx = new Socket(`${WS_URL}/socket`, {
      transport: WebSocket,
      params: { token: c.token, device_unique_id: "drain-dev", preferred_language: "en" },
      reconnectAfterMs: () => 200,
      rejoinAfterMs: () => 200,
      timeout: WAIT,
    });
    cleanup.push(() => {
      for (const ch of phx.channels) ch.rejoinTimer.reset();
      phx.disconnect();
    });
    const phxCloses = [];
    phx.onClose((ev) => phxCloses.push(ev.code));
    let phxOpens = 0;
    phx.onOpen(() => (phxOpens += 1));
    phx.connect();
    const channel = phx.channel(`chat:${room}`, {});
    const phxMessages = [];
    channel.on("receive_message", (p) => phxMessages.push(p));
    let joins = 0;
    channel.join().receive("ok", () => (joins += 1));
    await within((async () => { while (joins < 1) await pause(10); })(), WAIT, "phoenix join");

    const rt = await JsonSocket.open(`${WS_URL}/rt/chat`);
    cleanup.push(() => rt.close());
    rt.send({ type: "AUTH", token: d.token });
    await rt.next((m) => m.type === "SUCCESS", WAIT, "rt AUTH");

    const ev = await JsonSocket.open(
      `${WS_URL}/events?user_id=${e.id}&username=${e.username}&name=x&token=${e.token}`,
    );
    cleanup.push(() => ev.close());
    await ev.next((m) => m.event === "chat:connected", WAIT, "chat:connected");

    // Everyone is live: one message reaches all of them.
    native.send({ id: "m1", op: "send", room, text: "before" });
    await native.next((m) => m.id === "m1" && m.ok, WAIT, "send before");
    await within((async () => { while (!sioMessages.length || !phxMessages.length) await pause(10); })(), WAIT, "before reaches socket.io and phoenix");

    // SIGTERM: each dialect's own "go elsewhere".
    const sioGone = within(once((r) => sio.once("disconnect", r)), WAIT, "socket.io disconnect");
    server.kill("SIGTERM");
    // Phoenix's close is awaited too: the server can exit (and the other clients see their
    // closes) before the Phoenix client has handled its own.
    const phxGone = within((async () => { while (!phxCloses.length) await pause(10); })(), WAIT, "phoenix close");
    const [nativeClose, rtClose, evClose, sioReason, exit] = await Promise.all([
      native.waitClosed(),
      rt.waitClosed(),
      ev.waitClosed(),
      sioGone,
      within(server.exited, 10000, "server A exit"),
      phxGone,
    ]);
    assert.equal(nativeClose.code, 1001, JSON.stringify(nativeClose));
    assert.equal(rtClose.code, 1001, JSON.stringify(rtClose));
    assert.equal(evClose.code, 1001, JSON.stringify(evClose));
    // A transport close reconnects; "io server disconnect" would not.
    assert.equal(sioReason, "transport close");
    assert.ok(phxCloses.includes(1001), `phoenix closes: ${phxCloses}`);
    assert.deepEqual(exit, { code: 0, signal: null }, server.stderrText());

    // "Elsewhere": the next server on the same address, same data.
    server = await startServer("B");
    await within((async () => { while (sioConnects < 2) await pause(20); })(), 10000, "socket.io reconnects by itself");
    await within((async () => { while (phxOpens < 2 || joins < 2) await pause(20); })(), 10000, "phoenix reconnects and rejoins by itself");

    // A native client reconnects (as its docs say to on 1001) and sends: the reconnected
    // Socket.IO and Phoenix clients get it.
    const again = await JsonSocket.open(`${WS_URL}/ws?token=${a.token}`);
    cleanup.push(() => again.close());
    again.send({ id: "m2", op: "send", room, text: "after" });
    await again.next((m) => m.id === "m2" && m.ok, WAIT, "send after");
    await within((async () => {
      while (!sioMessages.some((m) => JSON.stringify(m).includes("after"))) await pause(20);
    })(), WAIT, "socket.io gets the message sent after the restart");
    await within((async () => {
      while (!phxMessages.some((m) => JSON.stringify(m).includes("after"))) await pause(20);
    })(), WAIT, "phoenix gets the message sent after the restart");
  } finally {
    for (const f of cleanup) {
      try { f(); } catch { /* best effort */ }
    }
    if (server.exitCode === null && server.signalCode === null) {
      server.kill("SIGTERM");
      await within(server.exited, 10000, "last server exit").catch(() => server.kill("SIGKILL"));
    }
  }
});
