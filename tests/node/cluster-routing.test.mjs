// The selling points with the official client: clusters behind the repo's plain round-robin
// nginx (no sticky sessions) at several sizes, with pure load-balancer routing (no
// ADVERTISE_URL, every misrouted request re-forwarded through nginx) and with direct
// routing, over every transport: every client connects, every invocation succeeds, every
// broadcast reaches everyone, and the routing mode under test is the one that served.
//
// Sizes: load-balancer routing runs at 2 instances only. Each misrouted request is
// re-forwarded through the balancer until it meets its owner, at most MAX_FORWARD_ATTEMPTS
// (10) times; with other clients' requests interleaving, each attempt misses with up to
// (N-1)/N, so a request is lost with up to ((N-1)/N)^10: 0.1 % at N=2 but 1.7 % at N=3, and
// a test sends hundreds of them (at N=3 a long poll was seen to miss and end its
// connection). An open issue changes the re-forwarding; until then larger sizes would
// flake. Direct routing never misses and runs at 2 and 5.
//
// Then SIGTERM failover against a real cluster: clients with automatic reconnect move to
// another instance; the stopping instance answers negotiate and /healthz with 503.

import { describe, test, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  RS,
  HubConnectionState,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  nextEvent,
  nonce,
  http,
  rawNegotiate,
  rawLongPolling,
  describeResponse,
  metric,
  instancePids,
  waitUntil,
  withTimeout,
} from "./helpers.mjs";

const FORWARDED = "stickless_forwarded_requests_total";

/** Connects one official client through nginx and pins its instance (WhoAmI). */
async function connectOne(cluster, opts) {
  const ids = cluster.instances.map((i) => i.id);
  const c = await connect(cluster.url, { startTimeoutMs: 20000, ...opts });
  const who = await withTimeout(c.invoke("WhoAmI"), 15000, `${c.label}: WhoAmI`);
  assert.equal(who.connectionId, c.connectionId);
  assert.equal(who.transport, c.transportName);
  assert.ok(ids.includes(who.instance), `WhoAmI.instance ${who.instance} is not one of ${JSON.stringify(ids)}`);
  c.instance = who.instance;
  return c;
}

/**
 * Connects at least `n` clients through nginx and goes on until every instance serves one.
 * A client's requests follow a fixed pattern, so under round robin they would keep landing
 * on the same instances; a random number of /healthz requests through nginx before each
 * client shifts the rotation.
 */
async function connectSpread(cluster, n, opts) {
  const size = cluster.instances.length;
  const clients = [];
  const served = () => new Set(clients.map((c) => c.instance)).size;
  while (clients.length < n || served() < size) {
    assert.ok(clients.length < n + 8 * size, `after ${clients.length} clients only ${served()} of ${size} instances serve one`);
    const nudges = Math.floor(Math.random() * size);
    for (let k = 0; k < nudges; k++) await http(`${cluster.url}/healthz`);
    clients.push(await connectOne(cluster, opts));
  }
  return clients;
}

/** Every client sends one broadcast; every client must receive all of them. */
async function everyoneHearsEveryone(clients) {
  const tag = nonce("all");
  const expected = clients.map((_, i) => `${tag}:${i}`).sort();
  const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag + ":")));
  await Promise.all(clients.map((c, i) => withTimeout(c.invoke("Send", `${tag}:${i}`), 15000, `${c.label}: Send`)));
  for (const [i, rec] of recs.entries()) {
    const got = await rec.next(clients.length, 20000);
    assert.deepEqual(got.map(([m]) => m).sort(), expected, `client ${i} (${clients[i].label} on ${clients[i].instance})`);
    rec.dispose();
  }
}

const CONFIGS = [
  { instances: 2, directRouting: false },
  { instances: 2, directRouting: true },
  { instances: 5, directRouting: true },
];

for (const { instances, directRouting } of CONFIGS) {
  const mode = directRouting ? "direct" : "load_balancer";
  describe(`cluster of ${instances} behind round-robin nginx, ${directRouting ? "direct routing" : "load-balancer routing only"}`, () => {
    let cluster;
    let urls;
    // The route under test alone (the bus route would otherwise serve what the load
    // balancer or the direct hop should).
    const instanceEnv = { ROUTES: directRouting ? "adopt,direct" : "adopt,load-balancer" };
    clusterForSuite({ instances, directRouting, instanceEnv }, (started) => {
      cluster = started;
      urls = cluster.instances.map((i) => i.url);
    });
    afterEach(stopAllConnections, { timeout: 20000 });

    for (const transport of TRANSPORTS) {
      test(`${transport}: clients on every instance connect, every invocation succeeds, every broadcast reaches everyone`, { timeout: 120000 }, async () => {
        const count = async (labels) => metric(urls, FORWARDED, labels);
        const before = {
          served: await count({ mode, outcome: "served" }),
          other: await count({ mode: directRouting ? "load_balancer" : "direct" }),
          adopted: await metric(urls, "stickless_adopted_websockets_total"),
        };

        const clients = await connectSpread(cluster, 2 * instances, { transport });
        for (const c of clients) {
          for (let k = 0; k < 3; k++) {
            const who = await withTimeout(c.invoke("WhoAmI"), 15000, `${c.label}: WhoAmI #${k}`);
            assert.deepEqual(who, { instance: c.instance, connectionId: c.connectionId, transport });
          }
        }
        await everyoneHearsEveryone(clients);

        if (transport === "WebSockets") {
          // Negotiate and the socket alternate between instances: fresh tokens are adopted.
          assert.ok((await metric(urls, "stickless_adopted_websockets_total")) > before.adopted, "no WebSocket was adopted");
        } else {
          // Polls, sends and streams that landed elsewhere were served through the mode
          // under test, and never through the other one.
          const served = (await count({ mode, outcome: "served" })) - before.served;
          assert.ok(served > 0, `no request was forwarded in ${mode} mode`);
          if (!directRouting) {
            assert.equal(await count({ mode: "direct" }), before.other, "direct forwarding without ADVERTISE_URL");
          }
        }
        // A missed or failed forward shows up above as a failed invocation or a lost
        // broadcast. (The not_found count is not asserted: a client's last request after
        // its connection ended is a legitimate 404, and can trail into the next test.)
      });
    }

    test("mixed transports on every instance hear each other", { timeout: 120000 }, async () => {
      const clients = [];
      for (const transport of TRANSPORTS) clients.push(...(await connectSpread(cluster, instances, { transport })));
      await everyoneHearsEveryone(clients);
    });
  });
}

describe("SIGTERM failover in a cluster of 3 (official clients with automatic reconnect)", () => {
  let cluster;
  const firstLandings = [];
  // SHUTDOWN_TIMEOUT keeps the stopping instance up while a hand-driven long polling
  // connection has not collected its Close message, so its 503s can be checked without
  // racing its exit (a deadline, not a timing claim); DISCONNECT_TIMEOUT keeps that
  // connection meanwhile.
  const instanceEnv = { SHUTDOWN_TIMEOUT: "10s", DISCONNECT_TIMEOUT: "60s" };
  clusterForSuite({ instances: 3, instanceEnv }, (started) => {
    cluster = started;
  });

  test("clients on the stopped instance move to another; the others stay; 503 while stopping", { timeout: 120000 }, async () => {
    const ids = cluster.instances.map((i) => i.id);
    const victim = cluster.instances[0];
    const survivors = ids.filter((id) => id !== victim.id);
    const reconnect = [0, 100, 200, 500, 1000, 1000, 1000, 2000, 2000, 2000, 2000, 2000];

    // Connect until every transport has a client on the victim and one elsewhere.
    const clients = [];
    for (const transport of TRANSPORTS) {
      for (let k = 0; k < 12; k++) {
        const mine = clients.filter((c) => c.transportName === transport);
        if (mine.some((c) => c.instance === victim.id) && mine.some((c) => c.instance !== victim.id)) break;
        clients.push(await connectOne(cluster, { transport, reconnect }));
      }
      const mine = clients.filter((c) => c.transportName === transport);
      assert.ok(mine.some((c) => c.instance === victim.id), `no ${transport} client reached ${victim.id}`);
    }
    const moving = clients.filter((c) => c.instance === victim.id);
    const staying = clients.filter((c) => c.instance !== victim.id);
    const reconnected = moving.map((c) => nextEvent(c, "reconnected", 60000));
    const stayingEvents = [];
    for (const c of staying) c.onreconnecting(() => stayingEvents.push(c.label));

    // A hand-driven long polling connection on the victim that will not poll until told.
    const neg = await rawNegotiate(victim.url, "negotiateVersion=1");
    assert.equal(neg.status, 200, describeResponse(neg));
    const holder = rawLongPolling(neg.json.connectionToken);
    assert.equal((await holder.poll(victim.url)).status, 200);
    assert.equal((await holder.send(victim.url, `{"protocol":"json","version":1}${RS}`)).status, 200);
    await holder.pollUntil(victim.url, (recs) => recs.length >= 1);
    assert.deepEqual(holder.received, [{}]);

    const pid = instancePids(cluster).get(victim.id);
    assert.ok(pid, `no pid for ${victim.id}: ${JSON.stringify([...instancePids(cluster)])}`);
    process.kill(pid, "SIGTERM");

    const health = await waitUntil(
      async () => {
        const r = await http(`${victim.url}/healthz`);
        return r.status === 503 ? r : undefined;
      },
      15000,
      "/healthz 503 on the stopping instance",
    );
    assert.equal(health.json?.status, "draining", describeResponse(health));
    assert.equal(health.json?.instance, victim.id);
    const refused = await rawNegotiate(victim.url, "negotiateVersion=1");
    assert.equal(refused.status, 503, `negotiate while stopping: ${describeResponse(refused)}`);

    // The holder collects its Close message (allowReconnect) with its next poll.
    const recs = await holder.pollUntil(victim.url, (rs) => rs.some((m) => m.type === 7));
    const close = recs.find((m) => m.type === 7);
    assert.equal(close.allowReconnect, true, JSON.stringify(close));

    // Every client of the victim reconnects through nginx and ends up on another instance.
    await Promise.all(reconnected);
    for (const c of moving) {
      assert.ok(c.logger.has("Close message received from server."), `${c.label} got no Close message`);
      const who = await withTimeout(c.invoke("WhoAmI"), 15000, `${c.label}: WhoAmI after reconnect`);
      firstLandings.push({ label: c.label, instance: who.instance });
      c.instance = who.instance;
    }
    for (const c of moving) {
      // The stopping instance adopts no WebSocket (503, which nginx retries elsewhere: see
      // the test below); the loop only waits out a client that still landed there.
      while (!survivors.includes(c.instance)) {
        await nextEvent(c, "reconnected", 60000, `${c.label}: reconnect away from the stopped instance`);
        c.instance = (await withTimeout(c.invoke("WhoAmI"), 15000, `${c.label}: WhoAmI`)).instance;
      }
      assert.equal(c.state, HubConnectionState.Connected);
    }
    // An event stream or a long poll that nginx happened to send through the stopped
    // instance is relayed by it to its owner, and is cut when it exits: such a client
    // reconnects (README, "Known limits"). A WebSocket of another instance never passes
    // through it (a fresh WebSocket is adopted where it lands), so none may reconnect.
    assert.deepEqual(
      stayingEvents.filter((label) => label.startsWith("WebSockets")),
      [],
      "WebSocket clients of other instances reconnected",
    );
    await everyoneHearsEveryone(clients);
    await waitUntil(
      () => http(`${victim.url}/healthz`, { timeoutMs: 2000 }).then(() => undefined, () => true),
      30000,
      "the stopped instance to exit",
    );
  });

  test(
    "a stopping instance sends reconnecting clients elsewhere (no WebSocket adopted there)",
    () => {
      assert.ok(firstLandings.length > 0, "the failover test did not run");
      const victimId = cluster.instances[0].id;
      assert.deepEqual(firstLandings.filter((l) => l.instance === victimId), [], "reconnected to the stopping instance");
    },
  );
});
