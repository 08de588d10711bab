// Interop tests: the official @microsoft/signalr client against ONE stickless instance
// (in-process backplane), over each of the three transports, plus raw HTTP checks.
//
// Run: npm test   (or: node --test --test-concurrency=1 tests/node/single.test.mjs)

import { describe, test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import {
  TRANSPORTS,
  HubConnectionState,
  RS,
  startServer,
  connect,
  stopAllConnections,
  record,
  collectStream,
  nextEvent,
  nonce,
  http,
  rawNegotiate,
  rawLongPolling,
  forgeToken,
  describeResponse,
  withTimeout,
  flush,
  metric,
} from "./helpers.mjs";

const T = 20000; // default per-test timeout (a deadline for real hangs, not a timing claim)

let server;
let instanceId;

before(
  async () => {
    server = await startServer();
    const r = await http(`${server.url}/healthz`);
    instanceId = r.headers.get("x-stickless-instance");
  },
  { timeout: 30000 },
);

after(
  async () => {
    await stopAllConnections();
    if (server) await server.stop();
  },
  { timeout: 30000 },
);

const MESSAGE_KEYS = ["connectionId", "name", "text", "instance", "transport", "room", "to", "toUser", "sentAt"].sort();
const PRESENCE_KEYS = ["kind", "connectionId", "name", "instance", "room"].sort();
const BATCH_EVENT_KEYS = ["kind", "connectionId", "name", "oldName", "instance", "at"];

function assertMessageShape(msg) {
  assert.equal(typeof msg, "object", `ReceiveMessage argument is not an object: ${JSON.stringify(msg)}`);
  for (const k of MESSAGE_KEYS) {
    assert.ok(Object.hasOwn(msg, k), `ReceiveMessage payload lacks '${k}': ${JSON.stringify(msg)}`);
  }
  for (const k of ["connectionId", "name", "text", "instance", "transport"]) {
    assert.equal(typeof msg[k], "string", `ReceiveMessage.${k} is not a string: ${JSON.stringify(msg)}`);
  }
  for (const k of ["room", "to", "toUser"]) {
    assert.ok(msg[k] === null || typeof msg[k] === "string", `ReceiveMessage.${k} must be string|null: ${JSON.stringify(msg)}`);
  }
  assert.equal(typeof msg.sentAt, "number", `ReceiveMessage.sentAt is not a number: ${JSON.stringify(msg)}`);
  assert.ok(Math.abs(msg.sentAt - Date.now()) < 60000, `ReceiveMessage.sentAt is not ms since epoch near now: ${msg.sentAt}`);
}

function assertPresenceShape(ev) {
  assert.equal(typeof ev, "object", `Presence argument is not an object: ${JSON.stringify(ev)}`);
  for (const k of PRESENCE_KEYS) {
    assert.ok(Object.hasOwn(ev, k), `Presence event lacks '${k}': ${JSON.stringify(ev)}`);
  }
  assert.ok(["joined", "left", "renamed", "joinedRoom", "leftRoom"].includes(ev.kind), `bad Presence kind: ${JSON.stringify(ev)}`);
}

const guestName = (connectionId) => `guest-${connectionId.slice(0, 4)}`;

/** Checks one event of a coalesced `Presence` batch ({ events, omitted }). */
function assertBatchEventShape(ev) {
  for (const k of BATCH_EVENT_KEYS) {
    assert.ok(Object.hasOwn(ev, k), `Presence batch event lacks '${k}': ${JSON.stringify(ev)}`);
  }
  assert.ok(["joined", "left", "renamed"].includes(ev.kind), `bad batch event kind: ${JSON.stringify(ev)}`);
  assert.equal(typeof ev.at, "number");
}

/** The first event matching `pred` in any `Presence` batch `rec` recorded (past or future). */
async function batchEvent(rec, pred, what) {
  const [batch] = await rec.waitFor((b) => Array.isArray(b?.events) && b.events.some(pred), 5000, what);
  assert.equal(typeof batch.omitted, "number", `Presence batch lacks 'omitted': ${JSON.stringify(batch)}`);
  return batch.events.find(pred);
}

for (const transport of TRANSPORTS) {
  describe(`single instance over ${transport}`, () => {
    afterEach(stopAllConnections, { timeout: 15000 });

    const open = (opts = {}) => connect(server.url, { transport, ...opts });

    test("connects; WhoAmI returns exactly instance, connectionId and transport", { timeout: T }, async () => {
      const c = await open();
      assert.equal(c.state, HubConnectionState.Connected);
      assert.equal(typeof c.connectionId, "string");
      assert.ok(c.connectionId.length > 0, "connectionId is empty");
      const who = await c.invoke("WhoAmI");
      assert.deepEqual(Object.keys(who).sort(), ["connectionId", "instance", "transport"], `WhoAmI returned ${JSON.stringify(who)}`);
      assert.equal(who.transport, transport);
      assert.equal(who.connectionId, c.connectionId);
      assert.ok(instanceId, "GET /healthz had no X-Stickless-Instance header");
      assert.equal(who.instance, instanceId);
    });

    test("an unknown hub method rejects with 'Unknown hub method'", { timeout: T }, async () => {
      const c = await open();
      await assert.rejects(c.invoke("NoSuchMethodHere", 1, "x"), (err) => {
        assert.match(err.message, /Unknown hub method/);
        return true;
      });
      // The connection survives the error.
      const who = await c.invoke("WhoAmI");
      assert.equal(who.connectionId, c.connectionId);
      assert.equal(c.state, HubConnectionState.Connected);
    });

    test("hub method names match ignoring case", { timeout: T }, async () => {
      const c = await open();
      const lower = await c.invoke("whoami");
      assert.equal(lower.connectionId, c.connectionId);
      assert.equal(lower.transport, transport);
      const upper = await c.invoke("WHOAMI");
      assert.equal(upper.connectionId, c.connectionId);
      const tag = nonce("case");
      const rec = record(c, "Send", (m) => m === tag);
      await c.invoke("sEnD", tag);
      const [args] = await rec.next(1);
      assert.deepEqual(args, [tag]);
    });

    test("send('Send', 'hello') comes back to the sender as target Send with one argument", { timeout: T }, async () => {
      const c = await open();
      const rec = record(c, "Send");
      await c.send("Send", "hello");
      const [args] = await rec.next(1);
      assert.deepEqual(args, ["hello"]);
      // invoke() of a void method resolves with no result.
      const tag = nonce("void");
      const r = await c.invoke("Send", tag);
      assert.ok(r === undefined || r === null, `invoke('Send') resolved with ${JSON.stringify(r)}`);
      await rec.waitFor((m) => m === tag);
    });

    test("SendMessage delivers ReceiveMessage with the documented payload", { timeout: T }, async () => {
      const a = await open();
      const b = await open();
      const tag = nonce("msg");
      const recA = record(a, "ReceiveMessage", (m) => m?.text === tag);
      const recB = record(b, "ReceiveMessage", (m) => m?.text === tag);
      const r = await a.invoke("SendMessage", tag);
      assert.ok(r === null || r === undefined, `SendMessage returned ${JSON.stringify(r)}`);
      for (const rec of [recA, recB]) {
        const [[msg]] = await rec.next(1);
        assertMessageShape(msg);
        assert.equal(msg.connectionId, a.connectionId);
        assert.equal(msg.text, tag);
        assert.equal(msg.instance, instanceId);
        assert.equal(msg.transport, transport);
        assert.equal(msg.name, guestName(a.connectionId));
        assert.equal(msg.room, null);
        assert.equal(msg.to, null);
        assert.equal(msg.toUser, null);
      }
    });

    test("stream Counter(3, 10) yields 0, 1, 2 then completes", { timeout: T }, async () => {
      const c = await open();
      assert.deepEqual(await collectStream(c, "Counter", [3, 10]), [0, 1, 2]);
      assert.deepEqual(await collectStream(c, "Counter", [0, 10]), []);
      // The connection still works after the streams.
      assert.equal((await c.invoke("WhoAmI")).connectionId, c.connectionId);
    });

    test("disposing a stream subscription stops the server's stream; an uncancelled twin runs to the end", { timeout: 40000 }, async () => {
      // The official client drops items after dispose() whatever the server does, so the
      // server's side is observed: its count of records queued for clients. A dedicated
      // instance, so no other test's traffic is counted.
      const own = await startServer();
      try {
        const c = await connect(own.url, { transport });
        const N = 40;
        const DELAY_MS = 100;
        const before = await metric(own.url, "stickless_messages_sent_total");
        const items = [];
        let completed = false;
        let sub;
        const threeItems = new Promise((resolve, reject) => {
          sub = c.stream("Counter", N, DELAY_MS).subscribe({
            next: (i) => {
              items.push(i);
              if (items.length === 3) {
                sub.dispose();
                resolve();
              }
            },
            complete: () => {
              completed = true;
            },
            error: reject,
          });
        });
        // The twin starts at the same time and is never cancelled: when it completes, the
        // cancelled stream would have sent (nearly) all of its N items too, had it kept going.
        const twin = collectStream(c, "Counter", [N, DELAY_MS], 30000);
        await withTimeout(threeItems, 10000, `3 items of Counter(${N}, ${DELAY_MS})`);
        assert.deepEqual(await twin, Array.from({ length: N }, (_, i) => i));
        const sent = (await metric(own.url, "stickless_messages_sent_total")) - before;
        // Positive control: the twin's N items and its Completion were counted.
        assert.ok(sent >= N + 1, `the server counted ${sent} records for a ${N}-item stream`);
        // Without cancellation the disposed stream adds about N more records.
        assert.ok(sent < N + 1 + N / 2, `the server kept streaming after CancelInvocation: ${sent} records for one ${N}-item stream and 3 cancelled items`);
        assert.deepEqual(items, [0, 1, 2], "items after dispose() must not reach the subscriber");
        assert.equal(completed, false);
        assert.equal((await c.invoke("WhoAmI")).connectionId, c.connectionId);
      } finally {
        await stopAllConnections();
        await own.stop().catch(() => {});
      }
    });

    test("200 sends in a burst all arrive, in order", { timeout: 40000 }, async () => {
      const c = await open();
      const tag = nonce("burst");
      const rec = record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag + ":"));
      const sends = [];
      for (let i = 0; i < 200; i++) sends.push(c.send("Send", `${tag}:${i}`));
      await withTimeout(Promise.all(sends), 20000, "200 send() promises");
      const got = await rec.next(200, 30000);
      assert.deepEqual(
        got.map(([m]) => Number(m.slice(tag.length + 1))),
        Array.from({ length: 200 }, (_, i) => i),
      );
    });

    test("Join announces one 'joined' in a batch, then 'left'; stop() resolves, state Disconnected, others keep working", { timeout: T }, async () => {
      const b = await open();
      const presence = record(b, "Presence");
      const a = await open();
      const joinedA = await a.invoke("Join", "  Ann  ");
      assert.equal(joinedA.name, "Ann");
      assert.equal(joinedA.connectionId, a.connectionId);
      assert.ok(joinedA.online.some((m) => m.connectionId === a.connectionId && m.name === "Ann"), JSON.stringify(joinedA.online));
      assert.ok(Array.isArray(joinedA.history), "Join returns the lobby's history");
      const joined = await batchEvent(presence, (e) => e.kind === "joined" && e.connectionId === a.connectionId, "a batch naming a's join");
      assertBatchEventShape(joined);
      assert.equal(joined.name, "Ann", "the name chosen before joining, not a guest name");
      assert.equal(joined.instance, instanceId);

      const aId = a.connectionId;
      const closed = nextEvent(a, "close", 5000);
      await withTimeout(a.stop(), 5000, "a.stop()");
      assert.equal(a.state, HubConnectionState.Disconnected);
      const { arg: closeError } = await closed;
      assert.equal(closeError, undefined, `onclose got an error after a clean stop(): ${closeError}`);

      const left = await batchEvent(presence, (e) => e.kind === "left" && e.connectionId === aId, "a batch naming a's leaving");
      assertBatchEventShape(left);
      assert.equal(left.name, "Ann");

      const who = await b.invoke("WhoAmI");
      assert.equal(who.connectionId, b.connectionId);
      const tag = nonce("after-stop");
      const rec = record(b, "Send", (m) => m === tag);
      await b.send("Send", tag);
      await rec.next(1);
    });

    test("SetName trims, rejects empty names and announces 'renamed' with the old name", { timeout: T }, async () => {
      const a = await open();
      const b = await open();
      const presB = record(b, "Presence");
      assert.equal(await a.invoke("SetName", "  Alice  "), "Alice", "SetName before Join joins under that name");
      const joined = await batchEvent(presB, (e) => e.connectionId === a.connectionId, "a batch naming Alice");
      assert.equal(joined.kind, "joined");
      assert.equal(joined.name, "Alice");
      assert.equal(await a.invoke("SetName", "Alicia"), "Alicia");
      const ev = await batchEvent(presB, (e) => e.kind === "renamed" && e.connectionId === a.connectionId, "a batch naming the rename");
      assertBatchEventShape(ev);
      assert.equal(ev.name, "Alicia");
      assert.equal(ev.oldName, "Alice");
      assert.equal(ev.instance, instanceId);

      await assert.rejects(a.invoke("SetName", ""), "empty name must be an error");
      await assert.rejects(a.invoke("SetName", "    "), "blank name must be an error");
      const max = "x".repeat(32);
      assert.equal(await a.invoke("SetName", max), max, "a 32-character name must be accepted");
      await assert.rejects(a.invoke("SetName", "y".repeat(33)), /at most 32 characters/, "a 33-character name must be refused");

      // Messages carry the chosen name.
      assert.equal(await a.invoke("SetName", "Alice"), "Alice");
      const tag = nonce("named");
      const recB = record(b, "ReceiveMessage", (m) => m?.text === tag);
      await a.invoke("SendMessage", tag);
      const [[msg]] = await recB.next(1);
      assert.equal(msg.name, "Alice");
    });

    test("JoinRoom/SendToRoom reach only members; LeaveRoom", { timeout: T }, async () => {
      const a = await open();
      const b = await open();
      const c = await open();
      const room = nonce("room");
      const presA = record(a, "Presence", (e) => e?.room === room);
      const tag1 = nonce("r1");
      const tag2 = nonce("r2");
      const recs = [a, b, c].map((x) => record(x, "ReceiveMessage", (m) => m?.text === tag1 || m?.text === tag2));

      assert.equal(await a.invoke("JoinRoom", room), room);
      assert.equal(await b.invoke("JoinRoom", room), room);
      const [joinedB] = await presA.waitFor((e) => e.kind === "joinedRoom" && e.connectionId === b.connectionId, 5000, "Presence joinedRoom of b");
      assertPresenceShape(joinedB);
      assert.equal(joinedB.room, room);

      await a.invoke("SendToRoom", room, tag1);
      for (const rec of [recs[0], recs[1]]) {
        const [[msg]] = await rec.next(1);
        assertMessageShape(msg);
        assert.equal(msg.text, tag1);
        assert.equal(msg.room, room);
        assert.equal(msg.connectionId, a.connectionId);
        assert.equal(msg.to, null);
        assert.equal(msg.toUser, null);
      }
      await flush(a, [a, b, c]);
      recs[2].assertNone();

      assert.equal(await b.invoke("LeaveRoom", room), room);
      const [leftB] = await presA.waitFor((e) => e.kind === "leftRoom" && e.connectionId === b.connectionId, 5000, "Presence leftRoom of b");
      assertPresenceShape(leftB);
      assert.equal(leftB.room, room);

      await a.invoke("SendToRoom", room, tag2);
      const [[msg2]] = await recs[0].next(1);
      assert.equal(msg2.text, tag2);
      await flush(a, [a, b, c]);
      recs[1].assertNone((m) => m.text === tag2, "b left the room");
      recs[2].assertNone();
    });

    test("SendTo(connectionId) reaches only that connection", { timeout: T }, async () => {
      const a = await open();
      const b = await open();
      const c = await open();
      const tag = nonce("to");
      const recs = [a, b, c].map((x) => record(x, "ReceiveMessage", (m) => m?.text === tag));
      await a.invoke("SendTo", c.connectionId, tag);
      const [[msg]] = await recs[2].next(1);
      assertMessageShape(msg);
      assert.equal(msg.to, c.connectionId);
      assert.equal(msg.connectionId, a.connectionId);
      assert.equal(msg.room, null);
      assert.equal(msg.toUser, null);
      await flush(a, [a, b, c]);
      recs[0].assertNone();
      recs[1].assertNone();
    });

    test("SendToUser reaches every connection of that user and nobody else", { timeout: T }, async () => {
      const alice1 = await open({ accessTokenFactory: () => "alice" });
      const alice2 = await open({ accessTokenFactory: () => "alice" });
      const bob = await open({ accessTokenFactory: () => "bob" });
      const guest = await open();
      const tag = nonce("user");
      const recs = [alice1, alice2, bob, guest].map((x) => record(x, "ReceiveMessage", (m) => m?.text === tag));
      await guest.invoke("SendToUser", "alice", tag);
      for (const rec of recs.slice(0, 2)) {
        const [[msg]] = await rec.next(1);
        assertMessageShape(msg);
        assert.equal(msg.toUser, "alice");
        assert.equal(msg.connectionId, guest.connectionId);
        assert.equal(msg.room, null);
        assert.equal(msg.to, null);
      }
      await flush(guest, [alice1, alice2, bob, guest]);
      recs[2].assertNone();
      recs[3].assertNone();

      // And the other way round: bob's messages reach bob only.
      const tag2 = nonce("user2");
      const recs2 = [alice1, alice2, bob].map((x) => record(x, "ReceiveMessage", (m) => m?.text === tag2));
      await alice1.invoke("SendToUser", "bob", tag2);
      const [[m2]] = await recs2[2].next(1);
      assert.equal(m2.toUser, "bob");
      await flush(alice1, [alice1, alice2, bob]);
      recs2[0].assertNone();
      recs2[1].assertNone();
    });

    test("server SIGTERM: Close(allowReconnect) → onreconnecting; onclose after retries fail; exit 0", { timeout: 45000 }, async () => {
      const own = await startServer();
      try {
        const c = await connect(own.url, { transport, reconnect: [0, 100, 500] });
        assert.equal((await c.invoke("WhoAmI")).transport, transport);
        const reconnecting = nextEvent(c, "reconnecting", 15000);
        const closed = nextEvent(c, "close", 25000);
        const exit = await own.stop({ timeoutMs: 15000 });
        assert.deepEqual(exit, { code: 0, signal: null }, `server exit after SIGTERM: ${JSON.stringify(exit)}\n${own.stderr()}`);
        const { arg: err } = await reconnecting;
        assert.ok(
          c.logger.has("Close message received from server."),
          `the client never received a Close message (reconnecting error: ${err?.message})\nclient log:\n${c.logger.dump()}`,
        );
        await closed;
        assert.equal(c.state, HubConnectionState.Disconnected);
      } finally {
        await own.stop().catch(() => {});
      }
    });
  });
}

describe("single instance, clients on mixed transports", () => {
  afterEach(stopAllConnections, { timeout: 15000 });

  test("a Send from each of three clients (one per transport) reaches all three", { timeout: T }, async () => {
    const clients = [];
    for (const transport of TRANSPORTS) clients.push(await connect(server.url, { transport }));
    const tag = nonce("mix");
    const recs = clients.map((c) => record(c, "Send", (m) => typeof m === "string" && m.startsWith(tag)));
    for (const c of clients) await c.send("Send", `${tag}:${c.transportName}`);
    const expected = TRANSPORTS.map((t) => `${tag}:${t}`).sort();
    for (const [i, rec] of recs.entries()) {
      const got = await rec.next(3);
      assert.deepEqual(got.map(([m]) => m).sort(), expected, `client on ${TRANSPORTS[i]}`);
      got.forEach((args) => assert.equal(args.length, 1));
    }
    await flush(clients[0], clients);
    recs.forEach((r) => r.assertNone((m) => !expected.includes(m)));
  });

  test("SendMessage from each transport reaches all three with the sender's transport", { timeout: T }, async () => {
    const clients = [];
    for (const transport of TRANSPORTS) clients.push(await connect(server.url, { transport }));
    const tag = nonce("mixmsg");
    const recs = clients.map((c) => record(c, "ReceiveMessage", (m) => typeof m?.text === "string" && m.text.startsWith(tag)));
    for (const c of clients) await c.invoke("SendMessage", `${tag}:${c.transportName}`);
    for (const rec of recs) {
      const got = (await rec.next(3)).map(([m]) => m);
      for (const m of got) {
        assertMessageShape(m);
        const sender = clients.find((c) => c.connectionId === m.connectionId);
        assert.ok(sender, `message from unknown connection ${m.connectionId}`);
        assert.equal(m.text, `${tag}:${sender.transportName}`);
        assert.equal(m.transport, sender.transportName);
        assert.equal(m.instance, instanceId);
      }
      assert.deepEqual(got.map((m) => m.transport).sort(), [...TRANSPORTS].sort());
    }
  });
});

describe("raw HTTP (no client)", () => {
  afterEach(stopAllConnections, { timeout: 15000 });

  test("GET /healthz", { timeout: T }, async () => {
    const r = await http(`${server.url}/healthz`);
    assert.equal(r.status, 200, describeResponse(r));
    assert.ok(r.json, `healthz body is not JSON: ${r.text}`);
    assert.equal(r.json.status, "ok");
    assert.equal(r.json.instance, r.headers.get("x-stickless-instance"));
    assert.equal(r.json.backplane, "in-process");
    assert.equal(typeof r.json.connections, "number");
  });

  test("POST /chat/negotiate?negotiateVersion=1 has the documented body", { timeout: T }, async () => {
    const r = await rawNegotiate(server.url, "negotiateVersion=1");
    assert.equal(r.status, 200, describeResponse(r));
    assert.match(r.headers.get("content-type") ?? "", /application\/json/);
    assert.ok(r.headers.get("x-stickless-instance"), "no X-Stickless-Instance header");
    const b = r.json;
    assert.ok(b, `negotiate body is not JSON: ${r.text}`);
    assert.equal(b.negotiateVersion, 1);
    assert.equal(typeof b.connectionId, "string");
    assert.equal(typeof b.connectionToken, "string");
    assert.ok(b.connectionId.length > 0 && b.connectionToken.length > 0);
    assert.notEqual(b.connectionToken, b.connectionId);
    assert.match(b.connectionId, /^[A-Za-z0-9_-]+$/, "connectionId must be URL-safe");
    assert.match(b.connectionToken, /^[A-Za-z0-9_.~-]+$/, "connectionToken must be URL-safe (the client does not encode it)");
    assert.deepEqual(b.availableTransports, [
      { transport: "WebSockets", transferFormats: ["Text", "Binary"] },
      { transport: "ServerSentEvents", transferFormats: ["Text"] },
      { transport: "LongPolling", transferFormats: ["Text", "Binary"] },
    ]);
    assert.equal(b.ProtocolVersion, undefined, "must not send ProtocolVersion");
    assert.equal(b.useStatefulReconnect, undefined, "useStatefulReconnect only when asked for");
    assert.equal(b.error, undefined);

    const again = await rawNegotiate(server.url, "negotiateVersion=1");
    assert.notEqual(again.json?.connectionId, b.connectionId, "two negotiates gave the same connectionId");
    assert.notEqual(again.json?.connectionToken, b.connectionToken, "two negotiates gave the same token");
  });

  test("negotiate without a version has no connectionToken; a version above 1 is lowered to 1", { timeout: T }, async () => {
    const r = await rawNegotiate(server.url, "");
    assert.equal(r.status, 200, describeResponse(r));
    assert.ok(r.json, `negotiate body is not JSON: ${r.text}`);
    assert.equal(typeof r.json.connectionId, "string");
    assert.equal(r.json.connectionToken, undefined, `v0 negotiate must not have connectionToken: ${r.text}`);
    assert.ok(r.json.negotiateVersion === undefined || r.json.negotiateVersion === 0, `negotiateVersion for v0: ${r.text}`);
    assert.equal(r.json.availableTransports?.length, 3);

    const v5 = await rawNegotiate(server.url, "negotiateVersion=5");
    assert.equal(v5.status, 200, describeResponse(v5));
    assert.equal(v5.json?.negotiateVersion, 1, `negotiateVersion=5 → ${v5.text}`);
    assert.equal(typeof v5.json?.connectionToken, "string");
  });

  test("status codes: GET /chat without id → 400, POST /chat?id=garbage → 404, GET /chat/negotiate → 405", { timeout: T }, async () => {
    const noId = await http(`${server.url}/chat`);
    assert.equal(noId.status, 400, `GET /chat: ${describeResponse(noId)}`);
    assert.ok(noId.headers.get("x-stickless-instance"), "400 response lacks X-Stickless-Instance");

    const garbage = await http(`${server.url}/chat?id=garbage`, {
      method: "POST",
      headers: { "Content-Type": "text/plain;charset=UTF-8" },
      body: `{"type":6}${RS}`,
    });
    assert.equal(garbage.status, 404, `POST /chat?id=garbage: ${describeResponse(garbage)}`);
    assert.ok(garbage.headers.get("x-stickless-instance"), "404 response lacks X-Stickless-Instance");

    const getNeg = await http(`${server.url}/chat/negotiate`);
    assert.equal(getNeg.status, 405, `GET /chat/negotiate: ${describeResponse(getNeg)}`);
    assert.ok(getNeg.headers.get("x-stickless-instance"), "405 response lacks X-Stickless-Instance");

    const pollGarbage = await http(`${server.url}/chat?id=garbage&_=1`);
    assert.equal(pollGarbage.status, 404, `GET /chat?id=garbage: ${describeResponse(pollGarbage)}`);
  });

  test("long polling: forged token → 404; real token: first poll 200 empty; DELETE → 202; then 404", { timeout: T }, async () => {
    const neg = await rawNegotiate(server.url, "negotiateVersion=1");
    assert.equal(neg.status, 200, describeResponse(neg));
    const token = neg.json.connectionToken;
    const forged = forgeToken(token);
    assert.notEqual(forged, token);
    assert.equal(forged.length, token.length);

    const bad = await rawLongPolling(forged).poll(server.url);
    assert.equal(bad.status, 404, `poll with forged token: ${describeResponse(bad)}`);

    const lp = rawLongPolling(token);
    const first = await lp.poll(server.url, 10000);
    assert.equal(first.status, 200, `first poll: ${describeResponse(first)}`);
    assert.equal(first.text, "", "the first poll must answer at once with an empty body");

    // The connectionId (public) must not work as the token for a v1 connection.
    assert.notEqual(neg.json.connectionId, token);
    const byId = await rawLongPolling(neg.json.connectionId).poll(server.url);
    assert.equal(byId.status, 404, `poll with the public connectionId instead of the token: ${describeResponse(byId)}`);

    const del = await lp.close(server.url);
    assert.equal(del.status, 202, `DELETE: ${describeResponse(del)}`);
    const afterDel = await lp.poll(server.url);
    assert.equal(afterDel.status, 404, `poll after DELETE: ${describeResponse(afterDel)}`);
  });

  test("long polling by hand: handshake, several records per POST, no reply to a non-blocking invocation", { timeout: T }, async () => {
    const neg = await rawNegotiate(server.url, "negotiateVersion=1");
    const lp = rawLongPolling(neg.json.connectionToken);
    const first = await lp.poll(server.url, 10000);
    assert.equal(first.status, 200, describeResponse(first));

    const hs = await lp.send(server.url, `{"protocol":"json","version":1}${RS}`);
    assert.equal(hs.status, 200, `handshake POST: ${describeResponse(hs)}`);
    await lp.pollUntil(server.url, (recs) => recs.length >= 1, 5000);
    assert.deepEqual(lp.received[0], {}, `handshake reply: ${JSON.stringify(lp.received[0])}`);

    const tag = nonce("raw");
    const post = await lp.sendMessages(
      server.url,
      { type: 1, target: "Send", arguments: [tag] },
      { arguments: [], target: "WhoAmI", invocationId: "7", type: 1 },
    );
    assert.equal(post.status, 200, `POST with two records: ${describeResponse(post)}`);
    const recs = await lp.pollUntil(server.url, (rs) => rs.some((m) => m.type === 3 && m.invocationId === "7"), 10000);

    const echoed = recs.filter((m) => m.type === 1 && m.target === "Send");
    assert.equal(echoed.length, 1, `records: ${JSON.stringify(recs)}`);
    assert.deepEqual(echoed[0].arguments, [tag]);
    assert.ok(!echoed[0].invocationId, "a server→client broadcast must not carry an invocationId");
    const completions = recs.filter((m) => m.type === 3);
    assert.equal(completions.length, 1, `exactly one Completion (for "7") expected: ${JSON.stringify(completions)}`);
    assert.equal(completions[0].result?.transport, "LongPolling");
    assert.equal(completions[0].result?.connectionId, neg.json.connectionId);
    // The Send arrives before the WhoAmI completion (invocations are processed in order).
    assert.ok(recs.indexOf(echoed[0]) < recs.indexOf(completions[0]), `order: ${JSON.stringify(recs)}`);

    const del = await lp.close(server.url);
    assert.equal(del.status, 202, `DELETE: ${describeResponse(del)}`);
  });

  test("a Long Polling connection cannot switch to SSE (400)", { timeout: T }, async () => {
    // A connection that started with Long Polling cannot switch to SSE.
    const neg = await rawNegotiate(server.url, "negotiateVersion=1");
    const lp = rawLongPolling(neg.json.connectionToken);
    assert.equal((await lp.poll(server.url, 10000)).status, 200);
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), 10000);
    let status;
    try {
      const res = await fetch(`${server.url}/chat?id=${neg.json.connectionToken}`, {
        headers: { Accept: "text/event-stream" },
        signal: ac.signal,
      });
      status = res.status;
      await res.body?.cancel();
    } catch (e) {
      status = `error: ${e.message}`;
    } finally {
      clearTimeout(timer);
    }
    assert.equal(status, 400, "switching a Long Polling connection to SSE must be refused with 400");
    await lp.close(server.url);
  });
});
