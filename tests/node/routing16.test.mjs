// Routing at scale: 16 instances behind the repo's nginx.conf (plain round robin), redis,
// and the official @microsoft/signalr client on every transport, in three configurations
// that each enable ONE route to a connection held elsewhere (adoption off, so misrouted
// WebSockets take that route too):
//
//   direct         instances advertise their URL (ROUTES=direct)
//   bus            nothing advertised, requests relayed over redis (ROUTES=bus)
//   load-balancer  nothing advertised, re-forwarded through nginx (ROUTES=load-balancer,
//                  MAX_FORWARD_ATTEMPTS=auto sized from the heartbeat cluster size)
//
// In each: every client connects, every invocation succeeds, every client receives every
// broadcast, /metrics shows the configured route (and only it) served the forwards, forged
// and random tokens cause zero forwards while a real misrouted one does (positive
// control), and no instance crashed. The instances start once per configuration.
//
// Needs target/debug/stickless-cluster, redis-server and nginx. ROUTING_INSTANCES
// overrides the instance count (16).
// Run: node --test --test-force-exit tests/node/routing16.test.mjs

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  nonce,
  http,
  rawNegotiate,
  rawLongPolling,
  forgeToken,
  describeResponse,
  withTimeout,
} from "./helpers.mjs";

const INSTANCES = Number(process.env.ROUTING_INSTANCES ?? 16);
const PER_TRANSPORT = 6;
const INVOCATIONS = 3;

const CONFIGURATIONS = [
  { name: "direct", mode: "direct", directRouting: true, instanceEnv: { ROUTES: "direct" } },
  { name: "bus", mode: "bus", directRouting: false, instanceEnv: { ROUTES: "bus" } },
  {
    name: "load-balancer",
    mode: "load_balancer",
    directRouting: false,
    instanceEnv: { ROUTES: "load-balancer", MAX_FORWARD_ATTEMPTS: "auto" },
  },
];

/** Every sample of a metric family on one instance, as [labels, value]. */
async function samples(instanceUrl, name) {
  const r = await http(`${instanceUrl}/metrics`);
  assert.equal(r.status, 200, describeResponse(r));
  const out = [];
  for (const line of r.text.split("\n")) {
    const m = line.match(/^([a-z_]+)(\{[^}]*\})? (\S+)$/);
    if (m && m[1] === name) out.push([m[2] ?? "", Number(m[3])]);
  }
  return out;
}

async function clusterSum(cluster, name, labelFilter = () => true) {
  let sum = 0;
  for (const inst of cluster.instances) {
    for (const [labels, value] of await samples(inst.url, name)) if (labelFilter(labels)) sum += value;
  }
  return sum;
}

for (const config of CONFIGURATIONS) {
  describe(`${INSTANCES} instances, route: ${config.name}`, () => {
    let cluster;

    const options = {
      instances: INSTANCES,
      directRouting: config.directRouting,
      instanceEnv: config.instanceEnv,
      timeoutMs: 180000,
    };
    clusterForSuite(
      options,
      async (started) => {
        cluster = started;
        // Heartbeats: every instance knows the cluster's size before clients come.
        const deadline = Date.now() + 30000;
        for (const inst of cluster.instances) {
          for (;;) {
            const [[, size] = []] = await samples(inst.url, "stickless_cluster_instances");
            if (size === INSTANCES) break;
            assert.ok(Date.now() < deadline, `${inst.id} sees ${size} of ${INSTANCES} instances`);
            await new Promise((r) => setTimeout(r, 100));
          }
        }
      },
      { startTimeoutMs: 240000, stopTimeoutMs: 60000 },
    );

    test("every client on every transport connects, invokes and receives every broadcast", { timeout: 180000 }, async () => {
      const clients = [];
      for (let i = 0; i < PER_TRANSPORT; i++) {
        for (const transport of TRANSPORTS) clients.push(await connect(cluster.url, { transport, startTimeoutMs: 30000 }));
      }
      assert.equal(clients.length, PER_TRANSPORT * TRANSPORTS.length);
      const owners = new Set();
      for (const c of clients) {
        for (let k = 0; k < INVOCATIONS; k++) {
          const who = await withTimeout(c.invoke("WhoAmI"), 30000, `${c.label} WhoAmI #${k}`);
          assert.equal(who.connectionId, c.connectionId);
          assert.equal(who.transport, c.transportName);
          owners.add(who.instance);
        }
      }
      assert.ok(owners.size >= Math.min(INSTANCES, 8), `clients are held by only ${owners.size} instances`);

      const tag = nonce(`r16-${config.name}`);
      const expected = clients.map((_, i) => `${tag}:${i}`).sort();
      const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag)));
      await Promise.all(clients.map((c, i) => withTimeout(c.send("Send", `${tag}:${i}`), 30000, `${c.label} send`)));
      for (const [i, rec] of recs.entries()) {
        const got = await rec.next(clients.length, 60000);
        assert.deepEqual(got.map(([m]) => m).sort(), expected, `${clients[i].label} missed broadcasts`);
      }
      // (Checked while the clients are connected: stopping races the client's last sends
      // with the end of its connection, which gets 404 on any server.)
      // The configured route served the forwards, and nothing else did.
      const served = (mode) => (labels) => labels.includes(`mode="${mode}"`) && labels.includes('outcome="served"');
      assert.ok(
        (await clusterSum(cluster, "stickless_forwarded_requests_total", served(config.mode))) > 0,
        `no request was forwarded by mode ${config.mode}`,
      );
      for (const other of ["direct", "bus", "load_balancer"].filter((m) => m !== config.mode)) {
        assert.equal(
          await clusterSum(cluster, "stickless_forwarded_requests_total", (l) => l.includes(`mode="${other}"`)),
          0,
          `mode ${other} was used although only ${config.name} is enabled`,
        );
      }
      const failed = await clusterSum(
        cluster,
        "stickless_forwarded_requests_total",
        (l) => l.includes('outcome="failed"') || (l.includes('outcome="not_found"') && !l.includes('request="delete"')),
      );
      const detail = [];
      for (const inst of cluster.instances) {
        for (const [labels, v] of await samples(inst.url, "stickless_forwarded_requests_total")) detail.push(`${inst.id}${labels} ${v}`);
      }
      assert.equal(failed, 0, `some forwards failed or missed their owner:\n${detail.join("\n")}`);
      await stopAllConnections();
    });

    test("forged and random tokens cause zero forwards; a real misrouted token does", { timeout: 60000 }, async () => {
      // Each 404 must come from the instance asked, with no forward behind it: a forwarded
      // response carries X-Stickless-Forward-Attempts, and every request must be counted as
      // a bad token at the routing decision. (The cluster-wide forward counter is no
      // measure here: the previous test's clients may still have forwards in flight.)
      const sent = () => clusterSum(cluster, "stickless_forward_requests_sent_total");
      const badTokens = () =>
        clusterSum(cluster, "stickless_routing_rejections_total", (labels) => labels.includes('reason="bad_token"'));
      const before = await sent();
      const badBefore = await badTokens();
      const neg = await rawNegotiate(cluster.url, "negotiateVersion=1");
      assert.equal(neg.status, 200, describeResponse(neg));
      const forged = forgeToken(neg.json.connectionToken);
      let requests = 0;
      for (const token of [forged, "random", nonce("tok")]) {
        for (const inst of cluster.instances.slice(0, 4)) {
          const lp = rawLongPolling(token);
          for (const reply of [await lp.poll(inst.url), await lp.send(inst.url, "{}\u001e"), await lp.close(inst.url)]) {
            requests += 1;
            assert.equal(reply.status, 404, describeResponse(reply));
            assert.equal(reply.headers.get("x-stickless-instance"), inst.id, "answered by the instance asked");
            assert.equal(reply.headers.get("x-stickless-forward-attempts"), null, "a forged or random token was forwarded");
          }
        }
      }
      assert.equal(await badTokens(), badBefore + requests, "every forged or random token counted as bad");

      // Positive control: the real token, sent to an instance that does not hold it.
      const owner = neg.headers.get("x-stickless-instance");
      const other = cluster.instances.find((i) => i.id !== owner);
      const lp = rawLongPolling(neg.json.connectionToken);
      const handshake = await lp.send(other.url, `{"protocol":"json","version":1}\u001e`);
      assert.equal(handshake.status, 200, `handshake via ${other.id}: ${describeResponse(handshake)}`);
      assert.ok(Number(handshake.headers.get("x-stickless-forward-attempts")) >= 1, "the misrouted request was not forwarded");
      assert.ok((await sent()) > before, "the misrouted request was not counted as forwarded");
    });

    test("no instance crashed", { timeout: 30000 }, async () => {
      for (const inst of cluster.instances) {
        const r = await http(`${inst.url}/healthz`);
        assert.equal(r.status, 200, `${inst.id}: ${describeResponse(r)}`);
        assert.equal(r.json?.status, "ok");
      }
    });
  });
}
