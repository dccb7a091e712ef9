// Event/data JSON dialect (seed 004, "Shaheen Star chat"): the socket on /events (and on the
// `events` compat listener at /), and the seed's REST (*.php), with the real `ws` client and
// Node's fetch/FormData. Every frame, event, error string and REST call of the seed, the
// authorization cases (spoofed user_id / sender_id), and media through the upload service.
//
// Run by gateway/tests/events.rs, which sets PALAVER_URL, PALAVER_JWT_SECRET,
// PALAVER_EVENTS_URL (the compat listener) and PALAVER_DATA_DIR (to check nothing is stored).

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import zlib from "node:zlib";
import WebSocket from "ws";
import {
  JsonSocket,
  QUIET,
  SQL_DATETIME,
  Scope,
  URL,
  WAIT,
  WS_URL,
  expiredToken,
  mint,
  newUser,
  pause,
  rest,
  within,
  wrongSignatureToken,
} from "./lib.mjs";

const EVENTS_URL = process.env.PALAVER_EVENTS_URL;
const DATA_DIR = process.env.PALAVER_DATA_DIR;

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/** A test with a Scope that closes its sockets when it ends. */
function scenario(name, fn) {
  test(name, async () => {
    const s = new Scope();
    try {
      await fn(s);
    } finally {
      s.close();
    }
  });
}

/** Opens an events socket for `user`, waits for chat:connected; `.connected` is its data. */
async function connect(s, user, { query = "", bearer = false, base = `${WS_URL}/events` } = {}) {
  const q = bearer ? query : `token=${user.token}${query ? `&${query}` : ""}`;
  const url = q ? `${base}?${q}` : base;
  const options = bearer ? { headers: { authorization: `Bearer ${user.token}` } } : undefined;
  const sock = s.add(await JsonSocket.open(url, { options }));
  const hello = await sock.next((m) => m.event === "chat:connected", WAIT, "chat:connected");
  sock.connected = hello.data;
  return sock;
}

/** The HTTP status and JSON body of a refused upgrade. */
function refusedUpgrade(url, headers = {}) {
  return within(
    new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { headers });
      ws.on("open", () => {
        ws.close();
        reject(new Error(`upgrade to ${url} was accepted`));
      });
      ws.on("error", () => {});
      ws.on("unexpected-response", (req, res) => {
        // Handling this event makes closing the connection ours to do.
        const conn = req.socket;
        let text = "";
        res.on("data", (c) => (text += c));
        res.on("end", () => {
          conn?.destroy();
          let body;
          try {
            body = JSON.parse(text);
          } catch {
            body = text;
          }
          resolve({ status: res.statusCode, body, headers: res.headers });
        });
      });
    }),
    WAIT,
    `refused upgrade ${url}`,
  );
}

/**
 * Calls a seed REST route. `json` sends a JSON body, `form` an urlencoded one, `multipart` a
 * FormData; `token` goes as Bearer unless `tokenIn: "query"`. Resolves `{status, body}`.
 */
async function php(route, { token, json, form, multipart, query, method, tokenIn = "header" } = {}) {
  const headers = {};
  const q = new URLSearchParams(query ?? {});
  if (token && tokenIn === "header") headers.authorization = `Bearer ${token}`;
  if (token && tokenIn === "query") q.set("token", token);
  let body;
  if (json !== undefined) {
    headers["content-type"] = "application/json";
    body = typeof json === "string" ? json : JSON.stringify(json);
  } else if (form !== undefined) {
    headers["content-type"] = "application/x-www-form-urlencoded";
    body = new URLSearchParams(form).toString();
  } else if (multipart !== undefined) {
    body = multipart;
  }
  const qs = q.toString();
  const res = await within(
    fetch(`${URL}/${route}${qs ? `?${qs}` : ""}`, {
      method: method ?? (body === undefined ? "GET" : "POST"),
      headers,
      body,
    }),
    WAIT * 4,
    route,
  );
  const text = await res.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  return { status: res.status, body: parsed };
}

/** Makes sure a user exists (any seed REST call creates the caller from the token). */
async function ensure(user) {
  const r = await php("get_conversations.php", { token: user.token });
  assert.equal(r.status, 200, JSON.stringify(r.body));
}

/** Sends a text over REST; asserts success and returns the answer's data. */
async function sendText(from, to, message) {
  const r = await php("send_chat_message.php", {
    token: from.token,
    json: { sender_id: from.num, receiver_id: to.num, message },
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.status, "success");
  return r.body.data;
}

const isEvent = (name, pred = () => true) => (m) => m.event === name && pred(m.data);

/** Asserts that no frame satisfying `pred` arrives within QUIET. */
async function quiet(sock, pred, what) {
  await pause(QUIET);
  assert.deepEqual(sock.untaken(pred), [], `unexpected ${what}`);
}

/** Asserts a `YYYY-MM-DD HH:MM:SS` UTC time within a minute of now. */
function assertNow(t, what) {
  assert.match(t, SQL_DATETIME, what);
  const ms = Date.parse(`${t.replace(" ", "T")}Z`);
  assert.ok(Math.abs(Date.now() - ms) < 60_000, `${what} ${t} is not UTC now`);
}

const SENDER_KEYS = ["name", "profile_url", "user_id", "username"];

/** Asserts a `sender` object for `user` (profile from its token). */
function assertSender(sender, user) {
  assert.deepEqual(Object.keys(sender).sort(), SENDER_KEYS);
  assert.deepEqual(sender, {
    user_id: user.num,
    username: user.username,
    name: user.name,
    profile_url: null,
  });
}

/** Asserts the REST answer of a successful send. */
function assertSent(body) {
  assert.deepEqual(Object.keys(body).sort(), ["data", "message", "status"]);
  assert.equal(body.status, "success");
  assert.equal(body.message, "Message sent successfully");
}

/** Asserts `chat:message` data for a text `message` from `from` to `to`. */
function assertTextEvent(d, { from, to, text, id }) {
  assert.deepEqual(Object.keys(d).sort(), [
    "created_at",
    "message",
    "message_id",
    "message_type",
    "receiver_id",
    "sender",
    "sender_id",
  ]);
  assert.equal(d.message_id, id);
  assert.equal(d.sender_id, from.num);
  assert.equal(d.receiver_id, to.num);
  assert.equal(d.message_type, "text");
  assert.equal(d.message, text);
  assertSender(d.sender, from);
  assertNow(d.created_at, "created_at");
}

/** Files under the data dir's uploads/<rel> (none when it does not exist). */
function filesIn(rel) {
  try {
    return fs.readdirSync(path.join(DATA_DIR, "uploads", rel));
  } catch {
    return [];
  }
}

// A small real PNG (w x h RGB), built with zlib and CRC-32.
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function png(w = 3, h = 2) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const rows = [];
  for (let y = 0; y < h; y++) {
    const row = Buffer.alloc(1 + w * 3);
    for (let x = 0; x < w; x++) row.set([x * 80, y * 120, 200], 1 + x * 3);
    rows.push(row);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

// A small real WAV: 16-bit mono PCM at 8 kHz, a 440 Hz tone.
function wav(samples = 800) {
  const data = Buffer.alloc(samples * 2);
  for (let i = 0; i < samples; i++) {
    data.writeInt16LE(Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / 8000)), i * 2);
  }
  const h = Buffer.alloc(44);
  h.write("RIFF", 0, "ascii");
  h.writeUInt32LE(36 + data.length, 4);
  h.write("WAVE", 8, "ascii");
  h.write("fmt ", 12, "ascii");
  h.writeUInt32LE(16, 16);
  h.writeUInt16LE(1, 20); // PCM
  h.writeUInt16LE(1, 22); // mono
  h.writeUInt32LE(8000, 24);
  h.writeUInt32LE(16000, 28);
  h.writeUInt16LE(2, 32);
  h.writeUInt16LE(16, 34);
  h.write("data", 36, "ascii");
  h.writeUInt32LE(data.length, 40);
  return Buffer.concat([h, data]);
}

// ------------------------------------------------------------------------------------------
// The socket
// ------------------------------------------------------------------------------------------

scenario("chat:connected: exact shape, with ?token= and with Authorization: Bearer", async (s) => {
  const a = newUser();
  const b = newUser();
  // The seed's query parameters: user_id (the token's), username and name (ignored).
  const sa = await connect(s, a, { query: `user_id=${a.id}&username=someone&name=Some%20One` });
  const d = sa.connected;
  assert.deepEqual(Object.keys(d), ["user_id", "message", "timestamp", "connected_users"]);
  assert.equal(d.user_id, a.num);
  assert.equal(typeof d.user_id, "number");
  assert.equal(d.message, "Successfully connected to chat server");
  assertNow(d.timestamp, "timestamp");
  assert.equal(typeof d.connected_users, "number");
  assert.ok(d.connected_users >= 1, `connected_users ${d.connected_users}`);
  // chat:connected is the very first frame.
  assert.equal(sa.frames[0].msg.event, "chat:connected");

  const sb = await connect(s, b, { bearer: true });
  assert.equal(sb.connected.user_id, b.num);
  assert.ok(sb.connected.connected_users >= 2, "a and b are both connected");

  // A non-numeric user id stays a string.
  const named = { id: "ann-x", token: mint("ann-x") };
  const sn = await connect(s, named);
  assert.equal(sn.connected.user_id, "ann-x");
});

scenario("refused before the upgrade: 401 without or with a bad token, 403 for a foreign user_id", async () => {
  const a = newUser();
  const b = newUser();
  const base = `${WS_URL}/events`;
  let r = await refusedUpgrade(`${base}?user_id=${a.id}`);
  assert.equal(r.status, 401);
  assert.deepEqual(r.body, {
    status: "error",
    message: "missing token: send Authorization: Bearer <jwt> or ?token=<jwt>",
  });
  assert.equal(r.headers["www-authenticate"], "Bearer");
  r = await refusedUpgrade(`${base}?token=${expiredToken(a.id)}`);
  assert.equal(r.status, 401);
  assert.deepEqual(r.body, { status: "error", message: "access token has expired" });
  r = await refusedUpgrade(`${base}?token=${wrongSignatureToken(a.id)}`);
  assert.equal(r.status, 401);
  assert.equal(r.body.status, "error");
  assert.match(r.body.message, /^access token is invalid/);
  r = await refusedUpgrade(base, { authorization: "Bearer not.a.jwt" });
  assert.equal(r.status, 401);
  // The seed trusts user_id; Palaver refuses one that is not the token's.
  r = await refusedUpgrade(`${base}?token=${a.token}&user_id=${b.id}`);
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, {
    status: "error",
    message: "user_id does not match the authenticated user",
  });
});

scenario("bad frames are answered with chat:error and the socket stays open; ping/pong", async (s) => {
  const a = newUser();
  const sa = await connect(s, a);
  const err = (label) => sa.next(isEvent("chat:error"), WAIT, label);

  sa.send("{not json");
  let e = await err("not JSON");
  assert.deepEqual(Object.keys(e.data), ["message", "code", "event"]);
  assert.equal(e.data.code, "malformed_json");
  assert.match(e.data.message, /^frame is not valid JSON: /);
  assert.equal(e.data.event, null);

  sa.send([1, 2]);
  e = await err("array");
  assert.deepEqual(e.data, {
    message: 'frame must be a JSON object {"event": "...", "data": {...}}',
    code: "malformed_json",
    event: null,
  });

  sa.send({ data: {} });
  e = await err("no event");
  assert.deepEqual(e.data, { message: "event is required", code: "malformed_json", event: null });

  sa.send({ event: "chat:message", data: { message: "hi" } });
  e = await err("unknown event");
  assert.deepEqual(e.data, {
    message: 'unknown event "chat:message": send chat:typing, chat:read or ping',
    code: "unknown_op",
    event: "chat:message",
  });

  sa.ws.send(Buffer.from([1, 2, 3]), { binary: true });
  e = await err("binary");
  assert.deepEqual(e.data, {
    message: "binary frames are not accepted; send JSON as text frames",
    code: "malformed_json",
    event: null,
  });

  // Over the frame limit (64 KiB): discarded unread, answered, the socket goes on.
  sa.send(JSON.stringify({ event: "ping", pad: "x".repeat(70_000) }));
  e = await err("too large");
  assert.equal(e.data.code, "frame_too_large");
  assert.equal(e.data.event, null);

  sa.send({ event: "ping" });
  const pong = await sa.next((m) => m.event === "pong", WAIT, "pong");
  assert.deepEqual(pong, { event: "pong", data: {} });
  assert.equal(sa.closedWith, null, "still open");
});

// ------------------------------------------------------------------------------------------
// send_chat_message.php and chat:message
// ------------------------------------------------------------------------------------------

scenario("text over JSON: the answer, and chat:message to both members and nobody else", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const sa = await connect(s, a);
  const sb = await connect(s, b);
  const sc = await connect(s, c);

  const r = await php("send_chat_message.php", {
    token: a.token,
    json: { sender_id: a.num, receiver_id: b.num, message: "Hello, how are you?" },
  });
  assert.equal(r.status, 200);
  assertSent(r.body);
  const d = r.body.data;
  assert.deepEqual(Object.keys(d), [
    "message_id",
    "sender_id",
    "receiver_id",
    "message_type",
    "message",
    "created_at",
  ]);
  assert.equal(typeof d.message_id, "number");
  assert.ok(Number.isSafeInteger(d.message_id) && d.message_id > 0);
  assert.equal(d.sender_id, a.num);
  assert.equal(d.receiver_id, b.num);
  assert.equal(d.message_type, "text");
  assert.equal(d.message, "Hello, how are you?");
  assertNow(d.created_at, "created_at");

  for (const [who, sock] of [
    ["receiver", sb],
    ["sender", sa],
  ]) {
    const ev = await sock.next(isEvent("chat:message"), WAIT, `chat:message to ${who}`);
    assert.deepEqual(Object.keys(ev), ["event", "data"]);
    assertTextEvent(ev.data, { from: a, to: b, text: "Hello, how are you?", id: d.message_id });
    assert.equal(ev.data.created_at, d.created_at);
  }
  await quiet(sc, isEvent("chat:message"), "chat:message to a third user");
});

scenario("text over a form body with ?token= and string ids; the answer's order", async (s) => {
  const a = newUser();
  const b = newUser();
  const sb = await connect(s, b);
  const r = await php("send_chat_message.php", {
    token: a.token,
    tokenIn: "query",
    form: { sender_id: a.id, receiver_id: b.id, message: "form hello" },
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assertSent(r.body);
  assert.equal(r.body.data.sender_id, a.num);
  assert.equal(r.body.data.receiver_id, b.num);
  const ev = await sb.next(isEvent("chat:message"), WAIT, "chat:message");
  assertTextEvent(ev.data, { from: a, to: b, text: "form hello", id: r.body.data.message_id });
  // Two more in order, with their ids increasing.
  const m2 = await sendText(a, b, "second");
  const m3 = await sendText(a, b, "third");
  assert.ok(m2.message_id > r.body.data.message_id && m3.message_id > m2.message_id);
  const e2 = await sb.next(isEvent("chat:message"), WAIT, "second");
  const e3 = await sb.next(isEvent("chat:message"), WAIT, "third");
  assert.deepEqual([e2.data.message, e3.data.message], ["second", "third"]);
});

scenario("image over multipart: media_url + file_size, and the receiver can fetch it", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await connect(s, a);
  const sb = await connect(s, b);
  const fd = new FormData();
  fd.append("sender_id", a.id);
  fd.append("receiver_id", b.id);
  fd.append("image", new Blob([png()], { type: "image/png" }), "photo.png");
  const r = await php("send_chat_message.php", { token: a.token, multipart: fd });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assertSent(r.body);
  const d = r.body.data;
  assert.deepEqual(Object.keys(d), [
    "message_id",
    "sender_id",
    "receiver_id",
    "message_type",
    "message",
    "media_url",
    "file_size",
    "created_at",
  ]);
  assert.equal(d.message_type, "image");
  assert.equal(d.message, null);
  assert.match(d.media_url, /^\/uploads\/chat-messages\/images\/[0-9a-f]{32}\.webp$/);
  assert.equal(typeof d.file_size, "number");
  assert.ok(d.file_size > 0);

  const ev = await sb.next(isEvent("chat:message"), WAIT, "image to the receiver");
  assert.deepEqual(Object.keys(ev.data), [
    "message_id",
    "sender_id",
    "receiver_id",
    "message_type",
    "message",
    "media_url",
    "file_size",
    "sender",
    "created_at",
  ]);
  assert.equal(ev.data.message_id, d.message_id);
  assert.equal(ev.data.media_url, d.media_url);
  assert.equal(ev.data.file_size, d.file_size);
  assertSender(ev.data.sender, a);
  await sa.next(isEvent("chat:message"), WAIT, "image echoed to the sender");

  const got = await fetch(`${URL}${d.media_url}`, {
    headers: { authorization: `Bearer ${b.token}` },
  });
  assert.equal(got.status, 200);
  assert.equal(got.headers.get("content-type"), "image/webp");
  const bytes = Buffer.from(await got.arrayBuffer());
  assert.equal(bytes.length, d.file_size);
  assert.equal(bytes.subarray(0, 4).toString("ascii"), "RIFF");
  assert.equal(bytes.subarray(8, 12).toString("ascii"), "WEBP");
});

scenario("voice over multipart with duration: media_duration, file_size, stored as sent", async (s) => {
  const a = newUser();
  const b = newUser();
  const sb = await connect(s, b);
  const audio = wav();
  const fd = new FormData();
  fd.append("sender_id", a.id);
  fd.append("receiver_id", b.id);
  fd.append("voice", new Blob([audio], { type: "audio/wav" }), "voice.wav");
  fd.append("duration", "15");
  const r = await php("send_chat_message.php", { token: a.token, multipart: fd });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const d = r.body.data;
  assert.deepEqual(Object.keys(d), [
    "message_id",
    "sender_id",
    "receiver_id",
    "message_type",
    "message",
    "media_url",
    "media_duration",
    "file_size",
    "created_at",
  ]);
  assert.equal(d.message_type, "voice");
  assert.equal(d.media_duration, 15);
  assert.equal(d.file_size, audio.length);
  assert.match(d.media_url, /^\/uploads\/chat-messages\/audios\/[0-9a-f]{32}\.wav$/);

  const ev = await sb.next(isEvent("chat:message"), WAIT, "voice to the receiver");
  assert.equal(ev.data.message_type, "voice");
  assert.equal(ev.data.media_duration, 15);
  assert.equal(ev.data.file_size, audio.length);
  assert.equal(ev.data.media_url, d.media_url);
  assertSender(ev.data.sender, a);

  const got = await fetch(`${URL}${d.media_url}?token=${b.token}`);
  assert.equal(got.status, 200);
  assert.deepEqual(Buffer.from(await got.arrayBuffer()), audio);

  // A recorder's blob (named "blob") is named by its type; a fractional duration is rounded;
  // without duration, media_duration is null.
  const fd2 = new FormData();
  fd2.append("receiver_id", b.id);
  fd2.append("voice", new Blob([audio], { type: "audio/wav" }));
  fd2.append("duration", "7.6");
  const r2 = await php("send_chat_message.php", { token: a.token, multipart: fd2 });
  assert.equal(r2.status, 200, JSON.stringify(r2.body));
  assert.equal(r2.body.data.media_duration, 8);
  assert.match(r2.body.data.media_url, /\.wav$/);
  const fd3 = new FormData();
  fd3.append("receiver_id", b.id);
  fd3.append("voice", new Blob([audio], { type: "audio/wav" }), "v.wav");
  const r3 = await php("send_chat_message.php", { token: a.token, multipart: fd3 });
  assert.equal(r3.status, 200, JSON.stringify(r3.body));
  assert.equal(r3.body.data.media_duration, null);
});

scenario("spoofed sender_id / user_id: 403, nothing delivered, nothing stored", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const sb = await connect(s, b);
  await ensure(c);
  const forbidden = (key) => ({ status: "error", message: `${key} does not match the authenticated user` });

  let r = await php("send_chat_message.php", {
    token: a.token,
    json: { sender_id: c.num, receiver_id: b.num, message: "spoof" },
  });
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, forbidden("sender_id"));

  r = await php("send_chat_message.php", {
    token: a.token,
    form: { sender_id: String(c.num), receiver_id: b.id, message: "spoof" },
  });
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, forbidden("sender_id"));

  r = await php("send_chat_message.php", {
    token: a.token,
    query: { sender_id: c.id },
    json: { sender_id: a.num, receiver_id: b.num, message: "spoof in the query" },
  });
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, forbidden("sender_id"));

  r = await php("send_chat_message.php", {
    token: a.token,
    json: { user_id: c.id, receiver_id: b.num, message: "spoof" },
  });
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, forbidden("user_id"));

  // Multipart: the spoofed sender_id comes after the image, which is then not stored.
  const before = filesIn("chat-messages/images").length;
  const fd = new FormData();
  fd.append("receiver_id", b.id);
  fd.append("image", new Blob([png()], { type: "image/png" }), "p.png");
  fd.append("sender_id", c.id);
  r = await php("send_chat_message.php", { token: a.token, multipart: fd });
  assert.equal(r.status, 403);
  assert.deepEqual(r.body, forbidden("sender_id"));
  assert.equal(filesIn("chat-messages/images").length, before, "no image stored");
  assert.deepEqual(filesIn(".incoming"), [], "no temporary file left");

  await quiet(sb, isEvent("chat:message"), "a spoofed message");
});

scenario("send validation: exact errors and statuses", async (s) => {
  const a = newUser();
  const b = newUser();
  const sb = await connect(s, b);
  const never = newUser(); // never seen
  const send = (opts) => php("send_chat_message.php", { token: a.token, ...opts });
  const cases = [
    [{ json: {} }, 400, "At least one of message, image, or voice must be provided"],
    [{ json: { receiver_id: b.num, message: "   " } }, 400, "At least one of message, image, or voice must be provided"],
    [{ json: { message: "hi" } }, 400, "receiver_id is required"],
    [{ json: { receiver_id: a.num, message: "hi" } }, 400, "receiver_id must be another user than the sender"],
    [{ json: { receiver_id: never.num, message: "hi" } }, 404, "receiver profile not found"],
    [{ json: { receiver_id: true, message: "hi" } }, 400, "receiver_id must be a user id (a number or a string)"],
    [{ json: { receiver_id: b.num, message: { t: 1 } } }, 400, "message must be a string"],
    [{ json: { receiver_id: b.num, image: "https://x/y.jpg" } }, 400, "image must be sent as a file in a multipart/form-data body"],
    [{ json: { receiver_id: b.num, message: "hi", duration: "soon" } }, 400, "duration must be a non-negative number of seconds"],
    [{ json: "[1]" }, 400, "the body must be a JSON object"],
  ];
  for (const [opts, status, message] of cases) {
    const r = await send(opts);
    assert.equal(r.status, status, `${JSON.stringify(opts)}: ${JSON.stringify(r.body)}`);
    assert.deepEqual(r.body, { status: "error", message }, JSON.stringify(opts));
  }
  let r = await send({ json: "{nope" });
  assert.equal(r.status, 400);
  assert.match(r.body.message, /^the body is not valid JSON: /);

  r = await php("send_chat_message.php", { json: { receiver_id: b.num, message: "hi" } });
  assert.equal(r.status, 401);
  assert.deepEqual(r.body, {
    status: "error",
    message: "missing token: send Authorization: Bearer <jwt> or ?token=<jwt>",
  });
  r = await php("send_chat_message.php", {
    token: expiredToken(a.id),
    json: { receiver_id: b.num, message: "hi" },
  });
  assert.equal(r.status, 401);
  assert.deepEqual(r.body, { status: "error", message: "access token has expired" });

  // Multipart refusals.
  const form = (fill) => {
    const fd = new FormData();
    fd.append("receiver_id", b.id);
    fill(fd);
    return fd;
  };
  const multipartCases = [
    [
      form((fd) => {
        fd.append("message", "caption?");
        fd.append("image", new Blob([png()], { type: "image/png" }), "p.png");
      }),
      400,
      "Only one of message, image, or voice may be provided per message",
    ],
    [
      form((fd) => {
        fd.append("image", new Blob([png()], { type: "image/png" }), "p.png");
        fd.append("voice", new Blob([wav()], { type: "audio/wav" }), "v.wav");
      }),
      400,
      "Only one of message, image, or voice may be provided per message",
    ],
    [
      form((fd) => {
        fd.append("image", new Blob([png()], { type: "image/png" }), "p.png");
        fd.append("image", new Blob([png()], { type: "image/png" }), "q.png");
      }),
      400,
      "image is given more than once",
    ],
    [
      form((fd) => fd.append("image", new Blob([], { type: "application/octet-stream" }), "")),
      400,
      "At least one of message, image, or voice must be provided",
    ],
    [
      form((fd) => fd.append("image", new Blob([Buffer.alloc(0)], { type: "image/png" }), "p.png")),
      400,
      "image is empty",
    ],
    [
      form((fd) => fd.append("voice", new Blob(["hello"], { type: "text/plain" }), "notes.txt")),
      400,
      'audio files must have one of the extensions mp3, wav, ogg, m4a, aac, flac, wma; got "txt"',
    ],
  ];
  for (const [fd, status, message] of multipartCases) {
    const r2 = await send({ multipart: fd });
    assert.equal(r2.status, status, JSON.stringify(r2.body));
    assert.deepEqual(r2.body, { status: "error", message });
  }
  const bad = form((fd) => fd.append("image", new Blob(["not an image"], { type: "image/png" }), "p.png"));
  r = await send({ multipart: bad });
  assert.equal(r.status, 400);
  assert.match(r.body.message, /^image could not be decoded: /);

  await quiet(sb, isEvent("chat:message"), "a refused message");
});

scenario("an image over 10 MB: 413, nothing stored, nothing delivered", async (s) => {
  const a = newUser();
  const b = newUser();
  const sb = await connect(s, b);
  const before = filesIn("chat-messages/images").length;
  const big = Buffer.alloc(10 * 1024 * 1024 + 4096, 7);
  png().copy(big); // a PNG signature first: refused for its size, not its content
  const fd = new FormData();
  fd.append("sender_id", a.id);
  fd.append("receiver_id", b.id);
  fd.append("image", new Blob([big], { type: "image/png" }), "big.png");
  const r = await php("send_chat_message.php", { token: a.token, multipart: fd });
  assert.equal(r.status, 413);
  assert.deepEqual(r.body, {
    status: "error",
    message: "image files may be at most 10485760 bytes (10 MB)",
  });
  assert.equal(filesIn("chat-messages/images").length, before, "nothing stored");
  assert.deepEqual(filesIn(".incoming"), [], "no temporary file left");
  await quiet(sb, isEvent("chat:message"), "a refused image");
});

scenario("a group message shows receiver_id null and room_id", async (s) => {
  const a = newUser();
  const b = newUser();
  await ensure(a);
  await ensure(b);
  const sb = await connect(s, b);
  const g = await rest(a.token, "POST", "/v1/rooms", { name: "team", members: [b.id] });
  assert.equal(g.status, 201, JSON.stringify(g.body));
  const room = g.body.room.id;
  const m = await rest(a.token, "POST", `/v1/rooms/${room}/messages`, { text: "to the team" });
  assert.equal(m.status, 201, JSON.stringify(m.body));
  const ev = await sb.next(isEvent("chat:message"), WAIT, "group message");
  assert.equal(ev.data.receiver_id, null);
  assert.equal(ev.data.room_id, room);
  assert.equal(ev.data.message_id, m.body.message.id);
  assert.equal(ev.data.message, "to the team");
  assertSender(ev.data.sender, a);
});

// ------------------------------------------------------------------------------------------
// chat:typing, chat:read, chat:user_status
// ------------------------------------------------------------------------------------------

scenario("chat:typing round trip, never to the typist; its errors", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await connect(s, a);
  const sb = await connect(s, b);
  sa.send({ event: "chat:typing", data: { receiver_id: b.num, is_typing: true } });
  let ev = await sb.next(isEvent("chat:typing"), WAIT, "typing true");
  assert.deepEqual(ev, { event: "chat:typing", data: { sender_id: a.num, is_typing: true } });
  sa.send({ event: "chat:typing", data: { receiver_id: String(b.num), is_typing: false } });
  ev = await sb.next(isEvent("chat:typing"), WAIT, "typing false");
  assert.deepEqual(ev.data, { sender_id: a.num, is_typing: false });
  await quiet(sa, isEvent("chat:typing"), "typing echoed to the typist");
  assert.deepEqual(sa.untaken(isEvent("chat:error")), []);

  const never = newUser();
  const cases = [
    [{ is_typing: true }, "invalid_field", "receiver_id is required"],
    [{ receiver_id: b.num }, "invalid_field", "is_typing is required"],
    [{ receiver_id: a.num, is_typing: true }, "invalid_field", "receiver_id must be another user"],
    [{ sender_id: b.num, receiver_id: b.num, is_typing: true }, "forbidden", "sender_id does not match the authenticated user"],
    [{ receiver_id: never.num, is_typing: true }, "not_found", "receiver profile not found"],
  ];
  for (const [data, code, message] of cases) {
    sa.send({ event: "chat:typing", data });
    const e = await sa.next(isEvent("chat:error"), WAIT, message);
    assert.deepEqual(e.data, { message, code, event: "chat:typing" });
  }
  await quiet(sb, isEvent("chat:typing"), "typing from a refused frame");
});

scenario("chat:read round trip: the sender learns who read; unread counts follow", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await connect(s, a);
  const sb = await connect(s, b);
  const m1 = await sendText(a, b, "one");
  const m2 = await sendText(a, b, "two");
  await sb.next(isEvent("chat:message", (d) => d.message_id === m2.message_id), WAIT, "two");
  let list = await php("get_conversations.php", { token: b.token });
  assert.equal(list.body.data.conversations[0].unread_count, 2);

  sb.send({ event: "chat:read", data: { message_id: m1.message_id } });
  const ev = await sa.next(isEvent("chat:read"), WAIT, "chat:read to the sender");
  assert.deepEqual(Object.keys(ev.data), ["message_id", "read_by", "room_id"]);
  assert.equal(ev.data.message_id, m1.message_id);
  assert.equal(ev.data.read_by, b.num);
  assert.equal(typeof ev.data.room_id, "number");
  // The reader's own sessions see it too (other devices).
  const own = await sb.next(isEvent("chat:read"), WAIT, "chat:read to the reader");
  assert.deepEqual(own.data, ev.data);
  list = await php("get_conversations.php", { token: b.token });
  assert.equal(list.body.data.conversations[0].unread_count, 1);

  sb.send({ event: "chat:read", data: { message_id: String(m2.message_id) } });
  await sa.next(isEvent("chat:read", (d) => d.message_id === m2.message_id), WAIT, "second read");
  list = await php("get_conversations.php", { token: b.token });
  assert.equal(list.body.data.conversations[0].unread_count, 0);

  // Errors.
  const cases = [
    [{}, "invalid_field", "message_id is required"],
    [{ message_id: "x" }, "invalid_field", "message_id must be a positive integer"],
    [{ message_id: m1.message_id, read_by: a.num }, "forbidden", "read_by does not match the authenticated user"],
    [
      { message_id: 4242 },
      "not_found",
      "message 4242 is not known to this connection; send sender_id (the other user) or room_id with chat:read",
    ],
  ];
  for (const [data, code, message] of cases) {
    sb.send({ event: "chat:read", data });
    const e = await sb.next(isEvent("chat:error"), WAIT, message);
    assert.deepEqual(e.data, { message, code, event: "chat:read" });
  }
  // A message id that is not in the named conversation.
  sb.send({ event: "chat:read", data: { message_id: 4242, sender_id: a.num } });
  const e = await sb.next(isEvent("chat:error"), WAIT, "not in the room");
  assert.equal(e.data.code, "not_found");
  assert.equal(e.data.event, "chat:read");
});

scenario("chat:read of a message this gateway never showed: located by sender_id", async (s) => {
  const a = newUser();
  const b = newUser();
  await ensure(a);
  await ensure(b);
  // Sent over the native REST while neither has an events socket.
  const dm = await rest(a.token, "POST", "/v1/rooms/direct", { user: b.id });
  assert.ok([200, 201].includes(dm.status), JSON.stringify(dm.body));
  const room = dm.body.room.id;
  const m = await rest(a.token, "POST", `/v1/rooms/${room}/messages`, { text: "native" });
  assert.equal(m.status, 201);
  const id = m.body.message.id;
  const sa = await connect(s, a);
  const sb = await connect(s, b);
  sb.send({ event: "chat:read", data: { message_id: id } });
  const e = await sb.next(isEvent("chat:error"), WAIT, "unknown message");
  assert.equal(e.data.code, "not_found");
  sb.send({ event: "chat:read", data: { message_id: id, sender_id: a.num, receiver_id: b.num } });
  const ev = await sa.next(isEvent("chat:read"), WAIT, "read located by sender_id");
  assert.deepEqual(ev.data, { message_id: id, read_by: b.num, room_id: room });
  // room_id works as well.
  sb.send({ event: "chat:read", data: { message_id: id, room_id: room } });
  await sa.next(isEvent("chat:read"), WAIT, "read located by room_id");
});

scenario("chat:user_status: a direct peer comes online and goes offline", async (s) => {
  const a = newUser();
  const b = newUser();
  await ensure(b);
  const sa = await connect(s, a);
  await sendText(a, b, "are you there?"); // the pair now has a direct room
  const sb = await connect(s, b);
  const on = await sa.next(isEvent("chat:user_status", (d) => d.user_id === b.num), WAIT, "online");
  assert.deepEqual(Object.keys(on.data), ["user_id", "status", "timestamp"]);
  assert.equal(on.data.status, "online");
  assertNow(on.data.timestamp, "online timestamp");
  sb.close();
  const off = await sa.next(
    isEvent("chat:user_status", (d) => d.user_id === b.num && d.status === "offline"),
    WAIT,
    "offline",
  );
  assertNow(off.data.timestamp, "offline timestamp");
  // b never hears about itself.
  assert.deepEqual(sb.untaken(isEvent("chat:user_status", (d) => d.user_id === b.num)), []);
});

// ------------------------------------------------------------------------------------------
// get_conversations.php and get_conversation_messages.php
// ------------------------------------------------------------------------------------------

scenario("get_conversations.php: shape, order, paging, user_id check", async () => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  await ensure(b);
  await ensure(c);
  await sendText(a, b, "to b");
  await sendText(c, a, "from c");

  const r = await php("get_conversations.php", { token: a.token, query: { user_id: a.id } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(Object.keys(r.body), ["status", "data"]);
  assert.equal(r.body.status, "success");
  const d = r.body.data;
  assert.deepEqual(Object.keys(d), ["conversations", "limit", "offset", "has_more"]);
  assert.deepEqual([d.limit, d.offset, d.has_more], [50, 0, false]);
  assert.equal(d.conversations.length, 2);
  const [first, second] = d.conversations;
  assert.deepEqual(Object.keys(first), [
    "conversation_id",
    "other_user",
    "last_message",
    "unread_count",
    "updated_at",
  ]);
  // Most recently active first.
  assert.deepEqual(first.other_user, {
    user_id: c.num,
    username: c.username,
    name: c.name,
    profile_url: null,
    is_online: false,
  });
  assert.equal(typeof first.conversation_id, "number");
  assert.equal(first.unread_count, 1);
  assertTextEvent(first.last_message, {
    from: c,
    to: a,
    text: "from c",
    id: first.last_message.message_id,
  });
  assert.equal(first.updated_at, first.last_message.created_at);
  assert.equal(second.other_user.user_id, b.num);
  assert.equal(second.unread_count, 0);
  assertTextEvent(second.last_message, {
    from: a,
    to: b,
    text: "to b",
    id: second.last_message.message_id,
  });

  // Paging, over POST with a form body and ?token=.
  const p = await php("get_conversations.php", {
    token: a.token,
    tokenIn: "query",
    form: { user_id: a.id, limit: "1", offset: "1" },
  });
  assert.equal(p.status, 200, JSON.stringify(p.body));
  assert.deepEqual([p.body.data.limit, p.body.data.offset], [1, 1]);
  assert.equal(p.body.data.conversations.length, 1);
  assert.equal(p.body.data.conversations[0].other_user.user_id, b.num);
  const p0 = await php("get_conversations.php", { token: a.token, json: { limit: 1 } });
  assert.equal(p0.body.data.conversations[0].other_user.user_id, c.num);
  assert.equal(p0.body.data.has_more, true);

  const spoof = await php("get_conversations.php", { token: a.token, query: { user_id: b.id } });
  assert.equal(spoof.status, 403);
  assert.deepEqual(spoof.body, {
    status: "error",
    message: "user_id does not match the authenticated user",
  });
  const spoofBody = await php("get_conversations.php", { token: a.token, json: { user_id: b.num } });
  assert.equal(spoofBody.status, 403);
  const badLimit = await php("get_conversations.php", { token: a.token, query: { limit: "0" } });
  assert.equal(badLimit.status, 400);
  assert.deepEqual(badLimit.body, { status: "error", message: "limit must be a positive integer" });
  const anon = await php("get_conversations.php", {});
  assert.equal(anon.status, 401);
  assert.equal(anon.body.status, "error");
});

scenario("get_conversation_messages.php: oldest first, limit/offset/before_message_id paging", async () => {
  const a = newUser();
  const b = newUser();
  await ensure(b);
  const sent = [];
  for (let i = 1; i <= 5; i++) {
    const from = i % 2 ? a : b;
    const to = i % 2 ? b : a;
    sent.push(await sendText(from, to, `m${i}`));
  }
  const ids = sent.map((m) => m.message_id);
  const page = (q) =>
    php("get_conversation_messages.php", { token: b.token, query: { other_user_id: a.id, ...q } });

  let r = await page({});
  assert.equal(r.status, 200, JSON.stringify(r.body));
  let d = r.body.data;
  assert.deepEqual(Object.keys(d), ["messages", "limit", "offset", "has_more"]);
  assert.deepEqual(
    d.messages.map((m) => m.message_id),
    ids,
  );
  assert.equal(d.has_more, false);
  assertTextEvent(d.messages[0], { from: a, to: b, text: "m1", id: ids[0] });
  assertTextEvent(d.messages[1], { from: b, to: a, text: "m2", id: ids[1] });

  r = await page({ limit: "2" });
  d = r.body.data;
  assert.deepEqual(d.messages.map((m) => m.message), ["m4", "m5"]);
  assert.deepEqual([d.limit, d.offset, d.has_more], [2, 0, true]);
  r = await page({ limit: "2", offset: "2" });
  assert.deepEqual(r.body.data.messages.map((m) => m.message), ["m2", "m3"]);
  assert.equal(r.body.data.offset, 2);
  r = await page({ limit: "2", before_message_id: String(ids[2]) });
  assert.deepEqual(r.body.data.messages.map((m) => m.message), ["m1", "m2"]);
  assert.equal(r.body.data.has_more, false);
  r = await page({ limit: "1", offset: "1", before_message_id: String(ids[4]) });
  assert.deepEqual(r.body.data.messages.map((m) => m.message), ["m3"]);

  // POST with JSON, numbers as numbers; the caller's own user_id is fine.
  r = await php("get_conversation_messages.php", {
    token: a.token,
    json: { user_id: a.num, other_user_id: b.num, limit: 1 },
  });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(r.body.data.messages.map((m) => m.message), ["m5"]);

  // Errors.
  const spoof = await php("get_conversation_messages.php", {
    token: a.token,
    query: { user_id: b.id, other_user_id: b.id },
  });
  assert.equal(spoof.status, 403);
  assert.deepEqual(spoof.body, {
    status: "error",
    message: "user_id does not match the authenticated user",
  });
  const cases = [
    [{}, 400, "other_user_id is required"],
    [{ other_user_id: a.id }, 400, "other_user_id must be another user"],
    [{ other_user_id: b.id, before_message_id: "x" }, 400, "before_message_id must be a message id (a positive integer)"],
    [{ other_user_id: b.id, offset: "-2" }, 400, "offset must be a non-negative integer"],
    [{ other_user_id: newUser().id }, 404, "other user profile not found"],
  ];
  for (const [query, status, message] of cases) {
    const e = await php("get_conversation_messages.php", { token: a.token, query });
    assert.equal(e.status, status, JSON.stringify(e.body));
    assert.deepEqual(e.body, { status: "error", message });
  }
});

// ------------------------------------------------------------------------------------------
// The compat listener
// ------------------------------------------------------------------------------------------

scenario("compat listener: the same socket at / on its own port", async (s) => {
  assert.ok(EVENTS_URL, "PALAVER_EVENTS_URL is set");
  const a = newUser();
  const b = newUser();
  const sb = await connect(s, b, { base: `${EVENTS_URL}/`, query: `user_id=${b.id}` });
  assert.equal(sb.connected.user_id, b.num);
  assert.equal(sb.connected.message, "Successfully connected to chat server");
  const sent = await sendText(a, b, "via the compat port");
  const ev = await sb.next(isEvent("chat:message"), WAIT, "chat:message on the compat port");
  assertTextEvent(ev.data, { from: a, to: b, text: "via the compat port", id: sent.message_id });
  const r = await refusedUpgrade(`${EVENTS_URL}/?token=${b.token}&user_id=${a.id}`);
  assert.equal(r.status, 403);
});
