// The web console (/console) in headless Chromium, run by gateway/tests/console.rs.
//
// Debian's /usr/bin/chromium is driven by npm playwright-core (never `npx playwright install`)
// with a fresh user-data dir. The Rust harness starts a real Palaver and sets:
//   PALAVER_URL          http://127.0.0.1:<port>
//   PALAVER_JWT_SECRET   the server's HS256 secret (tokens for the `ws` client are minted here)
//   PALAVER_ADMIN_TOKEN  the server's admin token
//   PALAVER_SCREENSHOT   where to keep the screenshot (target/test-artifacts/console.png)
//
// Every wait is bounded; the browser and sockets are closed when the test ends.

import { test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import WebSocket from "ws";

const URL = process.env.PALAVER_URL;
const SECRET = process.env.PALAVER_JWT_SECRET;
const ADMIN = process.env.PALAVER_ADMIN_TOKEN;
const SHOT = process.env.PALAVER_SCREENSHOT;
if (!URL || !SECRET || !ADMIN || !SHOT) {
  throw new Error("PALAVER_URL, PALAVER_JWT_SECRET, PALAVER_ADMIN_TOKEN and PALAVER_SCREENSHOT must be set (run via cargo test)");
}
const CHROMIUM = "/usr/bin/chromium";
const WAIT = 10_000;

const b64url = (x) => Buffer.from(x).toString("base64url");
function mint(sub) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 3600, name: `User ${sub}` }));
  const sig = crypto.createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A native-protocol client: requests with replies, and a queue of events. */
async function nativeClient(sub) {
  const ws = new WebSocket(`${URL.replace(/^http/, "ws")}/ws?token=${mint(sub)}`);
  const replies = new Map();
  const events = [];
  const waiters = [];
  // Listening before `open` resolves: frames sent at once can be emitted before it does.
  ws.on("message", (raw) => {
    const f = JSON.parse(raw.toString());
    if (f.type === "reply") {
      replies.get(f.id)?.(f);
      replies.delete(f.id);
    } else {
      events.push(f);
      for (const w of waiters.splice(0)) w();
    }
  });
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  let next = 0;
  return {
    ws,
    request(op, args) {
      const id = `c${++next}`;
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no reply to ${op}`)), WAIT);
        replies.set(id, (f) => {
          clearTimeout(t);
          if (f.ok) resolve(f.data);
          else reject(new Error(`${op}: ${f.error.code} ${f.error.message}`));
        });
        ws.send(JSON.stringify({ id, op, ...args }));
      });
    },
    /** The first event (kept or new) matching `pred`. */
    async event(pred, what) {
      const deadline = Date.now() + WAIT;
      for (;;) {
        const i = events.findIndex(pred);
        if (i >= 0) return events.splice(i, 1)[0];
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no ${what} event; got ${JSON.stringify(events)}`);
        await new Promise((resolve) => {
          const t = setTimeout(resolve, left);
          waiters.push(() => { clearTimeout(t); resolve(); });
        });
      }
    },
  };
}

test("the console: login, live sessions, chat box to a WebSocket client", async (t) => {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "palaver-console-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1280, height: 900 },
  });
  const sockets = [];
  t.after(async () => {
    for (const s of sockets) s.ws.close();
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(WAIT);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // The refused login is an expected 401 in the console; anything else is a problem.
    if (m.type() === "error" && !/401/.test(m.text())) problems.push(`console: ${m.text()}`);
  });

  await page.goto(`${URL}/console`);
  assert.equal(await page.title(), "Palaver console");
  assert.equal(await page.isVisible("#app"), false);

  // A wrong admin token is refused in the page and not kept.
  await page.fill("#admin-token", "not-the-admin-token-000000");
  await page.click("#login");
  await page.waitForFunction(() => document.getElementById("login-error").textContent !== "");
  assert.equal(await page.textContent("#login-error"), "Wrong admin token.");
  assert.equal(await page.isVisible("#app"), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);

  // The right one opens the panels.
  await page.fill("#admin-token", ADMIN);
  await page.click("#login");
  await page.waitForSelector("#app", { state: "visible" });
  assert.equal(await page.textContent("#sessions-total"), "0");
  assert.match(await page.textContent("#nodes-body"), /local\s*100\.0%/);

  // A native WebSocket client (user X) appears in the sessions-by-dialect panel.
  const x = await nativeClient("901");
  sockets.push(x);
  await page.waitForFunction(
    () => document.querySelector('#sessions-body tr[data-dialect="native"] td.num')?.textContent === "1",
    null,
    { timeout: WAIT },
  );
  assert.equal(await page.textContent("#users-online"), "1");

  // The chat box connects as user Y with a token the gateway mints for the admin.
  await page.fill("#chat-user", "902");
  await page.click("#chat-connect");
  await page.waitForFunction(() => document.getElementById("chat-status").textContent === "connected as 902");
  await page.waitForFunction(
    () => document.querySelector('#sessions-body tr[data-dialect="native"] td.num')?.textContent === "2",
  );

  // X creates a group with Y; the page learns of it and offers it in the room list.
  const { room } = await x.request("create_group", { name: "console <b>test</b>", members: ["902"] });
  await page.waitForSelector(`#chat-rooms option[value="${room.id}"]`, { state: "attached" });
  await page.selectOption("#chat-rooms", String(room.id));
  assert.equal(await page.inputValue("#chat-room"), String(room.id));
  // The group's name is shown as text, not markup.
  assert.equal(await page.textContent(`#chat-rooms option[value="${room.id}"]`), `${room.id} · console <b>test</b>`);

  // Y sends from the page; X's WebSocket client receives it.
  await page.fill("#chat-text", "hello from the console");
  await page.click("#chat-send");
  const ev = await x.event((e) => e.event === "message", "message");
  assert.equal(ev.room, room.id);
  assert.equal(ev.data.message.sender, "902");
  assert.equal(ev.data.message.text, "hello from the console");
  await page.waitForFunction(() => /902: hello from the console/.test(document.getElementById("chat-log").textContent));

  // Markup in a message is shown as text.
  const evil = '<img src=x id="injected">';
  await x.request("send", { room: room.id, text: evil });
  await page.waitForFunction((s) => document.getElementById("chat-log").textContent.includes(s), evil);
  assert.equal(await page.$("#injected"), null);

  // The room shows among the busiest; a refused op shows among recent errors.
  await page.fill("#chat-room", "123456");
  await page.fill("#chat-text", "nowhere");
  await page.click("#chat-send");
  await page.waitForFunction(() => /send: not_(member|found)/.test(document.getElementById("chat-log").textContent));
  await page.waitForSelector(`#rooms-body tr[data-room="${room.id}"]`);
  assert.equal(await page.textContent(`#rooms-body tr[data-room="${room.id}"] td.num`), "2");
  await page.waitForFunction(() => /not_(member|found)/.test(document.getElementById("errors-body").textContent));
  assert.match(await page.textContent("#errors-body"), /native\s*send\s*not_(member|found)\s*902/);

  fs.mkdirSync(path.dirname(SHOT), { recursive: true });
  await page.screenshot({ path: SHOT, fullPage: true });
  assert.deepEqual(problems, []);

  // Logging out forgets the token.
  await page.click("#logout");
  await page.waitForSelector("#login-box", { state: "visible" });
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
});
