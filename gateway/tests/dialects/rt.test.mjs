// Type-tagged JSON (seed 003): `/rt/chat` and `/rt/presence`, and the same sockets at `/` on
// the compat listeners (PALAVER_RT_CHAT_URL, PALAVER_RT_PRESENCE_URL). Real `ws` clients
// against a real Palaver: AUTH and its refusals, every client frame with its answer or its
// exact error, the exact shapes of received messages, history replies and presence updates,
// and who receives what (and who receives nothing).

import assert from "node:assert/strict";
import { describe, test, afterEach } from "node:test";
import {
  ISO_DATETIME,
  JsonSocket,
  QUIET,
  Scope,
  WAIT,
  WS_URL,
  expiredToken,
  mint,
  newUser,
  pause,
  rest,
  wrongSignatureToken,
} from "./lib.mjs";

const CHAT = `${WS_URL}/rt/chat`;
const PRESENCE = `${WS_URL}/rt/presence`;
const COMPAT_CHAT = process.env.PALAVER_RT_CHAT_URL;
const COMPAT_PRESENCE = process.env.PALAVER_RT_PRESENCE_URL;
const ADMIN = process.env.PALAVER_ADMIN_TOKEN;
const DIGITS = /^[1-9]\d*$/;

// ------------------------------------------------------------------------------------------
// Helpers of this file
// ------------------------------------------------------------------------------------------

let scope = new Scope();
afterEach(() => {
  scope.close();
  scope = new Scope();
});

/** Opens `url` and authenticates as `user`; resolves the socket after its SUCCESS. */
async function connect(user, url = CHAT) {
  const s = scope.add(await JsonSocket.open(url));
  s.send({ type: "AUTH", token: user.token });
  const answer = await s.next((m) => ["SUCCESS", "ERROR"].includes(m.type), WAIT, "AUTH answer");
  assert.deepEqual(answer, { type: "SUCCESS", msg: `Authenticated as ${user.username}` });
  return s;
}

/** Opens `url`, sends `first` and expects `ERROR msg` then a close with `code`. */
async function refused(url, first, code, msg) {
  const s = scope.add(await JsonSocket.open(url));
  s.send(first);
  const err = await s.next(() => true, WAIT, "ERROR");
  assert.equal(err.type, "ERROR", JSON.stringify(err));
  if (msg instanceof RegExp) assert.match(err.msg, msg);
  else assert.equal(err.msg, msg);
  assert.deepEqual(Object.keys(err).sort(), ["msg", "type"]);
  const closed = await s.waitClosed();
  assert.equal(closed.code, code);
  return closed;
}

/** The next frame of type `type` (with an optional extra predicate). */
const next = (s, type, pred = () => true, label = type) =>
  s.next((m) => m.type === type && pred(m), WAIT, label);

/** Asserts that no frame satisfying `pred` arrives within QUIET. */
async function nothing(s, pred, what) {
  await pause(QUIET);
  assert.deepEqual(s.untaken(pred), [], `unexpected ${what}`);
}

/** Asserts the one-to-one shape: exact keys and JSON types. */
function assertDirect(m, { from, to, content, chatId }) {
  assert.deepEqual(Object.keys(m).sort(), [
    "chatId",
    "content",
    "from",
    "messageId",
    "timestamp",
    "to",
    "type",
  ]);
  assert.equal(m.type, "ONE_TO_ONE_CHAT");
  assert.equal(m.from, from);
  assert.equal(m.to, to);
  assert.equal(m.content, content);
  assert.equal(typeof m.chatId, "string");
  assert.match(m.chatId, DIGITS);
  if (chatId !== undefined) assert.equal(m.chatId, String(chatId));
  assert.equal(typeof m.messageId, "string");
  assert.match(m.messageId, DIGITS);
  assert.match(m.timestamp, ISO_DATETIME);
  assert.ok(Math.abs(Date.now() - Date.parse(m.timestamp)) < 60_000, `timestamp ${m.timestamp}`);
}

/** Asserts the group shape: exact keys and JSON types. */
function assertGroup(m, { from, groupId, content }) {
  assert.deepEqual(Object.keys(m).sort(), [
    "content",
    "from",
    "groupId",
    "messageId",
    "timestamp",
    "type",
  ]);
  assert.equal(m.type, "GROUP_CHAT");
  assert.equal(m.from, from);
  assert.equal(m.groupId, String(groupId));
  assert.equal(m.content, content);
  assert.equal(typeof m.messageId, "string");
  assert.match(m.messageId, DIGITS);
  assert.match(m.timestamp, ISO_DATETIME);
}

/** Fresh users that exist on the server, imported with their usernames (admin REST), so that
 * no session (and no presence change) is involved in creating them. */
async function users(n) {
  const out = [];
  for (let i = 0; i < n; i += 1) out.push(newUser());
  const r = await rest(
    ADMIN,
    "PUT",
    "/v1/admin/users",
    out.map((u) => ({ id: u.id, username: u.username, name: u.name })),
  );
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return out;
}

/** A group created by `owner` over native REST; resolves its id (a number). */
async function group(owner, members, { pub = false, name = "crew" } = {}) {
  const r = await rest(owner.token, "POST", "/v1/rooms", {
    name,
    members: members.map((m) => m.id),
    public: pub,
  });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return r.body.room.id;
}

/** The direct room of `a` and `b`, opened over native REST. */
async function direct(a, b) {
  const r = await rest(a.token, "POST", "/v1/rooms/direct", { user: b.id });
  assert.ok([200, 201].includes(r.status), JSON.stringify(r.body));
  return r.body.room.id;
}

/** Sends a one-to-one message and waits for both copies. */
async function dm(sa, sb, a, b, content) {
  sa.send({ type: "ONE_TO_ONE_CHAT", from: a.username, to: b.username, content, chatId: "c" });
  const got = await next(sb, "ONE_TO_ONE_CHAT", (m) => m.content === content, `B gets ${content}`);
  const echo = await next(sa, "ONE_TO_ONE_CHAT", (m) => m.content === content, `echo ${content}`);
  assert.deepEqual(echo, got);
  return got;
}

// ------------------------------------------------------------------------------------------
// AUTH
// ------------------------------------------------------------------------------------------

describe("AUTH", () => {
  test("AUTH answers SUCCESS naming the user, on both sockets", async () => {
    const [a] = await users(1);
    await connect(a, CHAT);
    await connect(a, PRESENCE);
  });

  test("a frame before AUTH: ERROR and close 4002", async () => {
    const [a, b] = await users(2);
    for (const url of [CHAT, PRESENCE]) {
      await refused(
        url,
        { type: "ONE_TO_ONE_CHAT", from: a.username, to: b.username, content: "x" },
        4002,
        "first frame must be AUTH",
      );
      await refused(url, "{not json", 4002, "first frame must be AUTH");
      await refused(url, { token: a.token }, 4002, "first frame must be AUTH");
    }
    // A binary first frame too.
    const s = scope.add(await JsonSocket.open(CHAT));
    s.ws.send(Buffer.from(JSON.stringify({ type: "AUTH", token: a.token })), { binary: true });
    assert.deepEqual(await s.next(), { type: "ERROR", msg: "first frame must be AUTH" });
    assert.equal((await s.waitClosed()).code, 4002);
  });

  test("bad tokens: ERROR saying why and close 4001", async () => {
    const u = newUser();
    for (const url of [CHAT, PRESENCE]) {
      await refused(url, { type: "AUTH", token: expiredToken(u.id) }, 4001, "invalid token: expired");
      await refused(url, { type: "AUTH", token: wrongSignatureToken(u.id) }, 4001, /^invalid token: /);
      await refused(url, { type: "AUTH", token: "not.a.jwt" }, 4001, /^invalid token: /);
      await refused(url, { type: "AUTH", token: "" }, 4001, "invalid token: missing");
      await refused(url, { type: "AUTH" }, 4001, "missing field token");
      await refused(url, { type: "AUTH", token: 42 }, 4001, "token must be a string");
    }
  });

  test("a second AUTH is answered INFO and changes nothing", async () => {
    const [a, b] = await users(2);
    const s = await connect(a);
    s.send({ type: "AUTH", token: b.token });
    assert.deepEqual(await next(s, "INFO"), { type: "INFO", msg: "already authenticated" });
    const p = await connect(a, PRESENCE);
    p.send({ type: "AUTH", token: a.token });
    assert.deepEqual(await next(p, "INFO"), { type: "INFO", msg: "already authenticated" });
    // Still a's socket: a `from` of b is refused.
    s.send({ type: "ONE_TO_ONE_CHAT", from: b.username, to: a.username, content: "x" });
    assert.equal((await next(s, "ERROR")).msg, "from does not match the authenticated user");
  });
});

// ------------------------------------------------------------------------------------------
// One-to-one
// ------------------------------------------------------------------------------------------

describe("ONE_TO_ONE_CHAT", () => {
  test("both sides receive the seed's shape; the same message natively", async () => {
    const [a, b] = await users(2);
    const sa = await connect(a);
    const sb = await connect(b);
    const sb2 = await connect(b); // a second device of b
    sa.send({
      type: "ONE_TO_ONE_CHAT",
      from: a.username,
      to: b.username,
      content: "Hello there!",
      chatId: "chat_123",
    });
    const got = await next(sb, "ONE_TO_ONE_CHAT");
    assertDirect(got, { from: a.username, to: b.username, content: "Hello there!" });
    assert.deepEqual(await next(sa, "ONE_TO_ONE_CHAT"), got, "the sender's echo is the same");
    assert.deepEqual(await next(sb2, "ONE_TO_ONE_CHAT"), got, "every device of the receiver");
    // The same room and message id the native protocol sees.
    const h = await rest(b.token, "GET", `/v1/rooms/${got.chatId}/messages`);
    assert.equal(h.status, 200);
    assert.equal(h.body.messages[0].id, Number(got.messageId));
    assert.equal(h.body.messages[0].sender, a.id);
    assert.equal(h.body.messages[0].text, "Hello there!");
    // A reply the other way names the same chat.
    const back = await dm(sb, sa, b, a, "hi a");
    assertDirect(back, { from: b.username, to: a.username, content: "hi a", chatId: got.chatId });
    assert.ok(Number(back.messageId) > Number(got.messageId));
    assert.deepEqual(sa.untaken((m) => m.type === "ERROR"), []);
  });

  test("a spoofed from is refused and nothing is delivered", async () => {
    const [a, b, c] = await users(3);
    const sa = await connect(a);
    const sb = await connect(b);
    sa.send({ type: "ONE_TO_ONE_CHAT", from: b.username, to: b.username, content: "spoof" });
    assert.deepEqual(await next(sa, "ERROR"), {
      type: "ERROR",
      msg: "from does not match the authenticated user",
    });
    sa.send({ type: "ONE_TO_ONE_CHAT", from: c.username, to: b.username, content: "spoof" });
    assert.equal((await next(sa, "ERROR")).msg, "from does not match the authenticated user");
    await nothing(sb, (m) => m.type === "ONE_TO_ONE_CHAT", "message at the receiver");
    await nothing(sa, (m) => m.type === "ONE_TO_ONE_CHAT", "echo");
    const h = await rest(a.token, "GET", `/v1/users/${b.id}/messages`);
    assert.deepEqual(h.body.messages, []);
    // Without `from` the token decides.
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "no from" });
    assertDirect(await next(sb, "ONE_TO_ONE_CHAT"), {
      from: a.username,
      to: b.username,
      content: "no from",
    });
  });

  test("an unknown receiver is an error", async () => {
    const [a] = await users(1);
    const sa = await connect(a);
    const ghost = `nobody_${Date.now()}`;
    sa.send({ type: "ONE_TO_ONE_CHAT", from: a.username, to: ghost, content: "x" });
    assert.deepEqual(await next(sa, "ERROR"), { type: "ERROR", msg: `user ${ghost} not found` });
  });

  test("a chatId naming another room is refused; a label or the right id is fine", async () => {
    const [a, b, c] = await users(3);
    const other = await direct(a, c);
    const sa = await connect(a);
    const sb = await connect(b);
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "wrong", chatId: String(other) });
    assert.deepEqual(await next(sa, "ERROR"), {
      type: "ERROR",
      msg: `chatId ${other} is not the chat with ${b.username}`,
    });
    await nothing(sb, (m) => m.type === "ONE_TO_ONE_CHAT", "message with a wrong chatId");
    const first = await dm(sa, sb, a, b, "label chatId");
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "right", chatId: first.chatId });
    assert.equal((await next(sb, "ONE_TO_ONE_CHAT")).chatId, first.chatId);
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "num", chatId: Number(first.chatId) });
    assert.equal((await next(sb, "ONE_TO_ONE_CHAT", (m) => m.content === "num")).chatId, first.chatId);
  });

  test("clientId: a retry delivers nothing new, and is shown back", async () => {
    const [a, b] = await users(2);
    const sa = await connect(a);
    const sb = await connect(b);
    const frame = { type: "ONE_TO_ONE_CHAT", to: b.username, content: "once", clientId: "k-1" };
    sa.send(frame);
    const got = await next(sb, "ONE_TO_ONE_CHAT");
    assert.equal(got.clientId, "k-1");
    assert.equal(got.content, "once");
    sa.send(frame);
    await nothing(sb, (m) => m.type === "ONE_TO_ONE_CHAT", "duplicate");
    const h = await rest(a.token, "GET", `/v1/users/${b.id}/messages`);
    assert.equal(h.body.messages.length, 1);
    sa.send({ ...frame, clientId: "" });
    assert.equal((await next(sa, "ERROR")).msg, "invalid clientId: client_ref must not be empty");
  });

  test("a user without a username is named and addressed by id", async () => {
    const [a] = await users(1);
    const anon = newUser();
    anon.token = mint(anon.id, { username: "" });
    anon.username = anon.id;
    const sa = await connect(a);
    const sn = await connect(anon); // "Authenticated as <id>"
    sa.send({ type: "ONE_TO_ONE_CHAT", from: a.username, to: anon.id, content: "by id" });
    assertDirect(await next(sn, "ONE_TO_ONE_CHAT"), {
      from: a.username,
      to: anon.id,
      content: "by id",
    });
    sn.send({ type: "ONE_TO_ONE_CHAT", from: anon.id, to: a.username, content: "back" });
    assertDirect(await next(sa, "ONE_TO_ONE_CHAT", (m) => m.content === "back"), {
      from: anon.id,
      to: a.username,
      content: "back",
    });
    // A user who has a username is not addressed by id.
    sn.send({ type: "ONE_TO_ONE_CHAT", to: a.id, content: "x" });
    assert.equal((await next(sn, "ERROR")).msg, `user ${a.id} not found`);
  });

  test("messages from other dialects arrive in the same shape; media shows caption or path", async () => {
    const [a, b] = await users(2);
    const room = await direct(b, a);
    const sa = await connect(a);
    let r = await rest(b.token, "POST", `/v1/rooms/${room}/messages`, { text: "from native" });
    assert.equal(r.status, 201);
    const got = await next(sa, "ONE_TO_ONE_CHAT");
    assertDirect(got, { from: b.username, to: a.username, content: "from native", chatId: room });
    assert.equal(got.messageId, String(r.body.message.id));
    const path = "/media/report.pdf"; // an external reference: not an upload of this server;
    r = await rest(b.token, "POST", `/v1/rooms/${room}/messages`, {
      type: "file",
      media: path,
      caption: "the report",
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const file = await next(sa, "ONE_TO_ONE_CHAT", (m) => m.mediaType === "file");
    assert.equal(file.content, "the report");
    assert.equal(file.media, path);
    r = await rest(b.token, "POST", `/v1/rooms/${room}/messages`, { type: "image", media: path });
    const image = await next(sa, "ONE_TO_ONE_CHAT", (m) => m.mediaType === "image");
    assert.equal(image.content, path);
    // Edits, reactions and deletions are not shown.
    const id = got.messageId;
    r = await rest(b.token, "PATCH", `/v1/rooms/${room}/messages/${id}`, { text: "edited" });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    r = await rest(b.token, "PUT", `/v1/rooms/${room}/messages/${id}/reactions/${encodeURIComponent("👍")}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    r = await rest(b.token, "DELETE", `/v1/rooms/${room}/messages/${id}`);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    await nothing(sa, () => true, "frame for an edit, reaction or deletion");
  });

  test("bad frames after AUTH: precise ERRORs, the socket stays open", async () => {
    const [a, b] = await users(2);
    const sa = await connect(a);
    const sb = await connect(b);
    const cases = [
      ["{oops", /^malformed JSON: /],
      ["[1,2]", "malformed JSON: a frame is a JSON object"],
      [{ to: b.username }, "missing field type"],
      [{ type: "PING" }, "unknown type PING"],
      [{ type: "ONE_TO_ONE_CHAT", content: "x" }, "missing field to"],
      [{ type: "ONE_TO_ONE_CHAT", to: b.username }, "missing field content"],
      [{ type: "ONE_TO_ONE_CHAT", to: b.username, content: "   " }, "content must not be empty"],
      [{ type: "ONE_TO_ONE_CHAT", to: b.username, content: 5 }, "content must be a string"],
      [{ type: "GROUP_CHAT", content: "x" }, "missing field groupId"],
      [{ type: "GROUP_CHAT", groupId: "group_456", content: "x" }, "invalid groupId"],
      [{ type: "GET_GROUP_CHAT_HISTORY", groupId: 1, limit: 0 }, "limit must be a positive integer"],
      [{ type: "GET_GROUP_CHAT_HISTORY", groupId: 1, before: "msg_1" }, "before must be a messageId"],
      [{ type: "GET_ONE_TO_ONE_HISTORY", from: a.username }, "missing field to"],
      [{ type: "JOIN_GROUP" }, "missing field groupId"],
    ];
    for (const [frame, msg] of cases) {
      sa.send(frame);
      const err = await next(sa, "ERROR", () => true, JSON.stringify(frame));
      if (msg instanceof RegExp) assert.match(err.msg, msg);
      else assert.equal(err.msg, msg, JSON.stringify(frame));
    }
    // An oversized frame is refused and the socket goes on.
    sa.send(JSON.stringify({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "x".repeat(70_000) }));
    assert.match((await next(sa, "ERROR")).msg, /exceeds the \d+-byte limit/);
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "still here" });
    assert.equal((await next(sb, "ONE_TO_ONE_CHAT")).content, "still here");
    assert.equal(sa.closedWith, null);
  });
});

// ------------------------------------------------------------------------------------------
// Groups
// ------------------------------------------------------------------------------------------

describe("GROUP_CHAT, JOIN_GROUP, LEAVE_GROUP", () => {
  test("GROUP_CHAT reaches every member in the seed's shape; a non-member is refused", async () => {
    const [a, b, c, d] = await users(4);
    const [sa, sb, sc, sd] = [await connect(a), await connect(b), await connect(c), await connect(d)];
    const g = await group(a, [b, c], { name: "crew" });
    // Members connected before the group existed are told they joined it.
    assert.deepEqual(await next(sb, "INFO"), {
      type: "INFO",
      msg: `you are now a member of group ${g} (crew)`,
    });
    sa.send({ type: "GROUP_CHAT", from: a.username, groupId: String(g), content: "Hello everyone!" });
    const got = await next(sb, "GROUP_CHAT");
    assertGroup(got, { from: a.username, groupId: g, content: "Hello everyone!" });
    assert.deepEqual(await next(sc, "GROUP_CHAT"), got);
    assert.deepEqual(await next(sa, "GROUP_CHAT"), got, "the sender's echo");
    // A number as groupId works as well.
    sb.send({ type: "GROUP_CHAT", from: b.username, groupId: g, content: "numeric id" });
    assertGroup(await next(sa, "GROUP_CHAT", (m) => m.content === "numeric id"), {
      from: b.username,
      groupId: g,
      content: "numeric id",
    });
    // The outsider: refused, and sees nothing.
    sd.send({ type: "GROUP_CHAT", from: d.username, groupId: String(g), content: "let me in" });
    assert.deepEqual(await next(sd, "ERROR"), {
      type: "ERROR",
      msg: `you are not a member of room ${g}`,
    });
    await nothing(sd, (m) => m.type === "GROUP_CHAT", "group message at an outsider");
    for (const s of [sa, sb, sc]) {
      await nothing(s, (m) => m.content === "let me in", "outsider's message");
    }
    // A spoofed from in a group.
    sa.send({ type: "GROUP_CHAT", from: b.username, groupId: String(g), content: "spoof" });
    assert.equal((await next(sa, "ERROR")).msg, "from does not match the authenticated user");
    await nothing(sb, (m) => m.content === "spoof", "spoofed group message");
  });

  test("a direct chat's id is not a groupId", async () => {
    const [a, b] = await users(2);
    const room = await direct(a, b);
    const sa = await connect(a);
    for (const frame of [
      { type: "GROUP_CHAT", groupId: String(room), content: "x" },
      { type: "GET_GROUP_CHAT_HISTORY", groupId: String(room) },
    ]) {
      sa.send(frame);
      assert.equal(
        (await next(sa, "ERROR")).msg,
        `groupId ${room} is a one-to-one chat; use ONE_TO_ONE_CHAT`,
      );
    }
  });

  test("JOIN_GROUP a public group, chat both ways, LEAVE_GROUP stops the messages", async () => {
    const [a, e] = await users(2);
    const g = await group(a, [], { pub: true, name: "open" });
    const sa = await connect(a);
    const se = await connect(e);
    se.send({ type: "JOIN_GROUP", groupId: String(g), username: a.username });
    assert.deepEqual(await next(se, "ERROR"), {
      type: "ERROR",
      msg: "username does not match the authenticated user",
    });
    se.send({ type: "JOIN_GROUP", groupId: String(g), username: e.username });
    assert.deepEqual(await next(se, "SUCCESS"), { type: "SUCCESS", msg: `joined group ${g}` });
    assert.deepEqual(await next(se, "INFO"), {
      type: "INFO",
      msg: `you are now a member of group ${g} (open)`,
    });
    sa.send({ type: "GROUP_CHAT", from: a.username, groupId: String(g), content: "welcome" });
    assertGroup(await next(se, "GROUP_CHAT"), { from: a.username, groupId: g, content: "welcome" });
    se.send({ type: "GROUP_CHAT", from: e.username, groupId: String(g), content: "thanks" });
    assertGroup(await next(sa, "GROUP_CHAT", (m) => m.content === "thanks"), {
      from: e.username,
      groupId: g,
      content: "thanks",
    });

    se.send({ type: "LEAVE_GROUP", groupId: String(g), username: e.username });
    assert.deepEqual(await next(se, "SUCCESS"), { type: "SUCCESS", msg: `left group ${g}` });
    assert.deepEqual(await next(se, "INFO"), {
      type: "INFO",
      msg: `you are no longer a member of group ${g}`,
    });
    sa.send({ type: "GROUP_CHAT", groupId: String(g), content: "after you left" });
    await next(sa, "GROUP_CHAT", (m) => m.content === "after you left");
    await nothing(se, (m) => m.content === "after you left", "message after LEAVE_GROUP");
    se.send({ type: "GROUP_CHAT", groupId: String(g), content: "still here?" });
    assert.equal((await next(se, "ERROR")).msg, `you are not a member of room ${g}`);
  });

  test("JOIN_GROUP of a private group is refused", async () => {
    const [a, e] = await users(2);
    const g = await group(a, [], { pub: false });
    const se = await connect(e);
    se.send({ type: "JOIN_GROUP", groupId: String(g) });
    const err = await next(se, "ERROR");
    assert.equal(err.msg, "this group is private: ask an admin to add you");
    se.send({ type: "LEAVE_GROUP", groupId: String(g), username: a.username });
    assert.equal((await next(se, "ERROR")).msg, "username does not match the authenticated user");
  });
});

// ------------------------------------------------------------------------------------------
// History
// ------------------------------------------------------------------------------------------

describe("history", () => {
  test("GET_ONE_TO_ONE_HISTORY: oldest first, exact shapes, paging, tombstones", async () => {
    const [a, b] = await users(2);
    const sa = await connect(a);
    const sb = await connect(b);
    const m1 = await dm(sa, sb, a, b, "one");
    const m2 = await dm(sb, sa, b, a, "two");
    const m3 = await dm(sa, sb, a, b, "three");
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", from: a.username, to: b.username, chatId: "chat_1" });
    assert.deepEqual(await next(sa, "ONE_TO_ONE_CHAT_HISTORY"), {
      type: "ONE_TO_ONE_CHAT_HISTORY",
      chatId: m1.chatId,
      with: b.username,
      messages: [m1, m2, m3],
      hasMore: false,
    });
    // b sees the same messages from its side.
    sb.send({ type: "GET_ONE_TO_ONE_HISTORY", to: a.username, chatId: m1.chatId });
    assert.deepEqual((await next(sb, "ONE_TO_ONE_CHAT_HISTORY")).messages, [m1, m2, m3]);
    // Pages: the newest two, then the one before them.
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: b.username, limit: 2 });
    const p1 = await next(sa, "ONE_TO_ONE_CHAT_HISTORY");
    assert.deepEqual(p1.messages, [m2, m3]);
    assert.equal(p1.hasMore, true);
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: b.username, limit: 2, before: m2.messageId });
    const p2 = await next(sa, "ONE_TO_ONE_CHAT_HISTORY");
    assert.deepEqual(p2.messages, [m1]);
    assert.equal(p2.hasMore, false);
    // A deleted message keeps its place, emptied.
    const del = await rest(a.token, "DELETE", `/v1/rooms/${m1.chatId}/messages/${m1.messageId}`);
    assert.equal(del.status, 200, JSON.stringify(del.body));
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: b.username });
    const h = await next(sa, "ONE_TO_ONE_CHAT_HISTORY");
    assert.deepEqual(h.messages[0], { ...m1, content: "", deleted: true });
    assert.deepEqual(h.messages.slice(1), [m2, m3]);
    // The wrong chat id, a spoofed from, an unknown peer.
    const [c] = await users(1);
    const other = await direct(a, c);
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: b.username, chatId: String(other) });
    assert.equal((await next(sa, "ERROR")).msg, `chatId ${other} is not the chat with ${b.username}`);
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", from: b.username, to: b.username });
    assert.equal((await next(sa, "ERROR")).msg, "from does not match the authenticated user");
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: "nobody_at_all_here" });
    assert.equal((await next(sa, "ERROR")).msg, "user nobody_at_all_here not found");
    // Nobody to talk to yet: no chat, no messages.
    sa.send({ type: "GET_ONE_TO_ONE_HISTORY", to: c.username });
    assert.deepEqual(await next(sa, "ONE_TO_ONE_CHAT_HISTORY"), {
      type: "ONE_TO_ONE_CHAT_HISTORY",
      chatId: null,
      with: c.username,
      messages: [],
      hasMore: false,
    });
  });

  test("GET_GROUP_CHAT_HISTORY: oldest first, exact shapes; members only", async () => {
    const [a, b, d] = await users(3);
    const g = await group(a, [b]);
    const sa = await connect(a);
    const sb = await connect(b);
    const sd = await connect(d);
    const sent = [];
    for (const [s, u, content] of [
      [sa, a, "g1"],
      [sb, b, "g2"],
      [sa, a, "g3"],
    ]) {
      s.send({ type: "GROUP_CHAT", from: u.username, groupId: String(g), content });
      sent.push(await next(s, "GROUP_CHAT", (m) => m.content === content, content));
    }
    sb.send({ type: "GET_GROUP_CHAT_HISTORY", groupId: String(g) });
    assert.deepEqual(await next(sb, "GROUP_CHAT_HISTORY"), {
      type: "GROUP_CHAT_HISTORY",
      groupId: String(g),
      messages: sent,
      hasMore: false,
    });
    sb.send({ type: "GET_GROUP_CHAT_HISTORY", groupId: g, limit: 1, before: sent[2].messageId });
    assert.deepEqual(await next(sb, "GROUP_CHAT_HISTORY"), {
      type: "GROUP_CHAT_HISTORY",
      groupId: String(g),
      messages: [sent[1]],
      hasMore: true,
    });
    sd.send({ type: "GET_GROUP_CHAT_HISTORY", groupId: String(g) });
    assert.deepEqual(await next(sd, "ERROR"), {
      type: "ERROR",
      msg: `you are not a member of room ${g}`,
    });
    await nothing(sd, (m) => m.type === "GROUP_CHAT_HISTORY", "history for an outsider");
  });
});

// ------------------------------------------------------------------------------------------
// DISCONNECT
// ------------------------------------------------------------------------------------------

describe("DISCONNECT", () => {
  test("INFO bye, then close 1000, on both sockets; the user goes offline", async () => {
    const [a, b] = await users(2);
    await direct(a, b);
    const pb = await connect(b, PRESENCE);
    const sa = await connect(a);
    await next(pb, "PRESENCE_UPDATE", (m) => m.username === a.username && m.status === "online");
    sa.send({ type: "DISCONNECT" });
    assert.deepEqual(await next(sa, "INFO"), { type: "INFO", msg: "bye" });
    assert.equal((await sa.waitClosed()).code, 1000);
    await next(pb, "PRESENCE_UPDATE", (m) => m.username === a.username && m.status === "offline");
    pb.send({ type: "DISCONNECT" });
    assert.deepEqual(await next(pb, "INFO"), { type: "INFO", msg: "bye" });
    assert.equal((await pb.waitClosed()).code, 1000);
  });
});

// ------------------------------------------------------------------------------------------
// Presence
// ------------------------------------------------------------------------------------------

function assertPresence(m, username, status) {
  assert.deepEqual(Object.keys(m).sort(), ["status", "timestamp", "type", "username"]);
  assert.equal(m.type, "PRESENCE_UPDATE");
  assert.equal(m.username, username);
  assert.equal(m.status, status);
  assert.match(m.timestamp, ISO_DATETIME);
  assert.ok(Math.abs(Date.now() - Date.parse(m.timestamp)) < 60_000, `timestamp ${m.timestamp}`);
}

describe("presence feed", () => {
  test("a direct peer's online and offline; a stranger's never", async () => {
    const [a, b, stranger] = await users(3);
    await direct(a, b);
    const pb = await connect(b, PRESENCE);
    await nothing(pb, (m) => m.type === "PRESENCE_UPDATE", "snapshot entry while a is offline");
    const sa = await connect(a);
    assertPresence(
      await next(pb, "PRESENCE_UPDATE", (m) => m.username === a.username),
      a.username,
      "online",
    );
    sa.close();
    assertPresence(
      await next(pb, "PRESENCE_UPDATE", (m) => m.username === a.username),
      a.username,
      "offline",
    );
    const ss = await connect(stranger);
    ss.close();
    await nothing(pb, (m) => m.type === "PRESENCE_UPDATE", "a stranger's presence");
  });

  test("the snapshot on AUTH lists online direct peers and friends, once each", async () => {
    const [a, b, c, offline] = await users(4);
    await direct(a, b);
    await direct(b, offline);
    let r = await rest(b.token, "POST", `/v1/friends/${c.id}`, { action: "request" });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    r = await rest(c.token, "POST", `/v1/friends/${b.id}`, { action: "accept" });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    await direct(b, c); // c is both a friend and a direct peer: listed once
    // A first feed of b sees a and c come online live (so those events are behind us).
    const live = await connect(b, PRESENCE);
    await connect(a);
    await connect(c, PRESENCE); // any socket counts as online
    for (const u of [a, c]) {
      assertPresence(await next(live, "PRESENCE_UPDATE", (m) => m.username === u.username), u.username, "online");
    }
    // A second feed of b starts with the snapshot: exactly a and c, online.
    const pb = await connect(b, PRESENCE);
    const first = [await next(pb, "PRESENCE_UPDATE"), await next(pb, "PRESENCE_UPDATE")].sort(
      (x, y) => x.username.localeCompare(y.username),
    );
    const expected = [a.username, c.username].sort();
    assertPresence(first[0], expected[0], "online");
    assertPresence(first[1], expected[1], "online");
    await nothing(pb, (m) => m.type === "PRESENCE_UPDATE", "a further snapshot entry");
  });

  test("the feed is read-only and shows no chat", async () => {
    const [a, b] = await users(2);
    const pb = await connect(b, PRESENCE);
    const sa = await connect(a);
    pb.send({ type: "ONE_TO_ONE_CHAT", to: a.username, content: "x" });
    assert.deepEqual(await next(pb, "INFO"), { type: "INFO", msg: "presence feed is read-only" });
    pb.send("{bad");
    assert.match((await next(pb, "ERROR")).msg, /^malformed JSON: /);
    sa.send({ type: "ONE_TO_ONE_CHAT", to: b.username, content: "not on the feed" });
    await next(sa, "ONE_TO_ONE_CHAT");
    await nothing(pb, (m) => m.type !== "PRESENCE_UPDATE", "a chat frame on the presence feed");
    const h = await rest(b.token, "GET", `/v1/users/${a.id}/messages`);
    assert.equal(h.body.messages.length, 1, "the chat went to the chat socket only");
  });

  test("presence is not shown across a block", async () => {
    const [a, b] = await users(2);
    await direct(a, b);
    const r = await rest(b.token, "POST", `/v1/friends/${a.id}`, { action: "block" });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const pb = await connect(b, PRESENCE);
    const sa = await connect(a);
    sa.close();
    await nothing(pb, (m) => m.type === "PRESENCE_UPDATE", "presence across a block");
  });
});

// ------------------------------------------------------------------------------------------
// Compat listeners
// ------------------------------------------------------------------------------------------

describe("compat listeners at /", () => {
  test("rt-chat and rt-presence serve the same sockets at / on their own ports", async () => {
    assert.ok(COMPAT_CHAT && COMPAT_PRESENCE, "PALAVER_RT_CHAT_URL and PALAVER_RT_PRESENCE_URL");
    assert.match(COMPAT_CHAT, /^ws:\/\/127\.0\.0\.1:\d+\/$/);
    const [a, b] = await users(2);
    await direct(a, b);
    const pb = await connect(b, COMPAT_PRESENCE);
    const sb = await connect(b, COMPAT_CHAT);
    const sa = await connect(a, CHAT); // a on the main listener
    assertPresence(
      await next(pb, "PRESENCE_UPDATE", (m) => m.username === a.username),
      a.username,
      "online",
    );
    const got = await dm(sa, sb, a, b, "across listeners");
    assertDirect(got, { from: a.username, to: b.username, content: "across listeners" });
    await refused(COMPAT_CHAT, { type: "GROUP_CHAT" }, 4002, "first frame must be AUTH");
    await refused(COMPAT_PRESENCE, { type: "AUTH", token: expiredToken(a.id) }, 4001, "invalid token: expired");
  });
});
