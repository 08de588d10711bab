// Interop tests: the official @microsoft/signalr client against a stickless CLUSTER
// (redis + 3 instances behind a plain round-robin nginx, no sticky sessions), through the
// nginx URL, over each transport; plus raw requests that hit the instances directly.
//
// Needs target/debug/stickless-cluster (or STICKLESS_CLUSTER_BIN), redis-server and nginx.
// Run: npm run test:cluster

import { describe, test, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  RS,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  collectStream,
  nonce,
  http,
  rawNegotiate,
  rawLongPolling,
  forgeToken,
  describeResponse,
  withTimeout,
  flush,
} from "./helpers.mjs";

const T = 30000;
const CLIENTS = 6;

let cluster;
let ids;

clusterForSuite({ instances: 3 }, (started) => {
  cluster = started;
  ids = cluster.instances.map((i) => i.id);
});

/** Connects `n` clients (sequentially, so round-robin spreads them) and asks each WhoAmI. */
async function connectMany(n, opts) {
  const clients = [];
  for (let i = 0; i < n; i++) {
    const c = await connect(cluster.url, opts(i));
    const who = await c.invoke("WhoAmI");
    assert.deepEqual(Object.keys(who).sort(), ["connectionId", "instance", "transport"], `WhoAmI: ${JSON.stringify(who)}`);
    assert.equal(who.connectionId, c.connectionId);
    assert.equal(who.transport, c.transportName);
    assert.ok(ids.includes(who.instance), `WhoAmI.instance ${who.instance} is not one of ${JSON.stringify(ids)}`);
    c.instance = who.instance;
    clients.push(c);
  }
  return clients;
}

const instancesOf = (clients) => new Set(clients.map((c) => c.instance));

/** Picks clients so that the picked ones are on as many different instances as possible. */
function spread(clients, k) {
  const picked = [];
  const seen = new Set();
  for (const c of clients) {
    if (picked.length < k && !seen.has(c.instance)) {
      picked.push(c);
      seen.add(c.instance);
    }
  }
  for (const c of clients) if (picked.length < k && !picked.includes(c)) picked.push(c);
  return picked;
}

describe("cluster: health", () => {
  test("every instance reports the redis backplane; nginx spreads requests", { timeout: T }, async () => {
    for (const inst of cluster.instances) {
      const r = await http(`${inst.url}/healthz`);
      assert.equal(r.status, 200, `${inst.url}/healthz: ${describeResponse(r)}`);
      assert.equal(r.json?.instance, inst.id);
      assert.equal(r.headers.get("x-stickless-instance"), inst.id);
      assert.equal(r.json?.backplane, "redis");
      assert.equal(r.json?.status, "ok");
    }
    const seen = new Set();
    for (let i = 0; i < 6; i++) {
      const r = await http(`${cluster.url}/healthz`);
      assert.equal(r.status, 200, describeResponse(r));
      seen.add(r.headers.get("x-stickless-instance"));
    }
    assert.ok(seen.size >= 2, `6 requests through nginx all reached ${[...seen]}`);
  });
});

for (const transport of TRANSPORTS) {
  describe(`cluster over ${transport}`, () => {
    afterEach(stopAllConnections, { timeout: 20000 });
    const sameTransport = () => ({ transport });

    test(`${CLIENTS} clients spread over ≥ 2 instances, each WhoAmI works`, { timeout: T }, async () => {
      const clients = await connectMany(CLIENTS, sameTransport);
      assert.ok(instancesOf(clients).size >= 2, `all ${CLIENTS} clients are served by ${[...instancesOf(clients)]}`);
    });

    test("every Send reaches every client", { timeout: T }, async () => {
      const clients = await connectMany(CLIENTS, sameTransport);
      const tag = nonce("cl-all");
      const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag)));
      const expected = clients.map((_, i) => `${tag}:${i}`).sort();
      await Promise.all(clients.map((c, i) => c.send("Send", `${tag}:${i}`)));
      for (const [i, rec] of recs.entries()) {
        const got = await rec.next(CLIENTS, 15000);
        assert.deepEqual(got.map(([m]) => m).sort(), expected, `client ${i} on ${clients[i].instance}`);
      }
      await flush(clients[0], clients);
      recs.forEach((r) => r.assertNone((m) => !expected.includes(m)));
    });

    test("SendMessage carries the sender's instance and transport", { timeout: T }, async () => {
      const clients = await connectMany(CLIENTS, sameTransport);
      const [a] = spread(clients, 2);
      const tag = nonce("cl-msg");
      const recs = clients.map((c) => record(c, "ReceiveMessage", (m) => m?.text === tag));
      await a.invoke("SendMessage", tag);
      for (const rec of recs) {
        const [[msg]] = await rec.next(1, 10000);
        assert.equal(msg.connectionId, a.connectionId);
        assert.equal(msg.instance, a.instance);
        assert.equal(msg.transport, transport);
      }
    });

    test("SendToRoom reaches members on every instance and nobody else", { timeout: T }, async () => {
      const clients = await connectMany(CLIENTS, sameTransport);
      const members = spread(clients, 3);
      const others = clients.filter((c) => !members.includes(c));
      const room = nonce("cl-room");
      for (const m of members) assert.equal(await m.invoke("JoinRoom", room), room);
      const tag = nonce("cl-room-msg");
      const recs = new Map(clients.map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag)]));
      // Sent by a member whose instance differs from at least one other member.
      await members[0].invoke("SendToRoom", room, tag);
      for (const m of members) {
        const [[msg]] = await recs.get(m).next(1, 10000);
        assert.equal(msg.room, room);
        assert.equal(msg.connectionId, members[0].connectionId);
      }
      await flush(members[0], clients);
      others.forEach((o) => recs.get(o).assertNone());
      // A member on another instance leaves; it no longer receives.
      const leaver = members[members.length - 1];
      assert.equal(await leaver.invoke("LeaveRoom", room), room);
      const tag2 = nonce("cl-room-msg2");
      const recs2 = new Map(clients.map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag2)]));
      await members[0].invoke("SendToRoom", room, tag2);
      for (const m of members.slice(0, -1)) await recs2.get(m).next(1, 10000);
      await flush(members[0], clients);
      [leaver, ...others].forEach((o) => recs2.get(o).assertNone());
    });

    test("SendTo reaches exactly the target connection on another instance", { timeout: T }, async () => {
      const clients = await connectMany(CLIENTS, sameTransport);
      const sender = clients[0];
      const target = clients.find((c) => c.instance !== sender.instance) ?? clients[1];
      assert.notEqual(target.instance, sender.instance, "could not find clients on two instances");
      const tag = nonce("cl-to");
      const recs = new Map(clients.map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag)]));
      await sender.invoke("SendTo", target.connectionId, tag);
      const [[msg]] = await recs.get(target).next(1, 10000);
      assert.equal(msg.to, target.connectionId);
      assert.equal(msg.connectionId, sender.connectionId);
      await flush(sender, clients);
      clients.filter((c) => c !== target).forEach((c) => recs.get(c).assertNone());
    });

    test("SendToUser reaches all of that user's connections across instances", { timeout: T }, async () => {
      const alice = await connectMany(3, () => ({ transport, accessTokenFactory: () => "alice" }));
      while (instancesOf(alice).size < 2 && alice.length < 6) {
        alice.push(...(await connectMany(1, () => ({ transport, accessTokenFactory: () => "alice" }))));
      }
      assert.ok(instancesOf(alice).size >= 2, `alice's ${alice.length} connections all on ${[...instancesOf(alice)]}`);
      const bob = await connectMany(2, () => ({ transport, accessTokenFactory: () => "bob" }));
      const [sender] = await connectMany(1, sameTransport);
      const tag = nonce("cl-user");
      const recs = new Map([...alice, ...bob, sender].map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag)]));
      await sender.invoke("SendToUser", "alice", tag);
      for (const a of alice) {
        const [[msg]] = await recs.get(a).next(1, 10000);
        assert.equal(msg.toUser, "alice");
      }
      await flush(sender, [...alice, ...bob, sender]);
      [...bob, sender].forEach((c) => recs.get(c).assertNone());
    });

    test("20 sequential WhoAmI invocations all succeed with the same answer", { timeout: 60000 }, async () => {
      const [c] = await connectMany(1, sameTransport);
      for (let i = 0; i < 20; i++) {
        const who = await withTimeout(c.invoke("WhoAmI"), 10000, `WhoAmI #${i}`);
        assert.deepEqual(who, { instance: c.instance, connectionId: c.connectionId, transport }, `WhoAmI #${i}`);
      }
    });

    test("a Counter stream and a burst of 100 sends work through the load balancer", { timeout: 60000 }, async () => {
      const [c] = await connectMany(1, sameTransport);
      assert.deepEqual(await collectStream(c, "Counter", [5, 10], 10000), [0, 1, 2, 3, 4]);
      const tag = nonce("cl-burst");
      const rec = record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag + ":"));
      const sends = [];
      for (let i = 0; i < 100; i++) sends.push(c.send("Send", `${tag}:${i}`));
      await withTimeout(Promise.all(sends), 20000, "100 send() promises");
      const got = await rec.next(100, 30000);
      assert.deepEqual(
        got.map(([m]) => Number(m.slice(tag.length + 1))),
        Array.from({ length: 100 }, (_, i) => i),
      );
    });
  });
}

describe("cluster, clients on mixed transports", () => {
  afterEach(stopAllConnections, { timeout: 20000 });

  test("a Send from each of 6 clients (2 per transport) reaches all of them", { timeout: T }, async () => {
    const clients = await connectMany(CLIENTS, (i) => ({ transport: TRANSPORTS[i % 3] }));
    assert.ok(instancesOf(clients).size >= 2, `all clients on ${[...instancesOf(clients)]}`);
    const tag = nonce("cl-mix");
    const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag)));
    const expected = clients.map((c, i) => `${tag}:${c.transportName}:${i}`).sort();
    await Promise.all(clients.map((c, i) => c.send("Send", `${tag}:${c.transportName}:${i}`)));
    for (const [i, rec] of recs.entries()) {
      const got = await rec.next(CLIENTS, 15000);
      assert.deepEqual(got.map(([m]) => m).sort(), expected, `client ${i} (${clients[i].transportName} on ${clients[i].instance})`);
    }
  });

  test("SendTo and SendToUser between transports and instances", { timeout: T }, async () => {
    const clients = await connectMany(CLIENTS, (i) => ({
      transport: TRANSPORTS[i % 3],
      accessTokenFactory: i < 3 ? () => "carol" : undefined,
    }));
    const carol = clients.slice(0, 3);
    const rest = clients.slice(3);
    const tag = nonce("cl-mix-user");
    const recs = new Map(clients.map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag)]));
    await rest[0].invoke("SendToUser", "carol", tag);
    for (const c of carol) assert.equal((await recs.get(c).next(1, 10000))[0][0].toUser, "carol");
    await flush(rest[0], clients);
    rest.forEach((c) => recs.get(c).assertNone());

    const tag2 = nonce("cl-mix-to");
    const recs2 = new Map(clients.map((c) => [c, record(c, "ReceiveMessage", (m) => m?.text === tag2)]));
    for (const [i, c] of clients.entries()) {
      const target = clients[(i + 1) % clients.length];
      await c.invoke("SendTo", target.connectionId, `${tag2}`);
    }
    for (const [i, c] of clients.entries()) {
      const [[msg]] = await recs2.get(c).next(1, 10000);
      assert.equal(msg.to, c.connectionId);
      assert.equal(msg.connectionId, clients[(i - 1 + clients.length) % clients.length].connectionId);
    }
    // Every sender's marker after its SendTo: nothing else can still be on its way.
    for (const c of clients) await flush(c, clients);
    for (const c of clients) {
      assert.equal(recs2.get(c).items.length, 1, `${c.label} got ${JSON.stringify(recs2.get(c).items)}`);
    }
  });
});

describe("cluster: raw requests", () => {
  test("one Long Polling connection used through all instances directly", { timeout: T }, async () => {
    const [i0, i1, i2] = cluster.instances.map((i) => i.url);
    const neg = await rawNegotiate(i0, "negotiateVersion=1");
    assert.equal(neg.status, 200, describeResponse(neg));
    const lp = rawLongPolling(neg.json.connectionToken);

    const first = await lp.poll(i1, 5000);
    assert.equal(first.status, 200, `first poll via another instance: ${describeResponse(first)}`);
    assert.equal(first.text, "");

    const hs = await lp.send(i2, `{"protocol":"json","version":1}${RS}`);
    assert.equal(hs.status, 200, `handshake POST via a third instance: ${describeResponse(hs)}`);
    await lp.pollUntil([i0, i1, i2], (recs) => recs.length >= 1, 10000);
    assert.deepEqual(lp.received[0], {});

    const answers = [];
    for (let k = 0; k < 6; k++) {
      const base = [i0, i1, i2][k % 3];
      const post = await lp.sendMessages(base, { type: 1, invocationId: String(k), target: "WhoAmI", arguments: [] });
      assert.equal(post.status, 200, `POST via ${base}: ${describeResponse(post)}`);
      const recs = await lp.pollUntil([i2, i0, i1], (rs) => rs.some((m) => m.type === 3 && m.invocationId === String(k)), 10000);
      answers.push(recs.find((m) => m.type === 3 && m.invocationId === String(k)));
    }
    for (const a of answers) {
      assert.equal(a.error, undefined, JSON.stringify(a));
      assert.equal(a.result.connectionId, neg.json.connectionId);
      assert.equal(a.result.transport, "LongPolling");
      assert.equal(a.result.instance, answers[0].result.instance, "the owner changed between calls");
      assert.ok(ids.includes(a.result.instance));
    }

    const del = await lp.close(i1);
    assert.equal(del.status, 202, `DELETE via another instance: ${describeResponse(del)}`);
    const afterDel = await lp.poll(i2);
    assert.equal(afterDel.status, 404, `poll after DELETE: ${describeResponse(afterDel)}`);
  });

  test("unknown and forged tokens get 404 through nginx (no forwarding loop)", { timeout: T }, async () => {
    const garbage = await http(`${cluster.url}/chat?id=garbage`, {
      method: "POST",
      headers: { "Content-Type": "text/plain;charset=UTF-8" },
      body: `{"type":6}${RS}`,
    });
    assert.equal(garbage.status, 404, `POST /chat?id=garbage: ${describeResponse(garbage)}`);

    const neg = await rawNegotiate(cluster.url, "negotiateVersion=1");
    assert.equal(neg.status, 200, describeResponse(neg));
    const forged = forgeToken(neg.json.connectionToken);
    for (let k = 0; k < 3; k++) {
      const r = await rawLongPolling(forged).poll(cluster.url);
      assert.equal(r.status, 404, `forged token poll #${k}: ${describeResponse(r)}`);
    }
    const noId = await http(`${cluster.url}/chat`);
    assert.equal(noId.status, 400, `GET /chat: ${describeResponse(noId)}`);
    const getNeg = await http(`${cluster.url}/chat/negotiate`);
    assert.equal(getNeg.status, 405, `GET /chat/negotiate: ${describeResponse(getNeg)}`);
    // Clean up the negotiated (never used) connection.
    await rawLongPolling(neg.json.connectionToken).close(cluster.url);
  });
});
