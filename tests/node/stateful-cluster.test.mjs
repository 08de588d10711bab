// Stateful reconnect across a real 3-instance cluster behind the repo's nginx.conf (plain
// round robin), with the official client's `withStatefulReconnect()`, in both routing
// configurations: `direct` (instances advertise their URL) and `bus` (nothing advertised,
// everything relayed over Redis).
//
// Under a steady numbered broadcast: nginx's workers are killed (every socket drops at
// once; the master starts new ones), then one instance is stopped with SIGTERM (it drains),
// then every instance is restarted in turn (SIGTERM, start again: a rolling restart).
// Every stateful client must keep its connectionId and receive every confirmed message
// exactly once and in order; SSE and Long Polling clients stay connected or reconnect.
// Then an instance killed with SIGKILL: its stateful clients only reconnect (a new
// connection) within 5 seconds.

import { describe, test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import {
  HubConnectionState,
  clusterForSuite,
  connect,
  stopAllConnections,
  record,
  nonce,
  metric,
  waitUntil,
  instancePids,
} from "./helpers.mjs";
import { SteadySender, TcpProxy, assertExactlyOnceInOrder } from "./stateful-helpers.mjs";

const T = 180000;
const STATEFUL_CLIENTS = 6;
/** Automatic reconnect delays of the SSE and Long Polling clients: enough for a rolling restart. */
const RETRIES = [0, 200, 500, 1000, 2000, 2000, 2000, 2000, 5000, 5000, 5000];

const CONFIGS = [
  // SHUTDOWN_TIMEOUT under the launcher's 5 s grace before it SIGKILLs a restarting instance.
  { name: "direct", directRouting: true, instanceEnv: { SHUTDOWN_TIMEOUT: "4s" } },
  { name: "bus only", directRouting: false, instanceEnv: { ROUTES: "bus", SHUTDOWN_TIMEOUT: "4s" } },
];

/** The pids of the launcher's children and their children whose command line mentions `name`. */
function descendants(rootPid) {
  const out = [];
  const walk = (pid) => {
    let tasks;
    try {
      tasks = readdirSync(`/proc/${pid}/task`);
    } catch {
      return;
    }
    for (const task of tasks) {
      let text = "";
      try {
        text = readFileSync(`/proc/${pid}/task/${task}/children`, "utf8").trim();
      } catch {
        continue;
      }
      for (const child of text ? text.split(/\s+/).map(Number) : []) {
        out.push(child);
        walk(child);
      }
    }
  };
  walk(rootPid);
  return out;
}

function cmdline(pid) {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
  } catch {
    return "";
  }
}

/** Kills nginx's worker processes: every proxied socket drops; the master starts new workers. */
function killNginxWorkers(cluster) {
  const workers = descendants(cluster.child.pid).filter((pid) => cmdline(pid).startsWith("nginx: worker"));
  assert.ok(workers.length > 0, "no nginx worker found");
  for (const pid of workers) process.kill(pid, "SIGKILL");
  return workers;
}

/** Whether a process runs (an exited child the launcher has not reaped yet is a zombie). */
const alive = (pid) => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
};

/** Asks the launcher to restart instance `index` (SIGTERM, then start it on its port again). */
function restartInstance(cluster, index, timeoutMs = 60000) {
  return new Promise((resolve, reject) => {
    let buffer = "";
    const done = (error) => {
      clearTimeout(timer);
      cluster.child.stdout.off("data", onData);
      error ? reject(error) : resolve();
    };
    const onData = (chunk) => {
      buffer += chunk;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        let answer;
        try {
          answer = JSON.parse(line);
        } catch {
          continue;
        }
        if (answer.restarted === index) done(answer.error ? new Error(answer.error) : undefined);
      }
    };
    const timer = setTimeout(() => done(new Error(`instance ${index} not restarted within ${timeoutMs} ms`)), timeoutMs);
    cluster.child.stdout.on("data", onData);
    cluster.child.stdin.write(`restart ${index}\n`);
  });
}

/** Steady broadcast; nginx's workers killed; one instance SIGTERMed; with `rolling`, every instance restarted in turn. */
async function survives(cluster, rolling) {
  // The rolling case runs after the SIGTERM case: the stopped instance starts again first.
  if (rolling) await restartInstance(cluster, 1);
  const run = nonce("run");
  const stateful = [];
  for (let i = 0; i < STATEFUL_CLIENTS; i++) {
    stateful.push(await connect(cluster.url, { builder: (b) => b.withStatefulReconnect(), label: `stateful#${i}` }));
  }
  const others = [
    await connect(cluster.url, { transport: "ServerSentEvents", reconnect: RETRIES, label: "sse" }),
    await connect(cluster.url, { transport: "LongPolling", reconnect: RETRIES, label: "lp" }),
  ];
  const sender = await connect(cluster.url, { builder: (b) => b.withStatefulReconnect(), label: "sender" });
  const ids = stateful.map((c) => c.connectionId);
  const fellBack = stateful.map(() => 0);
  stateful.forEach((c, i) => c.onreconnecting(() => fellBack[i]++));
  const recs = stateful.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(`${run}:`)));
  const bases = cluster.instances.map((i) => i.url);
  const movedBefore = await metric(bases, "stickless_sessions_moved_in_total");

  const steady = new SteadySender(sender, "Send", (n) => `${run}:${n}`);
  steady.start(25);
  await steady.waitFor(40);

  // 1. The balancer restarts: every socket drops at once.
  killNginxWorkers(cluster);
  await steady.waitFor(steady.confirmed.length + 40, 30000);

  const victim = cluster.instances[1];
  if (!rolling) {
    // 2. One instance drains and exits.
    const pids = instancePids(cluster);
    const pid = pids.get(victim.id);
    assert.ok(pid, `no pid for ${victim.id}`);
    process.kill(pid, "SIGTERM");
    await waitUntil(() => !alive(pid), 30000, `${victim.id} to exit`);
    await steady.waitFor(steady.confirmed.length + 40, 30000);
  }
  if (rolling) {
    // 3. A rolling restart: every instance in turn (the stopped one starts again first).
    for (const index of [0, 2, 1]) {
      await restartInstance(cluster, index);
      await steady.waitFor(steady.confirmed.length + 20, 30000);
    }
  }
  await steady.stop();
  assert.ok(steady.confirmed.length >= 120, `only ${steady.confirmed.length} confirmed`);

  for (const [i, c] of stateful.entries()) {
    assert.equal(c.state, HubConnectionState.Connected, `${c.label} is not connected`);
    assert.equal(c.connectionId, ids[i], `${c.label} changed its connectionId`);
    assert.equal(fellBack[i], 0, `${c.label} fell back to a new connection`);
    await assertExactlyOnceInOrder(recs[i], [{ prefix: `${run}:`, confirmed: steady.confirmed }]);
  }
  for (const c of others) {
    await waitUntil(() => c.state === HubConnectionState.Connected, 20000, `${c.label} to be connected`);
    await c.invoke("WhoAmI");
  }
  const live = cluster.instances.filter((i) => rolling || i.id !== victim.id).map((i) => i.url);
  const moved = await metric(live, "stickless_sessions_moved_in_total");
  assert.ok(moved > movedBefore || rolling, `no session moved (before: ${movedBefore}, after: ${moved})`);
    }

for (const config of CONFIGS) {
  describe(`stateful reconnect in a cluster of 3 behind nginx (${config.name})`, () => {
    let cluster;

    const options = { instances: 3, directRouting: config.directRouting, instanceEnv: config.instanceEnv, timeoutMs: 120000 };
    clusterForSuite(
      options,
      (started) => {
        cluster = started;
      },
      { startTimeoutMs: 150000 },
    );

    afterEach(stopAllConnections, { timeout: 15000 });

    test("an nginx restart then a SIGTERM: every stateful client keeps its id and gets every confirmed message once, in order", { timeout: T }, async () => {
      await survives(cluster, false);
    });

    test(
      "a rolling restart of every instance in turn: every stateful client keeps its id and gets every confirmed message once, in order",
      { timeout: T },
      async () => {
        await survives(cluster, true);
      },
    );

    test("an instance killed with SIGKILL costs its stateful clients only a reconnect", { timeout: T }, async () => {
      const pids = instancePids(cluster);
      const clients = [];
      for (let i = 0; i < 6; i++) {
        clients.push(
          await connect(cluster.url, {
            builder: (b) => b.withStatefulReconnect(),
            reconnect: [0, 100, 200, 500, 1000],
            label: `killed#${i}`,
          }),
        );
      }
      const where = await Promise.all(clients.map((c) => c.invoke("WhoAmI")));
      const target = where.map((w) => w.instance).find((id) => pids.has(id));
      assert.ok(target, `no client on a live instance: ${JSON.stringify(where)}`);
      const victims = clients.filter((_, i) => where[i].instance === target);
      const before = victims.map((c) => c.connectionId);
      const reconnected = victims.map(
        (c) => new Promise((resolve) => c.onreconnected(resolve)),
      );
      process.kill(pids.get(target), "SIGKILL");
      // The bound: a new connection within 5 seconds.
      await Promise.all(
        reconnected.map((p, i) =>
          Promise.race([
            p,
            new Promise((_, reject) => setTimeout(() => reject(new Error(`${victims[i].label} did not reconnect within 5 s`)), 5000)),
          ]),
        ),
      );
      for (const [i, c] of victims.entries()) {
        assert.notEqual(c.connectionId, before[i], `${c.label} kept a connectionId its instance lost`);
        const who = await c.invoke("WhoAmI");
        assert.notEqual(who.instance, target);
      }
    });
  });
}

// A session that moves must leave with every message published before its new instance began
// receiving for it, however far its old instance lags behind Redis. The old instance is
// paused (SIGSTOP) while messages are published and the client resumes on the other
// instance, then continued: it has the messages in its Redis socket and the handover request
// in its HTTP socket at once. Without its fence it may hand the session over first, and those
// messages reach neither instance's copy of the session. Messages to a group the session is
// in travel on the group's own channel: the new instance must join the session's groups
// before the old one fences them and lets go. Messages whose records are equal byte for byte
// are still different messages: the two copies of the session are joined by message id, so
// none of them is taken for one the other copy already has.
const MOVING_CASES = [
  {
    name: "messages to everyone",
    join: async () => {},
    send: (sender, text) => sender.invoke("Send", text),
    record: (client, run) => record(client, "Send", (m) => typeof m === "string" && m.startsWith(`${run}:`)),
    text: (m) => m,
  },
  {
    // Equal records of different messages: each must arrive, however many are equal.
    name: "messages with equal bytes",
    join: async () => {},
    send: (sender, text, run) => sender.invoke("Send", `${run}:same`),
    record: (client, run) => record(client, "Send", (m) => typeof m === "string" && m.startsWith(`${run}:`)),
    text: (m) => m,
    equal: true,
  },
  {
    name: "messages to a group it is in",
    join: (client, run) => client.invoke("JoinRoom", run),
    send: (sender, text, run) => sender.invoke("SendToRoom", run, text),
    record: (client, run) => record(client, "ReceiveMessage", (m) => m?.room === run && m.text?.startsWith(`${run}:`)),
    text: (m) => m.text,
  },
];

describe("a moving session takes every message published before the move (paused old instance)", () => {
  let cluster;
  clusterForSuite(
    { instances: 2, directRouting: true, instanceEnv: { SHUTDOWN_TIMEOUT: "2s" }, timeoutMs: 60000 },
    (started) => {
      cluster = started;
    },
  );
  afterEach(stopAllConnections, { timeout: 15000 });

  for (const c of MOVING_CASES) {
    test(`${c.name}: every one reaches the resumed client exactly once, in order`, { timeout: T }, async () => {
      const [oldInstance, newInstance] = cluster.instances;
      const port = (url) => Number(new URL(url).port);
      const proxy = await TcpProxy.start(port(oldInstance.url));
      let paused;
      try {
        const client = await connect(proxy.url, { builder: (b) => b.withStatefulReconnect(), label: "moving" });
        const id = client.connectionId;
        assert.equal((await client.invoke("WhoAmI")).instance, oldInstance.id);
        const sender = await connect(newInstance.url, { label: "sender" });
        const run = nonce("fence");
        await c.join(client, run);
        const rec = c.record(client, run);
        const texts = { who: "moving", get items() { return rec.items.map(([m]) => [c.text(m)]); } };
        const confirmed = [];
        const send = async (n) => {
          await c.send(sender, `${run}:${n}`, run);
          confirmed.push(n);
        };
        for (let n = 0; n < 5; n++) await send(n);
        await rec.next(5, 10000);

        // The old instance stops reading; these reach Redis and its socket, not it.
        paused = instancePids(cluster).get(oldInstance.id);
        process.kill(paused, "SIGSTOP");
        for (let n = 5; n < 25; n++) await send(n);

        // The client's socket breaks; it resumes through the proxy, now on the other
        // instance, which begins receiving for the session and asks the paused one for it.
        const accepted = proxy.accepted;
        proxy.targetPort = port(newInstance.url);
        proxy.dropAll();
        await proxy.waitForAccepted(accepted + 1, 10000);
        await new Promise((r) => setTimeout(r, 300));
        process.kill(paused, "SIGCONT");
        paused = undefined;

        // Sent while the session moves: they reach it on one instance or the other.
        for (let n = 25; n < 30; n++) await send(n);
        if (c.equal) {
          // A numbered marker last: once it is in, every earlier message is too (one
          // sender's messages keep their order).
          await sender.invoke("Send", `${run}:marker`);
          await rec.waitFor((m) => m === `${run}:marker`, 15000, "the marker");
          const same = rec.items.filter(([m]) => m === `${run}:same`).length;
          assert.equal(same, confirmed.length, `${confirmed.length} equal messages confirmed, ${same} received`);
        } else {
          await assertExactlyOnceInOrder(texts, [{ prefix: `${run}:`, confirmed }]);
        }
        assert.equal(client.connectionId, id, "the client kept its connection");
        assert.equal((await client.invoke("WhoAmI")).instance, newInstance.id, "the session moved");
      } finally {
        if (paused) process.kill(paused, "SIGCONT");
        await proxy.close();
      }
    });
  }
});
