// Interop across every dialect: native (/ws), Socket.IO Syarah (/) and NotifyHub (/chats),
// Phoenix Channels (/socket/websocket), type-tagged JSON (/rt/chat) and event/data JSON
// (/events and the *.php REST). A message sent in each dialect reaches the users of every other
// dialect, and all of them read the same history: same ids, same order.
//
// Run by gateway/tests/interop.rs against a real Palaver.

import assert from "node:assert/strict";
import { Socket } from "phoenix";
import WebSocket from "ws";
import { JsonSocket, WS_URL, URL, within, WAIT } from "./lib.mjs";
import { newUser, okAck, say, scenario, waitFor } from "../socketio/lib.mjs";

// ------------------------------------------------------------------------------------------
// One client per dialect, each normalising what it receives to {id, text, sender, room}
// ------------------------------------------------------------------------------------------

/** A Phoenix socket for `user`, connected. */
async function phoenix(s, user) {
  const socket = new Socket(`${WS_URL}/socket`, {
    params: { token: user.token, device_unique_id: `dev-${user.id}`, preferred_language: "en" },
    transport: WebSocket,
    reconnectAfterMs: () => 60000,
    rejoinAfterMs: () => 60000,
    heartbeatIntervalMs: 30000,
  });
  s.track({ disconnect: () => socket.disconnect() });
  await within(
    new Promise((resolve, reject) => {
      socket.onOpen(resolve);
      socket.onError(reject);
      socket.connect();
    }),
    WAIT,
    `phoenix ${user.id} connect`,
  );
  return socket;
}

/** Joins `topic` on a Phoenix socket; resolves the channel and the payloads of `events`. */
async function phoenixJoin(socket, topic, events) {
  const channel = socket.channel(topic, {});
  const got = Object.fromEntries(events.map((e) => [e, []]));
  for (const e of events) channel.on(e, (p) => got[e].push(p));
  await within(
    new Promise((resolve, reject) => {
      channel.join().receive("ok", resolve).receive("error", (r) => reject(new Error(JSON.stringify(r))));
    }),
    WAIT,
    `join ${topic}`,
  );
  return { channel, got };
}

/** Waits until `list` holds `n` items; resolves them. */
async function until(list, n, what) {
  await within(
    (async () => {
      while (list.length < n) await new Promise((r) => setTimeout(r, 10));
    })(),
    WAIT,
    what,
  );
  return list.slice(0, n);
}

/** A type-tagged `/rt/chat` socket for `user`, authenticated. */
async function rtChat(s, user) {
  const sock = await JsonSocket.open(`${WS_URL}/rt/chat`);
  s.track({ disconnect: () => sock.close() });
  sock.send({ type: "AUTH", token: user.token });
  const ok = await sock.next((m) => m.type === "SUCCESS" || m.type === "ERROR", WAIT, "rt AUTH");
  assert.equal(ok.type, "SUCCESS", JSON.stringify(ok));
  return sock;
}

/** An event/data `/events` socket for `user`, connected. */
async function events(s, user) {
  const q = `user_id=${encodeURIComponent(user.id)}&username=${user.username}&name=x&token=${user.token}`;
  const sock = await JsonSocket.open(`${WS_URL}/events?${q}`);
  s.track({ disconnect: () => sock.close() });
  await sock.next((m) => m.event === "chat:connected", WAIT, "chat:connected");
  return sock;
}

/** `POST /send_chat_message.php` as `user` (JSON body). */
async function phpSend(user, receiver, message) {
  const res = await fetch(`${URL}/send_chat_message.php`, {
    method: "POST",
    headers: { authorization: `Bearer ${user.token}`, "content-type": "application/json" },
    body: JSON.stringify({ sender_id: user.num, receiver_id: receiver.num, message }),
    signal: AbortSignal.timeout(WAIT),
  });
  const body = await res.json();
  assert.equal(res.status, 200, JSON.stringify(body));
  assert.equal(body.status, "success");
  return body.data;
}

// ------------------------------------------------------------------------------------------

scenario(
  "a group message sent in each dialect reaches every other dialect, and all read one history",
  async (s) => {
    const [a, b, c, d, e] = [newUser(), newUser(), newUser(), newUser(), newUser()];
    // a: native, b: Phoenix, c: type-tagged, d: event/data, e: Syarah.
    const na = await s.native(a, "a native");
    const pb = await phoenix(s, b);
    const rc = await rtChat(s, c);
    const ed = await events(s, d);
    const se = await s.syarah(e, { label: "e syarah" });
    const created = await na.ok("create_group", {
      name: "all dialects",
      members: [b.id, c.id, d.id, e.id],
    });
    const room = created.room.id;
    const { channel, got } = await phoenixJoin(pb, `chat:${room}`, ["receive_message", "message_sent"]);

    // One message from each dialect that can post to a group, in turn (each acknowledged
    // before the next, so the room's order is the sending order).
    const texts = [];
    const sent = [];
    texts.push("from native");
    sent.push((await na.ok("send", { room, text: "from native" })).message.id);
    texts.push("from phoenix");
    channel.push("send_message", { content: "from phoenix", mobile_ref_id: "m-1" });
    const [ack] = await until(got.message_sent, 1, "message_sent");
    assert.deepEqual(
      { ...ack },
      { mobile_ref_id: "m-1", status: "sent", chat_id: String(room) },
    );
    texts.push("from rt");
    rc.send({ type: "GROUP_CHAT", from: c.username, groupId: String(room), content: "from rt" });
    const rtEcho = await rc.next(
      (m) => m.type === "GROUP_CHAT" && m.content === "from rt",
      WAIT,
      "rt echo",
    );
    texts.push("from syarah");
    const sy = await say(se, room, "from syarah");
    sent.push(Number(rtEcho.messageId), sy.id);

    // Every dialect shows every message (Phoenix: the others'; the rest: all four).
    const nativeSeen = [];
    for (let i = 0; i < 4; i++) {
      const f = await waitFor(na, "message", undefined, (x) => x.room === room);
      nativeSeen.push(f.data.message.text);
    }
    assert.deepEqual(nativeSeen, texts);
    const phx = await until(got.receive_message, 3, "phoenix receive_message");
    assert.deepEqual(
      phx.map((p) => p.content),
      texts.filter((t) => t !== "from phoenix"),
    );
    for (const p of phx) assert.equal(p.chat_id, String(room));
    const rtSeen = [rtEcho.content];
    for (let i = 0; i < 3; i++) {
      rtSeen.push((await rc.next((m) => m.type === "GROUP_CHAT", WAIT, "rt GROUP_CHAT")).content);
    }
    assert.deepEqual(rtSeen.sort(), [...texts].sort());
    const evSeen = [];
    for (let i = 0; i < 4; i++) {
      const m = await ed.next((x) => x.event === "chat:message", WAIT, "events chat:message");
      assert.equal(m.data.room_id, room);
      assert.equal(m.data.receiver_id, null);
      evSeen.push(m.data.message);
    }
    assert.deepEqual(evSeen, texts);
    const sySeen = [];
    for (let i = 0; i < 4; i++) {
      const ev = await waitFor(se, "message", undefined, (x) => x.chatHeaderId === room);
      sySeen.push(ev.chatMessage.message);
    }
    assert.deepEqual(sySeen, texts);

    // One history, whoever reads it: same ids, same order.
    const native = (await na.ok("history", { room })).messages.reverse();
    assert.deepEqual(
      native.map((m) => m.text),
      texts,
    );
    const ids = native.map((m) => m.id);
    rc.send({ type: "GET_GROUP_CHAT_HISTORY", groupId: String(room) });
    const rh = await rc.next((m) => m.type === "GROUP_CHAT_HISTORY", WAIT, "rt history");
    assert.deepEqual(
      rh.messages.map((m) => Number(m.messageId)),
      ids,
    );
    assert.deepEqual(
      rh.messages.map((m) => m.content),
      texts,
    );
    const sh = await okAck(se, "findAllMessages", { chatHeaderId: room });
    const shItems = Array.isArray(sh) ? sh : sh.items;
    assert.deepEqual(
      [...shItems].map((m) => m.id).sort((x, y) => x - y),
      ids,
    );
  },
);

scenario(
  "direct conversations cross event/data, NotifyHub, type-tagged and Phoenix, with one history",
  async (s) => {
    const [b, c, d, f] = [newUser(), newUser(), newUser(), newUser()];
    // d: event/data (REST sends, /events receives); f: NotifyHub; c: type-tagged; b: Phoenix.
    const ed = await events(s, d);
    const nf = await s.notifyhub(f, ["websocket"], "f notifyhub");
    const rc = await rtChat(s, c);
    const pb = await phoenix(s, b);
    const notes = await phoenixJoin(pb, `notifications:${b.id}`, ["new_notification"]);

    // event/data -> NotifyHub, and back.
    const m1 = await phpSend(d, f, "hi f, from php");
    const atF = await waitFor(nf, "message");
    assert.equal(atF.chat_message, "hi f, from php");
    assert.equal(atF.id, String(m1.message_id));
    nf.emit("send_message", { receiver_id: d.num, message: "hi d, from notifyhub" });
    const atD = await ed.next(
      (x) => x.event === "chat:message" && x.data.message === "hi d, from notifyhub",
      WAIT,
      "d gets f's message",
    );
    assert.equal(atD.data.sender_id, f.num);
    assert.equal(atD.data.receiver_id, d.num);
    assert.equal(atD.data.sender.username, f.username);

    // type-tagged -> event/data, and back.
    rc.send({ type: "ONE_TO_ONE_CHAT", from: c.username, to: d.username, content: "hi d, from rt" });
    const atD2 = await ed.next(
      (x) => x.event === "chat:message" && x.data.message === "hi d, from rt",
      WAIT,
      "d gets c's message",
    );
    assert.equal(atD2.data.sender_id, c.num);
    await phpSend(d, c, "hi c, from php");
    const atC = await rc.next(
      (m) => m.type === "ONE_TO_ONE_CHAT" && m.content === "hi c, from php",
      WAIT,
      "c gets d's message",
    );
    assert.equal(atC.from, d.username);
    assert.equal(atC.to, c.username);

    // event/data -> Phoenix (a live notification: b is not in the chat's channel), then b
    // joins the chat's channel and answers.
    const m3 = await phpSend(d, b, "hi b, from php");
    const [n] = await until(notes.got.new_notification, 1, "b's new_notification");
    assert.equal(n.content, "hi b, from php");
    assert.equal(n.sender_id, d.id);
    const chat = await phoenixJoin(pb, `chat:${n.chat_id}`, ["message_sent"]);
    chat.channel.push("send_message", { content: "hi d, from phoenix", mobile_ref_id: "r1" });
    await until(chat.got.message_sent, 1, "message_sent");
    const atD3 = await ed.next(
      (x) => x.event === "chat:message" && x.data.message === "hi d, from phoenix",
      WAIT,
      "d gets b's message",
    );
    assert.equal(atD3.data.sender_id, b.num);

    // One history per pair, whoever reads it.
    const hist = async (user, other) => {
      const res = await fetch(
        `${URL}/get_conversation_messages.php?user_id=${user.num}&other_user_id=${other.num}&token=${user.token}`,
        { signal: AbortSignal.timeout(WAIT) },
      );
      const body = await res.json();
      assert.equal(res.status, 200, JSON.stringify(body));
      return body.data.messages.map((m) => m.message_id).sort((x, y) => x - y);
    };
    const dWithB = await hist(d, b);
    assert.equal(dWithB.length, 2);
    assert.ok(dWithB.includes(m3.message_id));
    rc.send({ type: "GET_ONE_TO_ONE_HISTORY", from: c.username, to: d.username });
    const ch = await rc.next((m) => m.type === "ONE_TO_ONE_CHAT_HISTORY", WAIT, "c's history");
    assert.deepEqual(
      ch.messages.map((m) => Number(m.messageId)),
      await hist(d, c),
    );
    assert.deepEqual(
      ch.messages.map((m) => m.content),
      ["hi d, from rt", "hi c, from php"],
    );
    const dWithF = await hist(d, f);
    assert.equal(dWithF.length, 2);
    assert.equal(dWithF[0], m1.message_id);
  },
);
