// Shared helpers for the Socket.IO dialect tests (run by gateway/tests/socketio.rs).
//
// The Rust harness starts a real Palaver and sets:
//   PALAVER_URL         http://127.0.0.1:<port>
//   PALAVER_JWT_SECRET  the server's HS256 secret (tokens are minted here, with node:crypto)
//
// Every wait is bounded: a helper that waits rejects after its deadline. Every socket a test
// opens belongs to that test's Scope and is closed when the test ends, so the process exits.

import { test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import zlib from "node:zlib";
import { io } from "socket.io-client";
import WebSocket from "ws";

export const URL = process.env.PALAVER_URL;
export const SECRET = process.env.PALAVER_JWT_SECRET;
if (!URL || !SECRET) {
  throw new Error("PALAVER_URL and PALAVER_JWT_SECRET must be set (run via cargo test)");
}
export const WS_URL = URL.replace(/^http/, "ws");

/** Default deadline of one wait. */
export const WAIT = 5000;
/** How long "nothing arrives" is watched for. */
export const QUIET = 400;

/** NotifyHub's `created_at`. */
export const SQL_DATETIME = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/;
/** Syarah's ISO 8601 UTC times. */
export const ISO_DATETIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/;

export const TRANSPORTS = [["websocket"], ["polling"]];

// ------------------------------------------------------------------------------------------
// Tokens
// ------------------------------------------------------------------------------------------

const b64url = (x) => Buffer.from(x).toString("base64url");

/** An HS256 JWT for `sub`; `exp` defaults to an hour from now. */
export function mint(sub, { exp, secret = SECRET, name, username } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    sub: String(sub),
    exp: exp ?? now + 3600,
    name: name ?? `User ${sub}`,
    username: username ?? `user${sub}`,
  };
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A token that expired an hour ago (well past the server's leeway). */
export const expiredToken = (sub) => mint(sub, { exp: Math.floor(Date.now() / 1000) - 3600 });
/** A well-formed token signed with another secret. */
export const wrongSignatureToken = (sub) => mint(sub, { secret: "not-the-server-secret-0000" });

let counter = 0;
/**
 * A fresh user: a random numeric id (unique per run) or, with `guid`, a GUID (as Syarah's
 * seed uses), its token and claims.
 */
export function newUser({ guid = false } = {}) {
  counter += 1;
  const id = guid
    ? crypto.randomUUID()
    : String(crypto.randomInt(1, 2 ** 40) * 100 + (counter % 100));
  return { id, num: Number(id), token: mint(id), name: `User ${id}`, username: `user${id}` };
}

// ------------------------------------------------------------------------------------------
// Waiting
// ------------------------------------------------------------------------------------------

/** Resolves `p`, or rejects with `what` after `ms`. */
export function within(p, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves after `ms` (a pause while listening, never a blocking sleep). */
export const pause = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Records every event a socket receives (in order), so that a test can wait for one that
 * arrived before it started waiting, and check that nothing else arrived.
 */
class Recorder {
  constructor() {
    this.log = []; // {event, args, taken}
    this.waiters = new Set();
  }

  push(event, args) {
    const entry = { event, args, taken: false };
    this.log.push(entry);
    for (const w of this.waiters) {
      if (!entry.taken && w.match(entry)) {
        entry.taken = true;
        this.waiters.delete(w);
        w.resolve(entry.args[0]);
      }
    }
  }

  /** The first untaken `event` whose argument satisfies `pred`, waiting up to `ms`. */
  take(event, pred, ms, label) {
    const match = (e) => e.event === event && (!pred || pred(e.args[0]));
    const found = this.log.find((e) => !e.taken && match(e));
    if (found) {
      found.taken = true;
      return Promise.resolve(found.args[0]);
    }
    let waiter;
    const p = new Promise((resolve) => {
      waiter = { match, resolve };
      this.waiters.add(waiter);
    });
    return within(p, ms, `${label}: event ${JSON.stringify(event)}`).finally(() =>
      this.waiters.delete(waiter),
    );
  }

  untaken(event) {
    return this.log.filter((e) => !e.taken && (event === undefined || e.event === event));
  }
}

/**
 * The next `event` received by `socket` (a socket opened by a Scope, or a native client),
 * optionally the first satisfying `pred`; rejects after `ms`.
 */
export function waitFor(socket, event, ms = WAIT, pred = undefined) {
  const rec = socket.recorder;
  if (rec) return rec.take(event, pred, ms, socket.label ?? "socket");
  return within(
    new Promise((resolve) => socket.once(event, resolve)),
    ms,
    `${socket.label ?? "socket"}: event ${event}`,
  );
}

/** All `event`s received within `ms` (from now, plus those already received and not taken). */
export async function collect(socket, event, ms = QUIET) {
  await pause(ms);
  const got = socket.recorder.untaken(event);
  for (const e of got) e.taken = true;
  return got.map((e) => e.args[0]);
}

/** Asserts that `socket` receives no `event` (any event when omitted) within `ms`. */
export async function quiet(socket, event = undefined, ms = QUIET) {
  await pause(ms);
  const got = socket.recorder.untaken(event);
  assert.deepEqual(
    got.map((e) => ({ event: e.event, data: e.args[0] })),
    [],
    `${socket.label}: expected no ${event ?? "event"} within ${ms} ms`,
  );
}

/** Sends `event` with an ack callback; resolves the ack's argument, rejects after `ms`. */
export function ack(socket, event, data, ms = WAIT) {
  return within(socket.timeout(ms).emitWithAck(event, data), ms + 500, `ack of ${event}`);
}

// ------------------------------------------------------------------------------------------
// Clients
// ------------------------------------------------------------------------------------------

/** A native-protocol client (`/ws?token=`), recording events like a socket. */
export class Native {
  constructor(ws, label) {
    this.ws = ws;
    this.label = label;
    this.recorder = new Recorder();
    this.replies = new Map();
    this.next = 0;
    ws.on("message", (raw) => {
      const f = JSON.parse(raw.toString());
      if (f.type === "reply") {
        const r = this.replies.get(f.id);
        if (r) {
          this.replies.delete(f.id);
          r(f);
        }
      } else if (f.type === "event") {
        this.recorder.push(f.event, [f]);
      }
    });
  }

  static async connect(token, label = "native") {
    const ws = new WebSocket(`${WS_URL}/ws?token=${encodeURIComponent(token)}`);
    // Recording starts before the handshake completes: frames the server sends at once (pending
    // notifications) can arrive in the same read as the 101 and be emitted before `open`'s
    // awaiter resumes.
    const native = new Native(ws, label);
    await within(
      new Promise((resolve, reject) => {
        ws.once("open", resolve);
        ws.once("error", reject);
        ws.once("unexpected-response", (_req, res) =>
          reject(new Error(`native connect refused: HTTP ${res.statusCode}`)),
        );
      }),
      WAIT,
      `${label} connect`,
    );
    return native;
  }

  /** Sends a request; resolves its reply frame. */
  request(op, args = {}, ms = WAIT) {
    this.next += 1;
    const id = `r${this.next}`;
    const p = new Promise((resolve) => this.replies.set(id, resolve));
    this.ws.send(JSON.stringify({ ...args, id, op }));
    return within(p, ms, `${this.label} reply to ${op}`);
  }

  /** A request that must succeed: its `data`. */
  async ok(op, args = {}) {
    const r = await this.request(op, args);
    assert.equal(r.ok, true, `${op} failed: ${JSON.stringify(r)}`);
    return r.data;
  }

  get connected() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return;
    const closed = new Promise((r) => this.ws.once("close", r));
    this.ws.close();
    await within(closed, WAIT, `${this.label} close`).catch(() => this.ws.terminate());
  }
}

/** Opens a Socket.IO socket; resolves it once connected, rejects with the connect_error. */
async function open(path, opts, label) {
  const socket = io(`${URL}${path}`, {
    forceNew: true, // never share a manager (its query/auth) with another socket
    reconnection: false,
    timeout: WAIT,
    ...opts,
  });
  socket.label = label;
  socket.recorder = new Recorder();
  socket.onAny((event, ...args) => socket.recorder.push(event, args));
  return socket;
}

function connected(socket) {
  return within(
    new Promise((resolve, reject) => {
      if (socket.connected) return resolve(socket);
      socket.once("connect", () => resolve(socket));
      socket.once("connect_error", (e) => reject(e));
    }),
    WAIT,
    `${socket.label} connect`,
  );
}

/** The message of the `connect_error` a connection attempt gets. */
export async function connectError(socket) {
  const err = await within(
    new Promise((resolve, reject) => {
      socket.once("connect_error", resolve);
      socket.once("connect", () =>
        reject(new Error(`${socket.label} connected, expected an error`)),
      );
    }),
    WAIT,
    `${socket.label} connect_error`,
  );
  return err.message;
}

/** The sockets of one test; all closed when it ends. */
export class Scope {
  constructor() {
    this.sockets = [];
  }

  track(s) {
    this.sockets.push(s);
    return s;
  }

  /** A NotifyHub socket (`/chats`), not yet awaited. */
  async notifyhubRaw(token, transports = ["websocket"], label = "notifyhub") {
    const query = token === undefined ? {} : { access_token: token };
    return this.track(await open("/chats", { transports, query }, label));
  }

  /** A connected NotifyHub socket for `user`. */
  async notifyhub(user, transports = ["websocket"], label = `notifyhub ${user.id}`) {
    return connected(await this.notifyhubRaw(user.token, transports, label));
  }

  /** A Syarah socket with explicit options, not yet awaited. */
  async syarahRaw({ auth, query, transports = ["websocket"], label = "syarah" } = {}) {
    const opts = { transports };
    if (auth !== undefined) opts.auth = auth;
    if (query !== undefined) opts.query = query;
    return this.track(await open("/", opts, label));
  }

  /** A connected Syarah socket for `user` (token in `auth.token` unless other options). */
  async syarah(user, { transports = ["websocket"], auth, query, label } = {}) {
    const s = await this.syarahRaw({
      auth: auth ?? (query ? undefined : { token: user.token }),
      query,
      transports,
      label: label ?? `syarah ${user.id}`,
    });
    return connected(s);
  }

  /** A connected native client for `user`. */
  async native(user, label = `native ${user.id}`) {
    return this.track(await Native.connect(user.token, label));
  }

  async close() {
    await Promise.all(
      this.sockets.map(async (s) => {
        if (s instanceof Native) return s.close();
        s.disconnect();
        return undefined;
      }),
    );
    this.sockets = [];
  }
}

/** A test with its own Scope (closed afterwards, pass or fail), bounded by `timeout` ms. */
export function scenario(name, fn, { timeout = 30000 } = {}) {
  test(name, { timeout }, async () => {
    const scope = new Scope();
    try {
      await fn(scope);
    } finally {
      await scope.close();
    }
  });
}

// ------------------------------------------------------------------------------------------
// Dialect helpers
// ------------------------------------------------------------------------------------------

/** Syarah ack that must not be an error. */
export async function okAck(socket, event, data) {
  const r = await ack(socket, event, data);
  assert.ok(
    r === null || typeof r !== "object" || Array.isArray(r) || !("error" in r),
    `${event} failed: ${JSON.stringify(r)}`,
  );
  return r;
}

/** Syarah ack that must be `{error: string}`; resolves the message. */
export async function errAck(socket, event, data) {
  const r = await ack(socket, event, data);
  assert.equal(typeof r, "object", `${event}: expected {error}, got ${JSON.stringify(r)}`);
  assert.deepEqual(Object.keys(r), ["error"], `${event}: ${JSON.stringify(r)}`);
  assert.equal(typeof r.error, "string");
  assert.ok(r.error.length > 0);
  return r.error;
}

/** The Syarah direct room of `socket`'s user with `other` (joinRoom by otherUserId). */
export async function directRoom(socket, other) {
  const r = await okAck(socket, "joinRoom", { otherUserId: other.id });
  assert.equal(typeof r.chatHeaderId, "number");
  return r.chatHeaderId;
}

/** Sends a Syarah text message; resolves the acked chat message. */
export function say(socket, chatHeaderId, message) {
  return okAck(socket, "createMessage", { message, chatHeaderId, messageType: 0, caption: "" });
}

/** `fetch` with a deadline (the request is aborted after `ms`). */
export function http(url, opts = {}, ms = WAIT) {
  return fetch(url, { ...opts, signal: AbortSignal.timeout(ms) });
}

/** Uploads `bytes` as `name` with `messageType`; resolves the stored path. */
export async function upload(user, messageType, name, bytes, type = "application/octet-stream") {
  const form = new FormData();
  form.append("messageType", String(messageType));
  form.append("file", new Blob([bytes], { type }), name);
  const res = await http(`${URL}/api/chat/uploadFile`, {
    method: "POST",
    headers: { Authorization: `Bearer ${user.token}` },
    body: form,
  });
  const body = await res.json();
  assert.equal(res.status, 200, `upload ${name}: ${JSON.stringify(body)}`);
  assert.equal(body.success, true);
  assert.equal(body.message, null);
  assert.equal(typeof body.data, "string");
  return body.data;
}

/** A valid `w` x `h` RGB PNG (solid colour), built here so no fixture is needed. */
export function png(w = 4, h = 3) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const row = Buffer.concat([Buffer.from([0]), Buffer.alloc(w * 3, 0x7f)]);
  const raw = Buffer.concat(Array.from({ length: h }, () => row));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}
