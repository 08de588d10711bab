// The chat page (static/) in a real browser: Debian's Chromium driven by playwright-core
// (which never downloads a browser). The page connects over each transport and shows its
// state, transport and instance; two pages on different transports chat both ways, see each
// other typing and in the online list, and a private message is echoed to its sender;
// history comes back after a reload without duplicates; a message with HTML in it stays
// text and only http(s) links become links; long words and URLs never make the page wider
// than the window (1280 and 375 px); the page survives a 60 s outage of the server and
// reconnects by itself, sending what was written meanwhile; two pages on two instances of
// a cluster see each other online, and a killed instance's users leave the list.
//
// Screenshots go to target/test-artifacts/ (git-ignored). CHROMIUM_BIN picks another browser
// binary (default: Debian's /usr/bin/chromium).

import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { REPO_ROOT, startServer, clusterForSuite, http, nonce, instancePids } from "./helpers.mjs";

const BROWSER = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const ARTIFACTS = path.join(REPO_ROOT, "target", "test-artifacts");
const T = 60000;
const WAIT = 20000; // a deadline for a real hang, not a timing claim

const PAGES = [
  { query: "ws", transport: "WebSockets", label: "WebSockets" },
  { query: "sse", transport: "ServerSentEvents", label: "SSE" },
  { query: "lp", transport: "LongPolling", label: "Long Polling" },
];

let server;
let instanceId;
let browser;

before(
  async () => {
    assert.ok(existsSync(BROWSER), `no browser at ${BROWSER} (scripts/test.sh installs Debian's chromium)`);
    mkdirSync(ARTIFACTS, { recursive: true });
    server = await startServer();
    instanceId = (await http(`${server.url}/healthz`)).json.instance;
    // launch() gives the browser a fresh temporary profile (--user-data-dir) of its own.
    browser = await chromium.launch({
      executablePath: BROWSER,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: path.join(ARTIFACTS, "home") },
      timeout: 60000,
    });
  },
  { timeout: 90000 },
);

after(
  async () => {
    if (browser) await browser.close();
    if (server) await server.stop();
  },
  { timeout: 30000 },
);

/** Opens the chat page in a fresh browser context (its own storage, so its own name);
 * collects page errors for assertions. */
async function openPage(query, base = server.url, viewport = { width: 1100, height: 700 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e.message));
  await page.goto(`${base}/?transport=${query}`, { timeout: WAIT });
  return page;
}

/** Waits until the page has joined: connected, with its transport and instance shown. */
async function waitConnected(page, timeout = WAIT) {
  await page.waitForFunction(
    () => {
      const instance = document.getElementById("top-instance")?.textContent;
      return (
        document.getElementById("state-pill")?.dataset.state === "connected" &&
        instance !== "—" && instance !== "…" &&
        document.getElementById("top-transport")?.textContent !== "—"
      );
    },
    null,
    { timeout },
  );
}

async function say(page, text) {
  await page.fill("#message-input", text);
  await page.press("#message-input", "Enter");
}

/** Names this page (before or after joining) through the name form. */
async function rename(page, name) {
  await page.fill("#name-input", name);
  await page.press("#name-input", "Enter");
  await page.waitForFunction((n) => document.getElementById("name-hint").textContent.includes(n), name, { timeout: WAIT });
}

/** Waits for a delivered message whose text is exactly `text`; returns its details. */
async function waitForMessage(page, text) {
  const handle = await page.waitForFunction(
    (t) => {
      for (const li of document.querySelectorAll("#messages li.msg:not(.pending)")) {
        const body = li.querySelector(".bubble");
        if (body && body.textContent === t) {
          return { text: body.textContent, html: body.innerHTML, meta: li.querySelector(".meta").textContent, classes: li.className };
        }
      }
      return null;
    },
    text,
    { timeout: WAIT },
  );
  return handle.jsonValue();
}

/** How many delivered messages show exactly `text`. */
function countMessages(page, text) {
  return page.evaluate(
    (t) => [...document.querySelectorAll("#messages li.msg:not(.pending) .bubble")].filter((b) => b.textContent === t).length,
    text,
  );
}

/** Waits until the online list names `name` (or, with present=false, no longer does). */
async function waitOnline(page, name, present = true, timeout = WAIT) {
  await page.waitForFunction(
    ([n, want]) => [...document.querySelectorAll("#online .person-name")].some((b) => b.textContent.replace(/ \(you\)$/, "") === n) === want,
    [name, present],
    { timeout },
  );
}

/** The widest things on the page against the window: nothing may stick out sideways, and
 * no message may be wider than its bubble. */
function overflow(page) {
  return page.evaluate(() => {
    const width = window.innerWidth;
    const sticking = [...document.querySelectorAll("#messages li, #send-button, #message-input, .topbar, .composer")]
      .filter((e) => e.getBoundingClientRect().right > width + 0.5)
      .map((e) => `${e.tagName}#${e.id}.${e.className} right=${Math.round(e.getBoundingClientRect().right)}`);
    // Text wider than its box (cut off, or scrolling sideways inside the message list).
    const box = document.getElementById("messages").getBoundingClientRect();
    const clipped = [...document.querySelectorAll("#messages, #messages .bubble")]
      .filter((e) => {
        const r = e.getBoundingClientRect();
        return e.scrollWidth > e.clientWidth + 1 || r.left < box.left - 0.5 || r.right > box.right + 0.5;
      })
      .map((e) => `${e.tagName}#${e.id}.${e.className} ${e.scrollWidth}>${e.clientWidth}`);
    return { width, scrollWidth: document.scrollingElement.scrollWidth, sticking, clipped };
  });
}

describe("chat page in Chromium", () => {
  for (const { query, transport, label } of PAGES) {
    test(`?transport=${query} connects over ${transport} and shows state, transport and instance`, { timeout: T }, async () => {
      const page = await openPage(query);
      try {
        await waitConnected(page);
        assert.equal(await page.textContent("#fact-transport"), transport);
        assert.equal(await page.textContent("#top-instance"), instanceId);
        const connectionId = await page.textContent("#fact-connection");
        assert.match(connectionId, /^[A-Za-z0-9_-]+$/);
        // The page's own connection works: a message comes back to it.
        const text = nonce(`hello-${query}`);
        await say(page, text);
        const msg = await waitForMessage(page, text);
        assert.ok(msg.meta.includes(label), `the message does not show the sender's transport: ${msg.meta}`);
        await page.screenshot({ path: path.join(ARTIFACTS, `chat-${query}.png`) });
        assert.deepEqual(page.errors, []);
      } finally {
        await page.context().close();
      }
    });
  }

  test("two pages on different transports chat both ways, see each other online and typing; a private message is echoed to its sender", { timeout: T }, async () => {
    const a = await openPage("ws");
    const b = await openPage("lp");
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      const [nameA, nameB] = [nonce("Ann").slice(0, 20), nonce("Bob").slice(0, 20)];
      await rename(a, nameA);
      await rename(b, nameB);
      await waitOnline(a, nameB);
      await waitOnline(b, nameA);

      const there = nonce("a-to-b");
      await say(a, there);
      const atB = await waitForMessage(b, there);
      assert.ok(atB.meta.includes("WebSockets"), atB.meta);
      assert.ok(atB.meta.includes(nameA), atB.meta);
      const back = nonce("b-to-a");
      await say(b, back);
      const atA = await waitForMessage(a, back);
      assert.ok(atA.meta.includes("Long Polling"), atA.meta);

      // Typing shows on the other page.
      await a.fill("#message-input", "typing something");
      await b.waitForFunction((n) => document.getElementById("typing").textContent.includes(`${n} is typing`), nameA, { timeout: WAIT });
      await a.fill("#message-input", "");

      // A private message: picked from the online list, shown to both, marked as direct.
      await a.click(`#online .person-name >> text="${nameB}"`);
      const secret = nonce("just-for-bob");
      await say(a, secret);
      const echoed = await waitForMessage(a, secret);
      assert.ok(echoed.classes.includes("direct") && echoed.classes.includes("mine"), echoed.classes);
      const got = await waitForMessage(b, secret);
      assert.ok(got.classes.includes("direct"), got.classes);
      assert.equal(await countMessages(a, secret), 1, "the sender sees its private message once");

      await a.screenshot({ path: path.join(ARTIFACTS, "chat-two-pages-ws.png") });
      await b.screenshot({ path: path.join(ARTIFACTS, "chat-two-pages-lp.png") });
      assert.deepEqual([...a.errors, ...b.errors], []);
    } finally {
      await a.context().close();
      await b.context().close();
    }
  });

  test("a closing long-polling tab tells the server, and the others see it leave", { timeout: T }, async () => {
    // A server that would wait 2 minutes for a silent long-polling client: only the page's
    // own goodbye (Close and DELETE on pagehide) can make it leave within the deadline.
    const patient = await startServer({ env: { DISCONNECT_TIMEOUT: "120s", CLIENT_TIMEOUT: "120s" } });
    const a = await openPage("lp", patient.url);
    const b = await openPage("ws", patient.url);
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      const nameA = nonce("Lp").slice(0, 20);
      await rename(a, nameA);
      await waitOnline(b, nameA);
      await a.close({ runBeforeUnload: true });
      await waitOnline(b, nameA, false);
      assert.deepEqual(b.errors, []);
    } finally {
      await a.context().close();
      await b.context().close();
      await patient.stop();
    }
  });

  test("a name chosen before joining: the others see one 'joined' with that name, no guest and no rename", { timeout: T }, async () => {
    const b = await openPage("ws");
    let a;
    try {
      await waitConnected(b);
      const name = nonce("Cleo").slice(0, 20);
      a = await openPage(`sse&name=${encodeURIComponent(name)}`);
      await waitConnected(a);
      assert.equal(await a.inputValue("#name-input"), name);
      await waitOnline(b, name);
      await b.waitForFunction((n) => [...document.querySelectorAll("#messages li.system")].some((li) => li.textContent.startsWith(`${n} joined`)), name, { timeout: WAIT });
      const notices = await b.evaluate((n) => [...document.querySelectorAll("#messages li.system")].map((li) => li.textContent).filter((t) => t.includes(n)), name);
      assert.equal(notices.length, 1, JSON.stringify(notices));
      assert.deepEqual(b.errors, []);
    } finally {
      await a?.context().close();
      await b.context().close();
    }
  });

  test("history comes back after a reload, each message once", { timeout: T }, async () => {
    const page = await openPage("sse");
    try {
      await waitConnected(page);
      const texts = [nonce("before-reload-1"), nonce("before-reload-2")];
      for (const text of texts) {
        await say(page, text);
        await waitForMessage(page, text);
      }
      await page.reload({ timeout: WAIT });
      await waitConnected(page);
      for (const text of texts) {
        await waitForMessage(page, text);
        assert.equal(await countMessages(page, text), 1, `${text} shown once after the reload`);
      }
      assert.deepEqual(page.errors, []);
    } finally {
      await page.context().close();
    }
  });

  test("HTML in a message and a name stays text on the receiving page; only http(s) links are links", { timeout: T }, async () => {
    const a = await openPage("sse");
    const b = await openPage("ws");
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      const name = `<i id="badname">x</i>`;
      await rename(a, name);
      const evil = `${nonce("html")} <img src=x onerror="window.__injected = true"><b id="injected">bold</b>`;
      await say(a, evil);
      // Positive control: the message arrives, with its markup as visible characters.
      const got = await waitForMessage(b, evil);
      assert.equal(got.text, evil);
      assert.ok(got.html.includes("&lt;img"), `the markup was not escaped: ${got.html}`);
      assert.ok(got.meta.includes(name), `the sender's name is not shown as text: ${got.meta}`);
      const injected = await b.evaluate(() => ({
        flag: window.__injected === true,
        elements: document.querySelectorAll("#injected, #badname, #messages img").length,
      }));
      assert.deepEqual(injected, { flag: false, elements: 0 });

      const links = `${nonce("links")} see https://example.com/a?b=1&c=<x>, javascript:alert(1) and data:text/html,hi`;
      await say(a, links);
      await waitForMessage(b, links);
      const anchors = await b.evaluate((t) => {
        const bubble = [...document.querySelectorAll("#messages .bubble")].find((x) => x.textContent === t);
        return [...bubble.querySelectorAll("a")].map((x) => ({ href: x.getAttribute("href"), rel: x.rel, text: x.textContent }));
      }, links);
      assert.equal(anchors.length, 1, JSON.stringify(anchors));
      assert.equal(anchors[0].text, "https://example.com/a?b=1&c=");
      assert.ok(anchors[0].href.startsWith("https://example.com/a?b=1&c="), anchors[0].href);
      assert.ok(anchors[0].rel.includes("noopener"), anchors[0].rel);
      await b.screenshot({ path: path.join(ARTIFACTS, "chat-html-stays-text.png") });
    } finally {
      await a.context().close();
      await b.context().close();
    }
  });

  for (const viewport of [{ width: 1280, height: 800 }, { width: 375, height: 740 }]) {
    test(`a long word and a long URL do not widen the page at ${viewport.width} px`, { timeout: T }, async () => {
      const page = await openPage("ws", server.url, viewport);
      try {
        await waitConnected(page);
        const word = `${nonce("w")}${"x".repeat(300)}`;
        const url = `https://example.com/${"very-long-path-segment/".repeat(15)}${nonce("u")}`;
        await say(page, word);
        await say(page, url);
        await waitForMessage(page, word);
        await waitForMessage(page, url);
        await page.fill("#message-input", "y".repeat(400));
        const seen = await overflow(page);
        await page.screenshot({ path: path.join(ARTIFACTS, `chat-long-word-${viewport.width}.png`) });
        assert.ok(seen.scrollWidth <= seen.width, `page is ${seen.scrollWidth} px wide in a ${seen.width} px window`);
        assert.deepEqual(seen.sticking, []);
        assert.deepEqual(seen.clipped, []);
        assert.deepEqual(page.errors, []);
      } finally {
        await page.context().close();
      }
    });
  }
});

describe("chat page in Chromium, while its server is down for a minute", () => {
  let own;
  before(async () => { own = await startServer(); }, { timeout: 30000 });
  after(async () => { if (own) await own.stop(); }, { timeout: 30000 });

  test("the page says it is reconnecting, queues what is written, and reconnects by itself once the server is back", { timeout: 150000 }, async () => {
    const page = await openPage("ws", own.url);
    try {
      await waitConnected(page);
      await page.evaluate(() => { window.__samePage = true; });
      await own.stop();
      await page.waitForFunction(
        () => ["reconnecting", "disconnected"].includes(document.getElementById("banner").dataset.kind) &&
          !document.getElementById("banner").hidden,
        null,
        { timeout: WAIT },
      );
      const queued = nonce("written-offline");
      await say(page, queued);
      const pending = await page.textContent("#messages li.pending .pending-state");
      assert.match(pending, /waiting for the connection/i, "an unsent message says so");
      await page.screenshot({ path: path.join(ARTIFACTS, "chat-outage.png") });

      // The outage itself: a minute with the server gone (the page must not give up).
      await new Promise((resolve) => setTimeout(resolve, 60000));
      assert.equal(await page.evaluate(() => document.getElementById("state-pill").dataset.state), "reconnecting");

      own = await startServer({ env: { LISTEN_ADDR: `127.0.0.1:${own.port}` } });
      await waitConnected(page, 40000);
      assert.equal(await page.evaluate(() => window.__samePage), true, "reconnected without a reload");
      await waitForMessage(page, queued);
      const after = nonce("after-outage");
      await say(page, after);
      await waitForMessage(page, after);
      await page.screenshot({ path: path.join(ARTIFACTS, "chat-after-outage.png") });
      assert.deepEqual(page.errors, []);
    } finally {
      await page.context().close();
    }
  });
});

describe("chat page in Chromium, through a cluster of 2 behind nginx (load-balancer routing only)", () => {
  let cluster;
  clusterForSuite({ instances: 2, directRouting: false }, (started) => {
    cluster = started;
  });

  test("a page per transport connects and every page sees every page's message", { timeout: 90000 }, async () => {
    const ids = cluster.instances.map((i) => i.id);
    const pages = [];
    try {
      for (const { query } of PAGES) pages.push(await openPage(query, cluster.url));
      await Promise.all(pages.map((p) => waitConnected(p)));
      for (const [i, page] of pages.entries()) {
        assert.equal(await page.textContent("#fact-transport"), PAGES[i].transport);
        assert.ok(ids.includes(await page.textContent("#top-instance")), "the page shows an instance of the cluster");
      }
      const texts = PAGES.map(({ query }) => nonce(`cluster-${query}`));
      for (const [i, page] of pages.entries()) await say(page, texts[i]);
      for (const page of pages) for (const text of texts) await waitForMessage(page, text);
      await pages[2].screenshot({ path: path.join(ARTIFACTS, "chat-cluster-lp.png") });
      assert.deepEqual(pages.flatMap((p) => p.errors), []);
    } finally {
      for (const page of pages) await page.context().close();
    }
  });

  test("pages on two instances see each other online; a killed instance's user leaves the list", { timeout: 90000 }, async () => {
    const [first, second] = cluster.instances;
    const a = await openPage("ws", first.url);
    const b = await openPage("sse", second.url);
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      assert.equal(await a.textContent("#top-instance"), first.id);
      assert.equal(await b.textContent("#top-instance"), second.id);
      const [nameA, nameB] = [nonce("Ada").slice(0, 20), nonce("Ben").slice(0, 20)];
      await rename(a, nameA);
      await rename(b, nameB);
      await waitOnline(a, nameB);
      await waitOnline(b, nameA);
      await a.screenshot({ path: path.join(ARTIFACTS, "chat-cluster-online.png") });

      // No goodbye from a crashed instance: its heartbeat stops and the other one says so.
      const pid = instancePids(cluster).get(second.id);
      assert.ok(pid, "the second instance's pid");
      process.kill(pid, "SIGKILL");
      await waitOnline(a, nameB, false, 30000);
      assert.deepEqual(a.errors, []);
    } finally {
      await a.context().close();
      await b.context().close();
    }
  });
});
