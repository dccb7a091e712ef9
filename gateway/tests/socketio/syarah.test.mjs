// Syarah (seed 001): the default namespace. Token placements and refusals, every client event
// with its ack, every server event, the REST shim, the viewing state behind push decisions,
// privacy, on both transports.

import assert from "node:assert/strict";
import {
  ISO_DATETIME,
  QUIET,
  TRANSPORTS,
  URL,
  WAIT,
  ack,
  collect,
  connectError,
  directRoom,
  errAck,
  expiredToken,
  http,
  newUser,
  okAck,
  png,
  quiet,
  say,
  scenario,
  upload,
  waitFor,
  within,
  wrongSignatureToken,
} from "./lib.mjs";

const CHAT_MESSAGE_KEYS = [
  "caption",
  "chatHeaderId",
  "creationTime",
  "id",
  "isDeleted",
  "lastModificationTime",
  "message",
  "messageType",
  "replyToId",
  "seq",
  "userId",
].sort();

/** Asserts a chat message's shape and, where given, its values. */
function assertChatMessage(m, want = {}) {
  assert.deepEqual(Object.keys(m).sort(), CHAT_MESSAGE_KEYS, JSON.stringify(m));
  assert.equal(typeof m.id, "number");
  assert.ok(Number.isSafeInteger(m.id) && m.id > 0);
  assert.equal(typeof m.chatHeaderId, "number");
  assert.equal(typeof m.userId, "string");
  assert.equal(typeof m.message, "string");
  assert.equal(typeof m.messageType, "number");
  assert.match(m.creationTime, ISO_DATETIME);
  assert.equal(typeof m.isDeleted, "boolean");
  assert.equal(typeof m.seq, "number");
  for (const [k, v] of Object.entries(want)) {
    assert.deepEqual(m[k], v, `${k} of ${JSON.stringify(m)}`);
  }
}

/** The next `message` event of `sock` for `room`; checks the envelope. */
async function messageIn(sock, room) {
  const ev = await waitFor(sock, "message", undefined, (e) => e?.chatHeaderId === room);
  assert.deepEqual(Object.keys(ev).sort(), ["chatHeaderId", "chatMessage"]);
  assertChatMessage(ev.chatMessage, { chatHeaderId: room });
  return ev.chatMessage;
}

/** Two connected Syarah users with their direct room; both sockets joined (viewing) it. */
async function pair(s, transports = ["websocket"]) {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { transports, label: "a" });
  const sb = await s.syarah(b, { transports, label: "b" });
  const room = await directRoom(sa, b);
  await okAck(sb, "joinRoom", { chatHeaderId: room });
  return { a, b, sa, sb, room };
}

// ------------------------------------------------------------------------------------------
// Connecting: token placements and refusals
// ------------------------------------------------------------------------------------------

for (const transports of TRANSPORTS) {
  const tr = transports[0];

  scenario(`[${tr}] connect_error: missing, invalid, expired, userId mismatch`, async (s) => {
    const u = newUser();
    const other = newUser();
    const cases = [
      [{}, "access token not found"],
      [{ auth: { token: "garbage" } }, "access token is invalid"],
      [{ auth: { token: wrongSignatureToken(u.id) } }, "access token is invalid"],
      [{ auth: { accessToken: expiredToken(u.id) } }, "access token has expired"],
      [{ query: { accessToken: expiredToken(u.id) } }, "access token has expired"],
      [
        { auth: { token: u.token }, query: { userId: other.id } },
        "userId does not match the access token",
      ],
    ];
    for (const [opts, expected] of cases) {
      const sock = await s.syarahRaw({ ...opts, transports, label: expected });
      assert.equal(await connectError(sock), expected, JSON.stringify(opts));
    }
  });

  scenario(`[${tr}] token in auth.token, auth.accessToken or query accessToken`, async (s) => {
    const placements = [
      (u) => ({ auth: { token: u.token } }),
      (u) => ({ auth: { accessToken: u.token } }),
      (u) => ({ auth: { token: `Bearer ${u.token}` } }),
      (u) => ({ query: { accessToken: u.token } }),
      (u) => ({ query: { accessToken: u.token, userId: u.id } }),
    ];
    for (const place of placements) {
      const u = newUser();
      const sock = await s.syarah(u, { transports, ...place(u) });
      // Bound at connect: events need no token.
      assert.deepEqual(await okAck(sock, "getMyChats", {}), []);
      assert.deepEqual(await okAck(sock, "findAllChatHeaders", {}), { items: [], hasMore: false });
      // Events whose fields are all optional work without any payload.
      assert.deepEqual(
        await within(sock.timeout(WAIT).emitWithAck("getMyChats"), WAIT * 2, "ack"),
        [],
      );
      assert.deepEqual(
        await within(sock.timeout(WAIT).emitWithAck("getMyFriendships"), WAIT * 2, "ack"),
        [],
      );
    }
  });

  scenario(`[${tr}] only userId: refused until the first event with a valid token`, async (s) => {
    const u = newUser();
    const peer = newUser();
    await s.syarah(peer, { transports });
    const sock = await s.syarah(u, { transports, query: { userId: u.id } });
    // Nothing works before a token: every answer is {error}.
    for (const [event, data] of [
      ["getMyChats", {}],
      ["getMyFriendships", {}],
      ["joinRoom", { otherUserId: peer.id }],
      ["findAllChatHeaders", { UserId: u.id }],
      ["createMessage", { message: "x", chatHeaderId: 1, messageType: 0 }],
    ]) {
      assert.match(await errAck(sock, event, data), /access token not found/, event);
    }
    // Without an ack: the error event {event, error}.
    sock.emit("getMyChats", {});
    assert.deepEqual(Object.keys(await waitFor(sock, "error")).sort(), ["error", "event"]);
    // Bad tokens in the event are refused with the dialect's strings.
    assert.equal(
      await errAck(sock, "getMyChats", { accessToken: expiredToken(u.id) }),
      "access token has expired",
    );
    assert.equal(
      await errAck(sock, "getMyChats", { accessToken: wrongSignatureToken(u.id) }),
      "access token is invalid",
    );
    // A valid token of another user than the claimed userId is refused.
    assert.equal(
      await errAck(sock, "getMyChats", { accessToken: peer.token }),
      "userId does not match the access token",
    );
    // The first valid token binds the connection; then no token is needed.
    const room = (await okAck(sock, "joinRoom", { otherUserId: peer.id, accessToken: u.token }))
      .chatHeaderId;
    const m = await say(sock, room, "bound by the event's token");
    assertChatMessage(m, { userId: u.id, chatHeaderId: room });
    assert.equal((await okAck(sock, "getMyChats", {})).length, 1);
    // A token of another user on the bound connection: refused.
    assert.equal(
      await errAck(sock, "getMyChats", { accessToken: peer.token }),
      "access token belongs to another user than this connection",
    );
  });

  scenario(`[${tr}] AccessToken (seed casing) binds a userId-only connection`, async (s) => {
    const u = newUser();
    const sock = await s.syarah(u, { transports, query: { userId: u.id } });
    const r = await okAck(sock, "findAllChatHeaders", {
      AccessToken: u.token,
      UserId: u.id,
      SkipCount: 0,
      MaxResultCount: 20,
    });
    assert.deepEqual(r, { items: [], hasMore: false });
    assert.deepEqual(await okAck(sock, "getMyChats", {}), []);
  });
}

scenario("GUID user ids, as in the seed: connect by userId, bind, talk, list", async (s) => {
  const a = newUser({ guid: true });
  const b = newUser({ guid: true });
  const sa = await s.syarah(a, { query: { userId: a.id }, label: "a (guid)" });
  const sb = await s.syarah(b, { auth: { accessToken: b.token }, label: "b (guid)" });
  const j = await okAck(sa, "joinRoom", {
    userId: a.id,
    otherUserId: b.id,
    socketId: sa.id,
    accessToken: a.token,
  });
  const room = j.chatHeaderId;
  assert.deepEqual(j.members.map((m) => m.userId).sort(), [a.id, b.id].sort());
  const m = await say(sa, room, "hello guid");
  assertChatMessage(m, { userId: a.id });
  assert.deepEqual(await messageIn(sb, room), m);
  const chats = await okAck(sb, "getMyChats", {});
  assert.equal(chats[0].userId, a.id);
  assert.equal(chats[0].userName, a.name);
  const hs = await okAck(sb, "findAllChatHeaders", { AccessToken: b.token, UserId: b.id });
  assert.equal(hs.items[0].otherUser.userId, a.id);
});

scenario("a connection bound by auth refuses another user's token and user id", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a);
  await s.syarah(b);
  const room = await directRoom(sa, b);
  // The same user's token in the event is fine, "Bearer " prefix included.
  await okAck(sa, "getMyChats", { accessToken: a.token });
  await okAck(sa, "getMyChats", { AccessToken: `Bearer ${a.token}` });
  const refused = "access token belongs to another user than this connection";
  assert.equal(await errAck(sa, "getMyChats", { accessToken: b.token }), refused);
  assert.equal(
    await errAck(sa, "createMessage", {
      message: "spoof",
      chatHeaderId: room,
      messageType: 0,
      AccessToken: b.token,
    }),
    refused,
  );
  assert.equal(
    await errAck(sa, "joinRoom", { chatHeaderId: room, userId: b.id, socketId: sa.id }),
    "userId does not match the access token",
  );
  assert.equal(
    await errAck(sa, "findAllChatHeaders", { UserId: b.id }),
    "UserId does not match the access token",
  );
  assert.equal(
    await errAck(sa, "getMyChats", { accessToken: expiredToken(a.id) }),
    "access token has expired",
  );
  // The seed's own userId/socketId fields, when right, are accepted.
  const r = await okAck(sa, "joinRoom", { chatHeaderId: room, userId: a.id, socketId: sa.id });
  assert.equal(r.chatHeaderId, room);
  // Nothing was sent in b's name.
  const page = await okAck(sa, "findAllMessages", { chatHeaderId: String(room) });
  assert.deepEqual(page.items, []);
});

scenario("errors: in the ack as {error}, else as the error event; unknown events", async (s) => {
  const { sa, room } = await pair(s);
  assert.match(await errAck(sa, "noSuchEvent", {}), /unknown event "noSuchEvent"/);
  assert.match(
    await errAck(sa, "createMessage", { chatHeaderId: room, messageType: 0 }),
    /message/,
  );
  assert.match(await errAck(sa, "createMessage", { message: "x", messageType: 0 }), /chatHeaderId/);
  assert.match(
    await errAck(sa, "createMessage", { message: "x", chatHeaderId: room, messageType: 9 }),
    /messageType/,
  );
  assert.match(await errAck(sa, "findAllMessages", {}), /chatHeaderId/);
  assert.match(await errAck(sa, "removeMessage", { chatHeaderId: room }), /id/);
  assert.match(await errAck(sa, "joinRoom", {}), /chatHeaderId or otherUserId/);
  // No ack: the `error` event names the event.
  sa.emit("createMessage", { chatHeaderId: room, messageType: 0 });
  const e = await waitFor(sa, "error");
  assert.equal(e.event, "createMessage");
  assert.equal(typeof e.error, "string");
  sa.emit("bogus");
  assert.equal((await waitFor(sa, "error")).event, "bogus");
  // Nothing was sent by any of them.
  assert.deepEqual((await okAck(sa, "findAllMessages", { chatHeaderId: room })).items, []);
});

// ------------------------------------------------------------------------------------------
// Rooms and messages, on both transports
// ------------------------------------------------------------------------------------------

for (const transports of TRANSPORTS) {
  const tr = transports[0];

  scenario(`[${tr}] joinRoom: get-or-create by otherUserId, by chatHeaderId`, async (s) => {
    const a = newUser();
    const b = newUser();
    const sa = await s.syarah(a, { transports });
    const sb = await s.syarah(b, { transports });
    const first = await okAck(sa, "joinRoom", {
      userId: a.id,
      otherUserId: b.id,
      socketId: sa.id,
      accessToken: a.token,
    });
    const fields = [
      "chatHeaderId",
      "joined",
      "roomMembers",
      "members",
      "currentMember",
      "friendshipStatus",
    ];
    for (const k of fields) {
      assert.ok(k in first, `joinRoom reply lacks ${k}: ${JSON.stringify(first)}`);
    }
    assert.equal(typeof first.chatHeaderId, "number");
    assert.equal(first.joined, true);
    assert.equal(first.friendshipStatus, null);
    assert.deepEqual(first.members, first.roomMembers);
    assert.deepEqual(first.members.map((m) => m.userId).sort(), [a.id, b.id].sort());
    for (const m of first.members) {
      assert.deepEqual(Object.keys(m).sort(), ["isOnline", "joinTime", "role", "userId"]);
      assert.match(m.joinTime, ISO_DATETIME);
      assert.equal(m.isOnline, true, "both are connected");
    }
    assert.equal(first.currentMember.userId, a.id);
    assert.equal(first.chatHeader?.id, first.chatHeaderId);
    // Again, and from the other side: the same room.
    const again = await okAck(sa, "joinRoom", { otherUserId: b.id });
    assert.equal(again.chatHeaderId, first.chatHeaderId);
    const fromB = await okAck(sb, "joinRoom", { otherUserId: a.id });
    assert.equal(fromB.chatHeaderId, first.chatHeaderId);
    assert.equal(fromB.currentMember.userId, b.id);
    // By chatHeaderId (number or string).
    const byId = await okAck(sb, "joinRoom", { chatHeaderId: first.chatHeaderId });
    assert.equal(byId.chatHeaderId, first.chatHeaderId);
    assert.equal(byId.joined, true);
    const byStr = await okAck(sb, "joinRoom", { chatHeaderId: String(first.chatHeaderId) });
    assert.equal(byStr.chatHeaderId, first.chatHeaderId);
    // leaveRoom answers and the room still works.
    assert.deepEqual(await okAck(sb, "leaveRoom", { chatHeaderId: first.chatHeaderId }), {
      chatHeaderId: first.chatHeaderId,
      left: true,
    });
    assert.deepEqual(
      await okAck(sb, "leaveRoom", { chatHeaderId: first.chatHeaderId, accessToken: b.token }),
      { chatHeaderId: first.chatHeaderId, left: true },
    );
    // Unknown users and rooms are errors.
    assert.match(await errAck(sa, "joinRoom", { otherUserId: newUser().id }), /not found/);
    assert.ok(await errAck(sa, "joinRoom", { chatHeaderId: 987654321 }));
  });

  scenario(`[${tr}] createMessage text: ack and message event with chatMessage`, async (s) => {
    const { a, b, sa, sb, room } = await pair(s, transports);
    const m = await okAck(sa, "createMessage", {
      message: "Hello, world!",
      chatHeaderId: room,
      accessToken: a.token,
      messageType: 0,
      caption: "",
    });
    assertChatMessage(m, {
      chatHeaderId: room,
      userId: a.id,
      message: "Hello, world!",
      messageType: 0,
      caption: null,
      isDeleted: false,
      lastModificationTime: null,
      replyToId: null,
    });
    assert.deepEqual(await messageIn(sb, room), m);
    assert.deepEqual(await messageIn(sa, room), m);
    // Without an ack (the seed's sendMessage): delivered all the same.
    sb.emit("createMessage", {
      message: "no ack",
      chatHeaderId: room,
      accessToken: b.token,
      messageType: 0,
    });
    const m2 = await messageIn(sa, room);
    assertChatMessage(m2, { userId: b.id, message: "no ack" });
    assert.deepEqual(await messageIn(sb, room), m2);
    assert.ok(m2.id > m.id && m2.seq > m.seq);
    // A chatHeaderId given as a string works too.
    const m3 = await say(sa, String(room), "string id");
    assert.equal(m3.chatHeaderId, room);
    await messageIn(sb, room);
    await quiet(sb, "error");
  });

  scenario(`[${tr}] createMessage media (types 1-4) by uploaded path, with caption`, async (s) => {
    const { a, sa, sb, room } = await pair(s, transports);
    const files = [
      [1, "voice.mp3", Buffer.from("ID3 not really audio"), "audios", "mp3"],
      [2, "photo.png", png(), "images", "webp"],
      [3, "notes.txt", Buffer.from("some notes"), "files", "txt"],
      // Uploads are checked by content: an MP4 needs at least its `ftyp` box.
      [4, "clip.mp4", Buffer.from([0, 0, 0, 0x14, ...Buffer.from("ftypisom"), 0, 0, 2, 0, ...Buffer.from("isom")]), "videos", "mp4"],
    ];
    for (const [type, name, bytes, dir, ext] of files) {
      const path = await upload(a, type, name, bytes);
      assert.match(path, new RegExp(`^/uploads/chat-messages/${dir}/[0-9a-f]+\\.${ext}$`));
      const caption = `caption of ${name}`;
      const m = await okAck(sa, "createMessage", {
        message: path,
        chatHeaderId: room,
        accessToken: a.token,
        messageType: type,
        caption,
      });
      assertChatMessage(m, { messageType: type, message: path, caption, userId: a.id });
      assert.deepEqual(await messageIn(sb, room), m);
      await messageIn(sa, room);
    }
    // An uploaded image is served back as WebP to an authenticated member.
    const path = await upload(a, 2, "again.png", png(8, 8));
    const res = await http(`${URL}${path}`, { headers: { Authorization: `Bearer ${a.token}` } });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), "image/webp");
    const body = Buffer.from(await res.arrayBuffer());
    assert.equal(body.subarray(8, 12).toString("ascii"), "WEBP");
    // A media message without caption has caption null.
    const bare = await okAck(sa, "createMessage", {
      message: path,
      chatHeaderId: room,
      messageType: 2,
    });
    assertChatMessage(bare, { caption: null, messageType: 2, message: path });
    // History lists them with their types, oldest first.
    const page = await okAck(sa, "findAllMessages", { chatHeaderId: String(room) });
    assert.deepEqual(page.items.map((m) => m.messageType), [1, 2, 3, 4, 2]);
  });

  scenario(`[${tr}] roomTyping: the other member gets typing, the typist does not`, async (s) => {
    const { a, sa, sb, room } = await pair(s, transports);
    sa.emit("roomTyping", { isTyping: true, name: "John Doe", chatHeaderId: room });
    const t = await waitFor(sb, "typing");
    assert.equal(t.isTyping, true);
    assert.equal(t.chatHeaderId, room);
    assert.equal(typeof t.name, "string");
    // The name comes from the token, never from the client.
    assert.equal(t.name, a.name);
    assert.equal(t.userId, a.id);
    const stop = await okAck(sa, "roomTyping", {
      isTyping: false,
      name: "John Doe",
      chatHeaderId: room,
    });
    assert.deepEqual(stop, { chatHeaderId: room, isTyping: false });
    const t2 = await waitFor(sb, "typing");
    assert.deepEqual(
      { isTyping: t2.isTyping, chatHeaderId: t2.chatHeaderId },
      { isTyping: false, chatHeaderId: room },
    );
    await quiet(sa, "typing");
    assert.match(
      await errAck(sa, "roomTyping", { isTyping: "yes", chatHeaderId: room }),
      /isTyping/,
    );
  });

  scenario(`[${tr}] updateMessage -> messageUpdated; only the author`, async (s) => {
    const { a, sa, sb, room } = await pair(s, transports);
    const m = await say(sa, room, "typo");
    await messageIn(sb, room);
    const updated = await okAck(sa, "updateMessage", {
      id: m.id,
      message: "Updated message content",
      chatHeaderId: room,
      accessToken: a.token,
      caption: "",
    });
    assertChatMessage(updated, { id: m.id, message: "Updated message content", userId: a.id });
    assert.match(updated.lastModificationTime, ISO_DATETIME);
    const atB = await waitFor(sb, "messageUpdated");
    assert.deepEqual(atB, updated);
    assert.deepEqual(await waitFor(sa, "messageUpdated"), updated);
    // Without an ack, as in the seed's example.
    sa.emit("updateMessage", { id: m.id, message: "again", chatHeaderId: room, caption: "" });
    assert.equal((await waitFor(sb, "messageUpdated")).message, "again");
    // A media message keeps its upload; the caption changes.
    const path = await upload(a, 2, "p.png", png());
    const media = await okAck(sa, "createMessage", {
      message: path,
      chatHeaderId: room,
      messageType: 2,
      caption: "old",
    });
    const mu = await okAck(sa, "updateMessage", {
      id: media.id,
      message: path,
      chatHeaderId: room,
      caption: "new",
    });
    assertChatMessage(mu, { id: media.id, message: path, caption: "new", messageType: 2 });
    assert.deepEqual(await waitFor(sb, "messageUpdated", undefined, (x) => x.id === media.id), mu);
    // Someone else's message: refused, nothing emitted.
    assert.ok(
      await errAck(sb, "updateMessage", { id: m.id, message: "hijack", chatHeaderId: room }),
    );
    await quiet(sb, "messageUpdated");
  });

  scenario(`[${tr}] removeMessage by id, by ids (ids wins): a messageDeleted per id`, async (s) => {
    const { sa, sb, room } = await pair(s, transports);
    const ms = [];
    for (let i = 0; i < 5; i++) ms.push(await say(sa, room, `m${i}`));
    await collect(sb, "message", 200);
    // Single id.
    const r1 = await okAck(sa, "removeMessage", { id: ms[0].id, chatHeaderId: room });
    assert.deepEqual(r1, { chatHeaderId: room, ids: [ms[0].id], deleted: true });
    assert.equal(await waitFor(sb, "messageDeleted"), ms[0].id);
    assert.equal(await waitFor(sa, "messageDeleted"), ms[0].id);
    // ids and id: ids wins; one event per id, each a number.
    const r2 = await okAck(sa, "removeMessage", {
      id: ms[1].id,
      ids: [ms[2].id, ms[3].id],
      chatHeaderId: room,
    });
    assert.deepEqual(r2.ids, [ms[2].id, ms[3].id]);
    const got = await collect(sb, "messageDeleted", QUIET);
    assert.deepEqual(got, [ms[2].id, ms[3].id]);
    for (const g of got) assert.equal(typeof g, "number");
    // Without an ack.
    sa.emit("removeMessage", { ids: [ms[4].id], chatHeaderId: room });
    assert.equal(await waitFor(sb, "messageDeleted"), ms[4].id);
    // History: m1 (named by `id` beside `ids`) survived; the others are tombstones.
    const page = await okAck(sa, "findAllMessages", { chatHeaderId: room, maxResultCount: 10 });
    assert.deepEqual(
      page.items.map((m) => [m.id, m.isDeleted]),
      ms.map((m, i) => [m.id, i !== 1]),
    );
    for (const m of page.items.filter((x) => x.isDeleted)) assert.equal(m.message, "");
    // b cannot delete a's message in a direct room.
    assert.ok(await errAck(sb, "removeMessage", { id: ms[1].id, chatHeaderId: room }));
    assert.ok(await errAck(sa, "removeMessage", { ids: "x", chatHeaderId: room }));
    assert.ok(await errAck(sa, "removeMessage", { ids: [], chatHeaderId: room }));
  });

  scenario(`[${tr}] readMessage -> messageHasBeenRead with the chat header id`, async (s) => {
    const { sa, sb, room } = await pair(s, transports);
    await say(sa, room, "read me");
    await messageIn(sb, room);
    const before = await okAck(sb, "getMyChats", {});
    assert.equal(before[0].unreadCount, 1);
    sb.emit("readMessage", { chatHeaderId: room });
    const n = await waitFor(sa, "messageHasBeenRead");
    assert.equal(n, room);
    assert.equal(typeof n, "number");
    assert.equal(await waitFor(sb, "messageHasBeenRead"), room);
    const after = await okAck(sb, "getMyChats", {});
    assert.equal(after[0].unreadCount, 0);
    assert.deepEqual(await okAck(sb, "readMessage", { chatHeaderId: room }), {
      chatHeaderId: room,
      read: true,
    });
  });

  scenario(`[${tr}] findAllMessages: skip/max counts, lastMessageId, LastMessageId`, async (s) => {
    const { a, sa, sb, room } = await pair(s, transports);
    const ms = [];
    for (let i = 0; i < 6; i++) ms.push(await say(i % 2 ? sb : sa, room, `n${i}`));
    const ids = ms.map((m) => m.id);
    const all = await okAck(sa, "findAllMessages", {
      chatHeaderId: String(room),
      accessToken: a.token,
      skipCount: 0,
      maxResultCount: 50,
    });
    assert.deepEqual(Object.keys(all).sort(), ["hasMore", "items"]);
    assert.equal(all.hasMore, false);
    assert.deepEqual(all.items.map((m) => m.id), ids, "oldest first");
    for (const [i, m] of all.items.entries()) {
      assertChatMessage(m, { message: `n${i}`, chatHeaderId: room });
    }
    const page = (args) => okAck(sa, "findAllMessages", { chatHeaderId: room, ...args });
    // The newest page, then the one before it.
    const p1 = await page({ skipCount: 0, maxResultCount: 2 });
    assert.deepEqual(p1.items.map((m) => m.id), ids.slice(4));
    assert.equal(p1.hasMore, true);
    const p2 = await page({ skipCount: 2, maxResultCount: 2 });
    assert.deepEqual(p2.items.map((m) => m.id), ids.slice(2, 4));
    const p3 = await page({ SkipCount: 4, MaxResultCount: 2 });
    assert.deepEqual(p3.items.map((m) => m.id), ids.slice(0, 2));
    assert.equal(p3.hasMore, false);
    // What came after the last one seen, under both casings.
    const after = await okAck(sa, "findAllMessages", { chatHeaderId: room, lastMessageId: ids[2] });
    assert.deepEqual(after.items.map((m) => m.id), ids.slice(3));
    const after2 = await okAck(sb, "findAllMessages", {
      chatHeaderId: room,
      LastMessageId: ids[2],
    });
    assert.deepEqual(after2, after);
    const none = await okAck(sa, "findAllMessages", { chatHeaderId: room, lastMessageId: ids[5] });
    assert.deepEqual(none.items, []);
    assert.ok(await errAck(sa, "findAllMessages", { chatHeaderId: room, maxResultCount: -1 }));
  });
}

// ------------------------------------------------------------------------------------------
// Lists: chat headers, chats, friendships
// ------------------------------------------------------------------------------------------

scenario("findAllChatHeaders: paging in both casings, RoomsWithLastMessageIds", async (s) => {
  const me = newUser();
  const peers = [newUser(), newUser(), newUser()];
  const sm = await s.syarah(me);
  const rooms = [];
  for (const p of peers) {
    await s.syarah(p);
    const room = await directRoom(sm, p);
    rooms.push(room);
    await say(sm, room, `hello ${p.id}`);
    await new Promise((r) => setTimeout(r, 5)); // distinct activity times
  }
  const all = await okAck(sm, "findAllChatHeaders", { AccessToken: me.token, UserId: me.id });
  assert.equal(all.hasMore, false);
  assert.deepEqual(all.items.map((h) => h.id), [...rooms].reverse(), "most recent first");
  const h = all.items[0];
  for (const k of [
    "id",
    "chatHeaderId",
    "isGroup",
    "name",
    "avatar",
    "creationTime",
    "lastMessage",
    "lastMessageTime",
    "unreadCount",
    "memberCount",
    "otherUser",
    "isOnline",
    "friendshipStatus",
  ]) {
    assert.ok(k in h, `chat header lacks ${k}: ${JSON.stringify(h)}`);
  }
  assert.equal(h.chatHeaderId, h.id);
  assert.equal(h.isGroup, false);
  assert.equal(h.memberCount, 2);
  assert.equal(h.otherUser.userId, peers[2].id);
  assert.equal(h.isOnline, true);
  assertChatMessage(h.lastMessage, { message: `hello ${peers[2].id}` });
  assert.match(h.lastMessageTime, ISO_DATETIME);
  // Paging: SkipCount/MaxResultCount and skipCount/maxResultCount agree.
  const upper = await okAck(sm, "findAllChatHeaders", { SkipCount: 1, MaxResultCount: 1 });
  const lower = await okAck(sm, "findAllChatHeaders", { skipCount: 1, maxResultCount: 1 });
  assert.deepEqual(upper, lower);
  assert.deepEqual(upper.items.map((x) => x.id), [rooms[1]]);
  assert.equal(upper.hasMore, true);
  // RoomsWithLastMessageIds: which rooms have news since the client's last message id.
  const last = all.items.map((x) => [x.id, x.lastMessage.id]);
  const news = await okAck(sm, "findAllChatHeaders", {
    userId: me.id,
    RoomsWithLastMessageIds: [
      { ChatHeaderId: last[0][0], LastMessageId: last[0][1] },
      { ChatHeaderId: last[1][0], LastMessageId: last[1][1] - 1 },
    ],
  });
  const byId = new Map(news.items.map((x) => [x.id, x]));
  assert.equal(byId.get(last[0][0]).hasNewMessages, false);
  assert.equal(byId.get(last[0][0]).lastKnownMessageId, last[0][1]);
  assert.equal(byId.get(last[1][0]).hasNewMessages, true);
  assert.equal(byId.get(last[2][0]).hasNewMessages, undefined, "not asked about");
  assert.ok(await errAck(sm, "findAllChatHeaders", { RoomsWithLastMessageIds: "x" }));
});

scenario("getMyChats and getMyFriendships: seed fields, friendship made natively", async (s) => {
  const me = newUser();
  const friend = newUser();
  const other = newUser();
  const sm = await s.syarah(me);
  const sf = await s.syarah(friend);
  const nOther = await s.native(other);
  const nMe = await s.native(me);
  // Friendship through the native protocol (Syarah has no event for it).
  await nMe.ok("friend", { user: friend.id, action: "request" });
  const nFriend = await s.native(friend);
  await nFriend.ok("friend", { user: me.id, action: "accept" });
  // No chat yet: chatHeaderId null, as the seed describes.
  let fs = await okAck(sm, "getMyFriendships", { accessToken: me.token });
  assert.deepEqual(fs, [
    { userId: friend.id, name: friend.name, avatar: null, isOnline: true, chatHeaderId: null },
  ]);
  // joinRoom by otherUserId creates it; friendshipStatus 1 (accepted).
  const j = await okAck(sm, "joinRoom", { otherUserId: friend.id });
  assert.equal(j.friendshipStatus, 1);
  fs = await okAck(sm, "getMyFriendships", {});
  assert.equal(fs[0].chatHeaderId, j.chatHeaderId);
  // A chat with a non-friend, and a group (not listed by getMyChats).
  const withOther = await directRoom(sm, other);
  const g = await nOther.ok("create_group", { name: "grp", members: [me.id] });
  await say(sm, j.chatHeaderId, "to my friend");
  await new Promise((r) => setTimeout(r, 5));
  await nOther.ok("send", { room: withOther, text: "from other" });
  await nOther.ok("send", { room: g.room.id, text: "group talk" });
  const chats = await okAck(sm, "getMyChats", { accessToken: me.token });
  assert.deepEqual(
    chats.map((c) => c.chatHeaderId),
    [withOther, j.chatHeaderId],
    "direct only, newest first",
  );
  for (const c of chats) {
    assert.deepEqual(Object.keys(c).sort(), [
      "chatHeaderId",
      "creationTime",
      "friendshipStatus",
      "isOnline",
      "lastMessage",
      "lastMessageTime",
      "unreadCount",
      "userAvatar",
      "userId",
      "userName",
    ]);
    assert.match(c.creationTime, ISO_DATETIME);
    assert.match(c.lastMessageTime, ISO_DATETIME);
  }
  const pick = (c) => [c.userId, c.userName, c.lastMessage, c.unreadCount, c.friendshipStatus];
  assert.deepEqual(pick(chats[0]), [other.id, other.name, "from other", 1, null]);
  assert.equal(chats[0].isOnline, true);
  assert.equal(chats[0].userAvatar, null);
  assert.deepEqual(pick(chats[1]), [friend.id, friend.name, "to my friend", 0, 1]);
  // The friend goes offline: isOnline false in both lists.
  sf.disconnect();
  await nFriend.close();
  await waitFor(sm, "clientStatus", undefined, (x) => x.userId === friend.id && !x.activeNow);
  fs = await okAck(sm, "getMyFriendships", {});
  assert.equal(fs[0].isOnline, false);
  const chats2 = await okAck(sm, "getMyChats", {});
  assert.equal(chats2.find((c) => c.userId === friend.id).isOnline, false);
  // findAllChatHeaders lists the group too.
  const hs = await okAck(sm, "findAllChatHeaders", {});
  assert.equal(hs.items.find((h) => h.id === g.room.id)?.isGroup, true);
});

// ------------------------------------------------------------------------------------------
// Server events: clientStatus, onMemberJoin
// ------------------------------------------------------------------------------------------

for (const transports of TRANSPORTS) {
  const tr = transports[0];

  scenario(`[${tr}] clientStatus on a peer's connect/disconnect, not a stranger's`, async (s) => {
    const a = newUser();
    const b = newUser();
    const stranger = newUser();
    const sa = await s.syarah(a, { transports, label: "a" });
    let sb = await s.syarah(b, { transports, label: "b" });
    await directRoom(sa, b); // peers see each other's presence
    sb.disconnect();
    assert.deepEqual(
      await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id),
      { userId: b.id, clientType: "user", activeNow: false },
    );
    sb = await s.syarah(b, { transports, label: "b again" });
    assert.deepEqual(
      await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id),
      { userId: b.id, clientType: "user", activeNow: true },
    );
    // b sees a leave too.
    sa.disconnect();
    assert.deepEqual(
      await waitFor(sb, "clientStatus", undefined, (x) => x.userId === a.id),
      { userId: a.id, clientType: "user", activeNow: false },
    );
    // A stranger coming and going is not shown.
    const ss = await s.syarah(stranger, { transports, label: "stranger" });
    ss.disconnect();
    await quiet(sb, "clientStatus");
  });
}

scenario("clientStatus: a userId-only connection comes online when a token binds it", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { label: "a" });
  const sb = await s.syarah(b, { label: "b" });
  await directRoom(sa, b);
  sb.disconnect();
  await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id && !x.activeNow);
  const unbound = await s.syarah(b, { query: { userId: b.id }, label: "b unbound" });
  await quiet(sa, "clientStatus");
  await okAck(unbound, "getMyChats", { accessToken: b.token });
  assert.deepEqual(
    await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id),
    { userId: b.id, clientType: "user", activeNow: true },
  );
  // Its own status is not echoed to it.
  await quiet(unbound, "clientStatus");
});

scenario("onMemberJoin when a native owner adds a member to a group", async (s) => {
  const owner = newUser();
  const member = newUser();
  const added = newUser();
  const sm = await s.syarah(member, { label: "member" });
  const no = await s.native(owner);
  await s.native(added);
  const g = await no.ok("create_group", { name: "team", members: [member.id] });
  const room = g.room.id;
  // The Syarah member follows the new group at once: messages, then a member joining.
  await no.ok("send", { room, text: "welcome" });
  const m = await messageIn(sm, room);
  assertChatMessage(m, { userId: owner.id, message: "welcome" });
  await no.ok("add_members", { room, users: [added.id] });
  const j = await waitFor(sm, "onMemberJoin");
  assert.equal(j.userId, added.id);
  assert.equal(j.chatHeaderId, room);
  assert.equal(j.addedBy, owner.id);
  assert.equal(j.role, "member");
  assert.match(j.joinTime, ISO_DATETIME);
  // joinRoom on a group: no friendship status, every member listed.
  const r = await okAck(sm, "joinRoom", { chatHeaderId: room });
  assert.equal(r.friendshipStatus, null);
  assert.equal(r.chatHeader.isGroup, true);
  assert.deepEqual(r.members.map((x) => x.userId).sort(), [owner.id, member.id, added.id].sort());
  assert.equal(r.currentMember.userId, member.id);
  // The Syarah member writes in the group; the native owner gets it.
  const mine = await say(sm, room, "thanks");
  const ev = await waitFor(no, "message", undefined, (f) => f.data.message.id === mine.id);
  assert.equal(ev.data.message.text, "thanks");
  // joinRoom on a public group one is not in joins it: the others get onMemberJoin.
  const walker = newUser();
  const sw = await s.syarah(walker, { label: "walker" });
  const pub = (await no.ok("create_group", { name: "open", members: [member.id], public: true }))
    .room.id;
  const priv = (await no.ok("create_group", { name: "closed", members: [member.id] })).room.id;
  const jw = await okAck(sw, "joinRoom", { chatHeaderId: pub });
  assert.equal(jw.joined, true);
  assert.equal(jw.currentMember.userId, walker.id);
  assert.equal(jw.currentMember.role, "member");
  const seen = await waitFor(sm, "onMemberJoin", undefined, (x) => x.chatHeaderId === pub);
  assert.equal(seen.userId, walker.id);
  // A private group stays closed; its events never reach the outsider.
  assert.ok(await errAck(sw, "joinRoom", { chatHeaderId: priv }));
  await no.ok("send", { room: priv, text: "members only" });
  await messageIn(sm, priv);
  await quiet(sw, "message");
});

scenario("a block hides presence and stops direct messages both ways", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { label: "a" });
  const sb = await s.syarah(b, { label: "b" });
  const room = await directRoom(sa, b);
  const nb = await s.native(b);
  await nb.ok("friend", { user: a.id, action: "block" });
  const hi = { message: "hi", chatHeaderId: room, messageType: 0 };
  assert.match(await errAck(sa, "createMessage", hi), /block/);
  assert.match(await errAck(sb, "createMessage", hi), /block/);
  // The blocker sees the pair as blocked (3) everywhere.
  assert.equal((await okAck(sb, "joinRoom", { chatHeaderId: room })).friendshipStatus, 3);
  assert.equal((await okAck(sb, "getMyChats", {}))[0].friendshipStatus, 3);
  sb.disconnect();
  await nb.close();
  await quiet(sa, "clientStatus");
  await quiet(sa, "message");
});

scenario("friendshipStatus of joinRoom agrees with getMyChats for the blocked user", async (s) => {
  // README: "A block, by either user, ... shows the pair as blocked". getMyChats and
  // findAllChatHeaders do so for both users; joinRoom must give the same status for the pair.
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { label: "a" });
  await s.syarah(b, { label: "b" });
  const room = await directRoom(sa, b);
  const nb = await s.native(b);
  await nb.ok("friend", { user: a.id, action: "block" });
  const chats = await okAck(sa, "getMyChats", {});
  assert.equal(chats[0].friendshipStatus, 3);
  const headers = await okAck(sa, "findAllChatHeaders", {});
  assert.equal(headers.items[0].friendshipStatus, 3);
  const j = await okAck(sa, "joinRoom", { chatHeaderId: room });
  assert.equal(j.friendshipStatus, 3, "joinRoom disagrees with getMyChats");
});

scenario("getMyChats lists every direct chat, beyond one native page (200)", async (s) => {
  const me = newUser();
  const nm = await s.native(me);
  const peers = Array.from({ length: 205 }, () => newUser());
  // Peers exist once they have connected once.
  for (let i = 0; i < peers.length; i += 25) {
    const batch = await Promise.all(peers.slice(i, i + 25).map((p) => s.native(p)));
    await Promise.all(batch.map((n) => n.close()));
  }
  for (const p of peers) await nm.ok("open_direct", { user: p.id });
  const sm = await s.syarah(me);
  const chats = await okAck(sm, "getMyChats", {});
  assert.equal(chats.length, peers.length);
  assert.deepEqual(new Set(chats.map((c) => c.userId)), new Set(peers.map((p) => p.id)));
}, { timeout: 60000 });

// ------------------------------------------------------------------------------------------
// REST: getChatHeaderAsync
// ------------------------------------------------------------------------------------------

scenario("GET /api/chat/getChatHeaderAsync: joinRoom's room; 401 without token; 403", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const sa = await s.syarah(a);
  await s.syarah(b);
  await s.syarah(c);
  const get = (q, token) =>
    http(`${URL}/api/chat/getChatHeaderAsync?${new URLSearchParams(q)}`, {
      headers: token ? { Authorization: `Bearer ${token}` } : {},
    });
  // Before any joinRoom: it creates the room, which joinRoom then finds.
  let res = await get({ user1Id: a.id, user2Id: b.id }, a.token);
  assert.equal(res.status, 200);
  let body = await res.json();
  assert.deepEqual(Object.keys(body).sort(), ["data", "message", "success"]);
  assert.equal(body.success, true);
  assert.equal(body.message, null);
  assert.equal(typeof body.data.id, "number");
  const room = await directRoom(sa, b);
  assert.equal(body.data.id, room);
  // Either user may ask, in either order.
  res = await get({ user1Id: a.id, user2Id: b.id }, b.token);
  assert.equal((await res.json()).data.id, room);
  res = await get({ user1Id: b.id, user2Id: a.id }, a.token);
  assert.equal((await res.json()).data.id, room);
  // No token: 401 in the envelope.
  res = await get({ user1Id: a.id, user2Id: b.id });
  assert.equal(res.status, 401);
  body = await res.json();
  assert.equal(body.success, false);
  assert.equal(body.data, null);
  assert.equal(typeof body.message, "string");
  // Expired token: 401.
  res = await get({ user1Id: a.id, user2Id: b.id }, expiredToken(a.id));
  assert.equal(res.status, 401);
  // Neither of the pair: 403.
  res = await get({ user1Id: a.id, user2Id: b.id }, c.token);
  assert.equal(res.status, 403);
  body = await res.json();
  assert.equal(body.success, false);
  // A new pair is created on demand, and joinRoom agrees.
  res = await get({ user1Id: c.id, user2Id: a.id }, c.token);
  body = await res.json();
  assert.equal(res.status, 200);
  assert.equal(body.data.id, await directRoom(sa, c));
  // Missing parameters: 400.
  res = await get({ user1Id: a.id }, a.token);
  assert.equal(res.status, 400);
});

// ------------------------------------------------------------------------------------------
// Pending notifications, observed through the native protocol
// ------------------------------------------------------------------------------------------

/**
 * Connects `user` natively and returns the ids of the pending notifications it is handed
 * (waiting for `expected` of them, then watching for more), and disconnects.
 */
async function pendingOf(s, user, expected) {
  const n = await s.native(user, `native ${user.id} (pending check)`);
  const got = [];
  for (let i = 0; i < expected; i++) got.push(await waitFor(n, "notification"));
  got.push(...(await collect(n, "notification", QUIET)));
  await n.close();
  return got.map((f) => f.data.notification.message_id);
}

scenario("pending notifications are recorded only while the user is offline, viewing or not", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { label: "a" });
  let sb = await s.syarah(b, { label: "b" });
  const room = await directRoom(sa, b);
  // The room's pending notifications are stored just after a message is acknowledged and
  // published; a's next change of the room (an edit, sequenced after that) is the sign that
  // they are stored.
  const send = async (text) => {
    const m = await say(sa, room, text);
    await okAck(sa, "updateMessage", { id: m.id, message: text, chatHeaderId: room });
    return m;
  };
  // b online and viewing (joinRoom): nothing recorded.
  await okAck(sb, "joinRoom", { chatHeaderId: room });
  const m1 = await send("seen live");
  await messageIn(sb, room);
  assert.deepEqual(await pendingOf(s, b, 0), [], "viewing: no notification");
  // b online, not viewing (leaveRoom): still nothing recorded, b's socket got the message.
  // (Every socket receives the events of all its user's rooms, joined or not: see the
  // README. Not viewing decides push, issue 8.)
  await okAck(sb, "leaveRoom", { chatHeaderId: room });
  const m2 = await send("online, not viewing");
  await messageIn(sb, room);
  assert.deepEqual(await pendingOf(s, b, 0), [], "online: no notification");
  // b offline: recorded, and handed to the next device that shows them.
  sb.disconnect();
  await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id && !x.activeNow);
  const m3 = await send("while away");
  assert.deepEqual(await pendingOf(s, b, 1), [m3.id]);
  // Back online over Syarah, not joined: nothing recorded.
  sb = await s.syarah(b, { label: "b again" });
  await send("connected, not joined");
  await messageIn(sb, room);
  assert.deepEqual(await pendingOf(s, b, 0), []);
  assert.ok(m1.id < m2.id && m2.id < m3.id);
});

scenario("a Socket.IO connection leaves pending notifications for a device that shows them", async (s) => {
  const a = newUser();
  const b = newUser();
  const sa = await s.syarah(a, { label: "a" });
  const first = await s.syarah(b, { label: "b first" });
  const room = await directRoom(sa, b);
  first.disconnect();
  await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id && !x.activeNow);
  const m = await say(sa, room, "while b is away");
  await okAck(sa, "updateMessage", { id: m.id, message: "while b is away", chatHeaderId: room });
  // b connects over Syarah and NotifyHub (neither has an event for pending notifications),
  // then natively: the native device still gets the notification.
  const sb = await s.syarah(b, { label: "b syarah" });
  const nb = await s.notifyhub(b, ["websocket"], "b notifyhub");
  await okAck(sb, "getMyChats", {});
  sb.disconnect();
  nb.disconnect();
  await waitFor(sa, "clientStatus", undefined, (x) => x.userId === b.id && !x.activeNow);
  assert.deepEqual(await pendingOf(s, b, 1), [m.id]);
});

// ------------------------------------------------------------------------------------------
// Privacy
// ------------------------------------------------------------------------------------------

scenario("a third user receives nothing and can touch nothing of a pair's room", async (s) => {
  const { sa, sb, room } = await pair(s);
  const c = newUser();
  const sc = await s.syarah(c, { label: "c" });
  const cp = await s.syarah(c, { transports: ["polling"], label: "c polling" });
  const m = await say(sa, room, "private");
  await messageIn(sb, room);
  await messageIn(sa, room);
  sa.emit("roomTyping", { isTyping: true, chatHeaderId: room });
  await waitFor(sb, "typing");
  await okAck(sa, "updateMessage", { id: m.id, message: "private!", chatHeaderId: room });
  await waitFor(sb, "messageUpdated");
  await okAck(sb, "readMessage", { chatHeaderId: room });
  await waitFor(sa, "messageHasBeenRead");
  await okAck(sa, "removeMessage", { id: m.id, chatHeaderId: room });
  await waitFor(sb, "messageDeleted");
  await quiet(sc);
  await quiet(cp);
  // c cannot read, join, write, or act on the room.
  for (const [event, data] of [
    ["joinRoom", { chatHeaderId: room }],
    ["findAllMessages", { chatHeaderId: room }],
    ["createMessage", { message: "intrude", chatHeaderId: room, messageType: 0 }],
    ["updateMessage", { id: m.id, message: "x", chatHeaderId: room }],
    ["removeMessage", { id: m.id, chatHeaderId: room }],
    ["readMessage", { chatHeaderId: room }],
    ["roomTyping", { isTyping: true, chatHeaderId: room }],
  ]) {
    assert.ok(await errAck(sc, event, data), event);
  }
  assert.deepEqual(await okAck(sc, "getMyChats", {}), []);
  await quiet(sa, "message");
  await quiet(sb, "typing");
  await quiet(sa, "clientStatus");
  // c's own sockets saw nothing meanwhile either.
  await quiet(sc);
  await quiet(cp);
});
