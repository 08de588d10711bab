// Helpers of the stateful reconnect suites: a TCP proxy that can drop every socket at once
// (a WebSocket breaking without a close frame, as when a balancer restarts), a steady
// numbered sender that records which numbers were confirmed, and the exactly-once check.

import net from "node:net";
import assert from "node:assert/strict";
import { waitUntil } from "./helpers.mjs";

/**
 * A loopback TCP proxy to `targetPort` (which may be changed: new sockets go to the new
 * port); `dropAll()` destroys every socket pair.
 */
export class TcpProxy {
  static async start(targetPort) {
    const proxy = new TcpProxy(targetPort);
    await new Promise((resolve, reject) => {
      proxy.server.once("error", reject);
      proxy.server.listen(0, "127.0.0.1", resolve);
    });
    proxy.url = `http://127.0.0.1:${proxy.server.address().port}`;
    return proxy;
  }

  constructor(targetPort) {
    this.targetPort = targetPort;
    this.accepted = 0;
    this.pairs = new Set();
    this.server = net.createServer((client) => {
      this.accepted++;
      const upstream = net.connect(this.targetPort, "127.0.0.1");
      const pair = { client, upstream };
      this.pairs.add(pair);
      const end = () => {
        client.destroy();
        upstream.destroy();
        this.pairs.delete(pair);
      };
      client.on("error", end).on("close", end);
      upstream.on("error", end).on("close", end);
      client.pipe(upstream);
      upstream.pipe(client);
    });
  }

  /** Destroys every open socket pair: both sides see the TCP connection end, no close frame. */
  dropAll() {
    for (const { client, upstream } of this.pairs) {
      client.resetAndDestroy();
      upstream.resetAndDestroy();
    }
    this.pairs.clear();
  }

  waitForAccepted(n, timeoutMs) {
    return waitUntil(() => this.accepted >= n, timeoutMs, `${n} connections through the proxy (have ${this.accepted})`);
  }

  async close() {
    this.dropAll();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * Invokes `method(label(n))` for n = 0, 1, 2, … every `intervalMs`, without waiting for the
 * previous one (the client keeps their order), and records the numbers whose invocation
 * completed (`confirmed`) and those that failed (`failed`).
 */
export class SteadySender {
  constructor(connection, method, label) {
    this.connection = connection;
    this.method = method;
    this.label = label;
    this.next = 0;
    this.confirmed = [];
    this.failed = [];
    this.pending = new Set();
    this.timer = null;
  }

  start(intervalMs) {
    this.timer = setInterval(() => {
      const n = this.next++;
      const p = this.connection
        .invoke(this.method, this.label(n))
        .then(
          () => this.confirmed.push(n),
          (e) => this.failed.push({ n, error: String(e) }),
        )
        .finally(() => this.pending.delete(p));
      this.pending.add(p);
    }, intervalMs);
  }

  /** Waits until at least `count` invocations were confirmed. */
  waitFor(count, timeoutMs = 20000) {
    return waitUntil(
      () => this.confirmed.length >= count,
      timeoutMs,
      `${count} confirmed ${this.method} calls (have ${this.confirmed.length}, failed ${this.failed.length}: ${JSON.stringify(this.failed.slice(0, 3))})`,
    );
  }

  /** Stops sending and waits for the calls in flight to settle. */
  async stop() {
    clearInterval(this.timer);
    await Promise.allSettled([...this.pending]);
    this.confirmed.sort((a, b) => a - b);
  }
}

/**
 * Waits until `rec` (a helpers.record() of one target) holds every confirmed number of
 * every stream, then checks that each stream's numbers arrived exactly once and in order.
 * `streams`: [{ prefix, confirmed: [n…] }]; numbers whose call failed may be missing, but
 * nothing may arrive twice or out of order.
 */
export async function assertExactlyOnceInOrder(rec, streams, timeoutMs = 15000) {
  const numbers = (prefix) =>
    rec.items.map(([m]) => m).filter((m) => m.startsWith(prefix)).map((m) => Number(m.slice(prefix.length)));
  for (const { prefix, confirmed } of streams) {
    const want = new Set(confirmed);
    await waitUntil(
      () => {
        const have = new Set(numbers(prefix));
        return [...want].every((n) => have.has(n));
      },
      timeoutMs,
      `every confirmed ${prefix}* message (${want.size}) on ${rec.who ?? "a client"}`,
    ).catch((e) => {
      const have = new Set(numbers(prefix));
      const missing = [...want].filter((n) => !have.has(n));
      e.message += `; missing ${missing.length}: ${missing.slice(0, 20).join(",")}`;
      throw e;
    });
    const got = numbers(prefix);
    for (let i = 1; i < got.length; i++) {
      assert.ok(got[i] > got[i - 1], `${prefix}: ${got[i]} after ${got[i - 1]} (duplicate or out of order) at index ${i}`);
    }
  }
}
