// Client-to-server streams and client results with the official client (@microsoft/signalr),
// over every transport: the chat hub's `UploadLines` (a `signalR.Subject` passed to invoke or
// send) and `AskClient` (the server calls `Ask` on another connection and awaits its
// answer). Client results are tested on one instance and across a 3-instance cluster behind
// the repo's nginx.conf, with the caller and the asked client on different instances.
//
// Needs target/debug/stickless and stickless-cluster, redis-server and nginx.

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Subject } from "@microsoft/signalr";
import {
  TRANSPORTS,
  startServer,
  startCluster,
  connect,
  stopAllConnections,
  record,
  nonce,
  withTimeout,
} from "./helpers.mjs";

const T = 30000;

let single; // one instance; at most 2 client streams per connection
let cluster; // 3 instances behind nginx; client results time out after 3 s

before(
  async () => {
    [single, cluster] = await Promise.all([
      startServer({ env: { MAX_CLIENT_STREAMS: "2", STREAM_BUFFER_CAPACITY: "2" } }),
      startCluster({ instances: 3, instanceEnv: { CLIENT_RESULT_TIMEOUT: "3s" } }),
    ]);
  },
  { timeout: 120000 },
);

after(
  async () => {
    await stopAllConnections();
    await Promise.all([single?.stop(), cluster?.stop({ timeoutMs: 30000 })]);
  },
  { timeout: 60000 },
);

afterEach(() => stopAllConnections(), { timeout: 20000 });

/** The lines of `tag` that `rec` received, in order. */
function linesOf(rec, tag) {
  return rec.items.map(([msg]) => msg.text).filter((text) => text.startsWith(tag));
}

describe("client-to-server streams (UploadLines)", () => {
  for (const transport of TRANSPORTS) {
    test(`${transport}: every line reaches the hub in order and invoke returns the count`, { timeout: T }, async () => {
      const tag = nonce("up");
      const uploader = await connect(single.url, { transport });
      const watcher = await connect(single.url, { transport });
      const rec = record(watcher, "ReceiveMessage", (msg) => msg.text.startsWith(tag));
      const lines = new Subject();
      const result = uploader.invoke("UploadLines", lines);
      // More lines than the stream buffer (2): the server must take them all, in order.
      const sent = Array.from({ length: 40 }, (_, i) => `${tag} ${i}`);
      for (const line of sent) lines.next(line);
      lines.complete();
      assert.equal(await withTimeout(result, 10000, "UploadLines result"), sent.length);
      await rec.next(sent.length, 10000);
      assert.deepEqual(linesOf(rec, tag), sent);
    });

    test(`${transport}: send with a stream works, and a client error fails the invocation with its text`, { timeout: T }, async () => {
      const tag = nonce("send");
      const uploader = await connect(single.url, { transport });
      const rec = record(uploader, "ReceiveMessage", (msg) => msg.text.startsWith(tag));
      const fired = new Subject();
      await uploader.send("UploadLines", fired);
      fired.next(`${tag} a`);
      fired.next(`${tag} b`);
      fired.complete();
      await rec.next(2, 10000);
      assert.deepEqual(linesOf(rec, tag), [`${tag} a`, `${tag} b`]);

      const failing = new Subject();
      const result = uploader.invoke("UploadLines", failing);
      failing.next(`${tag} c`);
      failing.error(new Error("disk on fire"));
      await assert.rejects(withTimeout(result, 10000, "UploadLines result"), /disk on fire/);
      // The connection goes on working.
      assert.equal(typeof (await uploader.invoke("WhoAmI")).connectionId, "string");
    });
  }

  test("a connection may not open more client streams than MAX_CLIENT_STREAMS", { timeout: T }, async () => {
    const client = await connect(single.url, { transport: "WebSockets" });
    const open = [new Subject(), new Subject()];
    const running = open.map((s) => client.invoke("UploadLines", s));
    const third = new Subject();
    await assert.rejects(
      withTimeout(client.invoke("UploadLines", third), 10000, "third UploadLines"),
      /at most 2 client streams/,
    );
    for (const s of open) s.complete();
    assert.deepEqual(await withTimeout(Promise.all(running), 10000, "open uploads"), [0, 0]);
    // Once they completed, streams can be opened again.
    const again = new Subject();
    const result = client.invoke("UploadLines", again);
    again.complete();
    assert.equal(await withTimeout(result, 10000, "UploadLines again"), 0);
  });
});

/** Connects clients until one lands on an instance other than `not`'s. */
async function connectElsewhere(url, transport, notInstance) {
  for (let i = 0; i < 12; i++) {
    const c = await connect(url, { transport });
    const who = await c.invoke("WhoAmI");
    if (who.instance !== notInstance) return { c, who };
    await c.stop();
  }
  throw new Error(`no connection landed on an instance other than ${notInstance}`);
}

describe("client results (AskClient)", () => {
  test("one instance: an answer, a client without a handler, an unknown connection", { timeout: T }, async () => {
    const asker = await connect(single.url, { transport: "LongPolling" });
    const target = await connect(single.url, { transport: "ServerSentEvents" });
    target.on("Ask", (from, question) => `${question}? 42, says ${target.connectionId}`);
    assert.equal(
      await asker.invoke("AskClient", target.connectionId, "meaning"),
      `meaning? 42, says ${target.connectionId}`,
    );
    await assert.rejects(asker.invoke("AskClient", asker.connectionId, "x"), /Client didn't provide a result\./);
    await assert.rejects(asker.invoke("AskClient", "nobody-here", "x"), /Connection 'nobody-here' does not exist\./);
  });

  for (const transport of TRANSPORTS) {
    test(`cluster, ${transport}: the caller on one instance gets the answer of a client on another`, { timeout: T }, async () => {
      const asker = await connect(cluster.url, { transport });
      const askerAt = (await asker.invoke("WhoAmI")).instance;
      const { c: target, who } = await connectElsewhere(cluster.url, transport, askerAt);
      assert.notEqual(who.instance, askerAt);
      const asked = [];
      target.on("Ask", (from, question) => {
        asked.push([from, question]);
        return `answer to ${question} from ${who.instance}`;
      });
      const q = nonce("q");
      assert.equal(await asker.invoke("AskClient", target.connectionId, q), `answer to ${q} from ${who.instance}`);
      assert.equal(asked.length, 1);
      assert.equal(asked[0][1], q);
      // The handler's error text comes back across instances too.
      target.off("Ask");
      target.on("Ask", () => {
        throw new Error("not telling");
      });
      await assert.rejects(asker.invoke("AskClient", target.connectionId, q), /not telling/);
    });
  }

  test("cluster: a client that disconnects mid-call fails the call with 'disconnected'", { timeout: T }, async () => {
    const asker = await connect(cluster.url, { transport: "WebSockets" });
    const askerAt = (await asker.invoke("WhoAmI")).instance;
    const { c: target } = await connectElsewhere(cluster.url, "WebSockets", askerAt);
    const targetId = target.connectionId;
    let asked;
    const wasAsked = new Promise((resolve) => (asked = resolve));
    // The handler never settles; the client leaves instead.
    target.on("Ask", () => {
      asked();
      return new Promise(() => {});
    });
    const call = asker.invoke("AskClient", targetId, "still there?");
    await withTimeout(wasAsked, 10000, "the target to be asked");
    await target.stop();
    await assert.rejects(withTimeout(call, 10000, "AskClient after the target left"), new RegExp(`Connection '${targetId}' disconnected\\.`));
  });

  test("cluster: a connection nobody holds fails the call at once with 'does not exist'", { timeout: T }, async () => {
    const asker = await connect(cluster.url, { transport: "WebSockets" });
    // Not the timeout's text: the bus knew at once that nobody listens for it.
    await assert.rejects(
      withTimeout(asker.invoke("AskClient", "nobody-anywhere", "hello?"), 15000, "AskClient to nobody"),
      /Connection 'nobody-anywhere' does not exist\./,
    );
  });

  test("cluster: a client that never answers fails the call after CLIENT_RESULT_TIMEOUT", { timeout: T }, async () => {
    const asker = await connect(cluster.url, { transport: "LongPolling" });
    const askerAt = (await asker.invoke("WhoAmI")).instance;
    const { c: target } = await connectElsewhere(cluster.url, "ServerSentEvents", askerAt);
    target.on("Ask", () => new Promise(() => {}));
    await assert.rejects(
      withTimeout(asker.invoke("AskClient", target.connectionId, "hello?"), 15000, "AskClient to a silent client"),
      new RegExp(`Connection '${target.connectionId}' did not answer 'Ask' within 3s\\.`),
    );
  });
});
