// Stateful reconnect with the official client (`withStatefulReconnect()`), against one
// instance: what negotiate offers, and a WebSocket that breaks without a close frame
// (a TCP proxy in between drops every socket) resuming with the same connectionId, every
// confirmed message received exactly once and in order, in both directions.
//
// The cluster cases (nginx restart, SIGTERM, SIGKILL, in both routing configurations) are
// in stateful-cluster.test.mjs.

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  HubConnectionState,
  startServer,
  connect,
  stopAllConnections,
  record,
  nonce,
  rawNegotiate,
  describeResponse,
  metric,
} from "./helpers.mjs";
import { TcpProxy, SteadySender, assertExactlyOnceInOrder } from "./stateful-helpers.mjs";

const T = 60000;

let server; // defaults: stateful reconnect allowed
let forbidden; // ALLOW_STATEFUL_RECONNECT=false

before(
  async () => {
    [server, forbidden] = await Promise.all([
      startServer({ env: { RUST_LOG: process.env.STICKLESS_SERVER_LOG ?? "warn" } }),
      startServer({ env: { ALLOW_STATEFUL_RECONNECT: "false" } }),
    ]);
  },
  { timeout: 30000 },
);

after(
  async () => {
    await stopAllConnections();
    await Promise.all([server, forbidden].filter(Boolean).map((s) => s.stop()));
  },
  { timeout: 30000 },
);

describe("stateful reconnect on one instance", () => {
  afterEach(stopAllConnections, { timeout: 15000 });

  test("negotiate offers useStatefulReconnect only when asked and allowed", { timeout: T }, async () => {
    const asked = await rawNegotiate(server.url, "negotiateVersion=1&useStatefulReconnect=true");
    assert.equal(asked.status, 200, describeResponse(asked));
    assert.equal(asked.json.useStatefulReconnect, true, asked.text);
    const unasked = await rawNegotiate(server.url, "negotiateVersion=1");
    assert.equal(unasked.json.useStatefulReconnect, undefined, unasked.text);
    const refused = await rawNegotiate(forbidden.url, "negotiateVersion=1&useStatefulReconnect=true");
    assert.equal(refused.json.useStatefulReconnect, undefined, refused.text);
  });

  test("the official client turns it on over WebSockets with a version 2 handshake", { timeout: T }, async () => {
    const c = await connect(server.url, { builder: (b) => b.withStatefulReconnect(), logMessageContent: true });
    assert.ok(c.logger.has('"version":2'), `no version 2 handshake:\n${c.logger.dump(0)}`);
    assert.ok(c.connection.features.reconnect, "the client did not turn stateful reconnect on");
    const tag = nonce("on");
    const rec = record(c, "Send", (m) => m === tag);
    await c.invoke("Send", tag);
    await rec.next(1);
  });

  test("a WebSocket dropped without a close frame resumes: same connectionId, every message once, in order, both ways", { timeout: T }, async () => {
    const proxy = await TcpProxy.start(server.port);
    try {
      const clients = [];
      for (let i = 0; i < 3; i++) {
        clients.push(await connect(proxy.url, { builder: (b) => b.withStatefulReconnect(), label: `stateful#${i}` }));
      }
      const ids = clients.map((c) => c.connectionId);
      const reconnecting = clients.map(() => 0);
      clients.forEach((c, i) => c.onreconnecting(() => reconnecting[i]++));
      const sender = await connect(server.url, { label: "sender" });
      const run = nonce("run");
      const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(`${run}:`)));
      const resumedBefore = await metric([server.url], "stickless_stateful_resumed_total");

      // Server → clients: a steady numbered broadcast, each number confirmed by its invoke.
      const steady = new SteadySender(sender, "Send", (n) => `${run}:s:${n}`);
      steady.start(20);
      // Client → server: the first client sends its own numbered stream; messages it sends
      // while its socket is down are buffered by the client and resent after it resumes.
      const upstream = new SteadySender(clients[0], "Send", (n) => `${run}:c:${n}`);
      upstream.start(30);

      await steady.waitFor(30);
      const accepted = proxy.accepted;
      proxy.dropAll();
      await proxy.waitForAccepted(accepted + clients.length, 15000);
      await steady.waitFor(steady.confirmed.length + 30);
      await upstream.waitFor(upstream.confirmed.length + 10);
      await Promise.all([steady.stop(), upstream.stop()]);

      for (const [i, c] of clients.entries()) {
        assert.equal(c.state, HubConnectionState.Connected, `${c.label} is not connected`);
        assert.equal(c.connectionId, ids[i], `${c.label} changed its connectionId`);
        assert.equal(reconnecting[i], 0, `${c.label} fell back to a new connection`);
        await assertExactlyOnceInOrder(recs[i], [
          { prefix: `${run}:s:`, confirmed: steady.confirmed },
          { prefix: `${run}:c:`, confirmed: upstream.confirmed },
        ]);
      }
      const resumed = (await metric([server.url], "stickless_stateful_resumed_total")) - resumedBefore;
      assert.ok(resumed >= clients.length, `stickless_stateful_resumed_total rose by ${resumed}`);
    } catch (e) {
      if (process.env.STICKLESS_SERVER_LOG) process.stderr.write(server.stderr());
      throw e;
    } finally {
      await stopAllConnections();
      await proxy.close();
    }
  });

  test("without stateful reconnect the same drop costs a new connection", { timeout: T }, async () => {
    // Positive control for the test above: the proxy's drop really breaks a connection.
    const proxy = await TcpProxy.start(server.port);
    try {
      const c = await connect(proxy.url, { reconnect: [0, 100, 500], label: "plain" });
      const id = c.connectionId;
      const reconnected = new Promise((resolve) => c.onreconnected(resolve));
      proxy.dropAll();
      await reconnected;
      assert.notEqual(c.connectionId, id);
    } finally {
      await stopAllConnections();
      await proxy.close();
    }
  });
});
