// The `testhub` example (examples/testhub.rs) against the official client: the contract of
// ASP.NET Core's functional-test server for the JavaScript client, with that suite's
// expectations (texts, values) for every TestHub method on every transport the hub offers,
// the hub without WebSockets, the authorized hub with its token endpoint, a negotiate
// redirect and the negotiate cookies.
//
// Needs target/debug/examples/testhub (cargo build --example testhub).

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Subject } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import {
  TRANSPORTS,
  startServer,
  connect,
  stopAllConnections,
  record,
  collectStream,
  http,
  withTimeout,
} from "./helpers.mjs";

const T = 30000;
const MESSAGE = "你好，世界！";

let server;

before(
  async () => {
    server = await startServer({ bin: "target/debug/examples/testhub" });
  },
  { timeout: 60000 },
);

after(async () => {
  await stopAllConnections();
  await server?.stop();
});

afterEach(() => stopAllConnections(), { timeout: 20000 });

const hub = (transport, opts = {}) => connect(server.url, { transport, hubPath: "/testhub", ...opts });

describe("TestHub", () => {
  for (const transport of TRANSPORTS) {
    test(`${transport}: Echo, GetCallerConnectionId, GetActiveTransportName, EchoComplexObject, SendComplexObject`, { timeout: T }, async () => {
      const c = await hub(transport);
      assert.equal(await c.invoke("Echo", MESSAGE), MESSAGE);
      await c.send("Echo", MESSAGE);
      assert.equal(await c.invoke("GetCallerConnectionId"), c.connectionId);
      assert.equal(await c.invoke("GetActiveTransportName"), transport);
      const complex = { String: "x", IntArray: [1, 2], ByteArray: "AQID", Guid: "g", DateTime: "2000-01-01T00:00:00Z" };
      assert.deepEqual(await c.invoke("EchoComplexObject", complex), complex);
      assert.deepEqual(await c.invoke("SendComplexObject"), {
        String: "hello world",
        IntArray: [1, 2, 3],
        ByteArray: "AQID",
        Guid: "00010203-0405-0607-0706-050403020100",
        DateTime: "2000-01-01T00:00:00Z",
      });
    });

    test(`${transport}: InvokeWithString and SendCustomObject call the client back`, { timeout: T }, async () => {
      const c = await hub(transport);
      // Client method names match ignoring case.
      const messages = record(c, "mEssage");
      const objects = record(c, "CustomObject");
      await c.invoke("InvokeWithString", MESSAGE);
      assert.deepEqual(await messages.next(1), [[MESSAGE]]);
      await c.send("SendCustomObject", { Name: "test", Value: 42 });
      assert.deepEqual(await objects.next(1), [[{ Name: "test", Value: 42 }]]);
    });

    test(`${transport}: errors carry the functional tests' texts`, { timeout: T }, async () => {
      const c = await hub(transport);
      await assert.rejects(c.invoke("ThrowException", "An error occurred."), {
        message: "An unexpected error occurred invoking 'ThrowException' on the server. InvalidOperationException: An error occurred.",
      });
      await assert.rejects(c.invoke("EmptyStream"), {
        message: "The client attempted to invoke the streaming 'EmptyStream' method with a non-streaming invocation.",
      });
      await assert.rejects(collectStream(c, "StreamThrowException", ["An error occurred."]), {
        message: "An unexpected error occurred invoking 'StreamThrowException' on the server. InvalidOperationException: An error occurred.",
      });
      await assert.rejects(collectStream(c, "Echo", ["42"]), {
        message: "The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation.",
      });
    });

    test(`${transport}: Stream, EmptyStream, InfiniteStream canceled, StreamingConcat`, { timeout: T }, async () => {
      const c = await hub(transport);
      assert.deepEqual(await collectStream(c, "Stream", []), ["a", "b", "c"]);
      assert.deepEqual(await collectStream(c, "EmptyStream", []), []);

      const canceled = record(c, "StreamCanceled");
      const subscription = c.stream("InfiniteStream").subscribe({ next() {}, complete() {}, error() {} });
      subscription.dispose();
      await canceled.next(1, 10000);

      const parts = new Subject();
      const whole = c.invoke("StreamingConcat", parts);
      for (const part of ["Hello ", "world", "!"]) parts.next(part);
      parts.complete();
      assert.equal(await withTimeout(whole, 10000, "StreamingConcat"), "Hello world!");

      const failing = new Subject();
      const failed = c.invoke("StreamingConcat", failing);
      failing.next("Hello ");
      failing.error(new Error("Something bad"));
      await assert.rejects(withTimeout(failed, 10000, "StreamingConcat with an error"), {
        message: "An unexpected error occurred invoking 'StreamingConcat' on the server. Exception: Something bad",
      });
    });

    test(`${transport}: GetCookie reads negotiate's cookies back, GetContentTypeHeader the starting request's`, { timeout: T }, async () => {
      const c = await hub(transport);
      assert.equal(await c.invoke("GetCookie", "testCookie"), "testValue");
      assert.equal(await c.invoke("GetCookie", "testCookie2"), "testValue2");
      assert.equal(await c.invoke("GetCookie", "expiredCookie"), null);
      // The request that started the transport is a GET (upgrade, event stream, poll).
      assert.equal(await c.invoke("GetContentTypeHeader"), null);
    });
  }
});

describe("TestHub over MessagePack", () => {
  for (const transport of ["WebSockets", "LongPolling"]) {
    test(`${transport}: a result, a server stream, a client stream and an error`, { timeout: T }, async () => {
      const c = await hub(transport, { builder: (b) => b.withHubProtocol(new MessagePackHubProtocol()) });
      assert.equal(await c.invoke("Echo", MESSAGE), MESSAGE);
      assert.deepEqual(await collectStream(c, "Stream", []), ["a", "b", "c"]);
      const parts = new Subject();
      const whole = c.invoke("StreamingConcat", parts);
      for (const part of ["Hello ", "world", "!"]) parts.next(part);
      parts.complete();
      assert.equal(await withTimeout(whole, 10000, "StreamingConcat"), "Hello world!");
      await assert.rejects(c.invoke("ThrowException", "An error occurred."), {
        message: "An unexpected error occurred invoking 'ThrowException' on the server. InvalidOperationException: An error occurred.",
      });
    });
  }
});

describe("the other endpoints of the functional-test server", () => {
  test("/testhub-nowebsockets offers no WebSockets: the client falls back to Server-Sent Events", { timeout: T }, async () => {
    const negotiated = await http(`${server.url}/testhub-nowebsockets/negotiate?negotiateVersion=1`, { method: "POST" });
    assert.equal(negotiated.status, 200);
    const offered = JSON.parse(negotiated.text).availableTransports.map((t) => t.transport);
    assert.deepEqual(offered, ["ServerSentEvents", "LongPolling"]);
    const c = await connect(server.url, { transport: 7 /* any */, hubPath: "/testhub-nowebsockets" });
    assert.equal(await c.invoke("GetActiveTransportName"), "ServerSentEvents");
    await assert.rejects(connect(server.url, { transport: "WebSockets", hubPath: "/testhub-nowebsockets" }));
  });

  for (const transport of TRANSPORTS) {
    test(`${transport}: /authorizedhub admits a token from /generateJwtToken and nobody without`, { timeout: T }, async () => {
      await assert.rejects(connect(server.url, { transport, hubPath: "/authorizedhub" }), /401/);
      const token = (await http(`${server.url}/generateJwtToken`)).text;
      const c = await connect(server.url, { transport, hubPath: "/authorizedhub", accessTokenFactory: () => token });
      assert.equal(await c.invoke("Echo", MESSAGE), MESSAGE);
      assert.equal(await c.invoke("GetUserNameIdentifier"), "testuser");
      const forged = `${token.slice(0, -2)}xx`;
      await assert.rejects(connect(server.url, { transport, hubPath: "/authorizedhub", accessTokenFactory: () => forged }), /401/);
    });
  }

  test("a negotiate redirect leads to /testHub, which counts the redirects", { timeout: T }, async () => {
    const c = await connect(server.url, {
      transport: "WebSockets",
      hubPath: `/redirect?numRedirects=0&baseUrl=${server.url}`,
    });
    assert.ok((await c.invoke("GetNumRedirects")) >= 1);
    assert.equal(await c.invoke("GetCallerConnectionId"), c.connectionId);
  });

  test("/bad-negotiate answers negotiate with a 400", { timeout: T }, async () => {
    await assert.rejects(connect(server.url, { hubPath: "/bad-negotiate" }), /400/);
  });
});
