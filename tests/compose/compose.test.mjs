// The official @microsoft/signalr client against the docker compose demo, through the port
// nginx publishes. scripts/compose-test.sh starts the stack and runs this file once per
// phase, with:
//   STICKLESS_URL      the published address (http://127.0.0.1:PORT)
//   COMPOSE_PHASE      `serve`: every replica serves every transport and a message reaches
//                      every client; `restart`: restarting one app container moves its
//                      clients (automatic reconnect) to the other replicas
//   EXPECT_INSTANCES   how many app replicas the stack runs now
//   DOCKER             the docker command (`restart` phase), default `docker`
//
// Instances pick their id as "<host name>-<random suffix>", and a container's host name is
// its short id: that is how the restart phase finds the container behind an instance.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import {
  HubConnectionState,
  TRANSPORTS,
  connect,
  http,
  nextEvent,
  nonce,
  record,
  stopAllConnections,
  withTimeout,
} from "../node/helpers.mjs";

const URL = process.env.STICKLESS_URL;
const PHASE = process.env.COMPOSE_PHASE ?? "serve";
const INSTANCES = Number(process.env.EXPECT_INSTANCES ?? "2");
const DOCKER = process.env.DOCKER ?? "docker";
assert.ok(URL, "STICKLESS_URL must be set (scripts/compose-test.sh sets it)");

// Bounds on how many tries it may take a random balancer to reach every replica: the
// chance of missing one replica in 40·N tries is below N·(1 − 1/N)^(40·N) ≈ N·e^−40.
const NEGOTIATIONS_PER_INSTANCE = 40;
const CLIENTS_PER_INSTANCE = 40;

after(stopAllConnections);

async function whoAmI(connection) {
  return withTimeout(connection.invoke("WhoAmI"), 10000, `${connection.label}: WhoAmI`);
}

/** Connects clients on `transport` until every replica holds at least `each` of them. */
async function clientsOnEveryInstance(transport, { each = 1, reconnect } = {}) {
  const byInstance = new Map();
  const all = [];
  for (let i = 0; i < CLIENTS_PER_INSTANCE * INSTANCES; i++) {
    const connection = await connect(URL, { transport, reconnect });
    const me = await whoAmI(connection);
    assert.equal(me.transport, transport, "the transport the server reports");
    connection.instance = me.instance;
    all.push(connection);
    byInstance.set(me.instance, (byInstance.get(me.instance) ?? 0) + 1);
    if (byInstance.size === INSTANCES && [...byInstance.values()].every((n) => n >= each)) break;
  }
  assert.equal(
    byInstance.size,
    INSTANCES,
    `${transport} clients reached ${byInstance.size} of ${INSTANCES} replicas: ${JSON.stringify([...byInstance])}`,
  );
  return all;
}

/** One client sends a message; every client in `clients` must receive it. */
async function messageReachesEveryone(clients) {
  const text = nonce("compose");
  const received = clients.map((c) => record(c, "Send", (m) => m === text));
  await withTimeout(clients[0].invoke("Send", text), 10000, "Send");
  await Promise.all(received.map((r) => r.next(1, 15000)));
}

if (PHASE === "serve") {
  describe(`docker compose with ${INSTANCES} app replicas, through nginx`, () => {
    test(`all ${INSTANCES} replicas answer negotiate through the published port`, async () => {
      const seen = new Map();
      for (let i = 0; i < NEGOTIATIONS_PER_INSTANCE * INSTANCES && seen.size < INSTANCES; i++) {
        const r = await http(`${URL}/chat/negotiate?negotiateVersion=1`, { method: "POST" });
        assert.equal(r.status, 200, r.text);
        assert.ok(r.json?.connectionToken, `a connection token: ${r.text}`);
        const instance = r.headers.get("x-stickless-instance");
        seen.set(instance, (seen.get(instance) ?? 0) + 1);
      }
      assert.equal(seen.size, INSTANCES, `replicas seen: ${JSON.stringify([...seen])}`);
    });

    test("the chat page and its assets load through the published port", async () => {
      const page = await http(`${URL}/`);
      assert.equal(page.status, 200, page.text);
      assert.match(page.headers.get("content-type") ?? "", /text\/html/);
      assert.match(page.text, /<title>stickless chat<\/title>/);
      const assets = [...page.text.matchAll(/(?:src|href)="\/?([^":]+\.(?:js|css))"/g)].map((m) => m[1]);
      assert.ok(assets.length > 0, "the page links its scripts and styles");
      for (const asset of assets) {
        const r = await http(`${URL}/${asset}`);
        assert.equal(r.status, 200, `${asset}: ${r.status}`);
      }
    });

    const everyone = [];
    for (const transport of TRANSPORTS) {
      test(`${transport}: clients are served by every replica`, async () => {
        everyone.push(...(await clientsOnEveryInstance(transport)));
      });
    }

    test("a message from one client reaches every client, on every replica and transport", async () => {
      assert.ok(everyone.length >= INSTANCES * TRANSPORTS.length, "the clients of the tests above");
      await messageReachesEveryone(everyone);
    });
  });
} else if (PHASE === "restart") {
  describe(`restarting one of ${INSTANCES} app containers`, () => {
    test("its clients reconnect to the other replicas, and messages still reach everyone", async () => {
      // Automatic reconnect at once, then quickly: the client's own defaults wait up to 30 s.
      const reconnect = [0, 500, 1000, 2000, 2000, 2000, 2000, 2000, 2000, 2000];
      const clients = [];
      for (const transport of TRANSPORTS) {
        clients.push(...(await clientsOnEveryInstance(transport, { reconnect })));
      }
      const victim = clients[0].instance;
      const container = victim.slice(0, victim.lastIndexOf("-"));
      const moving = clients.filter((c) => c.instance === victim);
      const transportsMoving = new Set(moving.map((c) => c.transportName));
      assert.equal(transportsMoving.size, TRANSPORTS.length, "the restarted replica holds every transport");

      const reconnected = moving.map((c) =>
        nextEvent(c, "reconnected", 90000, `${c.label} (on ${victim}): onreconnected`),
      );
      await promisify(execFile)(DOCKER, ["restart", container], { timeout: 90000 });
      await Promise.all(reconnected);

      for (const c of clients) {
        if (c.state !== HubConnectionState.Connected) {
          await nextEvent(c, "reconnected", 60000, `${c.label}: back to Connected`);
        }
      }
      for (const c of moving) {
        const me = await whoAmI(c);
        assert.notEqual(me.instance, victim, `${c.label} is served by a live instance`);
        assert.equal(me.transport, c.transportName);
      }
      await messageReachesEveryone(clients);
    });
  });
} else {
  throw new Error(`unknown COMPOSE_PHASE ${PHASE}`);
}
