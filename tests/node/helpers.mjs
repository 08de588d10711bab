// Shared helpers for the interop tests: starting the real server binaries, building
// connections with the official @microsoft/signalr client, and waiting for messages with
// timeouts (a test must fail, never hang).

import { spawn } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as delay } from "node:timers/promises";
import { before, after } from "node:test";
import assert from "node:assert/strict";
import {
  HubConnectionBuilder,
  HubConnectionState,
  HttpTransportType,
  LogLevel,
} from "@microsoft/signalr";

export { HubConnectionState, HttpTransportType, LogLevel, delay };

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

/** The transport names as the server and the client spell them. */
export const TRANSPORTS = ["WebSockets", "ServerSentEvents", "LongPolling"];

export const HUB_PATH = "/chat";

/**
 * The only variables a spawned process inherits from this shell: where programs are (Debian
 * keeps nginx in /usr/sbin). Everything else a test depends on is passed explicitly, so an
 * exported POLL_TIMEOUT, REDIS_URL, RUST_LOG, ... never changes what is tested.
 */
export function baseEnv() {
  const path = process.env.PATH ?? "/usr/local/bin:/usr/bin:/bin";
  return { PATH: `${path}:/usr/sbin:/sbin` };
}

function resolveBin(envName, fallback) {
  const fromEnv = process.env[envName];
  const p = fromEnv && fromEnv.length > 0 ? fromEnv : fallback;
  return path.isAbsolute(p) ? p : path.resolve(REPO_ROOT, p);
}

// ---------------------------------------------------------------------------
// Child-process bookkeeping: every child we start is killed when this process exits,
// whatever the reason (test failure, timeout, uncaught exception, Ctrl-C).
// ---------------------------------------------------------------------------

const liveChildren = new Set();

function killAllChildren(signal = "SIGKILL") {
  for (const child of liveChildren) {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

process.on("exit", () => killAllChildren("SIGKILL"));
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(sig, () => {
    killAllChildren("SIGKILL");
    process.exit(128 + (sig === "SIGINT" ? 2 : sig === "SIGTERM" ? 15 : 1));
  });
}

const MAX_CAPTURE = 64 * 1024;

function tail(text, max = 4000) {
  return text.length > max ? "…" + text.slice(text.length - max) : text;
}

/**
 * Spawns `bin` and waits until `isReady(line)` returns a truthy value for one of its stdout
 * lines. Resolves with { child, ready, stderr(), stdout(), exited, stop() }.
 */
function spawnAndWait({ bin, args = [], env, label, timeoutMs, isReady, stdin = "ignore" }) {
  if (!existsSync(bin)) {
    return Promise.reject(
      new Error(`${label}: binary not found at ${bin} (build it with cargo build, or set the env variable)`),
    );
  }
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, {
      cwd: REPO_ROOT,
      env,
      stdio: [stdin, "pipe", "pipe"],
    });
    liveChildren.add(child);

    let stderrBuf = "";
    let stdoutBuf = "";
    let lineBuf = "";
    let settled = false;
    let exitInfo = null;

    const exited = new Promise((res) => {
      child.once("exit", (code, signal) => {
        exitInfo = { code, signal };
        liveChildren.delete(child);
        res(exitInfo);
      });
    });

    const fail = (why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      try {
        child.kill("SIGKILL");
      } catch {
        // ignore
      }
      reject(
        new Error(
          `${label} (${bin} ${args.join(" ")}) ${why}\n--- stdout ---\n${tail(stdoutBuf)}\n--- stderr ---\n${tail(stderrBuf)}`,
        ),
      );
    };

    const timer = setTimeout(
      () => fail(`did not become ready within ${timeoutMs} ms`),
      timeoutMs,
    );

    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (d) => {
      stderrBuf = (stderrBuf + d).slice(-MAX_CAPTURE);
    });
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (d) => {
      // Keep draining stdout for the whole life of the child so the pipe never fills up.
      stdoutBuf = (stdoutBuf + d).slice(-MAX_CAPTURE);
      if (settled) return;
      lineBuf += d;
      let nl;
      while ((nl = lineBuf.indexOf("\n")) >= 0) {
        const line = lineBuf.slice(0, nl).replace(/\r$/, "");
        lineBuf = lineBuf.slice(nl + 1);
        let ready;
        try {
          ready = isReady(line);
        } catch (e) {
          fail(`printed an unexpected ready line ${JSON.stringify(line)}: ${e.message}`);
          return;
        }
        if (ready) {
          settled = true;
          clearTimeout(timer);
          let stopping = null;
          const stop = async ({ signal = "SIGTERM", timeoutMs: stopTimeout = 15000 } = {}) => {
            if (exitInfo) return exitInfo;
            if (!stopping) {
              stopping = (async () => {
                try {
                  child.kill(signal);
                } catch {
                  // ignore
                }
                const t = delay(stopTimeout).then(() => "timeout");
                const r = await Promise.race([exited, t]);
                if (r === "timeout") {
                  child.kill("SIGKILL");
                  await exited;
                  throw new Error(
                    `${label} did not exit within ${stopTimeout} ms after ${signal}; killed it\n--- stderr ---\n${tail(stderrBuf)}`,
                  );
                }
                return r;
              })();
            }
            return stopping;
          };
          resolve({
            child,
            ready,
            exited,
            stop,
            stderr: () => stderrBuf,
            stdout: () => stdoutBuf,
          });
          return;
        }
      }
    });

    child.once("error", (e) => fail(`failed to start: ${e.message}`));
    child.once("exit", (code, signal) =>
      fail(`exited before it was ready (code ${code}, signal ${signal})`),
    );
  });
}

/**
 * Starts one `stickless` instance on a free loopback port (in-process backplane unless
 * REDIS_URL is passed in `env`); `bin` runs another program that speaks the same way, e.g.
 * the `testhub` example. Resolves with { url, port, stop(), stderr(), exited, child }.
 */
export async function startServer({ env = {}, args = [], timeoutMs = 20000, bin: program } = {}) {
  const bin = program ? resolveBin("", program) : resolveBin("STICKLESS_BIN", "target/debug/stickless");
  const h = await spawnAndWait({
    bin,
    args,
    label: "stickless",
    timeoutMs,
    env: {
      ...baseEnv(),
      LISTEN_ADDR: "127.0.0.1:0",
      STATIC_DIR: path.join(REPO_ROOT, "static"),
      RUST_LOG: "warn",
      ...env,
    },
    isReady: (line) => {
      const m = /^stickless listening on (http:\/\/127\.0\.0\.1:(\d+))\s*$/.exec(line);
      return m ? { url: m[1], port: Number(m[2]) } : null;
    },
  });
  return { ...h, url: h.ready.url, port: h.ready.port };
}

/**
 * Starts `stickless-cluster` (redis + N instances + nginx). Options: `instances`,
 * `directRouting` (default true: instances announce ADVERTISE_URL; false: every misrouted
 * request goes back through nginx), `instanceEnv` (extra settings for every instance).
 * Resolves with { url, redis, instances: [{id, url}], stop(), stderr(), exited, child }.
 * Its stdin stays open: if this test process dies, the cluster sees EOF and stops itself.
 */
export async function startCluster({ instances = 2, directRouting = true, instanceEnv = {}, timeoutMs = 90000 } = {}) {
  const bin = resolveBin("STICKLESS_CLUSTER_BIN", "target/debug/stickless-cluster");
  const fullArgs = [
    "--instances",
    String(instances),
    "--stop-on-stdin-eof",
    "--bin",
    resolveBin("STICKLESS_BIN", "target/debug/stickless"),
    "--nginx-conf",
    path.join(REPO_ROOT, "nginx.conf"),
    "--static-dir",
    path.join(REPO_ROOT, "static"),
  ];
  if (!directRouting) fullArgs.push("--no-direct-routing");
  for (const [k, v] of Object.entries(instanceEnv)) fullArgs.push("--env", `${k}=${v}`);
  const h = await spawnAndWait({
    bin,
    args: fullArgs,
    label: "stickless-cluster",
    timeoutMs,
    stdin: "pipe",
    env: { ...baseEnv(), RUST_LOG: "warn", STICKLESS_CLUSTER_LOG: "info" },
    isReady: (line) => {
      const t = line.trim();
      if (!t.startsWith("{")) return null;
      const info = JSON.parse(t);
      if (typeof info.url !== "string" || !Array.isArray(info.instances)) {
        throw new Error("JSON line lacks url/instances");
      }
      return info;
    },
  });
  const baseStop = h.stop;
  return {
    ...h,
    url: h.ready.url,
    redis: h.ready.redis,
    instances: h.ready.instances,
    stop: async (opts) => {
      const r = await baseStop(opts);
      try {
        h.child.stdin.destroy();
      } catch {
        // ignore
      }
      return r;
    },
  };
}

/**
 * The suite's cluster: started (`startCluster(options)`) before the tests of the enclosing
 * `describe` (or file), checked to have distinct instance ids, handed to `onStarted`; after
 * them every client is stopped, then the cluster.
 */
export function clusterForSuite(options, onStarted, { startTimeoutMs = 120000, stopTimeoutMs = 30000 } = {}) {
  let cluster;
  before(
    async () => {
      cluster = await startCluster(options);
      const ids = cluster.instances.map((i) => i.id);
      assert.equal(new Set(ids).size, options.instances ?? 2, `instance ids are not distinct: ${JSON.stringify(ids)}`);
      await onStarted(cluster);
    },
    { timeout: startTimeoutMs },
  );
  after(
    async () => {
      await stopAllConnections();
      if (cluster) await cluster.stop({ timeoutMs: stopTimeoutMs });
    },
    { timeout: stopTimeoutMs * 2 },
  );
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/**
 * A logger for the official client: records every entry (so tests can look for e.g.
 * "Close message received from server.") and prints only entries at or above
 * STICKLESS_TEST_LOG_LEVEL (default: None, i.e. quiet; set it to "Warning" or "Trace" to debug).
 */
export class RecordingLogger {
  constructor(name) {
    this.name = name;
    this.entries = [];
    const lvl = process.env.STICKLESS_TEST_LOG_LEVEL;
    this.printLevel = lvl && LogLevel[lvl] !== undefined ? LogLevel[lvl] : LogLevel.None;
  }
  log(level, message) {
    this.entries.push({ level, message, at: Date.now() });
    if (this.entries.length > 5000) this.entries.shift();
    if (level >= this.printLevel && level !== LogLevel.None) {
      process.stderr.write(`[${this.name} ${LogLevel[level]}] ${message}\n`);
    }
  }
  has(substring) {
    return this.entries.some((e) => e.message.includes(substring));
  }
  dump(minLevel = LogLevel.Information) {
    return this.entries
      .filter((e) => e.level >= minLevel)
      .map((e) => `${LogLevel[e.level]}: ${e.message}`)
      .join("\n");
  }
}

const liveConnections = new Set();

function transportFlag(transport) {
  if (typeof transport === "number") return transport;
  const flag = HttpTransportType[transport];
  if (typeof flag !== "number") throw new Error(`unknown transport ${transport}`);
  return flag;
}

let connectionCounter = 0;

/**
 * Builds (and by default starts) a HubConnection to `${baseUrl}/chat` using ONLY the given
 * transport. Options: transport ("WebSockets" | "ServerSentEvents" | "LongPolling" or a
 * HttpTransportType flag), accessTokenFactory, reconnect (array of delays, or true for the
 * default policy), hubPath, start (default true), startTimeoutMs, builder (a function that
 * may change the HubConnectionBuilder, e.g. b => b.withStatefulReconnect()), plus any other
 * IHttpConnectionOptions. The connection is tracked; stopAllConnections() stops it.
 * The returned HubConnection gets extra properties: `logger`, `transportName`, `label`.
 */
export async function connect(baseUrl, opts = {}) {
  const {
    transport = "WebSockets",
    reconnect,
    hubPath = HUB_PATH,
    start = true,
    startTimeoutMs = 10000,
    label,
    builder: customize = (b) => b,
    ...httpOptions
  } = opts;
  const name = label ?? `${typeof transport === "string" ? transport : transport}#${++connectionCounter}`;
  const logger = new RecordingLogger(name);
  let builder = new HubConnectionBuilder()
    .withUrl(baseUrl + hubPath, { transport: transportFlag(transport), ...httpOptions })
    .configureLogging(logger);
  if (Array.isArray(reconnect)) builder = builder.withAutomaticReconnect(reconnect);
  else if (reconnect === true) builder = builder.withAutomaticReconnect();
  builder = customize(builder);
  const connection = builder.build();
  connection.logger = logger;
  connection.transportName = typeof transport === "string" ? transport : HttpTransportType[transport];
  connection.label = name;
  liveConnections.add(connection);
  connection.onclose(() => liveConnections.delete(connection));
  if (start) {
    try {
      await withTimeout(connection.start(), startTimeoutMs, `${name}: start()`);
    } catch (e) {
      await safeStop(connection);
      e.message += `\nclient log:\n${logger.dump(LogLevel.Debug)}`;
      throw e;
    }
  }
  return connection;
}

async function safeStop(connection, timeoutMs = 5000) {
  try {
    await withTimeout(connection.stop(), timeoutMs, `${connection.label}: stop()`);
  } catch {
    // best effort
  } finally {
    liveConnections.delete(connection);
  }
}

/** Stops every connection created by connect() that is still around (use in afterEach). */
export async function stopAllConnections() {
  const all = [...liveConnections];
  liveConnections.clear();
  await Promise.all(all.map((c) => safeStop(c)));
}

/** Rejects with a clear message if `promise` does not settle within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

/**
 * Registers a handler for `target` on `connection` right away and records every call's
 * argument list (optionally only those for which `filter(...args)` is true).
 *
 *   const rec = record(conn, "Send", (m) => m.startsWith(tag));
 *   ... do things ...
 *   const msgs = await rec.next(3);          // the next 3 argument arrays, in arrival order
 *   const [ev] = await rec.waitFor((e) => e.kind === "joined");  // any time, past or future
 *   await flush(sender, [conn]); rec.assertNone();  // nothing matching arrived before a marker
 */
export function record(connection, target, filter = () => true) {
  const items = [];
  let cursor = 0;
  const waiters = new Set();
  const handler = (...args) => {
    let keep;
    try {
      keep = filter(...args);
    } catch {
      keep = false;
    }
    if (!keep) return;
    items.push(args);
    for (const w of [...waiters]) w();
  };
  connection.on(target, handler);
  const who = connection.label ?? "connection";
  const wait = (check, timeoutMs, describeWait) =>
    new Promise((resolve, reject) => {
      const run = () => {
        const r = check();
        if (r !== undefined) {
          waiters.delete(run);
          clearTimeout(timer);
          resolve(r);
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(run);
        reject(
          new Error(
            `Timed out after ${timeoutMs} ms waiting for ${describeWait} '${target}' on ${who}; ` +
              `received ${items.length}: ${JSON.stringify(items).slice(0, 2000)}`,
          ),
        );
      }, timeoutMs);
      waiters.add(run);
      run();
    });
  return {
    items,
    get count() {
      return items.length;
    },
    /** Resolves with the next `n` argument arrays (consumes them). */
    next(n = 1, timeoutMs = 5000) {
      return wait(
        () => {
          if (items.length - cursor < n) return undefined;
          const out = items.slice(cursor, cursor + n);
          cursor += n;
          return out;
        },
        timeoutMs,
        `${n} more message(s) (after ${cursor} consumed)`,
      );
    },
    /** Resolves with the args of the first message (ever) for which `pred(...args)` holds. */
    waitFor(pred, timeoutMs = 5000, what = "a matching message") {
      return wait(() => items.find((args) => pred(...args)), timeoutMs, what);
    },
    /**
     * Fails if any message matching `pred` has arrived. Call it after `flush()`: a marker sent
     * after the message that must not arrive has arrived, so nothing is still on its way.
     */
    assertNone(pred = () => true, what = "") {
      const bad = items.filter((args) => pred(...args));
      if (bad.length > 0) {
        throw new Error(`${who} received unexpected '${target}' message(s)${what ? ` (${what})` : ""}: ${JSON.stringify(bad).slice(0, 2000)}`);
      }
    },
    dispose() {
      connection.off(target, handler);
    },
  };
}

/** Collects a server stream into an array, failing after `timeoutMs`. */
export function collectStream(connection, method, args, timeoutMs = 5000) {
  const items = [];
  let subscription;
  const done = new Promise((resolve, reject) => {
    subscription = connection.stream(method, ...args).subscribe({
      next: (item) => items.push(item),
      complete: () => resolve(items),
      error: (err) => reject(err),
    });
  });
  return withTimeout(done, timeoutMs, `stream ${method}(${args.join(", ")}) to complete; got ${JSON.stringify(items)}`)
    .catch((e) => {
      try {
        subscription.dispose();
      } catch {
        // ignore
      }
      throw e;
    });
}

/** Resolves on the next call of one of the HubConnection's event registrations. */
export function nextEvent(connection, kind, timeoutMs, what) {
  return withTimeout(
    new Promise((resolve) => {
      const fn = (arg) => resolve({ arg, at: Date.now() });
      if (kind === "reconnecting") connection.onreconnecting(fn);
      else if (kind === "reconnected") connection.onreconnected(fn);
      else if (kind === "close") connection.onclose(fn);
      else throw new Error(`unknown event ${kind}`);
    }),
    timeoutMs,
    what ?? `${connection.label}: on${kind}`,
  );
}

/** A short random string to tag a test's messages. */
export function nonce(prefix = "n") {
  return `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Raw HTTP helper with a timeout; returns { status, headers, text, json }. */
export async function http(url, { method = "GET", headers = {}, body, timeoutMs = 5000 } = {}) {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    const res = await fetch(url, { method, headers, body, signal: ac.signal });
    const text = await res.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    return { status: res.status, headers: res.headers, text, json };
  } catch (e) {
    if (ac.signal.aborted) throw new Error(`Timed out after ${timeoutMs} ms: ${method} ${url}`);
    throw new Error(`${method} ${url} failed: ${e.message}${e.cause ? ` (${e.cause.code ?? e.cause.message})` : ""}`);
  } finally {
    clearTimeout(timer);
  }
}

export const RS = "\u001e";

/** Splits a text payload into parsed JSON hub messages. */
export function parseRecords(text) {
  if (!text) return [];
  if (!text.endsWith(RS)) throw new Error(`payload does not end with the record separator: ${JSON.stringify(text)}`);
  return text
    .split(RS)
    .slice(0, -1)
    .map((r) => JSON.parse(r));
}

/** Prints a response for assertion messages. */
export function describeResponse(r) {
  return `HTTP ${r.status} ${JSON.stringify(r.text).slice(0, 500)}`;
}

/** POST {base}/chat/negotiate?{query} without a client. */
export function rawNegotiate(base, query = "negotiateVersion=1", headers = {}) {
  return http(`${base}${HUB_PATH}/negotiate${query ? "?" + query : ""}`, { method: "POST", headers });
}

/**
 * A hand-driven Long Polling connection for `token`. Every call takes the base URL to use, so
 * a test can send each request to a different instance.
 */
export function rawLongPolling(token) {
  const url = (base, extra = "") => `${base}${HUB_PATH}?id=${token}${extra}`;
  const received = [];
  const session = {
    token,
    received,
    poll: (base, timeoutMs = 10000) => http(url(base, `&_=${Date.now()}`), { timeoutMs }),
    send: (base, text) =>
      http(url(base), { method: "POST", headers: { "Content-Type": "text/plain;charset=UTF-8" }, body: text }),
    sendMessages: (base, ...msgs) => session.send(base, msgs.map((m) => JSON.stringify(m) + RS).join("")),
    close: (base) => http(url(base), { method: "DELETE" }),
    /**
     * Polls (on `bases`, round-robin) until `pred(allRecordsSoFar)` is true; returns the records.
     * Fails on a poll status other than 200 or after `timeoutMs`.
     */
    async pollUntil(bases, pred, timeoutMs = 10000) {
      const list = Array.isArray(bases) ? bases : [bases];
      const deadline = Date.now() + timeoutMs;
      let i = 0;
      while (!pred(received)) {
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new Error(`Timed out after ${timeoutMs} ms polling; records so far: ${JSON.stringify(received)}`);
        }
        const base = list[i++ % list.length];
        const r = await session.poll(base, Math.max(left, 100));
        if (r.status !== 200) {
          throw new Error(`poll on ${base} returned ${describeResponse(r)}; records so far: ${JSON.stringify(received)}`);
        }
        received.push(...parseRecords(r.text));
      }
      return received;
    },
  };
  return session;
}

/** Changes one character of a base64url-ish token, keeping its length and alphabet. */
export function forgeToken(token) {
  const i = Math.floor(token.length / 2);
  const c = token[i];
  const replacement = c === "A" ? "B" : "A";
  return token.slice(0, i) + replacement + token.slice(i + 1);
}

/**
 * Sends a marker broadcast (target `Send`) from `sender` and waits until every connection in
 * `receivers` has it. The server handles one connection's invocations in order and the
 * backplane keeps each sender's order, so whatever `sender` sent before the marker has
 * reached each receiver by then: "nothing else arrived" needs no waiting window.
 */
export async function flush(sender, receivers, timeoutMs = 15000) {
  const tag = nonce("marker");
  const recs = receivers.map((r) => record(r, "Send", (m) => m === tag));
  try {
    await withTimeout(sender.invoke("Send", tag), timeoutMs, `${sender.label}: marker Send`);
    await Promise.all(recs.map((r) => r.next(1, timeoutMs)));
  } finally {
    recs.forEach((r) => r.dispose());
  }
}

/**
 * Polls `probe()` (sync or async) until it returns something other than undefined/false and
 * resolves with that value; fails after `timeoutMs` with the last value seen. For states that
 * have no event to wait on (a metric reaching a value, a health status changing).
 */
export async function waitUntil(probe, timeoutMs, what, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    let ready = false;
    try {
      last = await probe();
      ready = last !== undefined && last !== false;
    } catch (e) {
      last = `threw ${e.message}`;
    }
    if (ready) return last;
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(last)}`);
    }
    await delay(intervalMs);
  }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/**
 * GET {base}/metrics, parsed: `series` maps `name{labels}` (as printed) to its number,
 * `families` holds every metric name declared by a `# TYPE` line.
 */
export async function scrape(base) {
  const r = await http(`${base}/metrics`);
  if (r.status !== 200) throw new Error(`${base}/metrics: ${describeResponse(r)}`);
  const series = new Map();
  const families = new Set();
  for (const line of r.text.split("\n")) {
    if (!line) continue;
    const type = /^# TYPE (\S+) /.exec(line);
    if (type) families.add(type[1]);
    if (line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$/.exec(line);
    if (!m) throw new Error(`${base}/metrics: unparsable line ${JSON.stringify(line)}`);
    series.set(m[1], Number(m[2]));
  }
  return { series, families };
}

function labelsOf(key) {
  const out = {};
  const m = /\{(.*)\}$/.exec(key);
  if (!m) return out;
  for (const part of m[1].matchAll(/([a-zA-Z_]+)="([^"]*)"/g)) out[part[1]] = part[2];
  return out;
}

/**
 * The sum of every series of metric `name` whose labels include `labels`, on one instance
 * (`base`) or several (an array). Fails loudly when the metric is not there at all (neither
 * declared nor printed): a renamed or removed metric must never read as 0. A declared
 * labelled family with no matching series (nothing counted yet) reads as 0; tests pair such
 * a zero with a positive control on the same family.
 */
export async function metric(bases, name, labels = {}) {
  let total = 0;
  for (const base of Array.isArray(bases) ? bases : [bases]) {
    const { series, families } = await scrape(base);
    // OpenMetrics declares a counter's family without its `_total` suffix.
    let found = families.has(name) || families.has(name.replace(/_total$/, ""));
    for (const [key, value] of series) {
      if (key.replace(/\{.*$/, "") !== name) continue;
      found = true;
      const have = labelsOf(key);
      if (Object.entries(labels).every(([k, v]) => have[k] === v)) total += value;
    }
    if (!found) throw new Error(`metric ${name} is missing from ${base}/metrics`);
  }
  return total;
}

// ---------------------------------------------------------------------------
// Cluster processes
// ---------------------------------------------------------------------------

/**
 * The pid of each instance the cluster launcher started, by INSTANCE_ID (read from
 * /proc/<pid>/environ of the launcher's children), so a test can signal one of them.
 */
export function instancePids(cluster) {
  const launcher = cluster.child.pid;
  const children = [];
  for (const task of readdirSync(`/proc/${launcher}/task`)) {
    const text = readFileSync(`/proc/${launcher}/task/${task}/children`, "utf8").trim();
    if (text) children.push(...text.split(/\s+/).map(Number));
  }
  const pids = new Map();
  for (const pid of children) {
    let environ;
    try {
      environ = readFileSync(`/proc/${pid}/environ`, "utf8");
    } catch {
      continue; // exited meanwhile
    }
    const id = environ.split("\0").find((kv) => kv.startsWith("INSTANCE_ID="));
    if (id) pids.set(id.slice("INSTANCE_ID=".length), pid);
  }
  return pids;
}
