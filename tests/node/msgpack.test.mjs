// Interop tests: the official client with its MessagePack hub protocol
// (@microsoft/signalr-protocol-msgpack) on WebSockets and Long Polling (the transports
// that carry binary; the client itself refuses MessagePack on Server-Sent Events), against
// one instance and a 3-instance cluster behind the round-robin nginx. MessagePack and
// JSON clients meet in the same broadcasts, each receiving its own protocol.
//
// Needs target/debug/stickless and target/debug/stickless-cluster (or STICKLESS_BIN,
// STICKLESS_CLUSTER_BIN), redis-server and nginx.
// Run: node --test --test-force-exit tests/node/msgpack.test.mjs

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { HubConnectionBuilder, HttpTransportType } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import {
  startServer,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  collectStream,
  nonce,
  withTimeout,
  RecordingLogger,
  LogLevel,
} from "./helpers.mjs";

const T = 60000;
const BINARY_TRANSPORTS = ["WebSockets", "LongPolling"];

const msgpackConnections = new Set();

/** A started MessagePack connection to `${base}/chat` on one transport. */
async function msgpackClient(base, transport, label = `msgpack-${transport}`) {
  const logger = new RecordingLogger(label);
  const connection = new HubConnectionBuilder()
    .withUrl(`${base}/chat`, { transport: HttpTransportType[transport] })
    .withHubProtocol(new MessagePackHubProtocol())
    .configureLogging(logger)
    .build();
  connection.logger = logger;
  connection.label = label;
  msgpackConnections.add(connection);
  try {
    await withTimeout(connection.start(), 10000, `${label}: start()`);
  } catch (e) {
    e.message += `\nclient log:\n${logger.dump(LogLevel.Debug)}`;
    throw e;
  }
  return connection;
}

async function stopAll() {
  const all = [...msgpackConnections];
  msgpackConnections.clear();
  await Promise.all(all.map((c) => withTimeout(c.stop(), 5000, `${c.label}: stop()`).catch(() => {})));
  await stopAllConnections();
}

/** What every deployment must do for a MessagePack client on `transport`. */
async function exercise(base, transport) {
  const mp = await msgpackClient(base, transport);
  const json = await connect(base, { transport: "WebSockets", label: "json-peer" });

  const who = await mp.invoke("WhoAmI");
  assert.equal(who.transport, transport);
  assert.equal(who.connectionId, mp.connectionId);

  // Broadcast both ways between protocols; text with non-ASCII survives both encodings.
  const text = `${nonce("mp")} hé ✓`;
  const atJson = record(json, "Send", (m) => m === text);
  const atMp = record(mp, "Send", (m) => m === text);
  await mp.send("Send", text);
  await atJson.next(1, 10000);
  await atMp.next(1, 10000);
  const back = `${nonce("json")} back`;
  const backAtMp = record(mp, "Send", (m) => m === back);
  await json.send("Send", back);
  await backAtMp.next(1, 10000);

  // Direct message to the MessagePack client, by its id.
  const direct = record(mp, "ReceiveMessage", (m) => m.text === back);
  await json.invoke("SendTo", mp.connectionId, back);
  const [[message]] = await direct.next(1, 10000);
  assert.equal(message.to, mp.connectionId);

  // A server stream and an error.
  assert.deepEqual(await collectStream(mp, "Counter", [3, 10], 10000), [0, 1, 2]);
  await assert.rejects(mp.invoke("SetName", ""), /HubException/);
  await assert.rejects(mp.invoke("NoSuchMethod"), /Unknown hub method 'NoSuchMethod'/);
}

describe("MessagePack, one instance", () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await stopAll();
    if (server) await server.stop();
  });
  afterEach(stopAll);

  for (const transport of BINARY_TRANSPORTS) {
    test(`${transport}: invoke, send, broadcast with JSON clients, stream, errors`, { timeout: T }, async () => {
      await exercise(server.url, transport);
    });
  }
});

describe("MessagePack, 3-instance cluster behind nginx", () => {
  let cluster;
  after(stopAll);
  clusterForSuite({ instances: 3 }, (started) => {
    cluster = started;
  });
  afterEach(stopAll);

  for (const transport of BINARY_TRANSPORTS) {
    test(`${transport}: invoke, send, broadcast with JSON clients, stream, errors`, { timeout: T }, async () => {
      await exercise(cluster.url, transport);
    });
  }

  test("one broadcast reaches MessagePack and JSON clients on every instance", { timeout: T }, async () => {
    const clients = [];
    for (let i = 0; i < 3; i++) {
      clients.push(await msgpackClient(cluster.url, BINARY_TRANSPORTS[i % 2], `mp-${i}`));
      clients.push(await connect(cluster.url, { transport: "LongPolling", label: `json-${i}` }));
    }
    const instances = new Set(await Promise.all(clients.map(async (c) => (await c.invoke("WhoAmI")).instance)));
    assert.ok(instances.size >= 2, `clients spread over instances: ${[...instances]}`);
    const text = nonce("all");
    const recorders = clients.map((c) => record(c, "Send", (m) => m === text));
    await clients[0].send("Send", text);
    await Promise.all(recorders.map((r) => r.next(1, 15000)));
  });
});
