// The chat page (static/) in a real browser: Debian's Chromium driven by playwright-core
// (which never downloads a browser). Behaviour, not layout: the page connects over each
// transport and shows its state, transport and instance; two pages on different transports
// chat both ways; a message with HTML in it stays text.
//
// Screenshots go to target/test-artifacts/ (git-ignored). CHROMIUM_BIN picks another browser
// binary (default: Debian's /usr/bin/chromium).

import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import { REPO_ROOT, startServer, startCluster, http, nonce } from "./helpers.mjs";

const BROWSER = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const ARTIFACTS = path.join(REPO_ROOT, "target", "test-artifacts");
const T = 60000;
const WAIT = 20000; // a deadline for a real hang, not a timing claim

const PAGES = [
  { query: "ws", transport: "WebSockets" },
  { query: "sse", transport: "ServerSentEvents" },
  { query: "lp", transport: "LongPolling" },
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

/** Opens the chat page in a fresh browser context; collects page errors for assertions. */
async function openPage(query, base = server.url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e.message));
  await page.goto(`${base}/?transport=${query}`, { timeout: WAIT });
  return page;
}

/** Waits until the page says it is connected and shows a transport and an instance. */
async function waitConnected(page) {
  await page.waitForFunction(
    () =>
      document.getElementById("state")?.textContent === "connected" &&
      document.getElementById("instance")?.textContent !== "–" &&
      document.getElementById("transport")?.textContent !== "–",
    null,
    { timeout: WAIT },
  );
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

/** Waits for a message in #messages whose text is exactly `text`; returns its details. */
async function waitForMessage(page, text) {
  const handle = await page.waitForFunction(
    (t) => {
      for (const li of document.querySelectorAll("#messages li")) {
        const body = li.querySelector(".text");
        if (body && body.textContent === t) {
          return { text: body.textContent, html: body.innerHTML, meta: li.textContent };
        }
      }
      return null;
    },
    text,
    { timeout: WAIT },
  );
  return handle.jsonValue();
}

describe("chat page in Chromium", () => {
  for (const { query, transport } of PAGES) {
    test(`?transport=${query} connects over ${transport} and shows state, transport and instance`, { timeout: T }, async () => {
      const page = await openPage(query);
      try {
        await waitConnected(page);
        assert.equal(await page.textContent("#transport"), transport);
        assert.equal(await page.textContent("#instance"), instanceId);
        const connectionId = await page.textContent("#connectionId");
        assert.match(connectionId, /^[A-Za-z0-9_-]+$/);
        // The page's own connection works: a message comes back to it.
        const text = nonce(`hello-${query}`);
        await say(page, text);
        const msg = await waitForMessage(page, text);
        assert.ok(msg.meta.includes(transport), `the message does not show the sender's transport: ${msg.meta}`);
        await page.screenshot({ path: path.join(ARTIFACTS, `chat-${query}.png`) });
        assert.deepEqual(page.errors, []);
      } finally {
        await page.context().close();
      }
    });
  }

  test("two pages on different transports chat both ways", { timeout: T }, async () => {
    const a = await openPage("ws");
    const b = await openPage("lp");
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      const there = nonce("a-to-b");
      await say(a, there);
      const atB = await waitForMessage(b, there);
      assert.ok(atB.meta.includes("WebSockets"), atB.meta);
      const back = nonce("b-to-a");
      await say(b, back);
      const atA = await waitForMessage(a, back);
      assert.ok(atA.meta.includes("LongPolling"), atA.meta);
      await a.screenshot({ path: path.join(ARTIFACTS, "chat-two-pages-ws.png") });
      await b.screenshot({ path: path.join(ARTIFACTS, "chat-two-pages-lp.png") });
      assert.deepEqual([...a.errors, ...b.errors], []);
    } finally {
      await a.context().close();
      await b.context().close();
    }
  });

  test("HTML in a message and a name stays text on the receiving page", { timeout: T }, async () => {
    const a = await openPage("sse");
    const b = await openPage("ws");
    try {
      await Promise.all([waitConnected(a), waitConnected(b)]);
      const name = `<i id="badname">x</i>`;
      await a.fill("#name", name);
      await a.press("#name", "Enter");
      await a.waitForFunction(() => [...document.querySelectorAll("#events li")].some((li) => li.textContent.includes("name set to")), null, { timeout: WAIT });
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
      await b.screenshot({ path: path.join(ARTIFACTS, "chat-html-stays-text.png") });
    } finally {
      await a.context().close();
      await b.context().close();
    }
  });
});

describe("chat page in Chromium, through a cluster of 2 behind nginx (load-balancer routing only)", () => {
  let cluster;
  before(
    async () => {
      cluster = await startCluster({ instances: 2, directRouting: false });
    },
    { timeout: 120000 },
  );
  after(
    async () => {
      if (cluster) await cluster.stop({ timeoutMs: 30000 });
    },
    { timeout: 60000 },
  );

  test("a page per transport connects and every page sees every page's message", { timeout: 90000 }, async () => {
    const ids = cluster.instances.map((i) => i.id);
    const pages = [];
    try {
      for (const { query } of PAGES) pages.push(await openPage(query, cluster.url));
      await Promise.all(pages.map(waitConnected));
      for (const [i, page] of pages.entries()) {
        assert.equal(await page.textContent("#transport"), PAGES[i].transport);
        assert.ok(ids.includes(await page.textContent("#instance")), "the page shows an instance of the cluster");
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
});
