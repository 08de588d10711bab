// What the README says is "tested with the official client", tested with it
// (@microsoft/signalr from package-lock.json) over every transport that has the feature:
// handshake version 2 and stateful reconnect asked for but forbidden, message size limits
// (Close with an error; WebSocket close codes 1000 and 1009), server pings keeping a client
// alive (and their absence letting it time out), and the server's client timeout.
//
// Each server here is started with the settings its tests need, passed explicitly.

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  HubConnectionState,
  startServer,
  connect,
  stopAllConnections,
  record,
  nextEvent,
  nonce,
  rawNegotiate,
  describeResponse,
  waitUntil,
  withTimeout,
} from "./helpers.mjs";

const T = 30000;
const MAX_MESSAGE_SIZE = 1024;
/** A record whose JSON is clearly over MAX_MESSAGE_SIZE but far under the 8x POST/frame limit. */
const OVERSIZED = "x".repeat(2 * MAX_MESSAGE_SIZE);
/** Over the WebSocket frame limit (8 x MAX_MESSAGE_SIZE). */
const OVER_FRAME = "x".repeat(9 * MAX_MESSAGE_SIZE);

let limits; // MAX_MESSAGE_SIZE small, stateful reconnect forbidden, other settings default
let timing; // pings every second, clients silent for 2 s after a Ping are closed; detailed errors

before(
  async () => {
    [limits, timing] = await Promise.all([
      startServer({ env: { MAX_MESSAGE_SIZE: String(MAX_MESSAGE_SIZE), ALLOW_STATEFUL_RECONNECT: "false" } }),
      // Detailed errors so a Close names its cause (the client timeout's, below).
      startServer({ env: { KEEP_ALIVE_INTERVAL: "1s", CLIENT_TIMEOUT: "2s", ENABLE_DETAILED_ERRORS: "true" } }),
    ]);
  },
  { timeout: 30000 },
);

after(
  async () => {
    await stopAllConnections();
    await Promise.all([limits, timing].filter(Boolean).map((s) => s.stop()));
  },
  { timeout: 30000 },
);

/** Log lines of the client's transport carrying exactly the record `json`, in one direction. */
const countRecords = (c, direction, json) =>
  c.logger.entries.filter((e) => e.message.includes(`transport) ${direction}.`) && e.message.includes(`'${json}\u001e'`)).length;

const PING = '{"type":6}';

for (const transport of TRANSPORTS) {
  describe(`official client over ${transport}`, () => {
    afterEach(stopAllConnections, { timeout: 15000 });

    test("stateful reconnect asked for (withStatefulReconnect) but forbidden (ALLOW_STATEFUL_RECONNECT=false) is not offered; the client falls back and works", { timeout: T }, async () => {
      const c = await connect(limits.url, {
        transport,
        logMessageContent: true,
        builder: (b) => b.withStatefulReconnect(),
      });
      assert.ok(c.logger.has("useStatefulReconnect=true"), `the client did not ask for stateful reconnect:\n${c.logger.dump(0)}`);
      // Not offered, so the client keeps handshake version 1 (it sends 2 only with stateful
      // reconnect on); version 2 handshakes themselves are tested by hand in tests/api.
      assert.ok(c.logger.has('{"protocol":"json","version":1}'), `the client did not fall back to a version 1 handshake:\n${c.logger.dump(0)}`);
      assert.ok(!c.connection.features.reconnect, "the server must not turn stateful reconnect on");
      const who = await c.invoke("WhoAmI");
      assert.equal(who.transport, transport);
      const tag = nonce("v2");
      const rec = record(c, "Send", (m) => m === tag);
      await c.invoke("Send", tag);
      await rec.next(1);

      // The same request by hand: the negotiate answer has no useStatefulReconnect.
      const neg = await rawNegotiate(limits.url, "negotiateVersion=1&useStatefulReconnect=true");
      assert.equal(neg.status, 200, describeResponse(neg));
      assert.equal(neg.json?.useStatefulReconnect, undefined, `negotiate offered stateful reconnect: ${neg.text}`);
    });

    test("a message over MAX_MESSAGE_SIZE closes that connection with an error; others are unaffected", { timeout: T }, async () => {
      const bystander = await connect(limits.url, { transport });
      const c = await connect(limits.url, { transport, logMessageContent: true });
      // Positive control: a message under the limit goes through on the same connection.
      const small = nonce("small") + "y".repeat(MAX_MESSAGE_SIZE / 2);
      const rec = record(c, "Send", (m) => m === small);
      await c.invoke("Send", small);
      await rec.next(1);

      const closed = nextEvent(c, "close", 15000);
      c.send("Send", OVERSIZED).catch(() => {});
      const { arg: error } = await closed;
      assert.ok(error, "onclose got no error");
      // ASP.NET's text, without the cause: detailed errors are off on this server.
      assert.equal(error.message, "Server returned an error on close: Connection closed with an error.");
      assert.equal(c.state, HubConnectionState.Disconnected);
      if (transport === "WebSockets") {
        // The Close message came first and the socket then closed normally (1000): the
        // client reports any other code as "WebSocket closed with status code".
        assert.ok(!c.logger.has("WebSocket closed with status code"), `not a 1000 close:\n${c.logger.dump()}`);
      }
      assert.equal((await bystander.invoke("WhoAmI")).connectionId, bystander.connectionId);
    });

    if (transport === "WebSockets") {
      test("a WebSocket frame over the frame limit is closed with code 1009", { timeout: T }, async () => {
        const c = await connect(limits.url, { transport });
        const closed = nextEvent(c, "close", 15000);
        c.send("Send", OVER_FRAME).catch(() => {});
        const { arg: error } = await closed;
        assert.ok(error, "onclose got no error");
        assert.match(error.message, /WebSocket closed with status code: 1009/, error.message);
      });
    }

    if (transport !== "LongPolling") {
      // Long polling has no pings: its requests are the keep-alive (the client knows).
      test("server pings keep a client with a short server timeout connected; without them it times out", { timeout: 45000 }, async () => {
        const quiet = await startServer({ env: { KEEP_ALIVE_INTERVAL: "25s" } });
        try {
          // The client pings too (every 500 ms), or the timing server's CLIENT_TIMEOUT would
          // end the connection from its side.
          const opts = { transport, logMessageContent: true, builder: (b) => b.withServerTimeout(3000).withKeepAliveInterval(500) };
          const kept = await connect(timing.url, opts);
          const dropped = await connect(quiet.url, opts);
          const droppedClosed = nextEvent(dropped, "close", 20000);
          let keptClosed = null;
          kept.onclose((e) => {
            keptClosed = e ?? new Error("closed without error");
          });
          // The negative control first: nothing from the server for 3 s ends the connection.
          const { arg: error } = await droppedClosed;
          assert.match(error?.message ?? "", /Server timeout elapsed without receiving a message from the server/);
          assert.equal(countRecords(dropped, "data received", PING), 0, "the quiet server sent a Ping");
          // Meanwhile the other server's Pings kept its client alive, and keep doing so for
          // more Pings than fit into one server timeout.
          await waitUntil(() => countRecords(kept, "data received", PING) >= 5 || keptClosed, 20000, "5 Pings");
          assert.equal(keptClosed, null, `the pinged client closed: ${keptClosed?.message}\n${kept.logger.dump()}`);
          assert.equal(kept.state, HubConnectionState.Connected);
          assert.equal((await kept.invoke("WhoAmI")).transport, transport);
        } finally {
          await stopAllConnections();
          await quiet.stop();
        }
      });

      test("the server closes a client that pinged and then went silent for CLIENT_TIMEOUT", { timeout: 45000 }, async () => {
        const opts = { transport, logMessageContent: true, builder: (b) => b.withKeepAliveInterval(300) };
        const pinging = await connect(timing.url, opts);
        const silent = await connect(timing.url, opts);
        let pingingClosed = null;
        pinging.onclose((e) => {
          pingingClosed = e ?? new Error("closed without error");
        });
        const silentClosed = nextEvent(silent, "close", 20000);
        // Both ping (the client answers the server's Pings once its own interval is up)...
        await waitUntil(() => countRecords(silent, "sending data", PING) >= 1, 10000, "the silent client's first Ping");
        // ...then one of them stops: its next keep-alive is an hour away.
        silent.keepAliveIntervalInMilliseconds = 3600 * 1000;
        const { arg: error } = await silentClosed;
        assert.equal(
          error?.message,
          "Server returned an error on close: Connection closed with an error. TimeoutException: The client sent nothing for 2s (client timeout).",
        );
        // The one that kept pinging, connected before it, is still served.
        assert.ok(countRecords(pinging, "sending data", PING) >= 2, "the pinging client did not ping");
        assert.equal(pingingClosed, null, `the pinging client was closed too: ${pingingClosed?.message}`);
        assert.equal((await withTimeout(pinging.invoke("WhoAmI"), 10000, "WhoAmI")).connectionId, pinging.connectionId);
      });
    }
  });
}
