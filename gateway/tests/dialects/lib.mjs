// Shared helpers for the plain-WebSocket dialect tests (Phoenix, type-tagged, event/data) and
// the cross-dialect interop test, run by gateway/tests/{phoenix,rt,events,interop}.rs.
//
// The Rust harness starts a real Palaver and sets:
//   PALAVER_URL         http://127.0.0.1:<port>
//   PALAVER_JWT_SECRET  the server's HS256 secret (tokens are minted here, with node:crypto)
// and, where a test needs them, the compat listeners' URLs (PALAVER_RT_CHAT_URL, ...).
//
// Every wait is bounded; every socket a test opens is closed when the test ends (Scope).

import crypto from "node:crypto";
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

/** "YYYY-MM-DD HH:MM:SS" (seed 004). */
export const SQL_DATETIME = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/;
/** ISO 8601 UTC (seed 003). */
export const ISO_DATETIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/;

// ------------------------------------------------------------------------------------------
// Tokens and users
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

/** A token that expired an hour ago. */
export const expiredToken = (sub) => mint(sub, { exp: Math.floor(Date.now() / 1000) - 3600 });
/** A well-formed token signed with another secret. */
export const wrongSignatureToken = (sub) => mint(sub, { secret: "not-the-server-secret-0000" });

let counter = 0;
/** A fresh user with a numeric id unique per run: `{id, num, token, name, username}`. */
export function newUser() {
  counter += 1;
  const id = String(crypto.randomInt(1, 2 ** 40) * 100 + (counter % 100));
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

/** Resolves after `ms`. */
export const pause = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------------------------------
// Native REST (to set up rooms, friendships, and to check history from the native side)
// ------------------------------------------------------------------------------------------

/** `fetch` against Palaver with a Bearer token; resolves `{status, body}` (body parsed). */
export async function rest(token, method, path, body) {
  const headers = { authorization: `Bearer ${token}` };
  let payload;
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const res = await within(
    fetch(`${URL}${path}`, { method, headers, body: payload }),
    WAIT,
    `${method} ${path}`,
  );
  const text = await res.text();
  let parsed;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = text;
  }
  return { status: res.status, body: parsed };
}

/**
 * Makes sure a user exists: a profile is created or refreshed by an authenticated *connect*
 * (REST calls do not create one), so this opens a native socket and closes it.
 */
export async function touch(user) {
  const s = await JsonSocket.open(`${WS_URL}/ws?token=${encodeURIComponent(user.token)}`);
  s.send({ id: "touch", op: "ping" });
  await s.next((m) => m.id === "touch", WAIT, `touch ${user.id}`);
  s.close();
  await s.waitClosed();
}

// ------------------------------------------------------------------------------------------
// A raw JSON WebSocket client that records every frame
// ------------------------------------------------------------------------------------------

/** A WebSocket client that parses every text frame as JSON and records it. */
export class JsonSocket {
  /** Opens `url` (with optional `protocols` and `ws` options); resolves once open. */
  static async open(url, { protocols, options } = {}) {
    const s = new JsonSocket(new WebSocket(url, protocols, options));
    await within(
      new Promise((resolve, reject) => {
        s.ws.once("open", resolve);
        s.ws.once("error", reject);
        s.ws.once("unexpected-response", (req, res) => {
          // Read and drop the answer, and close its connection: a kept-alive socket would keep
          // node running after the tests.
          res.resume();
          req.destroy();
          reject(Object.assign(new Error(`HTTP ${res.statusCode}`), { status: res.statusCode }));
        });
      }),
      WAIT,
      `open ${url}`,
    );
    return s;
  }

  constructor(ws) {
    this.ws = ws;
    this.frames = []; // {msg, taken}
    this.waiters = new Set();
    this.closedWith = null;
    this.closed = new Promise((resolve) => {
      ws.on("close", (code, reason) => {
        this.closedWith = { code, reason: reason.toString() };
        resolve(this.closedWith);
      });
    });
    ws.on("error", () => {});
    ws.on("message", (data, isBinary) => {
      let msg;
      try {
        msg = JSON.parse(isBinary ? data : data.toString());
      } catch {
        msg = { unparsable: data.toString() };
      }
      const entry = { msg, taken: false };
      this.frames.push(entry);
      for (const w of this.waiters) {
        if (!entry.taken && w.pred(msg)) {
          entry.taken = true;
          this.waiters.delete(w);
          w.resolve(msg);
        }
      }
    });
  }

  /** Sends `obj` as JSON text (or a string as is). */
  send(obj) {
    this.ws.send(typeof obj === "string" ? obj : JSON.stringify(obj));
  }

  /** The first untaken frame satisfying `pred`, waiting up to `ms`. */
  next(pred = () => true, ms = WAIT, label = "frame") {
    const found = this.frames.find((e) => !e.taken && pred(e.msg));
    if (found) {
      found.taken = true;
      return Promise.resolve(found.msg);
    }
    let waiter;
    const p = new Promise((resolve) => {
      waiter = { pred, resolve };
      this.waiters.add(waiter);
    });
    return within(p, ms, label).finally(() => this.waiters.delete(waiter));
  }

  /** Frames received and not taken by a wait, optionally only those satisfying `pred`. */
  untaken(pred = () => true) {
    return this.frames.filter((e) => !e.taken && pred(e.msg)).map((e) => e.msg);
  }

  /** Resolves `{code, reason}` when the server closes the socket, rejecting after `ms`. */
  waitClosed(ms = WAIT) {
    return within(this.closed, ms, "socket close");
  }

  close() {
    try {
      this.ws.close();
    } catch {
      // already closed
    }
  }
}

/** Collects sockets (or anything with close()/disconnect()) to close when a test ends. */
export class Scope {
  constructor() {
    this.items = [];
  }

  add(x) {
    this.items.push(x);
    return x;
  }

  close() {
    for (const x of this.items.splice(0)) {
      try {
        if (typeof x.disconnect === "function") x.disconnect();
        else if (typeof x.close === "function") x.close();
      } catch {
        // best effort
      }
    }
  }
}
