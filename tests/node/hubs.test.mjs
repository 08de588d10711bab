// Interop tests: the official @microsoft/signalr client talks to BOTH hubs of the demo
// (`/chat` and `/notifications`) of one 3-instance cluster at once, through the
// round-robin nginx, over every transport. Each hub has its own groups and bus channels:
// a chat room and a notifications topic of the same name never see each other's traffic,
// and a connection token of one hub is refused at the other hub's path.
//
// Needs target/debug/stickless-cluster (or STICKLESS_CLUSTER_BIN), redis-server and nginx.
// Run: node --test --test-force-exit tests/node/hubs.test.mjs

import { describe, test, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  flush,
  nonce,
  http,
  describeResponse,
  withTimeout,
} from "./helpers.mjs";

const T = 60000;
const PAIRS = 6; // six "apps", each with one connection to each hub

const CHAT = "/chat";
const NOTIFICATIONS = "/notifications";

let cluster;
let ids;

clusterForSuite({ instances: 3 }, (started) => {
  cluster = started;
  ids = cluster.instances.map((i) => i.id);
});

afterEach(async () => {
  await stopAllConnections();
});

/** A chat connection, with the instance that serves it. */
async function chatClient(transport, i) {
  const c = await connect(cluster.url, { transport, hubPath: CHAT, label: `chat-${transport}-${i}` });
  const who = await c.invoke("WhoAmI");
  assert.equal(who.connectionId, c.connectionId);
  c.instance = who.instance;
  return c;
}

/** A notifications connection; its instance comes from the server's `Welcome`. */
async function notificationsClient(transport, i) {
  const c = await connect(cluster.url, {
    transport,
    hubPath: NOTIFICATIONS,
    label: `notifications-${transport}-${i}`,
    start: false,
  });
  const welcome = record(c, "Welcome");
  await withTimeout(c.start(), 10000, `${c.label}: start()`);
  const [[hello]] = await welcome.next(1);
  assert.equal(hello.connectionId, c.connectionId, `Welcome: ${JSON.stringify(hello)}`);
  assert.ok(ids.includes(hello.instance), `Welcome.instance ${hello.instance} is not one of ${JSON.stringify(ids)}`);
  c.instance = hello.instance;
  return c;
}

/**
 * Connects `n` clients with `make(i)` so that the first three are on three different
 * instances. A client's requests follow a fixed pattern, so under nginx's round robin a
 * client that lands on a taken instance could keep landing there (with long polling, other
 * clients' polls shift the rotation too, unpredictably). Before each new attempt a random
 * number (0-2) of `/healthz` requests through nginx shifts the rotation, so each attempt
 * has at least a one-in-three chance; 30 attempts leave a miss at (2/3)^30, about 5e-6.
 */
async function connectSpread(n, make) {
  const clients = [];
  for (let i = 0; i < n; i++) {
    let c = await make(i);
    const wanted = Math.min(clients.length + 1, 3);
    for (let tries = 0; tries < 30 && new Set([...clients, c].map((x) => x.instance)).size < wanted; tries++) {
      await c.stop();
      const nudges = Math.floor(Math.random() * 3);
      for (let k = 0; k < nudges; k++) await http(`${cluster.url}/healthz`);
      c = await make(i);
    }
    clients.push(c);
  }
  return clients;
}

describe("two hubs of one cluster at once", () => {
  for (const transport of TRANSPORTS) {
    test(`over ${transport}: a topic and a room of the same name reach their own hub's members on every instance, and only them`, { timeout: T }, async () => {
      const chats = await connectSpread(PAIRS, (i) => chatClient(transport, i));
      const notes = await connectSpread(PAIRS, (i) => notificationsClient(transport, i));
      for (const clients of [chats, notes]) {
        const spread = new Set(clients.map((c) => c.instance));
        assert.equal(spread.size, 3, `${clients[0].label}…: on ${[...spread]} only`);
      }

      const name = nonce("same-name");
      for (const c of notes) assert.equal(await c.invoke("Subscribe", name), name);
      for (const c of chats) assert.equal(await c.invoke("JoinRoom", name), name);

      const noteText = nonce("note");
      const chatText = nonce("chat");
      const notified = notes.map((c) => record(c, "Notification", (n) => n.topic === name));
      const chatted = chats.map((c) => record(c, "ReceiveMessage", (m) => m.room === name));
      // Anything of one hub arriving at the other's connections is a leak.
      const leakedToChat = chats.map((c) => record(c, "Notification"));
      const leakedToNotes = notes.map((c) => record(c, "ReceiveMessage"));

      const publisher = notes[notes.length - 1];
      const published = await publisher.invoke("Publish", name, noteText);
      assert.ok(Number.isInteger(published) && published >= 1, `Publish returned ${published}`);
      await chats[0].invoke("SendToRoom", name, chatText);

      for (const [i, rec] of notified.entries()) {
        const [[n]] = await rec.next(1);
        assert.equal(n.text, noteText, `${notes[i].label} got ${JSON.stringify(n)}`);
        assert.equal(n.from, publisher.connectionId);
        assert.equal(n.instance, publisher.instance);
      }
      for (const [i, rec] of chatted.entries()) {
        const [[m]] = await rec.next(1);
        assert.equal(m.text, chatText, `${chats[i].label} got ${JSON.stringify(m)}`);
      }
      // Markers sent after everything above, on each hub: once every receiver has its
      // hub's marker, whatever was going to leak has arrived too (one sender's messages keep
      // their order), so "nothing leaked" needs no waiting window.
      await flush(chats[0], chats);
      const marker = nonce("note-marker");
      await publisher.invoke("Publish", name, marker);
      await Promise.all(notified.map((r) => r.waitFor((n) => n.text === marker, 15000, "the marker notification")));
      leakedToChat.forEach((r) => r.assertNone());
      leakedToNotes.forEach((r) => r.assertNone());
      notified.forEach((r) => r.assertNone((n) => n.text !== noteText && n.text !== marker));

      // Leaving the topic stops its notifications on every instance; the room is untouched.
      const leavers = notes.slice(0, 3);
      const markerTopic = nonce("marker-topic");
      for (const c of leavers) assert.equal(await c.invoke("Subscribe", markerTopic), markerTopic);
      const markers = leavers.map((c) => record(c, "Notification", (n) => n.topic === markerTopic));
      for (const c of leavers) assert.equal(await c.invoke("Unsubscribe", name), name);
      const second = nonce("note2");
      await publisher.invoke("Publish", name, second);
      for (const rec of notified.slice(3)) {
        await rec.waitFor((n) => n.text === second, 15000, "the second notification");
      }
      // Published after the second note by the same connection: once it is in, the second
      // note would have been too.
      await publisher.invoke("Publish", markerTopic, nonce("after"));
      await Promise.all(markers.map((r) => r.next(1, 15000)));
      notified.slice(0, 3).forEach((r) => r.assertNone((n) => n.text === second, "after Unsubscribe"));
    });
  }

  test("a method of one hub is unknown at the other", { timeout: T }, async () => {
    const chat = await chatClient("WebSockets", 0);
    const notes = await notificationsClient("LongPolling", 0);
    await assert.rejects(notes.invoke("WhoAmI"), /Unknown hub method 'WhoAmI'/);
    await assert.rejects(chat.invoke("Publish", "t", "x"), /Unknown hub method 'Publish'/);
  });

  test("a connection token of one hub is refused (404) at the other hub's path on every instance, without forwarding", { timeout: T }, async () => {
    for (const [from, to] of [
      [CHAT, NOTIFICATIONS],
      [NOTIFICATIONS, CHAT],
    ]) {
      const owner = cluster.instances[0].url;
      const neg = await http(`${owner}${from}/negotiate?negotiateVersion=1`, { method: "POST" });
      assert.equal(neg.status, 200, describeResponse(neg));
      const token = neg.json.connectionToken;
      assert.ok(token, describeResponse(neg));
      // The token works where it was minted…
      const own = await http(`${owner}${from}?id=${token}`, { method: "DELETE" });
      assert.notEqual(own.status, 404, `own hub: ${describeResponse(own)}`);
      for (const instance of cluster.instances) {
        for (const [method, body] of [
          ["GET", undefined],
          ["POST", "{}\u001e"],
          ["DELETE", undefined],
        ]) {
          const r = await http(`${instance.url}${to}?id=${token}`, { method, body });
          assert.equal(r.status, 404, `${method} ${to} on ${instance.id} with a ${from} token: ${describeResponse(r)}`);
          assert.equal(r.headers.get("x-stickless-forward-attempts"), null, "it was forwarded");
        }
      }
    }
  });
});
