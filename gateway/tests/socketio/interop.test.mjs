// Interop: one direct conversation seen through NotifyHub, Syarah and the native protocol at
// once. A talks through NotifyHub (and natively), B through Syarah (and natively); everyone
// sees the same messages with the same ids in the same order, and a third user connected in
// every dialect sees nothing.

import assert from "node:assert/strict";
import {
  QUIET,
  SQL_DATETIME,
  ack,
  directRoom,
  newUser,
  okAck,
  quiet,
  say,
  scenario,
  waitFor,
} from "./lib.mjs";

/** The next `n` messages of `room` as each dialect shows them, normalised to {id, text, sender}. */
async function nextMessages(kind, sock, room, n, pair) {
  const out = [];
  for (let i = 0; i < n; i++) {
    if (kind === "notifyhub") {
      const m = await waitFor(sock, "message");
      assert.equal(typeof m.id, "string");
      assert.equal(typeof m.sender_id, "string");
      assert.match(m.created_at, SQL_DATETIME);
      // The receiver is the other one of the pair, as a number.
      const other = m.sender_id === pair[0].id ? pair[1] : pair[0];
      assert.equal(m.receiver_id, other.num);
      out.push({ id: m.id, text: m.chat_message, sender: m.sender_id });
    } else if (kind === "syarah") {
      const ev = await waitFor(sock, "message", undefined, (e) => e.chatHeaderId === room);
      const m = ev.chatMessage;
      out.push({ id: String(m.id), text: m.message, sender: m.userId });
    } else {
      const f = await waitFor(sock, "message", undefined, (e) => e.room === room);
      const m = f.data.message;
      assert.equal(m.room, room);
      out.push({ id: String(m.id), text: m.text, sender: m.sender });
    }
  }
  return out;
}

async function everyoneSees(observers, room, n, pair) {
  const seen = [];
  for (const [kind, sock] of observers) {
    seen.push([sock.label, await nextMessages(kind, sock, room, n, pair)]);
  }
  const [, first] = seen[0];
  for (const [label, got] of seen) assert.deepEqual(got, first, `${label} saw another stream`);
  // Ids are distinct and increase.
  const ids = first.map((m) => BigInt(m.id));
  for (let i = 1; i < ids.length; i++) assert.ok(ids[i] > ids[i - 1], "ids increase");
  return first;
}

scenario("NotifyHub, Syarah and native see one conversation: same ids, same order", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const nhA = await s.notifyhub(a, ["websocket"], "A notifyhub");
  const natA = await s.native(a, "A native");
  const syB = await s.syarah(b, { transports: ["polling"], label: "B syarah" });
  const natB = await s.native(b, "B native");
  // The bystander, in every dialect.
  const nhC = await s.notifyhub(c, ["polling"], "C notifyhub");
  const syC = await s.syarah(c, { label: "C syarah" });
  const natC = await s.native(c, "C native");

  const room = await directRoom(syB, a);
  const opened = await natA.ok("open_direct", { user: b.id });
  assert.equal(opened.room.id, room, "native and Syarah name the same direct room");
  assert.equal(opened.created, false);

  // One at a time, from each dialect in turn.
  const sent = [];
  const viaNotifyHub = async (text) => {
    const m = await ack(nhA, "send_message", { message: text, receiver_id: b.num });
    sent.push(m.id);
  };
  const viaSyarah = async (text) => sent.push(String((await say(syB, room, text)).id));
  const viaNative = async (who, text) =>
    sent.push(String((await who.ok("send", { room, text })).message.id));
  await viaNotifyHub("1 from A via NotifyHub");
  await viaSyarah("2 from B via Syarah");
  await viaNative(natB, "3 from B natively");
  await viaNative(natA, "4 from A natively");
  await viaNotifyHub("5 from A via NotifyHub");
  await viaSyarah("6 from B via Syarah");
  const observers = [
    ["notifyhub", nhA],
    ["syarah", syB],
    ["native", natA],
    ["native", natB],
  ];
  const stream = await everyoneSees(observers, room, 6, [a, b]);
  assert.deepEqual(stream.map((m) => m.id), sent);
  assert.deepEqual(
    stream.map((m) => [m.sender, m.text.split(" ")[0]]),
    [
      [a.id, "1"],
      [b.id, "2"],
      [b.id, "3"],
      [a.id, "4"],
      [a.id, "5"],
      [b.id, "6"],
    ],
  );

  // All at once: whatever order the room gives them, everyone sees that one order.
  const burst = [];
  for (let i = 0; i < 4; i++) {
    nhA.emit("send_message", { message: `burst nh ${i}`, receiver_id: b.num });
    syB.emit("createMessage", { message: `burst sy ${i}`, chatHeaderId: room, messageType: 0 });
    burst.push(natA.ok("send", { room, text: `burst natA ${i}` }));
    burst.push(natB.ok("send", { room, text: `burst natB ${i}` }));
  }
  await Promise.all(burst);
  const burstStream = await everyoneSees(observers, room, 16, [a, b]);
  // Each client's own sends keep their order.
  for (const prefix of ["burst nh", "burst sy", "burst natA", "burst natB"]) {
    const mine = burstStream.filter((m) => m.text.startsWith(`${prefix} `)).map((m) => m.text);
    assert.deepEqual(mine, [0, 1, 2, 3].map((i) => `${prefix} ${i}`));
  }

  // History agrees: Syarah (oldest first) and native (newest first).
  const all = [...stream, ...burstStream].map((m) => m.id);
  const page = await okAck(syB, "findAllMessages", { chatHeaderId: room, maxResultCount: 50 });
  assert.deepEqual(page.items.map((m) => String(m.id)), all);
  const h = await natB.ok("history", { room, limit: 50 });
  assert.deepEqual(h.messages.map((m) => String(m.id)).reverse(), all);

  // Nothing more for the pair, nothing at all for C in any dialect.
  for (const sock of [nhA, syB, natA, natB]) await quiet(sock, "message", 0);
  await quiet(nhC, undefined, QUIET);
  await quiet(syC, undefined, 0);
  await quiet(natC, undefined, 0);
});

scenario("reads, edits and deletions cross between Syarah and native", async (s) => {
  const a = newUser();
  const b = newUser();
  const natA = await s.native(a, "A native");
  const syB = await s.syarah(b, { label: "B syarah" });
  const room = await directRoom(syB, a);
  const m = (await natA.ok("send", { room, text: "native text" })).message;
  await waitFor(syB, "message");
  // Syarah reads -> native `read`; native edits/deletes -> Syarah events.
  await okAck(syB, "readMessage", { chatHeaderId: room });
  const r = await waitFor(natA, "read", undefined, (f) => f.data.user === b.id);
  assert.equal(r.data.room, room);
  assert.equal(r.data.message_id, m.id);
  await natA.ok("edit", { room, message: m.id, text: "edited natively" });
  const up = await waitFor(syB, "messageUpdated");
  assert.equal(up.id, m.id);
  assert.equal(up.message, "edited natively");
  await natA.ok("delete", { room, messages: [m.id] });
  assert.equal(await waitFor(syB, "messageDeleted"), m.id);
  // Native read -> Syarah messageHasBeenRead; Syarah typing -> native typing.
  const mine = await say(syB, room, "from syarah");
  await natA.ok("read", { room, message: mine.id });
  assert.equal(await waitFor(syB, "messageHasBeenRead"), room);
  syB.emit("roomTyping", { isTyping: true, name: "B", chatHeaderId: room });
  const t = await waitFor(natA, "typing", undefined, (f) => f.data.user === b.id);
  assert.equal(t.data.typing, true);
  assert.equal(t.room, room);
});

scenario("NotifyHub shows direct conversations only: group messages stay out", async (s) => {
  const a = newUser();
  const b = newUser();
  const nhA = await s.notifyhub(a, ["websocket"], "A notifyhub");
  const natA = await s.native(a, "A native");
  const syB = await s.syarah(b, { label: "B syarah" });
  const g = await natA.ok("create_group", { name: "g", members: [b.id] });
  const sent = await say(syB, g.room.id, "in the group");
  const ev = await waitFor(natA, "message", undefined, (f) => f.room === g.room.id);
  assert.equal(ev.data.message.id, sent.id);
  await quiet(nhA, "message");
  // The pair's direct room still reaches NotifyHub.
  const room = await directRoom(syB, a);
  const d = await say(syB, room, "direct");
  const m = await waitFor(nhA, "message");
  assert.equal(m.id, String(d.id));
  assert.equal(m.receiver_id, a.num);
  assert.equal(m.sender_id, b.id);
});
