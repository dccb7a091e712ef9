// Phoenix Channels (seed 002): `/socket/websocket`, driven by the real npm `phoenix` 1.8 client
// (Socket with `transport: WebSocket` from `ws`, as the seed's example does in Node) against a
// real Palaver: connecting with socket params and with `authToken`, refused connects, chat
// channels (membership, send_message -> phx_reply + message_sent, receive_message to the others
// only), the notifications channel (own only, new_notification for chats not joined, pending
// notifications across a disconnect, then cleared), leaving, removal, duplicate joins,
// heartbeats, unmatched topics, wrong vsn and the validation errors of send_message.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import { Socket } from "phoenix";
import WebSocket from "ws";
import {
  ISO_DATETIME,
  JsonSocket,
  QUIET,
  Scope,
  WAIT,
  WS_URL,
  expiredToken,
  newUser,
  pause,
  rest,
  within,
  wrongSignatureToken,
} from "./lib.mjs";

const ENDPOINT = `${WS_URL}/socket`;
const RAW = `${WS_URL}/socket/websocket`;
const DIGITS = /^[1-9]\d*$/;

// ------------------------------------------------------------------------------------------
// Helpers of this file
// ------------------------------------------------------------------------------------------

let scope = new Scope();
afterEach(() => {
  scope.close();
  scope = new Scope();
});

/**
 * A phoenix.js Socket for `user` (params `token`, `device_unique_id`, `preferred_language`
 * unless overridden), not yet connected. Reconnects and rejoins are pushed far out so that
 * they never interfere with a scenario; the scope disconnects it.
 */
function phx(user, { params, authToken, device = "device-1", lang = "EN" } = {}) {
  const p = params ?? { token: user.token, device_unique_id: device, preferred_language: lang };
  const socket = new Socket(ENDPOINT, {
    transport: WebSocket,
    params: p,
    authToken,
    timeout: WAIT,
    reconnectAfterMs: () => 60_000,
    rejoinAfterMs: () => 60_000,
  });
  // A refused join arms its channel's rejoin timer, which disconnect() leaves running (and so
  // the process alive): cancel those too.
  scope.add({
    disconnect() {
      for (const channel of socket.channels) channel.rejoinTimer.reset();
      socket.disconnect();
    },
  });
  return socket;
}

/** Connects `socket`; resolves once open, rejects on a transport error. */
function open(socket) {
  return within(
    new Promise((resolve, reject) => {
      socket.onOpen(resolve);
      socket.onError((e) => reject(new Error(`socket error: ${e?.message ?? e}`)));
      socket.connect();
    }),
    WAIT,
    "socket open",
  );
}

/** A connected phoenix.js socket for `user`. */
async function connect(user, opts) {
  const s = phx(user, opts);
  await open(s);
  return s;
}

/** Records the events of a channel; `next` waits (bounded) for one not yet taken. */
class Events {
  constructor(channel, names) {
    this.items = [];
    this.waiters = new Set();
    for (const event of names) {
      channel.on(event, (payload) => {
        const entry = { event, payload, taken: false };
        this.items.push(entry);
        for (const w of this.waiters) {
          if (!entry.taken && w.event === event && w.pred(payload)) {
            entry.taken = true;
            this.waiters.delete(w);
            w.resolve(payload);
          }
        }
      });
    }
  }

  next(event, pred = () => true, ms = WAIT) {
    const found = this.items.find((e) => !e.taken && e.event === event && pred(e.payload));
    if (found) {
      found.taken = true;
      return Promise.resolve(found.payload);
    }
    let waiter;
    const p = new Promise((resolve) => {
      waiter = { event, pred, resolve };
      this.waiters.add(waiter);
    });
    return within(p, ms, event).finally(() => this.waiters.delete(waiter));
  }

  untaken(event) {
    return this.items.filter((e) => !e.taken && e.event === event).map((e) => e.payload);
  }

  /** Asserts that no `event` arrives (beyond those already taken) within QUIET. */
  async none(event, what = event) {
    await pause(QUIET);
    assert.deepEqual(this.untaken(event), [], `unexpected ${what}`);
  }
}

const EVENTS = ["receive_message", "message_sent", "new_notification", "pending_notification"];

/** Resolves a Push's outcome as `{status, response}` (ok, error or timeout). */
function outcome(push, what) {
  return within(
    new Promise((resolve) => {
      push
        .receive("ok", (response) => resolve({ status: "ok", response }))
        .receive("error", (response) => resolve({ status: "error", response }))
        .receive("timeout", () => resolve({ status: "timeout" }));
    }),
    WAIT + 1000,
    what,
  );
}

/** Joins `topic` on `socket`; resolves `{channel, events, status, response}`. */
async function join(socket, topic) {
  const channel = socket.channel(topic, {});
  const events = new Events(channel, EVENTS);
  const r = await outcome(channel.join(), `join ${topic}`);
  return { channel, events, ...r };
}

/** Joins `topic` and requires success (response `{}`). */
async function joined(socket, topic) {
  const j = await join(socket, topic);
  assert.deepEqual({ status: j.status, response: j.response }, { status: "ok", response: {} });
  return j;
}

/** Pushes `send_message`; resolves the reply outcome. */
const send = (channel, content, mobile_ref_id) =>
  outcome(channel.push("send_message", { content, mobile_ref_id }), "send_message reply");

/**
 * Fresh users that exist on the server: a profile is created by an authenticated connect (a
 * REST call does not create one), so each connects once, briefly, over a raw socket.
 */
async function users(n) {
  const out = [];
  for (let i = 0; i < n; i += 1) {
    const u = newUser();
    const s = await JsonSocket.open(`${RAW}?vsn=2.0.0&token=${u.token}`);
    s.close();
    await s.waitClosed();
    out.push(u);
  }
  return out;
}

/** The direct room of `a` and `b` (native REST); its id as a number. */
async function direct(a, b) {
  const r = await rest(a.token, "POST", "/v1/rooms/direct", { user: b.id });
  assert.ok(r.status === 200 || r.status === 201, JSON.stringify(r.body));
  return r.body.room.id;
}

/** A group of `owner` with `members` (native REST); its id as a number. */
async function group(owner, members) {
  const r = await rest(owner.token, "POST", "/v1/rooms", {
    name: "crew",
    members: members.map((m) => m.id),
  });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return r.body.room.id;
}

/** Waits (bounded) until the server counts `user` as offline, as seen by `asker`. */
async function offline(asker, user) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const r = await rest(asker.token, "GET", `/v1/users/${user.id}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    if (r.body.online === false) return;
    if (Date.now() > deadline) throw new Error(`${user.id} still online after ${WAIT} ms`);
    await pause(25);
  }
}

/**
 * Sends `text` on `channel` and returns once the room has also stored its pending
 * notifications: they are recorded just after the message is acknowledged, so the sender's
 * next change of the room (an edit of the same text over native REST, sequenced after it) is
 * the sign that they are stored.
 */
async function sendStored(channel, user, room, text, ref) {
  const r = await send(channel, text, ref);
  assert.equal(r.status, "ok", JSON.stringify(r));
  const e = await rest(user.token, "PATCH", `/v1/rooms/${room}/messages/${r.response.message_id}`, {
    text,
  });
  assert.equal(e.status, 200, JSON.stringify(e.body));
  return r.response;
}

/** Disconnects a phoenix.js socket and waits until its close is complete. */
function disconnect(socket) {
  return within(new Promise((resolve) => socket.disconnect(resolve)), WAIT, "disconnect");
}

/** Asserts a receive_message payload exactly. */
function assertReceived(p, { room, content, sender }) {
  assert.deepEqual(p, { chat_id: String(room), content, sender_id: sender.id });
}

/** Asserts a new_notification / pending_notification payload exactly. */
function assertNotification(p, { room, content, sender }) {
  assert.deepEqual(Object.keys(p), ["chat_id", "sender_id", "content", "timestamp"]);
  assert.equal(p.chat_id, String(room));
  assert.equal(p.sender_id, sender.id);
  assert.equal(p.content, content);
  assert.match(p.timestamp, ISO_DATETIME);
  assert.ok(p.timestamp.endsWith("Z") && p.timestamp.length === 24, p.timestamp);
  assert.ok(Math.abs(Date.now() - Date.parse(p.timestamp)) < 60_000, p.timestamp);
}

/** A raw `ws` socket on the endpoint speaking V2 frames (for what phoenix.js cannot send). */
async function raw(user, query = "vsn=2.0.0") {
  return scope.add(await JsonSocket.open(`${RAW}?${query}&token=${user.token}`));
}

/** The next raw frame `[join_ref, ref, topic, event, payload]` matching. */
const frame = (s, pred, label) => s.next((m) => Array.isArray(m) && pred(m), WAIT, label);

/** Opens `url` expecting an HTTP refusal; resolves `{status, body}`. */
function refusedUpgrade(url, protocols) {
  return within(
    new Promise((resolve, reject) => {
      const ws = new WebSocket(url, protocols);
      ws.on("open", () => {
        ws.close();
        reject(new Error("the upgrade was accepted"));
      });
      ws.on("error", () => {});
      ws.on("unexpected-response", (req, res) => {
        // With this listener, ending the request is ours to do: ws leaves it open, and the
        // keep-alive agent would keep its socket (and this process) alive.
        const socket = res.socket;
        let body = "";
        res.on("data", (c) => {
          body += c;
        });
        res.on("end", () => {
          req.destroy();
          socket?.destroy();
          resolve({ status: res.statusCode, body: JSON.parse(body) });
        });
      });
    }),
    WAIT,
    `refused ${url}`,
  );
}

// ------------------------------------------------------------------------------------------
// Connecting
// ------------------------------------------------------------------------------------------

describe("connect", () => {
  test("socket params token, device_unique_id and preferred_language", async () => {
    const [u] = await users(1);
    const s = await connect(u, { device: "somerandontoken", lang: "pt-BR" });
    assert.equal(s.isConnected(), true);
    // The language is stored on the user.
    const me = await rest(u.token, "GET", `/v1/users/${u.id}`);
    assert.equal(me.status, 200);
    assert.equal(me.body.user.language, "pt-BR");
    // socket.ping is a heartbeat on topic "phoenix" answered by its phx_reply.
    const rtt = await within(new Promise((r) => s.ping(r)), WAIT, "heartbeat reply");
    assert.equal(typeof rtt, "number");
  });

  test("authToken (Sec-WebSocket-Protocol), answered with subprotocol phoenix", async () => {
    const [u] = await users(1);
    const s = await connect(u, { params: { device_unique_id: "d-auth" }, authToken: u.token });
    assert.equal(s.conn.protocol, "phoenix");
    const { status } = await join(s, `notifications:${u.id}`);
    assert.equal(status, "ok");
  });

  for (const [what, token] of [
    ["a token with a wrong signature", (u) => wrongSignatureToken(u.id)],
    ["an expired token", (u) => expiredToken(u.id)],
    ["no token", () => undefined],
  ]) {
    test(`${what} is refused: onError, never open`, async () => {
      const u = newUser();
      const t = token(u);
      const s = phx(u, { params: t ? { token: t } : { device_unique_id: "d" } });
      let opened = false;
      s.onOpen(() => {
        opened = true;
      });
      const err = within(new Promise((r) => s.onError(r)), WAIT, "onError");
      s.connect();
      await err;
      await pause(QUIET);
      assert.equal(opened, false);
      assert.equal(s.isConnected(), false);
    });
  }

  test("refusals before the upgrade: 403 for tokens, 400 for vsn and params", async () => {
    const u = newUser();
    let r = await refusedUpgrade(`${RAW}?vsn=2.0.0&token=${expiredToken(u.id)}`);
    assert.deepEqual(r, {
      status: 403,
      body: { error: { code: "unauthorized", message: "access token has expired" } },
    });
    r = await refusedUpgrade(`${RAW}?vsn=2.0.0`);
    assert.equal(r.status, 403);
    assert.equal(r.body.error.code, "unauthorized");
    r = await refusedUpgrade(`${RAW}?vsn=1.0.0&token=${u.token}`);
    assert.deepEqual(r, {
      status: 400,
      body: {
        error: {
          code: "invalid_field",
          message:
            'unsupported vsn "1.0.0": this endpoint serves only the Phoenix V2 JSON serializer, vsn=2.0.0',
        },
      },
    });
    r = await refusedUpgrade(`${RAW}?token=${u.token}`);
    assert.equal(r.status, 400);
    assert.match(r.body.error.message, /^missing vsn/);
    r = await refusedUpgrade(`${RAW}?vsn=2.0.0&token=${u.token}&preferred_language=x`);
    assert.equal(r.status, 400);
    assert.match(r.body.error.message, /^preferred_language must be/);
    r = await refusedUpgrade(`${RAW}?vsn=2.0.0&token=${u.token}&device_unique_id=`);
    assert.equal(r.status, 400);
    assert.match(r.body.error.message, /^device_unique_id must be/);
    // A phoenix.js client asking for another vsn gets an error, never an open socket.
    const s = new Socket(ENDPOINT, {
      transport: WebSocket,
      params: { token: u.token },
      vsn: "1.0.0",
      reconnectAfterMs: () => 60_000,
    });
    scope.add(s);
    const err = within(new Promise((res) => s.onError(res)), WAIT, "onError");
    s.connect();
    await err;
    assert.equal(s.isConnected(), false);
  });
});

// ------------------------------------------------------------------------------------------
// Chat channels
// ------------------------------------------------------------------------------------------

describe("chat channel", () => {
  test("members join; others, bad ids and unknown rooms are refused", async () => {
    const [a, b, c] = await users(3);
    const room = await direct(a, b);
    const sa = await connect(a);
    const sc = await connect(c);
    await joined(sa, `chat:${room}`);
    let j = await join(sc, `chat:${room}`);
    assert.deepEqual([j.status, j.response], ["error", { reason: "unauthorized" }]);
    j = await join(sc, "chat:674bd8ba5a0b920001bd9f5d");
    assert.deepEqual([j.status, j.response], ["error", { reason: "not_found" }]);
    j = await join(sc, "chat:9007199254740991");
    assert.equal(j.status, "error");
    assert.deepEqual([j.status, j.response], ["error", { reason: "not_found" }]);
    // A topic no channel serves: Phoenix's own answer.
    j = await join(sc, "room:lobby");
    assert.deepEqual([j.status, j.response], ["error", { reason: "unmatched topic" }]);
  });

  test("send_message: reply, message_sent, receive_message to the others only", async () => {
    const [a, b, c] = await users(3);
    const room = await group(a, [b, c]);
    const sa = await connect(a, { device: "a-phone" });
    const sa2 = await connect(a, { device: "a-tablet" });
    const sb = await connect(b);
    const sbNotif = await connect(b, { device: "b-laptop" });
    const ca = await joined(sa, `chat:${room}`);
    const ca2 = await joined(sa2, `chat:${room}`);
    const cb = await joined(sb, `chat:${room}`);
    const nb = await joined(sbNotif, `notifications:${b.id}`);
    const text = "Hey, i'm fine! and you?";

    const r = await send(ca.channel, text, "123124");
    assert.equal(r.status, "ok", JSON.stringify(r));
    assert.deepEqual(Object.keys(r.response).sort(), ["chat_id", "message_id", "mobile_ref_id"]);
    assert.equal(r.response.mobile_ref_id, "123124");
    assert.equal(r.response.chat_id, String(room));
    assert.match(r.response.message_id, DIGITS);
    const sent = await ca.events.next("message_sent");
    assert.deepEqual(sent, { mobile_ref_id: "123124", status: "sent", chat_id: String(room) });

    // The other member's socket in the channel.
    assertReceived(await cb.events.next("receive_message"), { room, content: text, sender: a });
    // The sender's other device, in the channel too.
    assertReceived(await ca2.events.next("receive_message"), { room, content: text, sender: a });
    // The receiver's device that did not join the chat: a live notification.
    assertNotification(await nb.events.next("new_notification"), {
      room,
      content: text,
      sender: a,
    });
    // The sending socket does not get its own message back.
    await ca.events.none("receive_message", "echo of one's own message");
    await cb.events.none("new_notification", "notification for a joined chat");

    // A numeric mobile_ref_id is echoed as a number.
    const n = await send(ca.channel, "second", 42);
    assert.equal(n.status, "ok");
    assert.equal(n.response.mobile_ref_id, 42);
    assert.deepEqual(await ca.events.next("message_sent"), {
      mobile_ref_id: 42,
      status: "sent",
      chat_id: String(room),
    });
    assertReceived(await cb.events.next("receive_message"), {
      room,
      content: "second",
      sender: a,
    });
    await ca.events.none("receive_message", "echo of one's own message");
    await pause(QUIET);
    assert.equal(cb.events.untaken("receive_message").length, 0);

    // The history agrees (native REST).
    const h = await rest(b.token, "GET", `/v1/rooms/${room}/messages`);
    assert.equal(h.status, 200);
    assert.deepEqual(
      h.body.messages.map((m) => m.text),
      ["second", text],
    );
  });

  test("a retried mobile_ref_id from the same device returns the original message", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a, { device: "a-phone" });
    const ca = await joined(sa, `chat:${room}`);
    const first = await send(ca.channel, "once", "m-1");
    const again = await send(ca.channel, "once", "m-1");
    assert.equal(first.status, "ok");
    assert.equal(again.status, "ok");
    assert.equal(again.response.message_id, first.response.message_id);
    // The same mobile_ref_id from another device is another message.
    const sa2 = await connect(a, { device: "a-tablet" });
    const ca2 = await joined(sa2, `chat:${room}`);
    const other = await send(ca2.channel, "once", "m-1");
    assert.equal(other.status, "ok");
    assert.notEqual(other.response.message_id, first.response.message_id);
    const h = await rest(b.token, "GET", `/v1/rooms/${room}/messages`);
    assert.equal(h.body.messages.length, 2);
  });

  test("send_message validation: errors in the reply and in message_sent", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a);
    const sb = await connect(b);
    const ca = await joined(sa, `chat:${room}`);
    const cb = await joined(sb, `chat:${room}`);
    const cases = [
      [{ content: "", mobile_ref_id: "e1" }, "e1", "content must not be empty"],
      [{ mobile_ref_id: "e2" }, "e2", "content is required"],
      [{ content: "hi" }, null, "mobile_ref_id is required"],
      [{ content: 5, mobile_ref_id: "e4" }, "e4", "content must be a string"],
      [{ content: "hi", mobile_ref_id: "" }, "", "mobile_ref_id must be 1 to 100 characters"],
      [{ content: "hi", mobile_ref_id: {} }, null, "mobile_ref_id must be a string or a number"],
      [{ content: "   ", mobile_ref_id: "e7" }, "e7", "text must not be empty"],
    ];
    for (const [payload, echo, message] of cases) {
      const r = await outcome(ca.channel.push("send_message", payload), "send_message");
      assert.deepEqual(
        r,
        { status: "error", response: { reason: "invalid_field", message } },
        JSON.stringify(payload),
      );
      assert.deepEqual(await ca.events.next("message_sent"), {
        mobile_ref_id: echo,
        status: "error",
        chat_id: String(room),
        reason: "invalid_field",
      });
    }
    const tooLong = await send(ca.channel, "x".repeat(4097), "e8");
    assert.equal(tooLong.status, "error");
    assert.equal(tooLong.response.reason, "text_too_long");
    assert.equal((await ca.events.next("message_sent")).reason, "text_too_long");
    await cb.events.none("receive_message", "a refused message delivered");
    // An event the channel does not know.
    const unknown = await outcome(ca.channel.push("typing", {}), "typing");
    assert.deepEqual(unknown, { status: "error", response: { reason: "unknown event" } });
  });

  test("leaving: ok, channel closed, messages then come as new_notification", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a);
    const sb = await connect(b);
    const ca = await joined(sa, `chat:${room}`);
    const cb = await joined(sb, `chat:${room}`);
    const nb = await joined(sb, `notifications:${b.id}`);

    assert.equal((await send(ca.channel, "while in", "l1")).status, "ok");
    assertReceived(await cb.events.next("receive_message"), {
      room,
      content: "while in",
      sender: a,
    });
    await nb.events.none("new_notification", "notification for a joined chat");

    const closed = within(new Promise((r) => cb.channel.onClose(r)), WAIT, "onClose");
    const left = await outcome(cb.channel.leave(), "leave");
    assert.deepEqual(left, { status: "ok", response: {} });
    await closed;

    assert.equal((await send(ca.channel, "after leaving", "l2")).status, "ok");
    assertNotification(await nb.events.next("new_notification"), {
      room,
      content: "after leaving",
      sender: a,
    });
    await cb.events.none("receive_message", "message on a left channel");
  });

  test("a member removed from a group gets phx_close on its chat channel", async () => {
    const [a, b] = await users(2);
    const room = await group(a, [b]);
    const sb = await connect(b);
    const cb = await joined(sb, `chat:${room}`);
    const closed = within(new Promise((r) => cb.channel.onClose(r)), WAIT, "onClose");
    const r = await rest(a.token, "DELETE", `/v1/rooms/${room}/members/${b.id}`);
    assert.ok(r.status === 200 || r.status === 204, JSON.stringify(r));
    await closed;
    assert.equal(cb.channel.state, "closed");
    // Joining again is refused now.
    const j = await join(sb, `chat:${room}`);
    assert.deepEqual([j.status, j.response], ["error", { reason: "unauthorized" }]);
  });

  test("a duplicate join closes the old join ref first (raw frames)", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const s = await raw(a);
    const topic = `chat:${room}`;
    s.send(["1", "1", topic, "phx_join", {}]);
    assert.deepEqual(await frame(s, (m) => m[1] === "1", "join 1 reply"), [
      "1",
      "1",
      topic,
      "phx_reply",
      { status: "ok", response: {} },
    ]);
    s.send(["5", "5", topic, "phx_join", {}]);
    assert.deepEqual(await frame(s, (m) => m[3] === "phx_close", "phx_close"), [
      "1",
      "1",
      topic,
      "phx_close",
      {},
    ]);
    assert.deepEqual(await frame(s, (m) => m[1] === "5", "join 5 reply"), [
      "5",
      "5",
      topic,
      "phx_reply",
      { status: "ok", response: {} },
    ]);
    // Pushes now carry the new join ref.
    const sb = await connect(b);
    const cb = await joined(sb, topic);
    assert.equal((await send(cb.channel, "to the new join", "d1")).status, "ok");
    assert.deepEqual(await frame(s, (m) => m[3] === "receive_message", "receive_message"), [
      "5",
      null,
      topic,
      "receive_message",
      { chat_id: String(room), content: "to the new join", sender_id: b.id },
    ]);
  });

  test("a phoenix.js channel's duplicate is left client-side and the new one works", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a);
    const first = await joined(sa, `chat:${room}`);
    const firstClosed = within(new Promise((r) => first.channel.onClose(r)), WAIT, "onClose");
    const second = await joined(sa, `chat:${room}`);
    await firstClosed;
    const sb = await connect(b);
    const cb = await joined(sb, `chat:${room}`);
    assert.equal((await send(cb.channel, "hello again", "x1")).status, "ok");
    assertReceived(await second.events.next("receive_message"), {
      room,
      content: "hello again",
      sender: b,
    });
  });
});

// ------------------------------------------------------------------------------------------
// Notifications channel
// ------------------------------------------------------------------------------------------

describe("notifications channel", () => {
  test("only one's own", async () => {
    const [a, b] = await users(2);
    const sa = await connect(a);
    const j = await join(sa, `notifications:${b.id}`);
    assert.deepEqual([j.status, j.response], ["error", { reason: "unauthorized" }]);
    await joined(sa, `notifications:${a.id}`);
  });

  test("pending notifications: delivered after join, oldest first, then cleared", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a);
    const ca = await joined(sa, `chat:${room}`);

    // b is offline (it connected once, in users()): both messages are stored for b.
    await offline(a, b);
    for (const [i, text] of ["first while away", "second while away"].entries()) {
      await sendStored(ca.channel, a, room, text, `p${i}`);
    }
    let sb = await connect(b, { device: "b-phone" });
    let nb = await joined(sb, `notifications:${b.id}`);
    const p1 = await nb.events.next("pending_notification");
    const p2 = await nb.events.next("pending_notification");
    assertNotification(p1, { room, content: "first while away", sender: a });
    assertNotification(p2, { room, content: "second while away", sender: a });
    assert.ok(Date.parse(p1.timestamp) <= Date.parse(p2.timestamp));
    await nb.events.none("pending_notification", "a third pending notification");

    // Taken: the next connect has none.
    await disconnect(sb);
    await offline(a, b);
    sb = await connect(b, { device: "b-phone" });
    nb = await joined(sb, `notifications:${b.id}`);
    await nb.events.none("pending_notification", "pending notifications delivered twice");

    // Across a disconnect: what arrives while offline is delivered on the next join.
    await disconnect(sb);
    await offline(a, b);
    await sendStored(ca.channel, a, room, "third while away", "p3");
    sb = await connect(b, { device: "b-phone" });
    // Nothing before the notifications channel is joined...
    const chat = await joined(sb, `chat:${room}`);
    await chat.events.none("receive_message", "a message sent before the join");
    nb = await joined(sb, `notifications:${b.id}`);
    assertNotification(await nb.events.next("pending_notification"), {
      room,
      content: "third while away",
      sender: a,
    });
    await nb.events.none("pending_notification", "an old pending notification");
    // ...and live ones for the chat b is in go to the chat channel, not here.
    assert.equal((await send(ca.channel, "live", "p4")).status, "ok");
    assertReceived(await chat.events.next("receive_message"), { room, content: "live", sender: a });
    await nb.events.none("new_notification", "notification for a joined chat");
  });

  test("one's own messages from another device are not notifications", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a, { device: "a-phone" });
    const ca = await joined(sa, `chat:${room}`);
    const sa2 = await connect(a, { device: "a-tablet" });
    const na2 = await joined(sa2, `notifications:${a.id}`);
    assert.equal((await send(ca.channel, "mine", "o1")).status, "ok");
    await na2.events.none("new_notification", "a notification of one's own message");
  });
});

// ------------------------------------------------------------------------------------------
// Protocol edges (raw frames)
// ------------------------------------------------------------------------------------------

describe("protocol", () => {
  test("heartbeat, unmatched topic, leave of a topic not joined, malformed frames", async () => {
    const [u] = await users(1);
    const s = await raw(u);
    s.send([null, "1", "phoenix", "heartbeat", {}]);
    assert.deepEqual(await frame(s, () => true, "heartbeat reply"), [
      null,
      "1",
      "phoenix",
      "phx_reply",
      { status: "ok", response: {} },
    ]);
    s.send(["2", "3", "chat:1", "send_message", { content: "x", mobile_ref_id: "1" }]);
    assert.deepEqual(await frame(s, () => true, "unmatched topic"), [
      null,
      "3",
      "chat:1",
      "phx_reply",
      { status: "error", response: { reason: "unmatched topic" } },
    ]);
    s.send(["4", "5", "chat:1", "phx_leave", {}]);
    assert.deepEqual(await frame(s, () => true, "leave reply"), [
      "4",
      "5",
      "chat:1",
      "phx_reply",
      { status: "ok", response: {} },
    ]);
    s.send("this is not json");
    const e = await frame(s, () => true, "phx_error");
    assert.deepEqual(e.slice(0, 4), [null, null, "phoenix", "phx_error"]);
    assert.match(e[4].reason, /^malformed frame: not JSON/);
    s.send(["6", "7", `notifications:${u.id}`, "phx_join", "not an object"]);
    assert.deepEqual(await frame(s, () => true, "malformed reply"), [
      "6",
      "7",
      `notifications:${u.id}`,
      "phx_reply",
      { status: "error", response: { reason: "malformed frame: payload must be a JSON object" } },
    ]);
    // Still usable.
    s.send([null, "8", "phoenix", "heartbeat", {}]);
    assert.equal((await frame(s, (m) => m[1] === "8", "heartbeat 8"))[3], "phx_reply");
  });
});
