// NotifyHub (seed 000): namespace `/chats`, token in query `access_token`.
// connect_error strings, send_message validation through the `error` event, the `message`
// payload's fields and JSON types, delivery to every session of the pair and to nobody else,
// on both transports.

import assert from "node:assert/strict";
import {
  SQL_DATETIME,
  TRANSPORTS,
  collect,
  connectError,
  expiredToken,
  newUser,
  quiet,
  scenario,
  waitFor,
  wrongSignatureToken,
  ack,
} from "./lib.mjs";

/** Asserts the seed's `message` payload, field by field, with JSON types. */
function assertMessage(m, { sender, receiver, text }) {
  assert.deepEqual(Object.keys(m).sort(), [
    "admin_status",
    "chat_message",
    "created_at",
    "flag",
    "id",
    "receiver_id",
    "receiver_status",
    "sender_id",
  ]);
  assert.equal(m.sender_id, sender.id);
  assert.equal(typeof m.sender_id, "string");
  assert.equal(m.receiver_id, receiver.num);
  assert.equal(typeof m.receiver_id, "number");
  assert.equal(m.chat_message, text);
  for (const k of ["receiver_status", "admin_status", "flag"]) {
    assert.equal(typeof m[k], "number", k);
    assert.equal(m[k], 1, k);
  }
  assert.match(m.created_at, SQL_DATETIME);
  // UTC: within a minute of now.
  const t = Date.parse(`${m.created_at.replace(" ", "T")}Z`);
  assert.ok(Math.abs(Date.now() - t) < 60_000, `created_at ${m.created_at} is not UTC now`);
  assert.equal(typeof m.id, "string");
  assert.match(m.id, /^[1-9]\d*$/);
}

for (const transports of TRANSPORTS) {
  const tr = transports[0];

  scenario(`[${tr}] connect_error: not found, invalid, expired`, async (s) => {
    const u = newUser();
    const cases = [
      [undefined, "access token not found"],
      ["", "access token not found"],
      ["not.a.jwt", "access token is invalid"],
      [wrongSignatureToken(u.id), "access token is invalid"],
      [expiredToken(u.id), "access token has expired"],
    ];
    for (const [token, expected] of cases) {
      const sock = await s.notifyhubRaw(token, transports, `bad token ${expected}`);
      assert.equal(await connectError(sock), expected, `token ${JSON.stringify(token)}`);
      assert.equal(sock.connected, false);
    }
    // A good token connects.
    const ok = await s.notifyhub(u, transports);
    assert.equal(ok.connected, true);
  });

  scenario(`[${tr}] send_message validation errors via the error event`, async (s) => {
    const a = newUser();
    const b = newUser();
    const sa = await s.notifyhub(a, transports);
    await s.notifyhub(b, transports);
    const never = newUser(); // never connected: no profile
    const cases = [
      [{ receiver_id: b.num }, "message property must be defined"],
      [{ message: "", receiver_id: b.num }, "message must have a value"],
      [{ message: null, receiver_id: b.num }, "message must have a value"],
      [{ message: "hi" }, "receiver_id property must be defined"],
      [{ message: "hi", receiver_id: String(b.num) }, "receiver_id must be a number"],
      [{ message: "hi", receiver_id: "abc" }, "receiver_id must be a number"],
      [{ message: "hi", receiver_id: never.num }, "receiver profile not found"],
    ];
    for (const [payload, expected] of cases) {
      sa.emit("send_message", payload);
      assert.equal(await waitFor(sa, "error"), expected, JSON.stringify(payload));
    }
    // Nothing was sent by any of them.
    await quiet(sa, "message");
    // The checks run in the seed's order: the first missing field wins; no payload at all (or
    // not an object) has no message property either.
    sa.emit("send_message", {});
    assert.equal(await waitFor(sa, "error"), "message property must be defined");
    sa.emit("send_message");
    assert.equal(await waitFor(sa, "error"), "message property must be defined");
    sa.emit("send_message", "How are you?");
    assert.equal(await waitFor(sa, "error"), "message property must be defined");
    sa.emit("send_message", { message: "" });
    assert.equal(await waitFor(sa, "error"), "message must have a value");
    // With an ack callback the same error comes back in the ack.
    assert.deepEqual(await ack(sa, "send_message", { message: "hi" }), {
      error: "receiver_id property must be defined",
    });
    await quiet(sa);
  });

  scenario(`[${tr}] message: seed fields and JSON types, to the pair only`, async (s) => {
    const a = newUser();
    const b = newUser();
    const c = newUser();
    const sa = await s.notifyhub(a, transports, "a");
    const sb = await s.notifyhub(b, transports, "b");
    const sc = await s.notifyhub(c, transports, "c (bystander)");
    sa.emit("send_message", { message: "How are you?", receiver_id: b.num });
    const atB = await waitFor(sb, "message");
    assertMessage(atB, { sender: a, receiver: b, text: "How are you?" });
    const atA = await waitFor(sa, "message");
    assert.deepEqual(atA, atB);
    // And back: the pair's one conversation.
    sb.emit("send_message", { message: "Fine.", receiver_id: a.num });
    const back = await waitFor(sa, "message");
    assertMessage(back, { sender: b, receiver: a, text: "Fine." });
    assert.deepEqual(await waitFor(sb, "message"), back);
    assert.ok(BigInt(back.id) > BigInt(atB.id), "ids increase within the conversation");
    // The bystander, connected to the same namespace, saw nothing at all.
    await quiet(sc);
    await quiet(sa);
    await quiet(sb);
  });
}

scenario("every session of sender and receiver (mixed transports), nobody else", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const a1 = await s.notifyhub(a, ["websocket"], "a1 ws");
  const a2 = await s.notifyhub(a, ["polling"], "a2 polling");
  const b1 = await s.notifyhub(b, ["polling"], "b1 polling");
  const b2 = await s.notifyhub(b, ["websocket"], "b2 ws");
  const c1 = await s.notifyhub(c, ["websocket"], "c1 ws");
  const c2 = await s.notifyhub(c, ["polling"], "c2 polling");
  // With an ack: the ack carries the sent message too.
  const acked = await ack(a1, "send_message", { message: "to all of b", receiver_id: b.num });
  assertMessage(acked, { sender: a, receiver: b, text: "to all of b" });
  for (const sock of [a1, a2, b1, b2]) {
    assert.deepEqual(await waitFor(sock, "message"), acked, sock.label);
  }
  // From the receiver's polling session back: everyone of the pair again.
  b1.emit("send_message", { message: "from b1", receiver_id: a.num });
  const got = [];
  for (const sock of [a1, a2, b1, b2]) got.push(await waitFor(sock, "message"));
  assertMessage(got[0], { sender: b, receiver: a, text: "from b1" });
  for (const g of got) assert.deepEqual(g, got[0]);
  // Exactly once each, and nothing for c on either transport.
  for (const sock of [a1, a2, b1, b2]) assert.deepEqual(await collect(sock, "message", 0), []);
  await quiet(c1);
  await quiet(c2);
});

scenario("a third user's conversation stays private from the first pair", async (s) => {
  const a = newUser();
  const b = newUser();
  const c = newUser();
  const sa = await s.notifyhub(a, ["websocket"], "a");
  const sb = await s.notifyhub(b, ["polling"], "b");
  const sc = await s.notifyhub(c, ["websocket"], "c");
  // c talks to a: b (not part of it) sees nothing.
  sc.emit("send_message", { message: "psst", receiver_id: a.num });
  const m = await waitFor(sa, "message");
  assertMessage(m, { sender: c, receiver: a, text: "psst" });
  assert.deepEqual(await waitFor(sc, "message"), m);
  await quiet(sb);
  // And a to b: c sees nothing of it.
  sa.emit("send_message", { message: "hi b", receiver_id: b.num });
  await waitFor(sb, "message");
  await quiet(sc, "message");
});
